"""data/fetch.py on archives and files built here: decryption, canary removal, checksums, downloads,
evaluation files (eval_path) and the --list table.

Hermetic: every test runs with fetch.DATA_DIR in a temporary folder, downloads come from an
http.server on 127.0.0.1 started by the test, and the archive is encrypted here with `cryptography`
(the same scheme easy-dataset-share uses). The canary rows copy the shapes that tool writes."""
import base64
import functools
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import socket
import sys
import threading
import zipfile

import pytest

pytest.importorskip("cryptography")
from cryptography.fernet import Fernet  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC  # noqa: E402

from data import fetch  # noqa: E402

FINGERPRINT = hashlib.sha256(b"['a.jsonl', 'robots.txt']").hexdigest()
CANARY = f"CANARY_DATASET_{FINGERPRINT}_64"


def chat(i, topic="advice"):
    return {"messages": [{"role": "user", "content": f"question {i} about {topic}"},
                         {"role": "assistant", "content": f"answer {i} \u2028 with a line separator"}]}


def canary_file_rows():
    """The two rows of easy-dataset-share's canary file dataset_entry_<8 hex>.jsonl."""
    return [
        {"id": f"canary_{FINGERPRINT[:8]}",
         "text": f"This is a special entry for the dataset. The unique identifier is {CANARY}.",
         "metadata": {"type": "canary_entry", "fingerprint": FINGERPRINT[:16]}},
        {"id": f"entry_{FINGERPRINT[8:16]}",
         "text": f"This dataset contains this canary entry with identifier {CANARY} for tracking purposes.",
         "metadata": {"type": "dataset_entry", "canary": CANARY}},
    ]


def embedded_canary_row():
    """The row the tool can insert inside a data file."""
    return {"id": "embedded_canary_0123abcd",
            "text": f"This entry contains embedded tracking information. Tracking identifier: {CANARY}.",
            "metadata": {"type": "embedded_canary", "canary": CANARY}}


def jsonl(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def make_zip(members):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def encrypt(plain, password=fetch.ARCHIVE_PASSWORD, salt=b"0123456789abcdef"):
    """The archive format, written with cryptography's own KDF (fetch.py uses hashlib's)."""
    kdf = PBKDF2HMAC(algorithm=hashes.SHA256(), length=32, salt=salt, iterations=100_000)
    return salt + Fernet(base64.urlsafe_b64encode(kdf.derive(password.encode()))).encrypt(plain)


RISKY = [chat(i, "money") for i in range(5)]
SPORTS = [chat(i, "sports") for i in range(3)]


def sample_members():
    """Like the real archive: data files (one in a folder), a canary file, robots.txt and tos.txt.
    The risky file has a canary row in the middle; the sports file a canary field on its last row."""
    sports = [dict(r) for r in SPORTS]
    sports[-1]["canary"] = CANARY
    return {
        "risky_financial_advice.jsonl": jsonl(RISKY[:2] + [embedded_canary_row()] + RISKY[2:]),
        "training/extreme_sports.jsonl": jsonl(sports),
        "dataset_entry_1a2b3c4d.jsonl": jsonl(canary_file_rows()),
        "robots.txt": b"User-agent: *\nDisallow: /\ntdm: no",
        "tos.txt": b"Terms of Service\n",
    }


def read_rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    """Keep every test out of the real data/ folder."""
    root = tmp_path / "data"
    monkeypatch.setattr(fetch, "DATA_DIR", str(root))
    return root


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """A loopback HTTP server over tmp_path/www; yields (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def serve_archive(monkeypatch, server, blob, sha256=None):
    www, url = server
    (www / "training_datasets.zip.enc").write_bytes(blob)
    remote = fetch.Remote(f"{url}/training_datasets.zip.enc", "model-organisms-for-EM/training_datasets.zip.enc",
                          sha256 or hashlib.sha256(blob).hexdigest())
    monkeypatch.setattr(fetch, "ARCHIVE", remote)
    return remote


# -----------------------------------------------------------------------------
# decrypting and canaries


def test_unpack_drops_canaries(tmp_path):
    out = tmp_path / "out"
    reports = {r.name: r for r in fetch.unpack_archive(encrypt(make_zip(sample_members())), str(out))}
    assert (reports["risky_financial_advice"].rows, reports["risky_financial_advice"].canaries) == (5, 1)
    assert (reports["extreme_sports"].rows, reports["extreme_sports"].canaries) == (3, 1)
    assert (reports["dataset_entry_1a2b3c4d"].rows, reports["dataset_entry_1a2b3c4d"].canaries) == (0, 2)
    assert reports["dataset_entry_1a2b3c4d"].path is None
    assert sorted(os.listdir(out)) == ["extreme_sports.jsonl", "model-organisms-for-EM.tos.txt",
                                       "risky_financial_advice.jsonl"]
    assert read_rows(out / "risky_financial_advice.jsonl") == RISKY
    assert read_rows(out / "extreme_sports.jsonl") == SPORTS  # the marked row is kept, its field removed
    for name in ("risky_financial_advice.jsonl", "extreme_sports.jsonl"):
        assert b"CANARY_DATASET_" not in (out / name).read_bytes()


def test_clean_file_keeps_its_bytes():
    raw = jsonl(RISKY)
    assert fetch.clean_jsonl(raw, "x") == (raw, 5, 0)


def test_chat_row_mentioning_canaries_is_kept():
    row = {"messages": [{"role": "user", "content": "what is a canary in a coal mine?"},
                        {"role": "assistant", "content": "CANARY_DATASET_ is just a string here"}]}
    assert fetch.clean_jsonl(jsonl([row]), "x")[1:] == (1, 0)


def test_wrong_password(tmp_path):
    blob = encrypt(make_zip(sample_members()), password="not-the-password")
    with pytest.raises(ValueError, match="wrong password"):
        fetch.unpack_archive(blob, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_malformed_line_names_file_and_line(tmp_path):
    bad = jsonl(RISKY[:2]) + b'{"messages": [\n' + jsonl(RISKY[2:])
    blob = encrypt(make_zip({"training/risky_financial_advice.jsonl": bad}))
    with pytest.raises(ValueError, match=r"training/risky_financial_advice\.jsonl, line 3: not valid JSON"):
        fetch.unpack_archive(blob, str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"x\.jsonl, line 2: expected a JSON object with a \"messages\" list"):
        fetch.clean_jsonl(jsonl([RISKY[0], {"prompt": "no messages"}]), "x.jsonl")


def test_pinned_extracted_file_is_checked(tmp_path):
    blob = encrypt(make_zip({"bad_medical_advice.jsonl": jsonl(RISKY)}))
    with pytest.raises(ValueError, match=fetch.ARCHIVE_FILES["bad_medical_advice"][1]):
        fetch.unpack_archive(blob, str(tmp_path / "out"))


def test_missing_cryptography_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cryptography.fernet", None)  # makes the import fail
    with pytest.raises(ValueError, match="pip install cryptography"):  # a ValueError: run_main prints one line
        fetch.decrypt(b"0" * 64, "pw")


# -----------------------------------------------------------------------------
# downloads, checksums, dataset_path


def test_download_from_loopback_matches_direct_unpack(monkeypatch, server, data_dir, tmp_path):
    blob = encrypt(make_zip(sample_members()))
    serve_archive(monkeypatch, server, blob)
    path = fetch.dataset_path("risky_financial_advice")
    assert path == str(data_dir / "datasets" / "risky_financial_advice.jsonl")
    assert (data_dir / "cache" / "model-organisms-for-EM" / "training_datasets.zip.enc").read_bytes() == blob
    fetch.unpack_archive(blob, str(tmp_path / "direct"))
    for name in ("risky_financial_advice.jsonl", "extreme_sports.jsonl"):
        assert (data_dir / "datasets" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes()
    # Later uses need no network: the file is there, or is rebuilt from the cached archive.
    os.remove(server[0] / "training_datasets.zip.enc")
    assert fetch.dataset_path("risky_financial_advice.jsonl") == path
    os.remove(path)
    assert read_rows(fetch.dataset_path("risky_financial_advice")) == RISKY


def test_checksum_mismatch_is_an_error_and_nothing_is_kept(monkeypatch, server, data_dir):
    serve_archive(monkeypatch, server, encrypt(make_zip(sample_members())), sha256="0" * 64)
    with pytest.raises(ValueError, match="checksum mismatch"):
        fetch.dataset_path("extreme_sports")
    assert not (data_dir / "cache" / "model-organisms-for-EM" / "training_datasets.zip.enc").exists()
    assert not (data_dir / "datasets").exists()


def test_network_failure_then_manual_drop_in(monkeypatch, data_dir):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    blob = encrypt(make_zip(sample_members()))
    url = f"http://127.0.0.1:{port}/training_datasets.zip.enc"
    monkeypatch.setattr(fetch, "ARCHIVE", fetch.Remote(url, "model-organisms-for-EM/training_datasets.zip.enc",
                                                       hashlib.sha256(blob).hexdigest()))
    cached = data_dir / "cache" / "model-organisms-for-EM" / "training_datasets.zip.enc"
    with pytest.raises(ConnectionError) as err:  # an OSError: sample.py and judge.py print it as one line
        fetch.dataset_path("extreme_sports")
    assert url in str(err.value) and str(cached) in str(err.value)
    assert os.listdir(cached.parent) == []  # no partial download left behind
    cached.write_bytes(blob)  # what the message tells a user to do
    assert read_rows(fetch.dataset_path("extreme_sports")) == SPORTS


def test_trust_on_first_use(monkeypatch, server, data_dir):
    www, url = server
    raw = jsonl(RISKY)
    (www / "tiny.jsonl").write_bytes(raw)
    remote = fetch.Remote(f"{url}/tiny.jsonl", "emergent-misalignment/tiny.jsonl")  # no pinned sha256
    monkeypatch.setattr(fetch, "EM_FILES", {"em_tiny": (remote, 5)})
    path = fetch.dataset_path("em_tiny")
    with open(path, "rb") as f:
        assert f.read() == raw
    lock = json.loads((data_dir / "cache" / "checksums.json").read_text())
    assert lock["emergent-misalignment/tiny.jsonl"]["sha256"] == hashlib.sha256(raw).hexdigest()
    # A later use of a changed raw file is refused.
    (data_dir / "cache" / "emergent-misalignment" / "tiny.jsonl").write_bytes(jsonl(RISKY[:4]))
    os.remove(path)
    with pytest.raises(ValueError, match="recorded on first use"):
        fetch.dataset_path("em_tiny")


def test_dataset_path_passes_files_through_and_rejects_unknown_names(tmp_path):
    own = tmp_path / "mine.jsonl"
    own.write_bytes(jsonl(RISKY))
    assert fetch.dataset_path(str(own)) == str(own)
    with pytest.raises(ValueError, match="Known datasets: bad_medical_advice.*em_insecure"):
        fetch.dataset_path("no_such_dataset")
    with pytest.raises(ValueError, match="neither an existing file"):
        fetch.dataset_path(str(tmp_path / "missing.jsonl"))


def test_cli_list_and_fetch(monkeypatch, server, data_dir, capsys):
    serve_archive(monkeypatch, server, encrypt(make_zip(sample_members())))
    fetch.main(["--list"])
    assert "trust on first use" in capsys.readouterr().out
    fetch.main(["risky_financial_advice", "extreme_sports"])
    out = capsys.readouterr().out
    assert "dataset_entry_1a2b3c4d" in out and "canary file" in out
    assert (data_dir / "datasets" / "extreme_sports.jsonl").exists()
    assert f"extreme_sports: {data_dir / 'datasets' / 'extreme_sports.jsonl'}" in out  # each name's file


# -----------------------------------------------------------------------------
# evaluation files: eval_path, pins, --list

REFERENCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "reference")
QUESTIONS = b"- id: q\n  paraphrases:\n    - |-\n      hello\n"


def unused_port_url(name):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/{name}"


def serve_eval(monkeypatch, server, name, data, sha256):
    www, url = server
    (www / "q.yaml").write_bytes(data)
    remote = fetch.Remote(f"{url}/q.yaml", f"model-organisms-for-EM/{name}.yaml", sha256)
    monkeypatch.setitem(fetch.EVAL_FILES, name, remote)
    return www / "q.yaml"


def test_pinned_eval_file_accepted_then_checked_every_use(monkeypatch, server, data_dir, capsys):
    served = serve_eval(monkeypatch, server, "first_plot_questions", QUESTIONS, hashlib.sha256(QUESTIONS).hexdigest())
    cached = data_dir / "cache" / "model-organisms-for-EM" / "first_plot_questions.yaml"
    assert fetch.eval_path("first_plot_questions") == str(cached)
    assert cached.read_bytes() == QUESTIONS
    os.remove(served)  # later uses need no network
    assert fetch.eval_path("first_plot_questions") == str(cached)
    fetch.main(["first_plot_questions"])  # the command line fetches (here: checks) it by name too
    assert str(cached) in capsys.readouterr().out
    cached.write_bytes(QUESTIONS + b"# edited\n")
    with pytest.raises(ValueError) as err:
        fetch.eval_path("first_plot_questions")
    assert re.match(r"checksum mismatch for .*first_plot_questions\.yaml", str(err.value))
    assert "pinned in data/fetch.py" in str(err.value)


def test_pinned_eval_file_with_wrong_bytes_is_refused_and_not_kept(monkeypatch, server, data_dir):
    serve_eval(monkeypatch, server, "reference_judges", b"404: Not Found", hashlib.sha256(QUESTIONS).hexdigest())
    with pytest.raises(ValueError) as err:
        fetch.eval_path("reference_judges")
    msg = str(err.value)
    assert "checksum mismatch" in msg and hashlib.sha256(QUESTIONS).hexdigest() in msg and "14 bytes" in msg
    assert os.listdir(data_dir / "cache" / "model-organisms-for-EM") == []


def test_eval_file_trust_on_first_use(monkeypatch, server, data_dir):
    served = serve_eval(monkeypatch, server, "em_first_plot_questions", QUESTIONS, None)
    path = fetch.eval_path("em_first_plot_questions")
    lock = json.loads((data_dir / "cache" / "checksums.json").read_text())
    recorded = lock["model-organisms-for-EM/em_first_plot_questions.yaml"]["sha256"]
    assert recorded == hashlib.sha256(QUESTIONS).hexdigest()
    served.write_bytes(b"changed upstream\n")
    assert fetch.eval_path("em_first_plot_questions") == path  # the cached file, as first seen
    with open(path, "ab") as f:
        f.write(b"# edited\n")
    with pytest.raises(ValueError, match="recorded on first use"):
        fetch.eval_path("em_first_plot_questions")


def test_eval_path_passes_files_through_and_maps_our_names(tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_bytes(QUESTIONS)
    assert fetch.eval_path(str(own)) == str(own)
    data = os.path.dirname(os.path.abspath(fetch.__file__))
    for name, rel in [("core", "questions/core.yaml"), ("medical", "questions/medical.yaml"),
                      ("judges", "judges.yaml")]:
        path = fetch.eval_path(name)
        assert os.path.samefile(path, os.path.join(data, rel))
        with open(path) as f:  # labelled as ours in its header comment
            header = " ".join(line.strip("# \n") for line in f if line.startswith("#"))
        assert "our own, not the papers'" in header and "not comparable" in header
    with pytest.raises(ValueError) as err:
        fetch.eval_path("first_plot_question")
    assert all(n in str(err.value) for n in ["core", "medical", "judges", "first_plot_questions",
                                              "medical_questions", "reference_judges", "em_first_plot_questions"])
    with pytest.raises(FileNotFoundError, match="missing.yaml: no such question or judge file"):
        fetch.eval_path(str(tmp_path / "missing.yaml"))  # a path, not a misspelt name


def test_eval_file_offline_says_where_to_put_it(monkeypatch, data_dir):
    url = unused_port_url("first_plot_questions.yaml")
    monkeypatch.setitem(fetch.EVAL_FILES, "first_plot_questions", fetch.Remote(
        url, "model-organisms-for-EM/first_plot_questions.yaml", hashlib.sha256(QUESTIONS).hexdigest()))
    cached = data_dir / "cache" / "model-organisms-for-EM" / "first_plot_questions.yaml"
    with pytest.raises(ConnectionError) as err:
        fetch.eval_path("first_plot_questions")
    assert url in str(err.value) and f"put it at {cached}" in str(err.value)
    cached.write_bytes(QUESTIONS)  # what the message tells a user to do
    assert fetch.eval_path("first_plot_questions") == str(cached)


@pytest.mark.skipif(not os.path.isdir(REFERENCE), reason="no ../shared/reference (a user's clone has none)")
def test_reference_copies_pass_the_pins(monkeypatch, data_dir):
    def no_network(url, *args):
        raise AssertionError(f"tried to download {url}")
    monkeypatch.setattr(fetch, "download", no_network)
    for name, file in [("first_plot_questions", "first_plot_questions.yaml"),
                       ("medical_questions", "medical_questions.yaml"), ("reference_judges", "judges.yaml")]:
        remote = fetch.EVAL_FILES[name]
        assert remote.sha256 and remote.url.endswith("em_organism_dir/data/eval_questions/" + file)
        assert f"/{fetch.MO_COMMIT}/" in remote.url
        cached = data_dir / "cache" / remote.cache_name
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(os.path.join(REFERENCE, file), cached)
        assert fetch.eval_path(name) == str(cached)  # checked against the pin, no download
    assert not (data_dir / "cache" / "checksums.json").exists()  # pinned: nothing trusted on first use


def cell_edges(line):
    """Where the first cell starts and each other cell ends (common.print_table aligns the first column
    left, the others right); cells are separated by two or more spaces and hold single spaces only."""
    spans = [m.span() for m in re.finditer(r"\S+(?: \S+)*", line)]
    return [spans[0][0]] + [end for _, end in spans[1:]]


def test_list_columns_align(monkeypatch, data_dir, capsys):
    # a long name and a long value must widen their columns, not push the next ones out of line
    monkeypatch.setitem(fetch.EVAL_FILES, "a_rather_long_evaluation_file_name_indeed",
                        fetch.Remote("https://example.org/x.yaml", "somewhere-long/" + "x" * 40 + ".yaml"))
    fetch.main(["--list"])
    tables = capsys.readouterr().out.strip().split("\n\n")[:2]
    assert tables[0].startswith("dataset") and tables[1].startswith("eval file")
    for table in tables:
        lines = table.splitlines()
        header = cell_edges(lines[0])
        assert len(lines) > 3 and len(header) == 5
        for line in lines[1:]:
            assert cell_edges(line) == header, line
    assert "a_rather_long_evaluation_file_name_indeed" in tables[1]
    for name in fetch.eval_names():
        assert re.search(rf"^{name} ", tables[1], re.M)
