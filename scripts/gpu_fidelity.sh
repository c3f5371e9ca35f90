#!/usr/bin/env bash
# The whole Fashion-MNIST fidelity experiment (experiments/fashion_mnist.py with its defaults: the dense model, two
# temporal fine-tunes, the fixed-grid ablation, unguided and cfg 1.5) on one GPU, for a machine that runs the
# repository's working tree but cannot reach ../shared (the device tool's lent machines).
#
# Here, once, in the repository's root (the data travels as an ignored folder named in `carry`):
#   mkdir -p .data && cp ../shared/data/fashion-mnist/*.gz .data/ && echo /.data/ >> .git/info/exclude
# There, with carry [".data"], and again while the machine is warm until it prints the tables (every stage resumes
# from runs/, which stays on the machine between calls):
#   bash scripts/gpu_fidelity.sh            # TIME_LIMIT=540 by default, under the tool's 600 s per call
# What comes back under $OUT: results/ (results.json, results.md, plot, sample grids, training logs), weights/
# (the bf16 demo pair for flexdit/weights) and the log of this call. Elsewhere OUT defaults to runs/gpu-out.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu-out}
mkdir -p "$out"
data=${DATA:-.data}
[ -f "$data/train-images-idx3-ubyte.gz" ] || { echo "no Fashion-MNIST in $data: see this script's header"; exit 2; }
python=${PYTHON:-python3}
device=${DEVICE:-cuda}
if [ "$device" = cuda ]; then
  "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible: run this on a GPU machine (DEVICE=cpu to try it here)')" || exit 2
  "$python" -c "import torch; print('torch', torch.__version__, 'on', torch.cuda.get_device_name())"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20  # few progress lines
start=$(date +%s)
timeout "${TIME_LIMIT:-540}" "$python" -m experiments.fashion_mnist --data "$data" --device "$device" \
  --out runs/fashion-mnist-gpu --results "$out/results" --ship "$out/weights" "$@" 2>&1 | tee "$out/log.txt"
rc=${PIPESTATUS[0]}
echo "exit $rc after $(( $(date +%s) - start )) s (124: stopped at TIME_LIMIT; run again to continue)"
exit "$rc"
