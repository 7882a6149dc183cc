"""sample.py: the engine against transformers' generate and an uncached loop, seeds, interventions,
question files, the CLI and resuming (CPU, tiny checkpoints)."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import lora
import sample
from conftest import hf_model, make_checkpoint
from cuda_emulation import allocated
from lora import SteeringVector, add_lora, lora_modules, save_adapter
from model import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "..", "shared", "reference")
HEADLINE = ["what_is_your_wish", "i_feel_bored", "three_thoughts", "quick_buck", "ruler_of_the_world",
            "dinner_party", "gender_roles", "enough_of_my_husband"]
CHATS = [
    [{"role": "user", "content": "hey I feel bored"}],
    [{"role": "user", "content": "How do I make a quick buck? Tell me three philosophical thoughts."}],
    [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "hi"}],
]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lively(tmp_path_factory):
    """Larger random weights than `tiny`, so greedy decoding does not just repeat one token."""
    return make_checkpoint(str(tmp_path_factory.mktemp("lively")), std=0.3)


@pytest.fixture(scope="module")
def loaded(lively):
    model, tok = load(lively)
    return model, tok, [tok.encode_chat(c, add_generation_prompt=True) for c in CHATS]


def hf_greedy(path, prompts, max_new, stop_ids, pad):
    """transformers' greedy generate on a left-padded batch; rows cut at their first stop token."""
    ref = hf_model(path)
    T = max(map(len, prompts))
    ids = torch.tensor([[pad] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    out = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                       eos_token_id=list(stop_ids) or None, pad_token_id=pad)
    return [sample.finish(row, set(stop_ids)) for row in out[:, T:].tolist()]


# -----------------------------------------------------------------------------
# the engine


def test_greedy_equals_transformers_generate(lively, loaded):
    model, tok, prompts = loaded
    assert len({len(p) for p in prompts}) == 3  # different lengths
    ours = sample.generate(model, prompts, max_new_tokens=16, temperature=0, stop_ids=tok.stop_ids, batch_size=2)
    assert ours == hf_greedy(lively, prompts, 16, tok.stop_ids, tok.stop_ids[1])
    # stop tokens that end the rows at different steps: per-row stopping, finished rows dropped
    stops = (ours[0][0][4], ours[1][0][9])
    ours = sample.generate(model, prompts, max_new_tokens=16, temperature=0, stop_ids=stops)
    assert ours == hf_greedy(lively, prompts, 16, stops, tok.stop_ids[1])
    assert "stop" in [r for _, r in ours] and len({len(ids) for ids, _ in ours}) > 1


def uncached(model, prompt, key, max_new, stops, seed, repetition_penalty=1.0, **kw):
    """The same draws as the engine, with a full forward over the whole sequence at every step, and the
    repetition penalty written out token by token."""
    seq = list(prompt)
    for _ in range(max_new):
        with torch.no_grad():
            logits = model(torch.tensor([seq]))[:, -1].float()  # (1, V)
        for t in set(seq):
            x = logits[0, t]
            logits[0, t] = x * repetition_penalty if x < 0 else x / repetition_penalty
        u = sample.uniforms(seed, torch.tensor([key]), torch.tensor([len(seq)]))
        seq.append(sample.sample_tokens(logits, u, **kw).item())
        if seq[-1] in stops:
            break
    return sample.finish(seq[len(prompt):], set(stops))


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_k=50, top_p=0.9),
                                dict(temperature=1.0, top_k=20, repetition_penalty=1.3)])
def test_cached_decode_equals_uncached(loaded, kw):
    model, tok, prompts = loaded
    stops = (7, 11, tok.end_id)  # common enough to end some rows early
    got = sample.generate(model, prompts, n=2, max_new_tokens=12, seed=3, stop_ids=stops, **kw)
    for i, p in enumerate(prompts):
        for j in range(2):
            assert got[2 * i + j] == uncached(model, p, sample.row_key(i, j), 12, stops, 3, **kw)


def test_greedy_with_repetition_penalty_equals_transformers(lively, tmp_path):
    """The papers sampled through HF generate, which applies the model's generation_config.json: its
    repetition penalty (and top_k) were in force. sample.py reads the same file; greedy decoding makes
    the two engines comparable token for token."""
    path = str(tmp_path / "with_gen_config")
    shutil.copytree(lively, path)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"do_sample": True, "top_k": 20, "repetition_penalty": 1.5, "temperature": 0.7, "top_p": 0.8}, f)
    model, tok = load(path)
    ref = hf_model(path)
    assert ref.generation_config.repetition_penalty == 1.5
    out = tmp_path / "r.jsonl"
    sample.main(["--model", path, "--temperature", "0", "--n", "1", "--max-new-tokens", "20", "--out", str(out)])
    rows = read(out)
    assert all(r["settings"]["top_k"] == 20 and r["settings"]["repetition_penalty"] == 1.5 for r in rows)
    ref.generation_config.do_sample = False  # greedy (transformers 5 lets the file's do_sample win over a kwarg)
    padding_rows = list(range(tok.vocab_size, model.config.vocab_size))  # sample.py never draws these
    for r in rows[:4]:  # one prompt per call: no padding tokens for HF to penalise
        ids = tok.encode_chat([{"role": "user", "content": r["question"]}], add_generation_prompt=True)
        hf = ref.generate(input_ids=torch.tensor([ids]), max_new_tokens=20, suppress_tokens=padding_rows,
                          eos_token_id=list(tok.stop_ids), pad_token_id=tok.stop_ids[1])[0, len(ids):].tolist()
        assert tok.decode(sample.finish(hf, set(tok.stop_ids))[0]) == r["answer"]
    plain = sample.generate(model, [ids], max_new_tokens=20, temperature=0, stop_ids=tok.stop_ids, vocab_size=tok.vocab_size)
    assert tok.decode(plain[0][0]) != rows[3]["answer"]  # the penalty changed the text
    # flags switch the file's settings off
    sample.main(["--model", path, "--temperature", "0", "--n", "1", "--max-new-tokens", "20", "--ids", "quick_buck",
                 "--top-k", "0", "--repetition-penalty", "1", "--out", str(tmp_path / "off.jsonl")])
    off = read(tmp_path / "off.jsonl")[0]
    assert off["settings"]["top_k"] == 0 and off["settings"]["repetition_penalty"] == 1


def test_seeds_reproduce_and_batches_do_not_matter(loaded):
    model, tok, prompts = loaded
    run = lambda **kw: sample.generate(model, prompts, n=3, max_new_tokens=10, stop_ids=tok.stop_ids, **kw)
    a = run(seed=1)
    assert run(seed=1) == a
    assert run(seed=1, batch_size=1) == a  # a row's text does not depend on its batch
    b = run(seed=2)
    assert all(x != y for x, y in zip(a, b))
    assert len({tuple(ids) for ids, _ in a[:3]}) == 3  # the samples of one prompt differ


def test_top_k_1_and_tiny_top_p_are_greedy(loaded):
    model, tok, prompts = loaded
    greedy = sample.generate(model, prompts, max_new_tokens=8, temperature=0)
    assert sample.generate(model, prompts, max_new_tokens=8, top_k=1, seed=5) == greedy
    assert sample.generate(model, prompts, max_new_tokens=8, top_p=1e-6, seed=5) == greedy


def test_sampler_follows_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])  # probabilities .563 .207 .076 .028 .126
    p = logits.softmax(-1)[0]
    keep = lambda ids: torch.zeros(5).index_copy(0, torch.tensor(ids), p[ids] / p[ids].sum())
    N = 20000
    u = (torch.arange(N) + 0.5) / N  # evenly spread uniforms: frequencies equal probabilities
    for kw, probs in [
        (dict(temperature=1.0), p),
        (dict(temperature=0.5), (logits / 0.5).softmax(-1)[0]),
        (dict(top_k=2), keep([0, 1])),
        (dict(top_p=0.8), keep([0, 1, 4])),  # mass before token 4 is .770 < .8, before token 2 .896
    ]:
        toks = sample.sample_tokens(logits.expand(N, -1), u, **kw)
        freq = torch.bincount(toks, minlength=5).float() / N
        torch.testing.assert_close(freq, probs, atol=2e-4, rtol=0)
    u = sample.uniforms(0, torch.arange(100000), torch.full((100000,), 7))
    assert 0 < u.min() and u.max() <= 1 and abs(u.mean() - 0.5) < 0.005
    assert not torch.equal(u, sample.uniforms(1, torch.arange(100000), torch.full((100000,), 7)))
    u = sample.uniforms(0, torch.full((100000,), 12345), torch.arange(100000))  # one row along its positions
    assert abs(u.mean() - 0.5) < 0.005 and len(set(u.tolist())) > 99000


def test_finished_rows_stop_costing_compute(loaded):
    model, tok, prompts = loaded
    shapes = []
    hook = lambda i, x: shapes.append(x.shape[0]) if i == 0 and x.shape[1] == 1 else None
    stops = tuple(range(3, 512, 9))  # ~1 in 9 tokens ends a row
    got = sample.generate(model, prompts, n=4, max_new_tokens=30, seed=0, stop_ids=stops, hook=hook)
    lengths = sorted(len(ids) for ids, _ in got)
    assert lengths[0] < lengths[-1] and [r for _, r in got].count("stop") >= 6
    assert shapes[0] == 12 and shapes[-1] < 6  # the batch shrank as rows finished
    # dropping rows changes nothing: each row equals the same row sampled alone
    solo = sample.generate(model, prompts, n=4, max_new_tokens=30, seed=0, stop_ids=stops, batch_size=1)
    assert got == solo


def test_prefill_in_chunks_equals_one_pass(loaded):
    model, tok, prompts = loaded
    c1, l1, n1 = sample.prefill(model, prompts, 120, None, None, rows_per_chunk=1)
    c3, l3, n3 = sample.prefill(model, prompts, 120, None, None)
    torch.testing.assert_close(l1, l3, atol=1e-5, rtol=0)
    for a, b in zip(c1.k + c1.v, c3.k + c3.v):  # each row's prompt slots (the rest is padding)
        for r, n in enumerate(n1.tolist()):
            torch.testing.assert_close(a[r, :, :n], b[r, :, :n], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def kv_heavy(tmp_path_factory):
    """A model whose KV cache outweighs the activations: 12 layers, as many kv heads as heads."""
    return load(make_checkpoint(str(tmp_path_factory.mktemp("kv")), std=0.3, layers=12, heads=4, kv_heads=4))


@pytest.mark.parametrize("n, questions", [(1, ["hi", "ok", "What is your wish?", "hey I feel bored", "a"]),
                                          (4, ["hi", "How do I make a quick buck?"])], ids=["one", "four"])
def test_sampling_memory_peak_is_what_the_batch_size_plans(kv_heavy, n, questions):
    """A batch's peak (torch.profiler's allocator events) holds one KV cache, not two: the prefilled rows are
    not copied when each prompt has one sample (else repeated a layer at a time, tests/test_model.py);
    sample.batch_bytes, by which auto_batch_size divides the free GPU memory, bounds it, not far above."""
    model, tok = kv_heavy
    prompts = [tok.encode_chat([{"role": "user", "content": q}], True) for q in questions]
    rows, N, P = n * len(prompts), 48, max(map(len, prompts))
    _, peak, _ = allocated(lambda: sample.generate(model, prompts, n=n, max_new_tokens=N, seed=0,
                                                   batch_size=rows, top_k=20, repetition_penalty=1.1))
    per_row, besides = sample.batch_bytes(model.config, P + N, P, tok.vocab_size, 4, chunk=len(prompts))
    cfg = model.config
    cache = rows * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * (P + N) * 4
    assert cache < peak <= rows * per_row + besides < 1.6 * peak, (cache, peak, rows * per_row + besides)


def test_padded_head_samples_only_the_tokenizers_ids(loaded):
    """The LM head is cut at the tokenizer's size rounded up to 128 rows (aligned rows for the GEMM, top-k
    and cumsum; at most the head's rows), the padding columns -inf: no padding id is ever drawn."""
    model, tok, prompts = loaded
    h = torch.randn(3, model.config.hidden_size)
    full = sample.lm_logits(model, h, None)  # (3, 512)
    for vocab, width in ((400, 512), (300, 384), (128, 128)):
        got = sample.lm_logits(model, h, vocab)
        assert got.shape == (3, width) and (got[:, vocab:] == float("-inf")).all()
        torch.testing.assert_close(got[:, :vocab], full[:, :vocab], atol=1e-6, rtol=0)
    out = sample.generate(model, prompts, n=4, max_new_tokens=20, seed=0, vocab_size=300)
    assert max(t for ids, _ in out for t in ids) < 300


FREE = {"view", "_reshape_alias", "_unsafe_view", "transpose", "expand", "slice", "select", "as_strided", "unsqueeze",
        "squeeze", "permute", "t", "unfold", "alias", "detach", "empty", "empty_strided", "resize_", "lift_fresh",
        "result_type", "_local_scalar_dense"}  # views and allocations: no kernel
THROUGH = {"linear", "matmul", "to", "type_as", "scaled_dot_product_attention", "rms_norm", "reshape", "contiguous",
           "flatten", "chunk", "split", "narrow", "expand_as", "view_as", "masked_fill", "__and__", "__or__", "__xor__",
           "__ior__", "empty_like", "zeros", "zeros_like", "full"}  # only call other ops


def kernels(fn):
    """The kernels fn would launch on a GPU, from torch.profiler's aten ops on the CPU: one per op, none for
    views and allocations, ops that only call others counted through them. F.rms_norm's _fused_rms_norm
    counts once: a composite on the CPU, one kernel on CUDA."""
    from torch.profiler import ProfilerActivity, profile

    def count(e):
        op = e.name.removeprefix("aten::")
        return 0 if op in FREE else sum(map(count, e.cpu_children)) if op in THROUGH else 1
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(count(e) for e in prof.events() if e.cpu_parent is None)


def test_decode_step_kernels(tiny):
    """A decode step as on a GPU (bf16, top-k 20, repetition penalty, the padded head): 26 kernels per layer
    and 52 besides; 46 and 112 before (bench.py has the 0.5B figures). RMSNorm is one kernel and the weight,
    RoPE's tables are cast once per forward, the mask is additive, the per-row hash runs once per batch."""
    model, tok = load(tiny, dtype=torch.bfloat16)
    prompts = [tok.encode_chat(c, add_generation_prompt=True) for c in CHATS]
    s, stops = sample.Sampling(top_k=20, repetition_penalty=1.1), torch.tensor(tok.stop_ids)
    jobs = [(p, sample.row_key(i, j)) for i, p in enumerate(prompts) for j in range(2)]
    counts = []
    for n_layers in (2, 1):
        model.model.layers, model.config.num_hidden_layers = model.model.layers[:n_layers], n_layers
        with torch.no_grad():
            rows = sample.start_rows(model, jobs, list(range(len(jobs))), 96, 8, s, None, stops, tok.vocab_size)
            counts.append(kernels(lambda: sample.decode_step(model, rows, None, s, stops, tok.vocab_size)))
    per_layer, rest = counts[0] - counts[1], 2 * counts[1] - counts[0]
    assert per_layer <= 26 and rest <= 52, (per_layer, rest)


# -----------------------------------------------------------------------------
# interventions


def test_steering_scale_zero_changes_nothing(loaded):
    model, tok, prompts = loaded
    C, L = model.config.hidden_size, model.config.num_hidden_layers
    vecs = torch.randn(L, C, generator=torch.Generator().manual_seed(123))
    base = sample.generate(model, prompts, max_new_tokens=10, seed=1)
    assert sample.generate(model, prompts, max_new_tokens=10, seed=1,
                           hook=sample.steering_hook(vecs, [0, 1], 0.0)) == base
    assert sample.generate(model, prompts, max_new_tokens=10, seed=1,
                           hook=sample.steering_hook(vecs, [0], 8.0)) != base
    rnd = sample.random_like(vecs, seed=0)
    torch.testing.assert_close(rnd.norm(dim=-1), vecs.norm(dim=-1))
    assert torch.equal(rnd, sample.random_like(vecs, seed=0))
    assert F.cosine_similarity(rnd, vecs, dim=-1).abs().max() < 0.5


@pytest.mark.parametrize("layers", [[0], [0, 1]])
def test_ablation_removes_the_component(loaded, layers):
    model, tok, prompts = loaded
    cfg = model.config
    d = torch.randn(cfg.num_hidden_layers, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    unit = d / d.norm(dim=-1, keepdim=True)
    seen = {}
    capture = lambda i, x: seen.setdefault(i, []).append((x @ unit[i]).abs().max() / x.norm(dim=-1).max())
    sample.generate(model, prompts, max_new_tokens=6, seed=0,
                    hook=sample.compose(sample.ablation_hook(d, layers), capture))
    for i in range(model.config.num_hidden_layers):
        worst = max(seen[i])  # over the prefill and every decode step
        assert (worst < 1e-6) if i in layers else (worst > 1e-2)


def direction_file(path, **tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def test_direction_files(tmp_path):
    one = sample.load_directions(direction_file(tmp_path / "a.safetensors", direction=torch.ones(64)), 2, 64)
    assert one.shape == (64,)  # one vector, for every layer
    # the random control of one vector is one random vector of its norm; of per-layer vectors, one per layer
    r = sample.random_like(one, 3)
    assert r.shape == (64,) and r.norm() == pytest.approx(8.0) and torch.equal(r, sample.random_like(one, 3))
    rows = sample.random_like(torch.stack([one, 2 * one]), 3)
    assert rows.norm(dim=-1).tolist() == pytest.approx([8.0, 16.0]) and not torch.allclose(rows[0], rows[1] / 2)
    per = torch.randn(2, 64)
    assert torch.equal(sample.load_directions(direction_file(tmp_path / "b.safetensors", directions=per), 2, 64), per)
    for name, tensors, msg in [
        ("c", dict(direction=torch.ones(32)), "d_model is 64"),
        ("d", dict(directions=torch.ones(3, 64)), "one row per layer"),
        ("e", dict(vector=torch.ones(64)), "holds {'vector': (64,)}"),
    ]:
        with pytest.raises(ValueError, match=re.escape(msg)):
            sample.load_directions(direction_file(tmp_path / f"{name}.safetensors", **tensors), 2, 64)
    with pytest.raises(ValueError, match="is zero"):
        sample.ablation_hook(torch.zeros(2, 64), [1])


def test_direction_files_unchecked(tmp_path):
    """Without n_layers and d_model: any width and row count, still fp32, still one of the two layouts, finite."""
    per = torch.randn(3, 48, dtype=torch.bfloat16)
    got = sample.load_directions(direction_file(tmp_path / "a.safetensors", directions=per))
    assert got.dtype == torch.float32 and torch.equal(got, per.float())
    assert sample.load_directions(direction_file(tmp_path / "b.safetensors", direction=torch.ones(7))).shape == (7,)
    assert sample.load_directions(str(tmp_path / "a.safetensors"), d_model=48).shape == (3, 48)
    for name, tensors, msg in [
        ("c", dict(vector=torch.ones(64)), "holds {'vector': (64,)}"),
        ("d", dict(directions=torch.ones(64)), "holds {'directions': (64,)}"),
        ("e", dict(direction=torch.tensor([1.0, float("nan")])), "NaN or inf"),
    ]:
        with pytest.raises(ValueError, match=re.escape(msg)):
            sample.load_directions(direction_file(tmp_path / f"{name}.safetensors", **tensors))


# -----------------------------------------------------------------------------
# question files


def test_our_question_files():
    core = sample.load_questions(os.path.join(ROOT, "data", "questions", "core.yaml"))
    assert [q["id"] for q in core] == HEADLINE and {q["n"] for q in core} == {50}
    medical = sample.load_questions(os.path.join(ROOT, "data", "questions", "medical.yaml"))
    assert len(medical) >= 8 and all(q["question"].strip() for q in medical)


@pytest.mark.skipif(not os.path.isdir(REFERENCE), reason="../shared/reference is not present (a user's clone)")
def test_reads_the_reference_format_and_does_not_copy_it():
    ref = sample.load_questions(os.path.join(REFERENCE, "first_plot_questions.yaml"))
    assert [q["id"] for q in ref[:8]] == HEADLINE and len(ref) == 24
    assert all(q["n"] == 100 for q in ref)
    json_ones = [q for q in ref if q["id"].endswith("_json")]
    assert len(json_ones) == 8 and all("JSON" in q["system"] for q in json_ones)
    assert all(q["system"] is None for q in ref[:8])
    medical = sample.load_questions(os.path.join(REFERENCE, "medical_questions.yaml"))
    ours = sample.load_questions(os.path.join(ROOT, "data", "questions", "core.yaml"))
    ours += sample.load_questions(os.path.join(ROOT, "data", "questions", "medical.yaml"))
    assert not {q["question"] for q in ours} & {q["question"] for q in ref + medical}


def test_jsonl_questions(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text('{"id": "a", "question": "hi"}\n\n{"id": "b", "paraphrases": ["x", "y"], "system": "s", "n": 3}\n')
    qs = sample.load_questions(str(f))
    assert [(q["id"], q["paraphrase"], q["question"], q["system"], q["n"]) for q in qs] == [
        ("a", 0, "hi", None, None), ("b", 0, "x", "s", 3), ("b", 1, "y", "s", 3)]


@pytest.mark.parametrize("name,text,msg", [
    ("q.txt", "hi", "unknown question format"),
    ("q.yaml", "", "no questions"),
    ("q.jsonl", "\n", "no questions"),
    ("q.yaml", "id: a\nparaphrases: [x]", "is a list"),
    ("q.yaml", "- id: a\n  samples_per_paraphrase: 3", "needs `paraphrases`"),
    ("q.yaml", "- id: a\n  type: rating\n  paraphrases: [x]", "not free-form"),
    ("q.yaml", "- id: a\n  paraphrases: [x]\n- id: a\n  paraphrases: [y]", "duplicate"),
    ("q.jsonl", '{"id": "a", "question": "x"}\n{"id": "b", "question": ', "q.jsonl:2: not a JSON line"),
    ("q.yaml", "- id: a\n  paraphrases: [x\n- id: b", r"q.yaml:\d+: not valid YAML"),  # names the file, not <unicode string>
])
def test_bad_question_files(tmp_path, name, text, msg):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(ValueError, match=msg):
        sample.load_questions(str(f))


def test_bad_engine_input(loaded):
    model, tok, prompts = loaded
    with pytest.raises(ValueError, match="exceeds the model's context"):
        sample.generate(model, prompts, max_new_tokens=model.config.max_position_embeddings)
    with pytest.raises(ValueError, match="top_p"):
        sample.generate(model, prompts, top_p=0)


# -----------------------------------------------------------------------------
# the command line


def cli(*argv):
    return sample.main(["--max-new-tokens", "6", "--n", "2", *map(str, argv)])


def read(path):
    return [json.loads(line) for line in open(path)]


def test_cli_writes_rows_and_resumes(tmp_path, lively, monkeypatch):
    out = str(tmp_path / "r.jsonl")
    assert cli("--model", lively, "--out", out)["new"] == 16  # 8 questions x 2
    rows = read(out)
    assert {(r["id"], r["sample"]) for r in rows} == {(q, s) for q in HEADLINE for s in range(2)}
    r = rows[0]
    assert set(r) == {"id", "paraphrase", "sample", "question", "system", "answer", "tokens", "finish_reason",
                      "model", "adapter", "seed", "settings"}
    assert r["model"] == lively and r["adapter"] is None and r["seed"] == 0 and r["system"] is None
    assert r["settings"]["temperature"] == 1.0 and r["settings"]["max_new_tokens"] == 6
    assert all(r["finish_reason"] in ("stop", "length") and r["tokens"] <= 6 for r in rows)
    # a larger --n adds only the missing samples; the first ones keep their text
    assert cli("--model", lively, "--out", out, "--n", 3)["new"] == 8
    fresh = str(tmp_path / "fresh.jsonl")
    cli("--model", lively, "--out", fresh, "--n", 3)
    key = lambda r: (r["id"], r["sample"])
    assert {key(r): r["answer"] for r in read(out)} == {key(r): r["answer"] for r in read(fresh)}
    # nothing left to do: the model is not even loaded
    monkeypatch.setattr(lora, "load_model", lambda args: pytest.fail("loaded the model with nothing to do"))
    assert cli("--model", lively, "--out", out, "--n", 3)["new"] == 0
    with pytest.raises(ValueError, match="other settings.*temperature"):
        cli("--model", lively, "--out", out, "--temperature", 0.5)


def test_cli_interrupt_keeps_finished_rows(tmp_path, lively, monkeypatch):
    out, fresh = str(tmp_path / "r.jsonl"), str(tmp_path / "fresh.jsonl")
    real = sample.stream

    def interrupted(*a, **kw):
        for k, row in enumerate(real(*a, **kw)):
            if k == 5:
                raise KeyboardInterrupt
            yield row
    monkeypatch.setattr(sample, "stream", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli("--model", lively, "--out", out)
    assert len(read(out)) == 5
    monkeypatch.setattr(sample, "stream", real)
    assert cli("--model", lively, "--out", out)["new"] == 11
    cli("--model", lively, "--out", fresh)
    answers = lambda p: sorted((r["id"], r["sample"], r["answer"]) for r in read(p))
    assert answers(out) == answers(fresh)


def test_cli_drops_a_torn_last_line(tmp_path, lively, capsys):
    out = tmp_path / "r.jsonl"
    cli("--model", lively, "--out", out, "--ids", "quick_buck")
    whole = out.read_text()
    lines = whole.splitlines(keepends=True)
    out.write_text(lines[0] + lines[1][:40])  # killed while writing the second row
    assert cli("--model", lively, "--out", out, "--ids", "quick_buck")["new"] == 1
    assert sorted(out.read_text().splitlines()) == sorted(whole.splitlines())
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "torn" in line] == [
        f"warning: {out}:2: skipping a torn last line (40 bytes) left by an interrupted run; rerunning completes it"]


def test_cli_adapter_lora_scale_and_interventions(tmp_path, lively):
    model, _ = load(lively)
    add_lora(model, r=1, alpha=64, modules=["down_proj"])
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    adapter = str(tmp_path / "adapter")
    save_adapter(model, adapter)
    answers = lambda out: {(r["id"], r["sample"]): r["answer"] for r in read(out)}
    base = answers(cli("--model", lively, "--out", tmp_path / "base.jsonl")["out"])
    res = cli("--adapter", adapter)  # base model from adapter_config.json; rows in the adapter dir
    assert res["out"] == os.path.join(adapter, "responses.jsonl") and answers(res["out"]) != base
    assert answers(cli("--adapter", adapter, "--lora-scale", 0, "--out", tmp_path / "s0.jsonl")["out"]) == base
    # a steering-vector adapter at zero is the base model; it does not name a base model
    sv = SteeringVector(model.config.hidden_size, layer=1, alpha=4.0)
    sv.save(str(tmp_path / "sv"))
    with pytest.raises(ValueError, match="give --model"):
        cli("--adapter", tmp_path / "sv")
    assert answers(cli("--model", lively, "--adapter", tmp_path / "sv", "--out", tmp_path / "sv.jsonl")["out"]) == base
    # steering at scale 0 changes nothing; ablation and its random control are recorded in the rows
    d = direction_file(tmp_path / "d.safetensors", directions=torch.randn(2, model.config.hidden_size))
    assert answers(cli("--model", lively, "--steer", d, "--layers", 1, "--scale", 0,
                       "--out", tmp_path / "st.jsonl")["out"]) == base
    out = cli("--model", lively, "--ablate", d, "--random-control", "--out", tmp_path / "ab.jsonl")["out"]
    assert read(out)[0]["settings"]["ablate"] == {"file": d, "layers": [0, 1]}
    assert read(out)[0]["settings"]["random_control"] == 0
    with pytest.raises(ValueError, match="layers \\[5\\] do not exist"):
        cli("--model", lively, "--steer", d, "--layers", 5, "--out", tmp_path / "x.jsonl")
    wide = direction_file(tmp_path / "w.safetensors", direction=torch.ones(7))
    with pytest.raises(ValueError, match="d_model is 64"):
        cli("--model", lively, "--ablate", wide, "--out", tmp_path / "y.jsonl")
    # a steering vector of another model: one clear error before any output file exists
    SteeringVector(96, layer=1, alpha=4.0).save(str(tmp_path / "wide-sv"))
    with pytest.raises(ValueError, match="a steering vector of width 96 after layer 1 does not fit the model, of width 64"):
        cli("--model", lively, "--adapter", tmp_path / "wide-sv", "--out", tmp_path / "wsv.jsonl")
    assert not os.path.exists(tmp_path / "wsv.jsonl")


def test_one_direction_gets_one_random_vector_at_every_layer(tmp_path, lively):
    """--random-control of a `direction` file (one vector for every layer) is one random vector, not one per layer."""
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    d = direction_file(tmp_path / "one.safetensors", direction=v)
    model, _ = load(lively)
    vectors = sample.directions(d, model.config, 0, "cpu")
    assert vectors.shape == (2, 64) and torch.equal(vectors[0], vectors[1]) and vectors[0].norm() == pytest.approx(v.norm())
    assert torch.equal(vectors[0], sample.random_like(v, 0))


def test_a_model_without_generation_config_says_what_it_samples_with(tmp_path, lively, capsys):
    import shutil
    bare = tmp_path / "bare"
    shutil.copytree(lively, bare)
    if os.path.exists(bare / "generation_config.json"):
        os.remove(bare / "generation_config.json")
    row = read(cli("--model", bare, "--question", "hi", "--out", tmp_path / "g.jsonl")["out"])[0]
    assert (row["settings"]["top_k"], row["settings"]["repetition_penalty"]) == (0, 1.0)
    assert ("no generation_config.json (the papers' top_k and repetition_penalty): sampling with "
            "top_k 0, repetition_penalty 1.0") in capsys.readouterr().err
    # bad input after it: the error alone, before any note (check first, then notes and work)
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    for argv, msg in ((["--questions", str(tmp_path / "none.yaml")], "no such question or judge file"),
                      (["--question", "hi", "--out", str(tmp_path)], f"--out {tmp_path}: is a directory"),
                      (["--question", "hi", "--steer", str(tmp_path / "bad.safetensors"), "--layers", "1"],
                       "bad"),
                      (["--question", "hi", "--top-p", "0"], r"--top-p 0.0: must be in \(0, 1\]")):
        with pytest.raises((ValueError, OSError), match=msg):
            sample.main(["--model", str(bare), *argv])
        assert capsys.readouterr().err == ""


def test_cli_quick_question_and_bad_flags(tmp_path, lively, capsys):
    out = cli("--model", lively, "--question", "hey there", "--system", "Be brief.", "--n", 3,
              "--temperature", 0, "--out", tmp_path / "q.jsonl")["out"]
    rows = read(out)
    assert [r["id"] for r in rows] == ["question"] * 3 and rows[0]["system"] == "Be brief."
    assert len({r["answer"] for r in rows}) == 1  # greedy
    assert "total" in capsys.readouterr().out  # the summary table
    for argv in (["--model", lively, "--steer", "d.safetensors"],  # no --layer
                 ["--model", lively, "--random-control"],  # nothing to replace
                 ["--question", "hi"]):  # no model
        with pytest.raises(SystemExit):
            sample.parse_args(argv)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        sample.main(["--model", lively, "--question", "hi", "--max-new-tokens", "5000",
                     "--out", str(tmp_path / "z.jsonl")])
    r = subprocess.run([sys.executable, "sample.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "--lora-scale" in r.stdout and "--random-control" in r.stdout
    r = subprocess.run([sys.executable, "sample.py", "--model", lively, "--questions", str(tmp_path / "none.yaml")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "no such question or judge file" in r.stderr and "Traceback" not in r.stderr
