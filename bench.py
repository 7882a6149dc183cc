"""
Our LoRA training step and sampler against transformers + PEFT and HF generate, on the same weights (random
ones of a Qwen2.5 shape unless --model), conversations and lengths: tokens/s, SDPA kernels, MFU, CUDA peak
memory (README, "What bench.py measures"); bf16 on CUDA, fp32 on the CPU, seeded.

    python bench.py --json out/bench.json                    # Qwen2.5-0.5B's shape
    python bench.py --shape 7b --skip sample --json b7.json  # LoRA training at 7B's shape (a GPU)
    python bench.py --quick --device cpu                     # tiny shape, seconds
"""
import argparse
import math
import os
import platform
import time
from dataclasses import replace
from datetime import datetime, timezone
from importlib.metadata import version

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pad_sequence

import sample
import train
from common import HelpFormatter, check_device, count, print_table, resolve_dtype, run_main, write_json
from lora import MODULES, add_lora
from model import FULL, Config, Transformer, load

SHAPES = {  # (hidden, layers, heads, kv heads, intermediate, vocab rows, tied): Qwen2.5's configs
    "tiny": (64, 2, 4, 2, 128, 2048, True),
    "0.5b": (896, 24, 14, 2, 4864, 151936, True),
    "0.5b-4l": (896, 4, 14, 2, 4864, 151936, True),
    "7b": (3584, 28, 28, 4, 18944, 152064, False),
}
DEFAULTS = {  # the flags' defaults, by device, and for --quick
    "cuda": dict(shape="0.5b", steps=3, convs=16, prompts=8, n=50, max_new_tokens=600),
    "cpu": dict(shape="0.5b", steps=3, convs=16, prompts=8, n=4, max_new_tokens=64),
    "quick": dict(shape="tiny", steps=1, convs=4, prompts=2, n=3, max_new_tokens=24),
}
SAMPLING = dict(temperature=1.0, top_p=1.0, top_k=20, repetition_penalty=1.1)  # Qwen2.5-Instruct's
PEAK_TFLOPS = [  # dense bf16 peaks (datasheets); the first name in the GPU's name wins
    ("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989),
    ("A100", 312), ("L40S", 362), ("L40", 181), ("L4", 121),
]
MFU_FORMULA = ("ours 4(N - Vd) x tokens + 4Vd x loss tokens; reference 4N x padded tokens "
               "(N: matmul weights, Vd: LM head)")
LEN_KEY = 1024  # realistic lengths ride in our sampler's row keys: 1024 x row + length

def get_args(argv=None):
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", help="hub id or HF directory (default: random weights of --shape)")
    p.add_argument("--shape", choices=sorted(SHAPES), help="random weights' shape (default: 0.5b, "
                   "--quick: tiny)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=count, help="timed optimizer steps after a warm-up")
    p.add_argument("--convs", type=count, help="conversations per optimizer step")
    p.add_argument("--prompts", type=count, help="sampling: distinct prompts")
    p.add_argument("--n", type=count, help="sampling: samples per prompt")
    p.add_argument("--max-new-tokens", type=count, help="sampling: answer length limit")
    p.add_argument("--skip", default="", help="parts to skip: train, sample, ref (the reference)")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak for MFU (default: by GPU name)")
    p.add_argument("--quick", action="store_true", help="seconds on the tiny shape: checks the logic")
    p.add_argument("--json", help="JSON file for the figures, rewritten after each part")
    args = p.parse_args(argv)
    try:
        check_device(args.device)
    except ValueError as e:
        p.error(str(e))
    args.skip = set(filter(None, args.skip.split(",")))
    if args.skip - {"train", "sample", "ref"}:
        p.error(f"--skip {','.join(sorted(args.skip))}: parts are train, sample and ref")
    for k, v in DEFAULTS["quick" if args.quick else torch.device(args.device).type].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args

T0 = time.perf_counter()

def log(msg):
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)

# -----------------------------------------------------------------------------
# models: ours, and transformers' Qwen2ForCausalLM as a view of the same weights
def shape_config(shape):
    hidden, layers, heads, kv, inter, vocab, tied = SHAPES[shape]
    hf = dict(model_type="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, rope_theta=1e6,
              tie_word_embeddings=tied)
    return replace(Config.from_hf(hf), name_or_path=f"random-{shape}")

def random_model(shape, device, dtype, seed):
    with torch.device("meta"):
        model = Transformer(shape_config(shape)).to(dtype)
    model.to_empty(device=device)  # 7B: 15 GB, never an fp32 copy
    model.tie_weights()
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, 0.02)
    return model.requires_grad_(False).eval()

def stop_token(model, vocab):
    """vocab - 1, its LM-head row zeroed: never in the top 20, so only forced stops end rows."""
    with torch.no_grad():
        model.lm_head.weight[vocab - 1].zero_()
    return vocab - 1

def reference_model(ours, device):
    """transformers' Qwen2ForCausalLM (SDPA) on our parameters: no second copy."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    same = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "tie_word_embeddings", "max_position_embeddings", "rms_norm_eps")
    cfg = Qwen2Config(**{k: getattr(ours.config, k) for k in same}, attn_implementation="sdpa",
                      rope_theta=ours.config.rope[FULL]["rope_theta"])
    with torch.device("meta"):
        ref = Qwen2ForCausalLM(cfg)
    ref.load_state_dict(ours.state_dict(), assign=True)  # same names (model.py keeps HF's)
    with torch.device(device):  # its RoPE table is a buffer, not in the state dict
        ref.model.rotary_emb = type(ref.model.rotary_emb)(config=cfg)
    return ref.requires_grad_(False).eval()

def matmul_params(model):
    """MFU's N: every nn.Linear weight (the LM head even when tied), no embedding."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))

def micro_batches(convs, micro=2):
    return [convs[i:i + micro] for i in range(0, len(convs), micro)]

def train_flops(model, convs):
    """(ours, the reference's) FLOPs of one optimizer step: MFU_FORMULA."""
    n, head = matmul_params(model), model.lm_head.weight.numel()
    tokens, loss_tokens = sum(len(ids) for ids, _ in convs), sum(sum(m[1:]) for _, m in convs)
    padded = sum(len(b) * max(len(ids) for ids, _ in b) for b in micro_batches(convs))
    return 4 * (n - head) * tokens + 4 * head * loss_tokens, 4 * n * padded

def sdpa_kernels(fn):
    """The SDPA backends fn runs (flash, cuDNN, efficient, math)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sorted({e.name[6:] for e in prof.events() if e.name.startswith("aten::_scaled_dot_product")})

def timed(res, key, run, warmup, device):
    """Time run() (returns its tokens) after warmup(): key_s, key_tok_s, on CUDA key_peak_gb."""
    cuda, ours = torch.device(device).type == "cuda", key.removesuffix("_ref")
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    warmup()
    sync()
    t0 = time.perf_counter()
    tokens = run()
    sync()
    s = time.perf_counter() - t0
    res.update({f"{key}_s": s, f"{key}_tok_s": tokens / s})
    if cuda:
        res[f"{key}_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    ratio = ""
    if key != ours:
        res[ours + "_ratio"] = res[ours + "_tok_s"] / res[f"{key}_tok_s"]
        ratio = f"; ours/ref {res[ours + '_ratio']:.2f}"
    log(f"  {s:.2f} s, {tokens / s:,.0f} tok/s{ratio}")
    return tokens

# -----------------------------------------------------------------------------
# training: LoRA optimizer steps on chat-length conversations
def synthetic_conversations(n, vocab, seed):
    """(ids, loss mask) pairs of chat-like lengths; ids avoid the top (special) rows."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p, a = int(torch.randint(40, 81, (1,), generator=g)), int(torch.randint(60, 251, (1,), generator=g))
        out.append((torch.randint(0, vocab - 1000, (p + a,), generator=g).tolist(), [0] * p + [1] * a))
    return out

def lora_ours(model, convs):
    """(model, backward of one optimizer step): rank-1 LoRA on every linear, packed rows."""
    add_lora(model, r=1, alpha=64)
    rows = train.pack(convs, 2048)
    return model, lambda: train.accumulate_grads(model, rows, [], 0.0)

def lora_ref(ref, convs):
    """The same with PEFT as in the papers' TRL loop: right-padded micro-batches."""
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(ref, LoraConfig(r=1, lora_alpha=64, use_rslora=True, lora_dropout=0.0,
                                                target_modules=list(MODULES), task_type="CAUSAL_LM"))
    pad = lambda xs, value=0: pad_sequence([torch.tensor(x) for x in xs], batch_first=True,
                                           padding_value=value).to(ref.device)
    batches = [dict(input_ids=pad([x for x, _ in b]), attention_mask=pad([[1] * len(x) for x, _ in b]),
                    labels=pad([[t if m else -100 for t, m in zip(x, mask)] for x, mask in b], -100))
               for b in micro_batches(convs)]

    def backward():
        for batch in batches:
            (peft_model(**batch).loss / len(batches)).backward()
    return peft_model, backward

def bench_train(ours, ref, n_convs, steps, peak, device):
    convs = synthetic_conversations(n_convs, ours.config.vocab_size, 0)
    tokens = sum(len(ids) for ids, _ in convs)
    flops = dict(zip(("train", "train_ref"), train_flops(ours, convs)))
    res = {"train_convs_per_step": n_convs, "train_tokens_per_step": tokens, "mfu_formula": MFU_FORMULA,
           **{f"{k}_flops_per_step": v for k, v in flops.items()}}
    engines = {"train": ("ours: packed rows", lora_ours, ours)} | (
        {"train_ref": ("transformers+PEFT: micro-batches of 2", lora_ref, ref)} if ref is not None else {})
    for key, (what, setup, model) in engines.items():
        log(f"train {what}, 1 warm-up + {steps} steps of {n_convs} conversations ({tokens:,} tokens)")
        model, backward = setup(model, convs)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=torch.device(device).type == "cuda")
        model.train()

        def step():
            backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return tokens
        warmup = lambda: res.update({f"{key}_sdpa": sdpa_kernels(step)})  # profiled
        timed(res, key, lambda: sum(step() for _ in range(steps)), warmup, device)
        if peak:
            res[f"{key}_mfu"] = steps * flops[key] / res[f"{key}_s"] / peak
        log(f"  SDPA {res[f'{key}_sdpa']}" + (f", MFU {res[f'{key}_mfu']:.1%}" if peak else ""))
    return res

# -----------------------------------------------------------------------------
# sampling: every answer to the limit, then each stopped at a drawn length
def answer_lengths(rows, new_tokens, seed):
    """Lengths like real answers: lognormal (sigma 0.6), mean 250/600 of new_tokens."""
    g = torch.Generator().manual_seed(seed + 2)
    z = torch.randn(rows, generator=g)
    x = torch.exp(math.log(new_tokens * 250 / 600) - 0.18 + 0.6 * z)  # E[exp(0.6 z)] = e^0.18
    return x.round().clamp(max(1, new_tokens // 30), new_tokens).long().tolist()

def forced_stops(stop, width, device):
    """sample.stream's logits_hook: each row draws `stop` at out column key % LEN_KEY."""
    stop_only = torch.where(torch.arange(width, device=device) == stop, 0.0, float("-inf"))  # (W,)

    def hook(logits, col, keys):  # (B, W), (B,) out column of the token drawn, (B,)
        return torch.where((col == keys % LEN_KEY)[:, None], stop_only[:logits.shape[1]], logits)
    return hook

def sample_ours(model, prompts, n, new_tokens, stop, lengths, vocab, **kw):
    """Tokens generated (stops excluded) by sample.generate."""
    if lengths is not None:
        w = model.lm_head.weight
        kw.update(keys=[LEN_KEY * j + L for j, L in enumerate(lengths)], stop_ids=(stop,),
                  logits_hook=forced_stops(stop, len(w), w.device))
    out = sample.generate(model, prompts, n=n, max_new_tokens=new_tokens, vocab_size=vocab, **SAMPLING, **kw)
    return sum(len(ids) for ids, _ in out)

def sample_ref(ref, prompts, n, new_tokens, stop, lengths):
    """The same by HF generate, left-padded, one row per sample."""
    device, rows = ref.device, [torch.tensor(p) for p in prompts for _ in range(n)]
    ids = pad_sequence(rows, batch_first=True, padding_side="left").to(device)  # (R, T)
    att = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_side="left").to(device)
    if lengths is None:  # no stop token: rows run to new_tokens
        kw = dict(eos_token_id=None, min_new_tokens=new_tokens)
    else:  # `stop` is the only choice once a row reaches its drawn length
        L, T = torch.tensor(lengths, device=device), ids.shape[1]
        force = forced_stops(stop, ref.config.vocab_size, device)  # lengths < LEN_KEY: our rule
        kw = dict(eos_token_id=stop, logits_processor=[lambda x, scores: force(scores, x.shape[1] - T, L)])
    torch.manual_seed(0)
    out = ref.generate(input_ids=ids, attention_mask=att, do_sample=True, max_new_tokens=new_tokens,
                       pad_token_id=0, **SAMPLING, **kw)[:, ids.shape[1]:]  # (R, <= new_tokens)
    return out.numel() if lengths is None else int((out != stop).cumprod(1).sum())

def bench_sample(ours, ref, n_prompts, n, new_tokens, stop, vocab, device):
    g = torch.Generator().manual_seed(1)
    lens = [int(torch.randint(30, 90, (1,), generator=g)) for _ in range(n_prompts)]
    prompts = [torch.randint(0, vocab - 1000, (L,), generator=g).tolist() for L in lens]
    rows = n_prompts * n
    lengths = answer_lengths(rows, new_tokens, 0)
    res = {"sample_rows": rows, "sample_new_tokens": new_tokens, "sample_settings": SAMPLING,
           "sample_vocab": vocab, "sample_real_drawn_mean_len": sum(lengths) / rows}
    run_ours = lambda n, L, t, **kw: sample_ours(ours, prompts, n, t, stop, L, vocab, **kw)
    run_ref = lambda n, L, t: sample_ref(ref, prompts, n, t, stop, L)
    engines = {"": ("ours", run_ours)} | ({"_ref": ("HF generate", run_ref)} if ref is not None else {})
    res["sample_sdpa"] = sdpa_kernels(lambda: run_ours(1, None, 2, cuda_graph=False))  # graphs hide kernels
    if ref is not None:
        res["sample_ref_sdpa"] = sdpa_kernels(lambda: run_ref(1, None, 2))
    log(f"sample: SDPA kernels, ours {res['sample_sdpa']}, HF generate {res.get('sample_ref_sdpa', '-')}")
    for part, lens, what in (("sample", None, f"every answer {new_tokens} tokens"),
                             ("sample_real", lengths, f"realistic lengths, mean {sum(lengths) / rows:.0f}")):
        for side, (name, run) in engines.items():
            log(f"{part.replace('_', ' ')} {name}: {rows} answers ({n_prompts} prompts x {n}), {what}")
            tokens = timed(res, part + side, lambda: run(n, lens, new_tokens),
                           lambda: run(n, None, min(8, new_tokens)), device)
            res[f"{part}{side}_mean_len"] = tokens / rows
    return res

def summary(res):
    both = lambda part, key, fmt: [format(res[k], fmt) if k in res else None
                                   for k in (part + key, part + "_ref" + key)]
    rows = [[f"{part} {unit}", *both(part, key, fmt), res.get(part + "_ratio"), *both(part, "_mfu", ".1%"),
             *both(part, "_peak_gb", ".1f")]
            for part, unit, key, fmt in (("train", "tok/s", "_tok_s", ",.0f"), ("sample", "s", "_s", ".2f"),
                                         ("sample_real", "s", "_s", ".2f")) if part + key in res]
    print_table(["part", "ours", "reference", "ours/ref speed", "MFU", "ref MFU", "peak GB", "ref peak GB"],
                rows)

def main(argv=None):
    args = get_args(argv)
    dtype = resolve_dtype(None, args.device)
    gpu = torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda" else None
    peak = 1e12 * (args.peak_tflops or next((tf for name, tf in PEAK_TFLOPS if gpu and name in gpu), 0))
    res = {"machine": gpu or f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores",
           "device": args.device, "dtype": str(dtype).removeprefix("torch."),
           "model": args.model or f"random {args.shape}",
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           **{p: version(p) for p in ("torch", "transformers", "peft")},  # version() imports nothing
           "peak_tflops": peak / 1e12 or None}
    log(f"{res['model']} on {res['machine']} ({res['dtype']})")
    if args.model:
        ours, tok = load(args.model, args.device, dtype)
        stop, vocab = tok.end_id, tok.vocab_size
    else:
        ours = random_model(args.shape, args.device, dtype, 0)
        vocab = min(151665, ours.config.vocab_size - 271)  # Qwen2.5's tokenizer; tiny: as many rows short
        stop = stop_token(ours, vocab)
    ref = None if "ref" in args.skip else reference_model(ours, args.device)
    res["matmul_params"] = matmul_params(ours)
    save = lambda: args.json and write_json(args.json, res)  # after each part: a run cut short keeps it
    save()
    if "sample" not in args.skip:  # before training adds adapters
        res.update(bench_sample(ours, ref, args.prompts, args.n, args.max_new_tokens, stop, vocab,
                                args.device))
        save()
    if "train" not in args.skip:
        res.update(bench_train(ours, ref, args.convs, args.steps, peak, args.device))
        save()
    summary(res)
    return res

if __name__ == "__main__":
    run_main("bench.py", main)
