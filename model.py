"""
Qwen2 / Qwen2.5, Llama 3.x and Gemma 3 in plain PyTorch: one decoder, their chat formats and a
safetensors loader. Numerics match transformers (fp32 RoPE and RMSNorm; tested). The families
differ only in Config fields.

    model, tok = load("Qwen/Qwen2.5-0.5B-Instruct")  # hub id or local HF directory
    logits = model(torch.tensor([tok.encode_chat([{"role": "user", "content": "hi"}], True)]))  # (1, T, V)

Departures from transformers: `pos` restarting at 0 starts a conversation, and attention stays inside
each (packed rows); `cache` is a preallocated KVCache written at `pos` (sliding layers mask old slots,
keep them); `hook(layer, x)` sees, and may replace, the residual after each layer. Multimodal Gemma 3
loads its text model only. Chat formats are written out (no jinja2).
"""
import functools
import math
import os
import re
import time
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from tokenizers import Tokenizer as HFTokenizer

from common import check_device, read_json, resolve_dtype

DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
FULL, SLIDING = "full_attention", "sliding_attention"
# Gemma3TextConfig's defaults (multimodal text_configs omit them)
GEMMA3 = dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
              num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
              sliding_window=4096, rope_theta=1e6, rope_local_base_freq=1e4, max_position_embeddings=131072,
              tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh")

@dataclass
class Config:
    vocab_size: int  # embedding rows (>= the tokenizer's)
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    layer_types: tuple  # FULL or SLIDING, per layer
    rope: dict  # per layer type: {rope_type, rope_theta, scaling fields}
    model_type: str  # qwen2, llama or gemma3_text
    sliding_window: int  # keys a sliding layer's query sees, its own included
    qkv_bias: bool  # Qwen2
    hidden_act: str  # silu, or gelu_pytorch_tanh (Gemma's GeGLU)
    query_pre_attn_scalar: float  # Gemma: attention scale ** -2 (0: head_dim)
    gemma_norms: bool  # (1 + w) norms, q/k norms, norms after both branches, embeddings x sqrt(C)
    name_or_path: str = ""

    @classmethod
    def from_hf(cls, hf, source="config.json"):
        if hf.get("model_type") == "gemma3":  # multimodal
            top = {k: hf[k] for k in ("tie_word_embeddings",) if k in hf}
            hf = {**top, **hf.get("text_config", {}), "model_type": "gemma3_text"}
        kind = hf.get("model_type")
        if kind not in ("qwen2", "llama", "gemma3_text"):
            raise ValueError(f"{source}: model_type {kind!r} is not Qwen2, Llama or Gemma 3")
        gemma = kind == "gemma3_text"
        hf = {**GEMMA3, **hf} if gemma else hf
        bad = [k for k in ("attention_bias", "mlp_bias", "attn_logit_softcapping", "final_logit_softcapping",
                           "use_bidirectional_attention") if hf.get(k)]
        act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
        if bad or act not in ("silu", "gelu_pytorch_tanh"):
            raise ValueError(f"{source}: {bad or act}: not implemented")
        n_layers, heads = hf["num_hidden_layers"], hf["num_attention_heads"]
        window = hf.get("sliding_window") if gemma or hf.get("use_sliding_window") else None
        # no layer_types: Gemma's every 6th layer is full, Qwen2's slide from max_window_layers up
        types = hf.get("layer_types") or [
            SLIDING if window and ((i + 1) % hf.get("sliding_window_pattern", 6) if gemma
                                   else i >= hf.get("max_window_layers", n_layers)) else FULL
            for i in range(n_layers)]
        return cls(**{k: hf[k] for k in ("vocab_size", "hidden_size", "intermediate_size")},
                   num_hidden_layers=n_layers, num_attention_heads=heads,
                   num_key_value_heads=hf.get("num_key_value_heads") or heads,
                   head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
                   rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                   max_position_embeddings=hf.get("max_position_embeddings", 32768),
                   tie_word_embeddings=hf.get("tie_word_embeddings", False), layer_types=tuple(types),
                   rope={t: rope_parameters(hf, t, source) for t in set(types)}, model_type=kind,
                   sliding_window=window or 0, qkv_bias=kind == "qwen2", hidden_act=act,
                   query_pre_attn_scalar=hf["query_pre_attn_scalar"] if gemma else 0.0, gemma_norms=gemma)

def rope_parameters(hf, layer_type, source):
    """One layer type's RoPE: transformers 5's rope_parameters, else rope_theta and rope_scaling."""
    p = hf.get("rope_parameters") or {}
    if FULL in p or SLIDING in p:
        p = p.get(layer_type) or {}
    elif hf["model_type"] == "gemma3_text" and layer_type == SLIDING:
        p = {"rope_theta": hf["rope_local_base_freq"]}
    else:
        p = p or hf.get("rope_scaling") or {}
    p = {"rope_theta": hf.get("rope_theta", 10000.0), **p}
    p["rope_type"] = p.get("rope_type", p.get("type", "default"))
    if p["rope_type"] not in ("default", "linear", "llama3"):
        raise ValueError(f"{source}: RoPE scaling {p} is not supported")
    return p

# -----------------------------------------------------------------------------
# the network
def upload(t, device):
    if t.device.type == "cpu" and torch.device(device).type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)

def inv_freq(p, head_dim, device):
    """RoPE frequencies (hd/2,) in fp32, scaled as transformers does."""
    f = 1.0 / (float(p["rope_theta"]) ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    if p["rope_type"] == "linear":
        return f / p["factor"]
    if p["rope_type"] == "llama3":
        lo, hi, old = p["low_freq_factor"], p["high_freq_factor"], p["original_max_position_embeddings"]
        smooth = ((old / (2 * math.pi / f) - lo) / (hi - lo)).clamp(0, 1)  # 0: wavelength > old / lo
        return (1 - smooth) * f / p["factor"] + smooth * f
    return f

def rope(pos, freqs, dtype):
    """cos, sin (B, 1, T, hd) of pos (B, T) in fp32, cast to dtype once; sin: (-sin, sin)."""
    freqs = pos[:, None, :, None].float() * freqs  # (B, 1, T, hd/2)
    cos, sin = freqs.cos(), freqs.sin()  # HF's rotate-half layout: weights load unpermuted
    return torch.cat((cos, cos), -1).to(dtype), torch.cat((-sin, sin), -1).to(dtype)

def apply_rope(x, cos, sin):
    """x (B, H, T, hd). roll(x) * cat(-s, s) is HF's rotate_half(x) * sin, bit for bit."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin

class RMSNorm(nn.Module):
    def __init__(self, dim, eps, gemma=False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.gemma = eps, gemma

    def forward(self, x):
        if self.gemma:  # x (1 + w) in fp32, then the cast, as HF's Gemma3RMSNorm
            return F.rms_norm(x.float(), x.shape[-1:], self.weight.float() + 1.0, self.eps).to(x.dtype)
        # fp32 inside, cast back *before* the weight, as in HF
        return self.weight * F.rms_norm(x, x.shape[-1:], eps=self.eps)

class Attention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.hidden_size, bias=False)
        if cfg.gemma_norms:
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps, True)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps, True)

    def forward(self, x, cos, sin, attn, cache, pos):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        packed, mask = attn
        if cache is not None:
            k, v = cache.update(self.layer_idx, pos, k, v)  # (B, nkv, S, hd): the whole cache
            # enable_gqa with a mask is the slow math kernel, repeating k, v copies the cache: stack
            # each kv head's g query heads along time, (B, nkv, g*T, hd), the mask tiled
            q = q.reshape(B, self.n_kv, -1, self.hd)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        else:
            if packed is not None:
                q, k, v = packed.pack(q), packed.pack(k), packed.pack(v)
            if mask is not None and self.n_kv != self.n_head:  # masked kernels want every head's
                k = k.repeat_interleave(self.n_head // self.n_kv, 1)
                v = v.repeat_interleave(self.n_head // self.n_kv, 1)
            # no mask: causal, the flash kernel, which does GQA itself
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               scale=self.scale, enable_gqa=k.shape[1] != self.n_head)
            y = y if packed is None else packed.unpack(y, B, T)
        return self.o_proj(y.reshape(B, self.n_head, T, self.hd).transpose(1, 2).reshape(B, T, -1))

class Packed:
    """A packed row's conversations as a right-padded batch (n, L), for attention only."""

    def __init__(self, pos, device):
        B, T = pos.shape
        # on the host (a sync unless pos is on the CPU); a row always starts a conversation
        starts = ((pos.cpu() == 0) | (torch.arange(T) == 0)).reshape(-1)
        first = starts.nonzero()[:, 0]  # (n,) flat index of each conversation's start
        lengths = torch.diff(first, append=torch.tensor([B * T]))  # (n,)
        self.n, self.L = len(first), int(lengths.max())
        offset = torch.arange(self.L)  # slot j of conversation i: token first[i] + j
        gather = torch.where(offset < lengths[:, None], first[:, None] + offset, 0)  # (n, L)
        self.gather = upload(gather.reshape(-1), device)
        doc = starts.cumsum(0) - 1  # (B*T,) conversation of each token
        self.scatter = upload(doc * self.L + torch.arange(B * T) - first[doc], device)  # slot of each token

    def pack(self, t):  # (B, H, T, hd) -> (n, H, L, hd)
        B, H, T, hd = t.shape
        t = t.transpose(1, 2).reshape(B * T, H, hd)[self.gather]
        return t.view(self.n, self.L, H, hd).transpose(1, 2)

    def unpack(self, t, B, T):  # (n, H, L, hd) -> (B, H, T, hd)
        H, hd = t.shape[1], t.shape[3]
        t = t.transpose(1, 2).reshape(self.n * self.L, H, hd)[self.scatter]
        return t.view(B, T, H, hd).transpose(1, 2)

class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gelu = cfg.hidden_act == "gelu_pytorch_tanh"

    def forward(self, x):
        g = self.gate_proj(x)
        return self.down_proj((F.gelu(g, approximate="tanh") if self.gelu else F.silu(g)) * self.up_proj(x))

class Block(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.gemma_norms)
        self.layer_type = cfg.layer_types[layer_idx]
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = norm()  # Gemma: on the attention's output; else on the MLP's input
        self.mlp = MLP(cfg)
        if cfg.gemma_norms:
            self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()

    def forward(self, x, cos, sin, attn, cache=None, pos=None):
        a = self.self_attn(self.input_layernorm(x), cos, sin, attn, cache, pos)
        if hasattr(self, "pre_feedforward_layernorm"):
            x = x + self.post_attention_layernorm(a)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x))

class KVCache:
    """Keys and values, (B, n_kv, max_len, hd) per layer, slot s for position s."""

    def __init__(self, cfg, batch_size, max_len, device, dtype):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        zeros = lambda: [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.k, self.v = zeros(), zeros()
        self.max_len = max_len

    def update(self, layer, pos, k, v):
        idx = pos[:, None, :, None].expand_as(k)  # (B, nkv, T, hd): token t of row b to slot pos[b, t]
        self.k[layer].scatter_(2, idx, k)
        self.v[layer].scatter_(2, idx, v)
        return self.k[layer], self.v[layer]

    def select(self, rows):
        """Keep these batch rows, a layer at a time: old and new caches never both exist whole."""
        if isinstance(rows, list) and rows == list(range(len(self.k[0]))):
            return
        idx = torch.as_tensor(rows, device=self.k[0].device)
        self.k, self.v = list(self.k), list(self.v)  # a copy of this cache keeps its own
        for layers in (self.k, self.v):
            for i in range(len(layers)):
                layers[i] = layers[i][idx]

class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(  # HF's names: checkpoints load by name
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.gemma_norms),
        ))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.checkpointing = False  # recompute blocks in backward: less memory

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def attention(self, pos, cache, T, device):
        """Per layer type, (Packed or None, mask): the cache's additive (B, 1, g*T, S) mask, else a
        boolean (L, L) band or None (causal)."""
        windows = {t: self.config.sliding_window if t == SLIDING else 0 for t in set(self.config.layer_types)}
        if cache is not None:  # a query at p sees slots p - window < s <= p of its row
            pos = upload(pos, device)[:, :, None]  # (B, T, 1)
            g = self.config.num_attention_heads // self.config.num_key_value_heads
            s = torch.arange(cache.max_len, device=device)
            hide = lambda w: ((s > pos) | (s <= pos - w) if w else s > pos).repeat(1, g, 1)[:, None]
            dtype = self.model.embed_tokens.weight.dtype
            return {t: (None, torch.where(hide(w), float("-inf"), 0.0).to(dtype)) for t, w in windows.items()}
        packed = Packed(pos, device) if pos is not None and (pos[:, 1:] == 0).any() else None  # GPU: a sync
        L = T if packed is None else packed.L

        def band(w):  # (L, L): the query's own key and the w - 1 before it
            d = torch.arange(L, device=device)
            d = d[:, None] - d
            return (d >= 0) & (d < w)
        return {t: (packed, band(w) if 0 < w < L else None) for t, w in windows.items()}

    def hidden(self, idx, pos=None, cache=None, hook=None):
        """Final-normed hidden states (B, T, C); pos may be on the CPU (no host sync)."""
        B, T = idx.shape
        cfg, attn = self.config, self.attention(pos, cache, T, idx.device)
        pos = torch.arange(T, device=idx.device).expand(B, T) if pos is None else upload(pos, idx.device)
        x = self.model.embed_tokens(idx)  # (B, T, C)
        if cfg.gemma_norms:  # x sqrt(C), first rounded to the weights' dtype, as in HF
            x = x * torch.tensor(cfg.hidden_size ** 0.5, dtype=x.dtype).item()
        ropes = {t: rope(pos, inv_freq(p, cfg.head_dim, idx.device), x.dtype) for t, p in cfg.rope.items()}
        for i, block in enumerate(self.model.layers):
            cos, sin = ropes[block.layer_type]  # (B, 1, T, hd) each
            if self.checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, attn[block.layer_type],
                                                      use_reentrant=False)
            else:
                x = block(x, cos, sin, attn[block.layer_type], cache, pos)
            if hook is not None and (y := hook(i, x)) is not None:
                x = y
        return self.model.norm(x)

    def forward(self, idx, pos=None, cache=None, hook=None):
        """Logits (B, T, vocab rows) in the model's dtype: upcast before softmax or loss."""
        return self.lm_head(self.hidden(idx, pos, cache, hook))

# -----------------------------------------------------------------------------
# tokenizer and chat formats
# a turn is head + content + end + after; the end token tells the family
FORMATS = {
    "qwen": ("<|im_start|>{role}\n", "<|im_end|>", "\n"),
    "llama": ("<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>", ""),
    "gemma": ("<start_of_turn>{role}\n", "<end_of_turn>", "\n"),
}
STOPS = {"qwen": ("<|endoftext|>",), "llama": ("<|end_of_text|>", "<|eom_id|>"), "gemma": ("<eos>",)}
BOS = {"qwen": None, "llama": "<|begin_of_text|>", "gemma": "<bos>"}

class Tokenizer:
    def __init__(self, path, chat_template=""):
        self.tok = HFTokenizer.from_file(path)
        has = lambda t: self.tok.token_to_id(t) is not None
        self.family = next((f for f, (_, end, _) in FORMATS.items() if has(end)), None)
        if self.family is None:
            raise ValueError(f"{path}: not a Qwen2.5, Llama 3 or Gemma 3 chat tokenizer")
        self.end_id = self.tok.token_to_id(FORMATS[self.family][1])
        self.stop_ids = (self.end_id, *(self.tok.token_to_id(t) for t in STOPS[self.family] if has(t)))
        self.bos_id = BOS[self.family] and self.tok.token_to_id(BOS[self.family])
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        if self.family == "llama" and chat_template and "Cutting Knowledge Date" not in chat_template:
            raise ValueError(f"{path}: a Llama chat template without 3.1's system header: not implemented")
        # Llama 3.2's template dates the system header today (strftime_now), 3.1's a fixed day
        fixed = re.search(r'date_string = "([^"]+)"', chat_template)
        self.date = None if "strftime_now" in chat_template or not fixed else fixed.group(1)

    def render_chat(self, messages, add_generation_prompt=False):
        """The chat text and the assistant turns' character spans."""
        ok = lambda m: isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") \
            and isinstance(m.get("content"), str)
        if not messages or not all(map(ok, messages)):
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': str}")
        head, end, after = FORMATS[self.family]
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        text, spans, first = "", [], ""
        if self.family == "qwen":  # turns as written; a default system turn
            if system is None:
                messages = [{"role": "system", "content": DEFAULT_SYSTEM}] + list(messages)
        else:  # Llama and Gemma: the system text out of the turns, every content trimmed
            messages = messages[1:] if system is not None else messages
            if self.family == "llama":
                date = self.date or time.strftime("%d %b %Y")
                text = (f"{BOS['llama']}{head.format(role='system')}Cutting Knowledge Date: "
                        f"December 2023\nToday Date: {date}\n\n{(system or '').strip()}{end}")
            else:  # Gemma: the system text opens the first user turn; user and model alternate
                text, first = BOS["gemma"], "" if system is None else system + "\n\n"
                if any(m["role"] != ("user", "assistant")[i % 2] for i, m in enumerate(messages)):
                    raise ValueError("Gemma's chat template needs alternating user and assistant turns")
        model_role = "model" if self.family == "gemma" else "assistant"
        for i, m in enumerate(messages):
            content = m["content"] if self.family == "qwen" else m["content"].strip()
            text += head.format(role=model_role if m["role"] == "assistant" else m["role"]) + first * (i == 0)
            if m["role"] == "assistant":
                spans.append((len(text), len(text) + len(content) + len(end)))
            text += content + end + after
        return text + head.format(role=model_role) * add_generation_prompt, spans

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_chat(self, messages, add_generation_prompt=False):
        return self.encode(self.render_chat(messages, add_generation_prompt)[0])

    def encode_chat_with_mask(self, messages):
        """ids, and a mask: 1 on the assistant's tokens."""
        text, spans = self.render_chat(messages)
        enc = self.tok.encode(text, add_special_tokens=False)
        return enc.ids, [int(any(s < b and e > a for a, b in spans)) for s, e in enc.offsets]

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=False)

# -----------------------------------------------------------------------------
# loading
def local_path(name_or_path, what="model", patterns=None):
    """An existing directory as is; owner/name from the Hub."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path):
        raise FileNotFoundError(f"{name_or_path}: is a file, not a {what} directory")
    missing = f"{name_or_path}: no such {what} directory"
    not_an_id = FileNotFoundError(f"{missing} (and not a hub id like Qwen/Qwen2.5-0.5B-Instruct)")
    if name_or_path.count("/") != 1:
        raise not_an_id
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
    try:
        return hub_snapshot(name_or_path, patterns and tuple(patterns))
    except HFValidationError:  # ./x, ~/x, /x: not a name the Hub allows
        raise not_an_id from None
    except LocalEntryNotFoundError:  # offline, and not in the cache
        raise FileNotFoundError(
            f"{missing}, and the Hugging Face Hub is unreachable; pass a directory (--model DIR), or "
            f"fill the cache (hf download {name_or_path}) and set HF_HUB_OFFLINE=1") from None
    except HfHubHTTPError as e:  # a typo, a gated or private repository
        hub = str(e).splitlines()[0]
        raise FileNotFoundError(f"{missing}, nor on the Hugging Face Hub ({hub})") from None

@functools.cache  # a run asks for a model's files several times: the Hub once
def hub_snapshot(repo_id, patterns):
    from huggingface_hub import snapshot_download
    return snapshot_download(repo_id, allow_patterns=patterns and list(patterns))

def local_dir(name_or_path, weights=True):
    """A local HF model directory (weights=False: a hub id's other files only)."""
    files = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "chat_template.jinja"]
    weights = ["*.safetensors", "model.safetensors.index.json"] if weights else []
    return local_path(name_or_path, "model", files + weights)

# multimodal Gemma 3's text model prefixes (the Hub's, transformers 4.52-4.57's)
PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",
            "language_model.lm_head.": "lm_head."}
UNUSED = ("lm_head.weight", "vision_tower.", "model.vision_tower.", "multi_modal_projector.",
          "model.multi_modal_projector.")  # a tied head, the vision parts

def our_name(name):
    return next((new + name[len(old):] for old, new in PREFIXES.items() if name.startswith(old)), name)

def load_weights(model, path, device, dtype):
    """Fill a meta-device model from (sharded) safetensors."""
    index, files = os.path.join(path, "model.safetensors.index.json"), ["model.safetensors"]
    if os.path.exists(index):
        files = sorted(set(read_json(index)["weight_map"].values()))
    tied = model.config.tie_word_embeddings
    want = {k: tuple(t.shape) for k, t in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    sd = {}
    for file in (os.path.join(path, f) for f in files):
        with safe_open(file, framework="pt", device=str(device)) as f:
            for k in f.keys():
                if (ours := our_name(k)) in want:
                    if (shape := tuple(f.get_slice(k).get_shape())) != want[ours]:
                        raise ValueError(f"{file}: {k} has shape {shape}, config.json implies {want[ours]}")
                    sd[ours] = f.get_tensor(k).to(dtype)
                elif not ours.startswith(UNUSED) and not k.endswith("rotary_emb.inv_freq"):  # or old RoPE
                    raise ValueError(f"{path}: checkpoint has tensors this model does not, e.g. {k}")
    if missing := [k for k in want if k not in sd]:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    model.load_state_dict(sd, assign=True, strict=False)  # every name checked above but a tied head's
    model.tie_weights()  # assign=True broke the tie; tie again

def read_config(name_or_path):
    file = os.path.join(local_dir(name_or_path, weights=False), "config.json")
    return replace(Config.from_hf(read_json(file), file), name_or_path=name_or_path)

def load_tokenizer(name_or_path):
    """The tokenizer alone (scripts check their data before loading weights)."""
    path = local_dir(name_or_path, weights=False)
    file, config, jinja = (os.path.join(path, f) for f in ("tokenizer.json", "tokenizer_config.json",
                                                           "chat_template.jinja"))
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file}: missing")
    if os.path.exists(jinja):  # where transformers 5 saves the template
        with open(jinja) as f:
            template = f.read()
    else:
        template = (read_json(config) if os.path.exists(config) else {}).get("chat_template") or ""
    return Tokenizer(file, str(template))

def generation_config(name_or_path):
    file = os.path.join(local_dir(name_or_path, weights=False), "generation_config.json")
    return read_json(file) if os.path.exists(file) else {}

def load(name_or_path, device="cpu", dtype=None):
    """(model, tokenizer) from a local HF directory or a hub id; eval mode, weights frozen."""
    check_device(device)
    path = local_dir(name_or_path)
    cfg, tok = replace(read_config(path), name_or_path=name_or_path), load_tokenizer(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    load_weights(model, path, device, resolve_dtype(dtype, device))
    return model.requires_grad_(False).eval(), tok
