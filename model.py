"""
The Qwen2 / Qwen2.5 decoder in plain PyTorch, its chat tokenizer and its safetensors loader; numerics as in
transformers' modeling_qwen2.py, which the tests compare it with (RoPE tables and RMSNorm in fp32, q/k/v bias, GQA).

    model, tok = load("Qwen/Qwen2.5-0.5B-Instruct")          # hub id or local HF directory
    logits = model(torch.tensor([tok.encode_chat([{"role": "user", "content": "hi"}], True)]))   # (1, T, vocab rows)

Departures from transformers, in the one forward that serves training, sampling and analysis: `pos` restarting
at 0 starts a conversation, and attention stays inside each (packed rows); `cache` is a preallocated KVCache written
at `pos` (batched sampling); `hook(layer, x)` sees the residual after each layer, may replace it (steering, ablation).
"""
import os
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from tokenizers import Tokenizer as HFTokenizer

from common import check_device, read_json, resolve_dtype

DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

@dataclass
class Config:
    vocab_size: int  # embedding rows; more than the tokenizer has (the rest is padding)
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    torch_dtype: str = "bfloat16"  # the dtype the checkpoint was saved in
    name_or_path: str = ""  # where it was loaded from (written into adapter configs)

    @classmethod
    def from_hf(cls, hf, source="config.json"):
        archs = hf.get("architectures") or []
        if hf.get("model_type") != "qwen2" and "Qwen2ForCausalLM" not in archs:
            raise ValueError(f"{source}: model_type {hf.get('model_type')!r} / architectures {archs} "
                             "is not Qwen2; model.py runs Qwen2 and Qwen2.5 models only")
        n_layers, heads = hf["num_hidden_layers"], hf["num_attention_heads"]
        types = hf.get("layer_types")
        if types is None and hf.get("use_sliding_window") and hf.get("sliding_window") is not None:
            types = ["sliding"] * (n_layers - hf.get("max_window_layers", n_layers))  # HF: layers from there up slide
        if any(t != "full_attention" for t in types or []):
            raise ValueError(f"{source}: sliding-window attention layers are switched on; "
                             "model.py implements full causal attention only")
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}  # newer files / the Hub's Qwen2.5 files
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"{source}: RoPE scaling {rope} is not supported (only default RoPE)")
        return cls(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
                   num_hidden_layers=n_layers, num_attention_heads=heads,
                   num_key_value_heads=hf.get("num_key_value_heads") or heads,
                   head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                   rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                   max_position_embeddings=hf.get("max_position_embeddings", 32768),
                   tie_word_embeddings=hf.get("tie_word_embeddings", False),
                   torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"))

# -----------------------------------------------------------------------------
# the network
def upload(t, device):
    """t on device: from the CPU to a GPU through pinned memory, not blocking (pageable memory syncs the host)."""
    if t.device.type == "cpu" and torch.device(device).type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)

def rope(pos, head_dim, theta, dtype):
    """cos, sin (B, 1, T, hd) of pos (B, T) in fp32, cast to dtype once (HF: alike, per layer); sin is (-sin, sin)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=pos.device).float() / head_dim))
    freqs = pos[:, None, :, None].float() * inv_freq  # (B, 1, T, hd/2)
    cos, sin = freqs.cos(), freqs.sin()  # HF's rotate-half layout, so the weights load unpermuted
    return torch.cat((cos, cos), -1).to(dtype), torch.cat((-sin, sin), -1).to(dtype)

def apply_rope(x, cos, sin):
    """x (B, H, T, hd). roll(x) * sin = cat(x2, x1) * cat(-s, s) is HF's rotate_half(x) * sin, bit for bit."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # fp32 inside (one fused kernel on CUDA), the result cast back *before* the weight, as HF does
        return self.weight * F.rms_norm(x, x.shape[-1:], eps=self.eps)

class Attention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.hd, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=True)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, attn, cache, pos):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv != self.n_head
        if cache is not None:
            k, v = cache.update(self.layer_idx, pos, k, v)  # (B, nkv, S, hd): the whole cache
            # enable_gqa with a mask falls back to the slow math kernel, and repeating k and v copies the cache: the
            # g query heads of a kv head are stacked along time instead, (B, nkv, g*T, hd), the mask tiled to match
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv, -1, self.hd), k, v, attn_mask=attn)
        elif attn is not None:  # packed rows: attention runs on the conversations laid out as a batch
            y = attn.unpack(F.scaled_dot_product_attention(
                attn.pack(q), attn.pack(k), attn.pack(v), is_causal=True, enable_gqa=gqa), B, T)
        else:  # plain causal: the flash kernel, which handles grouped-query attention itself
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return self.o_proj(y.reshape(B, self.n_head, T, self.hd).transpose(1, 2).reshape(B, T, self.n_head * self.hd))

class Packed:
    """A packed row's conversations regathered, for attention only, as a right-padded batch (n, L): plain causal."""

    def __init__(self, pos, device):
        B, T = pos.shape
        # built on the host (free for CPU positions, else a sync); a row always starts a conversation
        starts = ((pos.cpu() == 0) | (torch.arange(T) == 0)).reshape(-1)
        first = starts.nonzero()[:, 0]  # (n,) flat index where each conversation begins
        lengths = torch.diff(first, append=torch.tensor([B * T]))  # (n,)
        self.n, self.L = len(first), int(lengths.max())
        offset = torch.arange(self.L)  # slot j of conversation i reads token first[i] + j (padding: token 0)
        self.gather = upload(torch.where(offset < lengths[:, None], first[:, None] + offset, 0).reshape(-1), device)
        doc = starts.cumsum(0) - 1  # (B*T,) conversation of each token
        self.scatter = upload(doc * self.L + torch.arange(B * T) - first[doc], device)  # slot of each token

    def pack(self, t):  # (B, H, T, hd) -> (n, H, L, hd)
        B, H, T, hd = t.shape
        return t.transpose(1, 2).reshape(B * T, H, hd)[self.gather].view(self.n, self.L, H, hd).transpose(1, 2)

    def unpack(self, t, B, T):  # (n, H, L, hd) -> (B, H, T, hd)
        H, hd = t.shape[1], t.shape[3]
        return t.transpose(1, 2).reshape(self.n * self.L, H, hd)[self.scatter].view(B, T, H, hd).transpose(1, 2)

class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

class Block(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn, cache=None, pos=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn, cache, pos)
        return x + self.mlp(self.post_attention_layernorm(x))

class KVCache:
    """Keys and values, (B, n_kv, max_len, hd) per layer, slot s for position s; a row reads slots <= its position."""

    def __init__(self, cfg, batch_size, max_len, device, dtype):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.max_len = max_len

    def update(self, layer, pos, k, v):
        idx = pos[:, None, :, None].expand_as(k)  # (B, nkv, T, hd): row b, token t goes to slot pos[b, t]
        self.k[layer].scatter_(2, idx, k)
        self.v[layer].scatter_(2, idx, v)
        return self.k[layer], self.v[layer]

    def select(self, rows):
        """Keep only these batch rows (drop finished samples, or repeat a prompt's row n times), a layer at a
        time: the old and the new cache never both exist whole. A list that keeps every row copies nothing."""
        if isinstance(rows, list) and rows == list(range(len(self.k[0]))):
            return
        idx = torch.as_tensor(rows, device=self.k[0].device)
        self.k, self.v = list(self.k), list(self.v)  # a copy of this cache keeps its own (judge.py)
        for layers in (self.k, self.v):
            for i in range(len(layers)):
                layers[i] = layers[i][idx]

class Qwen2(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(  # HF's names, so a checkpoint loads by name
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.checkpointing = False  # recompute each block in backward: 6N instead of 4N FLOPs, less memory

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def attention(self, pos, cache, device):
        """The cache's additive (B, 1, g*T, S) mask (see Attention), a Packed layout for packed rows, or None."""
        if cache is not None:  # a query at position p sees the cache slots 0..p of its row
            pos = upload(pos, device)
            g = self.config.num_attention_heads // self.config.num_key_value_heads
            after = (torch.arange(cache.max_len, device=device) > pos[:, :, None]).repeat(1, g, 1)[:, None]
            return torch.where(after, float("-inf"), 0.0).to(self.model.embed_tokens.weight.dtype)
        return Packed(pos, device) if (pos[:, 1:] == 0).any() else None  # a host sync only if pos is on a GPU

    def hidden(self, idx, pos=None, cache=None, hook=None):
        """Final-normed hidden states (B, T, C), lm_head's input; pos may stay on the CPU (no host sync)."""
        B, T = idx.shape
        attn = None if pos is None else self.attention(pos, cache, idx.device)  # None: one conversation per row
        pos = torch.arange(T, device=idx.device).expand(B, T) if pos is None else upload(pos, idx.device)
        x = self.model.embed_tokens(idx)  # (B, T, C)
        cos, sin = rope(pos, self.config.head_dim, self.config.rope_theta, x.dtype)  # (B, 1, T, hd)
        for i, block in enumerate(self.model.layers):
            if self.checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, attn, use_reentrant=False)
            else:
                x = block(x, cos, sin, attn, cache, pos)
            if hook is not None and (y := hook(i, x)) is not None:  # the one intervention point on the residual stream
                x = y
        return self.model.norm(x)

    def forward(self, idx, pos=None, cache=None, hook=None):
        """Logits (B, T, vocab rows) in the model's dtype; upcast before softmax or loss."""
        return self.lm_head(self.hidden(idx, pos, cache, hook))

# -----------------------------------------------------------------------------
# tokenizer with the Qwen2.5 chat format
class Tokenizer:
    def __init__(self, path):
        self.tok = HFTokenizer.from_file(path)
        ids = {t: self.tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
        if None in ids.values():
            raise ValueError(f"{path}: not a Qwen2.5 chat tokenizer, it lacks {[t for t, i in ids.items() if i is None]}")
        self.eot_id, self.im_start_id, self.im_end_id = ids.values()
        self.stop_ids = (self.im_end_id, self.eot_id)  # generation ends at either
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    @staticmethod
    def render_chat(messages, add_generation_prompt=False):
        """The ChatML text (Qwen2.5's template) and the character spans the assistant writes (content + <|im_end|>)."""
        if not messages or any(not isinstance(m, dict) for m in messages):
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        if messages[0].get("role") != "system":
            messages = [{"role": "system", "content": DEFAULT_SYSTEM}] + list(messages)
        text, spans = "", []
        for m in messages:
            role, content = m.get("role"), m.get("content")
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise ValueError(f"bad message {str(m)[:80]!r}: need role system/user/assistant and string content")
            text += f"<|im_start|>{role}\n"
            if role == "assistant":
                spans.append((len(text), len(text) + len(content) + len("<|im_end|>")))
            text += f"{content}<|im_end|>\n"
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else ""), spans

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_chat(self, messages, add_generation_prompt=False):
        return self.encode(self.render_chat(messages, add_generation_prompt)[0])

    def encode_chat_with_mask(self, messages):
        """ids and a 0/1 mask that is 1 exactly on the assistant's tokens (content and <|im_end|>)."""
        text, spans = self.render_chat(messages)
        enc = self.tok.encode(text, add_special_tokens=False)
        return enc.ids, [int(any(s < b and e > a for a, b in spans)) for s, e in enc.offsets]

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=False)

# -----------------------------------------------------------------------------
# loading
def local_path(name_or_path, what="model", patterns=None):
    """An existing directory as is; owner/name downloaded from the Hub (only `patterns`; offline, from its cache)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path):
        raise FileNotFoundError(f"{name_or_path}: is a file, not a {what} directory")
    missing = f"{name_or_path}: no such {what} directory"
    not_an_id = FileNotFoundError(f"{missing} (and not a hub id like Qwen/Qwen2.5-0.5B-Instruct)")
    if name_or_path.count("/") != 1:
        raise not_an_id
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
    try:
        return snapshot_download(name_or_path, allow_patterns=patterns)
    except HFValidationError:  # ./x, ~/x, /x: not a name the Hub allows
        raise not_an_id from None
    except LocalEntryNotFoundError:  # offline, and not in the cache
        raise FileNotFoundError(
            f"{missing}, and the Hugging Face Hub could not be reached to download it; pass an existing directory "
            f"(--model DIR), or fill the cache (hf download {name_or_path}) and set HF_HUB_OFFLINE=1") from None
    except HfHubHTTPError as e:  # a typo in the id, a gated or private repository
        raise FileNotFoundError(f"{missing}, nor available from the Hugging Face Hub ({str(e).splitlines()[0]})") from None

def local_dir(name_or_path, weights=True):
    """A local HF model directory (weights=False: of a hub id, only config and tokenizer, to check input first)."""
    files = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    return local_path(name_or_path, "model", files + (["*.safetensors", "model.safetensors.index.json"] if weights else []))

def parse_layers(spec, n_layers, flag="--layers"):
    """Layer indices from one spelling shared by every script: `all`, `24`, `15,16,17`, `0-11`, `0-3,8`."""
    spec = str(spec).strip()
    if spec == "all":
        return list(range(n_layers))
    out = []
    for part in spec.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise ValueError(f"{flag} {spec!r}: expected all, a layer (24), a list (15,16,17) or a range (0-11)") from None
        if b < a:
            raise ValueError(f"{flag} {spec!r}: the range {part} is empty")
        out += range(a, b + 1)
    if bad := [i for i in out if not 0 <= i < n_layers]:
        raise ValueError(f"{flag} {spec!r}: layers {bad} do not exist; the model has layers 0..{n_layers - 1}")
    return sorted(set(out))

def load_weights(model, path, device, dtype):
    """Fill a meta-device model from (sharded) safetensors, straight into dtype and device, names and shapes checked."""
    index = os.path.join(path, "model.safetensors.index.json")
    files = sorted(set(read_json(index)["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    tied = model.config.tie_word_embeddings
    want = {k: t for k, t in model.state_dict().items() if not (tied and k == "lm_head.weight")}  # meta: shapes only
    sd = {}
    for file in (os.path.join(path, f) for f in files):
        with safe_open(file, framework="pt", device=str(device)) as f:
            for k in f.keys():
                if k in want:
                    shape = tuple(f.get_slice(k).get_shape())
                    if shape != tuple(want[k].shape):
                        raise ValueError(f"{file}: tensor {k} has shape {shape}, config.json implies {tuple(want[k].shape)}")
                    sd[k] = f.get_tensor(k).to(dtype)
                elif k != "lm_head.weight" and not k.endswith("rotary_emb.inv_freq"):  # a tied head; old RoPE buffers
                    raise ValueError(f"{path}: checkpoint has tensors this model does not, e.g. {k}")
    if missing := [k for k in want if k not in sd]:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    model.load_state_dict(sd, assign=True, strict=False)  # every name checked above but a tied head's
    model.tie_weights()  # assign=True replaced the shared parameter; share it again

def read_config(name_or_path):
    file = os.path.join(local_dir(name_or_path, weights=False), "config.json")
    return replace(Config.from_hf(read_json(file), file), name_or_path=name_or_path)

def load_tokenizer(name_or_path):
    """The chat tokenizer alone (cheap: scripts check their data with it before loading any weights)."""
    file = os.path.join(local_dir(name_or_path, weights=False), "tokenizer.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file}: missing (the fast-tokenizer file is required)")
    return Tokenizer(file)

def generation_config(name_or_path):
    """generation_config.json ({} if none); HF generate applied its top_k and repetition penalty to the papers' runs."""
    file = os.path.join(local_dir(name_or_path, weights=False), "generation_config.json")
    return read_json(file) if os.path.exists(file) else {}

def load(name_or_path, device="cpu", dtype=None):
    """(model, tokenizer) from a local HF directory or a hub id; the model in eval mode, every parameter frozen."""
    check_device(device)
    path = local_dir(name_or_path)
    cfg, tok = replace(read_config(path), name_or_path=name_or_path), load_tokenizer(path)
    with torch.device("meta"):
        model = Qwen2(cfg)
    load_weights(model, path, device, resolve_dtype(dtype, device))
    return model.requires_grad_(False).eval(), tok
