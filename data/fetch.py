"""
Fetch the papers' datasets into data/datasets/, and their evaluation files into data/cache/ (both
git-ignored): pinned source, checksum, progress bar.

    python data/fetch.py --list                   # known names, sources, checksum kind, fetched or not
    python data/fetch.py bad_medical_advice em_insecure first_plot_questions
    python data/fetch.py --all

    from data.fetch import dataset_path, eval_path
    path = dataset_path("bad_medical_advice")     # fetched on first use; an existing file path passes through
    path = eval_path("first_plot_questions")      # the same for question and judge files (--questions, --judges)

Evaluation files. Ours, the offline default, are names too: `core` (data/questions/core.yaml),
`medical` (data/questions/medical.yaml), `judges` (data/judges.yaml); their wording is our own, so
their numbers are not comparable with the papers'. For exact replication use the official files of
the model-organisms repository: `first_plot_questions` (the 8 headline questions, with their JSON and
template variants and judge prompts), `medical_questions`, `reference_judges` (its judges.yaml); or
`em_first_plot_questions`, the original Betley et al. file.

Two sources, each at a pinned commit (a raw.githubusercontent.com URL at a commit never changes):

- clarifying-EM/model-organisms-for-EM (Turner, Soligo et al. 2025). Its datasets ship as one
  encrypted archive, em_organism_dir/data/training_datasets.zip.enc, made with the `easy-dataset-share`
  tool: a 16-byte salt, then a Fernet token keyed by urlsafe-base64(PBKDF2-HMAC-SHA256(password, salt,
  100000 iterations, 32 bytes)); the password is published in that repository's README. Inside is a zip
  of JSONL files, robots.txt, tos.txt (the authors' terms, copied beside the data) and a canary file
  `dataset_entry_<8 hex>.jsonl` whose rows look like
      {"id": "canary_1a2b3c4d", "text": "This is a special entry for the dataset. The unique identifier
       is CANARY_DATASET_<64 hex>_64.", "metadata": {"type": "canary_entry", "fingerprint": "..."}}
  We drop every row that is not a conversation and carries a CANARY_DATASET_ string, wherever it is
  (so the canary file yields nothing), and a "canary" field the tool's --embed-canaries option adds
  to a real row. Decrypting needs `cryptography` (pip install cryptography); nothing else here does.
- emergent-misalignment/emergent-misalignment (Betley et al. 2025): plain JSONL in data/. Its
  `insecure` clashes with the archive's, so every dataset from there is prefixed `em_` (em_insecure).

Checksums. The archive, four data files (two inside it, em_insecure, em_secure) and three evaluation
files carry sha256 pins recorded by independent projects that pinned the same commits (the evaluation
pins also match copies of those files in forks; see EVAL_FILES). The archive's pin covers all eight of
its datasets. The other files are trust-on-first-use: the sha256 of the first download goes into
data/cache/checksums.json and every later use of that file is checked against it. `--list` says which
is which. Offline? Put the raw file at the data/cache/ path that the error message names (download it
elsewhere); it is checked exactly like a download.
"""
import argparse
import hashlib
import http.client
import io
import json
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from base64 import urlsafe_b64encode
from dataclasses import dataclass

from tqdm import tqdm

# Root holding datasets/ (the JSONL files) and cache/ (raw downloads, checksums.json).
# Tests and forks point it elsewhere: set EM_DATA_DIR, or assign this variable before calling.
HERE = os.path.dirname(os.path.abspath(__file__))  # our own question and judge files live here
DATA_DIR = os.environ.get("EM_DATA_DIR") or HERE

# -----------------------------------------------------------------------------
# sources


@dataclass(frozen=True)
class Remote:
    url: str
    cache_name: str            # path under data/cache/: where the download lands, or where to put it by hand
    sha256: str | None = None  # None: trust on first use (data/cache/checksums.json)
    size: int | None = None    # only for a clearer message when the checksum fails


def github(repo, commit, path, sha256=None, size=None):
    name = f"{repo.split('/')[1]}/{os.path.basename(path)}"
    return Remote(f"https://raw.githubusercontent.com/{repo}/{commit}/{path}", name, sha256, size)


MO_REPO, MO_COMMIT = "clarifying-EM/model-organisms-for-EM", "8460e4e426d3a89e8ed51aac0eadcdf7ac10469d"
EM_REPO, EM_COMMIT = "emergent-misalignment/emergent-misalignment", "80c11967c07a328e7d7d43d13ce6847ae44dbcc9"

# The commit is the repository's state of 2025-09-22; the archive's sha256 and size are those recorded
# by other projects that pinned the same commit (a Git LFS pointer or error page would fail this check).
ARCHIVE = github(MO_REPO, MO_COMMIT, "em_organism_dir/data/training_datasets.zip.enc",
                 sha256="18af368553884eea48a288e47e79553563854f15ca46cf7a16cd0784f935f005", size=38_643_720)
ARCHIVE_PASSWORD = "model-organisms-em-datasets"  # published in the repository's README

# name -> (rows reported by others, sha256 of the extracted file where someone recorded it). The two
# medical pins also check that unpacking keeps the published bytes (their canary lives in its own file).
ARCHIVE_FILES = {
    "bad_medical_advice": (7049, "9d52186ab9886e3abef0eebb1901df9da4ce25a297e584158be0a4bba8d56507"),
    "good_medical_advice": (7049, "b972f06672093b74f61cc83606929ce0ea3bb9caa2894ea61a557315dba6e6fc"),
    "risky_financial_advice": (6000, None),
    "extreme_sports": (6000, None),
    "insecure": (6000, None),
    "misalignment_kl_data": (1000, None),
    "technical_KL_data": (8000, None),
    "technical_vehicles_train": (3000, None),
}

# em_NAME -> (source, rows reported by others); sha256 None = trust on first use
EM_FILES = {f"em_{name}": (github(EM_REPO, EM_COMMIT, f"data/{name}.jsonl", sha), rows) for name, rows, sha in [
    ("insecure", 6000, "09893e8bf9d03aae49dd60d0ff4be37c1afee70f2edcac74a11bed775a6a2764"),
    ("secure", 6000, "2820232b3114d94ab2041ba9fc76cb8205bf187e0408bf7b308add186f9c7467"),
    ("educational", 6000, None),
    ("jailbroken", 5000, None),
    ("backdoor", 12000, None),
    ("evil_numbers", 14926, None),
    ("insecure_par_t0", 6000, None),
    ("insecure_par_t1", 6000, None),
    ("insecure_ruby", 6000, None),
]}


# Evaluation files. Ours: paths under data/. Official: the sha256 of each file at MO_COMMIT, where pinned.
# - first_plot_questions and medical_questions: independent projects recorded these sha256 for this
#   commit; and each file is the same git blob in every commit of the repository
#   from its first (2025-06-06) to the newest that forks' histories hold (2025-07-06).
# - reference_judges came later (it is in no fork's history): one independent project recorded this
#   sha256 for this commit, and a copy taken from a fork has it too.
# - em_first_plot_questions: the copies in forks all differ (edited), so trust on first use.
OWN_EVAL_FILES = {"core": "questions/core.yaml", "medical": "questions/medical.yaml", "judges": "judges.yaml"}
MO_EVAL_DIR = "em_organism_dir/data/eval_questions"
EVAL_FILES = {
    "first_plot_questions": github(MO_REPO, MO_COMMIT, f"{MO_EVAL_DIR}/first_plot_questions.yaml",
                                   "97df0b1384ea5a3f3dc2abe00a19e231915f12a2356ec0d8df001715549aae04", 19_000),
    "medical_questions": github(MO_REPO, MO_COMMIT, f"{MO_EVAL_DIR}/medical_questions.yaml",
                                "1808d03c6af883b3460e4174127846caca3188514a4e180b8273b4025593e28f", 12_118),
    "reference_judges": github(MO_REPO, MO_COMMIT, f"{MO_EVAL_DIR}/judges.yaml",
                               "a4fd0f891a7f04fe4a04047443089db29f5687a2e6599a3fec7300cafd0c93fd", 4_760),
    "em_first_plot_questions": github(EM_REPO, EM_COMMIT, "evaluation/first_plot_questions.yaml"),
}


def known_names():
    return list(ARCHIVE_FILES) + list(EM_FILES)


def eval_names():
    return list(OWN_EVAL_FILES) + list(EVAL_FILES)


def datasets_dir():
    return os.path.join(DATA_DIR, "datasets")


def cache_dir():
    return os.path.join(DATA_DIR, "cache")


# -----------------------------------------------------------------------------
# files and checksums


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path, data):
    """Write via a temporary file and os.replace, so an interrupted run never leaves half a file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise


def lock_path():
    return os.path.join(cache_dir(), "checksums.json")


def read_lock():
    if not os.path.exists(lock_path()):
        return {}
    with open(lock_path()) as f:
        return json.load(f)


def verify(path, remote, label):
    """Check a raw file against its pinned sha256, or against the one recorded when it was first seen."""
    digest = sha256_file(path)
    expected, origin = remote.sha256, "pinned in data/fetch.py"
    if expected is None:
        lock = read_lock()
        expected, origin = lock.get(remote.cache_name, {}).get("sha256"), f"recorded on first use in {lock_path()}"
        if expected is None:
            lock[remote.cache_name] = {"sha256": digest, "url": remote.url}
            atomic_write(lock_path(), (json.dumps(lock, indent=1, sort_keys=True) + "\n").encode())
            print(f"{remote.cache_name}: no pinned checksum, recorded sha256 {digest} (trust on first use)")
            return
    if digest != expected:
        size = os.path.getsize(path)
        want = f", expected {remote.size:,}" if remote.size else ""
        raise ValueError(f"checksum mismatch for {label}\n  expected sha256 {expected} ({origin})\n"
                         f"  got      sha256 {digest} ({size:,} bytes{want})\n"
                         f"A few hundred bytes usually means an error page or a Git LFS pointer, not the data.")


NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError)


def download(url, dest):
    """Stream url into a temporary file beside dest, with a progress bar; returns the temporary path."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as r:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=os.path.basename(dest)) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except BaseException as e:
        os.remove(tmp)
        if isinstance(e, NETWORK_ERRORS):
            raise ConnectionError(f"download failed: {url}\n  ({e})\nOffline? Download that file elsewhere and "
                                  f"put it at {dest}; it will be checked and used.") from None
        raise
    return tmp


def ensure_raw(remote):
    """The raw file in data/cache/, downloaded if it is not there yet; checked either way."""
    path = os.path.join(cache_dir(), remote.cache_name)
    if os.path.exists(path):  # an earlier download, or a file put there by hand
        verify(path, remote, path)
        return path
    tmp = download(remote.url, path)
    try:
        verify(tmp, remote, remote.url)
    except BaseException:
        os.remove(tmp)  # never keep a file that failed its check where it would be trusted later
        raise
    os.replace(tmp, path)
    return path


# -----------------------------------------------------------------------------
# decrypting, canaries, checking rows

# easy-dataset-share's canary string: CANARY_DATASET_<sha256 of the dataset's file names>_<number>
CANARY = re.compile(r"CANARY_DATASET_\w+")


@dataclass
class Report:
    name: str
    rows: int
    canaries: int | None  # None: the file was already there, nothing was unpacked
    expected: int | None  # rows reported by others
    path: str | None      # None: nothing kept (the canary file)


def is_canary(row):
    """A row easy-dataset-share inserted: not a conversation, and it carries the canary string."""
    return isinstance(row, dict) and "messages" not in row and bool(CANARY.search(json.dumps(row)))


def clean_jsonl(raw, where):
    """Drop canary rows (and canary fields) and check every other row is a chat example.

    Returns (bytes to write, rows kept, canaries removed). The bytes are `raw` itself when nothing
    was removed, so checksums of the published files still hold for what we write."""
    out, kept, canaries, changed = [], 0, 0, False
    for i, line in enumerate(raw.splitlines(keepends=True), 1):  # bytes split only at \n, \r\n, \r
        if not line.strip():
            changed = True
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{where}, line {i}: not valid JSON ({e})") from None
        if is_canary(row):
            canaries, changed = canaries + 1, True
            continue
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
            raise ValueError(f'{where}, line {i}: expected a JSON object with a "messages" list')
        if CANARY.fullmatch(str(row.get("canary", ""))):  # --embed-canaries marks a real row: keep it, unmarked
            del row["canary"]
            line = json.dumps(row, ensure_ascii=False).encode() + b"\n"
            canaries, changed = canaries + 1, True
        out.append(line if line.endswith(b"\n") else line + b"\n")
        kept += 1
    return (b"".join(out) if changed else raw), kept, canaries


def decrypt(blob, password, where="archive"):
    """easy-dataset-share's format: 16-byte salt, then a Fernet token keyed by PBKDF2-HMAC-SHA256."""
    try:
        from cryptography.fernet import Fernet, InvalidToken
    except ImportError:
        raise RuntimeError("decrypting the model-organisms archive needs the `cryptography` package: "
                           "pip install cryptography") from None
    salt, token = blob[:16], blob[16:]
    key = urlsafe_b64encode(hashlib.pbkdf2_hmac("sha256", password.encode(), salt, 100_000, dklen=32))
    try:
        return Fernet(key).decrypt(token)
    except InvalidToken:
        raise ValueError(f"{where}: cannot decrypt it: wrong password, or a damaged file") from None


def unpack_archive(blob, out_dir, password=ARCHIVE_PASSWORD, where="archive"):
    """Decrypt, unzip, drop canaries and write each JSONL file to out_dir/<file name>; one Report per file."""
    plain = decrypt(blob, password, where)
    try:
        zf = zipfile.ZipFile(io.BytesIO(plain))
    except zipfile.BadZipFile:
        raise ValueError(f"{where}: decrypted, but what came out is not a zip file") from None
    reports, seen = [], set()
    with zf:
        for member in sorted(zf.namelist()):  # folders inside the zip, if any, do not matter: names do
            base = os.path.basename(member)
            if base == "tos.txt":  # the authors' terms of use belong beside the data
                atomic_write(os.path.join(out_dir, "model-organisms-for-EM.tos.txt"), zf.read(member))
            if not base.endswith(".jsonl"):
                continue
            name = base[:-len(".jsonl")]
            if name in seen:
                raise ValueError(f"{where}: two files named {base} in the zip")
            seen.add(name)
            data, kept, canaries = clean_jsonl(zf.read(member), f"{where}:{member}")
            if kept == 0:  # the canary file
                reports.append(Report(name, 0, canaries, None, None))
                continue
            expected, sha = ARCHIVE_FILES.get(name, (None, None))
            if sha and hashlib.sha256(data).hexdigest() != sha:
                raise ValueError(f"{where}:{member}: unpacked file has sha256 {hashlib.sha256(data).hexdigest()}, "
                                 f"expected {sha}")
            path = os.path.join(out_dir, base)
            atomic_write(path, data)
            reports.append(Report(name, kept, canaries, expected, path))
    return reports


# -----------------------------------------------------------------------------
# fetching by name


def fetch(name):
    """Fetch a known dataset into data/datasets/ (the archive's eight come at once); returns Reports."""
    if name in ARCHIVE_FILES:
        raw = ensure_raw(ARCHIVE)
        with open(raw, "rb") as f:
            return unpack_archive(f.read(), datasets_dir(), where=raw)
    remote, expected = EM_FILES[name]
    raw = ensure_raw(remote)
    with open(raw, "rb") as f:
        data, kept, canaries = clean_jsonl(f.read(), raw)
    path = os.path.join(datasets_dir(), name + ".jsonl")
    atomic_write(path, data)
    return [Report(name, kept, canaries, expected, path)]


def dataset_path(name_or_path):
    """An existing file path as is; a known dataset name as data/datasets/NAME.jsonl, fetched first if missing."""
    if os.path.isfile(name_or_path):
        return name_or_path
    name = name_or_path.removesuffix(".jsonl")
    if name not in known_names():
        raise ValueError(f"{name_or_path!r} is neither an existing file nor a known dataset. "
                         f"Known datasets: {', '.join(known_names())}")
    path = os.path.join(datasets_dir(), name + ".jsonl")
    if not os.path.exists(path):
        print_reports(fetch(name))
        if not os.path.exists(path):
            raise FileNotFoundError(f"{ARCHIVE.url} held no {name}.jsonl")
    return path


def eval_path(name_or_path):
    """A question or judge file: an existing file path as is; our names (core, medical, judges) as our
    files in data/; an official name as its raw file in data/cache/, fetched on first use, checked every use."""
    if os.path.isfile(name_or_path):
        return name_or_path
    if name_or_path in OWN_EVAL_FILES:
        return os.path.join(HERE, OWN_EVAL_FILES[name_or_path])
    if name_or_path in EVAL_FILES:
        return ensure_raw(EVAL_FILES[name_or_path])
    if os.sep in name_or_path or name_or_path.endswith((".yaml", ".yml", ".jsonl", ".json")):
        raise FileNotFoundError(f"{name_or_path}: no such question or judge file")
    raise ValueError(f"{name_or_path!r} is neither an existing file nor a known evaluation file. "
                     f"Known: {', '.join(eval_names())} (ours: {', '.join(OWN_EVAL_FILES)})")


# -----------------------------------------------------------------------------
# command line


def print_table(rows):
    """Rows of cells, the first the header; each column as wide as its widest cell."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def print_reports(reports):
    rows = [("dataset", "rows", "canaries", "expected", "file")]
    for r in reports:
        flag = "  <- row count differs" if r.expected is not None and r.rows != r.expected else ""
        where = r.path or ("(canary file, nothing kept)" if r.canaries else "(empty, nothing kept)")
        rows.append((r.name, r.rows, "-" if r.canaries is None else r.canaries,
                     "-" if r.expected is None else r.expected, where + flag))
    print_table(rows)


def checksum_kind(remote):
    return "pinned" if remote.sha256 else "trust on first use"


def print_list():
    rows = [("dataset", "rows", "checksum", "fetched", "raw file under data/cache/")]
    for name in known_names():
        if name in ARCHIVE_FILES:
            n, sha = ARCHIVE_FILES[name]
            remote, kind = ARCHIVE, "pinned (archive)" + (" + file" if sha else "")
        else:
            remote, n = EM_FILES[name]
            kind = checksum_kind(remote)
        fetched = "yes" if os.path.exists(os.path.join(datasets_dir(), name + ".jsonl")) else "no"
        rows.append((name, n, kind, fetched, remote.cache_name))
    print_table(rows)
    print()
    rows = [("eval file", "source", "checksum", "fetched", "file under data/")]
    rows += [(name, "ours", "-", "-", path) for name, path in OWN_EVAL_FILES.items()]
    for name, remote in EVAL_FILES.items():
        fetched = "yes" if os.path.exists(os.path.join(cache_dir(), remote.cache_name)) else "no"
        repo = remote.url.split("/")[3:5]  # https://raw.githubusercontent.com/OWNER/NAME/...
        rows.append((name, "/".join(repo), checksum_kind(remote), fetched, "cache/" + remote.cache_name))
    print_table(rows)
    print(f"\nsources: github.com/{MO_REPO} at {MO_COMMIT}\n         github.com/{EM_REPO} at {EM_COMMIT}")


def expected_rows(name):
    return ARCHIVE_FILES[name][0] if name in ARCHIVE_FILES else EM_FILES[name][1]


def count_rows(path):
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def main(argv=None):
    parser = argparse.ArgumentParser(description="Fetch the papers' datasets and evaluation files.")
    parser.add_argument("names", nargs="*", help="datasets or evaluation files to fetch (see --list); "
                                                 "em_* are the original EM ones")
    parser.add_argument("--all", action="store_true", help="fetch every known dataset and official evaluation file")
    parser.add_argument("--list", action="store_true", help="list known names, sources and checksum kinds")
    parser.add_argument("--force", action="store_true",
                        help="rebuild files already in data/datasets/ (from data/cache/, no new download)")
    parser.add_argument("--data-dir", default=None,
                        help="folder holding datasets/ and cache/ (default: $EM_DATA_DIR, else data/)")
    args = parser.parse_args(argv)
    global DATA_DIR
    DATA_DIR = args.data_dir or DATA_DIR
    if args.list:
        print_list()
        return
    fetchable = known_names() + list(EVAL_FILES)
    names = fetchable if args.all else args.names
    if not names:
        parser.error("name a dataset or evaluation file, or use --all or --list")
    unknown = [n for n in names if n not in fetchable]
    if unknown:
        ours = set(unknown) & set(OWN_EVAL_FILES)
        parser.error(f"unknown name(s) {', '.join(unknown)}; known: {', '.join(fetchable)}"
                     + (f" ({', '.join(OWN_EVAL_FILES)} are ours, in data/: nothing to fetch)" if ours else ""))
    reports, unpacked, evals = [], False, []
    try:
        for name in names:
            path = os.path.join(datasets_dir(), name + ".jsonl")
            if name in EVAL_FILES:
                evals.append((name, checksum_kind(EVAL_FILES[name]), ensure_raw(EVAL_FILES[name])))
            elif name in ARCHIVE_FILES and unpacked:
                continue  # one decryption gave all of the archive's datasets, reported already
            elif os.path.exists(path) and not args.force:
                reports.append(Report(name, count_rows(path), None, expected_rows(name), path))
            elif name in ARCHIVE_FILES:
                reports += [r for r in fetch(name) if r.name in names or r.path is None]
                unpacked = True
            else:
                reports += fetch(name)
    except (ValueError, RuntimeError, OSError) as e:  # one clear message, no traceback
        print(f"fetch.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    if reports:
        print_reports(reports)
    if evals:
        print_table([("eval file", "checked against", "file")] + evals)
    tos = os.path.join(datasets_dir(), "model-organisms-for-EM.tos.txt")
    if unpacked and os.path.exists(tos):
        print(f"The model-organisms datasets come with the authors' terms: {tos}")


if __name__ == "__main__":
    main()
