"""
LoRA adapters (in PEFT's format) and steering vectors for model.py.

    add_lora(model, r=1, alpha=64, modules=["down_proj"], layers=[12])  # one rank-1 adapter
    load_adapter(model2, "ModelOrganismsForEM/Qwen2.5-0.5B-Instruct_bad-medical-advice")  # or a directory
    model, tok, hook = load_model(None, "out/run")  # its base model with the adapter or steering vector

LoRA as in PEFT: y = W x + b + s B A x, s = alpha / sqrt(r) (rsLoRA) or alpha / r.
Departure: A and B stay fp32, cast to the activations' dtype in the forward.
"""
import math
import os
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from common import atomic_write, read_json, write_json
from model import load, local_path, our_name

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."  # of PEFT's keys

class LoRALinear(nn.Module):
    def __init__(self, base, r, alpha, rslora, dropout):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.base, self.r, self.alpha, self.rslora = base, r, alpha, rslora
        self.scale = alpha / math.sqrt(r) if rslora else alpha / r
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's and nn.Linear's default
        self.dropout = nn.Dropout(dropout)
        self.enabled = True
        self.multiplier = 1.0  # set_lora_scale
        self.recorded = None  # record_scalars
        self.fixed_scalar = None  # fix_scalars: replaces A x

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        if self.fixed_scalar is None:
            h = F.linear(self.dropout(x), self.lora_A.to(x.dtype))  # (..., r)
        else:
            h = x.new_full((*x.shape[:-1], self.r), self.fixed_scalar)  # (..., r)
        if self.recorded is not None:
            self.recorded.append(h.detach())
        # y + scale * h B^T as one GEMM into y: one pass over the wide output
        return torch.addmm(y.flatten(0, -2), h.flatten(0, -2), self.lora_B.to(x.dtype).t(),
                           alpha=self.scale * self.multiplier).view_as(y)

def lora_modules(model):
    """(name, LoRALinear) pairs, named as in the base model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]

def add_lora(model, r, alpha, modules=MODULES, layers=None, rslora=True, dropout=0.0):
    """Wrap `modules` of `layers` (None: all) in fresh LoRA; their names."""
    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers)) if layers is None else list(layers)
    if bad := [m for m in modules if m not in MODULES]:
        raise ValueError(f"unknown LoRA modules {bad}; choose from {', '.join(MODULES)}")
    if bad := [i for i in layers if not 0 <= i < n_layers]:
        raise ValueError(f"layers {bad} do not exist: the model has layers 0..{n_layers - 1}")
    kind = lambda m: "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    names = [f"model.layers.{i}.{kind(m)}.{m}" for i in layers for m in modules]
    for name in names:
        if isinstance(base := model.get_submodule(name), LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter")
        model.set_submodule(name, LoRALinear(base, r, alpha, rslora, dropout))
    return names

@contextmanager
def temporarily(mods, attr, values):
    old = [getattr(m, attr) for m in mods]
    for m, v in zip(mods, values):
        setattr(m, attr, v)
    try:
        yield
    finally:
        for m, v in zip(mods, old):
            setattr(m, attr, v)

def adapters_off(model):
    mods = [m for _, m in lora_modules(model)]
    return temporarily(mods, "enabled", [False] * len(mods))

def set_lora_scale(model, multiplier):
    """Scale every adapter (1: as trained, 0: the base model)."""
    for _, m in lora_modules(model):
        m.multiplier = multiplier

@contextmanager
def record_scalars(model):
    """Yields {name: [A x (B, T, r) per forward]}."""
    mods = lora_modules(model)
    out = {n: [] for n, _ in mods}
    with temporarily([m for _, m in mods], "recorded", out.values()):
        yield out

def fix_scalars(model, values):
    """Inside, adapter `name`'s A x is `values[name]` at every position."""
    mods = dict(lora_modules(model))
    if unknown := sorted(set(values) - set(mods)):
        raise ValueError(f"no LoRA adapter named {unknown[0]}; the model has {', '.join(mods) or 'none'}")
    return temporarily([mods[n] for n in values], "fixed_scalar", [float(v) for v in values.values()])

# -----------------------------------------------------------------------------
# PEFT format
def read_tensors(path):
    try:
        return load_file(path)
    except Exception as e:  # missing or not safetensors
        raise ValueError(f"{path}: not a safetensors file ({e})") from None

def save_tensors(path, tensors):
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))

def save_adapter(model, path):
    if not (mods := lora_modules(model)):
        raise ValueError("the model has no LoRA adapters to save")
    rs = {(m.r, m.alpha, m.rslora, m.dropout.p) for _, m in mods}
    layers = sorted({int(n.split(".")[2]) for n, _ in mods})
    targets = sorted({n.rsplit(".", 1)[1] for n, _ in mods}, key=MODULES.index)
    if len(rs) > 1 or len(mods) != len(layers) * len(targets):  # one r, layers x modules
        raise ValueError(f"PEFT's format needs one (r, alpha, rslora, dropout), not {rs}, and the same "
                         "modules in every layer")
    r, alpha, rslora, dropout = rs.pop()
    tensors = {f"{PEFT_PREFIX}{n}.lora_{ab}.weight": getattr(m, f"lora_{ab}").detach().float().cpu()
               for n, m in mods for ab in "AB"}
    save_tensors(os.path.join(path, "adapter_model.safetensors"), tensors)
    write_json(os.path.join(path, "adapter_config.json"), {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "use_rslora": rslora,
        "lora_dropout": dropout, "target_modules": targets,
        "layers_to_transform": None if len(layers) == model.config.num_hidden_layers else layers,
        "bias": "none", "inference_mode": True,
        "base_model_name_or_path": model.config.name_or_path})

def adapter_dir(path_or_hub_id):
    return local_path(path_or_hub_id, "adapter", ["adapter_config.json", "adapter_model.safetensors"])

def read_lora(path_or_hub_id):
    """({module: (A, B)}, adapter_config.json, all tensors) of a PEFT LoRA adapter (directory or hub id)."""
    path = adapter_dir(path_or_hub_id)
    cfg_file, w_file = (os.path.join(path, f) for f in ("adapter_config.json", "adapter_model.safetensors"))
    if not os.path.exists(cfg_file):  # a steering vector's directory too
        raise FileNotFoundError(f"{path_or_hub_id}: not a PEFT LoRA adapter (no adapter_config.json)")
    cfg = read_json(cfg_file)
    if (cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or cfg.get("alpha_pattern")
            or cfg.get("bias", "none") != "none"):
        raise ValueError(f"{cfg_file}: only plain LoRA is supported (no DoRA, bias or alpha_pattern)")
    tensors = read_tensors(w_file)
    names = sorted(k.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight") for k in tensors
                   if k.endswith(".lora_A.weight"))
    key = lambda n, ab: f"{PEFT_PREFIX}{n}.lora_{ab}.weight"
    if not names or {key(n, ab) for n in names for ab in "AB"} != set(tensors):
        raise ValueError(f"{w_file}: not pairs of LoRA A and B tensors: {sorted(tensors)[:4]}")
    return {n: (tensors[key(n, "A")], tensors[key(n, "B")]) for n in names}, cfg, tensors

def load_adapter(model, path_or_hub_id):
    """Read a PEFT LoRA adapter into the model; its module names."""
    pairs, cfg, _ = read_lora(path_or_hub_id)
    names, rslora = [], cfg.get("use_rslora", False)
    for peft_name, (A, B) in pairs.items():
        name = our_name(peft_name)  # multimodal Gemma too
        parts = name.split(".")  # model.layers.I.KIND.MODULE
        if len(parts) != 5 or parts[:2] != ["model", "layers"] or parts[4] not in MODULES:
            raise ValueError(f"{path_or_hub_id}: {peft_name} is not a LoRA on a decoder layer's linear layer")
        names += add_lora(model, len(A), cfg["lora_alpha"], [parts[4]], [int(parts[2])], rslora)
        m = model.get_submodule(name)
        if A.shape != m.lora_A.shape or B.shape != m.lora_B.shape:
            raise ValueError(f"{path_or_hub_id}: {name} has A {tuple(A.shape)} and B {tuple(B.shape)}: "
                             "not this model's")
        m.load_state_dict({"lora_A": A, "lora_B": B}, strict=False)  # the base weights stay
        m.requires_grad_(False)
    return names

# -----------------------------------------------------------------------------
# steering vector
class SteeringVector(nn.Module):
    """alpha * v added to the residual after `layer` at every position: model(idx, hook=steer)."""

    def __init__(self, d_model, layer, alpha, base_model=""):
        super().__init__()
        self.layer, self.alpha, self.base_model = layer, alpha, base_model
        self.vector = nn.Parameter(torch.zeros(d_model))  # 0: the base model

    def forward(self, i, x):
        return x + self.alpha * self.vector.to(x.dtype) if i == self.layer else None

    def check(self, cfg, where):
        """Itself, if it fits a model of `cfg`."""
        if self.vector.numel() != cfg.hidden_size or not 0 <= self.layer < cfg.num_hidden_layers:
            raise ValueError(f"{where}: a steering vector of width {self.vector.numel()} after layer "
                             f"{self.layer} does not fit the model, of width {cfg.hidden_size} with layers "
                             f"0..{cfg.num_hidden_layers - 1}")
        return self

    def save(self, path):
        save_tensors(os.path.join(path, "steering_vector.safetensors"),
                     {"vector": self.vector.detach().float().cpu()})
        write_json(os.path.join(path, "steering_config.json"), {
            "type": "steering_vector", "layer": self.layer, "alpha": self.alpha,
            "d_model": self.vector.numel(), "base_model_name_or_path": self.base_model})

    @classmethod
    def load(cls, path, device="cpu"):
        cfg = read_json(os.path.join(path, "steering_config.json"))
        sv = cls(cfg["d_model"], cfg["layer"], cfg["alpha"], cfg.get("base_model_name_or_path", ""))
        sv.load_state_dict(read_tensors(os.path.join(path, "steering_vector.safetensors")))
        return sv.to(device)

# -----------------------------------------------------------------------------
# a base model with its adapter
def adapter_kind(adapter):
    """('steering', dir) | ('lora', dir); downloads a hub id."""
    if os.path.isdir(adapter) and os.path.exists(os.path.join(adapter, "steering_config.json")):
        return "steering", adapter
    return "lora", adapter_dir(adapter)

def base_model_of(model, adapter):
    """`model`, or the base model the adapter's config names."""
    if model:
        return model
    if not adapter:
        raise ValueError("give --model, or --adapter (an adapter names its base model)")
    kind, path = adapter_kind(adapter)
    file = os.path.join(path, f"{'adapter' if kind == 'lora' else 'steering'}_config.json")
    if not (base := os.path.exists(file) and read_json(file).get("base_model_name_or_path")):
        raise ValueError(f"{adapter}: does not name its base model; give --model")
    return base

def load_model(model_name, adapter=None, device="cpu", dtype=None, lora_scale=None):
    """(model, tokenizer, hook): the model with its LoRA adapter, or a steering vector as hook."""
    model, tok = load(base_model_of(model_name, adapter), device=device, dtype=dtype)
    if not adapter:
        return model, tok, None
    kind, path = adapter_kind(adapter)
    if kind == "lora":
        load_adapter(model, path)
        if lora_scale is not None:
            set_lora_scale(model, lora_scale)
        return model, tok, None
    sv = SteeringVector.load(path, device=model.lm_head.weight.device).check(model.config, adapter)
    sv.alpha *= 1.0 if lora_scale is None else lora_scale
    return model, tok, sv
