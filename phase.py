"""
The phase transition (Model Organisms for EM): over a train.py run's checkpoints, the adapter's direction
turns suddenly as the behaviour switches. All checkpoints are held in memory: for small adapters.

    python phase.py --run out/RUN  # the geometry, in seconds
    python phase.py --run out/RUN --behaviour 100,150,200  # and EM % with B scaled

Norms of A and B; their local cosine (-1 on a straight path; the sudden rotation, "the turn", is a spike
towards 0 and above); the comp score against the last checkpoint; a PCA of the path; with --behaviour, EM %.
Writes OUT/phase.json.
Departures: each k uses every step with t - k and t + k (the reference: those valid for the largest k);
all adapters at once (it took one); B as (out, r) in the comp score (it was identically 1 for one adapter).
"""
import argparse
import math
import os

import numpy as np
import torch
from tqdm import tqdm

import directions
import lora
from common import HelpFormatter, claim_dir, model_flags, out_flags, print_table, run_main, write_json
from lora import lora_modules

MIN_MOVE = 0.002  # local_cosine skips steps where A and B moved less (L2) in both windows

def read_checkpoints(run):
    """[(step, directory, {module name: (A, B)})] of RUN/checkpoints/step_N/."""
    ck = os.path.join(run, "checkpoints")
    if not os.path.isdir(ck):
        raise FileNotFoundError(f"{ck}: no such directory (--run: a train.py run with checkpoints/step_N/)")
    found = sorted((int(d[5:]), os.path.join(ck, d)) for d in os.listdir(ck) if d.startswith("step_")
                   and d[5:].isdigit() and os.path.isfile(os.path.join(ck, d, "adapter_model.safetensors")))
    out = [(s, d, lora.read_lora(d)[0]) for s, d in tqdm(found, desc="checkpoints", leave=False)]
    if bad := next((d for _, d, t in out if set(t) != set(out[0][2])), None):
        raise ValueError(f"{bad}: adapts other modules than {out[0][1]}; give one run's checkpoints")
    return out

def local_cosine(A, B, steps, k):
    """cos(v[t-k] - v[t], v[t+k] - v[t]) for v = A and B ((n_steps, D)) at each step t with both neighbours
    (see MIN_MOVE)."""
    at = {s: i for i, s in enumerate(steps)}
    out = []
    for i, t in enumerate(steps):
        if t - k not in at or t + k not in at:
            continue
        row, moved = {"step": t}, 0.0
        for key, V in (("A", A), ("B", B)):
            prev, nxt = V[at[t - k]] - V[i], V[at[t + k]] - V[i]  # (D,)
            den = np.linalg.norm(prev) * np.linalg.norm(nxt)
            moved = max(moved, np.linalg.norm(prev), np.linalg.norm(nxt))
            row[key] = float(prev @ nxt / den) if den > 0 else 0.0
        if moved >= MIN_MOVE:
            out.append(row)
    return out

def comp_scores(Bs):
    """||B_t^T B_T||_F / (||B_t||_F ||B_T||_F) of each step t against the last, B de-meaned over steps. Bs:
    per step the adapters' (out, r) matrices, side by side in B_t (of different widths: block-diagonal)."""
    mean = [np.mean(b, 0) for b in zip(*Bs)]  # per adapter, over steps
    D = [[b - m for b, m in zip(bs, mean)] for bs in Bs]
    groups = {}
    for j, b in enumerate(Bs[0]):
        groups.setdefault(b.shape[0], []).append(j)
    side = lambda Dt, g: np.hstack([Dt[j] for j in g])  # (out, r x adapters)
    sq = lambda Dt: sum((x ** 2).sum() for x in Dt)
    out = []
    for Dt in D[:-1]:
        num = sum(((side(Dt, g).T @ side(D[-1], g)) ** 2).sum() for g in groups.values())
        den = math.sqrt(sq(Dt) * sq(D[-1]))
        out.append(float(math.sqrt(num) / den) if den > 0 else 0.0)
    return out

def pca2(V):
    """V's rows (n, D) on its first two principal components, and their variance shares."""
    U, S, _ = np.linalg.svd(V - V.mean(0), full_matrices=False)
    coords, share, k = np.zeros((len(V), 2)), np.zeros(2), min(2, len(S))
    coords[:, :k], share[:k] = (U * S)[:, :2], S[:2] ** 2 / max((S ** 2).sum(), 1e-300)
    return dict(coords=coords.tolist(), explained=share.tolist())

def checkpoint_scaled(model, tensors, multiplier):
    """Copy a checkpoint's adapters into the model; inside, every B x multiplier."""
    mods = dict(lora_modules(model))
    with torch.no_grad():
        for n, (A, B) in tensors.items():
            mods[n].lora_A.copy_(A)
            mods[n].lora_B.copy_(B)
    return lora.temporarily(mods.values(), "multiplier", [multiplier] * len(mods))

def behaviour(cks, out, steps, multipliers, model, **sampling):
    """EM % of the checkpoints at `steps` (None: all) with B x each multiplier, sampled and judged
    (resumes); sampling: directions.sample_and_judge's keywords."""
    by_step = {s: (d, t) for s, d, t in cks}
    chosen = sorted(set(steps or by_step))
    if missing := [s for s in chosen if s not in by_step]:
        raise ValueError(f"--behaviour: no checkpoint at step {missing[0]}; there are {sorted(by_step)}")
    mults = list(dict.fromkeys(multipliers))  # each once: one row per run
    runs = [(s, m, os.path.join(out, "behaviour", f"step_{s:06d}_x{m:g}.jsonl"))
            for s in chosen for m in mults]
    first = by_step[chosen[0]][0]  # the model loads with it; each run copies its own in
    jobs = [(f, dict(adapter=by_step[s][0], lora_scale=m), None,
             lambda model, s=s, m=m: checkpoint_scaled(model, by_step[s][1], m)) for s, m, f in runs]
    summaries = directions.sample_and_judge(lora.base_model_of(model, first), first, jobs, **sampling)
    rows = [dict(step=s, multiplier=m, n=o["n"], em_pct=o["em_pct"], coherence_pct=o["coherence_pct"], file=f)
            for (s, m, f), o in zip(runs, (x["overall"] for x in summaries))]
    print_table(["step"] + [f"EM % at B x{m:g}" for m in mults],
                [[s] + [r["em_pct"] for r in rows if r["step"] == s] for s in chosen])
    return rows

def main(argv=None):
    p = argparse.ArgumentParser(prog="phase.py", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--run", required=True, help="train.py output directory")
    p.add_argument("--ks", default="5,10,15", help="local-cosine windows in training steps")
    p.add_argument("--behaviour", metavar="STEPS", help="steps to sample and judge (comma list or all)")
    p.add_argument("--multipliers", default="0.5,1,2", help="--behaviour: B multipliers")
    model_flags(p)
    directions.sampling_flags(p)
    out_flags(p, "output directory (default: RUN/phase)", "phase.json (sampled files resume)")
    args = p.parse_args(argv)
    out = args.out or os.path.join(args.run, "phase")
    ks = [int(k) if k.isdigit() else 0 for k in args.ks.split(",")]
    if min(ks) < 1:
        raise ValueError(f"--ks {args.ks}: expected a comma list of windows >= 1")
    claim_dir(out, "phase.py", ["phase.json"], args.force)
    cks = read_checkpoints(args.run)
    steps = [s for s, _, _ in cks]
    spacing = int(np.bincount(np.diff(steps)).argmax()) if len(steps) > 1 else 1  # the usual --save-every
    if any(k % spacing for k in ks):
        raise ValueError(f"--ks {args.ks}: each k must be a multiple of the checkpoint spacing, {spacing}")
    if len(steps) < (need := 2 * max(ks) // spacing + 1):
        where = f" (steps {steps[0]}..{steps[-1]}, every {spacing})" if steps else ""
        raise ValueError(f"{args.run}: {len(steps)} checkpoints{where}; --ks {max(ks)} needs at least {need}")

    # the geometry (the turn: where the path bends most)
    names = list(cks[0][2])
    flat = lambda i: np.stack([np.concatenate([t[n][i].double().flatten().numpy() for n in names])
                               for *_, t in cks])
    A, B = flat(0), flat(1)  # (steps, D_A), (steps, D_B)
    local = {str(k): local_cosine(A, B, steps, k) for k in ks}  # str: JSON's keys
    turn = {k: {v: max(rows, key=lambda r: r[v])["step"] if rows else None for v in "AB"}
            for k, rows in local.items()}
    norms = {n: {v: [float(t[n][i].double().norm()) for *_, t in cks] for i, v in enumerate("AB")}
             for n in names}
    comp = comp_scores([[t[n][1].double().numpy() for n in names] for *_, t in cks])
    result = dict(run=args.run, steps=steps, spacing=spacing, adapters=names, min_move=MIN_MOVE,
                  norms=norms, local_cosine=local, turn=turn,
                  comp_score=[dict(step=s, score=c) for s, c in zip(steps, comp)],
                  pca=dict(A=pca2(A), B=pca2(B)))
    print_table(["k", "steps kept", "turn of A", "turn of B"],
                [[k, len(rows), turn[k]["A"], turn[k]["B"]] for k, rows in local.items()])
    claim_dir(out, "phase.py", create=True)
    if args.behaviour:
        chosen = None if args.behaviour == "all" else [int(s) for s in args.behaviour.split(",")]
        mults = [float(m) for m in args.multipliers.split(",")]
        sampling = {k: getattr(args, k) for k in directions.SAMPLING}
        result["behaviour"] = behaviour(cks, out, chosen, mults, args.model, **sampling)
    write_json(os.path.join(out, "phase.json"), result)
    return result

if __name__ == "__main__":
    run_main("phase.py", main)
