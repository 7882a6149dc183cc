#!/usr/bin/env bash
# The CUDA checks in one command on a GPU machine with CUDA torch: correctness first, then the speeds.
#   1. setup    checks that the test requirements import and says which do not (no pip: the machine may
#               have no network; wheels carried in .whl/ are installed, offline); never torch
#   2. graph    the CUDA-graph test whose batch shrinks and is captured again, first, in a process of
#               its own: only a process's first capture showed torch 2.11's graph-pool assert
#   3. tests    the rest of tests/test_cuda.py: bf16 vs fp32, packed attention, graph decode, train step
#   4. bench    bench.py --device cuda, random weights (no downloads), ours beside transformers+PEFT and
#               HF generate, each part in a process of its own (one failure cannot lose another's figures):
#               0.5B training, then 0.5B sampling (400 x 600 tokens), 7B training, and 7B with 64
#               conversations per step (ours only)
# then one JSON with every figure, the goals met or not, and a summary table. A failed phase is
# recorded and the next one runs all the same; the exit status is 1 if any phase failed. Every result
# lands in $OUT as it is made (bench.py rewrites its JSON after each part), so a run cut short at the
# call's time limit still brings back what it measured.
#
#   bash runs/gpu_check.sh                 # writes $OUT/gpu_check.log and $OUT/gpu_check.json
#   GPU_CHECK_QUICK=1 bash runs/gpu_check.sh   # the same logic on the CPU, tiny shapes (tests/test_bench.py)
#
# Budget, under 9 minutes in all even when every phase hangs: each limit (SIGTERM, SIGKILL 5 s later) is
# the phase's work plus START = 20 s for python, the imports and CUDA's start: setup 10 + 20 s, graph
# 25 + 20, tests 50 + 20, bench 0.5B training 45 + 20, 0.5B sampling 100 + 20, 7B 80 + 20, 7B x 64
# conversations 40 + 20: 490 s, 525 with the kills. (The work figures are estimates: no GPU has run them.)
#
# With this workplace's device tool: run(command="bash runs/gpu_check.sh", timeout_s=600). Its image
# has python3 with CUDA torch, transformers, peft and pytest, and no network, so nothing needs
# preparing. Only if a package is missing there (the log's setup phase says which): on this machine,
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl NAME==VERSION
# and add carry=[".whl"] to the run call.
set -euo pipefail
export PYTHONUNBUFFERED=1
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
QUICK=${GPU_CHECK_QUICK:-0}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"

phase() {  # phase NAME SECONDS COMMAND...: run under a time limit, log it, record its status; never stops the script
    local name=$1 limit=$2 t0=$SECONDS rc=0
    shift 2
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$LOG" || rc=$?
    echo "$name $rc $((SECONDS - t0))" >> "$OUT/phases"
    echo "== $name: exit status $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
}

missing_packages() {  # pip names of the test requirements that do not import (torch is not among them)
    "$PY" - <<'EOF'
import importlib.util
need = {"transformers": "transformers", "peft": "peft", "pytest": "pytest", "safetensors": "safetensors",
        "tokenizers": "tokenizers", "huggingface_hub": "huggingface-hub", "numpy": "numpy", "tqdm": "tqdm", "yaml": "pyyaml"}
print(" ".join(pip for module, pip in need.items() if importlib.util.find_spec(module) is None))
EOF
}

setup() {
    nvidia-smi || echo "(no nvidia-smi)"
    if compgen -G ".whl/*.whl" > /dev/null; then  # carried wheels: the way in without network
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    fi
    local missing
    missing=$(missing_packages)
    if [ -n "$missing" ]; then  # no pip install: without network it only waits for its time-outs
        echo "setup: missing $missing (carry their wheels in .whl/, above); phases that need them will fail"
    fi
    "$PY" -c 'import sys, importlib.metadata as m
print("python", sys.version.split()[0], *(f"{p} {m.version(p)}" for p in ("torch", "transformers", "peft", "pytest")))'
    [ "$QUICK" = 1 ] || "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' \
        || { echo "setup: torch sees no CUDA GPU (this script never installs torch)"; return 1; }
}

if compgen -G ".whl/*.whl" > /dev/null; then export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}; fi
if [ "${1:-}" = --setup ]; then setup; exit; fi  # the setup phase: this script again, under a time limit

: > "$LOG"
rm -f "$OUT"/bench_*.json "$OUT"/tests*.xml "$OUT/gpu_check.json"  # an earlier run's figures
: > "$OUT/phases"
if [ "$QUICK" = 1 ]; then
    BENCH=(--quick --device cpu); SMALL=tiny; LARGE=tiny; BIG=8
else
    BENCH=(--device cuda); SMALL=0.5b; LARGE=7b; BIG=64
fi
PYTEST=("$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py)
START=20  # seconds of each limit for python, the imports and CUDA's start, before the phase's work
phase setup $((START + 10)) bash "$SELF" --setup
if [ "$(tail -1 "$OUT/phases" | cut -d' ' -f2)" = 0 ]; then
    phase graph $((START + 25)) "${PYTEST[@]}" -k recapture --junitxml "$OUT/tests_graph.xml"
    phase tests $((START + 50)) "${PYTEST[@]}" -k "not recapture" --junitxml "$OUT/tests.xml"
    phase bench_0.5b_train $((START + 45)) "$PY" bench.py "${BENCH[@]}" --shape "$SMALL" --skip sample \
        --json "$OUT/bench_0.5b_train.json"
    phase bench_0.5b_sample $((START + 100)) "$PY" bench.py "${BENCH[@]}" --shape "$SMALL" --skip train \
        --json "$OUT/bench_0.5b_sample.json"
    phase bench_7b $((START + 80)) "$PY" bench.py "${BENCH[@]}" --shape "$LARGE" --skip sample \
        --json "$OUT/bench_7b.json"
    phase bench_7b_64 $((START + 40)) "$PY" bench.py "${BENCH[@]}" --shape "$LARGE" --skip sample,ref \
        --convs "$BIG" --json "$OUT/bench_7b_64.json"
fi

# one JSON with every figure and the goals; a summary table last (the device tool returns the tail)
"$PY" - "$OUT" "$OUT/gpu_check.json" "$QUICK" <<'EOF' 2>&1 | tee -a "$LOG"
import json, os, sys
import xml.etree.ElementTree as ET
work, path, quick = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
phases = {}
for line in open(os.path.join(work, "phases")):
    name, rc, s = line.split()
    phases[name] = {"exit": int(rc), "seconds": int(s)}
res = {"quick": quick, "phases": phases, "bench": {}}
for name in ("0.5b_train", "0.5b_sample", "7b", "7b_64"):  # the 0.5B parts, run apart, in one entry
    f = os.path.join(work, f"bench_{name}.json")
    if os.path.exists(f):
        part = name.replace("_train", "").replace("_sample", "")
        res["bench"].setdefault(part, {}).update(json.load(open(f)))
for xml in ("tests_graph.xml", "tests.xml"):  # the two test phases, summed
    if os.path.exists(os.path.join(work, xml)):
        s = ET.parse(os.path.join(work, xml)).getroot()
        s = s if s.tag == "testsuite" else s.find("testsuite")
        t = res.setdefault("tests", {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": []})
        for k in ("tests", "failures", "errors", "skipped"):
            t[k] += int(s.get(k, 0))
        t["failed"] += [f"{c.get('name')}: {(c.find('failure') if c.find('failure') is not None else c.find('error')).get('message', '')[:300]}"
                        for c in s.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
b05, b7, b64 = (res["bench"].get(k, {}) for k in ("0.5b", "7b", "7b_64"))
for b in (b05, b7, b64):
    if b:
        res.update(gpu=b["machine"], date=b["date"], torch=b["torch"])
goals = [("train 7b >= 2x transformers+PEFT", b7.get("train_ratio"), lambda v: v >= 2),
         ("train 7b MFU >= 35%", b7.get("train_mfu"), lambda v: v >= 0.35),
         ("sample 0.5b 400x600 < 5 s", b05.get("sample_s"), lambda v: v < 5),
         ("sample 0.5b >= 5x HF generate", b05.get("sample_ratio"), lambda v: v >= 5)]
res["goals"] = {name: {"value": v, "met": None if v is None else bool(ok(v))} for name, v, ok in goals}
tmp = path + ".tmp"
with open(tmp, "w") as f:
    json.dump(res, f, indent=2)
os.replace(tmp, path)

g = lambda b, k, fmt: format(b[k], fmt) if k in b else "-"
print(f"\n== gpu_check summary: {res.get('gpu', '?')}, torch {res.get('torch', '?')}, {res.get('date', '?')}")
for name, p in phases.items():
    status = 'ok' if p['exit'] == 0 else 'FAILED (exit %d)' % p['exit']
    print(f"  {name:17} {status:16} {p['seconds']:4d} s")
if "tests" in res:
    t = res["tests"]
    print(f"  tests: {t['tests']} run, {t['failures'] + t['errors']} failed, {t['skipped']} skipped"
          + "".join(f"\n    FAILED {x}" for x in t["failed"]))
print(f"  {'':30} {'ours':>10} {'reference':>10} {'ratio':>7} {'MFU ours/ref':>14} {'GB ours/ref':>12}")
for label, b, part in (("train 0.5b tok/s", b05, "train"), ("train 7b tok/s", b7, "train"),
                       ("train 7b 64 convs tok/s", b64, "train"), ("sample 0.5b s", b05, "sample"),
                       ("sample 0.5b realistic s", b05, "sample_real")):
    if not any(k.startswith(part) for k in b):
        continue
    v = (lambda k: g(b, k, ",.0f")) if part == "train" else (lambda k: g(b, k.replace("_tok_s", "_s"), ".2f"))
    print(f"  {label:30} {v(part + '_tok_s'):>10} {v(part + '_ref_tok_s'):>10} {g(b, part + '_ratio', '.2f'):>6}x"
          f" {g(b, part + '_mfu', '.1%'):>6} / {g(b, part + '_ref_mfu', '.1%'):>5}"
          f" {g(b, part + '_peak_gb', '.1f'):>5} / {g(b, part + '_ref_peak_gb', '.1f'):>4}")
for name, b in res["bench"].items():  # fair only if both engines got a fast backend
    print(f"  SDPA {name}: " + "; ".join(f"{k[:-5]} {', '.join(b[k])}" for k in b if k.endswith("_sdpa")))
for name, x in res["goals"].items():
    print(f"  goal {name:34} {'-' if x['value'] is None else format(x['value'], '.3g'):>8}  "
          f"{ {True: 'met', False: 'NOT met', None: 'not measured'}[x['met']]}")
print(f"  wrote {path} and {os.path.dirname(path)}/gpu_check.log")
EOF
exit "$(awk '$2 != 0 {bad = 1} END {print bad + 0}' "$OUT/phases")"
