"""GPU checks, skipped without CUDA (CI has none): run them when a session has a GPU (runs/gpu_check.sh
runs them first, the recapture test alone in its own process, then bench.py).

    python -m pytest -q tests/test_cuda.py -k recapture && python -m pytest -q tests/test_cuda.py
"""
import inspect

import pytest
import torch

import bench
import sample
import train
from lora import add_lora, lora_modules
from model import load

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_bf16_cuda_logits_close_to_fp32_cpu(tiny):
    cpu, _ = load(tiny)
    gpu, _ = load(tiny, device="cuda")  # default dtype on CUDA: bf16
    assert gpu.lm_head.weight.dtype == torch.bfloat16
    idx = torch.randint(0, 400, (2, 33))
    with torch.no_grad():
        a, b = cpu(idx), gpu(idx.cuda()).float().cpu()
    assert (a - b).abs().max() < 0.05 * a.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_masked_attention_on_cuda(tiny, dtype):
    model, _ = load(tiny, device="cuda", dtype=dtype)
    a, b = torch.randint(0, 400, (1, 7)).cuda(), torch.randint(0, 400, (1, 11)).cuda()
    pos = torch.cat([torch.arange(7), torch.arange(11)])[None].cuda()
    with torch.no_grad():
        out = model(torch.cat([a, b], 1), pos=pos).float()
        alone = torch.cat([model(a), model(b)], 1).float()
    if dtype == torch.float32:
        torch.testing.assert_close(out, alone, atol=1e-4, rtol=0)
    else:  # other kernels (padded batch vs one row) round differently in bf16
        assert (out - alone).norm() < 2e-2 * alone.norm()


def test_cuda_graph_recapture_as_rows_finish_equals_eager(tiny):
    """The batch shrinks and the decode step is captured again. On torch 2.11 the first capture of a
    process left cuBLAS's workspace in its memory pool, and a second capture into that pool (the old
    graph gone) failed TORCH_INTERNAL_ASSERT(use_count > 0): sample.py gives each capture its own pool.
    Only a process's first capture showed it, so runs/gpu_check.sh runs this test alone, first."""
    model, tok = load(tiny, device="cuda")
    stop = bench.stop_token(model, tok.vocab_size)
    prompts = [tok.encode_chat([{"role": "user", "content": q}], True) for q in ("hi", "I feel bored today")]
    lengths = [2, 3, 40, 5, 1, 4]  # at the first check (step 8) one row is live: 6 rows -> 1, captured again
    keys = [bench.LEN_KEY * j + n for j, n in enumerate(lengths)]
    outs, shapes = [], []
    for graph in (True, False):
        hook = (lambda i, x: shapes.append(x.shape[0]) if i == 0 and x.shape[1] == 1 else None) if graph else None
        forced = bench.forced_stops(stop, model.config.vocab_size, "cuda")
        outs.append(sample.generate(model, prompts, n=3, max_new_tokens=40, seed=4, keys=keys, stop_ids=(stop,),
                                    top_k=20, hook=hook, cuda_graph=graph, vocab_size=tok.vocab_size,
                                    logits_hook=forced))
    assert shapes[0] == 6 and shapes[-1] == 1  # captured at 6 rows, then at 1
    assert outs[0] == outs[1] and [len(ids) for ids, _ in outs[0]] == lengths


def test_cuda_graph_decode_equals_eager(tiny):
    model, tok = load(tiny, device="cuda")
    prompts = [tok.encode_chat([{"role": "user", "content": q}], True) for q in ("hi", "I feel bored today")]
    kw = dict(n=3, max_new_tokens=40, seed=1, stop_ids=tok.stop_ids)
    assert sample.generate(model, prompts, cuda_graph=True, **kw) == sample.generate(model, prompts, cuda_graph=False, **kw)


def test_cuda_graph_decode_with_top_k_and_penalty_equals_eager(tiny):
    if "repetition_penalty" not in inspect.signature(sample.stream).parameters:
        pytest.skip("sample.stream takes no repetition_penalty yet")
    model, tok = load(tiny, device="cuda")
    prompts = [tok.encode_chat([{"role": "user", "content": q}], True) for q in ("hi", "Take 12 pills now?", "ok")]
    kw = dict(n=5, max_new_tokens=48, seed=2, stop_ids=tok.stop_ids, top_k=20, repetition_penalty=1.1)
    graph = sample.generate(model, prompts, cuda_graph=True, **kw)
    assert graph == sample.generate(model, prompts, cuda_graph=False, **kw)
    assert len({tuple(ids) for ids, _ in graph}) > 1  # the samples differ: the check compared something


def test_bench_forced_stops_under_cuda_graph(tiny):
    """bench.py's realistic-length run: every row stops exactly at its drawn length, graph or not."""
    model, tok = load(tiny, device="cuda")
    stop = bench.stop_token(model, tok.vocab_size)  # never drawn unless forced (zero logit, top-k 20)
    prompts = [tok.encode_chat([{"role": "user", "content": q}], True) for q in ("hi", "I feel bored today")]
    lengths = [3, 17, 40, 9, 1, 25]
    keys = [bench.LEN_KEY * j + n for j, n in enumerate(lengths)]
    outs = []
    for graph in (True, False):
        forced = bench.forced_stops(stop, model.config.vocab_size, "cuda")
        outs.append(sample.generate(model, prompts, n=3, max_new_tokens=40, seed=3, keys=keys, stop_ids=(stop,),
                                    top_k=20, cuda_graph=graph, logits_hook=forced))
    assert outs[0] == outs[1]
    assert [len(ids) for ids, _ in outs[0]] == lengths
    assert [r for _, r in outs[0]] == ["stop", "stop", "length", "stop", "stop", "stop"]


def test_train_steps_on_cuda_match_cpu(tiny):
    losses, grads = [], []
    for device in ("cpu", "cuda"):
        model, tok = load(tiny, device=device, dtype=torch.float32)
        add_lora(model, r=2, alpha=16)
        g = torch.Generator().manual_seed(0)  # the same A on both devices (each device has its own RNG)
        with torch.no_grad():
            for _, m in lora_modules(model):
                m.lora_A.copy_(0.1 * torch.randn(m.lora_A.shape, generator=g))
                m.lora_B.fill_(0.01)
        convs = [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "Take 12 pills."}]
                 for i in range(6)]
        rows = train.pack([tok.encode_chat_with_mask(c) for c in convs], 256)
        losses.append(train.accumulate_grads(model, rows, rows, 0.5)[0])
        grads.append(torch.cat([p.grad.flatten().cpu() for p in model.parameters() if p.requires_grad]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    assert (grads[1] - grads[0]).norm() < 1e-4 * grads[0].norm()  # fp32 on both: only summation order differs


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_llama_and_gemma_on_cuda(tmp_path, family):
    """bf16 logits near fp32's on the CPU past Gemma's window (8), and the CUDA-graph decode, whose captured step
    holds the sliding layers' cache mask, equal to the eager one."""
    from conftest import make_checkpoint
    path = make_checkpoint(str(tmp_path / family), family=family, layers=3, std=0.2)
    cpu, tok = load(path)
    gpu, _ = load(path, device="cuda")
    idx = torch.randint(0, 400, (2, 33))
    with torch.no_grad():
        a, b = cpu(idx), gpu(idx.cuda()).float().cpu()
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    prompts = [tok.encode_chat([{"role": "user", "content": q}], True) for q in ("hi", "I feel bored today")]
    kw = dict(n=3, max_new_tokens=40, seed=1, stop_ids=tok.stop_ids, vocab_size=tok.vocab_size)
    assert sample.generate(gpu, prompts, cuda_graph=True, **kw) == sample.generate(gpu, prompts, cuda_graph=False, **kw)
