"""bench.py and runs/gpu_check.sh on the CPU, tiny shapes (--quick, GPU_CHECK_QUICK=1): every figure the
GPU run reports is written, with sane values; the engines stop at the same forced lengths."""
import json
import os
import subprocess
import sys

import pytest
import torch

import bench
from model import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["train_tok_s", "train_ref_tok_s", "train_ratio"]
SAMPLE = [f"{part}{side}_{k}" for part in ("sample", "sample_real") for side in ("", "_ref")
          for k in ("s", "tok_s", "mean_len")] + ["sample_ratio", "sample_real_ratio"]


def test_quick_bench_computes_mfu_with_a_given_peak(tmp_path):
    """MFU counts what each engine computes: ours runs the LM head at loss tokens only, the reference every
    weight at every padded position. The SDPA kernels of both sides are recorded."""
    out = tmp_path / "b.json"
    res = bench.main(["--quick", "--device", "cpu", "--skip", "sample", "--peak-tflops", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == res
    assert all(res[k] > 0 for k in TRAIN) and not any(k.startswith("sample") for k in res)
    convs = bench.synthetic_conversations(4, 2048, 0)
    n, head = res["matmul_params"], 2048 * 64
    tokens, loss_tokens = sum(len(ids) for ids, _ in convs), sum(sum(m[1:]) for _, m in convs)
    padded = sum(2 * max(len(convs[i][0]), len(convs[i + 1][0])) for i in (0, 2))
    assert 0.6 < loss_tokens / tokens < 0.8 and padded > tokens
    assert res["train_flops_per_step"] == 4 * (n - head) * tokens + 4 * head * loss_tokens
    assert res["train_ref_flops_per_step"] == 4 * n * padded and "loss tokens" in res["mfu_formula"]
    for side in ("train", "train_ref"):
        assert res[f"{side}_mfu"] == pytest.approx(res[f"{side}_tok_s"] * res[f"{side}_flops_per_step"] / tokens / 2e12)
        assert "_scaled_dot_product_flash_attention_for_cpu" in res[f"{side}_sdpa"]
    assert not [k for k in res if "peak_gb" in k]  # CUDA memory only


def test_reference_model_is_transformers_on_our_very_weights():
    ours = bench.random_model("tiny", "cpu", torch.float32, seed=1)
    ref = bench.reference_model(ours, "cpu")
    assert ref.model.layers[1].mlp.up_proj.weight.data_ptr() == ours.model.layers[1].mlp.up_proj.weight.data_ptr()
    idx = torch.randint(0, 2000, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(ref(idx).logits, ours(idx), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape, non_embedding", [("0.5b", 0.36e9), ("7b", 6.53e9)])
def test_mfu_counts_the_matmuls_and_the_lm_head(shape, non_embedding):
    """N = the model cards' non-embedding parameters + the LM head (counted even when tied)."""
    with torch.device("meta"):
        model = Transformer(bench.shape_config(shape))
    head = model.config.vocab_size * model.config.hidden_size
    assert bench.matmul_params(model) == pytest.approx(non_embedding + head, rel=0.01)


def test_realistic_lengths_spread_like_answers():
    lengths = bench.answer_lengths(400, 600, 0)
    assert 20 <= min(lengths) and max(lengths) == 600
    assert 200 < sum(lengths) / 400 < 280 and len(set(lengths)) > 100


@pytest.mark.parametrize("argv, message", [(["--skip", "train,eval"], "--skip"),
                                           (["--n", "0"], "argument --n: 0: must be >= 1"),
                                           (["--device", "tpu"], "--device")])
def test_bad_flags_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.get_args(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err.startswith("bench.py: error:") and message in err


def test_gpu_check_quick_runs_every_phase_and_writes_one_json(tmp_path):
    res = subprocess.run(["bash", os.path.join(ROOT, "runs", "gpu_check.sh")], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, GPU_CHECK_QUICK="1", OUT=str(tmp_path), OMP_NUM_THREADS="1"), timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "gpu_check summary" in res.stdout and (tmp_path / "gpu_check.log").read_text().endswith(res.stdout[-200:])
    out = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(out["phases"]) == ["setup", "graph", "tests", "bench_0.5b_train", "bench_0.5b_sample",
                                   "bench_7b", "bench_7b_64"]  # 0.5B training first, sampling apart
    assert {"bench_0.5b_train.json", "bench_0.5b_sample.json", "bench_7b.json", "tests_graph.xml",
            "tests.xml"} <= set(os.listdir(tmp_path))  # kept
    assert all(p["exit"] == 0 for p in out["phases"].values())
    assert out["tests"]["tests"] == out["tests"]["skipped"] > 0 and out["tests"]["failed"] == []  # no CUDA here
    small, large, big = out["bench"]["0.5b"], out["bench"]["7b"], out["bench"]["7b_64"]
    assert all(small[k] > 0 for k in TRAIN + SAMPLE) and small["sample_settings"]["top_k"] == 20
    assert small["sample_vocab"] == 2048 - 271 and small["sample_sdpa"] and small["sample_ref_sdpa"]  # an odd width
    assert small["sample_rows"] == 6 and small["sample_mean_len"] == small["sample_ref_mean_len"] == 24
    # realistic lengths: both engines stop every row exactly at its drawn length
    assert small["sample_real_mean_len"] == small["sample_real_ref_mean_len"] == small["sample_real_drawn_mean_len"] < 24
    assert all(large[k] > 0 for k in TRAIN) and not any(k.startswith("sample_") for k in large)
    assert big["train_convs_per_step"] == 8 and big["train_tok_s"] > 0 and "train_ref_tok_s" not in big
    assert not [k for b in (small, large, big) for k in b if k.endswith(("_mfu", "peak_gb"))]  # a CPU: no peak known
    assert out["goals"]["train 7b MFU >= 35%"] == {"value": None, "met": None}
    assert [g["met"] in (True, False) for g in out["goals"].values()] == [True, False, True, True]


def test_gpu_check_setup_never_runs_pip_and_names_what_is_missing(tmp_path):
    """A lent GPU machine has no network: setup says which requirements do not import, and runs no pip
    (which would only wait out its time-outs). Here a python that reports peft missing, and logs its calls."""
    calls, fake = tmp_path / "calls", tmp_path / "python"
    fake.write_text(f'#!/bin/bash\necho "$*" >> {calls}\nif [ "$1" = - ]; then echo peft; exit 0; fi\n'
                    f'exec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    res = subprocess.run(["bash", os.path.join(ROOT, "runs", "gpu_check.sh"), "--setup"], cwd=ROOT,
                         env=dict(os.environ, GPU_CHECK_QUICK="1", OUT=str(tmp_path), PYTHON=str(fake)),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "setup: missing peft" in res.stdout, res.stdout + res.stderr
    assert "pip" not in calls.read_text()
