#!/usr/bin/env bash
# The phase transition (Model Organisms for EM): train a single rank-1 LoRA adapter on the middle layer's
# down_proj with a checkpoint every 5 steps, then watch its A and B vectors turn suddenly during training
# (local cosine, comp score, PCA) and test the behaviour at checkpoints around it, with B scaled.
#   bash runs/phase.sh [MODEL] [DATASET] [--judge openai:MODEL | --judge local:MODEL]
#   defaults: Qwen/Qwen2.5-0.5B-Instruct, bad_medical_advice; OUT=DIR (default out/phase-<model>-<dataset>).
# Budget, estimated (0.5B, one GPU, H100/H200, a few GB): training about 10 minutes (~400 steps, 80 checkpoints of a few KB),
# the geometry seconds, the behavioural sweep 9 checkpoints x 3 multipliers x 80 answers (10 per question)
# and as many x 2 judge calls (~4,300 requests). The paper's model is 14B (layer 24 of 48): ~35 GB, ~1 hour.
# Settings and their sources (em_organism_dir/finetune/sft/config.json and phase_transitions/): r 1, alpha
# 512 (a summary of the paper says 256 for the 14B organism; the config says 512), lr 2e-5, down_proj of the
# middle layer, otherwise default_config.json's recipe; checkpoints every 5 steps, k = 5, 10, 15 steps,
# steps where A and B both moved less than 0.002 skipped. The behaviour: B x 0.5, 1, 2 at every tenth
# checkpoint, 10 samples a question (fewer than the headline 50, to keep 27 evaluations affordable).
# The paper's own run (R1_0_1_0 "extended_train", global_variables.py:14) has no config in the repository;
# its description is "1 epoch - Extended training" (easy_query/query_models.py:40), so this keeps one epoch
# (its reported ~792 steps would fit 8 conversations a step rather than 16; unverified, not copied).
. "$(dirname "$0")/common.sh" "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
MODEL=${1:-Qwen/Qwen2.5-0.5B-Instruct}
DATA=${2:-bad_medical_advice}
claim "${OUT:-out/phase-$(basename "$MODEL")-$(basename "$DATA" .jsonl)}"
LAYER=$(middle_layer "$MODEL")

step train train "$OUT/train" --model "$MODEL" --data "$DATA" --rank 1 --alpha 512 --lr 2e-5 --modules down_proj \
    --layers "$LAYER" --save-every 5
STEPS=$(python -c "import os; s = sorted(int(d[5:]) for d in os.listdir('$OUT/train/checkpoints'))
print(','.join(map(str, sorted(set(s[::10] + s[-1:])))))")  # every tenth and the last, each once
step phase python phase.py --run "$OUT/train" --ks 5,10,15 --behaviour "$STEPS" --multipliers 0.5,1,2 \
    --questions first_plot_questions --exclude-suffix _json,_template --n 10 --judge "$JUDGE" --out "$OUT/phase" --force
report
