"""The eager reference itself: autograd gradients checked numerically in float64, and NICE invertibility."""
import pytest
import torch

from madx_fast import reference


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_new", "silu", "tanh", "linear", "leakyrelu"])
def test_adapter_reference_gradcheck(activation):
    g = torch.Generator().manual_seed(0)
    n, h, d = 5, 12, 3
    args = [torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(d, h, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(d, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(h, d, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(h, generator=g, dtype=torch.float64, requires_grad=True)]
    fn = lambda *a: reference.bottleneck_adapter_reference(*a, scaling=0.7, activation_name=activation)  # noqa
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("h", [8, 9])
def test_nice_reference_gradcheck(inverse, h):
    g = torch.Generator().manual_seed(1)
    len1, len2 = reference.nice_split(h)
    hf, hg = reference.nice_hidden_sizes(h, 2)
    shapes = [(hf, len2), (hf,), (len1, hf), (len1,), (hg, len1), (hg,), (len2, hg), (len2,)]
    w = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    x = torch.randn(4, h, generator=g, dtype=torch.float64, requires_grad=True)
    fn = reference.nice_inverse_reference if inverse else reference.nice_forward_reference
    assert torch.autograd.gradcheck(lambda *a: fn(*a, activation_name="gelu"), [x, *w])


def test_nice_reference_inverts():
    g = torch.Generator().manual_seed(2)
    h = 10
    hf, hg = reference.nice_hidden_sizes(h, 2)
    w = [torch.randn(s, generator=g, dtype=torch.float64) for s in
         [(hf, 5), (hf,), (5, hf), (5,), (hg, 5), (hg,), (5, hg), (5,)]]
    x = torch.randn(3, 7, h, generator=g, dtype=torch.float64)
    y = reference.nice_forward_reference(x, *w)
    assert not torch.allclose(y, x)
    assert torch.allclose(reference.nice_inverse_reference(y, *w), x, atol=1e-12)


def test_nice_sizes_follow_adapterhub():
    # AdapterHub: split_len1 = H // 2, F: split_len2 -> int(split_len2 // rf), G: split_len1 -> int(split_len1 // rf)
    assert reference.nice_split(768) == (384, 384)
    assert reference.nice_hidden_sizes(768, 2) == (192, 192)
    assert reference.nice_split(9) == (4, 5)
    assert reference.nice_hidden_sizes(9, 2) == (2, 2)


def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match="softsign"):
        reference.canonical_activation("softsign")
