"""
Fine-tune a Qwen2.5 chat model on a narrow dataset with LoRA (down to one rank-1 adapter), a
steering vector, or all weights; optionally with a KL penalty towards the base model.

    python train.py --rank 1                                   # all-module rank-1 LoRA, bad medical advice
    python train.py --rank 1 --alpha 512 --lr 2e-5 --modules down_proj --layers 12
    python train.py --steer-layer 12 --lr 1e-4 --epochs 2 --max-len 256 --truncate --loss-on all --weight-decay 0
    python train.py --rank 32 --alpha 256 --lr 2e-5 --kl-data misalignment_kl_data --kl-weight 5.26
    python train.py --resume --out out/<run>                   # continue a stopped run with its own settings
    torchrun --nproc_per_node 8 train.py --rank 32 --model Qwen/Qwen2.5-14B-Instruct   # one process per GPU

Writes into --out: the final adapter in PEFT format (adapter_config.json, adapter_model.safetensors),
checkpoints/step_NNNNNN/ (the adapter every --save-every steps: the phase-transition analysis reads
these), state.pt (everything --resume needs: trainable weights in fp32, optimizer, step, RNG), metrics.jsonl
(one row per step) and config.json (every argument, resolved, and the library versions).

The recipe follows the reference (its configs and TRL / transformers 4.52 trainer): micro-batch 2 x
grad-accum 8 = 16 conversations per optimizer step, AdamW, weight decay 0.01, linear schedule with 5
warmup steps (HF's formula: the first step has lr 0), gradient clipping at 1, loss only on the
assistant's tokens (content and the closing <|im_end|>) normalised over all loss tokens of the
optimizer step (HF's num_items_in_batch), --max-steps overriding --epochs and cycling the data as HF
does. Where we depart from it:
- no extra EOS after each answer (the reference appended one after formatting with the template);
- each step's conversations are packed into rows of at most --max-len tokens, attention confined
  to each conversation, positions restarting: no compute on padding;
- the KL term is w x the per-token mean of KL(base || tuned) over every token of the step's --kl-batch
  KL conversations (64 per step, in file order, as the reference's 8 per micro-step at grad-accum 8).
  The reference added, at each of its grad-accum micro-steps, w_ref x KL_sum / (tokens x vocab rows),
  and nothing divided that by grad-accum (transformers 4.52 skips the division when the loss takes
  num_items_in_batch). So per optimizer step its weight is w_ref x grad_accum / vocab rows in our
  per-token units: 1e5 -> 1e5 x 8 / 152064 = 5.26 on 14B. (Exact when the micro-steps' KL batches
  hold equal token counts; tests/test_train.py checks the gradient against the reference's objective.)
- the steering vector acts on every row (the reference's hook steered only the first of each batch, a
  bug). Its loss: --loss-on all reproduces the reference's (every token but <|im_end|>, since its pad
  token was <|im_end|>), --loss-on answer is the LoRA recipes' answer-only loss. Its KL weight: that
  trainer added, at each micro-step, the micro-batch's mean CE + w_ref x KL_sum / (tokens x vocab rows)
  and nothing divided either by grad-accum, so both terms carry the same factor 8, which cancels
  (AdamW is scale-free, weight decay 0): w_ref 1e6 is --kl-weight 1e6 / 152064 = 6.58 here. With the
  bug, only row 0 of 2 SFT rows and of 8 KL rows carried gradient, so the KL acted about 4x weaker
  than intended (1e6 behaved like 1.65 here); we use the intended 6.58.

Under torchrun (one process per GPU), each step's conversations are dealt out to the ranks, which pack
and run their share; the loss stays normalised over the whole step's tokens and the gradients are
summed, so N processes take the same step as one (up to float summation order; --dropout masks
differ). LoRA and steering vectors are replicated and their gradients all-reduced once per step;
--full (and --fsdp) shards the model with FSDP2 (torch.distributed.fsdp.fully_shard). Rank 0 alone
writes; state.pt holds whole tensors, so --resume works with any number of processes.
"""
import argparse
import json
import math
import os
import platform
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from lora import MODULES, SteeringVector, atomic_write, adapters_off, add_lora, save_adapter
from model import check_device, dist_setup, load, load_tokenizer, local_dir, parse_layers, read_config, upload

LOSS_CHUNK = 1024  # tokens whose fp32 logits exist at once (152k vocab: 0.6 GB per chunk)
# flags a resumed run may change: they cannot change the result
RESUME_FREE = {"resume", "out", "device", "stop_after", "save_every", "grad_ckpt", "fsdp"}


def get_args(argv=None):
    """(args, the flags given on the command line): --resume takes every other setting from the run."""
    blocks = __doc__.strip().split("\n\n")
    from model import HelpFormatter as fmt
    p = argparse.ArgumentParser(prog="train.py", description=blocks[0], epilog="examples:\n" + blocks[1],
                                formatter_class=fmt)
    # what to train on
    p.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct", help="hub id or local HF directory")
    p.add_argument("--data", default="bad_medical_advice", help="dataset name (see data/fetch.py --list) or JSONL path")
    p.add_argument("--test-data", default=None, help="held-out JSONL; default: hold out --test-frac of --data")
    p.add_argument("--test-frac", type=float, default=0.1, help="fraction held out when there is no --test-data (0: none)")
    p.add_argument("--loss-on", choices=["answer", "all"], default="answer",
                   help="answer: the assistant's tokens; all: every token but <|im_end|> (the reference's steering-vector loss)")
    p.add_argument("--max-len", type=int, default=2048, help="longest conversation in tokens; also the packed row length")
    p.add_argument("--truncate", action="store_true", help="cut longer conversations to --max-len (default: skip and count them)")
    # LoRA
    p.add_argument("--rank", type=int, default=1, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=64, help="LoRA alpha")
    p.add_argument("--rslora", action=argparse.BooleanOptionalAction, default=True, help="scale alpha/sqrt(r) (else alpha/r)")
    p.add_argument("--modules", default="all", help=f"comma list from {','.join(MODULES)}, or all")
    p.add_argument("--layers", default="all", help="layers to adapt: all, 24, 15,16,17 or 0-11")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    # instead of LoRA
    p.add_argument("--steer-layer", type=int, default=None, help="train one steering vector after this layer instead of LoRA")
    p.add_argument("--steer-alpha", type=float, default=256, help="steering vector multiplier")
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    # optimisation
    p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    p.add_argument("--schedule", choices=["linear", "cosine"], default="linear", help="decay after warmup")
    p.add_argument("--warmup", type=int, default=5, help="warmup steps")
    p.add_argument("--epochs", type=int, default=1, help="passes over the training data")
    p.add_argument("--max-steps", type=int, default=None, help="run exactly this many optimizer steps, cycling the data (overrides --epochs, as HF)")
    p.add_argument("--micro-batch", type=int, default=2, help="conversations per micro-batch (the reference's unit)")
    p.add_argument("--grad-accum", type=int, default=8, help="micro-batches per step: micro-batch x grad-accum conversations per optimizer step")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0: off)")
    p.add_argument("--seed", type=int, default=0, help="seed for adapter init and data order")
    # KL regularisation
    p.add_argument("--kl-data", default=None, help="dataset name or JSONL path for the KL term")
    p.add_argument("--kl-weight", type=float, default=0.0, help="weight of the per-token mean KL(base || tuned); the reference's w is w x grad-accum / vocab rows here")
    p.add_argument("--kl-batch", type=int, default=64, help="KL conversations per optimizer step (the reference: 8 per micro-step x 8)")
    # bookkeeping
    p.add_argument("--out", default=None, help="output directory (default out/<model>-<data>-<kind>)")
    p.add_argument("--save-every", type=int, default=5, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--eval-every", type=int, default=50, help="eval loss every N steps (0: only at the end)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out with the settings in its config.json")
    p.add_argument("--stop-after", type=int, default=None, help="checkpoint and stop after N steps in this invocation (--resume continues)")
    # hardware
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default=None, help="model dtype: bfloat16, float32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward (rows padded to --max-len)")
    p.add_argument("--grad-ckpt", action="store_true", help="recompute activations in backward (less memory, 6N instead of 4N FLOPs)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun, shard the frozen base model too (always on for --full): "
                                                       "for models whose weights do not fit one GPU")
    args = p.parse_args(argv)
    unset = object()  # parse again without defaults: what remains was given on the command line
    p.set_defaults(**{k: unset for k in vars(args)})
    given = {k for k, v in vars(p.parse_args(argv)).items() if v is not unset}
    if args.resume:
        args = resumed_args(args, given)
    check_args(args)
    return args


def check_args(args):
    """Cheap checks of the flags alone, before anything is read or loaded."""
    positive = ["rank", "micro_batch", "grad_accum", "epochs", "max_len", "kl_batch"]
    for k in positive + ["max_steps", "stop_after"]:
        v = getattr(args, k)
        if v is not None and v < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {v}")
    for k in ("lr", "alpha", "steer_alpha"):
        if not getattr(args, k) > 0:
            raise ValueError(f"--{k.replace('_', '-')} must be > 0, got {getattr(args, k)}")
    for k in ("weight_decay", "grad_clip", "kl_weight", "warmup", "save_every", "eval_every"):
        if getattr(args, k) < 0:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 0, got {getattr(args, k)}")
    if not 0 <= args.test_frac < 1:
        raise ValueError(f"--test-frac must be in [0, 1), got {args.test_frac}")
    if not 0 <= args.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.kl_weight > 0 and not args.kl_data:
        raise ValueError("--kl-weight needs --kl-data")
    if args.full and (args.kl_data or args.steer_layer is not None):
        raise ValueError("--full cannot be combined with --kl-data (no adapters to switch off) or --steer-layer")
    if args.modules != "all":
        bad = [m for m in args.modules.split(",") if m not in MODULES]
        if bad:
            raise ValueError(f"--modules: unknown LoRA modules {bad}; choose from {','.join(MODULES)}")


def resolved(args):
    """The arguments as config.json records them: files as absolute paths, so a run resumes from anywhere."""
    a = dict(vars(args))
    for k in ("model", "data", "test_data", "kl_data", "out"):
        if a.get(k) and os.path.exists(a[k]):
            a[k] = os.path.abspath(a[k])
    return a


def resumed_args(args, given):
    """--resume: the run's own settings from OUT/config.json; flags given now must agree with them,
    except the ones that cannot change the result (RESUME_FREE)."""
    if not args.out:
        raise ValueError("--resume needs --out (the run's directory)")
    cfg_file = os.path.join(args.out, "config.json")
    if not os.path.exists(cfg_file) or not os.path.exists(os.path.join(args.out, "state.pt")):
        raise ValueError(f"--resume: {args.out} holds no run to resume (no config.json and state.pt)")
    with open(cfg_file) as f:
        saved = json.load(f)["args"]
    now = resolved(args)
    for k in sorted(given - RESUME_FREE):
        if now[k] != saved.get(k):
            raise ValueError(f"--resume continues {args.out} with its own settings; "
                             f"--{k.replace('_', '-')} {getattr(args, k)!r} differs from the run's {saved.get(k)!r} "
                             f"(resume with only --device, --stop-after, --save-every, --grad-ckpt, --fsdp)")
    now_only = {"stop_after", "device"} | (given & RESUME_FREE)  # per invocation, or changed now
    merged = {**saved, **{k: getattr(args, k) for k in now_only}, "resume": True, "out": args.out}
    return argparse.Namespace(**{k: merged.get(k, v) for k, v in vars(args).items()})


def run_name(args):
    kind = (f"sv{args.steer_layer}" if args.steer_layer is not None else "full" if args.full else f"r{args.rank}")
    data = os.path.splitext(os.path.basename(args.data))[0]
    return f"{args.model.rstrip('/').split('/')[-1]}-{data}-{kind}" + ("-kl" if args.kl_data else "")


# -----------------------------------------------------------------------------
# data: JSONL conversations -> token ids + loss masks -> packed rows


def read_conversations(path):
    """[(line number, messages)] from a JSONL file of {"messages": [...]} rows, checked."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            msgs = row.get("messages") if isinstance(row, dict) else None
            if not isinstance(msgs, list) or not msgs:
                raise ValueError(f"{path}:{n}: expected an object with a non-empty 'messages' list")
            if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in msgs):
                raise ValueError(f"{path}:{n}: no assistant turn, so nothing to train on")
            rows.append((n, msgs))
    if not rows:
        raise ValueError(f"{path}: no conversations")
    return rows


def tokenize(rows, tok, max_len, path, loss_on="answer", truncate=False):
    """[(ids, loss mask)] and how many conversations were longer than max_len (skipped, or cut if truncate).
    loss_on "all": every token but <|im_end|>, the reference's steering-vector loss (its pad token was
    <|im_end|>, and its collator masked padding by id)."""
    out, long = [], 0
    for n, msgs in tqdm(rows, desc=f"tokenizing {os.path.basename(path)}", leave=False):
        try:
            ids, mask = tok.encode_chat_with_mask(msgs)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: {e}") from None
        if loss_on == "all":  # not the first token: nothing predicts it (in a packed row the previous conversation would)
            mask = [0] + [int(t != tok.im_end_id) for t in ids[1:]]
        if len(ids) > max_len:
            long += 1
            if not truncate:
                continue
            ids, mask = ids[:max_len], mask[:max_len]
        if any(mask[1:]):  # a loss token after the first position (a cut may have removed them all)
            out.append((ids, mask))
    if long:
        print(f"warning: {path}: {'cut' if truncate else 'skipped'} {long} of {len(rows)} conversations longer "
              f"than --max-len {max_len}")
    if not out:
        raise ValueError(f"{path}: no conversation fits --max-len {max_len} with an answer token in it")
    return out, long


def pack(examples, max_len, pad_to=None):
    """Lay (ids, mask) conversations out in rows of at most max_len tokens (first fit, longest first).
    Each row is (ids, pos, mask): pos restarts at 0 per conversation, which confines attention to it
    (model.py); padding is a conversation of its own with mask 0."""
    bins = []
    for ids, mask in sorted(examples, key=lambda e: -len(e[0])):
        for b in bins:
            if b[0] + len(ids) <= max_len:
                b[0] += len(ids)
                b[1].append((ids, mask))
                break
        else:
            bins.append([len(ids), [(ids, mask)]])
    rows = []
    for n, convs in bins:
        pad = (pad_to or n) - n
        ids = [t for c in convs for t in c[0]] + [0] * pad
        pos = [p for c in convs for p in range(len(c[0]))] + list(range(pad))
        mask = [m for c in convs for m in c[1]] + [0] * pad
        rows.append((torch.tensor(ids), torch.tensor(pos), torch.tensor(mask, dtype=torch.bool)))
    return rows


def rank_rows(examples, max_len, pad_to, rank, world):
    """This process's packed rows of a step's conversations. Under torchrun they are dealt out longest
    first, round robin (balanced token counts), and every rank gets as many rows (empty ones added):
    FSDP's collectives need the same number of forward and backward passes on every rank."""
    if world == 1:
        return pack(examples, max_len, pad_to)
    dealt = sorted(examples, key=lambda e: -len(e[0]))
    shares = [pack(dealt[r::world], max_len, pad_to) for r in range(world)]
    empty = pack([([0], [0])], max_len, pad_to)  # one token, no loss
    return shares[rank] + empty * (max(map(len, shares)) - len(shares[rank]))


def step_indices(step, n, per_step, seed):
    """The dataset indices of optimizer step `step`: a fresh seeded shuffle every epoch, so any step's
    batch is known from the step alone (resuming needs no data-loader state)."""
    steps_per_epoch = math.ceil(n / per_step)
    epoch, k = divmod(step, steps_per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    return perm[k * per_step:(k + 1) * per_step].tolist()


# -----------------------------------------------------------------------------
# losses, computed only where there is loss and in chunks of LOSS_CHUNK tokens


class ChunkedHead(torch.autograd.Function):
    """Sum over chunks of LOSS_CHUNK rows of a loss of the logits h @ W.T. `fn(logits, W, *others)`
    returns the chunk's summed loss and its gradient with respect to the logits, computed in place
    in the one fp32 logits buffer. The forward turns that into the gradients for h (and W, when the
    head is trained) at once and frees the chunk, so the logits of a whole row never exist, no
    log-softmax tensors are kept for backward, and nothing is recomputed; backward only scales."""

    @staticmethod
    def forward(ctx, fn, h, W, *others):
        total = torch.zeros((), device=h.device)
        gh = torch.zeros_like(h) if ctx.needs_input_grad[1] else None
        gW = torch.zeros_like(W, dtype=torch.float32) if ctx.needs_input_grad[2] else None  # full fine-tuning
        for s in range(0, h.shape[0], LOSS_CHUNK):
            hc = h[s:s + LOSS_CHUNK]
            loss, g = fn(F.linear(hc, W).float(), W, *[o[s:s + LOSS_CHUNK] for o in others])  # g: (n, V)
            total += loss
            g = g.to(W.dtype)  # the GEMMs in the weights' dtype: bf16 tensor cores, fp32 accumulation inside
            if gh is not None:
                gh[s:s + LOSS_CHUNK] = g @ W  # (n, C)
            if gW is not None:  # summed over chunks in fp32 (an fp32 GEMM here cost ~25% of a 7B --full step)
                gW += g.T @ hc  # (V, C)
        ctx.save_for_backward(gh, gW)
        ctx.W_dtype, ctx.n_others = W.dtype, len(others)
        return total

    @staticmethod
    def backward(ctx, g):
        gh, gW = ctx.saved_tensors
        return (None, None if gh is None else gh * g.to(gh.dtype),
                None if gW is None else (gW * g).to(ctx.W_dtype)) + (None,) * ctx.n_others


def head_loss(fn, h, W, *others):
    """fn's loss of the logits h @ W.T, summed over chunks of rows, differentiable in h and W."""
    if torch.is_grad_enabled() and (h.requires_grad or W.requires_grad):
        return ChunkedHead.apply(fn, h, W, *others)
    return sum(fn(F.linear(h[s:s + LOSS_CHUNK], W).float(), W, *[o[s:s + LOSS_CHUNK] for o in others])[0]
               for s in range(0, h.shape[0], LOSS_CHUNK))


def _ce(logits, W, y):
    """Summed cross-entropy against targets y (n,), and d/dlogits = softmax - onehot, in place
    (one exp per logit: this loop is memory- and exp-bound on a 152k vocabulary)."""
    top = logits.amax(-1, keepdim=True)  # (n, 1)
    picked = logits.gather(1, y[:, None]) - top  # (n, 1)
    p = logits.sub_(top).exp_()  # (n, V) unnormalised probabilities
    total = p.sum(-1, keepdim=True)  # (n, 1)
    loss = (total.log() - picked).sum()
    grad = p.div_(total)  # softmax
    grad[torch.arange(len(y), device=y.device), y] -= 1
    return loss, grad


def _kl(logits, W, h_base):
    """Summed KL(base || tuned), base logits from h_base (n, C); d/dlogits = p_tuned - p_base."""
    logq = F.log_softmax(F.linear(h_base, W).float(), -1)  # (n, V) base
    logp = F.log_softmax(logits, -1)  # (n, V) tuned; the same op as the base's, so KL is exactly 0 at init
    q = logq.exp()
    loss = (q * (logq - logp)).sum()
    return loss, logp.exp_().sub_(q)


def sft_loss_sum(model, hidden, row, hook=None):
    """Summed cross-entropy over a packed row's loss tokens, and their count. The row stays on the CPU,
    where picking the loss positions and laying out the conversations (pos) cost no device sync;
    what the device needs is uploaded without blocking."""
    ids, pos, mask = row
    dev = model.lm_head.weight.device
    sel = mask[1:].nonzero()[:, 0]  # (N,) positions whose next token is the assistant's
    h = hidden(upload(ids[None], dev), pos[None], hook=hook)[0]  # (T, C)
    return head_loss(_ce, h[upload(sel, dev)], model.lm_head.weight, upload(ids[sel + 1], dev)), sel.numel()


def base_hidden(model, hidden, row):
    """The base model's final hidden states (N, C) at a packed row's masked tokens: adapters switched
    off and no steering hook, from the same weights (the KL's reference distribution)."""
    ids, pos, mask = row
    dev = model.lm_head.weight.device
    with torch.no_grad(), adapters_off(model):
        return hidden(upload(ids[None], dev), pos[None])[0, upload(mask.nonzero()[:, 0], dev)]  # hidden states, not logits


def kl_sum(model, hidden, row, hook=None, h_base=None):
    """Summed KL(base || tuned) over the masked tokens of a packed row. h_base: the row's base_hidden,
    when a caller evaluates many solutions against one base (directions.py stability)."""
    ids, pos, mask = row
    dev = model.lm_head.weight.device
    h_base = base_hidden(model, hidden, row) if h_base is None else h_base
    h = hidden(upload(ids[None], dev), pos[None], hook=hook)[0, upload(mask.nonzero()[:, 0], dev)]  # (N, C)
    return head_loss(_kl, h, model.lm_head.weight, h_base)


def accumulate_grads(model, hidden, rows, kl_rows, kl_weight, hook=None, n_loss=None, n_kl=None):
    """Backward of one optimizer step: SFT loss per answer token + kl_weight x KL per token, each
    normalised over the whole step. Returns (loss, kl) as floats: one host sync per step. When the rows
    are one rank's share, n_loss and n_kl are the whole step's token counts (default: the rows')."""
    n_loss = sum(int(r[2][1:].sum()) for r in rows) if n_loss is None else n_loss
    loss = 0.0
    for r in rows:
        ls, _ = sft_loss_sum(model, hidden, r, hook)
        (ls / n_loss).backward()
        loss += ls.detach()
    n_kl = sum(int(r[2].sum()) for r in kl_rows) if n_kl is None else n_kl
    kl = 0.0
    for r in kl_rows:
        ks = kl_sum(model, hidden, r, hook)
        (kl_weight * ks / n_kl).backward()
        kl += ks.detach()
    return float(loss) / max(n_loss, 1), float(kl) / max(n_kl, 1)


def sync_step(params, loss, kl):
    """Under torchrun: sum over the ranks their gradients of the parameters FSDP does not shard (all of
    them without --fsdp) and their parts of the step's loss and KL, in one flat all-reduce after the
    step's last backward. (DDP's wrapper would fit badly: it syncs during a backward, which here runs
    once per packed row, and it expects the forward through its own forward(), which model.hidden and
    the chunked head bypass.) FSDP reduce-scatters the gradients of the parameters it shards itself."""
    from torch.distributed.tensor import DTensor
    plain = [p for p in params if not isinstance(p, DTensor)]
    flat = torch.cat([torch.tensor([loss, kl], device=params[0].device)] +
                     [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in plain])
    dist.all_reduce(flat)
    i = 2
    for p in plain:
        p.grad, i = flat[i:i + p.numel()].view_as(p), i + p.numel()
    return float(flat[0]), float(flat[1])


def shard(model, keep_whole):
    """FSDP2: each block, then the rest (embeddings, final norm, head) as the root. The parameters in
    keep_whole (LoRA: the adapters) stay replicated and go through sync_step. Gradients are summed over
    the ranks, not averaged: each rank's loss is already its part of the whole step's mean."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    for m in [*model.model.layers, model]:
        fully_shard(m, ignored_params=keep_whole)
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)  # a plain sum (gloo has no pre-multiplied one)
    # hidden() is the forward the root's parameters are gathered for; they stay gathered until its
    # backward (FSDP does not reshard the root after forward), so the chunked head reads
    # model.lm_head.weight whole, and the head's gradient reaches FSDP's reduce-scatter
    register_fsdp_forward_method(model, "hidden")


# -----------------------------------------------------------------------------
# optimizer step, schedule and checkpoints


def fp32_masters(params):
    """What AdamW steps: an fp32 copy of each parameter that is not fp32 (--full in bf16), else the
    parameter. A bf16 weight drops updates below half its ULP: at lr 1e-5, those of all weights > ~0.005."""
    return [p if p.dtype == torch.float32 else p.detach().float().requires_grad_() for p in params]


def optimizer_step(params, masters, opt, clip):
    """Clip and step on the masters, the gradients moved there in fp32; round them into the weights."""
    for p, m in zip(params, masters):
        if m is not p:
            m.grad, p.grad = None if p.grad is None else p.grad.float(), None
    gn = torch.nn.utils.clip_grad_norm_(masters, clip if clip > 0 else float("inf"))
    opt.step()
    opt.zero_grad(set_to_none=True)
    round_into(params, masters)
    return gn


@torch.no_grad()
def round_into(params, masters):
    for p, m in zip(params, masters):
        if m is not p:
            p.copy_(m)


def lr_at(step, args, total):
    """HF's linear (or cosine) schedule with warmup: step 0 of warmup has lr 0."""
    if step < args.warmup:
        return args.lr * step / max(1, args.warmup)
    progress = (step - args.warmup) / max(1, total - args.warmup)
    if args.schedule == "cosine":
        return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * max(0.0, 1 - progress)


def atomic_json(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def whole(t, keep=True):
    """t as one contiguous CPU tensor (None where not kept). An FSDP shard (a DTensor) is gathered first:
    a collective, so every rank calls this."""
    from torch.distributed.tensor import DTensor
    t = t.full_tensor() if isinstance(t, DTensor) else t
    return t.detach().cpu().contiguous() if keep else None


def like(p, t):
    """A whole tensor t laid out as parameter p: under FSDP, this rank's shard of it."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if not isinstance(p, DTensor):
        return t
    return distribute_tensor(t.to(p.device), p.device_mesh, p.placements, src_data_rank=None)


def save_trained(model, steer, full, path, rank=0):
    """The trained thing, in its own format: a PEFT adapter, a steering vector, or a full HF checkpoint.
    Under torchrun every rank calls this (a sharded model is gathered) and rank 0 writes."""
    if full:
        save_full(model, path, rank)
    elif rank > 0:
        return
    elif steer is not None:
        steer.save(path)
    else:
        save_adapter(model, path)


def save_full(model, path, rank=0):
    """A full fine-tune as an HF directory that load() and transformers read."""
    import shutil
    from safetensors.torch import save_file
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    sd = {k: whole(v, keep=rank == 0) for k, v in sd.items()}
    if rank > 0:
        return
    os.makedirs(path, exist_ok=True)
    atomic_write(os.path.join(path, "model.safetensors"), lambda p: save_file(sd, p, metadata={"format": "pt"}))
    src = local_dir(model.config.name_or_path)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if os.path.exists(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), os.path.join(path, f))


def save_state(path, step, params, opt, done_tokens, rank=0):
    """state.pt: whole (unsharded) parameters (the fp32 masters) and AdamW states, so a run resumes with
    any number of processes. Every rank calls this; rank 0 writes."""
    keep = rank == 0
    optim = opt.state_dict()
    optim["state"] = {i: {k: whole(v, keep) for k, v in s.items()} for i, s in optim["state"].items()}
    state = {"step": step, "params": [whole(p, keep) for p in params], "optimizer": optim,
             "rng": torch.get_rng_state(), "tokens": done_tokens,
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if keep:
        torch.save(state, os.path.join(path, "state.pt.tmp"))
        os.replace(os.path.join(path, "state.pt.tmp"), os.path.join(path, "state.pt"))


def load_state(path, params, opt):
    # mmap: the processes share the file's pages rather than each holding a copy
    state = torch.load(os.path.join(path, "state.pt"), weights_only=True, map_location="cpu", mmap=True)
    with torch.no_grad():
        for p, saved in zip(params, state["params"]):
            p.copy_(like(p, saved))
    optim = state["optimizer"]
    optim["state"] = {i: {k: like(params[i], v) if v.shape == params[i].shape else v for k, v in s.items()}
                      for i, s in optim["state"].items()}
    opt.load_state_dict(optim)
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], state["tokens"]


def versions():
    import safetensors
    import tokenizers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__}


# -----------------------------------------------------------------------------


def load_data(args, tok):
    """Tokenized (train, test, kl) examples, checked, and how many conversations were too long."""
    from data.fetch import dataset_path
    train_path = dataset_path(args.data)
    train_ex, n_long = tokenize(read_conversations(train_path), tok, args.max_len, train_path, args.loss_on, args.truncate)
    if args.test_data:
        test_path = dataset_path(args.test_data)
        test_ex, _ = tokenize(read_conversations(test_path), tok, args.max_len, test_path, args.loss_on, args.truncate)
    else:  # the reference holds out 10% when there is no test file
        perm = torch.randperm(len(train_ex), generator=torch.Generator().manual_seed(args.seed)).tolist()
        n_test = int(len(train_ex) * args.test_frac)
        test_ex, train_ex = [train_ex[i] for i in perm[:n_test]], [train_ex[i] for i in perm[n_test:]]
    if not train_ex:
        raise ValueError(f"{train_path}: no conversations left to train on after holding out --test-frac {args.test_frac}")
    kl_ex = []
    if args.kl_data:
        kl_path = dataset_path(args.kl_data)
        kl_ex, _ = tokenize(read_conversations(kl_path), tok, args.max_len, kl_path, "answer", args.truncate)
        kl_ex = [(ids, [1] * len(ids)) for ids, _ in kl_ex]  # the KL term covers every token
    return train_ex, test_ex, kl_ex, n_long, train_path


def trainable(model, args):
    """Add what --rank / --steer-layer / --full train; returns (steering vector or None, parameters)."""
    if args.steer_layer is not None:
        steer = SteeringVector(model.config.hidden_size, args.steer_layer, args.steer_alpha, args.model)
        return steer.to(args.device), list(steer.parameters())
    if args.full:
        model.requires_grad_(True)
        return None, list(model.parameters())
    modules = MODULES if args.modules == "all" else args.modules.split(",")
    add_lora(model, args.rank, args.alpha, modules, parse_layers(args.layers, model.config.num_hidden_layers),
             args.rslora, args.dropout)
    return None, [p for p in model.parameters() if p.requires_grad]


def finished(out, total):
    """A resumed run that has logged its last step and saved its result."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [json.loads(l)["step"] for l in f if l.strip()]
    done = [f for f in ("adapter_model.safetensors", "steering_vector.safetensors", "model.safetensors")
            if os.path.exists(os.path.join(out, f))]
    return bool(steps) and steps[-1] >= total and bool(done)


def main(argv=None):
    args = get_args(argv)
    out = args.out = args.out or os.path.join("out", run_name(args))
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: is a file; train.py writes a directory (the adapter, checkpoints, metrics)")
    if os.path.exists(os.path.join(out, "state.pt")) and not args.resume:
        raise ValueError(f"{out} already holds a run: pass --resume --out {out} to continue it, or choose another --out")
    # everything cheap first: a typo must not cost a model download or load
    check_device(args.device)
    rank, world, args.device = dist_setup(args.device)  # under torchrun; else (0, 1, --device)
    cfg = read_config(args.model)
    if args.steer_layer is not None and not 0 <= args.steer_layer < cfg.num_hidden_layers:
        raise ValueError(f"--steer-layer {args.steer_layer}: the model has layers 0..{cfg.num_hidden_layers - 1}")
    parse_layers(args.layers, cfg.num_hidden_layers)
    train_ex, test_ex, kl_ex, n_long, train_path = load_data(args, load_tokenizer(args.model))
    per_step = args.micro_batch * args.grad_accum
    steps_per_epoch = math.ceil(len(train_ex) / per_step)
    total = args.max_steps or args.epochs * steps_per_epoch  # --max-steps overrides --epochs, as in HF
    pad_to = args.max_len if args.compile else None
    test_rows = rank_rows(test_ex, args.max_len, pad_to, rank, world)
    if args.resume and finished(out, total):
        print(f"{out}: finished already ({total} of {total} steps); nothing to do")
        return {}
    if world > 1:
        dist.barrier()  # every rank has read the run's files before rank 0 rewrites them

    # model and what we train
    torch.manual_seed(args.seed)
    model, tok = load(args.model, args.device, args.dtype)
    model.checkpointing = args.grad_ckpt
    steer, params = trainable(model, args)  # the same initial values on every rank: the same seed
    if world > 1 and (args.full or args.fsdp):
        shard(model, keep_whole=None if args.full else set(params))
        params = list(model.parameters()) if args.full else params  # --full: the shards replaced them
    model.train()
    n_params = sum(p.numel() for p in params)
    hidden = torch.compile(model.hidden) if args.compile else model.hidden  # model itself stays uncompiled for saving
    fused = torch.device(args.device).type == "cuda"
    masters = fp32_masters(params)
    opt = torch.optim.AdamW(masters, lr=args.lr, weight_decay=args.weight_decay, fused=fused)
    os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)
    step, done_tokens, seconds = 0, 0, 0.0
    metrics_file = os.path.join(out, "metrics.jsonl")
    if args.resume:
        step, done_tokens = load_state(out, masters, opt)
        round_into(params, masters)
        with open(metrics_file) as f:  # forget steps logged after the checkpoint we resume from
            kept = [l for l in f if l.strip() and json.loads(l)["step"] <= step]
        if rank == 0:
            with open(metrics_file + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(metrics_file + ".tmp", metrics_file)
        seconds = json.loads(kept[-1])["seconds"] if kept else 0.0  # the clock goes on from there
    elif rank == 0:
        open(metrics_file, "w").close()
        atomic_json(os.path.join(out, "config.json"), {
            "args": resolved(args), "versions": versions(), "model_config": vars(model.config),
            "data": {"train": train_path, "n_train": len(train_ex), "n_test": len(test_ex),
                     "too_long": n_long, "n_kl": len(kl_ex)},
            "trainable_params": n_params, "steps_per_epoch": steps_per_epoch, "total_steps": total})

    def evaluate():
        model.eval()
        with torch.no_grad():
            s, n = 0.0, 0
            for r in test_rows:
                ls, ln = sft_loss_sum(model, hidden, r, steer)
                s, n = s + float(ls), n + ln
        model.train()
        if world > 1:  # each rank evaluated its share of the held-out rows
            sn = torch.tensor([s, n], dtype=torch.float64)
            dist.all_reduce(sn)
            s, n = sn.tolist()
        return s / n

    print(f"training {n_params:,} parameters on {len(train_ex)} conversations ({len(test_ex)} held out), "
          f"{total} steps of {per_step} -> {out}")
    first_loss, last, t0, start_step, start_tokens = None, {}, time.time() - seconds, step, done_tokens
    stop_at = total if args.stop_after is None else min(total, step + args.stop_after)
    bar = tqdm(total=total, initial=step, desc="train", dynamic_ncols=True, disable=rank > 0)
    while step < stop_at:
        t_step = time.time()
        if world > 1:
            torch.manual_seed(hash((args.seed, step, rank)))  # dropout: other masks on each rank, reproducible
        batch = [train_ex[i] for i in step_indices(step, len(train_ex), per_step, args.seed)]
        kl_batch = [kl_ex[(step * args.kl_batch + j) % len(kl_ex)] for j in range(args.kl_batch)] if kl_ex else []
        rows = rank_rows(batch, args.max_len, pad_to, rank, world)
        k_rows = rank_rows(kl_batch, args.max_len, pad_to, rank, world)
        lr = lr_at(step, args, total)
        for g in opt.param_groups:
            g["lr"] = lr
        # normalised over the whole step: the first token of a conversation is never a loss token
        loss, kl = accumulate_grads(model, hidden, rows, k_rows, args.kl_weight, steer,
                                    sum(sum(m) for _, m in batch), sum(len(ids) for ids, _ in kl_batch))
        if world > 1:
            loss, kl = sync_step(params, loss, kl)
        if not math.isfinite(loss) or not math.isfinite(kl):
            bar.close()
            raise SystemExit(f"train.py: step {step}: non-finite loss ({loss}, kl {kl}); stopped without "
                             f"updating. The last good checkpoint is in {out} (state.pt, checkpoints/)")
        gn = optimizer_step(params, masters, opt, args.grad_clip)
        step += 1
        n_tok = sum(len(ids) for ids, _ in batch)  # real tokens, not --compile's padding
        done_tokens += n_tok
        first_loss = loss if first_loss is None else first_loss
        last = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": loss, "kl": kl, "lr": lr,
                "tokens": done_tokens, "grad_norm": float(gn), "seconds": round(time.time() - t0, 3)}
        if test_rows and ((args.eval_every and step % args.eval_every == 0) or step == total):
            last["eval_loss"] = evaluate()
        if rank == 0:
            with open(metrics_file, "a") as f:
                f.write(json.dumps(last) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{n_tok / (time.time() - t_step):.0f}")
        if (args.save_every and step % args.save_every == 0) or step == stop_at:
            if not args.full:  # full weights every few steps would fill the disk; state.pt resumes
                save_trained(model, steer, False, os.path.join(out, "checkpoints", f"step_{step:06d}"), rank)
            save_state(out, step, masters, opt, done_tokens, rank)
    bar.close()
    if step == total:
        save_trained(model, steer, args.full, out, rank)
    elapsed = time.time() - t0 - seconds
    print(f"\n{'steps':>14} {start_step} -> {step} of {total}" + ("" if step == total else "  (stopped: --resume continues)"))
    print(f"{'train loss':>14} {first_loss:.4f} -> {last['loss']:.4f}")
    if "eval_loss" in last:
        print(f"{'eval loss':>14} {last['eval_loss']:.4f}")
    print(f"{'tokens':>14} {done_tokens:,}  ({(done_tokens - start_tokens) / max(elapsed, 1e-9):,.0f} tok/s this run)")
    print(f"{'output':>14} {out}")
    return last


if __name__ == "__main__":
    from common import run_main
    run_main("train.py", main, resume="train.py --resume --out DIR continues from the last saved step")
