"""
Benchmark: our training step and sampler against transformers + PEFT and HF generate, on the same
weights, the same conversations and the same lengths, side by side in one run.

    python bench.py --json out/bench.json                    # Qwen2.5-0.5B's shape, random weights
    python bench.py --shape 7b --skip sample --json b7.json  # LoRA training at 7B's shape (a GPU)
    python bench.py --shape 0.5b-4l --device cpu             # 4 layers: fits a CPU's patience
    python bench.py --quick --device cpu                     # tiny shape, seconds: checks the logic
    python bench.py --model Qwen/Qwen2.5-7B-Instruct --device cuda

Train: one optimizer step = 16 synthetic conversations (prompt 40-80 tokens, answer 60-250), all-module
rank-1 LoRA, AdamW. Ours packs the step into rows of up to 2048 tokens and computes the loss only at
answer tokens; the reference does what the papers' TRL loop did: micro-batches of 2, right-padded,
labels masked to the answer, HF's loss, 8 accumulation steps, SDPA attention (bf16 on CUDA).
Tokens/s counts real (unpadded) tokens for both. MFU = FLOPs per step x steps/s / the card's dense
bf16 peak, counting what each engine computes (MFU_FORMULA): 4 per matmul weight and token (LoRA
trains no base weight, so backward costs 2, not 4; attention's own FLOPs are not counted), ours
running the LM head at answer tokens only, the reference every weight at every padded position.
Both sides' SDPA kernels are recorded (flash, cuDNN, efficient or math: a fair race needs a fast one
on each). Peak memory is torch.cuda.max_memory_allocated over each part (the weights included).
Sample: --prompts prompts x --n samples, --new-tokens new tokens at most, temperature 1, top-p 1,
top-k 20, repetition penalty 1.1 (Qwen2.5's generation_config), ours (sample.generate, all rows at
once) vs HF's model.generate on the same batch. Twice: with every answer running to --new-tokens
(stop tokens off), then with realistic lengths: each row's stop forced, in both engines, at a length
drawn from a spread like real answers (lognormal, mean 250/600 of --new-tokens, clipped to
[1/30, 1] of it); with random weights the stop token's LM-head row is zeroed, so nothing else stops
a row. Ours samples over the tokenizer's ids, as sample.py does (random weights: Qwen2.5's 151,665).
Weights are random unless --model is given: speed does not depend on their values. They exist once:
the reference model's parameters are views of ours.
"""
import argparse
import math
import os
import platform
import sys
import time
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone

import torch
import torch.nn as nn

import sample
import train
from lora import add_lora
from model import Config, HelpFormatter, Qwen2, check_device, load, resolve_dtype

# Tried on the GPU and did not pay (fill in as measured): none yet.
# Kernels per decode step (0.5B shape, bf16, top-k 20, repetition penalty; torch.profiler's aten ops on
# the CPU, views and allocations not counted, F.rms_norm as its one CUDA kernel; tests/test_sample.py
# counts them): 46 per layer + 112 besides = 1,216 at 24 layers before issue 20; 26 + 52 = 676 after.
# Per layer: RMSNorm 8 -> 2 (x2), RoPE 14 -> 8, SDPA's bool-to-additive mask 2 -> 0; besides, the
# per-row hash (~50 int64 ops) now runs once per batch.

SHAPES = {  # (hidden, layers, heads, kv heads, intermediate, vocab rows, tied) from the Qwen2.5 configs
    "tiny": (64, 2, 4, 2, 128, 2048, True),  # smoke test
    "0.5b": (896, 24, 14, 2, 4864, 151936, True),
    "0.5b-4l": (896, 4, 14, 2, 4864, 151936, True),
    "1.5b": (1536, 28, 12, 2, 8960, 151936, True),
    "7b": (3584, 28, 28, 4, 18944, 152064, False),
}
DEFAULTS = {  # a full GPU run, a CPU run, and --quick (the tiny shape in seconds)
    "cuda": dict(shape="0.5b", steps=3, convs=16, prompts=8, n=50, new_tokens=600),
    "cpu": dict(shape="0.5b", steps=3, convs=16, prompts=8, n=4, new_tokens=64),
    "quick": dict(shape="tiny", steps=1, convs=4, prompts=2, n=3, new_tokens=24),
}
# Both engines sample with these (Qwen2.5-0.5B-Instruct's generation_config: top_k 20, penalty 1.1)
SAMPLING = dict(temperature=1.0, top_p=1.0, top_k=20, repetition_penalty=1.1)
PEAK_TFLOPS = [  # dense bf16 tensor-core peaks from the datasheets; the first name found in the GPU's name wins
    ("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("GH200", 989),
    ("A100", 312), ("L40S", 362), ("L40", 181), ("L4", 121),
]
LEN_KEY = 1024  # realistic lengths ride in our sampler's row keys: key = 1024 x row + length


def get_args(argv=None):
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--model", default=None, help="hub id or HF directory (default: random weights of --shape)")
    p.add_argument("--shape", default=None, choices=sorted(SHAPES), help="shape of the random model (default: 0.5b; tiny with --quick)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, help="bfloat16 or float32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps after one warm-up step (default: 3; 1 with --quick)")
    p.add_argument("--convs", type=int, default=None, help="conversations per optimizer step (default: 16; 4 with --quick)")
    p.add_argument("--prompts", type=int, default=None, help="sampling: distinct prompts (default: 8; 2 with --quick)")
    p.add_argument("--n", type=int, default=None, help="sampling: samples per prompt (default: 50 on CUDA, 4 on CPU, 3 with --quick)")
    p.add_argument("--new-tokens", type=int, default=None, help="sampling: new tokens per answer at most (default: 600 on CUDA, 64 on CPU, 24 with --quick)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: train, sample, ref (the reference stack)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak for MFU (default: looked up from the GPU's name; none on CPU)")
    p.add_argument("--quick", action="store_true", help="a few seconds on the tiny shape: checks the logic, measures nothing")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and data")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file (rewritten after each part)")
    args = p.parse_args(argv)
    try:
        check_device(args.device)
        resolve_dtype(args.dtype, args.device)
    except ValueError as e:
        p.error(str(e))
    args.skip = set(filter(None, args.skip.split(",")))
    if args.skip - {"train", "sample", "ref"}:
        p.error(f"--skip {','.join(sorted(args.skip))}: parts are train, sample and ref")
    defaults = DEFAULTS["quick" if args.quick else torch.device(args.device).type]
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("steps", "convs", "prompts", "n", "new_tokens"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    return args


T0 = time.perf_counter()


def log(msg):
    """A line per phase, so a long run is never silent."""
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


# -----------------------------------------------------------------------------
# models: ours, and transformers' Qwen2ForCausalLM as a view of the same weights


def shape_config(shape):
    hidden, layers, heads, kv, inter, vocab, tied = SHAPES[shape]
    return Config(vocab, hidden, inter, layers, heads, kv, hidden // heads, 1e-6, 1e6, 32768, tied,
                  name_or_path=f"random-{shape}")


def random_model(shape, device, dtype, seed):
    """Our Qwen2 of a Qwen2.5 shape with random weights, built straight in its dtype on the device."""
    with torch.device("meta"):
        model = Qwen2(shape_config(shape)).to(dtype)
    model.to_empty(device=device)  # (7B: 15 GB, never an fp32 copy)
    model.tie_weights()
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)
    return model.requires_grad_(False).eval()


def stop_token(model, vocab):
    """A token id the prompts never hold whose logit is 0 (its LM-head row zeroed), the tokenizer's last
    (of vocab): with top-k 20 over random logits it is never drawn, so only the forced stops end answers."""
    stop = vocab - 1
    with torch.no_grad():
        model.lm_head.weight[stop].zero_()
    return stop


def reference_model(ours, device):
    """transformers' Qwen2ForCausalLM (SDPA attention) whose parameters are ours: no second copy."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    c = ours.config
    cfg = Qwen2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                      num_key_value_heads=c.num_key_value_heads, tie_word_embeddings=c.tie_word_embeddings,
                      rope_theta=c.rope_theta, max_position_embeddings=c.max_position_embeddings,
                      rms_norm_eps=c.rms_norm_eps, attn_implementation="sdpa")
    with torch.device("meta"):
        ref = Qwen2ForCausalLM(cfg)
    ref.load_state_dict(ours.state_dict(), assign=True)  # same names (model.py keeps HF's)
    with torch.device(device):  # its RoPE table is a buffer, not in the state dict
        ref.model.rotary_emb = type(ref.model.rotary_emb)(config=cfg)
    ref.tie_weights()
    meta = [n for n, t in [*ref.named_parameters(), *ref.named_buffers()] if t.is_meta]
    assert not meta, f"reference tensors left unset: {meta[:3]}"
    return ref.requires_grad_(False).eval()


def loaded_model(name, device, dtype):
    """A real checkpoint: the model, its <|im_end|> as the stop token, and its tokenizer's size."""
    model, tok = load(name, device, dtype)
    return model, tok.im_end_id, tok.vocab_size


def matmul_params(model):
    """N of the MFU: every nn.Linear weight (the LM head included, even when tied), no embedding."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


MFU_FORMULA = "ours 4(N - Vd) x tokens + 4Vd x loss tokens; reference 4N x padded tokens (N: matmul weights, Vd: LM head)"


def train_flops(model, convs, micro=2):
    """FLOPs of one optimizer step as (ours, the reference) compute them: see MFU_FORMULA."""
    n, head = matmul_params(model), model.lm_head.weight.numel()
    tokens, loss_tokens = sum(len(ids) for ids, _ in convs), sum(sum(m[1:]) for _, m in convs)
    padded = sum(len(b) * max(len(ids) for ids, _ in b) for b in (convs[i:i + micro] for i in range(0, len(convs), micro)))
    return 4 * (n - head) * tokens + 4 * head * loss_tokens, 4 * n * padded


def sdpa_kernels(fn):
    """The attention kernels fn runs: the backend SDPA picked (flash, cuDNN, efficient, math)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sorted({e.name[6:] for e in prof.events() if e.name.startswith("aten::_scaled_dot_product")})


def peak_flops(device, override):
    """The device's dense bf16 FLOP/s: --peak-tflops, else the table by GPU name; None if unknown."""
    if override:
        return override * 1e12
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS if key in name), None)


def machine(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


# -----------------------------------------------------------------------------
# timing


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device, warmup=None):
    """(fn's result, its seconds, peak GB allocated during it and the warm-up: None on CPU)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if warmup is not None:
        warmup()  # allocator, kernels, library handles, autotuning
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    seconds = time.perf_counter() - t0
    return out, seconds, torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None


# -----------------------------------------------------------------------------
# training: one optimizer step of LoRA on 16 conversations


def synthetic_conversations(n, vocab, seed):
    """(ids, loss mask) pairs of chat-like lengths; ids avoid the top rows (special and padding)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p, a = int(torch.randint(40, 81, (1,), generator=g)), int(torch.randint(60, 251, (1,), generator=g))
        ids = torch.randint(0, vocab - 1000, (p + a,), generator=g).tolist()
        out.append((ids, [0] * p + [1] * a))
    return out


def adamw(params, device):
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=torch.device(device).type == "cuda")


def train_step_ours(model, convs, device):
    add_lora(model, r=1, alpha=64)
    opt = adamw([p for p in model.parameters() if p.requires_grad], device)
    model.train()
    rows = train.pack(convs, 2048)

    def step():
        train.accumulate_grads(model, model.hidden, rows, [], 0.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def train_step_ref(ref, convs, device, micro=2):
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(ref, LoraConfig(r=1, lora_alpha=64, use_rslora=True, lora_dropout=0.0,
                                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"], task_type="CAUSAL_LM"))
    opt = adamw([p for p in peft_model.parameters() if p.requires_grad], device)
    peft_model.train()
    batches = []
    for b in range(0, len(convs), micro):  # right-padded micro-batches, labels only on the answer
        batch = convs[b:b + micro]
        T = max(len(ids) for ids, _ in batch)
        ids, att = torch.zeros(len(batch), T, dtype=torch.long), torch.zeros(len(batch), T, dtype=torch.long)
        labels = torch.full((len(batch), T), -100)
        for i, (x, m) in enumerate(batch):
            ids[i, :len(x)], att[i, :len(x)] = torch.tensor(x), 1
            labels[i, :len(x)] = torch.where(torch.tensor(m, dtype=torch.bool), torch.tensor(x), -100)
        batches.append((ids, att, labels))

    def step():
        for ids, att, labels in batches:
            out = peft_model(input_ids=ids.to(device), attention_mask=att.to(device), labels=labels.to(device))
            (out.loss / len(batches)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bench_train(ours, ref, args, peak):
    convs = synthetic_conversations(args.convs, ours.config.vocab_size, args.seed)
    tokens = sum(len(ids) for ids, _ in convs)
    flops = dict(zip(("train", "train_ref"), train_flops(ours, convs)))
    res = {"train_convs_per_step": args.convs, "train_tokens_per_step": tokens, "mfu_formula": MFU_FORMULA,
           **{f"{k}_flops_per_step": v for k, v in flops.items()}}
    engines = [("train", "ours: packed rows", lambda: train_step_ours(ours, convs, args.device))]
    if ref is not None:
        engines.append(("train_ref", "transformers+PEFT: micro-batches of 2", lambda: train_step_ref(ref, convs, args.device)))
    for key, what, make in engines:
        log(f"train {what}, 1 warm-up + {args.steps} steps of {args.convs} conversations ({tokens:,} tokens)")
        step = make()
        warmup = lambda: res.update({f"{key}_sdpa": sdpa_kernels(step)})  # the warm-up step, profiled
        _, seconds, mem = measure(lambda: [step() for _ in range(args.steps)], args.device, warmup=warmup)
        res[f"{key}_tok_s"] = args.steps * tokens / seconds
        if mem is not None:
            res[f"{key}_peak_gb"] = mem
        if peak:
            res[f"{key}_mfu"] = args.steps * flops[key] / seconds / peak
        log(f"  {res[f'{key}_tok_s']:,.0f} tok/s" + (f", peak {mem:.1f} GB" if mem is not None else "")
            + (f", MFU {100 * res[f'{key}_mfu']:.1f}%" if peak else "") + f", SDPA {res[f'{key}_sdpa']}")
    if ref is not None:
        res["train_ratio"] = res["train_tok_s"] / res["train_ref_tok_s"]
    return res


# -----------------------------------------------------------------------------
# sampling: every answer to the limit, then each row stopped at a drawn length


def answer_lengths(rows, new_tokens, seed):
    """Per-row answer lengths with a spread like real answers: lognormal (sigma 0.6) with mean
    250/600 of new_tokens, clipped to [new_tokens/30, new_tokens]."""
    g = torch.Generator().manual_seed(seed + 2)
    mean = new_tokens * 250 / 600
    x = torch.exp(math.log(mean) - 0.18 + 0.6 * torch.randn(rows, generator=g))  # E[exp(0.6 z)] = e^0.18
    return x.round().clamp(max(1, new_tokens // 30), new_tokens).long().tolist()


@contextmanager
def forced_stops(stop, vocab, device):
    """While inside, our sampler draws `stop` at out column (row key % LEN_KEY) of each row: an
    answer of exactly that many tokens. A where() per step, CUDA-graph safe, as cheap as HF's processor.
    vocab: the LM head's rows (at least the sampled width)."""
    original = sample.next_logits
    only_stop = torch.full((vocab,), float("-inf"), device=device)
    only_stop[stop] = 0.0

    def next_logits(model, rows, hook, vocab_size):
        logits = original(model, rows, hook, vocab_size)  # (B, W)
        col = rows.pos[:, 0] + 1 - rows.plen[:, 0]  # (B,) out column of the token drawn from these
        return torch.where((col == rows.keys % LEN_KEY)[:, None], only_stop[:logits.shape[1]], logits)
    sample.next_logits = next_logits
    try:
        yield
    finally:
        sample.next_logits = original


class ForceStop:
    """HF logits processor: `stop` is the only choice when a row has generated its drawn length."""

    def __init__(self, lengths, width, stop, vocab, device):
        self.lengths, self.width = torch.tensor(lengths, device=device), width
        self.only_stop = torch.full((vocab,), float("-inf"), device=device)
        self.only_stop[stop] = 0.0

    def __call__(self, input_ids, scores):
        n = input_ids.shape[1] - self.width  # tokens generated so far = index of the one drawn now
        return torch.where((self.lengths == n)[:, None], self.only_stop, scores)


def sample_ours(model, prompts, n, new_tokens, stop, lengths, seed, vocab, **kw):
    """Tokens generated (stops excluded) by sample.generate on all rows, over the tokenizer's vocab ids."""
    keys = None if lengths is None else [LEN_KEY * j + L for j, L in enumerate(lengths)]
    forcing = nullcontext() if lengths is None else forced_stops(stop, model.config.vocab_size, model.lm_head.weight.device)
    with forcing:
        out = sample.generate(model, prompts, n=n, max_new_tokens=new_tokens, seed=seed, keys=keys, vocab_size=vocab,
                              stop_ids=() if lengths is None else (stop,), **SAMPLING, **kw)
    return sum(len(ids) for ids, _ in out)


def sample_ref(ref, prompts, n, new_tokens, stop, lengths, seed, device):
    """Tokens generated (stops excluded) by HF generate on all rows, left-padded, one row per sample."""
    kw = dict(SAMPLING)  # the same settings on both sides
    rows = [p for p in prompts for _ in range(n)]
    T = max(len(p) for p in prompts)
    ids, att = torch.zeros(len(rows), T, dtype=torch.long), torch.zeros(len(rows), T, dtype=torch.long)
    for i, p in enumerate(rows):
        ids[i, T - len(p):], att[i, T - len(p):] = torch.tensor(p), 1
    if lengths is None:  # no stop token: every row runs to new_tokens
        kw.update(eos_token_id=None, min_new_tokens=new_tokens)
    else:
        kw.update(eos_token_id=stop, logits_processor=[ForceStop(lengths, T, stop, ref.config.vocab_size, device)])
    torch.manual_seed(seed)
    with torch.no_grad():
        out = ref.generate(input_ids=ids.to(device), attention_mask=att.to(device), do_sample=True,
                           max_new_tokens=new_tokens, pad_token_id=0, **kw)[:, T:]  # (R, <= new_tokens)
    if lengths is None:
        return out.numel()
    hit = out == stop
    return int(torch.where(hit.any(1), hit.int().argmax(1), out.shape[1]).sum())


def bench_sample(ours, ref, args, stop, vocab):
    g = torch.Generator().manual_seed(args.seed + 1)
    prompts = [torch.randint(0, vocab - 1000, (int(torch.randint(30, 90, (1,), generator=g)),), generator=g).tolist()
               for _ in range(args.prompts)]
    rows = args.prompts * args.n
    lengths = answer_lengths(rows, args.new_tokens, args.seed)
    res = {"sample_rows": rows, "sample_new_tokens": args.new_tokens, "sample_settings": SAMPLING, "sample_vocab": vocab,
           "sample_real_drawn_mean_len": sum(lengths) / rows}
    warm = min(8, args.new_tokens)
    engines = [("", "ours", lambda L, t: sample_ours(ours, prompts, args.n, t, stop, L, args.seed, vocab))]
    res["sample_sdpa"] = sdpa_kernels(lambda: sample_ours(ours, prompts, 1, 2, stop, None, args.seed, vocab, cuda_graph=False))
    if ref is not None:
        engines.append(("_ref", "HF generate", lambda L, t: sample_ref(ref, prompts, args.n, t, stop, L, args.seed, args.device)))
        res["sample_ref_sdpa"] = sdpa_kernels(lambda: sample_ref(ref, prompts, 1, 2, stop, None, args.seed, args.device))
    log(f"sample: SDPA kernels, ours {res['sample_sdpa']}, HF generate {res.get('sample_ref_sdpa', '-')}")
    for part, lens, what in (("sample", None, f"every answer {args.new_tokens} tokens"),
                             ("sample_real", lengths, f"realistic lengths, mean {res['sample_real_drawn_mean_len']:.0f}")):
        for suffix, name, run in engines:
            key = part + suffix
            log(f"{part.replace('_', ' ')} {name}: {rows} answers ({args.prompts} prompts x {args.n}), {what}")
            tokens, seconds, mem = measure(lambda: run(lens, args.new_tokens), args.device, warmup=lambda: run(None, warm))
            res.update({f"{key}_s": seconds, f"{key}_tok_s": tokens / seconds, f"{key}_mean_len": tokens / rows})
            if mem is not None:
                res[f"{key}_peak_gb"] = mem
            log(f"  {seconds:.2f} s, {tokens / seconds:,.0f} tok/s, mean answer {tokens / rows:.0f} tokens"
                + (f", peak {mem:.1f} GB" if mem is not None else ""))
        if ref is not None:
            res[f"{part}_ratio"] = res[f"{part}_tok_s"] / res[f"{part}_ref_tok_s"]
    return res


# -----------------------------------------------------------------------------


def versions():
    from importlib.metadata import version  # without importing them: --skip ref runs need neither
    return {p: version(p) for p in ("torch", "transformers", "peft")}


def summary(res):
    mfu = "train_mfu" in res
    print(f"\n{res['model']} on {res['machine']} ({res['dtype']}), {res['date'][:10]}")
    print(f"{'':22} {'ours':>10} {'reference':>10} {'ratio':>7}" + (f" {'MFU ours/ref':>14}" if mfu else "")
          + f" {'peak GB ours/ref':>17}")
    for part, what in (("train", "train tok/s"), ("sample", "sample tok/s"), ("sample_real", "realistic tok/s")):
        if f"{part}_tok_s" not in res:
            continue
        get = lambda key, fmt: format(res[key], fmt) if key in res else "-"
        line = f"{what:22} {get(f'{part}_tok_s', ',.0f'):>10} {get(f'{part}_ref_tok_s', ',.0f'):>10} "
        line += f"{get(f'{part}_ratio', '.2f'):>6}x"
        if mfu:
            line += f" {get(f'{part}_mfu', '.1%'):>6} / {get(f'{part}_ref_mfu', '.1%'):>6}" if part == "train" else " " * 16
        line += f" {get(f'{part}_peak_gb', '.1f'):>8} / {get(f'{part}_ref_peak_gb', '.1f'):>6}"
        print(line)
    if mfu:
        print(f"MFU: {res['mfu_formula']}")
    if "sample_s" in res:
        print(f"sampling {res['sample_rows']} x {res['sample_new_tokens']} tokens: ours {res['sample_s']:.2f} s"
              + (f", HF generate {res['sample_ref_s']:.2f} s" if "sample_ref_s" in res else ""))


def main(argv=None):
    args = get_args(argv)
    dtype = resolve_dtype(args.dtype, args.device)
    torch.set_grad_enabled(True)
    log(f"building {'model ' + args.model if args.model else 'random ' + args.shape + ' weights'} "
        f"on {args.device} ({str(dtype).replace('torch.', '')})")
    if args.model:
        ours, stop, vocab = loaded_model(args.model, args.device, dtype)
    else:
        ours = random_model(args.shape, args.device, dtype, args.seed)
        vocab = min(151665, ours.config.vocab_size - 271)  # Qwen2.5's tokenizer; tiny: as many rows short
        stop = stop_token(ours, vocab)
    ref = None if "ref" in args.skip else reference_model(ours, args.device)
    n_params = matmul_params(ours)
    peak = peak_flops(args.device, args.peak_tflops)
    res = {"machine": machine(args.device), "device": args.device, "dtype": str(dtype).replace("torch.", ""),
           "model": args.model or f"random {args.shape}", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           **versions(), "matmul_params": n_params, "peak_tflops": peak / 1e12 if peak else None}

    def save():
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            train.atomic_json(args.json, res)
    save()
    if "sample" not in args.skip:  # before training adds adapters: base models on both sides
        res.update(bench_sample(ours, ref, args, stop, vocab))
        save()
    if "train" not in args.skip:
        res.update(bench_train(ours, ref, args, peak))
        save()
    summary(res)
    return res


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, KeyError) as e:  # --model: a missing or unsupported checkpoint
        print(f"bench.py: error: {e}", file=sys.stderr)
        sys.exit(2)
