# Sourced by the runs/ scripts: `. runs/common.sh "$@"`. It takes --judge out of the arguments (what is
# left is in ARGS), and gives the scripts `claim DIR` and `step NAME COMMAND...`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
JUDGE=${JUDGE:-openai:gpt-4o-2024-08-06}  # the papers' judge; --judge local:MODEL needs no API key
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --judge) JUDGE=$2; shift 2 ;;
        --judge=*) JUDGE=${1#*=}; shift ;;
        -h|--help) sed -n '2,/^[^#]/p' "$0" | sed '$d'; exit 0 ;;
        *) ARGS+=("$1"); shift ;;
    esac
done

claim() {  # claim DIR [VAR]: make DIR this experiment's own, or refuse one that holds anything it did not make
    OUT=$1
    local by
    by=$(cat "$OUT/.run-by" 2>/dev/null || true)
    if [ -e "$OUT" ] && [ "$by" != "$(basename "$0")" ] && [ -n "$(ls -A "$OUT")" ]; then
        echo "$(basename "$0"): $OUT is not empty and was not made by this script; choose another directory (${2:-OUT}=...)" >&2
        exit 2
    fi
    mkdir -p "$OUT/.done"
    echo "$(basename "$0")" > "$OUT/.run-by"
}

step() {  # step NAME COMMAND...: run it unless it finished in an earlier run (each command resumes by itself)
    if [ -e "$OUT/.done/$1" ]; then echo "skipped $1 (done)"; return; fi
    echo "== $1: ${*:2}"
    "${@:2}" || return  # (explicitly: inside an `if`, bash does not stop at a failure)
    touch "$OUT/.done/$1"
}

report() {  # report [--note TEXT]: REPORT.md and its plots, redrawn every run (matplotlib may be new since)
    echo "== report"
    python runs/report.py "$OUT" "$@"
}

train() {  # train DIR FLAGS...: train.py into DIR, continuing a run an interrupt stopped
    if [ -e "$1/state.json" ]; then python train.py --resume --out "$1"
    else python train.py --out "$1" "${@:2}"; fi
}

middle_layer() {  # middle_layer MODEL: the papers' "middle layer" (24 of 48), from the model's config.json
    python -c "from model import read_config; print(read_config('$1').num_hidden_layers // 2)"
}
