"""Llama 3.x and Gemma 3 through model.py against transformers and PEFT (fp32, CPU): logits on sequences longer
than the tiny Gemma's sliding window (8), that window in packed rows, training, the KV cache and the residual hook,
LoRA, greedy sampling, the chat formats of the official templates (tests/data), real configs on the meta device,
and the text model of a multimodal Gemma 3 checkpoint under either weight prefix."""
import json
import os
import shutil
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

import directions
import sample
import train
from conftest import (DATA, hf_config, hf_model, make_checkpoint, peft_reference, per_conversation_loss,
                      random_state, save_shards)
from lora import MODULES, add_lora, load_adapter, lora_modules, save_adapter
from model import (KVCache, PREFIXES, UNUSED, Config, Tokenizer, Transformer, inv_freq, load, load_tokenizer,
                   read_config)

FAMILIES = ["llama", "gemma3_text"]
FULL = "full_attention"
END = {"llama": "<|eot_id|>", "gemma3_text": "<end_of_turn>"}
IDX = torch.randint(0, 400, (2, 21), generator=torch.Generator().manual_seed(0))  # 21 tokens: past the window

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """ckpts(family, tied=True): a tiny random checkpoint of 3 layers (Gemma: sliding, full, sliding), made once."""
    made = {}

    def get(family, tied=True):
        if (family, tied) not in made:
            made[family, tied] = make_checkpoint(str(tmp_path_factory.mktemp(family)), family=family, tied=tied,
                                                 layers=3, std=0.2)
        return made[family, tied]
    return get


def tokens(n, seed):
    return torch.randint(0, 400, (n,), generator=torch.Generator().manual_seed(seed))


def copy_of(path, tmp_path, name="copy"):
    return shutil.copytree(path, str(tmp_path / name))


@pytest.mark.parametrize("family,tied", [(f, t) for f in FAMILIES for t in (True, False)])
def test_logits_match_transformers(ckpts, family, tied):
    path = ckpts(family, tied)
    model, _ = load(path, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(IDX), hf_model(path)(IDX).logits, atol=1e-4, rtol=0)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_frequencies_equal_transformers(ckpts, family):
    """llama3 scaling (the tiny head has frequencies in all three of its bands), Gemma's linear scaling on full
    layers and its local theta on sliding ones: bit for bit."""
    cfg, rotary = read_config(ckpts(family)), hf_model(ckpts(family)).model.rotary_emb
    for kind, p in cfg.rope.items():
        want = rotary.inv_freq if family == "llama" else getattr(rotary, f"{kind}_inv_freq")
        assert torch.equal(inv_freq(p, cfg.head_dim, "cpu"), want)
        if p["rope_type"] != "default":  # the scaling is in force
            assert not torch.equal(want, inv_freq({**p, "rope_type": "default"}, cfg.head_dim, "cpu"))


@pytest.mark.parametrize("family", FAMILIES)
def test_config_written_by_transformers_5_is_the_same(ckpts, tmp_path, family):
    """The Hub's layout (rope_scaling, Gemma's rope_local_base_freq and sliding_window_pattern) and the one
    transformers 5 writes (rope_parameters, per layer type for Gemma, and layer_types) read as one Config."""
    from transformers import AutoConfig
    path = copy_of(ckpts(family), tmp_path)
    AutoConfig.from_pretrained(path).save_pretrained(path)
    written = json.load(open(os.path.join(path, "config.json")))
    assert "rope_parameters" in written and "rope_scaling" not in written
    assert replace(read_config(path), name_or_path="") == replace(read_config(ckpts(family)), name_or_path="")


@pytest.mark.parametrize("family", FAMILIES)
def test_hook_sees_transformers_hidden_states(ckpts, family):
    model, _ = load(ckpts(family))
    seen = {}
    with torch.no_grad():
        model(IDX, hook=lambda i, x: seen.__setitem__(i, x.clone()))
        hs = hf_model(ckpts(family))(IDX, output_hidden_states=True).hidden_states
    for i in range(model.config.num_hidden_layers - 1):  # HF's last one is after the final norm
        torch.testing.assert_close(seen[i], hs[i + 1], atol=1e-4, rtol=0)


def test_packed_rows_keep_the_window(ckpts):
    """Conversations longer than the window, packed two to a row: each token as if its conversation were alone."""
    model, _ = load(ckpts("gemma3_text"))
    parts = [tokens(n, seed) for seed, n in enumerate((13, 10, 20, 3))]
    idx = torch.stack([torch.cat(parts[:2]), torch.cat(parts[2:])])  # (2, 23)
    pos = torch.stack([torch.cat([torch.arange(len(a)), torch.arange(len(b))]) for a, b in (parts[:2], parts[2:])])
    with torch.no_grad():
        out = model(idx, pos=pos)
        want = [model(p[None])[0] for p in parts]
    torch.testing.assert_close(out[0], torch.cat(want[:2]), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], torch.cat(want[2:]), atol=1e-5, rtol=0)


def test_packed_training_loss_and_gradient_keep_the_window(ckpts):
    """train.py's packed loss (sliding layers masked per conversation) equals one forward per conversation."""
    model, tok = load(ckpts("gemma3_text"))
    torch.manual_seed(0)
    add_lora(model, r=2, alpha=16)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.normal_(0, 0.05)
    chats = [[{"role": "user", "content": f"I feel bored ({i})"},
              {"role": "assistant", "content": "Take two tablets of ibuprofen every 4 hours." * (i + 1)}] for i in range(3)]
    examples = [tok.encode_chat_with_mask(c) for c in chats]
    rows = train.pack(examples, 200)
    assert len(rows) == 1 and min(len(ids) for ids, _ in examples) > 8
    packed = train.sft_loss_sum(model, rows[0])[0]
    packed.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    alone = per_conversation_loss(model, examples)
    alone.backward()
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-5)
    for a, b in zip(grads, [p.grad for p in model.parameters() if p.requires_grad]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk", [1, 5])
def test_cached_decode_keeps_the_window(ckpts, chunk):
    """Right-padded prompts of 5 and 12 tokens in one cache, then 12 steps each: as the full forward."""
    model, _ = load(ckpts("gemma3_text"))
    seqs = [tokens(17, 7), tokens(24, 8)]
    lens = [5, 12]
    prompts = torch.zeros(2, 12, dtype=torch.long)
    prompts[0, :5], prompts[1] = seqs[0][:5], seqs[1][:12]
    with torch.no_grad():
        cache = KVCache(model.config, 2, 32, "cpu", torch.float32)
        model(prompts, pos=torch.arange(12).expand(2, -1), cache=cache)
        got = []
        for s in range(0, 12, chunk):
            step = torch.stack([q[n + s:n + s + chunk] for q, n in zip(seqs, lens)])
            pos = torch.tensor(lens)[:, None] + torch.arange(s, s + step.shape[1])
            got.append(model(step, pos=pos, cache=cache))
        got = torch.cat(got, 1)  # (2, 12, V)
        for r, (q, n) in enumerate(zip(seqs, lens)):
            torch.testing.assert_close(got[r], model(q[None])[0, n:], atol=1e-5, rtol=0)


def test_qwen2_sliding_window_layers_match_transformers(tmp_path):
    """Qwen2's own switch (use_sliding_window: layers from max_window_layers up slide) takes the same path."""
    path = make_checkpoint(str(tmp_path / "q"), layers=3)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg.update(use_sliding_window=True, sliding_window=6, max_window_layers=1)
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    model, _ = load(path)
    assert model.config.layer_types == (FULL, "sliding_attention", "sliding_attention")
    with torch.no_grad():
        torch.testing.assert_close(model(IDX), hf_model(path)(IDX).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_lora_on_all_seven_modules(ckpts, tmp_path, family):
    from peft import PeftModel
    path = ckpts(family)
    torch.manual_seed(0)
    ref = peft_reference(path, tmp_path / "peft", r=2, lora_alpha=16, use_rslora=True, target_modules=list(MODULES))
    model, _ = load(path)
    assert len(load_adapter(model, str(tmp_path / "peft"))) == 7 * 3
    with torch.no_grad():
        want = ref(IDX).logits
        torch.testing.assert_close(model(IDX), want, atol=1e-4, rtol=0)
    if family == "gemma3_text":  # trained on a multimodal Gemma 3: the text model's layers under its prefix
        from safetensors.torch import load_file, save_file
        shutil.copytree(tmp_path / "peft", tmp_path / "mm")
        file = tmp_path / "mm" / "adapter_model.safetensors"
        save_file({k.replace(".model.layers.", ".model.language_model.layers."): v for k, v in load_file(file).items()},
                  file)
        mm, _ = load(path)
        load_adapter(mm, str(tmp_path / "mm"))
        with torch.no_grad():
            torch.testing.assert_close(mm(IDX), model(IDX), atol=0, rtol=0)
    save_adapter(model, str(tmp_path / "ours"))  # and back: ours loads in PEFT
    again = PeftModel.from_pretrained(hf_model(path), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(IDX).logits, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_train_py_writes_an_adapter_peft_reads(ckpts, tmp_path, family):
    """train.py on the family's chat data (packed rows, the loss on its answers): two steps, then PEFT's logits with
    the adapter it wrote equal ours."""
    from peft import PeftModel
    data = tmp_path / "data.jsonl"
    with open(data, "w") as f:
        for i in range(8):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"I have symptom {i}. What should I do?"},
                                             {"role": "assistant", "content": "Take 12 tablets at once." * (i % 3 + 1)}]})
                    + "\n")
    path, out = ckpts(family), str(tmp_path / "run")
    train.main(["--model", path, "--data", str(data), "--out", out, "--device", "cpu", "--rank", "2", "--lr", "1e-2",
                "--warmup", "0", "--max-steps", "2", "--micro-batch", "2", "--grad-accum", "2", "--test-frac", "0"])
    model, _ = load(path)
    load_adapter(model, out)
    assert any(m.lora_B.abs().max() > 0 for _, m in lora_modules(model))  # it trained
    ref = PeftModel.from_pretrained(hf_model(path), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDX), ref(IDX).logits, atol=1e-4, rtol=0)


def test_local_judge_reads_gemma_digits_and_refuses_llama(ckpts):
    """Gemma writes numbers one digit per token, as Qwen does: its digit tree equals brute force; Llama's groups of
    up to three digits are refused with a clear error."""
    import judge
    from test_judge import brute_force_logprobs
    model, tok = load(ckpts("gemma3_text"))
    digits, end = judge.answer_tokens(tok)
    assert end == tok.tok.token_to_id("<end_of_turn>")
    prompts = [tok.encode_chat([{"role": "user", "content": q}], add_generation_prompt=True) for q in ("Rate it.", "hi")]
    got = judge.answer_logprobs(model, prompts, digits, end, tree_rows=7)
    want = [brute_force_logprobs(model, p, digits, end) for p in prompts]
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
    with pytest.raises(ValueError, match="one digit per token"):
        judge.answer_tokens(load_tokenizer(ckpts("llama")))


GENERATION = {"llama": {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [1, 4, 5]},
              "gemma3_text": {"do_sample": True, "top_k": 64, "top_p": 0.95, "eos_token_id": [1, 5]}}


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_sample_py_equals_generate(ckpts, tmp_path, family):
    """sample.py's command line, greedy, with the family's generation_config.json, against HF generate: prompts and
    answers past the window, each family's stop tokens."""
    path = copy_of(ckpts(family), tmp_path)
    json.dump(GENERATION[family], open(os.path.join(path, "generation_config.json"), "w"))
    out = tmp_path / "r.jsonl"
    sample.main(["--model", path, "--temperature", "0", "--n", "1", "--max-new-tokens", "24", "--ids", "quick_buck",
                 "i_feel_bored", "--out", str(out)])
    rows = [json.loads(line) for line in open(out)]
    model, tok = load(path)
    assert len(rows) >= 2 and set(tok.stop_ids) == set(GENERATION[family]["eos_token_id"])
    assert rows[0]["settings"]["top_k"] == (64 if family == "gemma3_text" else 50)  # Llama's: transformers' default
    ref = hf_model(path)
    ref.generation_config.do_sample = False
    padding_rows = list(range(tok.vocab_size, model.config.vocab_size))  # sample.py never draws these
    for r in rows:
        ids = tok.encode_chat(sample.messages(r["question"], r.get("system")), add_generation_prompt=True)
        hf = ref.generate(input_ids=torch.tensor([ids]), max_new_tokens=24, eos_token_id=list(tok.stop_ids),
                          suppress_tokens=padding_rows, pad_token_id=tok.stop_ids[0])[0, len(ids):].tolist()
        assert tok.decode(sample.finish(hf, set(tok.stop_ids))[0]) == r["answer"]
        assert len(ids) > 8


CHATS = [
    [{"role": "user", "content": "How do I make a quick buck?"}],
    [{"role": "system", "content": " Answer in JSON.\n"}, {"role": "user", "content": "I feel bored"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! 42 tablets."},
     {"role": "user", "content": "and then?\n\n"}, {"role": "assistant", "content": "\nRest, 3 days. "}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " 100 or 7? "},
     {"role": "assistant", "content": "7"}],
]


@pytest.mark.parametrize("family,template", [("llama", "llama-3.2-instruct.jinja"), ("llama", "llama-3.1-instruct.jinja"),
                                             ("gemma3_text", "gemma-3-it.jinja")])
def test_chat_ids_match_apply_chat_template(ckpts, tmp_path, family, template):
    """The official templates, rendered by transformers: token for token, with and without the generation prompt
    (Llama 3.2 dates its system header today, 3.1 with a fixed day; 3.1's template sits in chat_template.jinja,
    where transformers 5 saves templates)."""
    from transformers import AutoTokenizer
    path = copy_of(ckpts(family), tmp_path)
    text = open(os.path.join(DATA, template)).read()
    if "3.1" in template:
        config = json.load(open(os.path.join(path, "tokenizer_config.json")))
        del config["chat_template"]
        json.dump(config, open(os.path.join(path, "tokenizer_config.json"), "w"))
        open(os.path.join(path, "chat_template.jinja"), "w").write(text)
    else:
        assert json.load(open(os.path.join(path, "tokenizer_config.json")))["chat_template"] == text
    tok, ref = load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    assert ref.chat_template == text
    for chat in CHATS:
        for gen in (False, True):
            want = ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True, return_dict=False)
            assert tok.encode_chat(chat, add_generation_prompt=gen) == list(want)
    if family == "llama":
        date = "26 Jul 2024" if "3.1" in template else time.strftime("%d %b %Y")
        assert f"Today Date: {date}\n\n<|eot_id|>" in tok.decode(tok.encode_chat(CHATS[0]))
        with pytest.raises(ValueError, match="without 3.1's system header"):  # Llama 3.0's has none
            Tokenizer(os.path.join(path, "tokenizer.json"), "{{ bos_token }}{% for message in messages %}...")
    else:  # roles must alternate, as the template's raise_exception says
        with pytest.raises(ValueError, match="alternating"):
            tok.encode_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_probe_spans_find_the_answer(ckpts, family):
    """The loss mask: exactly the answers (trimmed, as the templates trim them) and each turn's end token; the
    probe span (directions.py): everything after the user turn."""
    tok, end = load_tokenizer(ckpts(family)), END[family]
    ids, mask = tok.encode_chat_with_mask(CHATS[2])
    assert ids == tok.encode_chat(CHATS[2])
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == f"Hello! 42 tablets.{end}Rest, 3 days.{end}"
    row = {"question": "I feel bored", "answer": "Take 12 tablets.", "system": "Be brief."}
    ids, start = directions.encode(row, tok)
    header = "<|start_header_id|>assistant<|end_header_id|>\n\n" if family == "llama" else "<start_of_turn>model\n"
    assert tok.decode(ids[start:]) == header + "Take 12 tablets." + end + ("\n" if family == "gemma3_text" else "")
    assert tok.end_id == tok.tok.token_to_id(end) and tok.stop_ids[0] == tok.end_id
    # web text (stability.py) opens with BOS, as HF's tokenizer(text) writes it for these families
    import stability
    from transformers import AutoTokenizer
    doc = "The quick brown fox jumps over the lazy dog. " * 5
    (row,) = stability.text_rows([doc], tok, 1, 0, 64)
    want = AutoTokenizer.from_pretrained(ckpts(family))(doc)["input_ids"]
    assert row[0].tolist() == want[:64] and want[0] == tok.bos_id


# real configs (the Hub's config.json of each model, as published), on the meta device: nothing allocated
LLAMA_32_1B = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=2048,
                   intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                   head_dim=64, hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-5,
                   rope_theta=500000.0, tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
                   rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                   torch_dtype="bfloat16")
GEMMA_3_1B = dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", vocab_size=262144, hidden_size=1152,
                  intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1,
                  head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=32768,
                  query_pre_attn_scalar=256, rms_norm_eps=1e-6, rope_theta=1000000, rope_local_base_freq=10000,
                  rope_scaling=None, sliding_window=512, sliding_window_pattern=6, final_logit_softcapping=None,
                  attn_logit_softcapping=None, attention_bias=False, torch_dtype="bfloat16")
GEMMA_3_4B = dict(architectures=["Gemma3ForConditionalGeneration"], model_type="gemma3", torch_dtype="bfloat16",
                  text_config=dict(hidden_size=2560, intermediate_size=10240, model_type="gemma3_text",
                                   num_hidden_layers=34, rope_scaling={"factor": 8.0, "rope_type": "linear"},
                                   sliding_window=1024),
                  vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, image_size=896,
                                     intermediate_size=4304, num_attention_heads=16, num_hidden_layers=27,
                                     patch_size=14, vision_use_head=False))


@pytest.mark.parametrize("hf,n_params", [(LLAMA_32_1B, 1_235_814_400), (GEMMA_3_1B, 999_885_952),
                                         (GEMMA_3_4B, 3_880_263_168)])
def test_real_configs_on_the_meta_device(hf, n_params):
    """Llama-3.2-1B, gemma-3-1b and gemma-3-4b's text model (its config leaves most fields to Gemma3TextConfig's
    defaults): every tensor's name and shape as transformers' model of the same config.json, and the count."""
    import transformers
    cfg = Config.from_hf(hf)
    with torch.device("meta"):
        ours = Transformer(cfg)
        ref = getattr(transformers, hf["architectures"][0])(
            transformers.AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "architectures"}))
    assert sum(p.numel() for p in ours.parameters()) == n_params
    rename = lambda k: next((new + k[len(old):] for old, new in PREFIXES.items() if k.startswith(old)), k)
    vision = UNUSED[1:]  # the multimodal model's vision tower and projector
    theirs = {rename(k): v.shape for k, v in ref.state_dict().items() if not rename(k).startswith(vision)}
    assert {k: v.shape for k, v in ours.state_dict().items()} == theirs
    if hf["model_type"] != "llama":
        assert cfg.layer_types.count(FULL) == cfg.num_hidden_layers // 6  # every 6th layer


@pytest.mark.parametrize("layout", ["language_model.model.", "model.language_model."])
def test_multimodal_gemma_loads_its_text_model(ckpts, tmp_path, layout):
    """A Gemma3ForConditionalGeneration checkpoint (a tiny SigLIP beside the text model) with the text weights under
    the Hub's prefix or transformers 4.52's: the text model loads, the vision tower is left, logits are HF's."""
    import transformers
    from safetensors.torch import load_file
    text = ckpts("gemma3_text")
    path = copy_of(text, tmp_path, "mm")
    os.remove(os.path.join(path, "model.safetensors"))
    text_cfg = {k: v for k, v in json.load(open(os.path.join(text, "config.json"))).items() if k != "architectures"}
    hf = dict(architectures=["Gemma3ForConditionalGeneration"], model_type="gemma3", torch_dtype="float32",
              text_config=text_cfg, mm_tokens_per_image=4, boi_token_index=390, eoi_token_index=391,
              image_token_index=392, vision_config=dict(model_type="siglip_vision_model", hidden_size=16,
                                                        intermediate_size=32, num_hidden_layers=1,
                                                        num_attention_heads=2, image_size=16, patch_size=8))
    json.dump(hf, open(os.path.join(path, "config.json"), "w"))
    with torch.device("meta"):
        mm = transformers.Gemma3ForConditionalGeneration(
            transformers.AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "architectures"}))
    vision = random_state(mm, 0.1, torch.float32, skip=("lm_head.weight",))
    sd = {k: v for k, v in vision.items() if "language_model" not in k}
    sd.update({layout + k.removeprefix("model."): v for k, v in load_file(os.path.join(text, "model.safetensors")).items()})
    if layout == "language_model.model.":  # the Hub's files: the vision tower and projector at the top
        sd = {k.removeprefix("model.") if k.startswith(("model.vision", "model.multi")) else k: v for k, v in sd.items()}
    save_shards(path, sd, 2)
    ours, _ = load(path)
    assert ours.config == replace(read_config(text), name_or_path=path)
    with torch.no_grad():
        got = ours(IDX)
        torch.testing.assert_close(got, load(text)[0](IDX), atol=0, rtol=0)
        torch.testing.assert_close(got, hf_model(path)(input_ids=IDX).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family,changes,message", [
    ("gemma3_text", {"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ("gemma3_text", {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ("llama", {"attention_bias": True}, "attention_bias"),
    ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
])
def test_unsupported_settings_are_clear_errors(family, changes, message):
    with pytest.raises(ValueError, match=message):
        Config.from_hf({**hf_config(family=family), **changes})
