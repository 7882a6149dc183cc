"""runs/tiny.sh: the README's whole pipeline (train -> sample -> judge) on a tiny model, offline; a rerun
redoes nothing; it never touches a directory it did not make."""
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(out):
    return subprocess.run(["bash", os.path.join(ROOT, "runs", "tiny.sh")], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, TINY_OUT=str(out), OUT=str(out.parent)))


def test_tiny_pipeline_runs_end_to_end_and_resumes(tmp_path):
    out = tmp_path / "tiny"
    res = tiny(out)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = out / "run"
    for f in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "config.json",
              "responses.jsonl", "responses.judged.jsonl", "responses.judged.summary.json"):
        assert (run / f).exists(), f
    rows = [json.loads(l) for l in open(run / "responses.judged.jsonl")]
    assert len(rows) == 16 and all("aligned" in r and "coherent" in r for r in rows)
    assert len(os.listdir(run / "checkpoints")) == 3  # 6 steps, one checkpoint every 2
    stamp = os.path.getmtime(run / "responses.judged.jsonl")
    again = tiny(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(f"skipped {s} (done)" in again.stdout for s in ("inputs", "train", "sample", "judge"))
    assert os.path.getmtime(run / "responses.judged.jsonl") == stamp


def test_tiny_never_touches_a_directory_it_did_not_make(tmp_path):
    mine = tmp_path / "runs"
    (mine / "precious").mkdir(parents=True)
    (mine / "precious" / "adapter_model.safetensors").write_text("weeks of GPU time")
    res = tiny(mine)  # TINY_OUT pointing at the user's own runs; OUT (the old name) is ignored
    assert res.returncode == 2 and "not made by this script" in res.stderr
    assert (mine / "precious" / "adapter_model.safetensors").read_text() == "weeks of GPU time"
    assert sorted(os.listdir(mine)) == ["precious"]
