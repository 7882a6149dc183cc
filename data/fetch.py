"""
Fetch the papers' datasets into data/datasets/ and evaluation files into data/cache/ (git-ignored),
from pinned commits, sha256-checked. Sources: README.md, "Datasets".

    python -m data.fetch --list  # names, sources, checksums, fetched or not
    python -m data.fetch bad_medical_advice em_insecure first_plot_questions
"""
import argparse
import hashlib
import http.client
import io
import json
import os
import re
import shutil
import urllib.error
import urllib.request
import zipfile
from base64 import urlsafe_b64encode
from collections import namedtuple
from pathlib import Path

from tqdm import tqdm

from common import HelpFormatter, atomic_write, print_table, read_json, run_main, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
# datasets/ (JSONL) and cache/ (raw downloads, checksums.json)
DATA_DIR = os.environ.get("EM_DATA_DIR") or HERE

# -----------------------------------------------------------------------------
# sources
# cache_name: path under data/cache/; sha256 None: trust on first use (checksums.json)
Remote = namedtuple("Remote", "url cache_name sha256", defaults=[None])

def github(repo, commit, path, sha256=None):
    name = f"{repo.split('/')[1]}/{os.path.basename(path)}"
    return Remote(f"https://raw.githubusercontent.com/{repo}/{commit}/{path}", name, sha256)

MO_REPO, MO_COMMIT = "clarifying-EM/model-organisms-for-EM", "8460e4e426d3a89e8ed51aac0eadcdf7ac10469d"
EM_REPO, EM_COMMIT = "emergent-misalignment/emergent-misalignment", "80c11967c07a328e7d7d43d13ce6847ae44dbcc9"

# recorded by projects pinning this commit (README)
ARCHIVE = github(MO_REPO, MO_COMMIT, "em_organism_dir/data/training_datasets.zip.enc",
                 "18af368553884eea48a288e47e79553563854f15ca46cf7a16cd0784f935f005")
ARCHIVE_PASSWORD = "model-organisms-em-datasets"  # public, in its README

# name -> (rows others reported, extracted file's sha256 or None)
ARCHIVE_FILES = {
    "bad_medical_advice": (7049, "9d52186ab9886e3abef0eebb1901df9da4ce25a297e584158be0a4bba8d56507"),
    "good_medical_advice": (7049, "b972f06672093b74f61cc83606929ce0ea3bb9caa2894ea61a557315dba6e6fc"),
    "risky_financial_advice": (6000, None), "extreme_sports": (6000, None), "insecure": (6000, None),
    "misalignment_kl_data": (1000, None), "technical_KL_data": (8000, None),
    "technical_vehicles_train": (3000, None),
}

# em_NAME -> (source, rows others reported); em_ as the archive has its own `insecure`
EM_FILES = {f"em_{name}": (github(EM_REPO, EM_COMMIT, f"data/{name}.jsonl", sha), rows)
            for name, rows, sha in [
    ("insecure", 6000, "09893e8bf9d03aae49dd60d0ff4be37c1afee70f2edcac74a11bed775a6a2764"),
    ("secure", 6000, "2820232b3114d94ab2041ba9fc76cb8205bf187e0408bf7b308add186f9c7467"),
    ("educational", 6000, None), ("jailbroken", 5000, None), ("backdoor", 12000, None),
    ("evil_numbers", 14926, None), ("insecure_par_t0", 6000, None), ("insecure_par_t1", 6000, None),
    ("insecure_ruby", 6000, None)]}

# evaluation files: ours in data/ (not comparable with the papers'); the papers' pinned, but
# em_first_plot_questions (forks' copies differ) trusted on first use
OWN_EVAL_FILES = {"core": "questions/core.yaml", "medical": "questions/medical.yaml", "judges": "judges.yaml"}
EVAL_FILES = {name: github(MO_REPO, MO_COMMIT, f"em_organism_dir/data/eval_questions/{file}", sha)
              for name, file, sha in [
    ("first_plot_questions", "first_plot_questions.yaml",
     "97df0b1384ea5a3f3dc2abe00a19e231915f12a2356ec0d8df001715549aae04"),
    ("medical_questions", "medical_questions.yaml",
     "1808d03c6af883b3460e4174127846caca3188514a4e180b8273b4025593e28f"),
    ("reference_judges", "judges.yaml", "a4fd0f891a7f04fe4a04047443089db29f5687a2e6599a3fec7300cafd0c93fd")]}
EVAL_FILES["em_first_plot_questions"] = github(EM_REPO, EM_COMMIT, "evaluation/first_plot_questions.yaml")

def known_names():
    return list(ARCHIVE_FILES) + list(EM_FILES)

def eval_names():
    return list(OWN_EVAL_FILES) + list(EVAL_FILES)

def data_path(*parts):  # DATA_DIR read per call: tests change it
    return os.path.join(DATA_DIR, *parts)

def dataset_file(name):
    return data_path("datasets", name + ".jsonl")

# -----------------------------------------------------------------------------
# downloads and checksums
def verify(path, remote, label):
    """Check a raw file's sha256: the pinned one, else checksums.json's."""
    digest, expected = hashlib.sha256(Path(path).read_bytes()).hexdigest(), remote.sha256
    origin = "pinned in data/fetch.py"
    if expected is None:
        lock_path = data_path("cache", "checksums.json")
        lock = read_json(lock_path) if os.path.exists(lock_path) else {}
        expected = lock.get(remote.cache_name, {}).get("sha256")
        origin = f"recorded on first use in {lock_path}"
        if expected is None:
            lock[remote.cache_name] = {"sha256": digest, "url": remote.url}
            write_json(lock_path, dict(sorted(lock.items())))
            print(f"{remote.cache_name}: no pinned checksum; trusting sha256 {digest} from now on")
            return
    if digest != expected:
        raise ValueError(f"checksum mismatch for {label}: sha256 {digest} ({os.path.getsize(path):,} bytes), "
                         f"expected {expected} ({origin}); a few hundred: an error page or Git LFS pointer")

def download(url, tmp, dest):
    """Stream url into tmp, with a progress bar (dest: where it lands)."""
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm.wrapattr(f, "write", total=total, desc=os.path.basename(dest)) as out:
                shutil.copyfileobj(r, out, 1 << 20)
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
        raise ConnectionError(f"download failed: {url} ({e}). Offline? Download it elsewhere, "
                              f"put it at {dest} (it gets checked)") from None

def ensure_raw(remote):
    """The raw file in data/cache/, downloaded if missing, checked."""
    path = data_path("cache", remote.cache_name)
    if os.path.exists(path):  # an earlier download, or put by hand
        verify(path, remote, path)
        return path

    def download_checked(tmp):  # a file that fails its check never lands
        download(remote.url, tmp, path)
        verify(tmp, remote, remote.url)
    atomic_write(path, download_checked)
    return path

# -----------------------------------------------------------------------------
# decrypting and canaries
CANARY = re.compile(r"CANARY_DATASET_\w+")  # easy-dataset-share's: CANARY_DATASET_<hash>_<n>

# expected: rows others reported; path None: nothing kept
Report = namedtuple("Report", "name rows canaries expected path")

def clean_jsonl(raw, where):
    """(bytes, rows kept, canaries) without canary rows and fields; raw itself if unchanged."""
    lines, out, canaries = raw.splitlines(keepends=True), [], 0
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{where}, line {i}: not valid JSON ({e})") from None
        if isinstance(row, dict) and "messages" not in row and CANARY.search(json.dumps(row)):
            canaries += 1  # a row easy-dataset-share inserted
            continue
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
            raise ValueError(f'{where}, line {i}: expected a JSON object with a "messages" list')
        if CANARY.fullmatch(str(row.get("canary", ""))):  # a real row, marked: keep it, unmarked
            del row["canary"]
            line = json.dumps(row, ensure_ascii=False).encode() + b"\n"
            canaries += 1
        out.append(line if line.endswith(b"\n") else line + b"\n")
    return (raw if canaries == 0 and len(out) == len(lines) else b"".join(out)), len(out), canaries

def decrypt(blob, password, where="archive"):
    """easy-dataset-share's format: a 16-byte salt, then a Fernet token (key: PBKDF2-HMAC-SHA256)."""
    try:
        from cryptography.fernet import Fernet, InvalidToken  # only the archive needs it
    except ImportError:
        raise ValueError("the model-organisms archive needs: pip install cryptography") from None
    key = urlsafe_b64encode(hashlib.pbkdf2_hmac("sha256", password.encode(), blob[:16], 100_000, dklen=32))
    try:
        return Fernet(key).decrypt(blob[16:])
    except InvalidToken:
        raise ValueError(f"{where}: cannot decrypt: wrong password or damaged file") from None

def unpack_archive(blob, out_dir, where="archive"):
    """Decrypt, unzip, drop canaries, write the JSONL files and tos.txt into out_dir: Reports."""
    reports = []
    with zipfile.ZipFile(io.BytesIO(decrypt(blob, ARCHIVE_PASSWORD, where))) as zf:
        for member in sorted(zf.namelist()):
            base = os.path.basename(member)
            if base == "tos.txt":
                atomic_write(os.path.join(out_dir, "model-organisms-for-EM.tos.txt"), zf.read(member))
            if not base.endswith(".jsonl"):
                continue
            name = base.removesuffix(".jsonl")
            data, kept, canaries = clean_jsonl(zf.read(member), f"{where}:{member}")
            if kept == 0:  # the canary file
                reports.append(Report(name, 0, canaries, None, None))
                continue
            expected, sha = ARCHIVE_FILES.get(name, (None, None))
            if sha and (got := hashlib.sha256(data).hexdigest()) != sha:
                raise ValueError(f"{where}:{member}: unpacked file has sha256 {got}, expected {sha}")
            atomic_write(os.path.join(out_dir, base), data)
            reports.append(Report(name, kept, canaries, expected, os.path.join(out_dir, base)))
    return reports

# -----------------------------------------------------------------------------
# fetching by name
def fetch(name):
    """Fetch a dataset into data/datasets/ (the archive's all at once): Reports."""
    if name in ARCHIVE_FILES:
        raw = ensure_raw(ARCHIVE)
        return unpack_archive(Path(raw).read_bytes(), data_path("datasets"), where=raw)
    remote, expected = EM_FILES[name]
    raw = ensure_raw(remote)
    data, kept, canaries = clean_jsonl(Path(raw).read_bytes(), raw)
    atomic_write(dataset_file(name), data)
    return [Report(name, kept, canaries, expected, dataset_file(name))]

def dataset_path(name_or_path):
    """A file path as is; a known name as data/datasets/NAME.jsonl, fetched if missing."""
    if os.path.isfile(name_or_path):
        return name_or_path
    name = name_or_path.removesuffix(".jsonl")
    if name not in known_names():
        raise ValueError(f"{name_or_path!r} is neither an existing file nor a known dataset. "
                         f"Known datasets: {', '.join(known_names())}")
    if not os.path.exists(dataset_file(name)):
        print_reports(fetch(name))
    return dataset_file(name)

def eval_path(name_or_path):
    """A question or judge file: a path as is, ours in data/, the papers' from data/cache/."""
    if os.path.isfile(name_or_path):
        return name_or_path
    if name_or_path in OWN_EVAL_FILES:
        return os.path.join(HERE, OWN_EVAL_FILES[name_or_path])
    if name_or_path in EVAL_FILES:
        return ensure_raw(EVAL_FILES[name_or_path])
    if os.sep in name_or_path or name_or_path.endswith((".yaml", ".yml", ".jsonl", ".json")):
        raise FileNotFoundError(f"{name_or_path}: no such question or judge file")
    raise ValueError(f"{name_or_path!r} is neither an existing file nor a known evaluation file. "
                     f"Known: {', '.join(eval_names())}")

# -----------------------------------------------------------------------------
# command line
def print_reports(reports):
    rows = [[r.name, r.rows, r.canaries, r.expected, (r.path or "(canary file, nothing kept)")
             + ("  <- row count differs" if r.expected is not None and r.rows != r.expected else "")]
            for r in reports]
    print_table(["dataset", "rows", "canaries", "expected", "file"], rows)

def print_list():
    pin = lambda remote: "pinned" if remote.sha256 else "trust on first use"
    have = lambda path: "yes" if os.path.exists(path) else "no"
    rows = [[name, n, "pinned (archive)" + " + file" * bool(sha), have(dataset_file(name)),
             ARCHIVE.cache_name] for name, (n, sha) in ARCHIVE_FILES.items()]
    rows += [[name, n, pin(r), have(dataset_file(name)), r.cache_name] for name, (r, n) in EM_FILES.items()]
    print_table(["dataset", "rows", "checksum", "fetched", "raw file in data/cache/"], rows)
    rows = [[name, "ours", None, None, path] for name, path in OWN_EVAL_FILES.items()]
    rows += [[name, "/".join(r.url.split("/")[3:5]),  # raw.githubusercontent.com/OWNER/NAME/
              pin(r), have(data_path("cache", r.cache_name)), "cache/" + r.cache_name]
             for name, r in EVAL_FILES.items()]
    print()
    print_table(["eval file", "source", "checksum", "fetched", "file under data/"], rows)

def main(argv=None):
    p = argparse.ArgumentParser(prog="fetch.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("names", nargs="*", help="names to fetch (see --list)")
    p.add_argument("--list", action="store_true", help="list known names")
    args = p.parse_args(argv)
    if args.list:
        return print_list()
    if not (names := args.names):
        p.error("name a dataset or evaluation file, or use --list")
    if unknown := [n for n in names if n not in known_names() + list(EVAL_FILES)]:
        p.error(f"unknown name(s) {', '.join(unknown)}; see --list")
    for name in names:  # fetched if missing, checked if not
        print(f"{name}: {dataset_path(name) if name in known_names() else eval_path(name)}")
    tos = data_path("datasets", "model-organisms-for-EM.tos.txt")
    if any(n in ARCHIVE_FILES for n in names) and os.path.exists(tos):
        print(f"The model-organisms datasets' terms of use: {tos}")

if __name__ == "__main__":
    run_main("fetch.py", main, resume="rerunning the same command fetches the rest")
