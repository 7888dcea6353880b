#!/usr/bin/env bash
# The GPU benchmark in one command: the blog recipe and this pipeline side by side on a
# random-weight whisper-small. Installs nothing from the network; its parts are limited to 560 s
# in all, within one 10-minute device call (an earlier version took 486 s on an H100). The app on
# the GPU is timed apart: python bench/app_device.py --size small --device cuda --seconds 5 10
#   bash bench/gpu.sh [OUT_DIR]          # default bench/results/gpu; logs and JSON land there
# Needs: python3 with torch (CUDA), transformers, datasets, jiwer, librosa, soundfile, deep-translator
# (the config check imports it). Where they are missing, wheels in .whl/ (bash
# ../shared/tools/device_wheels.sh, plus: pip download --no-deps -d .whl deep-translator beautifulsoup4
# soupsieve) are installed to a scratch folder.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
if ! "$py" -c "import datasets, jiwer, librosa, soundfile, deep_translator" 2>/dev/null; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu.sh: datasets, jiwer, librosa, soundfile or deep-translator is missing and .whl/ holds no wheels:" \
         "run bash ../shared/tools/device_wheels.sh here and carry .whl" >&2
    exit 1
  fi
  site=$(mktemp -d)
  "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl || exit 1
  export PYTHONPATH=$site
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false GRADIO_ANALYTICS_ENABLED=False
work=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
date -u +"%Y-%m-%d %H:%M UTC" | tee -a "$out/gpu.txt"

step() {  # name, time limit (s), command...
  local name=$1 limit=$2 start=$SECONDS; shift 2
  echo "== $name"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "   ($((SECONDS - start)) s)"
  grep -E '^(  |pipeline|blog|identical|GPU|host|\{)' "$out/$name.log" | cut -c1-400
  [ $rc = 0 ] || { echo "$name failed (exit $rc):"; tail -n 15 "$out/$name.log"; }
}
e2e() {  # name, time limit, bench_e2e arguments...
  local name=$1 limit=$2; shift 2
  step "$name" "$limit" "$py" bench/bench_e2e.py --size small --work "$work" --label "$name" "$@"
  # the whole result, or the timed window's if the part was cut short after it
  grep -ho '{"recipe".*' "$out/$name.log" | tail -n 1 >"$out/$name.json"
  [ -s "$out/$name.json" ] || rm -f "$out/$name.json"
}

step bare 105 "$py" bench/bench_training.py --size small --device cuda --steps 30 --warmup 5 --eval-clips 128 \
  --eval-batch-sizes 128 --json "$out/bare.json"
# 1024 evaluation clips: a Common Voice sv-SE dev or test split has about 5,000, so an evaluation's
# fixed costs (workers, decoder set-up, graph capture) weigh as little as they would there.
# The last 8 steps are profiled after the timed window: is the GPU busy, or is the host behind?
# The 8 before them show where the host's time goes (cProfile). Between the window and them, the
# Trainer's step alone and the bare loop's step, 2 x 5 steps each, on the run's model in its process.
e2e e2e-pipeline 90 --recipe pipeline --steps 180 --skip 20 --eval-clips 1024 --profile-steps 8 --hotspot-steps 8 \
  --same-process-steps 5
e2e e2e-blog 70 --recipe blog --steps 40 --skip 10 --blog-eval-clips 8
# Compiled: on a fresh H200 (no compile cache) the first step took 86 s and the second 8 s;
# 140 steps leave a timed window of 94 after the first 30.
e2e e2e-pipeline-compile 140 --recipe pipeline --steps 140 --skip 30 --eval-clips 1024 --profile-steps 8 \
  --hotspot-steps 8 --set training.torch_compile=true
step profile 40 "$py" bench/profile_step.py --size small
step saves 40 "$py" bench/bench_saves.py --size small --saves 2 --out "$work" --json "$out/saves.json"
# last (a part cut short loses only itself): the decoding engine's transcripts against
# generate's; the engine has not changed since the H200 run measured them
step agreement 70 "$py" bench/bench_training.py --size small --device cuda --agreement 64 --agreement-only \
  --json "$out/agreement.json"
"$py" bench/gpu_report.py "$out"
echo "gpu.sh: $SECONDS s in all"
