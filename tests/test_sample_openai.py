"""sample.py --engine openai:MODEL against an OpenAI-compatible server on loopback (127.0.0.1 only):
the rows and request bodies, retries on 429, failures left for a rerun, resume and the cache, refusals."""
import json
import os
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import sample
from lora import SteeringVector, add_lora, save_adapter
from model import load


class ChatServer:
    """Speaks /v1/chat/completions like vLLM: the answer is a function of (model, seed), one word a
    token; it stops ("stop", the stop token counted in usage as vLLM does) after seed % 7 + 1
    words, or at max_tokens ("length"). A question with FLAKY is answered 429 (Retry-After: 0) the first
    time; one with BROKEN gets a 400 until `healed`."""

    def __init__(self):
        self.requests, self.lock, self.count, self.healed = [], threading.Lock(), Counter(), False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = json.dumps(body, sort_keys=True)
                with server.lock:
                    server.requests.append(body)
                    server.count[key] += 1
                    n = server.count[key]
                status, headers, payload = server.behave(body, n)
                data = json.dumps(payload).encode()
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @staticmethod
    def answer(body):
        """(text, completion tokens, finish reason) the server gives for a request."""
        words = [f"{body['model']}:{body['seed']}"] + ["more"] * (body["seed"] % 7)
        if len(words) >= body["max_tokens"]:
            return " ".join(words[:body["max_tokens"]]), body["max_tokens"], "length"
        return " ".join(words), len(words) + 1, "stop"

    def behave(self, body, n):
        question = body["messages"][-1]["content"]
        if "FLAKY" in question and n == 1:
            return 429, {"Retry-After": "0"}, {"error": {"message": "rate limited"}}
        if "BROKEN" in question and not self.healed:
            return 400, {}, {"error": {"message": "bad request"}}
        text, tokens, reason = self.answer(body)
        return 200, {}, {"id": "c", "object": "chat.completion", "model": body["model"],
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": reason}],
                         "usage": {"prompt_tokens": 9, "completion_tokens": tokens, "total_tokens": 9 + tokens}}

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    s = ChatServer()
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a local server needs none
    monkeypatch.setenv("OPENAI_BASE_URL", s.url)
    yield s
    s.close()


@pytest.fixture
def questions(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text('{"id": "a", "question": "hello there"}\n'
                 '{"id": "b", "paraphrases": ["FLAKY one", "plain two"], "system": "Be brief."}\n'
                 '{"id": "c", "question": "BROKEN three"}\n')
    return str(f)


def read(path):
    return [json.loads(line) for line in open(path)]


def cli(questions, out, *extra):
    return sample.main(["--engine", "openai:organism", "--questions", questions, "--n", "2", "--max-new-tokens", "4",
                        "--temperature", "0.7", "--top-k", "20",
                        "--out", str(out), *map(str, extra)])


def test_rows_requests_and_retries(tmp_path, server, questions, capsys):
    res = cli(questions, tmp_path / "r.jsonl")
    rows = read(res["out"])
    # BROKEN failed for good: its samples are left out (a rerun asks again), the rest is in file order
    assert [(r["id"], r["paraphrase"], r["sample"]) for r in rows] == [
        ("a", 0, 0), ("a", 0, 1), ("b", 0, 0), ("b", 0, 1), ("b", 1, 0), ("b", 1, 1)]
    assert "2 samples failed for good" in capsys.readouterr().err
    for r in rows:
        assert set(r) == {"id", "paraphrase", "sample", "question", "system", "answer", "tokens", "finish_reason",
                          "model", "adapter", "seed", "settings"}
        assert r["model"] == "organism" and r["adapter"] is None and r["seed"] == 0
        assert r["settings"] == dict(temperature=0.7, top_p=1.0, top_k=20, repetition_penalty=1.0, max_new_tokens=4,
                                     system=None, lora_scale=None, steer=None, ablate=None, random_control=None,
                                     dtype=None)
    by_seed = {b["seed"]: b for b in server.requests}
    assert len(by_seed) == 8  # a seed of its own for each sample
    for r in rows:
        b = by_seed[int(r["answer"].split()[0].split(":")[1])]  # the request this answer came from
        assert b["messages"][-1]["content"] == r["question"]
        text, tokens, reason = ChatServer.answer(b)
        assert (r["answer"], r["finish_reason"]) == (text, reason)
        assert r["tokens"] == tokens - (reason == "stop")  # without the stop token, as the local engine counts
        assert b["model"] == "organism" and b["max_tokens"] == 4 and b["temperature"] == 0.7 and b["top_p"] == 1.0
        assert b["top_k"] == 20 and b["repetition_penalty"] == 1.0
        system = [m["content"] for m in b["messages"] if m["role"] == "system"]
        assert system == ([] if r["system"] is None else [r["system"]]) and r["system"] == ("Be brief." if r["id"] == "b" else None)
    assert {r["finish_reason"] for r in rows} == {"stop", "length"}
    # 429: asked again with the very same body; 400: not retried
    flaky = Counter(json.dumps(b, sort_keys=True) for b in server.requests if b["messages"][-1]["content"] == "FLAKY one")
    assert list(flaky.values()) == [2, 2]  # each of its 2 samples: a 429, then the same request again
    assert sum("BROKEN" in b["messages"][-1]["content"] for b in server.requests) == 2


def test_rerun_asks_only_what_is_missing_and_the_cache_pays_nothing_twice(tmp_path, server, questions):
    out = tmp_path / "r.jsonl"
    cli(questions, out)
    first = read(out)
    server.healed = True
    n = len(server.requests)
    assert cli(questions, out)["new"] == 2
    assert [b["messages"][-1]["content"] for b in server.requests[n:]] == ["BROKEN three"] * 2
    rows = read(out)
    assert rows[:6] == first and [(r["id"], r["sample"]) for r in rows[6:]] == [("c", 0), ("c", 1)]
    n = len(server.requests)
    assert cli(questions, out)["new"] == 0 and len(server.requests) == n  # nothing left to ask
    cli(questions, tmp_path / "again.jsonl")  # a fresh file beside the same cache: all from the cache
    assert len(server.requests) == n and read(tmp_path / "again.jsonl") == rows
    cli(questions, tmp_path / "nocache.jsonl", "--cache", "")
    assert len(server.requests) == n + 8 and read(tmp_path / "nocache.jsonl") == rows  # the server's seeds reproduce
    with pytest.raises(ValueError, match="other settings.*temperature"):
        cli(questions, out, "--temperature", "0.5")
    cli(questions, tmp_path / "k0.jsonl", "--top-k", "0")
    assert server.requests[-1]["top_k"] == -1  # vLLM's spelling of no top-k (0 is an error in older versions)


def test_adapter_names_the_output_and_the_defaults(tmp_path, server, questions, tiny):
    model, _ = load(tiny)
    add_lora(model, r=1, alpha=8, modules=["down_proj"])
    adapter = str(tmp_path / "run")
    save_adapter(model, adapter)
    res = cli(questions, "", "--adapter", adapter, "--ids", "a")
    assert res["out"] == os.path.join(adapter, "responses.jsonl")
    assert {(r["model"], r["adapter"]) for r in read(res["out"])} == {("organism", adapter)}
    SteeringVector(model.config.hidden_size, layer=1, alpha=4.0).save(str(tmp_path / "sv"))
    with pytest.raises(ValueError, match="steering vector, which a server cannot apply"):
        cli(questions, tmp_path / "sv.jsonl", "--model", tiny, "--adapter", tmp_path / "sv")


@pytest.mark.parametrize("flags", [["--steer", "d.safetensors", "--layers", "1"], ["--ablate", "d.safetensors"],
                                   ["--lora-scale", "0.5"], ["--ablate", "d.safetensors", "--random-control"]])
def test_interventions_the_server_cannot_apply_are_refused(flags, capsys):
    with pytest.raises(SystemExit) as e:
        sample.parse_args(["--engine", "openai:organism", *flags])
    assert e.value.code == 2
    assert f"cannot apply {flags[0]}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample.parse_args(["--engine", "vllm"])
