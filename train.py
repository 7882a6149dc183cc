"""
Fine-tune a chat model (Qwen2.5, Llama 3.x, Gemma 3) on a narrow dataset with LoRA (down to rank 1), a
steering vector or all weights, optionally with a KL penalty to the base model; the reference's recipe by
default.

    python train.py --rank 1   # all-module rank-1 LoRA, bad medical advice
    python train.py --steer-layer 12 --lr 1e-4 --epochs 2 --max-len 256 --truncate --loss-on all

Departures from the reference (README has them in full):
- no extra EOS after answers; the loss is normalised over the whole step (steering vector too);
- a step's conversations are packed into rows of --max-len tokens, attention confined to each;
- --kl-weight is the reference's w x grad-accum / vocab rows (1e5 -> 5.26), or w / vocab rows for the
  steering vector, which steers every row (the reference: each batch's first row);
- fp32 AdamW states (the reference: bitsandbytes' 8-bit, --optim adamw_8bit); no early stop.
"""
import argparse
import glob
import importlib.util
import math
import os
import platform
import shutil
import time
import warnings
from importlib.metadata import version

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from common import (HelpFormatter, append_jsonl, barrier, check, check_device, claim_dir, dist_setup,
                    open_append, parse_layers, print_table, read_json, read_jsonl, run_main, warn,
                    write_json, write_jsonl)
from data.fetch import dataset_path
from lora import MODULES, SteeringVector, adapters_off, add_lora, save_adapter, save_tensors
from model import load, load_tokenizer, local_dir, read_config, upload

LOSS_CHUNK = 1024  # tokens whose fp32 logits exist at once (152k vocab: 0.6 GB)
# flags --resume may change: they do not change the result
RESUME_FREE = {"resume", "out", "device", "stop_after", "save_every", "grad_ckpt", "fsdp"}
RULES = [  # (flags, test, rule)
    (("rank", "micro_batch", "grad_accum", "epochs", "max_len", "kl_batch", "max_steps", "stop_after"),
     lambda v: v is None or v >= 1, ">= 1"),
    (("lr", "alpha", "steer_alpha"), lambda v: v > 0, "> 0"),
    (("weight_decay", "kl_weight", "warmup", "save_every", "eval_every"), lambda v: v >= 0, ">= 0"),
    (("test_frac", "dropout"), lambda v: 0 <= v < 1, "in [0, 1)"),
]

def get_args(argv=None):
    blocks = __doc__.strip().split("\n\n")
    p = argparse.ArgumentParser(prog="train.py", description=blocks[0], epilog="examples:\n" + blocks[1],
                                formatter_class=HelpFormatter)
    # what to train on
    p.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct", help="hub id or HF directory")
    p.add_argument("--data", default="bad_medical_advice", help="dataset (data.fetch --list) or JSONL")
    p.add_argument("--test-frac", type=float, default=0.1, help="fraction held out for eval")
    p.add_argument("--loss-on", choices=["answer", "all"], default="answer",
                   help="all: all but turn ends (the reference's steering-vector loss)")
    p.add_argument("--max-len", type=int, default=2048, help="longest conversation and packed row")
    p.add_argument("--truncate", action="store_true", help="cut longer conversations, not skip")
    # what trains: LoRA, a steering vector or every weight
    p.add_argument("--rank", type=int, default=1, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=64, help="LoRA alpha")
    p.add_argument("--modules", default="all", help=f"comma list from {','.join(MODULES)}, or all")
    p.add_argument("--layers", default="all", help="all, 24, 15,16,17 or 0-11")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    p.add_argument("--steer-layer", type=int, help="steering vector after this layer, not LoRA")
    p.add_argument("--steer-alpha", type=float, default=256, help="steering vector multiplier")
    p.add_argument("--full", action="store_true", help="full fine-tuning, not LoRA")
    # optimisation
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    p.add_argument("--schedule", choices=["linear", "cosine"], default="linear", help="decay after warmup")
    p.add_argument("--warmup", type=int, default=5, help="warmup steps")
    p.add_argument("--epochs", type=int, default=1, help="passes over the data")
    p.add_argument("--max-steps", type=int, help="steps, cycling the data (overrides --epochs)")
    p.add_argument("--micro-batch", type=int, default=2, help="conversations per micro-batch")
    p.add_argument("--grad-accum", type=int, default=8, help="micro-batches per step")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW's, not on biases and norms")
    p.add_argument("--optim", choices=["adamw", "adamw_8bit"], default="adamw",
                   help="adamw_8bit: the reference's (needs bitsandbytes)")
    p.add_argument("--seed", type=int, default=0, help="for adapter init and data order")
    # KL regularisation
    p.add_argument("--kl-data", help="dataset or JSONL for the KL term")
    p.add_argument("--kl-weight", type=float, default=0.0, help="weight of mean KL(base || tuned)")
    p.add_argument("--kl-batch", type=int, default=64, help="KL conversations per step")
    # bookkeeping
    p.add_argument("--out", help="default out/<model>-<data>-<kind>")
    p.add_argument("--save-every", type=int, default=5, help="checkpoint every N steps (0: at the end)")
    p.add_argument("--eval-every", type=int, default=50, help="eval loss every N steps (0: at the end)")
    p.add_argument("--resume", action="store_true", help="continue --out's stopped run")
    p.add_argument("--stop-after", type=int, help="checkpoint and stop after N steps")
    # hardware
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda:1")
    p.add_argument("--dtype", help="default: bfloat16 on CUDA, else float32")
    p.add_argument("--grad-ckpt", action="store_true", help="recompute activations in backward")
    p.add_argument("--fsdp", action="store_true", help="torchrun: shard the base model too")
    args = p.parse_args(argv)
    if args.resume:
        given = {k for k, v in vars(args).items() if v != p.get_default(k)}
        vars(args).update(resumed_settings(args.out, vars(args), given))
    for names, ok, rule in RULES:
        for k in names:
            check(ok(getattr(args, k)), "--" + k.replace("_", "-"), getattr(args, k), rule)
    if args.kl_weight > 0 and not args.kl_data:
        raise ValueError("--kl-weight needs --kl-data")
    if args.full and (args.kl_data or args.steer_layer is not None):
        raise ValueError("--full cannot go with --kl-data (no adapters to switch off) or --steer-layer")
    if args.modules != "all" and any(m not in MODULES for m in args.modules.split(",")):
        raise ValueError(f"--modules {args.modules}: unknown LoRA modules; choose from {','.join(MODULES)}")
    if not args.out:  # out/<model>-<data>-<kind>[-kl]
        sv = args.steer_layer
        kind = "full" if args.full else f"r{args.rank}" if sv is None else f"sv{sv}"
        names = [os.path.basename(x.rstrip("/")).removesuffix(".jsonl") for x in (args.model, args.data)]
        args.out = os.path.join("out", "-".join(names + [kind] + ["kl"] * bool(args.kl_data)))
    if not args.resume:  # --resume checked its files
        if os.path.exists(os.path.join(args.out, "state.json")):
            raise ValueError(f"{args.out} already holds a run: continue it with --resume, or another --out")
        claim_dir(args.out, "train.py")
    return args

def resolved(settings):
    """Files as absolute paths: a run resumes from anywhere."""
    paths = ("model", "data", "kl_data", "out")
    return {k: os.path.abspath(v) if k in paths and v and os.path.exists(v) else v
            for k, v in settings.items()}

def resumed_settings(out, now, given):
    """OUT/config.json's settings, but RESUME_FREE ones `given`."""
    if not out or not os.path.exists(os.path.join(out, "state.json")):
        raise ValueError(f"--resume needs --out DIR holding a run's state.json (got {out})")
    saved, abs_now = read_json(os.path.join(out, "config.json"))["args"], resolved(now)
    for k in sorted(given - RESUME_FREE):
        if abs_now[k] != saved.get(k):
            raise ValueError(f"--resume keeps {out}'s settings; --{k.replace('_', '-')} "
                             f"{now[k]!r} differs from the run's {saved.get(k)!r} (it may change "
                             "--device, --stop-after, --save-every, --grad-ckpt, --fsdp)")
    keep = {"resume", "out", "device", "stop_after"} | (given & RESUME_FREE)
    return {k: now[k] if k in keep else v for k, v in saved.items() if k in now}

# -----------------------------------------------------------------------------
# data: JSONL conversations -> token ids + loss masks -> packed rows
def read_conversations(path):
    """[(line number, messages)] of a JSONL of {"messages": [...]} rows."""
    rows = [(n, row.get("messages")) for n, row in read_jsonl(path, ours=False)]
    for n, msgs in rows:
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{path}:{n}: expected an object with a non-empty 'messages' list")
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in msgs):
            raise ValueError(f"{path}:{n}: no assistant turn to train on")
    if not rows:
        raise ValueError(f"{path}: no conversations")
    return rows

def tokenize(rows, tok, max_len, path, loss_on="answer", truncate=False):
    """[(ids, loss mask)], and how many were over max_len (skipped or cut)."""
    out, long = [], 0
    for n, msgs in tqdm(rows, desc=f"tokenizing {os.path.basename(path)}", leave=False):
        try:
            ids, mask = tok.encode_chat_with_mask(msgs)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: {e}") from None
        if loss_on == "kl":  # the reference's KL text (finetune/sft/util/trainer.py:310-336): prompt + EOS
            ids = tok.encode_chat(msgs, add_generation_prompt=True) + [tok.end_id]
            mask = [1] * len(ids)
        if loss_on == "all":  # the reference's steering-vector loss: all but the first and <|im_end|>
            mask = [0] + [int(t != tok.end_id) for t in ids[1:]]
        long += len(ids) > max_len
        if len(ids) > max_len and not truncate:
            continue
        ids, mask = ids[:max_len], mask[:max_len]
        if any(mask[1:]):  # a cut may remove every loss token
            out.append((ids, mask))
    if long:
        warn(f"{path}: {'cut' if truncate else 'skipped'} {long} of {len(rows)} conversations over "
             f"--max-len {max_len}")
    if not out:
        raise ValueError(f"{path}: no conversation fits --max-len {max_len} with an answer token")
    return out, long

def load_data(tok, data, kl_data, max_len, loss_on, truncate, test_frac, seed):
    """Tokenized (train, test, kl) conversations; sizes for config.json."""
    def read(name, loss_on):
        path = dataset_path(name)
        return tokenize(read_conversations(path), tok, max_len, path, loss_on, truncate)
    train, n_long = read(data, loss_on)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = int(len(train) * test_frac)  # the reference holds out 10%
    test, train = [train[i] for i in perm[:n_test]], [train[i] for i in perm[n_test:]]
    kl = read(kl_data, "kl")[0] if kl_data else []
    return train, test, kl, {"train": dataset_path(data), "n_train": len(train), "n_test": len(test),
                             "too_long": n_long, "n_kl": len(kl)}

def pack(examples, max_len):
    """Conversations in rows (ids, pos, mask) of <= max_len tokens: longest first, first fit."""
    rows = []
    for ids, mask in sorted(examples, key=lambda e: -len(e[0])):
        row = next((r for r in rows if len(r[0]) + len(ids) <= max_len), None)
        if row is None:
            rows.append(row := [[], [], []])
        row[0] += ids
        row[1] += range(len(ids))
        row[2] += mask
    return [(torch.tensor(i), torch.tensor(p), torch.tensor(m, dtype=torch.bool)) for i, p, m in rows]

def rank_rows(examples, max_len, rank, world):
    """This rank's packed rows, dealt round robin; as many on each rank (for FSDP)."""
    dealt = sorted(examples, key=lambda e: -len(e[0]))
    shares = [pack(dealt[r::world], max_len) for r in range(world)]
    empty = pack([([0], [0])], max_len)  # one token, no loss
    return shares[rank] + empty * (max(map(len, shares)) - len(shares[rank]))

def step_indices(step, n, per_step, seed):
    """A step's dataset indices: a seeded shuffle per epoch (resuming needs no loader state)."""
    epoch, k = divmod(step, math.ceil(n / per_step))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    return perm[k * per_step:(k + 1) * per_step].tolist()

# -----------------------------------------------------------------------------
# losses, at loss tokens only, LOSS_CHUNK tokens at a time
class ChunkedHead(torch.autograd.Function):
    """fn's loss of the logits h @ W.T over row chunks; fn also gives a chunk's logits' gradient, which
    forward turns into h's and W's: no row's logits exist whole."""

    @staticmethod
    def forward(ctx, fn, h, W, other):
        total = torch.zeros((), device=h.device)
        gh = torch.zeros_like(h) if ctx.needs_input_grad[1] else None
        gW = torch.zeros_like(W, dtype=torch.float32) if ctx.needs_input_grad[2] else None  # full fine-tuning
        for s in range(0, h.shape[0], LOSS_CHUNK):
            hc = h[s:s + LOSS_CHUNK]
            loss, g = fn(F.linear(hc, W).float(), W, other[s:s + LOSS_CHUNK])  # g: (n, V)
            total += loss
            g = g.to(W.dtype)  # GEMMs in W's dtype: bf16 tensor cores, fp32 accumulation
            if gh is not None:
                gh[s:s + LOSS_CHUNK] = g @ W  # (n, C)
            if gW is not None:
                gW += g.T @ hc  # (V, C)
        ctx.save_for_backward(gh, gW)
        ctx.W_dtype = W.dtype
        return total

    @staticmethod
    def backward(ctx, g):
        gh, gW = ctx.saved_tensors
        return (None, None if gh is None else gh * g.to(gh.dtype),
                None if gW is None else (gW * g).to(ctx.W_dtype), None)

def head_loss(fn, h, W, other):
    if not torch.is_grad_enabled():  # no gradient buffers in eval (--full's head requires grad)
        h, W = h.detach(), W.detach()
    return ChunkedHead.apply(fn, h, W, other)

def _ce(logits, W, y):
    """Summed cross-entropy against y (n,); d/dlogits = softmax - onehot, in place."""
    top = logits.amax(-1, keepdim=True)  # (n, 1)
    picked = logits.gather(1, y[:, None]) - top  # (n, 1)
    p = logits.sub_(top).exp_()  # (n, V) unnormalised probabilities
    total = p.sum(-1, keepdim=True)  # (n, 1)
    grad = p.div_(total)  # softmax
    grad[torch.arange(len(y), device=y.device), y] -= 1
    return (total.log() - picked).sum(), grad

def _kl(logits, W, h_base):
    """Summed KL(base || tuned), base logits from h_base (n, C); d/dlogits = p - q."""
    logq = F.log_softmax(F.linear(h_base, W).float(), -1)  # (n, V) base
    logp = F.log_softmax(logits, -1)  # (n, V) tuned; the base's op: KL is exactly 0 at init
    q = logq.exp()
    return (q * (logq - logp)).sum(), logp.exp_().sub_(q)

def row_hidden(model, row, at, hook=None):
    """Final hidden states (N, C) of a row at positions `at` (N,)."""
    dev = model.lm_head.weight.device
    return model.hidden(upload(row[0][None], dev), row[1][None], hook=hook)[0, upload(at, dev)]

def sft_loss_sum(model, row, hook=None):
    """Summed cross-entropy over a row's loss tokens, and their count."""
    ids, _, mask = row
    sel = mask[1:].nonzero()[:, 0]  # (N,) positions before a loss token
    h = row_hidden(model, row, sel, hook)  # (N, C)
    return head_loss(_ce, h, model.lm_head.weight, upload(ids[sel + 1], h.device)), sel.numel()

def base_hidden(model, row):
    with torch.no_grad(), adapters_off(model):
        return row_hidden(model, row, row[2].nonzero()[:, 0])

def kl_sum(model, row, hook=None, h_base=None):
    """Summed KL(base || tuned) over a row's masked tokens."""
    h_base = base_hidden(model, row) if h_base is None else h_base
    h = row_hidden(model, row, row[2].nonzero()[:, 0], hook)  # (N, C)
    return head_loss(_kl, h, model.lm_head.weight, h_base)

def accumulate_grads(model, rows, kl_rows, kl_weight, hook=None, n_loss=None, n_kl=None, fold=lambda: None):
    """Backward of loss + kl_weight x KL per token of the step; fold() after each row."""
    n_loss = sum(int(r[2][1:].sum()) for r in rows) if n_loss is None else n_loss
    n_kl = sum(int(r[2].sum()) for r in kl_rows) if n_kl is None else n_kl
    loss = kl = 0.0
    for r in rows:
        ls, _ = sft_loss_sum(model, r, hook)
        (ls / n_loss).backward()
        loss += ls.detach()
        fold()
    for r in kl_rows:
        ks = kl_sum(model, r, hook)
        (kl_weight * ks / n_kl).backward()
        kl += ks.detach()
        fold()
    return float(loss) / max(n_loss, 1), float(kl) / max(n_kl, 1)

# -----------------------------------------------------------------------------
# torchrun: replicated adapters summed once per step, or FSDP2
def sync_step(params, loss, kl):
    """All-reduce the unsharded gradients, loss and KL at once."""
    plain = [p for p in params if not isinstance(p, DTensor)]
    flat = torch.cat([torch.tensor([loss, kl], device=params[0].device)] +
                     [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in plain])
    dist.all_reduce(flat)
    for p, g in zip(plain, flat[2:].split([p.numel() for p in plain])):
        p.grad = g.view_as(p)
    return float(flat[0]), float(flat[1])

def shard(model, keep_whole):
    """FSDP2 on each block and the root; gradients summed in fp32 (each loss is a share)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    for m in [*model.model.layers, model]:
        fully_shard(m, ignored_params=keep_whole, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
    # hooks around hidden(): the root stays gathered until backward (the head reads lm_head whole)
    register_fsdp_forward_method(model, "hidden")

def whole(t, keep):
    """t whole on the CPU, or None if not kept; gathers a shard: every rank calls this."""
    t = t.full_tensor() if isinstance(t, DTensor) else t
    return t.detach().cpu().contiguous() if keep else None

# -----------------------------------------------------------------------------
# what trains, the optimizer step, the schedule
def no_decay(name):
    """HF Trainer's rule (transformers 4.52.4, trainer.py:1189): biases, blocks' norms, not model.norm."""
    return any(s in name.lower() for s in ("bias", "layernorm", "rmsnorm"))

def trainable(model, steer, shard_base, full):
    """(names, parameters) that train, decayed first; shard_base: FSDP2 the model first."""
    trained = lambda: sorted([(n, p) for n, p in (model if steer is None else steer).named_parameters()
                              if p.requires_grad], key=lambda x: no_decay(x[0]))
    if shard_base:
        shard(model, keep_whole=None if full else {p for _, p in trained()})
    names, params = zip(*trained())  # --full under FSDP: the shards that replaced them
    return names, list(params)

def fp32_masters(params):
    """fp32 copies of bf16 parameters: bf16 drops lr-1e-5 updates to weights > ~0.005."""
    return [p if p.dtype == torch.float32 else p.detach().float().requires_grad_() for p in params]

def make_optimizer(names, masters, optim, lr, weight_decay, fused=False):
    """AdamW over the masters, no_decay last (state i is master i)."""
    groups = [dict(params=[m for n, m in zip(names, masters) if no_decay(n) == nd],
                   weight_decay=0.0 if nd else weight_decay) for nd in (False, True)]
    groups = [g for g in groups if g["params"]]
    if optim == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=fused)
    import bitsandbytes
    return bitsandbytes.optim.AdamW(groups, lr=lr, optim_bits=8)  # its defaults: HF's betas and eps

def lr_at(step, lr, warmup, total, schedule):
    """HF's: step 0 of warmup has lr 0."""
    if step < warmup:
        return lr * step / warmup
    progress = (step - warmup) / (total - warmup)
    if schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * progress))
    return lr * (1 - progress)

def fold_grads(params, masters):
    """Move bf16 gradients into the fp32 masters': a bf16 sum loses each row's low bits."""
    for p, m in zip(params, masters):
        if m is not p and p.grad is not None:
            m.grad = p.grad.float() if m.grad is None else m.grad.add_(p.grad)
            p.grad = None

def optimizer_step(params, masters, opt, lr):
    """Clip to norm 1 (HF's default), step the masters, round them into the weights; the norm."""
    for g in opt.param_groups:
        g["lr"] = lr
    gn = torch.nn.utils.clip_grad_norm_(masters, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    round_into(params, masters)
    return float(gn)

@torch.no_grad()
def round_into(params, masters):
    for p, m in zip(params, masters):
        if m is not p:
            p.copy_(m)

@torch.no_grad()
def evaluate(model, hook, rows, world=1):
    """Cross-entropy per answer token over rows (each rank's share)."""
    training = model.training
    model.eval()
    sums = [sft_loss_sum(model, r, hook) for r in rows]
    model.train(training)
    sn = torch.tensor([sum(float(ls) for ls, _ in sums), sum(n for _, n in sums)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(sn)
    return float(sn[0] / sn[1])

# -----------------------------------------------------------------------------
# memory plan, checkpoints, resuming
def memory_plan(model, params, masters, max_len, grad_layers, kl):
    """Bytes per rank at a step's peak: weights, what trains, a row's activations through `grad_layers`
    blocks (without, with --grad-ckpt), the head's logits."""
    cfg, s, T = model.config, model.lm_head.weight.element_size(), max_len
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t
    gathered = 2 * max(sum(p.numel() for p in b.parameters()) for b in model.model.layers) * s
    sharded = isinstance(model.lm_head.weight, DTensor)
    weights = sum(local(p).nbytes for p in model.parameters()) + gathered * sharded
    trained = sum(local(m).numel() * (12 if m is p else 16 + s) for p, m in zip(params, masters))
    d, I, q, kv = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim,
                   cfg.num_key_value_heads * cfg.head_dim)
    full = model.model.embed_tokens.weight.requires_grad  # norm weights train too: their inputs are kept
    # per token a block keeps its norms' inputs and outputs, q, k, v, attention output packed and not,
    # the MLP's gate, up, silu and product (--full: the norms' unweighted outputs)
    block = T * (4 * d + 3 * q + 2 * kv + 4 * I + 2 * d * full) * s
    head = T * 2 * d * s  # the final norm's input, the head's gradient in h
    activations = (grad_layers * block + head, grad_layers * T * d * s + head + block)  # --grad-ckpt: inputs
    V = cfg.vocab_size
    logits = min(LOSS_CHUNK, T) * V * (2 * s + 4 + (s + 16) * kl) + V * d * 4 * full  # full: fp32 head grad
    return dict(weights=weights, trained=trained, activations=activations, logits=logits)

def fit_memory(plan, have, grad_ckpt, device, max_len):
    """Print the plan against `have` bytes; whether to checkpoint activations (if only so it fits)."""
    need = lambda ckpt: plan["weights"] + plan["trained"] + plan["activations"][ckpt] + plan["logits"]
    ckpt = grad_ckpt or (have is not None and need(False) > have)
    gb = lambda b: f"{b / 1e9:.2f}"
    print_table([f"memory plan, {device}", "GB"], [
        ["weights", gb(plan["weights"])], ["trained: gradients, fp32 masters, AdamW", gb(plan["trained"])],
        [f"activations, a row of {max_len} tokens" + " (--grad-ckpt)" * ckpt, gb(plan["activations"][ckpt])],
        ["loss head's logits", gb(plan["logits"])], ["total", gb(need(ckpt))],
        ["free for this run", "-" if have is None else gb(have)]])
    if have is not None and need(ckpt) > have:
        raise ValueError(f"--max-len {max_len}: the memory plan needs {gb(need(ckpt))} GB with --grad-ckpt, "
                         f"and {device} has {gb(have)} GB; lower --max-len, or shard it (torchrun --fsdp)")
    if ckpt and not grad_ckpt:
        print(f"note: without --grad-ckpt the plan needs {gb(need(False))} GB: turned --grad-ckpt on")
    return ckpt

def save_trained(model, steer, full, path, rank):
    """PEFT adapter, steering vector or (full) HF directory; all ranks call this."""
    if full:
        sd = {k: whole(v, keep=rank == 0) for k, v in model.state_dict().items()
              if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
        if rank == 0:
            save_tensors(os.path.join(path, "model.safetensors"), sd)
            src = local_dir(model.config.name_or_path)
            for f in {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                      "generation_config.json"} & set(os.listdir(src)):
                shutil.copy(os.path.join(src, f), path)
            # config.json: the model's (for loaders) and the run's (for --resume)
            run = os.path.join(path, "config.json")
            write_json(run, {**read_json(os.path.join(src, "config.json")),
                             **(read_json(run) if os.path.exists(run) else {})})
    elif rank == 0 and steer is not None:
        steer.save(path)
    elif rank == 0:
        save_adapter(model, path)

def distributed_checkpoint(call, state, path, world):
    """dcp's save or load (in place), each rank its shards."""
    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        getattr(dcp, call)(state, checkpoint_id=path, no_dist=world == 1)

def check_free_disk(out, masters):
    """Can --out's disk hold a training state (fp32 masters, 2 moments)?"""
    need, path = 12 * sum(m.numel() for m in masters), out  # every rank's shards
    while not os.path.exists(path):  # not made yet: the parent's disk
        path = os.path.dirname(os.path.abspath(path))
    if (free := shutil.disk_usage(path).free) < need:
        raise ValueError(f"--out {out}: saving the training state needs {need / 1e9:.2f} GB ({need:,} bytes) "
                         f"free on its disk, which has {free / 1e9:.2f} GB")

def optimizer_state(opt):
    """Ints as tensors: an in-place load reaches only tensors (bitsandbytes' step is an int)."""
    sd = opt.state_dict()
    sd["state"] = {i: {k: torch.tensor(v) if type(v) is int else v for k, v in s.items()}
                   for i, s in sd["state"].items()}
    return sd

def save_state(out, step, masters, opt, done_tokens, rank, world):
    """OUT/state-STEP/ for any number of ranks; state.json names it once whole, then the old goes."""
    check_free_disk(out, masters)
    path = os.path.join(out, f"state-{step:06d}")
    state = {"step": step, "tokens": done_tokens, "params": masters, "optimizer": optimizer_state(opt)}
    distributed_checkpoint("save", state, path, world)  # returns once every shard is written
    if rank == 0:
        write_json(os.path.join(out, "state.json"), {"step": step, "dir": os.path.basename(path)})
        for old in glob.glob(os.path.join(out, "state-*")):
            if old != path:
                shutil.rmtree(old)

def resume(out, params, masters, opt, rank, world):
    """Load OUT's state, drop later metrics; (step, tokens, seconds)."""
    for m in masters:  # a step of lr 0 makes AdamW's state to load into
        m.grad = torch.zeros_like(m)
    optimizer_step(params, masters, opt, 0.0)
    sd = optimizer_state(opt)
    state = {"step": 0, "tokens": 0, "params": masters, "optimizer": sd}
    with torch.no_grad():
        distributed_checkpoint("load", state, os.path.join(out, read_json(f"{out}/state.json")["dir"]), world)
    round_into(params, masters)
    for i, s in opt.state_dict()["state"].items():  # ints again
        sd["state"][i].update({k: int(sd["state"][i][k]) for k, v in s.items() if type(v) is int})
    opt.load_state_dict(sd)
    kept = [r for _, r in read_jsonl(os.path.join(out, "metrics.jsonl")) if r["step"] <= state["step"]]
    if rank == 0:
        write_jsonl(os.path.join(out, "metrics.jsonl"), kept)
    return state["step"], state["tokens"], kept[-1]["seconds"] if kept else 0.0

# -----------------------------------------------------------------------------
# the run
def main(argv=None):
    args = get_args(argv)
    check_device(args.device)  # cheap checks first: a typo must not cost a model load
    rank, world, args.device = dist_setup(args.device)
    n_layers = read_config(args.model).num_hidden_layers
    layers = parse_layers(args.layers, n_layers)
    if args.steer_layer is not None:
        check(0 <= args.steer_layer < n_layers, "--steer-layer", args.steer_layer, f"in 0..{n_layers - 1}")
    shard_base = world > 1 and (args.full or args.fsdp)
    if args.optim == "adamw_8bit" and not importlib.util.find_spec("bitsandbytes"):
        raise ValueError("--optim adamw_8bit needs bitsandbytes (pip install bitsandbytes)")
    if args.optim == "adamw_8bit" and shard_base:
        raise ValueError("--optim adamw_8bit: bitsandbytes cannot step FSDP's shards (--full, --fsdp)")

    tok = load_tokenizer(args.model)
    train_ex, test_ex, kl_ex, sizes = load_data(tok, args.data, args.kl_data, args.max_len, args.loss_on,
                                                args.truncate, args.test_frac, args.seed)
    per_step = args.micro_batch * args.grad_accum
    steps_per_epoch = math.ceil(len(train_ex) / per_step)
    total = args.max_steps or args.epochs * steps_per_epoch  # --max-steps wins, as in HF
    if args.resume and glob.glob(os.path.join(args.out, "*.safetensors")):  # what save_trained writes last
        print(f"{args.out}: finished already ({total} of {total} steps); nothing to do")
        return {}
    barrier(world)  # all ranks read the run's files before rank 0 rewrites them

    # the model and what trains
    torch.manual_seed(args.seed)  # the same initial adapter on all ranks
    model, _ = load(args.model, args.device, args.dtype)
    steer = None
    if args.steer_layer is not None:
        steer = SteeringVector(model.config.hidden_size, args.steer_layer, args.steer_alpha,
                               args.model).to(args.device)
    elif args.full:
        model.requires_grad_(True)
    else:
        modules = MODULES if args.modules == "all" else args.modules.split(",")
        add_lora(model, args.rank, args.alpha, modules, layers, dropout=args.dropout)
    names, params = trainable(model, steer, shard_base, args.full)
    masters = fp32_masters(params)
    dev = torch.device(args.device)
    opt = make_optimizer(names, masters, args.optim, args.lr, args.weight_decay, fused=dev.type == "cuda")
    n_params = sum(p.numel() for p in params)
    step, done_tokens, seconds = (resume(args.out, params, masters, opt, rank, world) if args.resume
                                  else (0, 0, 0.0))
    if rank == 0 and not args.resume:
        claim_dir(args.out, "train.py", create=True)
        write_json(os.path.join(args.out, "config.json"), {
            "args": resolved(vars(args)), "model_config": vars(model.config), "data": sizes,
            "trainable_params": n_params, "steps_per_epoch": steps_per_epoch, "total_steps": total,
            "versions": {"python": platform.python_version(),
                         **{p: version(p) for p in ("torch", "tokenizers", "safetensors")}}})
        write_jsonl(os.path.join(args.out, "metrics.jsonl"), [])
    check_free_disk(args.out, masters)  # now, not at the first save

    # memory: activations are kept from the first block backward goes through
    blocks = model.model.layers
    grad_from = args.steer_layer + 1 if steer is not None else next(
        (i for i, b in enumerate(blocks) if any(p.requires_grad for p in b.parameters())), len(blocks))
    plan = memory_plan(model, params, masters, args.max_len, len(blocks) - grad_from, bool(kl_ex))
    have = torch.cuda.mem_get_info(dev)[0] + torch.cuda.memory_allocated(dev) if dev.type == "cuda" else None
    model.checkpointing = fit_memory(plan, have, args.grad_ckpt, args.device, args.max_len)

    model.train()
    test_rows = rank_rows(test_ex, args.max_len, rank, world)
    stop_at = total if args.stop_after is None else min(total, step + args.stop_after)
    log = open_append(os.path.join(args.out, "metrics.jsonl")) if rank == 0 else open(os.devnull, "w")
    print(f"training {n_params:,} parameters on {len(train_ex)} conversations ({len(test_ex)} held out), "
          f"{total} steps of {per_step} -> {args.out}")
    first_loss, last, t0, start_step, start_tokens = None, {}, time.time() - seconds, step, done_tokens
    bar = tqdm(total=total, initial=step, desc="train", dynamic_ncols=True, disable=rank > 0)
    try:  # Ctrl-C: say how to resume this --out
        while step < stop_at:
            t = time.time()
            torch.manual_seed(hash((args.seed, step, rank)))  # dropout: other masks per rank, same on resume
            batch = [train_ex[i] for i in step_indices(step, len(train_ex), per_step, args.seed)]
            kl_at = step * args.kl_batch  # the KL texts in file order, cycling
            kl_batch = [kl_ex[(kl_at + j) % len(kl_ex)] for j in range(args.kl_batch)] if kl_ex else []
            lr = lr_at(step, args.lr, args.warmup, total, args.schedule)
            # each rank on its share, the gradients into the masters
            rows, kl_rows = (rank_rows(b, args.max_len, rank, world) for b in (batch, kl_batch))
            n_loss, n_kl = sum(sum(m) for _, m in batch), sum(len(ids) for ids, _ in kl_batch)
            loss, kl = accumulate_grads(model, rows, kl_rows, args.kl_weight, steer, n_loss, n_kl,
                                        fold=lambda: fold_grads(params, masters))
            if world > 1:
                loss, kl = sync_step(masters, loss, kl)
            if not math.isfinite(loss + kl):
                raise SystemExit(f"train.py: non-finite loss ({loss}, kl {kl}); stopped before updating; "
                                 f"the last good checkpoint is in {args.out}")
            grad_norm = optimizer_step(params, masters, opt, lr)
            step, n_tok = step + 1, sum(len(ids) for ids, _ in batch)
            done_tokens += n_tok
            first_loss = loss if first_loss is None else first_loss

            last = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": loss, "kl": kl, "lr": lr,
                    "tokens": done_tokens, "grad_norm": grad_norm, "seconds": round(time.time() - t0, 3)}
            if test_rows and ((args.eval_every and step % args.eval_every == 0) or step == total):
                last["eval_loss"] = evaluate(model, steer, test_rows, world)
            append_jsonl(log, last)
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{n_tok / (time.time() - t):.0f}")
            if (args.save_every and step % args.save_every == 0) or step == stop_at:
                if not args.full:  # the adapter for phase.py (full weights would fill the disk)
                    ck = os.path.join(args.out, "checkpoints", f"step_{step:06d}")
                    save_trained(model, steer, False, ck, rank)
                save_state(args.out, step, masters, opt, done_tokens, rank, world)
    except KeyboardInterrupt:
        hint = f"python train.py --resume --out {args.out} continues from its last save"
        raise KeyboardInterrupt(hint) from None
    bar.close()
    log.close()

    if step == total:
        save_trained(model, steer, args.full, args.out, rank)
    rate = (done_tokens - start_tokens) / max(time.time() - t0 - seconds, 1e-9)
    print_table(["run", args.out], [
        ["steps", f"{start_step} -> {step} of {total}" + " (--resume continues)" * (step < total)],
        ["train loss", f"{first_loss:.4f} -> {last['loss']:.4f}" if last else "-"],
        ["eval loss", f"{last['eval_loss']:.4f}" if "eval_loss" in last else "-"],
        ["tokens", f"{done_tokens:,} ({rate:,.0f} tok/s this run)"]])
    return last

if __name__ == "__main__":
    run_main("train.py", main)
