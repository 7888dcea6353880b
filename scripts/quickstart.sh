#!/usr/bin/env bash
# Set up this checkout and run the whole pipeline on the embedded sample (240 synthetic
# Swedish clips in Common Voice format): features, a short fine-tuning run, a best model.
#   bash scripts/quickstart.sh
#   WHISPER_MODEL=/path/to/local/whisper bash scripts/quickstart.sh   # offline, or another size
# On a GPU it fine-tunes openai/whisper-small for 200 steps; on a CPU openai/whisper-tiny for 30.
set -euo pipefail
cd "$(dirname "$0")/.."

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

# one feature store and one run per model, so that another WHISPER_MODEL starts its own
name="sample-$(basename "$model")"
run="$name-demo"
.venv/bin/python feature_pipeline.py --set "model.name_or_path=$model" --set "features.name=$name"
.venv/bin/python training_pipeline.py --set "model.name_or_path=$model" --set "features.name=$name" \
  --set "training.run_name=$run" "${short[@]}"

echo
echo "done: the fine-tuned model is in checkpoints/$run/best (model card: checkpoints/$run/best/README.md)"
echo "try it in the browser: .venv/bin/python inference_app.py --model checkpoints/$run/best"
