"""
Sample answers to evaluation questions, with LoRA adapters or a steering vector, residual-stream steering
or ablation, and the papers' sampling settings; one JSONL row per answer, resumable.

    python sample.py --adapter out/run                         # -> out/run/responses.jsonl
    python sample.py --model M --steer D.safetensors --layers 12 --scale 8 --out steer12.jsonl
    python sample.py --engine openai:organism --adapter out/run   # a vLLM server's LoRA module (README)

Settings as the papers' HF generate: temperature 1, top_p 1, 600 tokens, generation_config.json's top_k
(20) and repetition_penalty (1.1; 1.05 from 3B up). Departures: each token is drawn by inverse CDF from a
hash of (seed, question, paraphrase, sample, position): samples do not depend on batching or resuming, and
runs with different interventions share random numbers; left padding is not penalised (HF's is); --engine
openai gives the server's answers.
"""
import argparse
import copy
import json
import math
import os
import sys
import time
import zlib
from collections import Counter

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

import lora
from common import (Cache, Client, HelpFormatter, RequestFailed, ShardedJSONL, append_jsonl, barrier, check,
                    check_out_file, count, dist_setup, model_flags, parse_layers, print_table, read_jsonl,
                    read_yaml, resolve_dtype, run_main, warn)
from model import KVCache, generation_config, read_config

DEFAULT_N = 50  # the papers' samples per paraphrase

# -----------------------------------------------------------------------------
# question files: YAML ({id, paraphrases, samples_per_paraphrase, system?}) or JSONL
def load_questions(path):
    if path.endswith((".yaml", ".yml")):
        items = read_yaml(path) or []
        if not isinstance(items, list):
            raise ValueError(f"{path}: a question YAML is a list, got {type(items).__name__}")
        items = [(f"{path} item {i + 1}", item) for i, item in enumerate(items)]
    elif path.endswith(".jsonl"):
        items = [(f"{path}:{n}", row) for n, row in read_jsonl(path, ours=False)]
    else:
        raise ValueError(f"{path}: unknown question format (use .yaml or .jsonl)")
    if not (entries := [e for where, item in items for e in question_entries(item, where)]):
        raise ValueError(f"{path}: no questions")
    if dup := [k for k, c in Counter(e["id"] for e in entries if e["paraphrase"] == 0).items() if c > 1]:
        raise ValueError(f"{path}: duplicate question ids {dup}")
    return entries

def question_entries(item, where):
    if not isinstance(item, dict) or "id" not in item:
        raise ValueError(f"{where}: a question is a dict with an id, got {str(item)[:60]!r}")
    if not str(item.get("type", "free_form")).startswith("free_form"):
        raise ValueError(f"{where}: question type {item['type']!r} is not free-form (free_form*)")
    texts = item.get("paraphrases", item.get("question"))
    texts = [texts] if isinstance(texts, str) else texts
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f"{where} ({item['id']}): needs `paraphrases` (strings) or `question`")
    system, n = item.get("system"), item.get("samples_per_paraphrase", item.get("n"))
    if not isinstance(system, (str, type(None))) or not (n is None or isinstance(n, int) and n >= 1):
        raise ValueError(f"{where} ({item['id']}): system must be a string, samples_per_paraphrase >= 1")
    return [dict(id=str(item["id"]), paraphrase=p, question=t, system=system, n=n)
            for p, t in enumerate(texts)]

def select_questions(spec, ids, exclude_suffix):
    """spec: a question file or a data.fetch name; exclude_suffix: comma-separated."""
    from data.fetch import eval_path
    questions = load_questions(eval_path(spec))
    if unknown := set(ids or ()) - {q["id"] for q in questions}:
        raise ValueError(f"--ids: {sorted(unknown)} not in {spec}")
    suffixes = tuple(x for x in exclude_suffix.split(",") if x)
    return [q for q in questions if (not ids or q["id"] in ids) and not q["id"].endswith(suffixes)]

# -----------------------------------------------------------------------------
# residual-stream interventions: hooks for model.py, hook(layer, x) -> replacement or None
def load_directions(path, n_layers=None, d_model=None):
    """A direction file's `directions` (L, C) or `direction` (C,) in fp32; the shape checked if given."""
    d = (tensors := lora.read_tensors(path)).get("directions", tensors.get("direction"))
    if d is None or d.ndim != 1 + ("directions" in tensors):
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        raise ValueError(f"{path}: holds {shapes}; a direction file holds `directions` (n_layers, d_model) "
                         "or `direction` (d_model,)")
    if d.ndim == 2 and n_layers not in (None, len(d)):
        raise ValueError(f"{path}: shape {tuple(d.shape)}; this model needs `directions` "
                         f"({n_layers}, {d_model}), one row per layer")
    if d_model not in (None, d.shape[-1]):
        raise ValueError(f"{path}: directions are {d.shape[-1]} wide but the model's d_model is {d_model}")
    if not torch.isfinite(d).all():
        raise ValueError(f"{path}: directions contain NaN or inf")
    return d.float()

def random_like(vectors, seed=0):
    """The control: seeded random vectors of each row's norm."""
    r = torch.randn(vectors.shape, generator=torch.Generator().manual_seed(seed))
    return r * (vectors.norm(dim=-1, keepdim=True) / r.norm(dim=-1, keepdim=True))

def steering_hook(vectors, layers, scale):
    """Add scale * vectors[i] after each layer i in `layers`."""
    delta = {i: scale * vectors[i].float() for i in layers}  # (C,) each
    return lambda i, x: x + delta[i].to(x.dtype) if i in delta else None

def ablation_hook(directions, layers):
    """Project the unit direction out after each layer in `layers`."""
    if zero := [i for i in layers if directions[i].norm() == 0]:
        raise ValueError(f"the direction for layer {zero[0]} is zero: nothing to ablate")
    units = {i: directions[i].float() / directions[i].float().norm() for i in layers}

    def hook(i, x):
        if i not in units:
            return None
        xf = x.float()  # fp32: a bf16 dot product over d_model leaves a visible residue
        return (xf - (xf @ units[i])[..., None] * units[i]).to(x.dtype)  # (B, T, C)
    return hook

def compose(*hooks):
    """One hook running the given ones (None: skipped) in order."""
    hooks = [h for h in hooks if h is not None]

    def hook(i, x):
        for h in hooks:
            y = h(i, x)
            x = x if y is None else y
        return x
    return hook if len(hooks) > 1 else (hooks[0] if hooks else None)

def directions(file, cfg, random_control, device):
    """A direction file's (n_layers, d_model) vectors, or their random control."""
    d = load_directions(file, cfg.num_hidden_layers, cfg.hidden_size)
    d = d if random_control is None else random_like(d, random_control)
    return d.expand(cfg.num_hidden_layers, -1).to(device)

# -----------------------------------------------------------------------------
# drawing a token: fp32 logits and a uniform per row, a hash of (seed, row key, position)
M32 = 0xFFFFFFFF

def _mul32(x, c):
    """(x * c) mod 2^32 without int64 overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M32

def _hash32(x):
    """lowbias32 (C. Wellons), on Python ints or int64 tensors of 32-bit values."""
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)

def row_key(*parts):
    return zlib.crc32("\x1f".join(map(str, parts)).encode())

def uniforms(seed, keys, pos):
    """fp32 in (0, 1], broadcast; pos: the drawn token's position."""
    h = _hash32(_hash32(keys ^ _hash32(seed & M32)) ^ (pos & M32))
    return (_hash32((h + 0x9E3779B9) & M32) + 1).float() * (1.0 / 2**32)

def penalize(logits, seen, penalty):
    """HF's repetition penalty, in place: logits of `seen` tokens / penalty if > 0, else * penalty."""
    if penalty == 1.0:
        return logits  # every decode step: build nothing
    seen = torch.cat(seen, 1)  # (B, S)
    g = logits.gather(1, seen)  # (B, S)
    return logits.scatter_(1, seen, torch.where(g < 0, g * penalty, g / penalty))

def sample_tokens(logits, u, temperature=1.0, top_k=0, top_p=1.0):
    """Token ids (B,) from logits (B, V) by inverse CDF at u (B,); temperature 0: greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() if temperature == 1 else logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    w = (logits - logits.amax(-1, keepdim=True)).exp_()  # (B, V) unnormalised probabilities
    order = None
    if top_p < 1:  # the most likely tokens until their mass reaches top_p (always the first)
        w, order = w.sort(-1, descending=True)
        mass = w.cumsum(-1)
        w = w.masked_fill(mass - w >= top_p * mass[:, -1:], 0.0)
    cdf = w.cumsum(-1)  # (B, V); u is scaled by the total instead
    # first index with cdf >= u * total: never a zero-probability token as u > 0
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None].contiguous())  # (B, 1)
    idx = idx.clamp_max(cdf.shape[-1] - 1)
    return (idx if order is None else order.gather(-1, idx)).squeeze(-1)

class Sampling:

    def __init__(self, temperature=1.0, top_p=1.0, top_k=0, seed=0, repetition_penalty=1.0):
        if not temperature >= 0 or not 0 < top_p <= 1 or top_k < 0 or not repetition_penalty > 0:
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0, repetition_penalty > 0; "
                             f"got {temperature}, {top_p}, {top_k}, {repetition_penalty}")
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.seed, self.penalty = seed, repetition_penalty

    def draw(self, logits, u, seen):
        """Token ids (B,) from logits (B, V), uniforms u (B,) and the tokens `seen` (tensors)."""
        logits = penalize(logits, seen, self.penalty)
        return sample_tokens(logits, u, self.temperature, self.top_k, self.top_p)

# -----------------------------------------------------------------------------
# the engine: a static KV cache, each prompt prefilled once, a CUDA-graph decode step
class Rows:
    """A decoding batch's device state: the CUDA graph's static buffers (shapes in start_rows)."""

    def __init__(self, jobs, **state):
        self.jobs, self.names = jobs, list(state)
        self.__dict__.update(state)

    def select(self, rows):
        idx = torch.tensor(rows, device=self.tok.device)
        self.cache.select(rows)
        self.jobs = [self.jobs[r] for r in rows]
        for name in self.names:
            if name != "cache":
                setattr(self, name, getattr(self, name)[idx])

def lm_logits(model, h, vocab_size):
    """fp32 logits (B, W), W: vocab_size rounded up to 128 (an odd width misaligns the GEMM, top-k,
    cumsum), -inf past vocab_size."""
    w = model.lm_head.weight
    V = vocab_size or len(w)
    logits = F.linear(h, w[:min(len(w), -(-V // 128) * 128)]).float()  # (B, W)
    logits[:, V:] = float("-inf")
    return logits

def prefill(model, prompts, max_len, hook, vocab_size, rows_per_chunk=32):
    """(cache, last logits (U, V), lengths) of the distinct prompts, right-padded."""
    dev = model.lm_head.weight.device
    cache = KVCache(model.config, len(prompts), max_len, dev, model.lm_head.weight.dtype)
    lens = torch.tensor([len(p) for p in prompts], device=dev)  # (U,)
    logits = []
    for s in range(0, len(prompts), rows_per_chunk):
        chunk = prompts[s:s + rows_per_chunk]
        idx = pad_sequence([torch.tensor(p) for p in chunk], batch_first=True).to(dev)  # (U', T)
        view = copy.copy(cache)  # rows s.. of the cache; writes go through to it
        view.k, view.v = [k[s:s + len(chunk)] for k in cache.k], [v[s:s + len(chunk)] for v in cache.v]
        pos = torch.arange(idx.shape[1], device=dev).expand_as(idx)  # padding writes slots decode overwrites
        h = model.hidden(idx, pos=pos, cache=view, hook=hook)  # (U', T, C)
        last = lens[s:s + len(chunk)] - 1  # (U',)
        logits.append(lm_logits(model, h[torch.arange(len(chunk), device=dev), last], vocab_size))
    return cache, torch.cat(logits), lens

def decode_step(model, rows, hook, sampling, stops, vocab_size, logits_hook=None):
    """Feed each row's last token, draw the next; in place, no host sync (CUDA-graph safe).
    logits_hook(logits, col, keys) -> logits: e.g. bench.py's forced answer lengths."""
    h = model.hidden(rows.tok, pos=rows.pos, cache=rows.cache, hook=hook)[:, -1]  # (B, C)
    logits = lm_logits(model, h, vocab_size)  # (B, V)
    rows.pos.add_(1)  # position of the token drawn now
    col = rows.pos - rows.plen  # (B, 1) its out column
    if logits_hook is not None:
        logits = logits_hook(logits, col[:, 0], rows.keys)
    nxt = sampling.draw(logits, rows.u.gather(1, col)[:, 0], (rows.prompt, rows.out))  # (B,)
    rows.out.scatter_(1, col, nxt[:, None])
    rows.done |= (nxt[:, None] == stops).any(-1)
    rows.tok.copy_(nxt[:, None])

class Stepper:
    """The decode step, eager or as a CUDA graph (recaptured when the batch shrinks); `graphs`: torch.cuda
    or a stand-in."""

    def __init__(self, step, device, graphs=None):
        self.step, self.device, self.graphs, self.graph = step, device, graphs, None

    def __call__(self):
        if self.graphs is None:
            return self.step()
        cuda = self.graphs
        with cuda.device(self.device):  # a replay too launches on the current device's stream
            if self.graph is not None:
                return self.graph.replay()
            # this step runs on a side stream (capture needs warm kernels and library handles)
            side = cuda.Stream()
            side.wait_stream(cuda.current_stream())
            with cuda.stream(side):
                self.step()
            cuda.current_stream().wait_stream(side)
            # the next is recorded, not run, in a private memory pool: torch 2.11 fails
            # TORCH_INTERNAL_ASSERT(use_count > 0) when a capture reuses a destroyed graph's pool
            self.graph = cuda.CUDAGraph()
            with cuda.graph(self.graph):
                self.step()

def batch_bytes(cfg, max_len, prompt_len, vocab_size, itemsize, chunk=32):
    """(bytes per row, bytes besides) a batch holds at its peak, weights aside. Per row: the KV cache and
    half a layer (select() replaces a layer at a time), state, vocab-wide fp32 temporaries."""
    kv = 2 * cfg.num_key_value_heads * cfg.head_dim * max_len * itemsize  # one layer's k and v of one row
    per_row = kv * (cfg.num_hidden_layers + 0.5) + 12 * max_len + 8 * prompt_len + 8 * 4 * vocab_size
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    per_token = (4 * cfg.intermediate_size + 8 * cfg.hidden_size) * itemsize + g * max_len * (itemsize + 2)
    return per_row, chunk * prompt_len * per_token

def auto_batch_size(model, max_len, prompt_len, vocab_size, device):
    """64 on CPU; on CUDA as many rows as batch_bytes fits in 90% of free memory."""
    if torch.device(device).type != "cuda":
        return 64
    per_row, besides = batch_bytes(model.config, max_len, prompt_len,
                                   vocab_size or model.config.vocab_size, model.lm_head.weight.element_size())
    return max(1, int((0.9 * torch.cuda.mem_get_info(device)[0] - besides) / per_row))

def finish(ids, stops):
    t = next((t for t, i in enumerate(ids) if i in stops), None)
    return (ids, "length") if t is None else (ids[:t], "stop")

def stream(model, jobs, max_new_tokens=600, temperature=1.0, top_p=1.0, top_k=0, seed=0, hook=None,
           stop_ids=(), vocab_size=None, batch_size=None, cuda_graph=None, repetition_penalty=1.0,
           logits_hook=None):
    """Yields (job index, answer ids without the stop token, 'stop' | 'length') of jobs [(prompt ids, key)]
    as rows finish; bad settings raise at once. cuda_graph: None/True (on CUDA), False, or graph calls."""
    sampling = Sampling(temperature, top_p, top_k, seed, repetition_penalty)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens}: must be >= 1")
    limit = model.config.max_position_embeddings
    for prompt, _ in jobs:
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) + max_new_tokens > limit:
            raise ValueError(f"a prompt of {len(prompt)} tokens + {max_new_tokens} new tokens exceeds the "
                             f"model's context of {limit}")
    return _stream(model, jobs, max_new_tokens, sampling, hook, stop_ids, vocab_size, batch_size, cuda_graph,
                   logits_hook)

@torch.no_grad()
def _stream(model, jobs, max_new_tokens, sampling, hook, stop_ids, vocab_size, batch_size, cuda_graph,
            logits_hook):
    if not jobs:
        return
    dev = model.lm_head.weight.device
    on_cuda = dev.type == "cuda"
    graphs = (torch.cuda if on_cuda else None) if cuda_graph in (None, True) else cuda_graph or None
    stops = torch.tensor(sorted(stop_ids) or [-1], device=dev)
    first = {}  # a prompt's rows side by side: a batch prefills each distinct prompt once
    order = sorted(range(len(jobs)), key=lambda j: first.setdefault(tuple(jobs[j][0]), j))
    longest = max(len(p) for p, _ in jobs)
    max_len = longest + max_new_tokens
    max_len = math.ceil(max_len / 64) * 64 if on_cuda else max_len  # aligned for the attention kernels
    batch_size = batch_size or auto_batch_size(model, max_len, longest, vocab_size, dev)
    for b in range(0, len(order), batch_size):
        rows = stepper = None  # free the last batch's cache and graph before prefill
        batch = order[b:b + batch_size]
        rows = start_rows(model, jobs, batch, max_len, max_new_tokens, sampling, hook, stops, vocab_size)
        step = lambda: decode_step(model, rows, hook, sampling, stops, vocab_size, logits_hook)
        stepper = Stepper(step, dev, graphs)
        # reading the flags syncs the GPU: on CUDA (or graphs) every 8 steps
        yield from decode_rows(rows, stepper, max_new_tokens, set(stop_ids), 8 if on_cuda or graphs else 1)

def start_rows(model, jobs, batch, max_len, max_new_tokens, sampling, hook, stops, vocab_size):
    dev = model.lm_head.weight.device
    distinct = {}
    row_prompt = [distinct.setdefault(tuple(jobs[j][0]), len(distinct)) for j in batch]
    cache, logits, lens = prefill(model, [list(p) for p in distinct], max_len, hook, vocab_size)
    cache.select(row_prompt)  # a prompt's row for each of its samples
    r = torch.tensor(row_prompt, device=dev)
    plen = lens[r][:, None]  # (B, 1)
    keys = torch.tensor([jobs[j][1] & M32 for j in batch], device=dev)
    u = uniforms(sampling.seed, keys[:, None], plen + torch.arange(max_new_tokens, device=dev))  # (B, N)
    width = max(len(jobs[j][0]) for j in batch)
    prompt = torch.tensor([list(p) + [p[0]] * (width - len(p)) for p in (jobs[j][0] for j in batch)],
                          device=dev)  # (B, P)
    out = prompt[:, :1].repeat(1, max_new_tokens)  # (B, N)
    out[:, 0] = first = sampling.draw(logits[r], u[:, 0], (prompt,))  # (B,)
    return Rows(list(batch), tok=first[:, None].clone(), pos=plen.clone(), plen=plen, keys=keys, u=u,
                prompt=prompt, out=out, done=(first[:, None] == stops).any(-1), cache=cache)

def decode_rows(rows, stepper, max_new_tokens, stop_set, check_every):
    n_new = 1  # tokens generated by every row
    reported = [False] * len(rows.jobs)
    while True:
        last = n_new == max_new_tokens
        if last or n_new % check_every == 0:
            done = rows.done.tolist()
            finished = [i for i, d in enumerate(done) if (d or last) and not reported[i]]
            if finished:
                outs = rows.out[torch.tensor(finished, device=rows.tok.device), :n_new].tolist()
                for i, ids in zip(finished, outs):
                    reported[i] = True
                    yield (rows.jobs[i],) + finish(ids, stop_set)
            live = [i for i, d in enumerate(done) if not d]
            if last or not live:
                return
            # finished rows are dropped once at most half are live: they never cost more than the
            # live ones, and there are at most log2(batch) shapes (CUDA-graph captures)
            if len(live) <= len(done) // 2:
                rows.select(live)
                reported = [False] * len(live)
                stepper.graph = None
        stepper()
        n_new += 1

def generate(model, prompts, n=1, keys=None, **kw):
    """[(answer ids, 'stop' | 'length')] of n samples per prompt, prompt-major, by stream(**kw); sample j of
    prompt i has key row_key(i, j) unless `keys` says."""
    keys = [row_key(i, j) for i in range(len(prompts)) for j in range(n)] if keys is None else keys
    jobs = list(zip([p for p in prompts for _ in range(n)], keys, strict=True))  # a key per sample
    answers = stream(model, jobs, **kw)
    return [a[1:] for a in sorted(answers, key=lambda a: a[0])]  # in job order

# -----------------------------------------------------------------------------
# the output file: a row per answer, appended as it finishes; resumable, one file under torchrun
def pending(questions, n, system, done):
    return [(q, s, q["system"] if system is None else system) for q in questions
            for s in range(n or q["n"] or DEFAULT_N) if (q["id"], q["paraphrase"], s) not in done]

def check_resumable(path, rows, header, questions):
    texts = {(q["id"], q["paraphrase"]): q["question"] for q in questions}
    again = "choose another --out, or delete the file to start over"
    if stale := sorted({r["id"] for r in rows
                        if texts.get((r["id"], r["paraphrase"]), r["question"]) != r["question"]}):
        raise ValueError(f"{path} answers other wordings of questions {stale}; {again}")
    flat = lambda h: {**{k: v for k, v in h.items() if k != "settings"}, **(h.get("settings") or {})}
    want = flat(header)
    for r in rows:
        have = flat({k: r.get(k) for k in header})
        if have != want:
            diff = ", ".join(f"{k}: {have.get(k)!r} in the file, {want.get(k)!r} now"
                             for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k))
            raise ValueError(f"{path} holds rows made with other settings ({diff}); {again}")

def row_header(model, adapter, seed, gen, dtype, system=None, lora_scale=None, steer=None, ablate=None,
               random_control=None, **more):
    """What every row records and a resume must match (dtype None: a server)."""
    return dict(model=model, adapter=adapter, seed=seed, settings=dict(
        gen, system=system, lora_scale=lora_scale, steer=steer, ablate=ablate, random_control=random_control,
        **more, dtype=dtype and str(dtype).removeprefix("torch.")))

def sample_file(out, questions, header, answer, n=None, system=None, rank=0, world=1):
    """Sample what `out` lacks: answer(work) yields (index, text, tokens, finish reason)."""
    shards = ShardedJSONL(out, rank, world)
    rows = [r for _, _, r in shards.read()]
    check_resumable(out, rows, header, questions)
    work = pending(questions, n, system, {(r["id"], r["paraphrase"], r["sample"]) for r in rows})
    barrier(world)  # every rank has read the files before any appends
    mine, tokens, t0 = work[rank::world], 0, time.time()
    if mine:
        answers = answer(mine)  # the model loads: a bad adapter fails before a file is touched
        with shards.append() as f, tqdm(total=len(mine), desc="samples", unit="sample", dynamic_ncols=True,
                                        disable=rank > 0) as bar:
            for j, text, n_tokens, reason in answers:
                q, s, sys_prompt = mine[j]
                append_jsonl(f, dict(id=q["id"], paraphrase=q["paraphrase"], sample=s, question=q["question"],
                                     system=sys_prompt, answer=text, tokens=n_tokens, finish_reason=reason,
                                     **header))
                tokens += n_tokens
                bar.set_postfix(tok_s=f"{tokens / max(time.time() - t0, 1e-9):,.0f}", refresh=False)
                bar.update(1)
    seconds = time.time() - t0
    if world > 1:  # the summary counts all ranks' tokens
        torch.distributed.all_reduce(t := torch.tensor([tokens]))
        tokens = int(t)
    first = {q["id"]: i for i, q in reversed(list(enumerate(questions)))}  # each id's first index
    rows = shards.merge(lambda rows: sorted(rows, key=lambda r: (first.get(r["id"], len(first)), str(r["id"]),
                                                                 r["paraphrase"], r["sample"])))
    if rank == 0:
        summary(rows, len(work), tokens, seconds)
    return dict(out=out, new=len(work), done=len(rows), tokens=tokens, seconds=seconds)

def summary(rows, new, tokens, seconds):
    ids = list(dict.fromkeys(r["id"] for r in rows))
    groups = [(q, [r for r in rows if r["id"] == q]) for q in ids] if len(ids) <= 30 else []  # else the total
    print_table(["question", "samples", "mean tokens", "stop", "length"], [
        [q[:32], len(rs), sum(r["tokens"] for r in rs) / max(1, len(rs)),
         sum(r["finish_reason"] == "stop" for r in rs), sum(r["finish_reason"] == "length" for r in rs)]
        for q, rs in groups + [("total", rows)]])
    print(f"this run: {new} new samples, {tokens:,} tokens in {seconds:.1f} s "
          f"({tokens / max(seconds, 1e-9):,.0f} tok/s); {len(rows) - new} were already done")

# -----------------------------------------------------------------------------
# the two engines: ours, or an OpenAI-compatible server
def messages(question, system):
    return ([] if system is None else [{"role": "system", "content": system}]) + [
        {"role": "user", "content": question}]

def local_answers(model, tok, work, gen, seed, hook=None, **engine):
    """(index, text, tokens, finish reason) of work [(question, sample, system)]."""
    jobs = [(tok.encode_chat(messages(q["question"], system), True), row_key(q["id"], q["paraphrase"], s))
            for q, s, system in work]
    answers = stream(model, jobs, seed=seed, hook=hook, stop_ids=tok.stop_ids, vocab_size=tok.vocab_size,
                     **gen, **engine)  # sampling_settings's keys are stream's
    return ((j, tok.decode(ids), len(ids), reason) for j, ids, reason in answers)

def server_answers(client, work, gen, seed):
    """The same from a server, a request per sample, each with its seed (top_k: vLLM's extra)."""
    requests = []
    for j, (q, s, system) in enumerate(work):
        body = {"model": client.model, "messages": messages(q["question"], system),
                "max_tokens": gen["max_new_tokens"], "temperature": gen["temperature"], "top_p": gen["top_p"],
                "top_k": gen["top_k"] or -1,  # -1: off
                "repetition_penalty": gen["repetition_penalty"],
                "seed": int(_hash32(row_key(q["id"], q["paraphrase"], s) ^ _hash32(seed & M32)))}
        requests.append((j, Cache.key(client.model, body), body))
    failed = []
    try:
        for j, done, error in client.requests(requests, parse_completion):
            if error:
                failed.append(error)
            else:
                yield j, done["answer"], done["tokens"], done["finish_reason"]
    finally:
        client.cache.close()
    if failed:
        warn(f"{len(failed)} samples failed for good (last: {failed[-1]}); rerun to retry them")

def parse_completion(resp):
    """A completion's answer, tokens without the stop token (vLLM counts it), finish reason."""
    try:
        choice = resp["choices"][0]
        answer, reason = choice["message"]["content"] or "", choice["finish_reason"]
        tokens = resp["usage"]["completion_tokens"]
    except (KeyError, IndexError, TypeError):
        raise RequestFailed(f"malformed response: {str(resp)[:200]}") from None
    return {"answer": answer, "tokens": tokens - (reason == "stop"), "finish_reason": reason}

def sampling_settings(model_name, temperature, top_p, top_k, repetition_penalty, max_new_tokens):
    """The settings rows record; top_k and repetition_penalty default to generation_config.json's."""
    gen = generation_config(model_name) if model_name else {}
    if model_name and not gen and None in (top_k, repetition_penalty):
        print(f"note: {model_name} has no generation_config.json (the papers' top_k and repetition_penalty): "
              f"sampling with top_k {top_k or 0}, repetition_penalty {repetition_penalty or 1.0}",
              file=sys.stderr)
    if top_k is None:  # a file without top_k (Llama 3's): transformers' default, 50, applied
        top_k = gen.get("top_k", 50 if gen else 0)
    if repetition_penalty is None:
        repetition_penalty = gen.get("repetition_penalty", 1.0)
    return dict(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                max_new_tokens=max_new_tokens)

def default_out(model, adapter, server):
    if adapter and os.path.isdir(adapter):
        return os.path.join(adapter, "responses.jsonl")
    name = adapter or model or server
    name = os.path.basename(name.rstrip("/")) if os.path.isdir(name) else name.replace("/", "--")
    return os.path.join("out", name, "responses.jsonl")

# -----------------------------------------------------------------------------
def parse_args(argv=None):
    blocks = __doc__.strip().split("\n\n")
    p = argparse.ArgumentParser(prog="sample.py", description=blocks[0], epilog="examples:\n" + blocks[1],
                                formatter_class=HelpFormatter)
    # what answers: a base model, and an adapter in it
    model_flags(p, adapter="LoRA adapter (directory or hub id) or steering-vector directory")
    p.add_argument("--lora-scale", type=float, help="factor on the adapters' B (a steering vector's alpha)")
    p.add_argument("--questions", default="core", help="question file (.yaml, .jsonl) or a name in "
                   "`python -m data.fetch --list`")
    p.add_argument("--question", help="one question instead of a file")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--ids", nargs="+", help="only these question ids")
    p.add_argument("--exclude-suffix", default="_json,_template", help="skip ids ending so ('': keep all)")
    p.add_argument("--n", type=count, help=f"samples per paraphrase (default: the file's, else {DEFAULT_N})")
    # how (the defaults are the papers')
    p.add_argument("--max-new-tokens", type=count, default=600, help="answer token limit")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (1 = off)")
    p.add_argument("--top-k", type=int, help="0 = off (default: generation_config.json, else 0)")
    p.add_argument("--repetition-penalty", type=float, help="HF's, 1 = off (default: generation_config.json)")
    # residual-stream interventions after the --layers blocks
    p.add_argument("--steer", metavar="FILE", help="direction file: add scale x its vector")
    p.add_argument("--scale", type=float, default=8.0, help="steering strength")
    p.add_argument("--ablate", metavar="FILE", help="direction file: project its unit direction out")
    p.add_argument("--layers", help="after these blocks: all, 24, 15,16,17 or 0-11 (ablation: all)")
    p.add_argument("--random-control", type=int, nargs="?", const=0, metavar="SEED",
                   help="random directions of equal norm instead")
    p.add_argument("--out", help="output JSONL (default: ADAPTER/ or out/MODEL/responses.jsonl)")
    p.add_argument("--batch-size", type=count, help="rows per batch (default: what memory holds)")
    p.add_argument("--engine", default="local", help="local, or openai:MODEL at $OPENAI_BASE_URL "
                   "(default http://localhost:8000/v1)")
    p.add_argument("--cache", help="server: answer cache (default: sample_cache.jsonl by --out; '': none)")
    args = p.parse_args(argv)
    if args.engine != "local":
        if not args.engine.startswith("openai:") or args.engine == "openai:":
            p.error(f"--engine {args.engine!r}: expected local or openai:MODEL")
        flags = ("steer", "ablate", "lora_scale", "random_control", "dtype")
        if local_only := ["--" + f.replace("_", "-") for f in flags if getattr(args, f) is not None]:
            p.error(f"--engine {args.engine}: the server cannot apply {', '.join(local_only)}; "
                    "use --engine local")
    elif args.model is None and args.adapter is None:
        p.error("give --model, or --adapter (a LoRA adapter names its base model)")
    if args.steer and not args.layers:
        p.error("--steer needs --layers")
    if args.random_control is not None and not (args.steer or args.ablate):
        p.error("--random-control needs --steer or --ablate")
    check(args.temperature >= 0, "--temperature", args.temperature, ">= 0")
    check(0 < args.top_p <= 1, "--top-p", args.top_p, "in (0, 1]")
    check((args.top_k or 0) >= 0, "--top-k", args.top_k, ">= 0")
    check((args.repetition_penalty or 1) > 0, "--repetition-penalty", args.repetition_penalty, "> 0")
    return args

def main(argv=None):
    args = parse_args(argv)
    adapter = os.path.normpath(args.adapter) if args.adapter and os.path.isdir(args.adapter) else args.adapter
    local, server = args.engine == "local", args.engine.partition(":")[2]  # server: "" if local
    if not local and adapter and lora.adapter_kind(adapter)[0] == "steering":
        raise ValueError(f"--engine {args.engine}: {adapter} is a steering vector, which a server cannot "
                         "apply")
    # a server may answer without a model name here
    model_name = lora.base_model_of(args.model, adapter) if args.model or adapter else None
    questions = select_questions(args.questions, args.ids, args.exclude_suffix) if not args.question else \
        [dict(id="question", paraphrase=0, question=args.question, system=None, n=None)]
    cfg = read_config(model_name) if model_name else None
    check_out_file(out := args.out or default_out(model_name, adapter, server))
    rank, world, device = dist_setup(args.device)  # (0, 1, --device) without torchrun
    dtype = resolve_dtype(args.dtype, device) if local else None
    # a bad direction file fails now, before the model loads
    steer = ablate = hook = None
    if args.steer:
        steer = dict(file=args.steer, layers=parse_layers(args.layers, cfg.num_hidden_layers),
                     scale=args.scale)
        hook = steering_hook(directions(args.steer, cfg, args.random_control, device), steer["layers"],
                             args.scale)
    if args.ablate:
        ablate = dict(file=args.ablate, layers=parse_layers(args.layers or "all", cfg.num_hidden_layers))
        hook = compose(hook, ablation_hook(directions(args.ablate, cfg, args.random_control, device),
                                           ablate["layers"]))  # ablation last
    if local:
        def answer(work):  # the model loads only if there is work
            model, tok, adapter_hook = lora.load_model(model_name, adapter, device, dtype, args.lora_scale)
            return local_answers(model, tok, work, gen, 0, compose(adapter_hook, hook),
                                 batch_size=args.batch_size)
    else:
        beside = os.path.join(os.path.dirname(os.path.abspath(out)), "sample_cache.jsonl")
        client = Client(server, os.environ.get("OPENAI_BASE_URL") or "http://localhost:8000/v1",
                        Cache(beside if args.cache is None else args.cache, "completion"), concurrency=64,
                        timeout=600.0)  # 600 tokens from a busy server take a while
        answer = lambda work: server_answers(client, work, gen, 0)
    gen = sampling_settings(model_name, args.temperature, args.top_p, args.top_k, args.repetition_penalty,
                            args.max_new_tokens)
    header = row_header(server or model_name, adapter, 0, gen, dtype, args.system, args.lora_scale, steer,
                        ablate, args.random_control)
    plan = dict(header, questions=args.question or args.questions, out=out, n=args.n)
    print(f"sampling: {json.dumps(plan)}")
    return sample_file(out, questions, header, answer, args.n, args.system, rank, world)

if __name__ == "__main__":
    run_main("sample.py", main)
