"""CPU inference tuning (flexdit.cpu): packed linears compute what nn.Linear computes, follow weight changes, and
step aside for autograd; bench and sample apply it on the CPU. How a CPU is named beside its figures."""
import copy

import pytest
import torch
import torch.nn as nn

from flexdit.cpu import PackedLinear, can_pack, keep_freed_memory, pack_linears, tune_for_cpu_inference
from flexdit.measure.bench import bench
from flexdit.models.layout import Layout
from flexdit.nn.blocks import Mlp
from flexdit.sampling import plan

from conftest import inputs, tiny_model
from test_pixart import tiny_pixart

needs_onednn = pytest.mark.skipif(not can_pack(), reason="this PyTorch build has no oneDNN")
FLEX = Layout.parse("1+1x1-1-1-1+0")


def count_linears(model: nn.Module, kind: type) -> int:
    return sum(type(m) is kind for m in model.modules())


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_matches_linear(dtype):
    torch.manual_seed(0)
    plain = nn.Linear(48, 80).to(dtype)
    holder = nn.Sequential(plain)
    pack_linears(holder)
    packed = holder[0]
    assert type(packed) is PackedLinear and packed.weight is plain.weight and packed.bias is plain.bias
    x = torch.randn(3, 7, 48).to(dtype)
    with torch.inference_mode():
        expected = nn.functional.linear(x, plain.weight, plain.bias)
        torch.testing.assert_close(packed(x), expected, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
    assert "_packed" in packed.__dict__  # the oneDNN path ran, not the fallback


@needs_onednn
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_an_mlps_gelu_moves_into_its_first_product(approximate):
    torch.manual_seed(0)
    mlp = Mlp(48, 160)
    mlp.act = nn.GELU(approximate=approximate)
    x = torch.randn(2, 9, 48)
    with torch.inference_mode():
        expected = mlp(x)
    pack_linears(mlp)
    assert isinstance(mlp.act, nn.Identity) and mlp.fc1.gelu == approximate and mlp.fc2.gelu is None
    with torch.inference_mode():
        torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-5)  # oneDNN's fused GELU
    torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-5)  # autograd: F.linear, then the GELU
    assert pack_linears(mlp) == 0 and isinstance(mlp.act, nn.Identity)  # packing twice changes nothing


@needs_onednn
def test_packed_model_matches_and_keeps_its_state(one_thread):
    model = tiny_model(FLEX, density={"grid": [2, 2]})
    x, t, y = inputs(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        expected = model(x, t, y)
    linears = count_linears(model, nn.Linear)
    assert pack_linears(model) == linears > 0 and count_linears(model, nn.Linear) == 0
    with torch.inference_mode():
        torch.testing.assert_close(model(x, t, y), expected, rtol=1e-4, atol=1e-4)  # the project's parity tolerance
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    copied = copy.deepcopy(model)
    with torch.inference_mode():
        torch.testing.assert_close(copied(x, t, y), expected, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_pixart_packed_matches(one_thread):
    model = tiny_pixart(Layout.parse("1+1x1-1-1-1+0"), density={"grid": [2, 2]})
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, *model.sample_shape, generator=g)
    t = torch.tensor([10, 900])
    condition = model.example_condition(2, g)
    with torch.inference_mode():
        expected = model(x, t, **condition)
        assert tune_for_cpu_inference(model, torch.device("cpu"))
        torch.testing.assert_close(model(x, t, **condition), expected, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_packed_weights_follow_loading_and_casting():
    model = tiny_model(density={"grid": [2, 2]})
    other = tiny_model(density={"grid": [2, 2]}, seed=5)
    x, t, y = inputs(model)
    pack_linears(model)
    with torch.inference_mode():
        model(x, t, y)  # packs the first weights
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(model(x, t, y), other(x, t, y), rtol=1e-4, atol=1e-4)
        model.to(torch.bfloat16)
        other.to(torch.bfloat16)
        pack_linears(other)  # packed fresh in bf16, with the same fused GELU: the rounding matches the repacked model
        torch.testing.assert_close(model(x.bfloat16(), t, y), other(x.bfloat16(), t, y), rtol=2e-2, atol=2e-2)


@needs_onednn
def test_training_through_packed_linears_uses_autograd():
    model, plain = tiny_model(density={"grid": [2, 2]}), tiny_model(density={"grid": [2, 2]})
    pack_linears(model)
    x, t, y = inputs(model)
    model.train()
    plain.train()
    model(x, t, y).square().mean().backward()
    plain(x, t, y).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert not any("_packed" in m.__dict__ for m in model.modules())


def test_freed_memory_is_kept_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert keep_freed_memory()


@needs_onednn
def test_bench_says_whether_cpu_tuning_applied():
    config_model = tiny_model(FLEX, density={"r_min": 0.5, "r_max": 0.75})
    timesteps = plan("ddim", 4).timesteps
    tuned = bench(config_model, timesteps, device="cpu", dtype="fp32", repeats=1, warmup=0)
    assert tuned["cpu_tuning"] and count_linears(config_model, nn.Linear) == 0
    plain = bench(tiny_model(FLEX, density={"r_min": 0.5, "r_max": 0.75}), timesteps, device="cpu", dtype="fp32",
                  repeats=1, warmup=0, cpu_tuning=False)
    assert not plain["cpu_tuning"]


@pytest.mark.parametrize("flags, says", [("fpu avx2 avx512f", "no native bf16"), ("avx2 avx512_bf16", "native bf16"),
                                         ("avx2 amx_bf16", "native bf16")])
def test_a_cpu_is_named_with_its_bf16_support(monkeypatch, flags, says):
    import flexdit.distributed as d

    monkeypatch.setattr(d, "_cpuinfo", {"model name": "Some CPU 9000", "flags": flags}.get)
    assert d.describe_device(torch.device("cpu")) == f"cpu: Some CPU 9000, {torch.get_num_threads()} threads, {says}"
