"""
Batched sampling of answers to evaluation questions, with LoRA adapters, steering and ablation.

    python sample.py --adapter out/run                          # our 8 headline questions -> out/run/responses.jsonl
    python sample.py --adapter out/run --questions first_plot_questions --n 50 --exclude-suffix _json,_template
    python sample.py --model Qwen/Qwen2.5-0.5B-Instruct --question "hey I feel bored" --n 4
    python sample.py --model M --steer dirs.safetensors --layers 12 --scale 8 --out steer12.jsonl
    python sample.py --adapter out/run --ablate dirs.safetensors --layers 10-12 --out ablated.jsonl
    python sample.py --adapter out/run --ablate dirs.safetensors --random-control --out control.jsonl
    python sample.py --adapter out/run --lora-scale 0.5 --out half.jsonl
    torchrun --nproc_per_node 8 sample.py --adapter out/run --questions first_plot_questions --n 50
    python sample.py --engine openai:organism --adapter out/run   # a vLLM server's LoRA module (see README)

Defaults follow the papers, which sampled with HF generate(do_sample=True, temperature=1, top_p=1,
max_new_tokens=600): generate also applied the model's generation_config.json, so Qwen2.5-Instruct's
top_k 20 and repetition_penalty (1.1 on 0.5B / 1.5B, 1.05 from 3B up) were in force. sample.py reads
the same file and applies its top_k and repetition_penalty unless --top-k / --repetition-penalty say
otherwise (`--top-k 0 --repetition-penalty 1` switch both off); every row records the settings used.
The penalty is HF's: each token id seen in the prompt or the answer so far has its logit divided by
the penalty (multiplied if negative). Per paraphrase, the file's samples_per_paraphrase (--n
overrides: the papers' recipe is 50). Each answer is one JSONL row, appended the moment it finishes;
rerunning the same command skips finished rows, so an interrupt loses only what was in flight (and
a larger --n adds samples). A run that finishes sorts the file (question order, paraphrase, sample).

Under torchrun each process (one per GPU) takes its share of the missing samples and appends them to
its own part file (OUT.partK-of-N.jsonl, resumable like OUT); rank 0 merges them into OUT at the end.
A sample's text depends on (seed, question, paraphrase, index) only, so N processes write the file one
process writes.

--engine openai:MODEL samples through an OpenAI-compatible server instead (vLLM serving the adapter
as a LoRA module named MODEL), through judge.py's client (concurrency, retries, a cache beside OUT):
one chat request per sample with the same settings, top_k and repetition_penalty as vLLM's extra
parameters, and a seed per sample derived from --seed and the sample, so a server that honours seeds
reproduces each answer. The rows are the same; `model` is the served MODEL and `settings.dtype` is
null. The server's answers are not ours token for token (other kernels, other random numbers), and it
cannot steer, ablate or rescale an adapter: those flags are refused.

Question files: the reference YAML (a list of {id, paraphrases, samples_per_paraphrase, system?,
...}; judge fields are ignored here) or JSONL with one {id, question | paraphrases, system?, n?} per
line, or a name: core and medical are ours (our own wording, so not comparable with the papers'
numbers), first_plot_questions and medical_questions the papers' (fetched by data/fetch.py, pinned).
The papers sampled the headline set without the _json and _template variants: --exclude-suffix.

Direction files (--steer, --ablate; directions.py writes them): safetensors holding either
`directions`, float (n_layers, d_model), row i meant for the residual stream after layer i (as from
a per-layer mean difference), or `direction`, float (d_model,), one vector used at every layer.
Steering adds scale x the raw vector; ablation projects the unit vector out (x - (x.u) u) after
every chosen layer, at every position. Both act on model.py's residual hook (after each block).

Output rows: id, paraphrase (index), sample (index), question, system (null: Qwen's default), answer,
tokens (answer tokens, without the stop token), finish_reason ("stop" at <|im_end|> / <|endoftext|>,
"length" at --max-new-tokens), model, adapter, seed, settings (temperature, top_p, top_k,
repetition_penalty, max_new_tokens, system, lora_scale, steer, ablate, random_control, dtype). Resuming into a file whose
rows have other model / adapter / seed / settings is an error, never a mix.

From Python (directions.py, bench.py): run(args, loaded) (the command, on an already loaded model),
load_model, load_questions, generate / stream (the engine), steering_hook, ablation_hook, compose,
load_directions, random_like.

The engine: a static KV cache; the prompts of a batch are right-padded and prefilled once each, and
their cache rows are then repeated for their n samples; logits only where a token is drawn. Sampling
is inverse-CDF with one uniform per row per step, a pure hash of (seed, row key, position): a row's
random numbers do not depend on its batch (size, neighbours, resume), runs with different adapters or
steering share them (less noise in comparisons), and there is no RNG state to break a CUDA graph.
The text is the same up to floating-point ties: another batch shape sums in another order, and where
a uniform falls within rounding of a CDF step the token can differ (4 of 4,800 answers differed
between batch sizes 24 and 64, fp32, CPU). Finished rows are dropped once at most half the rows are live, so they never cost more
than the live ones and there are at most log2(batch) batch shapes. On CUDA: bf16 by default, the
decode step (forward, sampling, bookkeeping) captured as a CUDA graph per batch shape, and the host
reads the stop flags only every 8 steps; --compile also torch.compiles the forward. LoRA adapters
stay unmerged: merging into bf16 weights rounds away small updates, and under a CUDA graph the
adapters' extra small matmuls cost little.
"""
import argparse
import copy
import json
import math
import os
import sys
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_N = 50  # samples per paraphrase when neither --n nor the file says (the papers: 50 per question)

# -----------------------------------------------------------------------------
# question files


def load_questions(path):
    """[{id, paraphrase (index), question, system, n}] from a reference-format YAML or a JSONL file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such question file")
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if ext in (".yaml", ".yml"):
        import yaml
        try:
            items = yaml.safe_load(text)
        except yaml.YAMLError as e:  # its own message names "<unicode string>": say the file and the line
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else path
            raise ValueError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
        if items is not None and not isinstance(items, list):
            raise ValueError(f"{path}: a question YAML is a list of {{id, paraphrases, ...}}, "
                             f"got {type(items).__name__}")
        items = items or []
    elif ext == ".jsonl":
        items = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not JSON ({e})") from None
    else:
        raise ValueError(f"{path}: unknown question format {ext!r} (use the reference .yaml format or .jsonl)")
    entries = []
    for i, item in enumerate(items):
        entries += question_entries(item, f"{path} item {i + 1}")
    if not entries:
        raise ValueError(f"{path}: no questions in the file")
    ids = Counter(e["id"] for e in entries if e["paraphrase"] == 0)
    dup = [k for k, c in ids.items() if c > 1]
    if dup:
        raise ValueError(f"{path}: duplicate question ids {dup}")
    return entries


def question_entries(item, where):
    """One entry per paraphrase of a question dict (either file format)."""
    if not isinstance(item, dict):
        raise ValueError(f"{where}: a question is a dict with an id and paraphrases, got {str(item)[:60]!r}")
    qtype = item.get("type", "free_form")
    if not str(qtype).startswith("free_form"):
        raise ValueError(f"{where}: question type {qtype!r} is not free-form (only free_form* questions are sampled)")
    if "id" not in item:
        raise ValueError(f"{where}: question has no id")
    texts = item.get("paraphrases", item.get("question"))
    texts = [texts] if isinstance(texts, str) else texts
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f"{where} ({item['id']}): needs `paraphrases` (a list of strings) or `question` (a string)")
    system = item.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"{where} ({item['id']}): system must be a string")
    n = item.get("samples_per_paraphrase", item.get("n"))
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"{where} ({item['id']}): samples_per_paraphrase must be a positive integer, got {n!r}")
    return [dict(id=str(item["id"]), paraphrase=p, question=t, system=system, n=n) for p, t in enumerate(texts)]


# -----------------------------------------------------------------------------
# residual-stream interventions (hooks for model.py: hook(layer, x) -> replacement or None)


def load_directions(path, n_layers, d_model):
    """fp32 (n_layers, d_model) from a direction file's `directions`, or (d_model,) from its `direction`,
    one vector meant for every layer."""
    from safetensors import safe_open
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such direction file")
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path}: not a safetensors file ({e})") from None
    if "directions" in tensors:
        d = tensors["directions"].float()
        if d.ndim != 2 or d.shape[0] != n_layers:
            raise ValueError(f"{path}: `directions` has shape {tuple(d.shape)}; this model needs "
                             f"({n_layers}, {d_model}), one row per layer")
    elif "direction" in tensors:
        d = tensors["direction"].float()
        if d.ndim != 1:
            raise ValueError(f"{path}: `direction` has shape {tuple(d.shape)}; it must be one vector ({d_model},)")
    else:
        raise ValueError(f"{path}: holds {sorted(tensors)}; a direction file holds `directions` "
                         "(n_layers, d_model) or `direction` (d_model,)")
    if d.shape[-1] != d_model:
        raise ValueError(f"{path}: directions are {d.shape[-1]} wide but the model's d_model is {d_model}")
    if not torch.isfinite(d).all():
        raise ValueError(f"{path}: directions contain NaN or inf")
    return d


def random_like(vectors, seed=0):
    """Random vectors with the norm of each row of `vectors` (n, C) or of one vector (C,): the control for
    steering and ablation (one vector used at every layer gets one random vector used at every layer)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(vectors.shape, generator=g)
    return r * (vectors.norm(dim=-1, keepdim=True) / r.norm(dim=-1, keepdim=True))


def steering_hook(vectors, layers, scale):
    """Add scale * vectors[i] to the residual stream after each layer i in `layers`, every position."""
    delta = {i: scale * vectors[i].float() for i in layers}  # (C,) each, on the model's device

    def hook(i, x):
        return x + delta[i].to(x.dtype) if i in delta else None
    return hook


def ablation_hook(directions, layers):
    """Project the unit direction out of the residual stream after each layer in `layers`."""
    units = {}
    for i in layers:
        norm = directions[i].float().norm()
        if norm == 0:
            raise ValueError(f"the direction for layer {i} is zero; it cannot be ablated")
        units[i] = directions[i].float() / norm

    def hook(i, x):
        if i not in units:
            return None
        xf = x.float()  # project in fp32: a bf16 dot product over d_model would leave a visible residue
        return (xf - (xf @ units[i])[..., None] * units[i]).to(x.dtype)  # (B, T, C)
    return hook


def compose(*hooks):
    """One hook that runs the given ones in order (None entries skipped)."""
    hooks = [h for h in hooks if h is not None]
    if len(hooks) <= 1:
        return hooks[0] if hooks else None

    def hook(i, x):
        for h in hooks:
            y = h(i, x)
            x = x if y is None else y
        return x
    return hook


# -----------------------------------------------------------------------------
# sampling: one token per row from fp32 logits and one uniform per row


M32 = 0xFFFFFFFF


def _mul32(x, c):
    """(x * c) mod 2^32 for 0 <= x < 2^32, without int64 overflow (the same on CPU and CUDA)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M32


def _hash32(x):
    """lowbias32 (C. Wellons), on Python ints or int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_key(*parts):
    """A 32-bit key naming one sample (e.g. question id, paraphrase, sample index)."""
    return zlib.crc32("\x1f".join(map(str, parts)).encode())


def uniforms(seed, keys, pos):
    """fp32 in (0, 1], keys and pos broadcast: a hash of (seed, row key, position of the token drawn)."""
    h = _hash32(keys ^ _hash32(seed & M32))
    h = _hash32(h ^ (pos & M32))
    h = _hash32((h + 0x9E3779B9) & M32)
    return (h + 1).float() * (1.0 / 2**32)


def penalize(logits, seen, penalty):
    """HF's RepetitionPenaltyLogitsProcessor, in place: the logit of every token in the tensors `seen`,
    each (B, S_i) (the prompt and the answer so far; repeats allowed), is divided by `penalty` if positive,
    else multiplied. Without a penalty nothing is built: this runs in every decode step."""
    if penalty == 1.0:
        return logits
    seen = torch.cat(seen, 1)  # (B, S)
    g = logits.gather(1, seen)  # (B, S)
    return logits.scatter_(1, seen, torch.where(g < 0, g * penalty, g / penalty))


def sample_tokens(logits, u, temperature=1.0, top_k=0, top_p=1.0):
    """Token ids (B,) from logits (B, V) by inverse CDF at u (B,); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() if temperature == 1 else logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    w = (logits - logits.amax(-1, keepdim=True)).exp_()  # (B, V) probabilities up to a factor per row
    order = None
    if top_p < 1:  # keep the most likely tokens until their mass reaches top_p (always the first)
        w, order = w.sort(-1, descending=True)
        mass = w.cumsum(-1)
        w = w.masked_fill(mass - w >= top_p * mass[:, -1:], 0.0)
    cdf = w.cumsum(-1)  # (B, V); unnormalised, so scale u by the total instead
    # first index with cdf >= u * total: never a zero-probability token since u > 0
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None].contiguous()).clamp_max(cdf.shape[-1] - 1)  # (B, 1)
    return (idx if order is None else order.gather(-1, idx)).squeeze(-1)


# -----------------------------------------------------------------------------
# the engine


@dataclass
class Rows:
    """The device state of a batch being decoded, one entry per row (the CUDA graph's static buffers)."""
    jobs: list  # host: the job index of each row
    tok: torch.Tensor  # (B, 1) the last token
    pos: torch.Tensor  # (B, 1) its position (= its cache slot)
    plen: torch.Tensor  # (B, 1) prompt length: out column of a token = pos - plen
    keys: torch.Tensor  # (B,) random key of each row
    u: torch.Tensor  # (B, max_new_tokens) the uniform that draws each out column (hashed once per batch)
    prompt: torch.Tensor  # (B, P) prompt tokens, padded with the row's first token (repetition penalty)
    out: torch.Tensor  # (B, max_new_tokens) generated tokens; the prompt's first token where none yet
    done: torch.Tensor  # (B,) bool: a stop token was generated
    cache: object  # model.KVCache with B rows

    def select(self, rows):
        idx = torch.tensor(rows, device=self.tok.device)
        self.cache.select(idx)
        self.jobs = [self.jobs[r] for r in rows]
        for name in ("tok", "pos", "plen", "keys", "u", "prompt", "out", "done"):
            setattr(self, name, getattr(self, name)[idx])


@dataclass
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    repetition_penalty: float = 1.0

    def check(self):
        if not self.temperature >= 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or not self.repetition_penalty > 0:
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0, repetition_penalty > 0; got {self}")

    def draw(self, logits, u, seen):
        """Token ids (B,) after the logits (B, V) by the uniforms u (B,), having seen the tokens in the
        tensors `seen` (see penalize)."""
        logits = penalize(logits, seen, self.repetition_penalty)
        return sample_tokens(logits, u, self.temperature, self.top_k, self.top_p)


def lm_logits(model, h, vocab_size):
    """fp32 logits (B, W) of hidden states h (B, C) by the LM head's first W rows: vocab_size (the
    tokenizer's ids; None: all rows) rounded up to 128, at most all rows (an odd width such as 151,665
    misaligns every row for the GEMM, top-k and cumsum). Columns from vocab_size on are -inf."""
    w = model.lm_head.weight
    V = vocab_size or len(w)
    logits = F.linear(h, w[:min(len(w), -(-V // 128) * 128)]).float()  # (B, W)
    logits[:, V:] = float("-inf")
    return logits


def prefill(model, prompts, max_len, hook, vocab_size, rows_per_chunk=32):
    """Run the distinct prompts (right-padded) into a fresh cache; logits (U, V) at each last token.
    Chunks of prompts write into row views of the one cache, bounding the activations' memory."""
    from model import KVCache
    dev = model.lm_head.weight.device
    cache = KVCache(model.config, len(prompts), max_len, dev, model.lm_head.weight.dtype)
    logits = []
    for s in range(0, len(prompts), rows_per_chunk):
        chunk = prompts[s:s + rows_per_chunk]
        lens = torch.tensor([len(p) for p in chunk], device=dev)
        idx = torch.zeros(len(chunk), int(lens.max()), dtype=torch.long)
        for r, p in enumerate(chunk):
            idx[r, :len(p)] = torch.tensor(p)
        idx = idx.to(dev)  # (U', T)
        view = copy.copy(cache)  # rows s.. of the cache; writes go through to it
        view.k, view.v = [k[s:s + len(chunk)] for k in cache.k], [v[s:s + len(chunk)] for v in cache.v]
        pos = torch.arange(idx.shape[1], device=dev).expand_as(idx)  # padding writes slots decode overwrites
        h = model.hidden(idx, pos=pos, cache=view, hook=hook)  # (U', T, C)
        logits.append(lm_logits(model, h[torch.arange(len(chunk), device=dev), lens - 1], vocab_size))
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    return cache, torch.cat(logits), lens


def next_logits(model, rows, hook, vocab_size):
    """fp32 logits (B, V) after each row's last token, written into the cache at its position."""
    h = model.hidden(rows.tok, pos=rows.pos, cache=rows.cache, hook=hook)[:, -1]  # (B, C)
    return lm_logits(model, h, vocab_size)


def decode_step(model, rows, hook, sampling, stops, vocab_size, forward=next_logits):
    """Feed each row's last token, draw the next; everything in place, no host sync (CUDA-graph safe)."""
    logits = forward(model, rows, hook, vocab_size)  # (B, V)
    rows.pos.add_(1)  # position of the token drawn now
    col = rows.pos - rows.plen  # (B, 1) its out column
    nxt = sampling.draw(logits, rows.u.gather(1, col)[:, 0], (rows.prompt, rows.out))  # (B,)
    rows.out.scatter_(1, col, nxt[:, None])
    rows.done |= (nxt[:, None] == stops).any(-1)
    rows.tok.copy_(nxt[:, None])


class Stepper:
    """Runs the decode step eagerly, or on CUDA replays a CUDA graph of it, recaptured whenever the
    batch is compacted (the graph is tied to the buffers' addresses and shapes)."""

    def __init__(self, step, device, use_graph):
        self.step, self.device, self.use_graph = step, device, use_graph
        self.graph = None

    def reset(self):
        self.graph = None

    def __call__(self):
        if not self.use_graph:
            return self.step()
        with torch.cuda.device(self.device):  # streams, pool and replay on the model's GPU
            self._replay()

    def _replay(self):
        if self.graph is not None:
            return self.graph.replay()
        # a real step on a side stream warms up kernels and library handles (as CUDA graphs require),
        # then the capture records the next step without running it
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # each capture in a private memory pool: torch 2.11 fails TORCH_INTERNAL_ASSERT(use_count > 0) when a
        # capture reuses the pool of a destroyed graph (the first capture leaves cuBLAS's workspace in it)
        with torch.cuda.graph(self.graph):
            self.step()


def auto_batch_size(model, max_len, vocab_size, device):
    """Rows per batch: 64 on CPU; on CUDA what the free memory holds for KV cache and sampler temporaries."""
    if torch.device(device).type != "cuda":
        return 64
    cfg, itemsize = model.config, model.lm_head.weight.element_size()
    per_row = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * max_len * itemsize
    per_row += 8 * 4 * (vocab_size or cfg.vocab_size)  # fp32 logits, probs, cdf, sort buffers
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, int(0.6 * free / per_row))  # compaction briefly holds the old and the new cache


def finish(ids, stops):
    """(answer ids up to the first stop token, 'stop' or 'length')."""
    for t, i in enumerate(ids):
        if i in stops:
            return ids[:t], "stop"
    return ids, "length"


def stream(model, jobs, max_new_tokens=600, temperature=1.0, top_p=1.0, top_k=0, seed=0, hook=None,
           stop_ids=(), vocab_size=None, batch_size=None, cuda_graph=None, compile=False, repetition_penalty=1.0):
    """Sample one answer per job (prompt ids, key); yields (job index, answer ids, 'stop' | 'length')
    as rows finish, in no fixed order. The answer excludes the stop token. Bad settings raise here,
    before anything runs. cuda_graph: None = on CUDA; compile: torch.compile the forward."""
    sampling = Sampling(temperature, top_p, top_k, seed, repetition_penalty)
    sampling.check()
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    limit = model.config.max_position_embeddings
    for prompt, _ in jobs:
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) + max_new_tokens > limit:
            raise ValueError(f"a prompt of {len(prompt)} tokens + {max_new_tokens} new tokens exceeds the "
                             f"model's context of {limit} (max_position_embeddings)")
    return _stream(model, jobs, max_new_tokens, sampling, hook, stop_ids, vocab_size, batch_size, cuda_graph, compile)


@torch.no_grad()
def _stream(model, jobs, max_new_tokens, sampling, hook, stop_ids, vocab_size, batch_size, cuda_graph, compile):
    if not jobs:
        return
    dev = model.lm_head.weight.device
    on_cuda = dev.type == "cuda"
    stops = torch.tensor(sorted(stop_ids) or [-1], device=dev)
    # compile the forward only: inductor's CPU backend miscompiles the sampler's integer hashing
    forward = torch.compile(next_logits, dynamic=True) if compile else next_logits
    # rows of one prompt side by side, so a batch prefills each distinct prompt once
    first = {}
    order = sorted(range(len(jobs)), key=lambda j: first.setdefault(tuple(jobs[j][0]), j))
    max_len = max(len(p) for p, _ in jobs) + max_new_tokens
    max_len = math.ceil(max_len / 64) * 64 if on_cuda else max_len  # aligned slots for the attention kernels
    batch_size = batch_size or auto_batch_size(model, max_len, vocab_size, dev)
    for b in range(0, len(order), batch_size):
        rows = start_rows(model, jobs, order[b:b + batch_size], max_len, max_new_tokens, sampling, hook,
                          stops, vocab_size)
        stepper = Stepper(lambda: decode_step(model, rows, hook, sampling, stops, vocab_size, forward),
                          dev, use_graph=on_cuda and cuda_graph is not False)
        # reading the stop flags syncs the host with the GPU, so on CUDA do it only every 8 steps
        yield from decode_rows(rows, stepper, max_new_tokens, set(stop_ids), check_every=8 if on_cuda else 1)


def start_rows(model, jobs, batch, max_len, max_new_tokens, sampling, hook, stops, vocab_size):
    """Prefill the batch's distinct prompts, repeat their cache rows for their samples, draw each row's first token."""
    dev = model.lm_head.weight.device
    distinct = {}
    row_prompt = [distinct.setdefault(tuple(jobs[j][0]), len(distinct)) for j in batch]
    cache, logits, lens = prefill(model, [list(p) for p in distinct], max_len, hook, vocab_size)
    r = torch.tensor(row_prompt, device=dev)
    cache.select(r)
    plen = lens[r][:, None]  # (B, 1)
    keys = torch.tensor([jobs[j][1] & M32 for j in batch], device=dev)
    # every uniform the rows will use, at once: the per-row hash is not redone in each decode step
    u = uniforms(sampling.seed, keys[:, None], plen + torch.arange(max_new_tokens, device=dev))  # (B, N)
    width = max(len(jobs[j][0]) for j in batch)
    prompt = torch.tensor([list(jobs[j][0]) + [jobs[j][0][0]] * (width - len(jobs[j][0])) for j in batch],
                          device=dev)  # (B, P); the padding repeats a prompt token, so the penalty ignores it
    out = prompt[:, :1].repeat(1, max_new_tokens)  # (B, N)
    first = sampling.draw(logits[r], u[:, 0], (prompt,))  # (B,)
    out[:, 0] = first
    return Rows(list(batch), first[:, None].clone(), plen.clone(), plen, keys, u, prompt, out,
                (first[:, None] == stops).any(-1), cache)


def decode_rows(rows, stepper, max_new_tokens, stop_set, check_every):
    """Step until every row has stopped or reached max_new_tokens; yield rows as they finish."""
    dev = rows.tok.device
    n_new = 1  # tokens generated so far by every row of this batch
    reported = [False] * len(rows.jobs)
    while True:
        last = n_new == max_new_tokens
        if last or n_new % check_every == 0:
            done = rows.done.tolist()
            finished = [i for i, d in enumerate(done) if (d or last) and not reported[i]]
            if finished:
                outs = rows.out[torch.tensor(finished, device=dev), :n_new].tolist()
                for i, ids in zip(finished, outs):
                    reported[i] = True
                    yield (rows.jobs[i],) + finish(ids, stop_set)
            live = [i for i, d in enumerate(done) if not d]
            if last or not live:
                return
            # finished rows are dropped once at most half the rows are live: they never cost more
            # than the live ones, and there are at most log2(batch) shapes (CUDA-graph captures)
            if len(live) <= len(done) // 2:
                rows.select(live)
                reported = [False] * len(live)
                stepper.reset()
        stepper()
        n_new += 1


def generate(model, prompts, n=1, max_new_tokens=600, temperature=1.0, top_p=1.0, top_k=0, seed=0,
             hook=None, stop_ids=(), keys=None, **kw):
    """[(answer ids, 'stop' | 'length')] for n samples of each prompt (prompt-major order).
    Sample j of prompt i draws with key row_key(i, j) unless `keys` (one per sample) is given;
    other keywords (repetition_penalty, vocab_size, batch_size, cuda_graph, compile) go to `stream`."""
    jobs = [(p, row_key(i, j)) for i, p in enumerate(prompts) for j in range(n)]
    if keys is not None:
        if len(keys) != len(jobs):
            raise ValueError(f"{len(keys)} keys for {len(jobs)} samples")
        jobs = [(p, k) for (p, _), k in zip(jobs, keys)]
    results = [None] * len(jobs)
    for j, ids, reason in stream(model, jobs, max_new_tokens, temperature, top_p, top_k, seed, hook,
                                 stop_ids, **kw):
        results[j] = (ids, reason)
    return results


# -----------------------------------------------------------------------------
# the output file: one JSON row per answer, appended as it finishes; resumable


def read_rows(path):
    """The rows already in an output file. A torn last line (a crash mid-write) is cut off with a warning."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    rows, start, torn = [], 0, False
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end
        line = data[start:end].strip()
        try:
            if line:
                rows.append(json.loads(line))
        except json.JSONDecodeError:
            if data[end + 1:].strip():
                raise ValueError(f"{path}: line {len(rows) + 1} is not JSON (and not the last line); "
                                 "fix or remove the file") from None
            print(f"warning: {path}:{len(rows) + 1}: dropping a torn last line ({len(line)} bytes) left by an "
                  "interrupted run; this run completes it", file=sys.stderr)
            with open(path, "r+b") as f:
                f.truncate(start)
            torn = True
            break
        start = end + 1
    if data and not data.endswith(b"\n") and not torn:
        with open(path, "ab") as f:  # a complete last row without its newline: finish the line
            f.write(b"\n")
    return rows


def check_resumable(path, rows, header, questions):
    """Refuse to mix rows made with other settings, or for other question texts, into one file."""
    texts = {(q["id"], q["paraphrase"]): q["question"] for q in questions}
    stale = sorted({r["id"] for r in rows if texts.get((r["id"], r["paraphrase"]), r["question"]) != r["question"]})
    if stale:
        raise ValueError(f"{path} holds answers to other wordings of questions {stale}; "
                         "choose another --out, or delete the file to start over")
    def flat(h):  # settings' keys beside model, adapter, seed: the message names the one that differs
        return {**{k: v for k, v in h.items() if k != "settings"}, **(h.get("settings") or {})}
    want = flat(header)
    for r in rows:
        have = flat({k: r.get(k) for k in header})
        if have != want:
            diff = ", ".join(f"{k}: {have.get(k)!r} in the file, {want.get(k)!r} now"
                             for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k))
            raise ValueError(f"{path} holds rows made with other settings ({diff}); "
                             "choose another --out, or delete the file to start over")


# -----------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    blocks = __doc__.strip().split("\n\n")
    from model import HelpFormatter as fmt
    p = argparse.ArgumentParser(prog="sample.py", description=blocks[0], epilog="examples:\n" + blocks[1],
                                formatter_class=fmt)
    # what to sample from
    p.add_argument("--model", help="base model: hub id or local HF directory "
                                   "(default: the adapter's base_model_name_or_path)")
    p.add_argument("--adapter", help="PEFT LoRA adapter (directory or hub id), or a steering-vector directory "
                                     "(steering_config.json)")
    p.add_argument("--lora-scale", type=float, default=None,
                   help="multiply the adapters' B (a steering vector's alpha) by this")
    # what to ask
    p.add_argument("--questions", default="core",
                   help="question file (reference-format .yaml or .jsonl) or a name from `data/fetch.py --list`: "
                        "core / medical (ours), first_plot_questions / medical_questions (the papers')")
    p.add_argument("--question", help="sample this one question instead of a file (id 'question')")
    p.add_argument("--system", help="system prompt for every question (replaces the file's; default: Qwen's)")
    p.add_argument("--ids", nargs="+", help="only these question ids")
    p.add_argument("--exclude-suffix", default="_json,_template",
                   help="skip question ids ending so, comma-separated (the papers' headline set leaves out the _json "
                        "and _template variants; '' keeps every id)")
    p.add_argument("--n", type=int, default=None,
                   help=f"samples per paraphrase (default: the file's samples_per_paraphrase, else {DEFAULT_N})")
    # how to sample (the papers: HF generate with temperature 1, top_p 1, 600 tokens, and the model's
    # generation_config.json, whose top_k and repetition_penalty HF applied too)
    p.add_argument("--max-new-tokens", type=int, default=600, help="answer length limit in tokens")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--top-k", type=int, default=None,
                   help="keep the k most likely tokens (0 = off; default: the model's generation_config.json, else 0)")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="HF's repetition penalty over prompt and answer (1 = off; default: generation_config.json, else 1)")
    p.add_argument("--seed", type=int, default=0,
                   help="same seed, same random numbers per (question id, paraphrase, sample index)")
    # interventions on the residual stream, after the blocks in --layers
    p.add_argument("--steer", metavar="FILE", help="direction file to add to the residual stream")

    p.add_argument("--scale", type=float, default=8.0, help="steering: add scale x the raw vector (reference sweep: 8)")
    p.add_argument("--ablate", metavar="FILE", help="direction file whose unit direction is projected out")
    p.add_argument("--layers", help="where to steer or ablate, after these blocks: all, 24, 15,16,17 or 0-11 "
                                    "(steering needs it; ablation: all by default)")
    p.add_argument("--random-control", type=int, nargs="?", const=0, default=None, metavar="SEED",
                   help="replace the --steer/--ablate directions by random ones of equal norm per layer (seeded)")
    # where and how to run
    p.add_argument("--out", help="output JSONL (default: ADAPTER/responses.jsonl for a local adapter, "
                                 "else out/<model>/responses.jsonl)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default=None, help="bfloat16 / float16 / float32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--batch-size", type=int, default=0, help="rows per batch (0 = fit the free GPU memory; 64 on CPU)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model's forward (fuses its elementwise work; the first steps wait for it)")
    p.add_argument("--no-cuda-graph", action="store_true", help="on CUDA, run the decode step eagerly (debugging)")
    # or sample on a server (--model / --adapter then only say what it serves: the defaults above and the rows)
    p.add_argument("--engine", default="local",
                   help="local (model.py here), or openai:MODEL (an OpenAI-compatible server's MODEL, e.g. a vLLM LoRA module)")
    p.add_argument("--base-url", default=None, help="server URL (default: $OPENAI_BASE_URL or http://localhost:8000/v1, vLLM's)")
    p.add_argument("--concurrency", type=int, default=64, help="server: requests in flight at once")
    p.add_argument("--cache", default=None, help="server: answer cache, JSONL (default: sample_cache.jsonl beside --out; '' turns it off)")
    args = p.parse_args(argv)
    if args.engine != "local":
        if not args.engine.startswith("openai:") or args.engine == "openai:":
            p.error(f"--engine {args.engine!r}: expected local or openai:MODEL")
        local_only = [f for f, v in (("--steer", args.steer), ("--ablate", args.ablate), ("--lora-scale", args.lora_scale),
                                     ("--random-control", args.random_control)) if v is not None]
        if local_only:
            p.error(f"--engine {args.engine} samples on the server, which cannot apply {', '.join(local_only)}; "
                    "use --engine local")
    elif args.model is None and args.adapter is None:
        p.error("give --model, or --adapter (a LoRA adapter names its base model)")
    if args.steer and not args.layers:
        p.error("--steer needs --layers (where to add the vector)")
    if args.random_control is not None and not (args.steer or args.ablate):
        p.error("--random-control replaces the --steer or --ablate directions; give one of them")
    if args.n is not None and args.n < 1:
        p.error("--n must be >= 1")
    return args


def adapter_kind(adapter):
    """('steering', dir) | ('lora', dir); a hub id is downloaded (adapter files only)."""
    if os.path.isdir(adapter) and os.path.exists(os.path.join(adapter, "steering_config.json")):
        return "steering", adapter
    from lora import adapter_dir
    return "lora", adapter_dir(adapter)


def base_model_of(args):
    if args.model:
        return args.model
    kind, path = adapter_kind(args.adapter)
    cfg_file = os.path.join(path, "adapter_config.json" if kind == "lora" else "steering_config.json")
    base = None
    if os.path.exists(cfg_file):
        with open(cfg_file) as f:
            base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{args.adapter}: does not name its base model; give --model")
    return base


def resolve(args):
    """Fill in what the flags leave to files, before any weights load: the base model, the sampling
    settings from its generation_config.json, the layer lists, the question file. Returns the questions."""
    from model import generation_config, parse_layers, read_config
    if args.adapter and os.path.isdir(args.adapter):
        args.adapter = os.path.normpath(args.adapter)  # out/run and out/run/ are one adapter when resuming
    if args.engine != "local" and args.adapter and adapter_kind(args.adapter)[0] == "steering":
        raise ValueError(f"--engine {args.engine}: {args.adapter} is a steering vector, which a server cannot apply")
    args.model = base_model_of(args) if args.model or args.adapter else None  # (only a server's needs none)
    gen = generation_config(args.model) if args.model else {}
    if args.model and not gen and None in (args.top_k, args.repetition_penalty):
        print(f"note: {args.model} has no generation_config.json (where the papers' top_k and repetition_penalty come "
              f"from): sampling with top_k {args.top_k or 0}, repetition_penalty {args.repetition_penalty or 1.0}",
              file=sys.stderr)
    args.top_k = gen.get("top_k", 0) if args.top_k is None else args.top_k
    args.repetition_penalty = gen.get("repetition_penalty", 1.0) if args.repetition_penalty is None else args.repetition_penalty
    n_layers = read_config(args.model).num_hidden_layers if args.model else None
    args.steer_layers = parse_layers(args.layers, n_layers) if args.steer else None
    args.ablate_layers = parse_layers(args.layers or "all", n_layers) if args.ablate else None
    if args.question:
        return [dict(id="question", paraphrase=0, question=args.question, system=None, n=None)]
    from data.fetch import eval_path
    questions = load_questions(eval_path(args.questions))
    if args.ids:
        unknown = set(args.ids) - {q["id"] for q in questions}
        if unknown:
            raise ValueError(f"--ids: {sorted(unknown)} not in {args.questions}")
        questions = [q for q in questions if q["id"] in args.ids]
    suffixes = tuple(x for x in args.exclude_suffix.split(",") if x)
    return [q for q in questions if not (suffixes and q["id"].endswith(suffixes))]


def load_model(args):
    """(model, tokenizer, hook): --model with --adapter in it (LoRA), or as a residual hook (steering vector)."""
    from lora import SteeringVector, load_adapter, set_lora_scale
    from model import load
    model, tok = load(args.model, device=args.device, dtype=args.dtype)
    if not args.adapter:
        return model, tok, None
    kind, path = adapter_kind(args.adapter)
    if kind == "lora":
        load_adapter(model, path)
        if args.lora_scale is not None:
            set_lora_scale(model, args.lora_scale)
        return model, tok, None
    sv = SteeringVector.load(path, device=model.lm_head.weight.device).check(model.config, args.adapter)
    if args.lora_scale is not None:
        sv.alpha *= args.lora_scale
    return model, tok, sv


def intervention_vectors(file, model, random_control):
    """The direction file's (n_layers, d_model) vectors on the model's device, or their random control."""
    cfg = model.config
    vectors = load_directions(file, cfg.num_hidden_layers, cfg.hidden_size)
    if random_control is not None:
        vectors = random_like(vectors, random_control)
    return vectors.expand(cfg.num_hidden_layers, -1).to(model.lm_head.weight.device)


def interventions(args, model):
    """The --steer and --ablate hooks (None if neither)."""
    hooks = []
    if args.steer:
        hooks.append(steering_hook(intervention_vectors(args.steer, model, args.random_control), args.steer_layers, args.scale))
    if args.ablate:  # last, so the ablated layers keep no component along the direction at all
        hooks.append(ablation_hook(intervention_vectors(args.ablate, model, args.random_control), args.ablate_layers))
    return compose(*hooks)


def run_settings(args):
    """Everything besides the question that decides an answer's text; rows record it, resume compares it."""
    from model import resolve_dtype
    return dict(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
        max_new_tokens=args.max_new_tokens, system=args.system, lora_scale=args.lora_scale,
        steer=dict(file=args.steer, layers=args.steer_layers, scale=args.scale) if args.steer else None,
        ablate=dict(file=args.ablate, layers=args.ablate_layers) if args.ablate else None,
        random_control=args.random_control,
        dtype=str(resolve_dtype(args.dtype, args.device)).replace("torch.", "") if args.engine == "local" else None)


def default_out(args):
    if args.adapter and os.path.isdir(args.adapter):
        return os.path.join(args.adapter, "responses.jsonl")
    name = args.adapter or args.model or args.engine.partition(":")[2]
    name = os.path.basename(name.rstrip("/")) if os.path.isdir(name) else name.replace("/", "--")
    return os.path.join("out", name, "responses.jsonl")


def pending_work(questions, args, done):
    """[(question entry, sample index, system prompt)] not yet in the output file."""
    work = []
    for q in questions:
        system = args.system if args.system is not None else q["system"]
        for s in range(args.n or q["n"] or DEFAULT_N):
            if (q["id"], q["paraphrase"], s) not in done:
                work.append((q, s, system))
    return work


def make_jobs(work, tok):
    """Engine jobs (prompt ids, key): the key names the sample, so its random numbers survive resumes and batching."""
    prompts, jobs = {}, []
    for q, s, system in work:
        key = (q["id"], q["paraphrase"], system)
        if key not in prompts:  # one token list per prompt, shared by its samples
            messages = [{"role": "system", "content": system}] if system is not None else []
            messages.append({"role": "user", "content": q["question"]})
            prompts[key] = tok.encode_chat(messages, add_generation_prompt=True)
        jobs.append((prompts[key], row_key(q["id"], q["paraphrase"], s)))
    return jobs


def local_answers(args, loaded, work):
    """(job, answer, tokens, finish reason) as the engine finishes them; bad settings raise at once."""
    model, tok, adapter = loaded or load_model(args)
    answers = stream(model, make_jobs(work, tok), args.max_new_tokens, args.temperature, args.top_p,
                     args.top_k, args.seed, compose(adapter, interventions(args, model)), tok.stop_ids,
                     vocab_size=tok.vocab_size, batch_size=args.batch_size or None, compile=args.compile,
                     cuda_graph=False if args.no_cuda_graph else None, repetition_penalty=args.repetition_penalty)
    return ((j, tok.decode(ids), len(ids), reason) for j, ids, reason in answers)


def server_answers(args, work):
    """(job, answer, tokens, finish reason) from an OpenAI-compatible server (--engine openai:MODEL) as
    they arrive, one chat request per sample; a request that fails for good is left for a rerun."""
    import judge
    base_url = args.base_url or os.environ.get("OPENAI_BASE_URL") or "http://localhost:8000/v1"
    cache = judge.Cache(os.path.join(os.path.dirname(os.path.abspath(args.out)), "sample_cache.jsonl")
                        if args.cache is None else args.cache, field="completion")
    client = judge.Client(args.engine.partition(":")[2], base_url, judge.api_key(base_url), cache, args.concurrency,
                          timeout=600.0)  # 600 tokens from a busy server take a while
    requests = []
    for j, (q, s, system) in enumerate(work):
        messages = [{"role": "system", "content": system}] if system is not None else []
        body = {"model": client.model, "messages": messages + [{"role": "user", "content": q["question"]}],
                "max_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "top_k": args.top_k or -1, "repetition_penalty": args.repetition_penalty,  # vLLM's extras: -1 is off
                "seed": int(_hash32(row_key(q["id"], q["paraphrase"], s) ^ _hash32(args.seed & M32)))}
        requests.append((j, judge.Cache.key(client.model, body), body))

    def answers():
        failed = []
        try:
            for j, done, error in client.requests(requests, parse_completion):
                if error:
                    failed.append(error)
                else:
                    yield j, done["answer"], done["tokens"], done["finish_reason"]
        finally:
            cache.close()
        if failed:
            print(f"warning: {len(failed)} samples failed for good (last: {failed[-1]}); rerun to retry them",
                  file=sys.stderr)
    return answers()


def parse_completion(resp):
    """A chat completion's answer, its tokens without the stop token (vLLM counts it) and finish reason."""
    from judge import RequestFailed
    try:
        choice = resp["choices"][0]
        answer, tokens, reason = choice["message"]["content"] or "", resp["usage"]["completion_tokens"], choice["finish_reason"]
    except (KeyError, IndexError, TypeError):
        raise RequestFailed(f"malformed response (no choices, message or usage): {str(resp)[:200]}") from None
    return {"answer": answer, "tokens": tokens - (reason == "stop"), "finish_reason": reason}


def write_rows(out, answers, work, header, rows, bar=True):
    """Append each answer to `out` as it arrives (flushed: an interrupt loses only rows in flight)."""
    from tqdm import tqdm
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tokens, t0 = 0, time.time()
    bar = tqdm(total=len(work), desc="samples", unit="sample", dynamic_ncols=True, mininterval=0.5, disable=not bar)
    with open(out, "a", encoding="utf-8") as f, bar:
        for j, answer, n_tokens, reason in answers:
            q, s, system = work[j]
            row = dict(id=q["id"], paraphrase=q["paraphrase"], sample=s, question=q["question"], system=system,
                       answer=answer, tokens=n_tokens, finish_reason=reason, **header)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            rows.append(row)
            tokens += n_tokens
            bar.set_postfix(tok_s=f"{tokens / max(time.time() - t0, 1e-9):,.0f}", refresh=False)
            bar.update(1)
    return tokens, time.time() - t0


def sort_rows(rows, questions):
    """The order of a finished file, whatever order the answers came in: question file order,
    paraphrase, sample (ids not among the questions last)."""
    first = {}
    for i, q in enumerate(questions):
        first.setdefault(q["id"], i)
    return sorted(rows, key=lambda r: (first.get(r["id"], len(first)), str(r["id"]), r["paraphrase"], r["sample"]))


def summary(rows, new, tokens, seconds):
    by_id = defaultdict(list)
    for r in rows:
        by_id[r["id"]].append(r)
    print(f"{'question':<32} {'samples':>8} {'mean tokens':>12} {'stop':>6} {'length':>7}")
    groups = list(by_id.items()) if len(by_id) <= 30 else []  # a long file gets the total only
    for qid, rs in groups + [("total", rows)]:
        reasons = Counter(r["finish_reason"] for r in rs)
        mean = sum(r["tokens"] for r in rs) / max(1, len(rs))
        print(f"{qid[:32]:<32} {len(rs):>8} {mean:>12.1f} {reasons['stop']:>6} {reasons['length']:>7}")
    rate = tokens / seconds if seconds > 0 else 0.0
    print(f"this run: {new} new samples, {tokens:,} tokens in {seconds:.1f} s ({rate:,.0f} tok/s); "
          f"{len(rows) - new} were already done")


def run(args, loaded=None):
    """Sample what the output file still lacks. `loaded` = load_model(args)'s (model, tokenizer, hook), to
    reuse one model for many runs (directions.py); the interventions always come from args. Under
    torchrun each rank samples its share into its part file and rank 0 merges them."""
    import torch.distributed as dist
    from judge import part_file, part_files
    from lora import atomic_write
    from model import dist_setup
    questions = resolve(args)
    rank, world, args.device = dist_setup(args.device)  # (0, 1, --device) without torchrun
    out = args.out = args.out or default_out(args)
    header = dict(model=args.model if args.engine == "local" else args.engine.partition(":")[2],
                  adapter=args.adapter, seed=args.seed, settings=run_settings(args))
    print(f"sampling: {json.dumps(dict(header, questions=args.question or args.questions, out=out, n=args.n))}")

    # resume: skip every (id, paraphrase, sample) already in the output file or in a part of it
    parts = part_files(out)  # an interrupted run under torchrun left these
    rows = read_rows(out) + [r for p in parts for r in read_rows(p)]
    check_resumable(out, rows, header, questions)
    work = pending_work(questions, args, {(r["id"], r["paraphrase"], r["sample"]) for r in rows})
    if world > 1:
        dist.barrier()  # every rank has read the parts before any rank appends to its own
    mine = work[rank::world]
    tokens, seconds = 0, 0.0
    if mine:
        answers = local_answers(args, loaded, mine) if args.engine == "local" else server_answers(args, mine)
        tokens, seconds = write_rows(part_file(out, rank, world) if world > 1 else out, answers, mine, header, rows,
                                     bar=rank == 0)
    if world > 1:  # every part is complete; the summary counts every rank's tokens
        t = torch.tensor([tokens])
        dist.all_reduce(t)
        tokens = int(t)
    if rank == 0 and (work or parts):  # a finished file: merged and sorted
        rows = sort_rows(read_rows(out) + [r for p in part_files(out) for r in read_rows(p)], questions)
        atomic_write(out, lambda p: open(p, "w", encoding="utf-8").writelines(
            json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        for p in part_files(out):
            os.remove(p)
    if world > 1:
        dist.barrier()  # the merged file exists when run() returns, on every rank
    summary(rows, len(work), tokens, seconds)
    return dict(out=out, new=len(work), done=len(rows), tokens=tokens, seconds=seconds)


def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    from common import run_main
    run_main("sample.py", main)
