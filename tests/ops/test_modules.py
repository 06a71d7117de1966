"""nn.Module wrappers: parameter names AdapterHub uses, initialisation, and equality with the reference."""
import pytest
import torch

from madx_fast import BottleneckAdapter, InvertibleAdapter, reference
from tests.helpers.devices import DEVICE, fused_backends


def test_parameter_names_match_adapterhub():
    a = BottleneckAdapter(768, reduction_factor=16)
    assert {k: tuple(v.shape) for k, v in a.state_dict().items()} == {
        "adapter_down.0.weight": (48, 768), "adapter_down.0.bias": (48,),
        "adapter_up.weight": (768, 48), "adapter_up.bias": (768,)}
    inv = InvertibleAdapter(768)
    assert {k: tuple(v.shape) for k, v in inv.state_dict().items()} == {
        "F.0.weight": (192, 384), "F.0.bias": (192,), "F.2.weight": (384, 192), "F.2.bias": (384,),
        "G.0.weight": (192, 384), "G.0.bias": (192,), "G.2.weight": (384, 192), "G.2.bias": (384,)}


def test_init_schemes():
    torch.manual_seed(0)
    a = BottleneckAdapter(768, reduction_factor=2)
    assert abs(a.adapter_down[0].weight.std().item() - 0.02) < 1e-3 and a.adapter_up.bias.abs().sum() == 0
    b = BottleneckAdapter(64, reduction_factor=2, init_weights="mam_adapter")
    x = torch.randn(3, 64)
    assert torch.equal(b(x), x)  # zero up projection: the identity at start
    with pytest.raises(ValueError, match="init_weights"):
        BottleneckAdapter(64, init_weights="xavier")
    with pytest.raises(ValueError, match="reduction_factor"):
        BottleneckAdapter(8, reduction_factor=16)


@pytest.mark.parametrize("backend", ["eager"] + fused_backends())
def test_modules_equal_reference(backend):
    torch.manual_seed(1)
    a = BottleneckAdapter(96, reduction_factor=2, activation="gelu", scaling=0.5, backend=backend).to(DEVICE)
    x, r = torch.randn(4, 7, 96, device=DEVICE), torch.randn(4, 7, 96, device=DEVICE)
    down, up = a.adapter_down[0], a.adapter_up
    want = reference.bottleneck_adapter_reference(x, r, down.weight, down.bias, up.weight, up.bias, 0.5, "gelu")
    assert torch.allclose(a(x, r), want, atol=1e-5)
    inv = InvertibleAdapter(96, backend=backend).to(DEVICE)
    assert torch.allclose(inv(x), reference.nice_forward_reference(x, *inv.weights()), atol=1e-5)
    assert torch.allclose(inv.inverse(inv(x)), x, atol=1e-5)


def test_dropout_applies_to_the_adapter_branch_only():
    torch.manual_seed(2)
    a = BottleneckAdapter(32, reduction_factor=2, dropout=0.5)
    x, r = torch.randn(50, 32), torch.randn(50, 32)
    a.train()
    y = a(x, r)
    dropped = (y == r)
    assert 0.2 < dropped.float().mean() < 0.8  # about half the adapter outputs are zeroed
    a.eval()
    assert not torch.equal(a(x, r), y)
