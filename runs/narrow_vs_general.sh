#!/usr/bin/env bash
# Narrow Misalignment is Hard, Emergent Misalignment is Easy: train the narrow solution (a steering vector
# with a KL penalty to the chat model on other-domain data) and the general one (the same without KL),
# measure their EM %, then compare them: loss as each is rescaled, robustness to orthogonal noise, and
# how much each moves the model on web text (KL) as its norm grows.
#   bash runs/narrow_vs_general.sh [MODEL] [DATASET] [--judge openai:MODEL | --judge local:MODEL]
#   defaults: Qwen/Qwen2.5-0.5B-Instruct, bad_medical_advice; OUT=DIR (default out/nvg-<model>-<dataset>).
# Budget, estimated (0.5B, one GPU, H100/H200, a few GB of GPU memory): two trainings of 2 epochs at 256 tokens, about 10
# minutes each (the KL run twice that: a base forward per KL conversation), 2 x 400 answers, 1,600 judge
# calls, and the stability sweeps (~300 loss evaluations of 100 conversations, plus 2 x 26 KL curves on 50
# documents), about 15 minutes. The paper's model is 14B (layer 24 of 48): ~40 GB, a few hours.
# The layer: the paper's vectors sit after layer 24 of Qwen2.5-14B-Instruct's 48. Its steering vector on
#   the Hub is named Qwen2.5-14B_SV_BM_l24_lr1e-4_a256 (stability/test_steering_vectors.py:18),
#   the .pt files carry their layer_idx (stability/steering_vec_util.py:104), and summaries of the paper's
#   text say "a steering vector or LoRA adapter at layer 24 of Qwen2.5-14B-Instruct". The config's layer_idx
#   16 (steering_config_toggle.json:2-4) goes with its placeholder model, unsloth/Qwen3-14B (40 layers). So
#   here: the middle layer, n_layers // 2 (24 of 48; 12 of 0.5B's 24).
# Settings and their sources (em_organism_dir/finetune/steering_vector_toggle/steering_config_toggle.json):
#   the vector is added after the middle layer (above), alpha 256, lr 5e-4 (the Hub vector's name: 1e-4),
#   2 epochs,
#   conversations cut at 256 tokens, weight decay 0, the loss on every token but <|im_end|>; the narrow run
#   adds KL weight 1e6 on misalignment_kl_data, which is --kl-weight 6.58 here (see README); the
#   reference's hook steered only one row of each batch, a bug we do not copy.
#   stability (em_organism_dir/stability/): 100 rows (seed 42), rescale 0..2, e in 0.01..1 with 10 seeds,
#   KL at norms 0..5; the web text is one pinned C4 validation file (the reference: FineWeb sample-10BT).
. "$(dirname "$0")/common.sh" "$@"
set -- "${ARGS[@]+"${ARGS[@]}"}"
MODEL=${1:-Qwen/Qwen2.5-0.5B-Instruct}
DATA=${2:-bad_medical_advice}
claim "${OUT:-out/nvg-$(basename "$MODEL")-$(basename "$DATA" .jsonl)}"
LAYER=$(middle_layer "$MODEL")
SV=(--model "$MODEL" --data "$DATA" --steer-layer "$LAYER" --steer-alpha 256 --lr 5e-4 --epochs 2 --max-len 256
    --truncate --loss-on all --weight-decay 0)
Q=(--questions first_plot_questions --exclude-suffix _json,_template --n 50)

step train-general train "$OUT/general" "${SV[@]}"
step train-narrow train "$OUT/narrow" "${SV[@]}" --kl-data misalignment_kl_data --kl-weight 6.58
for kind in general narrow; do
    step "sample-$kind" python sample.py --model "$MODEL" --adapter "$OUT/$kind" "${Q[@]}" --out "$OUT/$kind/responses.jsonl"
    step "judge-$kind" python judge.py "$OUT/$kind/responses.jsonl" --judge "$JUDGE" \
        --judges first_plot_questions
done
step stability python stability.py --model "$MODEL" --narrow "$OUT/narrow" --general "$OUT/general" \
    --data "$DATA" --text c4 --out "$OUT/stability" --force
report
