"""lora.py against PEFT: adapters we save load in PEFT with the same logits, and the other way round."""
import json

import pytest
import torch

from conftest import hf_model, peft_reference
from lora import (SteeringVector, adapters_off, add_lora, fix_scalars, load_adapter, lora_modules,
                  record_scalars, save_adapter, set_lora_scale)
from model import load

IDX = torch.randint(0, 400, (2, 15), generator=torch.Generator().manual_seed(0))


def randomize_B(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.copy_(0.05 * torch.randn(m.lora_B.shape, generator=g))


def test_lora_at_init_equals_base_and_switches(tiny):
    model, _ = load(tiny)
    with torch.no_grad():
        base = model(IDX)
        add_lora(model, r=4, alpha=64)
        torch.testing.assert_close(model(IDX), base, atol=0, rtol=0)  # B = 0
        randomize_B(model)
        tuned = model(IDX)
        assert (tuned - base).abs().max() > 1e-3
        with adapters_off(model):
            torch.testing.assert_close(model(IDX), base, atol=0, rtol=0)
        set_lora_scale(model, 0.0)
        torch.testing.assert_close(model(IDX), base, atol=0, rtol=0)
        set_lora_scale(model, 2.0)
        doubled = model(IDX)
        set_lora_scale(model, 1.0)
        for _, m in lora_modules(model):
            m.lora_B *= 2
        torch.testing.assert_close(model(IDX), doubled, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kw", [
    dict(r=2, alpha=64, rslora=True),  # all modules, all layers
    dict(r=1, alpha=512, rslora=True, modules=["down_proj"], layers=[1]),  # one rank-1 adapter
    dict(r=3, alpha=8, rslora=False, modules=["k_proj", "up_proj"], layers=[0]),
])
def test_our_adapter_loads_in_peft(tmp_path, tiny, kw):
    from peft import PeftModel
    model, _ = load(tiny)
    add_lora(model, **kw)
    randomize_B(model)
    save_adapter(model, str(tmp_path / "ad"))
    cfg = json.load(open(tmp_path / "ad" / "adapter_config.json"))
    assert cfg["peft_type"] == "LORA" and cfg["r"] == kw["r"] and cfg["base_model_name_or_path"] == tiny
    ref = PeftModel.from_pretrained(hf_model(tiny), str(tmp_path / "ad")).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDX), ref(IDX).logits, atol=1e-4, rtol=0)
    # and it round-trips through our own loader
    fresh, _ = load(tiny)
    load_adapter(fresh, str(tmp_path / "ad"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDX), model(IDX), atol=0, rtol=0)


@pytest.mark.parametrize("rslora", [True, False])
def test_peft_adapter_loads_in_ours(tmp_path, tiny, rslora):
    torch.manual_seed(0)
    ref = peft_reference(tiny, tmp_path / "peft", r=2, lora_alpha=32, use_rslora=rslora,
                         target_modules=["v_proj", "o_proj", "gate_proj"], layers_to_transform=[0])
    model, _ = load(tiny)
    names = load_adapter(model, str(tmp_path / "peft"))
    assert sorted(names) == ["model.layers.0.mlp.gate_proj", "model.layers.0.self_attn.o_proj",
                             "model.layers.0.self_attn.v_proj"]
    with torch.no_grad():
        torch.testing.assert_close(model(IDX), ref(IDX).logits, atol=1e-4, rtol=0)


def test_rank1_scalars_are_A_times_input(tiny):
    model, _ = load(tiny)
    add_lora(model, r=1, alpha=64, modules=["down_proj"], layers=[0, 1])
    inputs = {}
    for i in (0, 1):
        lin = model.model.layers[i].mlp.down_proj
        lin.base.register_forward_hook(lambda mod, args, out, i=i: inputs.__setitem__(i, args[0]))
    with torch.no_grad(), record_scalars(model) as scalars:
        model(IDX)
    for i in (0, 1):
        m = model.model.layers[i].mlp.down_proj
        got = scalars[f"model.layers.{i}.mlp.down_proj"][0]
        torch.testing.assert_close(got, inputs[i] @ m.lora_A.T, atol=1e-6, rtol=0)  # (B, T, 1)


def test_fixed_scalar_replaces_A_times_input(tiny):
    model, _ = load(tiny)
    add_lora(model, r=1, alpha=64, modules=["down_proj"], layers=[0, 1])
    randomize_B(model)
    name = "model.layers.1.mlp.down_proj"
    with torch.no_grad():
        before = model(IDX)
        with fix_scalars(model, {name: 3.0}), record_scalars(model) as scalars:
            fixed = model(IDX)
        assert torch.equal(scalars[name][0], torch.full((2, 15, 1), 3.0))
        torch.testing.assert_close(model(IDX), before, atol=0, rtol=0)  # restored on exit
        # by hand: switch that adapter off and add scale * 3 * B to its base output at every position
        m = model.get_submodule(name)
        m.enabled = False
        handle = m.base.register_forward_hook(lambda mod, args, out: out + m.scale * 3.0 * m.lora_B[:, 0])
        by_hand = model(IDX)
        handle.remove()
    torch.testing.assert_close(fixed, by_hand, atol=1e-5, rtol=0)
    assert (fixed - before).abs().max() > 1e-3
    with pytest.raises(ValueError, match="no LoRA adapter named model.layers.0.mlp.up_proj"):
        with fix_scalars(model, {"model.layers.0.mlp.up_proj": 1.0}):
            pass


def test_bad_lora_arguments(tiny):
    model, _ = load(tiny)
    with pytest.raises(ValueError, match="unknown LoRA modules"):
        add_lora(model, 1, 1, modules=["down"])
    with pytest.raises(ValueError, match="do not exist"):
        add_lora(model, 1, 1, layers=[7])
    with pytest.raises(ValueError, match=">= 1"):
        add_lora(model, 0, 1)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_adapter(model, "/tmp/never")


def test_steering_vector_acts_on_every_row(tmp_path, tiny):
    model, _ = load(tiny)
    sv = SteeringVector(model.config.hidden_size, layer=0, alpha=4.0)
    with torch.no_grad():
        base = model(IDX)
        torch.testing.assert_close(model(IDX, hook=sv), base, atol=0, rtol=0)  # v = 0
        sv.vector.normal_()
        steered = model(IDX, hook=sv)
        seen = {}
        model(IDX, hook=lambda i, x: seen.setdefault(i, sv(i, x)))
    for row in range(IDX.shape[0]):
        assert (steered[row] - base[row]).abs().amax(-1).min() > 1e-4  # every row, every position
    sv.save(str(tmp_path / "sv"))
    again = SteeringVector.load(str(tmp_path / "sv"))
    assert again.layer == 0 and again.alpha == 4.0 and torch.equal(again.vector, sv.vector)
