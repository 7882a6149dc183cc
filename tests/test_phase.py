"""phase.py on planted checkpoint trajectories: the turn, norms, local cosine and comp score by
hand, the behaviour of scaled checkpoints, bad input."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import phase
import sample
from lora import SteeringVector, add_lora, lora_modules, save_adapter
from model import load
from test_directions import make_adapter, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")


def planted_run(tmp_path, tiny, steps=range(5, 105, 5), turn=60):
    """A run whose B stands still until step 20, moves along u1, and turns at `turn` to (u2 - u1) / sqrt(2);
    A stands still until 20, then drifts along one direction."""
    model, _ = load(tiny)
    add_lora(model, r=1, alpha=8, modules=["down_proj"], layers=[1])
    m = model.model.layers[1].mlp.down_proj
    g = torch.Generator().manual_seed(0)
    a0, ua = torch.randn(m.lora_A.shape, generator=g), torch.randn(m.lora_A.shape, generator=g)
    u1, u2 = torch.linalg.qr(torch.randn(m.lora_B.shape[0], 2, generator=g))[0].T  # orthonormal
    path = {}
    for t in steps:
        s = max(t - 20, 0)
        b = 0.01 * min(s, turn - 20) * u1 + 0.01 * max(t - turn, 0) * (u2 - u1) / math.sqrt(2)
        a = a0 + 1e-3 * s * ua / ua.norm()
        with torch.no_grad():
            m.lora_A.copy_(a)
            m.lora_B.copy_(b[:, None])
        save_adapter(model, str(tmp_path / "run" / "checkpoints" / f"step_{t:06d}"))
        path[t] = (a.double(), b.double())
    return str(tmp_path / "run"), path


def test_phase_finds_the_planted_turn(tmp_path, tiny):
    run, path = planted_run(tmp_path, tiny)
    res = phase.main(["--run", run])
    assert res["steps"] == list(range(5, 105, 5)) and res["spacing"] == 5
    for k in ("5", "10", "15"):
        assert res["turn"][k]["B"] == 60
    name = "model.layers.1.mlp.down_proj"
    norms = lambda i: [float(path[t][i].norm()) for t in res["steps"]]
    assert res["norms"][name]["B"] == pytest.approx(norms(1), abs=1e-6)
    assert res["norms"][name]["A"] == pytest.approx(norms(0), abs=1e-5)
    # by hand, k = 5: steps 10 and 15 saw no movement in either window (skipped); 20 did (next window)
    k5 = {r["step"]: r for r in res["local_cosine"]["5"]}
    assert sorted(k5) == list(range(20, 100, 5))
    assert k5[60]["B"] == pytest.approx(1 / math.sqrt(2), abs=1e-6)
    assert k5[40]["B"] == pytest.approx(-1, abs=1e-6)
    assert k5[20]["B"] == 0.0 and k5[40]["A"] == pytest.approx(-1, abs=1e-5)  # a zero window counts as cos 0
    # comp score, by hand for step 30 against the last step
    Bs = np.stack([path[t][1].numpy() for t in res["steps"]])  # (S, out)
    Bd = Bs - Bs.mean(0)
    i = res["steps"].index(30)
    want = abs(Bd[i] @ Bd[-1]) / (np.linalg.norm(Bd[i]) * np.linalg.norm(Bd[-1]))
    assert res["comp_score"][i] == {"step": 30, "score": pytest.approx(want, abs=1e-9)}
    pca = res["pca"]["B"]
    assert len(pca["coords"]) == 20 and sum(pca["explained"]) == pytest.approx(1, abs=1e-6)
    assert os.path.exists(os.path.join(run, "phase", "phase.json"))


def test_phase_needs_2k_plus_1_checkpoints(tmp_path, tiny):
    run, _ = planted_run(tmp_path, tiny, steps=range(5, 30, 5))
    with pytest.raises(ValueError, match=r"5 checkpoints \(steps 5..25, every 5\).*needs at least 7"):
        phase.main(["--run", run])
    with pytest.raises(FileNotFoundError, match="checkpoints"):
        phase.main(["--run", str(tmp_path / "nothing")])


def test_phase_behaviour_scales_each_checkpoint(tmp_path, tiny):
    run, _ = planted_run(tmp_path, tiny, steps=range(5, 40, 5), turn=30)
    qs = write_jsonl(tmp_path / "q.jsonl", [{"id": "bored", "question": "I feel bored"}])
    common = ["--questions", qs, "--n", "2", "--max-new-tokens", "5", "--device", "cpu", "--model", tiny]
    res = phase.main(["--run", run, "--ks", "5", "--behaviour", "10,35,35", "--multipliers", "0,1,1",
                      "--judge", f"local:{tiny}"] + common)  # a step or multiplier twice: one row (phase.sh)
    runs = [(r["step"], r["multiplier"]) for r in res["behaviour"]]
    assert runs == [(10, 0.0), (10, 1.0), (35, 0.0), (35, 1.0)]
    answers = {(r["step"], r["multiplier"]): [json.loads(l)["answer"] for l in open(r["file"])]
               for r in res["behaviour"]}
    assert answers[(10, 0.0)] == answers[(35, 0.0)]  # B x 0: the base model, whichever checkpoint
    # step 35 at x1 after step 10 was swapped in before it: the same as the checkpoint loaded on its own
    ck = os.path.join(run, "checkpoints", "step_000035")
    alone = sample.main(["--adapter", ck, "--out", str(tmp_path / "alone.jsonl")] + common)
    assert [json.loads(l)["answer"] for l in open(alone["out"])] == answers[(35, 1.0)]




def test_phase_checks_its_numbers_first_and_errors_in_one_line(tmp_path, tiny):
    run_dir, _ = planted_run(tmp_path, tiny)
    for ks in ("0", "-1", "5,x"):
        with pytest.raises(ValueError, match="expected a comma list of windows >= 1"):
            phase.main(["--run", run_dir, "--ks", ks])
    assert not os.path.exists(os.path.join(run_dir, "phase"))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "phase.py"), "--run", str(tmp_path / "nothing")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stdout == ""
    ck = tmp_path / "nothing" / "checkpoints"
    assert p.stderr.strip().splitlines() == [f"phase.py: error: {ck}: no such directory (--run: a train.py "
                                             "run with checkpoints/step_N/)"]
