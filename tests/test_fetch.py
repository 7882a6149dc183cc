"""data/fetch.py on archives and files built here: decryption, canary removal, checksums, downloads.

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
    with pytest.raises(RuntimeError, match="pip install cryptography"):
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
    with pytest.raises(RuntimeError) as err:
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
