#!/usr/bin/env bash
# One prepared device check (≤ 8 minutes on a CUDA machine): benchmarks/adaptation.py and benchmarks/trained.py
# on the device, RegAD / DiffNet+ / TDG+ `paper` adaptation seconds beside the paper's RTX 3090 seconds
# (4.47 / 357.75 / 1559.76), and the projected wall time of the paper_mvtec suite from the measured costs.
#
#   bash benchmarks/gpu.sh                   # cuda when present, else the CPU mode
#   GPU_SH_DEVICE=cpu bash benchmarks/gpu.sh # CPU mode: cpu presets, 64 px, k = 1, one repetition (seconds)
#   PYTHON=/path/to/python bash benchmarks/gpu.sh
# Output: the tables on stdout, also written to ${GPU_SH_OUT:-${OUT:-/tmp}}/gpu_sh.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEVICE=${GPU_SH_DEVICE:-$($PY -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
OUTDIR=${GPU_SH_OUT:-${OUT:-/tmp}}
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_sh.txt"
: > "$LOG"
run() { echo "\$ $*" | tee -a "$LOG"; timeout "${STEP_LIMIT}" "$@" 2>&1 | tee -a "$LOG"; }
if [ "$DEVICE" = "cuda" ]; then
  STEP_LIMIT=200
  "$PY" -c 'import torch; print(torch.cuda.get_device_name(0), torch.__version__)' | tee -a "$LOG"
  nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv | tee -a "$LOG" || true
  run "$PY" benchmarks/adaptation.py --k 8 --size 224 --skip-loop --device cuda
  run "$PY" benchmarks/trained.py --preset paper --size 224 --k 8 --test 32 --repeat 3 --device cuda \
      --adaptation --adapt-fraction 0.05 --profile
  run "$PY" benchmarks/trained.py --preset cpu --size 128 --k 2 --repeat 3 --device cuda --before
else
  STEP_LIMIT=120
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  run "$PY" benchmarks/trained.py --preset cpu --size 64 --k 1 --test 2 --repeat 1 --threads 1 --device cpu \
      --methods regad,diffnet+,tdg+ --adaptation --adapt-fraction 0.05 --before
fi
echo "gpu.sh: done on $DEVICE" | tee -a "$LOG"
