"""The fused ops are torch custom ops: a model using them compiles with fullgraph=True (no graph break),
forward and backward, and computes what it computes uncompiled."""
import pytest
import torch

from madx_fast import BottleneckAdapter, InvertibleAdapter
from madx_fast.ops import add_layer_norm
from tests.helpers.devices import DEVICE, fused_backends


class TinyMadxBlock(torch.nn.Module):
    """Embedding-side NICE, a layer with an adapter on its FFN output between fused adds + LayerNorm (whose
    weights train here), and the inverse before a decoder."""

    def __init__(self, h, backend):
        super().__init__()
        self.inv = InvertibleAdapter(h, backend=backend)
        self.ffn = torch.nn.Linear(h, h)
        self.ln = torch.nn.LayerNorm(h)
        self.adapter = BottleneckAdapter(h, reduction_factor=4, backend=backend)
        self.decoder = torch.nn.Linear(h, 11)

    def forward(self, x):
        h0 = self.inv(x)
        f = self.ffn(h0)
        ln = (self.ln.weight, self.ln.bias, self.ln.eps)
        y = self.adapter(add_layer_norm(f, h0, *ln, backend=self.adapter.backend), residual=f)
        out = add_layer_norm(y, h0, *ln, backend=self.adapter.backend)
        return self.decoder(self.inv.inverse(out))


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_fullgraph_compile_forward_and_backward(backend, compiler):
    torch.manual_seed(0)
    model = TinyMadxBlock(32, backend).to(DEVICE)
    x = torch.randn(2, 5, 32, device=DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    out_c = compiled(x)
    out_c.square().mean().backward()
    grads_c = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out_e = model(x)
    out_e.square().mean().backward()
    assert torch.allclose(out_c, out_e, atol=1e-5, rtol=1e-5)
    for gc, ge in zip(grads_c, [p.grad for p in model.parameters()]):
        assert torch.allclose(gc, ge, atol=1e-5, rtol=1e-4)
