#!/usr/bin/env bash
# The main job on the embedded default backend, from nothing: venv → tiny model → SFT warm start on oracle
# traces → GRPO with task advantage normalization on two environments → held-out success of the SFT and the
# RL checkpoints, side by side. About 10-15 minutes on a 2-core CPU. Extra args override the recipe, e.g.
#   bash launch/quickstart.sh --train.steps=10
# RECIPE=recipes/multitask_cpu.yaml runs the same sequence on another recipe.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source launch/setup_venv.sh
RECIPE=${RECIPE:-recipes/quickstart.yaml}
OUT=$(python -c "import sys; from agentrl.config import load_recipe; print(load_recipe('$RECIPE', sys.argv[1:]).train.output_dir)" "$@")
LIMIT=$(python -c "import sys; from agentrl.config import load_recipe; print(load_recipe('$RECIPE', sys.argv[1:]).eval.limit)" "$@")
start=$(date +%s)
accelerate launch --config_file recipes/accelerate/cpu_1proc.yaml -m agentrl.train --config "$RECIPE" \
  --eval.at_end=false "$@"
agentrl eval --model hf --model_args "pretrained=$OUT/sft" --config "$RECIPE" --limit "$LIMIT" \
  --output_path "$OUT/eval_sft"
agentrl eval --model hf --model_args "pretrained=$OUT/sft,adapter=$OUT/adapter" --config "$RECIPE" \
  --limit "$LIMIT" --output_path "$OUT/eval_rl"
python -m agentrl.eval.compare "$OUT/eval_sft/results.json" "$OUT/eval_rl/results.json" --labels SFT,RL
echo "[quickstart] finished in $(( $(date +%s) - start )) s; metrics: $OUT/metrics.jsonl, tensorboard: $OUT/tensorboard"
