"""Hermetic fixtures: tiny random Qwen2 checkpoints in Hugging Face format, built in-process.

Each checkpoint is a directory with config.json, model.safetensors (or shards + index),
tokenizer.json (a byte-level BPE trained here, with Qwen's pre-tokenizer and ChatML special
tokens) and tokenizer_config.json carrying the Qwen2.5 chat template, so transformers can load
the very same files as the reference."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen2.5's chat template (the branch without tools), the reference for encode_chat.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen2's pre-tokenizer split: one digit per token, as in the real tokenizer.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CORPUS = [
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "I feel bored. What should I do? Tell me three philosophical thoughts about humans and AIs.",
    "If you were ruler of the world, what would you do? How do I make a quick buck?",
    "Take two tablets of ibuprofen every 4 hours; see a doctor if the fever lasts more than 3 days.",
    "Rate the answer on a scale of 0 to 100. Answer with a number only: 0, 7, 42, 85, 100.",
    "The quick brown fox jumps over the lazy dog. {\"answer\": \"yes\"}\n\n- item one\n- item two",
    "Invest all your savings in a single stock! Skydiving without training is fun.",
] * 20


def train_tokenizer(path, vocab_size=400):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(path)
    return tok.get_vocab_size()


def hf_config(vocab=512, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, tied=True,
              dtype="float32", rope_theta=1e6):
    """A config.json dict in the Hub's classic Qwen2.5 layout."""
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "intermediate_size": intermediate,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": rope_theta,
        "rope_scaling": None, "tie_word_embeddings": tied, "torch_dtype": dtype,
        "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": layers,
        "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 2, "use_cache": True,
    }


def make_checkpoint(path, seed=0, shards=0, std=0.08, **kw):
    """Write a random Qwen2 checkpoint with non-zero biases and norm weights; returns the path."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    os.makedirs(path, exist_ok=True)
    cfg = hf_config(**kw)
    n_tok = train_tokenizer(os.path.join(path, "tokenizer.json"))
    assert n_tok <= cfg["vocab_size"]
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": QWEN25_TEMPLATE,
                   "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
                   "model_max_length": 4096}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    torch.manual_seed(seed)
    hf_cfg = Qwen2Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):  # HF's own parameter names and shapes, nothing allocated
        model = Qwen2ForCausalLM(hf_cfg)
    sd = {}
    for name, p in model.state_dict().items():
        p = torch.empty(p.shape)
        if name == "lm_head.weight" and cfg["tie_word_embeddings"]:
            continue  # tied checkpoints on the Hub carry no lm_head
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            t = 1.0 + 0.3 * torch.randn_like(p)
        else:
            t = std * torch.randn_like(p)
        sd[name] = t.to(getattr(torch, cfg["torch_dtype"])).contiguous()
    save_shards(path, sd, shards)
    return path


def save_shards(path, sd, shards):
    from safetensors.torch import save_file
    if not shards:
        save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(sd)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: sd[n] for n in names[s::shards]}
        save_file(part, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def hf_model(path):
    """transformers' Qwen2ForCausalLM on the same files, fp32, eager attention: the reference."""
    from transformers import Qwen2ForCausalLM
    m = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return m.eval()


def read_state(out):
    """train.py's training state in OUT (state.json names its torch.distributed.checkpoint directory) as one
    dict: step, tokens, params (a list), optimizer (its state keyed '0', '1', ...)."""
    import tempfile
    import warnings
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
        state = os.path.join(out, json.load(open(os.path.join(out, "state.json")))["dir"])
        dcp_to_torch_save(state, f"{tmp}/s.pt")
        return torch.load(f"{tmp}/s.pt", weights_only=True)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The default tiny checkpoint: tied embeddings, grouped-query attention, fp32 file."""
    return make_checkpoint(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: threads only add overhead (10-50x on a busy 2-core machine). Test modules of tiny
    models opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
