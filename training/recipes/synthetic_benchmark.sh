#!/usr/bin/env bash
# Synthetic benchmark: multi-ROI vs global-only on JSRT images with a BMD signal planted in
# bone under the local ROIs (training/synthetic.py). Prints both validation tables.
# Usage: training/recipes/synthetic_benchmark.sh [JSRT_ROOT] [RUN_DIR]   (about 30 min on 2 CPU cores)
set -euo pipefail
JSRT=${1:-../shared/data/jsrt}
RUN=${2:-runs/synthetic}
THREADS=${THREADS:-0}
EPOCHS=${EPOCHS:-12}
COMMON=(--backbone resnet18 --roi-size 96 --optimizer adamw --schedule cosine --lr 1e-3 --weight-decay 1e-4 --batch-size 16
        --epochs "$EPOCHS" --threads "$THREADS")
[ -f "$RUN/manifest.csv" ] || python -m training synthetic --jsrt-root "$JSRT" --out "$RUN" --copies 2
python -m training bmd train --manifest "$RUN/manifest.csv" --out "$RUN/multi_roi" "${COMMON[@]}" --resume
python -m training bmd train --manifest "$RUN/manifest.csv" --out "$RUN/global" --rois whole_image "${COMMON[@]}" --resume
python -m training bmd evaluate --checkpoint "$RUN/multi_roi/best.pt" --manifest "$RUN/manifest.csv" \
    --out "$RUN/eval_multi_roi" --title "synthetic: multi-ROI (6 local + whole image)"
python -m training bmd evaluate --checkpoint "$RUN/global/best.pt" --manifest "$RUN/manifest.csv" \
    --out "$RUN/eval_global" --title "synthetic: global only (whole image)"
python - "$RUN" <<'PY'
import json, sys
run = sys.argv[1]
for name in ("multi_roi", "global"):
    m = json.load(open(f"{run}/eval_{name}/metrics.json"))
    print(f"{name:>10}: L1-L4 r = {m['L1-L4']['pearson_r']:.3f}, MAE = {m['L1-L4']['mae']:.3f} g/cm2, "
          f"average r = {m['average']['pearson_r']:.3f} (n = {m['n']})")
PY
