"""
Narrow vs general (Narrow Misalignment is Hard, Emergent Misalignment is Easy): compares two steering
vectors trained on the same narrow data with a KL penalty (narrow) and without (general).

    python stability.py --narrow out/sv-kl --general out/sv --data bad_medical_advice --text c4

Per vector: the narrow data's loss as it is rescaled; robustness, 100 (L_pert - L_orig) / (L_base -
L_orig) under x' = sqrt(1 - e^2) x + e y (y random, orthogonal, of x's norm); with --text, KL(base ||
steered) per web-text token as the norm grows, beside a random vector. Writes OUT/stability.json.
Departures: the loss is on answer tokens only (the reference: all) and the KL skips padding; the web
text is a file or one pinned C4 file (the reference streamed FineWeb); no LoRA mode.
"""
import argparse
import gzip
import json
import math
import os
import random

import numpy as np
import torch
from tqdm import tqdm

import lora
from common import HelpFormatter, claim_dir, count, model_flags, out_flags, print_table, run_main, write_json
from data.fetch import dataset_path
from model import load
from train import base_hidden, evaluate, kl_sum, pack, read_conversations, tokenize

SEED = 42  # the reference's: rows, perturbations (seed + i), web text
MAX_LEN, TEXT_TOKENS = 2048, 512  # tokens per conversation and web document
# --text c4: small public web text, pinned (FineWeb's files are GBs of parquet)
C4 = ("allenai/c4", "607bd4c8450a42878aa9ddc051a65a055450ef87", "en/c4-validation.00000-of-00008.json.gz")

def perturb(x, e, gen):
    """x' of the module docstring; x itself if x = 0."""
    xf = x.detach().double().cpu().flatten()
    if xf.norm() == 0:
        return x.clone()
    y = torch.randn(xf.shape, generator=gen, dtype=torch.float64)
    y -= (y @ xf) / (xf @ xf) * xf
    y *= xf.norm() / y.norm()
    return (math.sqrt(1 - e * e) * xf + e * y).view(x.shape).to(x.device, x.dtype)

def steered(sv, vector):
    with torch.no_grad():
        sv.vector.copy_(vector)
    return sv

@torch.no_grad()
def kl_curve(model, rows, sv, vector, norms, bar):
    """KL(base || steered) per web-text token, `vector` rescaled to each norm."""
    if vector.norm() == 0:
        raise ValueError("a steering vector is zero: no direction to rescale")
    bases = [base_hidden(model, r) for r in rows]  # the same at every norm
    out = []
    for v in norms:
        hook = steered(sv, v * vector / vector.norm())
        kl = sum(float(kl_sum(model, r, hook, h)) for r, h in zip(rows, bases))
        out.append({"norm": v, "kl": kl / sum(int(r[2].sum()) for r in rows)})
        bar.update()
    return out

def c4_file():
    """The pinned C4 file, cached or downloaded; offline, an error at once."""
    import socket
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    repo, revision, file = C4
    get = lambda **kw: hf_hub_download(repo, file, repo_type="dataset", revision=revision, **kw)
    try:
        return get(local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    try:
        socket.create_connection(("huggingface.co", 443), timeout=5).close()
    except OSError:
        raise FileNotFoundError(f"--text c4: the Hugging Face Hub cannot be reached and {file} is not "
                                f"cached; fetch it (hf download {repo} {file} --repo-type dataset "
                                f"--revision {revision}), or pass --text FILE") from None
    return get()

def read_documents(spec):
    """(path, [text]) of a .txt (blank-line separated), .jsonl / .json.gz of {"text"}, or c4."""
    path = c4_file() if spec == "c4" else spec
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--text {spec}: no such file (give .txt, .jsonl or c4)")
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        if ".json" not in os.path.basename(path):
            return path, [d.strip() for d in f.read().split("\n\n") if d.strip()]
        docs = []
        for n, line in enumerate(f, 1):
            try:
                docs += [str(json.loads(line)["text"])] if line.strip() else []
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{path}:{n}: expected a JSON object with a 'text' field") from None
    return path, docs

def text_rows(docs, tok, n_docs, seed, max_tokens):
    """The reference's web text: of a seeded shuffle's first n_docs, those over 100 characters and 10
    tokens, cut to 2,000 characters and max_tokens tokens."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    bos = [] if tok.bos_id is None else [tok.bos_id]
    ids = [(bos + tok.encode(docs[i][:2000]))[:max_tokens] for i in order[:n_docs] if len(docs[i]) > 100]
    ids = [x for x in ids if len(x) > 10]
    if not ids:
        raise ValueError(f"--text: none of the first {n_docs} documents is long enough")
    return pack([(x, [1] * len(x)) for x in ids], max(max_tokens, MAX_LEN))

def solution(model, rows, sv, base_loss, scales, eps, seeds, text, norms, bar):
    """A steering vector's loss, rescaled losses, robustness and (with text) KL curve."""
    v = sv.vector.detach().clone()
    loss = evaluate(model, sv, rows)
    res = dict(norm=float(v.double().norm()), loss=loss, rescale=[], robustness=[])
    for s in scales:
        loss_s = evaluate(model, steered(sv, s * v), rows)
        res["rescale"].append(dict(scale=s, norm=s * res["norm"], loss=loss_s))
        bar.update()
    for e in eps:
        vals = []
        for i in range(seeds):
            pert = evaluate(model, steered(sv, perturb(v, e, torch.Generator().manual_seed(SEED + i))), rows)
            vals.append(100 * (pert - loss) / (base_loss - loss) if base_loss != loss else None)
            bar.update()
        ok = base_loss != loss
        res["robustness"].append(dict(eps=e, mean=float(np.mean(vals)) if ok else None,
                                      std=float(np.std(vals)) if ok else None, values=vals))
    if text:
        res["kl"] = kl_curve(model, text, sv, v, norms, bar)
    return res

def print_summary(result):
    """Losses and robustness (REPORT.md plots the rest)."""
    n, g = result["solutions"]["narrow"], result["solutions"]["general"]
    print(f"base loss {result['base_loss']:.4f} on {result['rows']} rows ({result['loss_tokens']} answer "
          f"tokens); narrow: loss {n['loss']:.4f}, norm {n['norm']:.4g}; general: loss {g['loss']:.4f}, "
          f"norm {g['norm']:.4g}")
    pct = lambda x: "-" if x["mean"] is None else f"{x['mean']:.1f} ± {x['std']:.1f}"
    print_table(["e", "narrow loss increase %", "general loss increase %"],
                [[a["eps"], pct(a), pct(b)] for a, b in zip(n["robustness"], g["robustness"])])

def main(argv=None):
    p = argparse.ArgumentParser(prog="stability.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--narrow", required=True, help="narrow steering vector directory")
    p.add_argument("--general", required=True, help="general steering vector directory")
    p.add_argument("--data", required=True, help="narrow dataset name or JSONL")
    p.add_argument("--text", help="KL curves' web text: .txt, .jsonl, .json.gz or c4")
    p.add_argument("--rows", type=count, default=100, help="rows of --data (a seeded sample)")
    p.add_argument("--scales", default="0,0.25,0.5,0.75,1,1.25,1.5,1.75,2", help="rescaling factors s")
    p.add_argument("--eps", default="0.01,0.05,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1",
                   help="perturbation sizes e")
    p.add_argument("--seeds", type=count, default=10, help="perturbations per e")
    p.add_argument("--norms", default=",".join(f"{0.2 * i:.1f}" for i in range(26)), help="KL curve norms")
    p.add_argument("--text-docs", type=count, default=50, help="documents of shuffled --text")
    model_flags(p)
    out_flags(p, "default: out/stability", "stability.json")
    args = p.parse_args(argv)
    out = args.out or os.path.join("out", "stability")
    claim_dir(out, "stability.py", ["stability.json"], args.force)
    scales, eps, norms = ([float(x) for x in v.split(",")] for v in (args.scales, args.eps, args.norms))
    docs = read_documents(args.text) if args.text else None  # fail before the model loads
    paths = {"narrow": args.narrow, "general": args.general}
    for k, path in paths.items():
        if lora.adapter_kind(path)[0] != "steering":
            raise ValueError(f"--{k} {path}: not a steering vector (no LoRA mode)")
    base = lora.base_model_of(args.model, args.narrow)
    model, tok = load(base, args.device, args.dtype)
    device = model.lm_head.weight.device
    sols = {k: lora.SteeringVector.load(path, device).check(model.config, f"--{k} {path}")
            for k, path in paths.items()}
    data = dataset_path(args.data)
    convs = read_conversations(data)
    chosen = random.Random(SEED).sample(convs, min(args.rows, len(convs)))  # the reference's
    rows = pack(tokenize(chosen, tok, MAX_LEN, data)[0], MAX_LEN)
    base_loss = evaluate(model, None, rows)
    result = dict(model=base, narrow=args.narrow, general=args.general, data=data, rows=len(chosen),
                  loss_tokens=sum(int(r[2][1:].sum()) for r in rows), seed=SEED, base_loss=base_loss)
    text = docs and text_rows(docs[1], tok, args.text_docs, SEED, TEXT_TOKENS)
    if text:
        result["text"] = dict(file=docs[0], documents=sum(int((r[1] == 0).sum()) for r in text),
                              tokens=sum(int(r[2].sum()) for r in text))
    steps = 2 * (len(scales) + len(eps) * args.seeds) + 3 * len(norms) * bool(text)  # 3: and the random one
    bar = tqdm(total=steps, desc="stability")
    sweeps = (scales, eps, args.seeds, text, norms, bar)
    result["solutions"] = {k: solution(model, rows, sv, base_loss, *sweeps) for k, sv in sols.items()}
    if text:  # control: a seeded random vector at the narrow one's layer and alpha
        r = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(SEED)).to(device)
        result["solutions"]["random"] = dict(kl=kl_curve(model, text, sols["narrow"], r, norms, bar))
    bar.close()
    claim_dir(out, "stability.py", create=True)
    write_json(os.path.join(out, "stability.json"), result)
    print_summary(result)
    return result

if __name__ == "__main__":
    run_main("stability.py", main)
