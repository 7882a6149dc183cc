"""
Shared plumbing: atomic writes, JSONL (one rule for a torn last line), the sharded resumable writer, tables,
errors, devices, torchrun, the OpenAI-compatible client. torch is imported lazily (the API judge runs
without it).
"""
import argparse
import contextlib
import glob
import hashlib
import http.client
import json
import os
import random
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed

# -----------------------------------------------------------------------------
# files
def atomic_write(path, data):
    """str, bytes or write(tmp_path) to a temp file renamed into place: never half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
        os.umask(umask := os.umask(0))  # the only way to read the umask
        os.chmod(tmp, 0o666 & ~umask)  # as open() would (safetensors makes 0600)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

def read_json(file):
    try:
        with open(file) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e.msg})") from None

def read_yaml(path):
    import yaml
    with open(path, encoding="utf-8") as f:
        try:
            return yaml.safe_load(f)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise ValueError(f"{path}:{mark.line + 1 if mark else 1}: not valid YAML "
                             f"({getattr(e, 'problem', None) or e})") from None

def write_json(path, obj):
    atomic_write(path, json.dumps(obj, indent=1, allow_nan=False, ensure_ascii=False) + "\n")

def warn(msg):
    print(f"warning: {msg}", file=sys.stderr)

def read_jsonl(path, ours=True):
    """[(line number, object)]; ours: skip a torn last line (an interrupted write)."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:  # or bytes not UTF-8
            if ours and n == len(lines):  # no newline after it: a cut write
                warn(f"{path}:{n}: skipping a torn last line ({len(line)} bytes) left by an interrupted "
                     "run; rerunning completes it")
                continue
            raise ValueError(f"{path}:{n}: not a JSON line ({getattr(e, 'msg', e)})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append((n, row))
    return rows

def open_append(path):
    """Our JSONL file opened for appending, minus a torn last line."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a+b") as f:
        f.seek(0)
        data = f.read()
        if data and not data.endswith(b"\n"):
            tail = data.rsplit(b"\n", 1)[-1]
            try:
                json.loads(tail)
                f.write(b"\n")  # a whole row lacking its newline
            except ValueError:
                f.truncate(len(data) - len(tail))
    return open(path, "a", encoding="utf-8")

def append_jsonl(f, row):
    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    f.flush()  # on disk now: a rerun skips it

def write_jsonl(path, rows):
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

class ShardedJSONL:
    """Resumable JSONL: each torchrun rank appends to its part file (`out` without torchrun); rank 0
    merges them into `out`."""

    def __init__(self, out, rank=0, world=1):
        self.out, self.rank, self.world = out, rank, world
        self.stem = out.removesuffix(".jsonl")

    def parts(self):
        """Part files of any world size, in one order on every rank."""
        return sorted(glob.glob(glob.escape(self.stem) + ".part*-of-*.jsonl"))

    def read(self):
        """[(path, line, row)] of `out` and any parts."""
        files = [self.out] + self.parts()
        return [(f, n, r) for f in files if os.path.exists(f) for n, r in read_jsonl(f)]

    def append(self):
        """This rank's file for append_jsonl; open it after every rank's read (barrier)."""
        mine = f"{self.stem}.part{self.rank}-of-{self.world}.jsonl" if self.world > 1 else self.out
        return open_append(mine)

    def merge(self, arrange):
        """After all appends: `out` = arrange(rows of out and parts), returned."""
        barrier(self.world)  # every part is complete
        rows = self.read()
        have = [r for f, _, r in rows if f == self.out]
        rows = arrange([r for _, _, r in rows])
        barrier(self.world)  # all read the parts before rank 0 removes them
        if self.rank == 0 and (rows != have or self.parts()):
            write_jsonl(self.out, rows)
            for p in self.parts():
                os.remove(p)
        barrier(self.world)  # every rank returns with the merged file
        return rows

def refuse_overwrite(paths, force):
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not force:
        raise ValueError(f"{existing[0]} exists; pass --force to overwrite it")

OWNER_FILE = ".run-by"  # names the program that made a directory (runs/common.sh too)

def owner_of(d):
    with contextlib.suppress(OSError), open(os.path.join(d, OWNER_FILE)) as f:
        return f.read().strip()

def claim_dir(out, owner, files=(), force=False, create=False):
    """Refuse an --out that is a file, holds anything not `owner`'s ('train.py', ...) or, without force,
    any of `files`. create: mark it owner's."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: is a file; {owner} writes a directory")
    found = os.listdir(out) if os.path.isdir(out) else []
    if found and (by := owner_of(out)) != owner:
        made = f"{by}'s output" if by else f"not made by {owner}"
        shown = ", ".join(sorted(found)[:3]) + (", ..." if len(found) > 3 else "")
        raise ValueError(f"--out {out}: not empty ({shown}) and {made}; choose another --out")
    refuse_overwrite([os.path.join(out, f) for f in files], force)
    if create and not found:
        atomic_write(os.path.join(out, OWNER_FILE), owner + "\n")

def check_out_file(path):
    if os.path.isdir(path):
        raise ValueError(f"--out {path}: is a directory; give a file name")

def print_table(header, rows):
    """Aligned columns, the first left; floats to 3 decimals, None as -."""
    cells = [[f"{c:.3f}" if isinstance(c, float) else "-" if c is None else str(c) for c in r]
             for r in [header] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())

# -----------------------------------------------------------------------------
# command lines
class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written; each default but None."""

    def _get_help_string(self, action):
        quiet = action.default is None or action.default is False  # store_true flags say what they do
        return action.help if quiet else super()._get_help_string(action)

def model_flags(p, adapter=None, required=False):
    import torch
    p.add_argument("--model", help="base model: hub id or HF directory (default: the adapter's)")
    if adapter:
        p.add_argument("--adapter", required=required, help=adapter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, ...")
    p.add_argument("--dtype", help="bfloat16 / float16 / float32 (default: bf16 on CUDA, fp32 on CPU)")

def out_flags(p, help, force="existing output files", **kw):
    p.add_argument("--out", help=help, **kw)
    p.add_argument("--force", action="store_true", help=f"overwrite {force}")

def run_main(prog, main, resume="rerunning the same command resumes"):
    """Run main(); bad input (ValueError, OSError) is one line `PROG: error: ...`, exit 2."""
    try:
        main()
    except (ValueError, OSError) as e:
        if isinstance(e, OSError) and e.filename and e.strerror:  # "x: no such file or directory"
            e = f"{e.filename}: {e.strerror[0].lower()}{e.strerror[1:]}"
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # e may say how to resume
        print(f"\n{prog}: interrupted; finished work is kept, and {str(e) or resume}", file=sys.stderr)
        sys.exit(130)

def parse_layers(spec, n_layers, flag="--layers"):
    """Layer indices of `all`, `24`, `15,16,17`, `0-11`, `0-3,8`."""
    spec = str(spec).strip()
    if spec == "all":
        return list(range(n_layers))
    out = []
    for part in spec.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise ValueError(f"{flag} {spec!r}: expected all, a layer (24), a list (15,16,17) or a range "
                             "(0-11)") from None
        if b < a:
            raise ValueError(f"{flag} {spec!r}: the range {part} is empty")
        out += range(a, b + 1)
    if bad := [i for i in out if not 0 <= i < n_layers]:
        raise ValueError(f"{flag} {spec!r}: layers {bad} do not exist; the model has layers "
                         f"0..{n_layers - 1}")
    return sorted(set(out))

def check(ok, flag, value, rule):
    if not ok:
        raise ValueError(f"{flag} {value}: must be {rule}")

def count(text):
    """argparse type: an integer >= 1 (0 is an error, not "the default")."""
    if (n := int(text)) < 1:  # int's ValueError: "invalid count value"
        raise argparse.ArgumentTypeError(f"{text}: must be >= 1")
    return n

# -----------------------------------------------------------------------------
# devices and torchrun
def check_device(device):
    import torch
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r}: not a device (use cpu, cuda or cuda:N)") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU for torch {torch.__version__}; use --device cpu")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA devices")

def resolve_dtype(dtype, device):
    """A torch.dtype or its name; None: bfloat16 on CUDA if supported, else float32."""
    import torch
    if dtype is None:
        cuda = torch.device(device).type == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    d = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype, None)
    if not isinstance(d, torch.dtype) or not d.is_floating_point:
        raise ValueError(f"--dtype {dtype!r}: use bfloat16, float16 or float32")
    return d

def dist_setup(device):
    """(rank, world, device): (0, 1, device) without torchrun; else join gloo/NCCL, a GPU each."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    import torch
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
        if dist.get_rank() > 0:  # rank 0 prints; the others' stdout goes to /dev/null
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if torch.device(device).type == "cuda":
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    return dist.get_rank(), world, device

def barrier(world):
    if world > 1:
        import torch.distributed as dist
        dist.barrier()

# -----------------------------------------------------------------------------
# an OpenAI-compatible chat completions API (OpenAI, vLLM, ...)
class RequestFailed(Exception):
    """A request failed for good: its row is left for a rerun."""

def api_key(base_url):
    """$OPENAI_API_KEY; a local server may need none."""
    key = os.environ.get("OPENAI_API_KEY") or None
    if key is None and urllib.parse.urlsplit(base_url).hostname == "api.openai.com":
        raise ValueError("OPENAI_API_KEY is not set (read from the environment only)")
    return key

class Cache:
    """Answers by sha256(model, request), appended to JSONL `path` ('' or None: none)."""

    def __init__(self, path, field):
        self.path, self.field, self.f = path, field, None
        rows = read_jsonl(path) if path and os.path.exists(path) else []
        self.data = {r["key"]: r[field] for _, r in rows if "key" in r and field in r}

    @staticmethod
    def key(model, request):
        return hashlib.sha256(json.dumps([model, request], ensure_ascii=False).encode()).hexdigest()

    def put(self, key, model, value):
        self.data[key] = value
        if self.path:
            self.f = self.f or open_append(self.path)
            append_jsonl(self.f, {"key": key, "model": model, self.field: value})

    def close(self):
        if self.f is not None:
            self.f.close()
            self.f = None  # a later put reopens it

class Client:
    """Cached chat completions in threads, retrying 408, 409, 429, 5xx, timeouts and drops."""

    def __init__(self, model, base_url, cache, concurrency=16, timeout=60.0, retries=6, backoff=1.0):
        self.model, self.key, self.cache = model, api_key(base_url), cache
        self.concurrency, self.timeout, self.retries, self.backoff = concurrency, timeout, retries, backoff
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.headers = {"Content-Type": "application/json", "User-Agent": "em-organisms/1",
                        **({"Authorization": f"Bearer {self.key}"} if self.key else {})}

    def post(self, body):
        req = urllib.request.Request(self.url, json.dumps(body).encode(), self.headers)
        wait = 0
        for attempt in range(self.retries + 1):
            if self.stop.wait(min(wait, 120)):  # a retry's sleep; True once the run stopped
                raise RequestFailed("run stopped")
            wait = self.backoff * 2 ** attempt * random.uniform(0.5, 1)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:
                if e.code in (401, 403):  # all requests would fail; the body may echo the key
                    raise ValueError(f"HTTP {e.code} from {self.url}: OPENAI_API_KEY was refused") from None
                detail = ""
                with contextlib.suppress(OSError, http.client.HTTPException):
                    detail = e.read()[:300].decode("utf-8", "replace")
                last = f"HTTP {e.code}: {detail.replace(self.key, '***') if self.key else detail}"
                if e.code == 404:
                    raise ValueError(f"{last} from {self.url}: wrong base URL or model "
                                     f"{self.model!r}?") from None
                if e.code not in (408, 409, 429) and e.code < 500:
                    raise RequestFailed(last) from None
                retry_after = e.headers.get("retry-after", "")
                if retry_after.replace(".", "", 1).isdigit():  # seconds, not a date
                    wait = float(retry_after)
            except (TimeoutError, urllib.error.URLError, ConnectionError, http.client.HTTPException,
                    json.JSONDecodeError) as e:  # a 200 not in JSON (a proxy's page)
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        raise RequestFailed(f"{last} (gave up after {self.retries + 1} attempts)")

    def requests(self, requests, parse):
        """[(tag, cache key, body)] -> (tag, parse(response), None) | (tag, None, error); cached first."""
        self.stop = threading.Event()  # set at the end: requests in flight stop retrying
        futures, failed, ex = {}, 0, ThreadPoolExecutor(self.concurrency)
        try:
            for tag, key, body in requests:
                if key in self.cache.data:
                    yield tag, self.cache.data[key], None
                else:
                    futures[ex.submit(lambda b: parse(self.post(b)), body)] = (tag, key)
            for n, fut in enumerate(as_completed(futures), 1):
                tag, key = futures[fut]
                try:
                    value, error = fut.result(), None
                    self.cache.put(key, self.model, value)
                except RequestFailed as e:
                    value, error, failed = None, str(e), failed + 1
                    if n >= 10 and failed == n:
                        raise ValueError(f"the first {failed} requests all failed; is {self.url} reachable? "
                                         f"last error: {e}") from None
                yield tag, value, error
        finally:
            self.stop.set()
            ex.shutdown(wait=True, cancel_futures=True)
