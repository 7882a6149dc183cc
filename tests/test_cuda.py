"""GPU checks, skipped without CUDA (CI has none): run them when a session has a GPU.

    python -m pytest -q tests/test_cuda.py
"""
import pytest
import torch

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


def test_packed_masked_attention_on_cuda(tiny):
    model, _ = load(tiny, device="cuda", dtype=torch.float32)
    a, b = torch.randint(0, 400, (1, 7)).cuda(), torch.randint(0, 400, (1, 11)).cuda()
    pos = torch.cat([torch.arange(7), torch.arange(11)])[None].cuda()
    with torch.no_grad():
        out = model(torch.cat([a, b], 1), pos=pos)
        torch.testing.assert_close(out[:, 7:], model(b), atol=1e-4, rtol=0)


def test_cuda_graph_decode_equals_eager(tiny):
    model, tok = load(tiny, device="cuda")
    prompts = [tok.encode_chat([{"role": "user", "content": q}], True) for q in ("hi", "I feel bored today")]
    kw = dict(n=3, max_new_tokens=40, seed=1, stop_ids=tok.stop_ids)
    assert sample.generate(model, prompts, cuda_graph=True, **kw) == sample.generate(model, prompts, cuda_graph=False, **kw)


def test_train_steps_on_cuda_match_cpu(tiny):
    losses = []
    for device in ("cpu", "cuda"):
        model, tok = load(tiny, device=device, dtype=torch.float32)
        torch.manual_seed(0)
        add_lora(model, r=2, alpha=16)
        with torch.no_grad():
            for _, m in lora_modules(model):
                m.lora_B.fill_(0.01)
        convs = [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "Take 12 pills."}]
                 for i in range(6)]
        rows = train.pack([tok.encode_chat_with_mask(c) for c in convs], 256)
        losses.append(train.accumulate_grads(model, model.hidden, rows, rows, 0.5)[0])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
