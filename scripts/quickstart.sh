#!/usr/bin/env bash
# Set up this checkout and run the whole pipeline on the embedded sample (240 synthetic
# Swedish clips in Common Voice format): features, a short fine-tuning run, a best model.
#   bash scripts/quickstart.sh
#   WHISPER_MODEL=/path/to/local/whisper bash scripts/quickstart.sh   # offline, or another size
#   bash scripts/quickstart.sh --set training.max_steps=10 [--fresh]   # arguments go to training_pipeline.py
# On a GPU it fine-tunes openai/whisper-small for 200 steps; on a CPU openai/whisper-tiny for 30.
set -euo pipefail
# a local model folder named relative to where the command was started
if [ -n "${WHISPER_MODEL:-}" ] && [ -e "$WHISPER_MODEL" ]; then
  WHISPER_MODEL=$(cd "$WHISPER_MODEL" && pwd)
fi
cd "$(dirname "$0")/.."
repo=$(pwd)

bash scripts/setup.sh

if .venv/bin/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  model=${WHISPER_MODEL:-openai/whisper-small}
  short=(--set training.max_steps=200 --set training.eval_steps=100
         --set training.save_steps=100)
else
  model=${WHISPER_MODEL:-openai/whisper-tiny}
  short=(--set training.max_steps=30 --set training.eval_steps=15
         --set training.save_steps=15 --set training.batch_size=8 --set training.eval_batch_size=16
         --set training.dataloader_workers=0)
fi

# one feature store and one run per model, so that another WHISPER_MODEL starts its own: a
# local folder's name gets a hash of its path (two folders called whisper-small, or best/)
name="sample-$(basename "$model")"
if [ -e "$model" ]; then
  name="$name-$(printf %s "$model" | sha256sum | cut -c1-8)"
fi
run="$name-demo"
.venv/bin/python feature_pipeline.py --set "model.name_or_path=$model" --set "features.name=$name"
.venv/bin/python training_pipeline.py --set "model.name_or_path=$model" --set "features.name=$name" \
  --set "training.run_name=$run" "${short[@]}" "$@"

echo
echo "done: the fine-tuned model is in $repo/checkpoints/$run/best (model card: best/README.md there)"
echo "try it in the browser: cd $repo && .venv/bin/python inference_app.py --model checkpoints/$run/best"
