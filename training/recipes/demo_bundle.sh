#!/usr/bin/env bash
# The exact commands that produced the demo bundle in screener/bundles/demo.
# Usage: training/recipes/demo_bundle.sh [JSRT_ROOT] [RUN_DIR] [BUNDLE_OUT]
# About 50 min on 2 CPU cores; every step resumes where it stopped. Step 0 (the cross-
# validations the README's accuracy and gate tables and the bundle's validation.landmarks_cv,
# view_cv and gate come from) adds about 100 min; skip it with CV=0.
set -euo pipefail
JSRT=${1:-../shared/data/jsrt}
RUN=${2:-runs}
OUT=${3:-screener/bundles/demo}
THREADS=${THREADS:-0}
CV=${CV:-1}

# 0. The recipe's accuracy by 5-fold cross-validation, and the gate's acceptance table on all
#    197 films (each probed by the fold detector that never saw it).
if [ "$CV" = 1 ]; then
python -m training landmarks cv --jsrt-root "$JSRT" --folds 5 --extent-points --out "$RUN/landmarks-cv-extent" --threads "$THREADS"
python -m training view cv --jsrt-root "$JSRT" --folds 5 --out "$RUN/view-cv" --threads "$THREADS"
python -m training landmarks calibrate --cv-dir "$RUN/landmarks-cv-extent" --view-cv-dir "$RUN/view-cv" --jsrt-root "$JSRT" \
    --out "$RUN/calib-view-cv"
fi

# 1. Landmark detector on the 197 JSRT radiographs (fixed 158/39 by-image split), with the
#    lungs' apex and base as extra points. The last epoch's weights ship (best.pt was picked on
#    the validation images, which would flatter the evaluation).
python -m training landmarks train --jsrt-root "$JSRT" --out "$RUN/landmarks" --epochs 60 --extent-points --threads "$THREADS" --resume
python -m training landmarks evaluate --jsrt-root "$JSRT" --checkpoint "$RUN/landmarks/last.pt" --out "$RUN/landmarks/eval"

# 1b. The gate's view classifier on the same 158 training films (the same split), 40 epochs,
#     the last epoch's weights.
python -m training view train --jsrt-root "$JSRT" --out "$RUN/view" --threads "$THREADS" --resume

# 2. Demo BMD labels from age and sex (NOT DXA), then the multi-ROI network on them (its ROIs
#    come from the JSRT label landmarks in the manifest, not from the detector).
python -m training demo-labels --jsrt-root "$JSRT" --out "$RUN/demo/manifest.csv"
python -m training bmd train --manifest "$RUN/demo/manifest.csv" --out "$RUN/demo/bmd" --backbone resnet18 \
    --roi-size 96 --optimizer adamw --schedule cosine --lr 1e-3 --weight-decay 1e-4 --batch-size 16 --epochs 20 \
    --threads "$THREADS" --resume
python -m training bmd evaluate --checkpoint "$RUN/demo/bmd/best.pt" --manifest "$RUN/demo/manifest.csv" \
    --out "$RUN/demo/bmd/eval" --title "demo model on demo labels (age/sex curve, NOT DXA)"

# 3. Bundle: weights + manifest, checked by loading it back.
python -m training export --landmarks "$RUN/landmarks/last.pt" --bmd "$RUN/demo/bmd/best.pt" --out "$OUT" \
    --name cxr-bmd-demo --version 0.3.0 --demo --view "$RUN/view/last.pt" \
    --intended-use "Demonstration and integration testing of the CXR-BMD screening node. Not for clinical use." \
    --landmark-metrics "$RUN/landmarks/eval/landmark_metrics.json" \
    $( [ -f "$RUN/landmarks-cv-extent/cv_metrics.json" ] && echo --landmark-cv-metrics "$RUN/landmarks-cv-extent/cv_metrics.json" ) \
    $( [ -f "$RUN/view-cv/cv_view.json" ] && echo --view-cv-metrics "$RUN/view-cv/cv_view.json" ) \
    $( [ -f "$RUN/calib-view-cv/confidence_calibration.json" ] && echo --gate-calibration "$RUN/calib-view-cv/confidence_calibration.json" ) \
    --bmd-metrics "$RUN/demo/bmd/eval/metrics.json" \
    --training-manifest "$RUN/demo/manifest.csv" \
    --label-source "demo: L1-L4 BMD derived from age and sex by a population curve (training/demo_labels.py), NOT DXA"
