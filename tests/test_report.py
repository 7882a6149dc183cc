"""runs/report.py on an experiment directory of small hand-written files of every kind the runs/ steps write
(train.py's run, judge.py's summaries, each directions.py analysis): REPORT.md holds every section, and each
figure is drawn beside its JSON and linked exactly when matplotlib is installed (CI has none)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "runs"))
import report  # noqa: E402

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
SECTIONS = ["## Training", "## EM and coherence", "## The misalignment direction", "## Directions compared",
            "## Steering and ablation", "## The direction as a monitor", "## The direction ablated from LoRA B",
            "## Rank-1 adapter probes", "## Steering rank-1 adapters' scalars", "## The phase transition",
            "## Narrow vs general"]
FIGURES = ["loss.png", "compare.png", "organism/direction.png", "organism/steer/sweep.png", "organism/ablate/sweep.png",
           "organism/monitor/monitor.png", "organism/ablated-adapter/lora_ablate.png", "organism/probe/probe.png",
           "organism/steer_scalars/steer_scalars.png", "organism/phase/phase.png", "nvg/stability/stability.png"]
# an all-module rank-1 adapter: every layer twice, so the probe's x axis must name the module too
ADAPTERS = [f"model.layers.{l}.{m}" for l in range(3) for m in ("self_attn.q_proj", "mlp.down_proj")]


def write(d, path, obj):
    os.makedirs(os.path.dirname(os.path.join(d, path)), exist_ok=True)
    with open(os.path.join(d, path), "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))


def rates(em, coh=100.0):
    """A judge summary as sweep.json holds it; em None: nothing was scored."""
    return dict(n=16, em_pct=em, em_pct_ci=None if em is None else [max(em - 20, 0), min(em + 20, 100)],
                coherence_pct=coh, coherence_pct_ci=[coh - 5, coh])


def experiment(d):
    """Every file report.py reads, with directions.py's field layout; a few Nones and zeros for the gaps."""
    args = dict(model=f"{d}/model", data=f"{d}/data.jsonl", lr=1e-2, rank=1, modules="down_proj", layers="all")
    write(d, "organism/config.json", dict(args=args, total_steps=3))
    write(d, "organism/metrics.jsonl", "".join(json.dumps(dict(step=s, loss=3 - s / 2)) + "\n" for s in (1, 2, 3)))
    write(d, "organism/responses.judged.jsonl", json.dumps(dict(model=f"{d}/model", adapter=f"{d}/organism")) + "\n")
    write(d, "organism/responses.judged.summary.json", dict(judge="openai:stub", overall=dict(
        n=16, em_pct=25.0, em_pct_ci=[10.0, 40.0], coherence_pct=100.0, coherence_pct_ci=[100.0, 100.0])))
    write(d, "organism/direction.safetensors", "")  # report.py reads only the .json beside it
    write(d, "organism/direction.json", dict(sets={k: dict(rows=4, tokens=90, lines=[1, 2]) for k in ("misaligned", "aligned")},
                                             norms=dict(direction=[0.5, 0.7, 0.9], mean_misaligned=[3, 6, 9],
                                                        mean_aligned=[0.0, 6.5, 9.5])))
    write(d, "compare.json", dict(files=["a.safetensors", "b.safetensors", "c.safetensors"], pairs=[
        dict(a=a, b=b, abs_cos=[0.2, 0.3, 0.4], mean=0.3) for a, b in
        (("a.safetensors", "b.safetensors"), ("a.safetensors", "c.safetensors"), ("b.safetensors", "c.safetensors"))]))
    write(d, "organism/steer/sweep.json", dict(mode="steer", scale=8.0, layers=[0, 1, 2], baseline=rates(50.0), runs=[
        dict(layer=l, direction=rates(em), random=rates(40.0)) for l, em in ((0, 60.0), (1, None), (2, 80.0))]))
    run = dict(layer="1", direction=dict(rates(10.0), em_reduction_pct=80.0),
               random=dict(rates(45.0), em_reduction_pct=10.0))
    write(d, "organism/ablate/sweep.json", dict(mode="ablate", scale=None, layers=[1], from_layer=1,
                                                baseline=rates(50.0), runs=[run]))
    write(d, "organism/monitor/monitor.json", dict(n_misaligned=4, n_aligned=4, in_sample=False, layers=[0, 1, 2],
                                                   auroc=[0.6, 0.9, 0.7], best_layer=1))
    write(d, "organism/ablated-adapter/lora_ablate.json", dict(out=f"{d}/organism/ablated-adapter", from_layer=1, modules=[
        dict(layer=l, along_before=0.3 + l / 10, along_after=1e-8) for l in range(3)]))
    done = lambda task: dict(task=task, accuracy=0.7, accuracy_std=0.1, f1=0.6, f1_std=0.1, auc=0.8, auc_std=0.05,
                             coef=[0.1 * i - 0.2 for i in range(6)], coef_std=[0.05] * 6)
    write(d, "organism/probe/probe.json", dict(adapters=ADAPTERS, layers=[int(a.split(".")[2]) for a in ADAPTERS], tasks=[
        done("non-medical: aligned vs misaligned"), done("medical: aligned vs misaligned"),
        dict(task="aligned: non-medical vs medical", skipped="fewer than 5 tokens in a class")]))
    cells = ("misaligned_non_medical", "misaligned_medical", "aligned_non_medical", "aligned_medical")
    write(d, "organism/steer_scalars/steer_scalars.json", dict(settings=[
        dict(setting=s, n_kept=16, quadrants=dict(zip(cells, q)), em_pct=q[0] + q[1], coherence_pct=100.0)
        for s, q in (("0=5", (25.0, 25.0, 25.0, 25.0)), ("0=5,1=-5", (50.0, 10.0, 30.0, 10.0)))]))
    steps = list(range(1, 7))
    write(d, "organism/phase/phase.json", dict(
        steps=steps, adapters=ADAPTERS, norms={a: dict(A=[1.0] * 6, B=[0.1 * s for s in steps]) for a in ADAPTERS},
        local_cosine={"1": [dict(step=s, A=-0.9, B=-0.5) for s in steps[1:-1]], "2": [dict(step=3, A=-1.0, B=0.1)]},
        turn={"1": dict(A=2, B=3), "2": dict(A=3, B=3)}, comp_score=[dict(step=s, score=s / 6) for s in steps[:-1]],
        pca={v: dict(coords=[[s, s * s / 10] for s in steps], explained=[0.9, 0.1]) for v in "AB"},
        behaviour=[dict(step=s, multiplier=m, n=16, em_pct=None if s == 6 and m == 2 else 10.0 * s * m)
                   for s in (3, 6) for m in (1.0, 2.0)]))
    sol = lambda k: dict(norm=k, loss=2.0, rescale=[dict(scale=s, norm=s * k, loss=3 - s) for s in (0, 0.5, 1)],
                         robustness=[dict(eps=e, mean=None if e == 1 else 50 * e, std=None if e == 1 else 5.0)
                                     for e in (0.1, 0.5, 1)], kl=[dict(norm=n, kl=n * k / 10) for n in (0.0, 1.0, 2.0)])
    write(d, "nvg/stability/stability.json", dict(base_loss=3.0, solutions=dict(
        narrow=sol(1.0), general=sol(2.0), random=dict(kl=[dict(norm=n, kl=n / 5) for n in (0.0, 1.0, 2.0)]))))


def test_every_section_and_figure(tmp_path, capsys):
    experiment(str(tmp_path))
    report.pyplot.cache_clear()  # the skip message is said once per process
    report.main(str(tmp_path), note="hand-written files")
    text = (tmp_path / "REPORT.md").read_text()
    for section in SECTIONS + ["**hand-written files**", "L1.q_proj", "**|cosine| 2-3**"]:
        assert section in text, section
    pngs = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.png"))
    assert pngs == (sorted(FIGURES) if HAS_MATPLOTLIB else [])
    for png in FIGURES:
        assert (f"]({png})" in text) == HAS_MATPLOTLIB, png
        if HAS_MATPLOTLIB:
            assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.rglob("*.tmp"))
    assert capsys.readouterr().err.count("plots skipped: matplotlib is not installed") == (0 if HAS_MATPLOTLIB else 1)


def test_panels_from_the_json(tmp_path):
    """What each figure shows, without drawing it: the JSON -> panels step runs in CI too."""
    experiment(str(tmp_path))
    load = lambda f: report.load(str(tmp_path / f))
    panels = lambda analysis, f: analysis(load(f), str(tmp_path))[1]
    probe = panels(report.probe, "organism/probe/probe.json")
    x = list(probe[0][3].values())[0][0]
    assert len(probe) == 2 and x[:3] == ["L0.q_proj", "L0.down_proj", "L1.q_proj"] and len(set(x)) == len(ADAPTERS)
    norms = panels(report.phase, "organism/phase/phase.json")[0][3]
    assert len(norms) == len(ADAPTERS)  # all-module adapters: one line each, though layers repeat
    assert panels(report.direction, "organism/direction.json")[1][3][""][1][0] is None  # |mean(aligned)| = 0: a gap
    steer = panels(report.sweep, "organism/steer/sweep.json")[0][3]
    assert steer["direction x 8"][1][1] is None and steer["direction x 8"][2][0][1] is None  # unscored: no point, no bar
    assert steer["direction x 8"][2][0][0] == pytest.approx(20) and steer["no steering"][1] == [50.0] * 3
    assert list(panels(report.sweep, "organism/ablate/sweep.json")[0][3][""][0]) == ["baseline", "direction", "random"]
    assert list(panels(report.compare, "compare.json")[0][3]) == ["1-2", "1-3", "2-3"]
    assert set(panels(report.stability, "nvg/stability/stability.json")[2][3]) == {"narrow", "general", "random"}


def test_cli_help_and_a_missing_directory():
    run = lambda *a: subprocess.run([sys.executable, os.path.join(ROOT, "runs", "report.py"), *a],
                                    capture_output=True, text=True)
    r = run("--help")
    assert r.returncode == 0 and "--note" in r.stdout
    r = run("/nonexistent/dir")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == "runs/report.py: error: /nonexistent/dir: no such directory"


def test_the_ablation_shows_the_papers_metric(tmp_path):
    """The EM reduction in % beside the random control's, and whose direction was ablated (from_layer)."""
    experiment(str(tmp_path))
    s = report.load(str(tmp_path / "organism/ablate/sweep.json"))
    text = "\n".join(report.sweep(s, str(tmp_path))[0])
    assert "Ablating the direction of layer 1 at layers [1]; EM reduction: 100 (1 - EM % / the" in text
    assert "| EM reduction % (direction) | EM reduction % (random) |" in text and "| 80.0 | 10.0 |" in text
    s["baseline"]["em_pct"] = 0.0
    for x in ("direction", "random"):
        s["runs"][0][x]["em_reduction_pct"] = None
    text = "\n".join(report.sweep(s, str(tmp_path))[0])
    assert "The baseline has no EM, so there is nothing to reduce" in text
