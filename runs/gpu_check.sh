#!/usr/bin/env bash
# The CUDA checks in one command on a bare GPU machine: correctness first, then the speed figures.
#   1. setup    installs only what is missing: a CUDA build of torch matching the driver, then the
#               test requirements (wheels in .whl/ are installed first, for machines without network)
#   2. tests    tests/test_cuda.py: bf16 vs fp32, packed attention, CUDA-graph decode, train step
#   3. bench    bench.py --device cuda, random weights (no downloads), ours beside transformers+PEFT
#               and HF generate: 0.5B (sampling 400 x 600 tokens, training), 7B (training), and 7B
#               with 64 conversations per step (ours only)
# then one JSON with every figure, the goals met or not, and a summary table. A failed phase is
# recorded and the next one runs all the same; the exit status is 1 if any phase failed.
#
#   bash runs/gpu_check.sh                 # writes $OUT/gpu_check.log and $OUT/gpu_check.json
#   GPU_CHECK_QUICK=1 bash runs/gpu_check.sh   # the same logic on the CPU, tiny shapes (tests/test_bench.py)
#
# Budget on an H100, under 8 minutes in all: setup 0-30 s (nothing to install on a machine that has
# torch, transformers and peft; a torch download is about 2 min more), tests ~40 s (limit 100),
# bench 0.5B ~2 min (limit 240), bench 7B ~1 min (limit 100), 7B x 64 conversations ~40 s (limit 60).
# The limits (SIGTERM, then SIGKILL 10 s later) of tests and benches add up to 500 s, so the script
# ends inside a 10-minute call even when a phase hangs (setup takes long only where it downloads);
# bench.py rewrites its JSON after each part, so a phase cut short keeps what it had measured.
#
# With this workplace's device tool: run(command="bash runs/gpu_check.sh", timeout_s=600). Its image
# has python3 with CUDA torch, transformers, peft and pytest, and no network, so nothing needs
# preparing. Only if a package is missing there (the log's setup phase says which): on this machine,
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl NAME==VERSION
# and add carry=[".whl"] to the run call. Elsewhere (pip reaches PyPI) the script installs by itself.
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
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG" || rc=$?
    echo "$name $rc $((SECONDS - t0))" >> "$WORK/phases"
    echo "== $name: exit status $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
}

cuda_ok() { "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }

missing_modules() {  # the test requirements' imports that fail
    "$PY" - <<'EOF' 2>/dev/null || echo "torch"
import importlib.util
need = ["torch", "transformers", "peft", "pytest", "safetensors", "tokenizers", "huggingface_hub", "numpy", "tqdm", "yaml"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
}

setup() {
    nvidia-smi || echo "(no nvidia-smi)"
    if compgen -G ".whl/*.whl" > /dev/null; then  # carried wheels: the way in without network
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    fi
    if [ "$QUICK" != 1 ] && ! cuda_ok; then  # torch's wheel index for the newest CUDA the driver runs
        local cuda tag
        cuda=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\)\.\([0-9]\).*/\1\2/p' | head -1)
        for tag in 130 128 126 124 121 118; do [ "${cuda:-0}" -ge "$tag" ] && break; done
        echo "installing torch for CUDA ${cuda:-?} from https://download.pytorch.org/whl/cu$tag"
        "$PY" -m pip install -q --retries 1 --timeout 20 --upgrade torch --index-url "https://download.pytorch.org/whl/cu$tag"
    fi
    local missing
    missing=$(missing_modules)
    if [ -n "$missing" ]; then
        echo "missing: $missing; installing requirements-test.txt"
        "$PY" -m pip install -q --retries 1 --timeout 20 -r requirements-test.txt
    fi
    "$PY" -c 'import sys, importlib.metadata as m
print("python", sys.version.split()[0], *(f"{p} {m.version(p)}" for p in ("torch", "transformers", "peft", "pytest")))'
    [ "$QUICK" = 1 ] || cuda_ok || { echo "setup: torch sees no CUDA GPU"; return 1; }
}

if compgen -G ".whl/*.whl" > /dev/null; then export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}; fi
if [ "${1:-}" = --setup ]; then setup; exit; fi  # the setup phase: this script again, under a time limit

WORK=$(mktemp -d)
: > "$LOG"
: > "$WORK/phases"
if [ "$QUICK" = 1 ]; then
    BENCH=(--quick --device cpu); SMALL=tiny; LARGE=tiny; BIG=8
else
    BENCH=(--device cuda); SMALL=0.5b; LARGE=7b; BIG=64
fi
phase setup 600 bash "$SELF" --setup  # seconds, unless torch must be downloaded
if [ "$(tail -1 "$WORK/phases" | cut -d' ' -f2)" = 0 ]; then
    phase tests 100 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py --junitxml "$WORK/tests.xml"
    phase bench_0.5b 240 "$PY" bench.py "${BENCH[@]}" --shape "$SMALL" --json "$WORK/bench_0.5b.json"
    phase bench_7b 100 "$PY" bench.py "${BENCH[@]}" --shape "$LARGE" --skip sample --json "$WORK/bench_7b.json"
    phase bench_7b_64 60 "$PY" bench.py "${BENCH[@]}" --shape "$LARGE" --skip sample,ref --convs "$BIG" --json "$WORK/bench_7b_64.json"
fi

# one JSON with every figure and the goals; a summary table last (the device tool returns the tail)
"$PY" - "$WORK" "$OUT/gpu_check.json" "$QUICK" <<'EOF' 2>&1 | tee -a "$LOG"
import json, os, sys
import xml.etree.ElementTree as ET
work, path, quick = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
phases = {}
for line in open(os.path.join(work, "phases")):
    name, rc, s = line.split()
    phases[name] = {"exit": int(rc), "seconds": int(s)}
res = {"quick": quick, "phases": phases, "bench": {}}
for name in ("0.5b", "7b", "7b_64"):
    f = os.path.join(work, f"bench_{name}.json")
    if os.path.exists(f):
        res["bench"][name] = json.load(open(f))
xml = os.path.join(work, "tests.xml")
if os.path.exists(xml):
    s = ET.parse(xml).getroot()
    s = s if s.tag == "testsuite" else s.find("testsuite")
    res["tests"] = {k: int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    res["tests"]["failed"] = [f"{c.get('name')}: {(c.find('failure') if c.find('failure') is not None else c.find('error')).get('message', '')[:300]}"
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
    print(f"  {name:12} {'ok' if p['exit'] == 0 else 'FAILED (exit %d)' % p['exit']:16} {p['seconds']:4d} s")
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
for name, x in res["goals"].items():
    print(f"  goal {name:34} {'-' if x['value'] is None else format(x['value'], '.3g'):>8}  "
          f"{ {True: 'met', False: 'NOT met', None: 'not measured'}[x['met']]}")
print(f"  wrote {path} and {os.path.dirname(path)}/gpu_check.log")
EOF
status=$(awk '$2 != 0 {bad = 1} END {print bad + 0}' "$WORK/phases")
rm -rf "$WORK"
exit "$status"
