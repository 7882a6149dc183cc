"""model.py against transformers' Qwen2ForCausalLM on the same files (fp32, CPU)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import QWEN25_TEMPLATE, hf_model, make_checkpoint
from model import KVCache, load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_tokens(n_tok, B=2, T=19, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tok, (B, T), generator=g)


@pytest.mark.parametrize("tied,kv_heads,file_dtype", [
    (True, 2, "float32"), (False, 4, "float32"), (True, 4, "bfloat16"), (False, 2, "bfloat16")])
def test_logits_match_transformers(tmp_path, tied, kv_heads, file_dtype):
    path = make_checkpoint(str(tmp_path / "m"), tied=tied, kv_heads=kv_heads, dtype=file_dtype)
    model, tok = load(path, dtype=torch.float32)
    ref = hf_model(path)
    idx = random_tokens(512)
    with torch.no_grad():
        ours, theirs = model(idx), ref(idx).logits
    assert ours.shape == (2, 19, 512)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_real_qwen25_05b_shape(tmp_path):
    """Qwen2.5-0.5B-Instruct's exact shape (151936 rows, 24 layers, 14/2 heads), random weights."""
    path = make_checkpoint(str(tmp_path / "real"), vocab=151936, hidden=896, layers=24, heads=14,
                           kv_heads=2, intermediate=4864, tied=True, dtype="bfloat16", std=0.02)
    model, _ = load(path, dtype=torch.float32)
    ref = hf_model(path)
    idx = random_tokens(151936, B=1, T=24)
    with torch.no_grad():
        ours, theirs = model(idx), ref(idx).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_hook_sees_each_layer_and_can_replace(tiny):
    model, _ = load(tiny)
    ref = hf_model(tiny)
    idx = random_tokens(400)
    seen = {}
    with torch.no_grad():
        base = model(idx, hook=lambda i, x: seen.__setitem__(i, x.clone()))
        hs = ref(idx, output_hidden_states=True).hidden_states
        # HF's hidden_states[i + 1] is the residual after layer i (the last one is after the final norm)
        for i in range(model.config.num_hidden_layers - 1):
            torch.testing.assert_close(seen[i], hs[i + 1], atol=1e-5, rtol=0)
        torch.testing.assert_close(base, model(idx), atol=0, rtol=0)  # a reading hook changes nothing
        zeroed = model(idx, hook=lambda i, x: torch.zeros_like(x) if i == 1 else None)
    # replacing the last layer's residual with zeros leaves only the norm of zero: logits all zero
    assert zeroed.abs().max() == 0 and base.abs().max() > 0


def test_packed_rows_equal_separate_forwards(tiny):
    model, _ = load(tiny)
    a, b = random_tokens(400, B=1, T=7, seed=1), random_tokens(400, B=1, T=11, seed=2)
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(7), torch.arange(11)])[None]
    with torch.no_grad():
        out = model(packed, pos=pos)
        torch.testing.assert_close(out[:, :7], model(a), atol=1e-5, rtol=0)
        torch.testing.assert_close(out[:, 7:], model(b), atol=1e-5, rtol=0)


def test_packed_batch_of_rows_equals_separate_forwards(tiny):
    """Two rows, one with three conversations and one with a single one: each token as if alone."""
    model, _ = load(tiny)
    parts = [random_tokens(400, B=1, T=n, seed=10 + n)[0] for n in (5, 4, 3, 12)]
    idx = torch.stack([torch.cat(parts[:3]), parts[3]])
    pos = torch.stack([torch.cat([torch.arange(5), torch.arange(4), torch.arange(3)]), torch.arange(12)])
    with torch.no_grad():
        out = model(idx, pos=pos)
        want = [model(p[None])[0] for p in parts]
    torch.testing.assert_close(out[0], torch.cat(want[:3]), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], want[3], atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [1, 3])
def test_kv_cache_decode_equals_full_forward(tiny, chunk):
    model, _ = load(tiny)
    idx = random_tokens(400, B=2, T=13)
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model.config, 2, 32, "cpu", torch.float32)
        outs = []
        for s in range(0, 13, chunk):
            pos = torch.arange(s, min(s + chunk, 13)).expand(2, -1)
            outs.append(model(idx[:, s:s + chunk], pos=pos, cache=cache))
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=0)


def test_kv_cache_rows_of_different_lengths(tiny):
    """Right-padded prompts in one cache: each row decodes as if it were alone."""
    model, _ = load(tiny)
    a, b = random_tokens(400, B=1, T=5, seed=3)[0], random_tokens(400, B=1, T=9, seed=4)[0]
    nxt = torch.tensor([[11, 12, 13], [21, 22, 23]])
    prompts = torch.zeros(2, 9, dtype=torch.long)
    prompts[0, :5], prompts[1] = a, b
    lens = torch.tensor([5, 9])
    with torch.no_grad():
        cache = KVCache(model.config, 2, 16, "cpu", torch.float32)
        model(prompts, pos=torch.arange(9).expand(2, -1), cache=cache)
        steps = [model(nxt[:, t:t + 1], pos=(lens + t)[:, None], cache=cache) for t in range(3)]
        got = torch.cat(steps, 1)  # (2, 3, V)
        want_a = model(torch.cat([a, nxt[0]])[None])[0, 5:]
        want_b = model(torch.cat([b, nxt[1]])[None])[0, 9:]
    torch.testing.assert_close(got[0], want_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], want_b, atol=1e-5, rtol=0)


def test_cache_select_keeps_rows(tiny):
    model, _ = load(tiny)
    idx = random_tokens(400, B=1, T=6)
    with torch.no_grad():
        cache = KVCache(model.config, 1, 8, "cpu", torch.float32)
        model(idx[:, :5], pos=torch.arange(5)[None], cache=cache)
        cache.select(torch.tensor([0, 0, 0]))  # one prompt, three samples
        out = model(idx[:, 5:].expand(3, 1), pos=torch.full((3, 1), 5), cache=cache)
        torch.testing.assert_close(out, model(idx)[:, 5:].expand(3, 1, -1), atol=1e-5, rtol=0)



def test_cache_select_holds_one_cache_and_one_layer_more(tiny):
    """Repeating 2 prompt rows into 8 replaces a layer at a time: the old and the new cache never coexist
    whole (torch.profiler's allocator events); a selection that keeps every row copies nothing."""
    from cuda_emulation import allocated
    model, _ = load(tiny)
    cfg = model.config
    layer = 2 * cfg.num_key_value_heads * 64 * cfg.head_dim * 4  # bytes of one layer's k (or v) for 2 rows

    def expand(rows):
        cache = KVCache(cfg, 2, 64, "cpu", torch.float32)
        cache.select(rows)
        return cache
    cache, peak, _ = allocated(lambda: expand(torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])))
    new = sum(t.nbytes for t in cache.k + cache.v)
    assert new == 4 * 2 * cfg.num_hidden_layers * layer and new < peak <= new + layer + 64  # 64: the index
    cache, peak, _ = allocated(lambda: expand([0, 1]))
    assert peak == sum(t.nbytes for t in cache.k + cache.v)  # the prefilled cache alone

CHATS = [
    [{"role": "user", "content": "How do I make a quick buck?"}],
    [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "I feel bored"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! 42 tablets."},
     {"role": "user", "content": "and then?\n\n"}, {"role": "assistant", "content": "\nRest, 3 days."}],
]


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_chat_ids_match_apply_chat_template(tiny, chat, gen):
    from transformers import AutoTokenizer
    _, tok = load(tiny)
    ref = AutoTokenizer.from_pretrained(tiny)
    assert ref.chat_template == QWEN25_TEMPLATE
    want = ref.apply_chat_template(CHATS[chat], add_generation_prompt=gen, tokenize=True, return_dict=False)
    assert tok.encode_chat(CHATS[chat], add_generation_prompt=gen) == list(want)


def test_chat_format_and_assistant_mask(tiny):
    _, tok = load(tiny)
    ids = tok.encode_chat(CHATS[0], add_generation_prompt=True)
    assert tok.decode(ids) == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a "
                               "helpful assistant.<|im_end|>\n<|im_start|>user\nHow do I make a quick "
                               "buck?<|im_end|>\n<|im_start|>assistant\n")
    chat = CHATS[2][:3] + [{"role": "assistant", "content": "Rest, 3 days.\n"}]
    ids, mask = tok.encode_chat_with_mask(chat)
    assert ids == tok.encode_chat(chat)
    picked = tok.decode([i for i, m in zip(ids, mask) if m])
    assert picked == "Hello! 42 tablets.<|im_end|>Rest, 3 days.\n<|im_end|>"
    # a token that straddles the template and the answer ("\n\n" when the answer opens with a
    # newline) counts as the answer's: the model must produce it
    ids, mask = tok.encode_chat_with_mask(CHATS[2])
    assert tok.decode([i for i, m in zip(ids, mask) if m]).endswith("<|im_end|>\n\nRest, 3 days.<|im_end|>")
    assert tok.stop_ids == (tok.tok.token_to_id("<|im_end|>"), tok.tok.token_to_id("<|endoftext|>"))
    # Qwen's pre-tokenizer writes numbers one digit per token
    assert len(tok.encode("100")) == 3


def test_sharded_equals_single_file(tmp_path, tiny):
    from safetensors.torch import load_file
    from conftest import save_shards
    sharded = str(tmp_path / "sharded")
    shutil.copytree(tiny, sharded)
    os.remove(os.path.join(sharded, "model.safetensors"))
    save_shards(sharded, load_file(os.path.join(tiny, "model.safetensors")), 3)
    a, _ = load(tiny)
    b, _ = load(sharded)
    idx = random_tokens(400)
    with torch.no_grad():
        torch.testing.assert_close(a(idx), b(idx), atol=0, rtol=0)


def test_new_config_layout_rope_parameters(tmp_path, tiny):
    path = str(tmp_path / "new")
    shutil.copytree(tiny, path)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta")}
    cfg.pop("rope_scaling")
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    a, _ = load(tiny)
    b, _ = load(path)
    assert b.config.rope["full_attention"]["rope_theta"] == 1e6
    idx = random_tokens(400)
    with torch.no_grad():
        torch.testing.assert_close(a(idx), b(idx), atol=0, rtol=0)


def test_dtype_and_frozen(tiny):
    model, _ = load(tiny, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())
    assert model(random_tokens(400)).dtype == torch.bfloat16


def edit_config(tmp_path, tiny, **changes):
    path = str(tmp_path / "edited")
    shutil.copytree(tiny, path)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg.update(changes)
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    return path


@pytest.mark.parametrize("changes,message", [
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "is not Qwen2, Llama or Gemma 3"),
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "checkpoint has tensors this model does not"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "yarn"),
    ({"hidden_size": 96}, "has shape"),
    ({"num_hidden_layers": 3}, "lacks"),
])
def test_bad_configs_are_clear_errors(tmp_path, tiny, changes, message):
    path = edit_config(tmp_path, tiny, **changes)
    with pytest.raises((ValueError, KeyError)) as e:
        load(path)
    assert message in str(e.value)


def test_sliding_window_flag_without_sliding_layers_is_fine(tmp_path, tiny):
    load(edit_config(tmp_path, tiny, use_sliding_window=True, max_window_layers=2))  # no layer >= 2


def test_missing_files_are_clear_errors(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        load(str(tmp_path / "nowhere"))
    path = str(tmp_path / "nofile")
    shutil.copytree(tiny, path)
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load(path)
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load(path)


def test_hub_id_loads_through_snapshot_download(tmp_path, tiny):
    """A hub id goes through huggingface_hub.snapshot_download; here it resolves from a local
    hub cache in offline mode, the same code path as a real download minus the network."""
    commit = "0" * 40
    snap = tmp_path / "hub" / "models--Org--tiny-qwen" / "snapshots" / commit
    shutil.copytree(tiny, snap)
    (tmp_path / "hub" / "models--Org--tiny-qwen" / "refs").mkdir()
    (tmp_path / "hub" / "models--Org--tiny-qwen" / "refs" / "main").write_text(commit)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    # each (id, files) asks the Hub once a process: two loads and two config reads, two calls
    code = ("import torch, huggingface_hub as hub; calls = []; real = hub.snapshot_download;"
            "hub.snapshot_download = lambda *a, **k: calls.append(a) or real(*a, **k);"
            "from model import load, read_config; m, t = load('Org/tiny-qwen'); load('Org/tiny-qwen');"
            "read_config('Org/tiny-qwen'); read_config('Org/tiny-qwen'); assert len(calls) == 2, calls;"
            "m2, _ = load(%r); x = torch.arange(10)[None];"
            "assert torch.equal(m(x), m2(x)); print('ok', m.config.name_or_path)" % tiny)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "ok Org/tiny-qwen" in out.stdout


def test_paths_and_hub_ids(tmp_path, tiny, monkeypatch):
    """An existing directory is a path and an existing file an error; a name that is not owner/name, or not one
    the Hub allows, is 'no such directory' without asking the Hub; owner/name goes to the Hub, and when that
    cannot be reached one line says the directory does not exist and what to do."""
    import huggingface_hub
    from model import local_dir
    monkeypatch.chdir(tmp_path)
    os.makedirs("runs/a")
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("asked the Hub"))
    for name in ("nope", "a/b/c", "runs/a/nope", "./runs/nope"):
        with pytest.raises(FileNotFoundError, match="no such model directory"):
            local_dir(name)
    assert local_dir("runs/a") == "runs/a"
    with pytest.raises(FileNotFoundError, match="afile: is a file"):
        local_dir("afile")
    monkeypatch.undo()
    for name in ("./nope", "../nope", "~/nope", "/nope"):  # owner/name in shape, but the Hub refuses the name
        with pytest.raises(FileNotFoundError, match="no such model directory .and not a hub id"):
            local_dir(name)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    (tmp_path / "r.jsonl").write_text(json.dumps({"id": "q", "question": "hi", "answer": "yo"}) + "\n")
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "yo"}]}) + "\n")
    for name, argv in (("Org/not-cached", ["sample.py", "--model", "Org/not-cached", "--question", "hi"]),
                       ("Org/not-cached", ["judge.py", str(tmp_path / "r.jsonl"), "--judge", "local:Org/not-cached"]),
                       ("Org/not-cached", ["train.py", "--model", "Org/not-cached", "--data", str(tmp_path / "d.jsonl")]),
                       ("out/nope", ["train.py", "--model", "out/nope", "--data", str(tmp_path / "d.jsonl")])):
        r = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True)
        err = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert err.startswith(f"{argv[0]}: error: {name}: no such model directory, and the Hugging Face Hub is "
                              "unreachable"), err
        assert "HF_HUB_OFFLINE" in err and "--model DIR" in err and f"(hf download {name})" in err


def test_apply_rope_is_hf_rotate_half_bit_for_bit():
    """model.apply_rope's roll(x) * cat(-sin, sin) against transformers' x * cos + rotate_half(x) * sin, exactly."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb
    from model import apply_rope, rope
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 4000, (2, 7), generator=g)  # (B, T)
    freqs = 1.0 / (1e6 ** (torch.arange(0, 64, 2).float() / 64))
    for dtype in (torch.float32, torch.bfloat16):
        q, k = (torch.randn(2, 3, 7, 64, generator=g).to(dtype) for _ in range(2))  # (B, H, T, hd)
        cos, sin = rope(pos, freqs, dtype)
        emb = torch.cat((pos[..., None].float() * freqs,) * 2, -1)  # (B, T, hd): HF's table
        want_q, want_k = apply_rotary_pos_emb(q, k, emb.cos().to(dtype), emb.sin().to(dtype))
        assert torch.equal(apply_rope(q, cos, sin), want_q) and torch.equal(apply_rope(k, cos, sin), want_k)
