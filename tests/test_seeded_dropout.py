"""The fused functions' dropout mask (a hash of seed and index): Bernoulli(1 - p) statistics with no
structure along the index, independent seeds, and one op that compiled code calls with eager's bits."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo

from cola_train.adapters import seeded_dropout


def _signs(n: int, p: float, seed: int) -> torch.Tensor:
    return seeded_dropout.keep_mask(torch.empty(n), p, torch.tensor(seed)).float() * 2 - 1


@pytest.mark.parametrize("seed", [0, 12345, 2**30])
def test_mask_has_no_correlation_along_the_index(seed):
    """Kept / dropped at i and i + 2^k, k = 0..22, uncorrelated within 5 sigma over 2^24 elements:
    offsets such as 4096 (one row of hidden size 4096) are where a weak hash shows through."""
    n = 1 << 24
    s = _signs(n, 0.5, seed)
    sigma = n ** -0.5
    z = {1 << k: (s[:-(1 << k)] * s[(1 << k):]).mean().item() / sigma for k in range(23)}
    assert all(abs(v) < 5 for v in z.values()), {k: round(v, 1) for k, v in z.items() if abs(v) >= 5}


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_mask_drops_a_fraction_p_and_seeds_are_independent(p):
    n = 1 << 20
    keep = [seeded_dropout.keep_mask(torch.empty(n), p, torch.tensor(seed)) for seed in range(8)]
    sd = (p * (1 - p) / n) ** 0.5
    for k in keep:
        assert abs((~k).float().mean().item() - p) < 5 * sd
    for a, b in zip(keep, keep[1:]):   # consecutive seeds: both dropped as often as independence says
        assert abs((~a & ~b).float().mean().item() - p * p) < 5 * (p * p / n) ** 0.5


def test_dropped_scales_what_it_keeps_and_p0_is_the_identity():
    x = torch.randn(64, 48, dtype=torch.float64)
    assert seeded_dropout.dropped(x, 0.0, 3) is x
    y = seeded_dropout.dropped(x, 0.25, 3)
    keep = seeded_dropout.keep_mask(x, 0.25, torch.tensor(3))
    torch.testing.assert_close(y, torch.where(keep, x * (1 / 0.75), 0.0), rtol=0, atol=0)
    assert torch.equal(y, seeded_dropout.dropped(x, 0.25, torch.tensor(3)))   # an int or a tensor seed


no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, no_cuda])]   # on a GPU machine: pytest -m gpu


@pytest.mark.gpu
@no_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_triton_kernel_has_the_bits_of_the_torch_ops_and_of_the_cpu(dtype):
    """Eager mode on a GPU runs seeded_dropout_triton's kernel: the same output as _drop's torch ops
    on the GPU, bit for bit, and the same mask as on the CPU. 4099 columns: not a multiple of the block."""
    x = torch.randn(300, 4099, device="cuda").to(dtype)
    for seed in (0, 7, 2**31 - 2):
        s = torch.tensor(seed, device="cuda")
        got = seeded_dropout.dropped(x, 0.05, s)
        assert torch.equal(got, seeded_dropout._drop(x, s, 0.05)), (dtype, seed)
        keep_cpu = seeded_dropout.keep_mask(x.cpu(), 0.05, s.cpu())
        assert torch.equal(got.cpu() != 0, keep_cpu & (x.cpu() != 0)), (dtype, seed)
        assert abs((~keep_cpu).float().mean().item() - 0.05) < 0.002


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_code_calls_the_op_with_eager_bits(dtype, device):
    """Under torch.compile (inductor, whole graph) dropped() is one opaque op: no graph break, no
    recompilation for a new seed or shape, and the bits of eager mode."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(lambda x, s: seeded_dropout.dropped(x * 2, 0.1, s), backend=counter,
                             dynamic=True, fullgraph=True)
    for shape, seed in (((37, 53), 5), ((128, 96), 2**31 - 2)):
        x = torch.randn(shape, device=device).to(dtype)
        s = torch.tensor(seed, device=device)
        assert torch.equal(compiled(x, s), seeded_dropout.dropped(x * 2, 0.1, s)), (shape, dtype)
    assert counter.frame_count == 1
    assert any(n.target is torch.ops.cola_train.seeded_dropout.default
               for g in counter.graphs for n in g.graph.nodes)
    torch._dynamo.reset()
