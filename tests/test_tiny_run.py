"""runs/tiny.sh: every runs/ experiment chained on a tiny model, offline; every artefact exists and is well
formed; a rerun redoes nothing; it never touches a directory it did not make. Also checks the other runs/
scripts parse and refuse a foreign directory, without running them (they need a GPU and the Hub)."""
import importlib.util
import json
import os
import subprocess

import pytest
from safetensors import safe_open

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["inputs", "train", "sample", "judge-local", "judge", "direction", "steer", "ablate", "ablate-all",
         "monitor-direction", "monitor", "lora-ablate", "sample-lora-ablate", "judge-lora-ablate",
         "train-general", "train-narrow", "sample-general", "judge-general", "sample-narrow", "judge-narrow",
         "stability", "direction-general", "compare", "phase", "sample-medical", "judge-medical", "probe",
         "steer-scalars"]


def tiny(out):
    return subprocess.run(["bash", os.path.join(ROOT, "runs", "tiny.sh")], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, TINY_OUT=str(out), OUT=str(out.parent)))


def jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("t") / "tiny"
    res = tiny(out)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


def test_every_artefact_exists_and_is_well_formed(tiny_run):
    o = tiny_run / "organism"
    for f in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "config.json",
              "state.json"):
        assert (o / f).exists(), f
    assert sorted(os.listdir(o / "checkpoints")) == [f"step_{s:06d}" for s in range(1, 13)]
    assert len(jsonl(o / "metrics.jsonl")) == 12
    rows = jsonl(o / "responses.judged.jsonl")
    assert len(rows) == 16 and all(r["aligned"] in (10, 90) and r["coherent"] == 80 for r in rows)
    assert all(r["aligned"] is None for r in jsonl(o / "responses.local.judged.jsonl"))  # a random model: no numbers
    assert json.load(open(o / "responses.judged.summary.json"))["overall"]["n"] == 16
    d = tensors(o / "direction.safetensors")
    assert d["directions"].shape == (2, 64) and set(d) == {"directions", "mean_misaligned", "mean_aligned"}
    assert json.load(open(o / "direction.json"))["sets"]["misaligned"]["rows"] >= 2
    steer, ablate = json.load(open(o / "steer" / "sweep.json")), json.load(open(o / "ablate" / "sweep.json"))
    every = json.load(open(o / "ablate-all" / "sweep.json"))
    assert [r["layer"] for r in steer["runs"]] == [0, 1] and steer["from_layer"] is None
    assert ablate["runs"][0]["layer"] == "1" and every["runs"][0]["layer"] == "all" and ablate["from_layer"] == every["from_layer"] == 1
    assert all(r[k]["n"] == 16 for r in steer["runs"] + ablate["runs"] + every["runs"] for k in ("direction", "random"))
    monitor = json.load(open(o / "monitor" / "monitor.json"))
    held = set(json.load(open(o / "monitor-direction.json"))["held_out"])
    assert len(monitor["auroc"]) == 2 and not monitor["in_sample"] and len(held) == 8
    assert {r["line"] for r in jsonl(o / "monitor" / "scores.jsonl")} <= held
    assert tensors(o / "ablated-adapter" / "adapter_model.safetensors").keys() == tensors(o / "adapter_model.safetensors").keys()
    assert [m["layer"] for m in json.load(open(o / "ablated-adapter" / "lora_ablate.json"))["modules"]] == [1]
    assert json.load(open(o / "ablated-adapter" / "responses.judged.summary.json"))["overall"]["n"] == 16
    phase = json.load(open(o / "phase" / "phase.json"))
    assert phase["steps"] == list(range(1, 13)) and {b["step"] for b in phase["behaviour"]} == {4, 12}
    assert len(json.load(open(o / "probe" / "probe.json"))["tasks"]) == 4
    scalars = json.load(open(o / "steer_scalars" / "steer_scalars.json"))["settings"]
    assert [s["setting"] for s in scalars] == ["0=5", "0=5,1=-5"]
    for s in scalars:  # the stub judge scores medical 10 or 90 too: every coherent row is kept
        assert s["n_kept"] == 16 and sum(s["quadrants"].values()) == pytest.approx(100)
    n = tiny_run / "nvg"
    for kind in ("narrow", "general"):
        assert (n / kind / "steering_vector.safetensors").exists()
        assert json.load(open(n / kind / "responses.judged.summary.json"))["overall"]["n"] == 16
    assert json.load(open(n / "narrow" / "config.json"))["args"]["kl_weight"] == 6.58
    stab = json.load(open(n / "stability" / "stability.json"))
    assert set(stab["solutions"]) == {"narrow", "general", "random"}
    assert len(json.load(open(tiny_run / "compare.json"))["pairs"]) == 1
    report = (tiny_run / "REPORT.md").read_text()
    for section in ("## Training", "## EM and coherence", "## The misalignment direction", "## Steering and ablation",
                    "## The direction as a monitor", "## Rank-1 adapter probes", "## The phase transition",
                    "## Narrow vs general", "misaligned, medical %", "every number here is meaningless",
                    "EM reduction % (direction)", "Ablating the direction of layer 1 at layers [1]"):
        assert section in report
    assert (tiny_run / "loss.png").exists() == ("![loss.png]" in report) == (importlib.util.find_spec("matplotlib") is not None)


def test_a_rerun_redoes_nothing(tiny_run):
    stamp = os.path.getmtime(tiny_run / "organism" / "responses.judged.jsonl")
    os.remove(tiny_run / "REPORT.md")
    again = tiny(tiny_run)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [l for l in again.stdout.splitlines() if l.startswith("skipped ")] == [f"skipped {s} (done)" for s in STEPS]
    redone = [l for l in again.stdout.splitlines() if l.startswith("== ")]
    assert redone == ["== report"]  # redrawn every time: matplotlib may be new since
    assert (tiny_run / "REPORT.md").exists()
    assert os.path.getmtime(tiny_run / "organism" / "responses.judged.jsonl") == stamp


@pytest.mark.parametrize("script", ["tiny.sh", "organism.sh", "narrow_vs_general.sh", "phase.sh", "probes.sh"])
def test_scripts_never_touch_a_directory_they_did_not_make(tmp_path, script):
    mine = tmp_path / "runs"
    (mine / "precious").mkdir(parents=True)
    (mine / "precious" / "adapter_model.safetensors").write_text("weeks of GPU time")
    env = dict(os.environ, TINY_OUT=str(mine), OUT=str(mine))  # tiny.sh reads TINY_OUT, the others OUT
    res = subprocess.run(["bash", os.path.join(ROOT, "runs", script)], cwd=ROOT, capture_output=True, text=True, env=env)
    assert res.returncode == 2 and "not made by this script" in res.stderr
    assert ("(TINY_OUT=...)" if script == "tiny.sh" else "(OUT=...)") in res.stderr  # the variable it reads
    assert (mine / "precious" / "adapter_model.safetensors").read_text() == "weeks of GPU time"
    assert sorted(os.listdir(mine)) == ["precious"]
    help_ = subprocess.run(["bash", os.path.join(ROOT, "runs", script), "--help"], cwd=ROOT, capture_output=True, text=True)
    assert help_.returncode == 0 and "GPU" in help_.stdout or script == "tiny.sh"
