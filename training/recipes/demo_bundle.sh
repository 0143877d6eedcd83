#!/usr/bin/env bash
# The exact commands that produced the demo bundle in screener/bundles/demo.
# Usage: training/recipes/demo_bundle.sh [JSRT_ROOT] [RUN_DIR] [BUNDLE_OUT]
# About 45 min on 2 CPU cores; every step resumes where it stopped.
set -euo pipefail
JSRT=${1:-../shared/data/jsrt}
RUN=${2:-runs}
OUT=${3:-screener/bundles/demo}
THREADS=${THREADS:-0}

# 1. Landmark detector on the 197 JSRT radiographs (fixed 158/39 by-image split).
python -m training landmarks train --jsrt-root "$JSRT" --out "$RUN/landmarks" --epochs 60 --threads "$THREADS" --resume
python -m training landmarks evaluate --jsrt-root "$JSRT" --checkpoint "$RUN/landmarks/best.pt" --out "$RUN/landmarks/eval"

# 2. Demo BMD labels from age and sex (NOT DXA), then the multi-ROI network on them.
python -m training demo-labels --jsrt-root "$JSRT" --out "$RUN/demo/manifest.csv"
python -m training bmd train --manifest "$RUN/demo/manifest.csv" --out "$RUN/demo/bmd" --backbone resnet18 \
    --roi-size 96 --optimizer adamw --schedule cosine --lr 1e-3 --weight-decay 1e-4 --batch-size 16 --epochs 20 \
    --threads "$THREADS" --resume
python -m training bmd evaluate --checkpoint "$RUN/demo/bmd/best.pt" --manifest "$RUN/demo/manifest.csv" \
    --out "$RUN/demo/bmd/eval" --title "demo model on demo labels (age/sex curve, NOT DXA)"

# 3. Bundle: weights + manifest, checked by loading it back.
python -m training export --landmarks "$RUN/landmarks/best.pt" --bmd "$RUN/demo/bmd/best.pt" --out "$OUT" \
    --name cxr-bmd-demo --version 0.1.0 --demo \
    --intended-use "Demonstration and integration testing of the CXR-BMD screening node. Not for clinical use." \
    --landmark-metrics "$RUN/landmarks/eval/landmark_metrics.json" --bmd-metrics "$RUN/demo/bmd/eval/metrics.json" \
    --training-manifest "$RUN/demo/manifest.csv" \
    --label-source "demo: L1-L4 BMD derived from age and sex by a population curve (training/demo_labels.py), NOT DXA"
