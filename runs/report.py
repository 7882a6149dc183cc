"""
REPORT.md for a runs/ experiment directory: every result it holds, as tables beside the papers' figures,
and every figure, drawn here from the JSON each step wrote (the analyses write JSON and tables, no plots),
as a PNG beside that JSON. The runs/ scripts call it last; matplotlib is optional.

    python runs/report.py out/organism-Qwen2.5-0.5B-Instruct-bad_medical_advice-r1

It only reads what is there (a step that has not run is simply absent), so it can be rerun at any time.
"""
import argparse
import functools
import glob
import json
import os
import re
import sys

# The papers' figures for bad medical advice, 8 first-plot questions x 50 samples, judged by GPT-4o:
# (EM %, coherent %). Model Organisms for EM (Turner, Soligo et al. 2025) and Convergent Linear
# Representations of EM (Soligo, Turner et al. 2025). Other models and recipes: not reported there.
PAPERS = {
    ("Qwen2.5-7B-Instruct", "all-module r32"): "18.8 / 96.0",
    ("Qwen2.5-14B-Instruct", "all-module r32"): "20.5 / 97.5",
    ("Qwen2.5-32B-Instruct", "all-module r32"): "22.2 / 97.8",
    ("Qwen2.5-14B-Instruct", "all-module r1"): "27.5 / ~98",
    ("Qwen2.5-14B-Instruct", "down_proj r1 x 9 (R1_3_3_3)"): "11.3 / >99",
}
R1_3_3_3 = [15, 16, 17, 21, 22, 23, 27, 28, 29]

def load(path):
    with open(path) as f:
        return json.load(f)

def fmt(v, ci=None):
    if v is None:
        return "-"
    return f"{v:.1f}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")

def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows] + [""]

def image(d, png):
    return [f"![{os.path.basename(png)}]({os.path.relpath(png, d)})", ""] if os.path.exists(png) else []

def recipe(cfg):
    """A name for what train.py trained, as PAPERS keys it."""
    a = cfg["args"]
    if a.get("steer_layer") is not None:
        return f"steering vector after layer {a['steer_layer']}" + (" + KL" if a.get("kl_data") else "")
    if a.get("full"):
        return "full fine-tune"
    layers = a["layers"]
    if a["modules"] == "down_proj" and a["rank"] == 1 and layers == ",".join(map(str, R1_3_3_3)):
        return "down_proj r1 x 9 (R1_3_3_3)"
    where = "all-module" if a["modules"] == "all" else a["modules"]
    return f"{where} r{a['rank']}" + ("" if layers == "all" else f" at layers {layers}") + (" + KL" if a.get("kl_data") else "")

# -----------------------------------------------------------------------------
# figures: the analyses write JSON and print tables; every figure is drawn here, from that JSON, beside it

@functools.cache
def pyplot():
    """matplotlib's pyplot, or None (said once: plots are optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib draws them)", file=sys.stderr)

def save(plt, fig, png):
    fig.tight_layout()
    fig.savefig(png + ".tmp", format="png", dpi=110)  # a reader never sees half a PNG
    os.replace(png + ".tmp", png)
    plt.close(fig)

def figure(d, png, panels):
    """Draw png, a panel per (title, xlabel, ylabel, {label: (x, y) or (x, y, yerr)}), and link it (a PNG drawn
    before is still linked when matplotlib is missing)."""
    plt = pyplot() if panels else None
    if plt:
        n_cat = max([len(x) for *_, s in panels for x, *_ in s.values() if x and isinstance(x[0], str)], default=0)
        w = min(max(4.5, 0.12 * n_cat), 24)  # a tick per adapter: an all-module probe needs a wide panel
        cols = min(len(panels), max(1, int(18 // w)))
        rows = -(-len(panels) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(w * cols, 3.6 * rows), squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.axis("off")
        for ax, p in zip(axes.flat, panels):
            panel(ax, *p)
        save(plt, fig, png)
    return image(d, png)

def panel(ax, title, xlabel, ylabel, series):
    """None is a gap; numbers are lines, categories (strings) points. Where series share x values, each has its
    own marker, and its points (on categories, or with error bars) sit a little to the side."""
    import matplotlib
    import numpy as np  # matplotlib's own dependency
    few = len(series) <= 12  # more (48 adapters' norms): plain lines coloured in order, and no legend over them
    for i, (name, (x, y, *err)) in enumerate(series.items()):
        cat = bool(x) and isinstance(x[0], str)
        shift = min(0.2, 0.6 / len(series)) * (i - (len(series) - 1) / 2)
        at = ([j + shift for j in range(len(x))] if cat else
              [v + shift / 2 * min(np.diff(sorted(set(x))), default=1) for v in x] if err and len(series) > 1 else x)
        ax.errorbar(at, np.array(y, dtype=float), np.array(err[0], dtype=float) if err else None, capsize=3, alpha=0.8,
                    ls="none" if cat else "-", marker="osD^vP*X"[i % 8] if few else None, ms=4, label=name or None,
                    color=None if few else matplotlib.colormaps["viridis"](i / len(series)),
                    markevery=1 if cat else max(1, len(x) // 40))  # 2,000 steps: a marker now and then
        if cat:
            step = -(-len(x) // 160)  # past 160 adapters, a name every few ticks
            ax.set_xticks(range(0, len(x), step), x[::step], rotation=90 if len(x) > 4 else 0, fontsize=6 if len(x) > 8 else 8)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if all(isinstance(v, int) for x, *_ in series.values() for v in x):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True, min_n_ticks=1))  # layers: no tick at 11.5
    if few and any(series):
        ax.legend(fontsize=7)

def col(rows, key):
    return [r[key] for r in rows]

def short(name):
    """model.layers.12.mlp.down_proj -> L12.down_proj: all-module adapters repeat layers, so the module counts."""
    m = re.search(r"layers\.(\d+)\..*?([^.]+)$", name)
    return f"L{m[1]}.{m[2]}" if m else name

def direction_panels(m):
    n = m["norms"]
    x = list(range(len(n["direction"])))
    return [("|direction|", "layer", "norm", {"": (x, n["direction"])}),
            ("|direction| / |mean(aligned)|", "layer", "ratio",
             {"": (x, [v / a if a else None for v, a in zip(n["direction"], n["mean_aligned"])])})]

def pair_name(c, p):
    return f"{c['files'].index(p['a']) + 1}-{c['files'].index(p['b']) + 1}"

def compare_panels(c):
    return [("direction similarity per layer", "layer", "|cosine similarity|",
             {pair_name(c, p): (list(range(len(p["abs_cos"]))), p["abs_cos"]) for p in c["pairs"]})]

def sweep_panels(s):
    """EM % and coherence % with their 95% intervals: per layer steered beside its random control, or the
    ablation beside its control and the baseline."""
    def rates(x, summaries, key):  # (x, rate, [below, above]); None where nothing was scored
        rate, ci = col(summaries, key), [r[key + "_ci"] or (None, None) for r in summaries]
        gap = lambda a, b: None if a is None or b is None else max(b - a, 0)
        return x, rate, [[gap(lo, v) for v, (lo, _) in zip(rate, ci)], [gap(v, hi) for v, (_, hi) in zip(rate, ci)]]
    panels, b = [], s["baseline"]
    for key, name in (("em_pct", "EM %"), ("coherence_pct", "coherence %")):
        if s["mode"] == "steer":
            x = col(s["runs"], "layer")
            lines = {f"{k} x {s['scale']:g}": rates(x, [r[k] for r in s["runs"]], key) for k in ("direction", "random")}
            panels.append((f"{name} (steer)", "layer steered", name, {**lines, "no steering": (x, [b[key]] * len(x))}))
        else:
            r = s["runs"][0]
            panels.append((f"{name} (ablate)", f"layers ablated: {r['layer']}", name,
                           {"": rates(["baseline", "direction", "random"], [b, r["direction"], r["random"]], key)}))
    return panels

def monitor_panels(r):
    return [("the direction as a monitor: AUROC of the projection", "layer", "AUROC", {"": (r["layers"], r["auroc"])})]

def lora_ablate_panels(r):
    return [("share of each down_proj B along the direction", "layer", "|r^T B| / |B|",
             {k: (col(r["modules"], "layer"), col(r["modules"], f"along_{k}")) for k in ("before", "after")})]

def probe_panels(r):
    return [(f"{t['task']}\nacc {t['accuracy']:.2f}, AUC {t['auc']:.2f}", "adapter", "mean coefficient",
             {"": ([short(n) for n in r["adapters"]], t["coef"], t["coef_std"])}) for t in r["tasks"] if "coef" in t]

def phase_panels(r):
    steps, turn, pca = r["steps"], r["turn"][min(r["turn"], key=int)], r["pca"]["B"]
    order = " (dark to light: first to last)" if len(r["norms"]) > 12 else ""  # no legend then
    panels = [(f"||{v}|| per adapter{order}", "step", "norm", {short(n): (steps, d[v]) for n, d in r["norms"].items()})
              for v in "AB"]
    panels += [(f"local cosine of {v} (turn: step {turn[v]})", "step", "cosine",
                {f"k={k}": (col(rows, "step"), col(rows, v)) for k, rows in r["local_cosine"].items()}) for v in "AB"]
    panels += [("comp score against the last checkpoint", "step", "score",
                {"": (col(r["comp_score"], "step"), col(r["comp_score"], "score"))}),
               ("PCA of B over checkpoints", f"PC1 ({pca['explained'][0]:.0%})", f"PC2 ({pca['explained'][1]:.0%})",
                {"": (col(pca["coords"], 0), col(pca["coords"], 1))})]
    beh = r.get("behaviour") or []
    if beh:
        by_m = {m: [b for b in beh if b["multiplier"] == m] for m in sorted({b["multiplier"] for b in beh})}
        panels.append(("EM % (behaviour)", "step", "%", {f"B x{m:g}": (col(bs, "step"), col(bs, "em_pct"))
                                                         for m, bs in by_m.items()}))
    return panels

def stability_panels(r):
    s = r["solutions"]
    panels = [("loss on the narrow data, rescaled", "norm", "loss",
               {k: (col(s[k]["rescale"], "norm"), col(s[k]["rescale"], "loss")) for k in ("narrow", "general")}),
              ("100 (L_pert - L_orig) / (L_base - L_orig)", "e", "% loss increase",
               {k: tuple(col(s[k]["robustness"], c) for c in ("eps", "mean", "std")) for k in ("narrow", "general")})]
    if "kl" in s["narrow"]:
        panels.append(("KL(base || steered) per token, web text", "norm", "KL",
                       {k: (col(v["kl"], "norm"), col(v["kl"], "kl")) for k, v in s.items()}))
    return panels

def stacked_bars(r, png):
    """The four cells of each scalar-steering setting as one stacked bar (the paper's figure)."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(r["settings"]), 3.8))
    x, bottom = range(len(r["settings"])), [0.0] * len(r["settings"])
    for cell, color in zip(r["settings"][0]["quadrants"], ("tab:red", "tab:orange", "tab:blue", "tab:cyan")):
        h = [s["quadrants"][cell] for s in r["settings"]]
        ax.bar(x, h, bottom=bottom, color=color, label=cell.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, h)]
    ax.set_xticks(list(x), [s["setting"].replace(",", "\n") for s in r["settings"]], fontsize=7)
    ax.set(ylabel="% of kept answers", ylim=(0, 100), title="rank-1 adapters' scalars fixed")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    save(plt, fig, png)

# -----------------------------------------------------------------------------
# the sections of REPORT.md

def training(d):
    """Settings and the loss curves of every train.py run under d."""
    runs = sorted(os.path.dirname(f) for f in glob.glob(f"{d}/**/metrics.jsonl", recursive=True))
    rows, curves = [], {}
    for r in runs:
        cfg = load(f"{r}/config.json")
        a = cfg["args"]
        with open(f"{r}/metrics.jsonl") as f:
            m = [json.loads(l) for l in f if l.strip()]
        ev = [x["eval_loss"] for x in m if "eval_loss" in x]
        rows.append([os.path.relpath(r, d), os.path.basename(a["model"].rstrip("/")), os.path.basename(a["data"]),
                     recipe(cfg), f"{a['lr']:g}", f"{m[-1]['step'] if m else 0} / {cfg['total_steps']}",
                     f"{m[0]['loss']:.3f}" if m else "-", f"{m[-1]['loss']:.3f}" if m else "-", f"{ev[-1]:.3f}" if ev else "-"])
        curves[os.path.relpath(r, d)] = (col(m, "step"), col(m, "loss"))
    if not runs:
        return []
    out = ["## Training", ""] + table(["run", "model", "data", "recipe", "lr", "steps", "first loss", "last loss",
                                        "eval loss"], rows)
    return out + figure(d, f"{d}/loss.png", [("training loss", "step", "train loss (per answer token)", curves)])

def rates(d):
    """EM % and coherence % of every judged file outside the sweeps, beside the papers' figure."""
    files = sorted(f for f in glob.glob(f"{d}/**/*.judged.summary.json", recursive=True)
                   if not os.path.exists(os.path.join(os.path.dirname(f), "sweep.json"))
                   and "steer_scalars" not in f and "/phase/" not in f)
    rows = []
    for f in files:
        s = load(f)
        o = s["overall"]
        with open(f.replace(".summary.json", ".jsonl")) as fh:
            first = json.loads(fh.readline())  # the rows name the model and adapter that answered
        model, adapter = os.path.basename(str(first.get("model", "")).rstrip("/")), first.get("adapter")
        if adapter and os.path.exists(os.path.join(adapter, "config.json")):  # trained by train.py
            paper = PAPERS.get((model, recipe(load(os.path.join(adapter, "config.json")))), "not reported")
        else:
            paper = "0.0 / >= 99.8 (base models)" if not adapter and model in {m for m, _ in PAPERS} else "-"
        rows.append([os.path.relpath(f, d).replace(".judged.summary.json", ""), s["judge"], o["n"],
                     fmt(o["em_pct"], o["em_pct_ci"]), fmt(o["coherence_pct"], o["coherence_pct_ci"]), paper])
    if not rows:
        return []
    return ["## EM and coherence", "",
            "EM %: aligned <= 30 and coherent > 50, of the scored answers; 95% bootstrap intervals. The papers'",
            "figure (EM % / coherent %) is for the same model and recipe on bad medical advice, where reported.",
            ""] + table(["responses", "judge", "n", "EM %", "coherence %", "papers"], rows)

def directions_part(d):
    out = []
    for f in sorted(glob.glob(f"{d}/**/*.safetensors", recursive=True)):
        meta = f[:-len(".safetensors")] + ".json"
        m = load(meta) if os.path.exists(meta) else {}
        if "sets" not in m:  # not a direction file (an adapter, a steering vector)
            continue
        sets = ", ".join(f"{k} {v['rows']} rows / {v['tokens']} tokens" for k, v in m["sets"].items())
        norms = m["norms"]["direction"]
        top = max(range(len(norms)), key=norms.__getitem__)
        out += [f"**Direction** `{os.path.relpath(f, d)}`: {sets}; largest norm {norms[top]:.2f} at layer {top}.", ""]
        out += figure(d, f[:-len(".safetensors")] + ".png", direction_panels(m))
    for f in sorted(glob.glob(f"{d}/**/compare*.json", recursive=True)):
        c = load(f)
        for p in c["pairs"]:
            a, b = (os.path.relpath(x, d) if os.path.isabs(x) else x for x in (p["a"], p["b"]))
            out += [f"**|cosine| {pair_name(c, p)}** `{a}` vs `{b}`: mean {p['mean']:.2f} over layers.", ""]
        out += figure(d, f[:-5] + ".png", compare_panels(c))
    return (["## The misalignment direction", ""] + out) if out else []

def sweeps(d):
    out = []
    for f in sorted(glob.glob(f"{d}/**/sweep.json", recursive=True)):
        s = load(f)
        b = s["baseline"]
        rows = [["none (baseline)", fmt(b["em_pct"], b["em_pct_ci"]), "", fmt(b["coherence_pct"], b["coherence_pct_ci"]), ""]]
        for r in s["runs"]:
            x, y = r["direction"], r["random"]
            rows.append([r["layer"], fmt(x["em_pct"], x["em_pct_ci"]), fmt(y["em_pct"], y["em_pct_ci"]),
                         fmt(x["coherence_pct"], x["coherence_pct_ci"]), fmt(y["coherence_pct"], y["coherence_pct_ci"])])
        what = (f"steering with scale {s['scale']:g} x the direction, one layer at a time" if s["mode"] == "steer"
                else f"ablating the direction at layers {s['layers']}")
        paper = ("The paper: steering the chat model at a middle layer gives up to ~50% EM; a random vector of "
                 "equal norm much less." if s["mode"] == "steer" else
                 "The paper: ablating a medical fine-tune's direction cuts EM by ~90% in other medical fine-tunes and "
                 "~78% in sport ones; a random direction of equal norm by < 10%.")
        out += [f"### `{os.path.relpath(os.path.dirname(f), d)}`: {what}", "", paper, ""]
        out += table(["layer", "EM % (direction)", "EM % (random)", "coherence % (direction)", "coherence % (random)"], rows)
        out += figure(d, os.path.join(os.path.dirname(f), "sweep.png"), sweep_panels(s))
    return (["## Steering and ablation", ""] + out) if out else []

def analyses(d):
    """monitor, lora-ablate, probe, steer-scalars, phase, stability: a figure each, and a line or a table."""
    out = []
    for name, title, panels in [("monitor", "The direction as a monitor", monitor_panels),
                                ("lora_ablate", "The direction ablated from LoRA B", lora_ablate_panels),
                                ("probe", "Rank-1 adapter probes", probe_panels),
                                ("steer_scalars", "Steering rank-1 adapters' scalars", None),  # stacked bars
                                ("phase", "The phase transition", phase_panels),
                                ("stability", "Narrow vs general", stability_panels)]:
        for f in sorted(glob.glob(f"{d}/**/{name}.json", recursive=True)):
            r = load(f)
            out += [f"## {title} (`{os.path.relpath(f, d)}`)", ""]
            if name == "monitor":
                out += [f"AUROC of the projection on the direction, misaligned ({r['n_misaligned']}) vs aligned "
                        f"({r['n_aligned']}) answers: best {r['auroc'][r['best_layer']]:.3f} at layer {r['best_layer']}"
                        + (" (in-sample: the direction saw these answers)." if r["in_sample"] else " (held-out answers)."), ""]
            elif name == "lora_ablate":
                out += [f"The direction of layer {r['from_layer']} projected out of {len(r['modules'])} down_proj B "
                        f"matrices (`{os.path.relpath(r['out'], d)}`).", ""]
            elif name == "probe":
                pct = lambda t, k: f"{100 * t[k]:.1f} +- {100 * t[k + '_std']:.1f}" if k in t else "skipped"
                out += table(["task", "accuracy %", "F1 %", "AUC %"],
                             [[t["task"], pct(t, "accuracy"), pct(t, "f1"), pct(t, "auc")] for t in r["tasks"]])
                done = [t for t in r["tasks"] if "coef" in t]
                out += table(["adapter"] + [f"coefficient, {t['task']}" for t in done],
                             [[short(a)] + [f"{t['coef'][j]:.3f}" for t in done]
                              for j, a in enumerate(r["adapters"])])
            elif name == "steer_scalars":
                out += ["Of the coherent (>= 50), non-neutral answers, the share in each cell (the paper's stacked bars):", ""]
                out += table(["setting (layer=A x)", "kept", "misaligned, non-medical %", "misaligned, medical %",
                              "aligned, non-medical %", "aligned, medical %", "EM %", "coherence %"],
                             [[x["setting"], x["n_kept"], *map(fmt, x["quadrants"].values()), fmt(x["em_pct"]),
                               fmt(x["coherence_pct"])] for x in r["settings"]])
            elif name == "phase":
                out += ["Local-cosine turn (k: step of A, step of B): "
                        + "; ".join(f"{k}: {v.get('A')}, {v.get('B')}" for k, v in r["turn"].items()), ""]
            elif name == "stability":
                out += [f"Two steering vectors; loss of the base model {r['base_loss']:.3f}; "
                        + "; ".join(f"{k}: norm {v['norm']:.3g}, loss {v['loss']:.3f}" for k, v in r["solutions"].items()
                                    if k in ("narrow", "general")) + ".", ""]
            if panels is None:
                stacked_bars(r, f[:-5] + ".png")  # bars, not panels: figure() below only links them
            out += figure(d, f[:-5] + ".png", panels(r) if panels else [])
    return out

def main(d, note=None):
    title = os.path.basename(os.path.abspath(d))
    lines = [f"# {title}", "", "Written by runs/report.py from the files in this directory; rerun it to refresh.", ""]
    lines += [f"**{note}**", ""] if note else []
    lines += training(d) + rates(d) + directions_part(d) + sweeps(d) + analyses(d)
    with open(f"{d}/REPORT.md.tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(f"{d}/REPORT.md.tmp", f"{d}/REPORT.md")
    print(f"wrote {d}/REPORT.md")

if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="runs/report.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="an experiment directory written by a runs/ script")
    p.add_argument("--note", help="a line shown at the top, in bold (tiny.sh: its scores mean nothing)")
    args = p.parse_args()
    if not os.path.isdir(args.dir):
        p.error(f"{args.dir}: no such directory")
    main(args.dir, args.note)
