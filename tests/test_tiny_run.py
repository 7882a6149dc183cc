"""runs/tiny.sh: the README's whole pipeline (train -> sample -> judge) on a tiny model, offline."""
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_pipeline_runs_end_to_end(tmp_path):
    out = tmp_path / "tiny"
    res = subprocess.run(["bash", os.path.join(ROOT, "runs", "tiny.sh")], cwd=ROOT, capture_output=True,
                         text=True, env=dict(os.environ, OUT=str(out)))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = out / "run"
    for f in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "config.json",
              "responses.jsonl", "responses.judged.jsonl", "responses.judged.summary.json"):
        assert (run / f).exists(), f
    rows = [json.loads(l) for l in open(run / "responses.judged.jsonl")]
    assert len(rows) == 16 and all("aligned" in r and "coherent" in r for r in rows)
    assert len(os.listdir(run / "checkpoints")) == 3  # 6 steps, one checkpoint every 2
