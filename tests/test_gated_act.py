"""gated_act: silu(gate) * up and its backward, torch ops everywhere and one Triton kernel each way
on a GPU, against float64 autograd."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cola_train.adapters import gated_act

no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _reference(gate, up, dh):
    g, u = gate.double().requires_grad_(), up.double().requires_grad_()
    h = F.silu(g) * u
    h.backward(dh.double())
    return h.detach(), g.grad, u.grad


def _inputs(shape, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(shape, generator=gen, device=device).mul_(3).to(dtype) for _ in range(3)]


def _check(gate, up, dh, tol):
    want_h, want_dg, want_du = _reference(gate, up, dh)
    h, dgate, dup = gated_act.backward(gate, up, dh.clone())
    for got, want in [(gated_act.forward(gate, up), want_h), (h, want_h), (dgate, want_dg), (dup, want_du)]:
        assert got.dtype == gate.dtype and got.shape == gate.shape
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_torch_ops_match_float64_autograd(dtype, tol):
    _check(*_inputs((37, 53), dtype, "cpu"), tol)


@pytest.mark.gpu
@no_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_the_kernels_match_float64_and_the_torch_ops(dtype, tol, monkeypatch):
    """On a GPU: the kernels (odd sizes: a masked tail) to float64, and to the torch ops within one
    rounding of the dtype."""
    gate, up, dh = _inputs((301, 4099), dtype, "cuda", seed=3)
    _check(gate, up, dh, tol)
    kernel = [gated_act.forward(gate, up), *gated_act.backward(gate, up, dh.clone())]
    monkeypatch.setattr(gated_act, "use_kernels", False)
    ops = [gated_act.forward(gate, up), *gated_act.backward(gate, up, dh.clone())]
    eps = torch.finfo(dtype).eps
    for got, want in zip(kernel, ops):
        scale = want.double().abs().max().item()
        assert (got.double() - want.double()).abs().max().item() <= 4 * eps * scale


@pytest.mark.gpu
@no_cuda
def test_the_fused_mlp_trains_the_same_with_and_without_the_kernels(monkeypatch):
    """GatedLowRankMLP on the GPU in bf16: output and every gradient as with the torch ops."""
    from cola_train.adapters import fused_ops
    torch.manual_seed(0)
    base = torch.nn.Linear(1536, 576, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    gate, up = (torch.randn(512, 1536, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    A = torch.randn(8, 1536, device="cuda", dtype=torch.bfloat16) * 0.02
    B = torch.randn(576, 8, device="cuda", dtype=torch.bfloat16) * 0.02

    def run():
        leaves = [t.clone().requires_grad_() for t in (gate, up, A, B)]
        out = fused_ops.gated_low_rank_mlp(base, leaves[0], leaves[1], leaves[2], leaves[3])
        out.float().square().mean().backward()
        return [out.detach()] + [t.grad for t in leaves]

    with_kernels = run()
    monkeypatch.setattr(gated_act, "use_kernels", False)
    for got, want in zip(with_kernels, run()):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.float().abs().max().item())
