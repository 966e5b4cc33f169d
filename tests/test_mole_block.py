"""cola_train/adapters/mole_block.py (MoLE at block level) against the float64 oracle
tests/reference_moe.py (mole_block, mole_balance_loss), on a residual MLP block whose two linears
carry N frozen LoRA experts switched by `active_expert`."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import reference_moe as ref
from cola_train.adapters.mole_block import MoLEBlock, PaddingMask
from cola_train.adapters.mole_gate import aux_loss
from cola_train.adapters.spec import AdapterError
from test_reference_moe import mlp_block, rand

F64 = torch.float64


class SwitchedLoRA(nn.Module):
    """W x + (active expert's) s B A x."""

    def __init__(self, W, loras, s=0.5):
        super().__init__()
        self.W, self.loras, self.s, self.active_expert = W, loras, s, None

    def forward(self, x):
        y = x @ self.W.T
        if self.active_expert is not None:
            A, B = self.loras[self.active_expert]
            y = y + self.s * (x @ A.T) @ B.T
        return y


class Block(nn.Module):
    def __init__(self, l1, l2):
        super().__init__()
        self.l1, self.l2 = l1, l2

    def forward(self, h, use_cache=False, **kwargs):
        return h + self.l2(torch.tanh(self.l1(h)))


def build(seed=0):
    ref_block, experts = mlp_block(seed=seed)
    W1, W2 = rand(6, 4, seed=seed), rand(4, 6, seed=seed + 1)
    l1 = SwitchedLoRA(W1, [(A1, B1) for A1, B1, _, _ in experts])
    l2 = SwitchedLoRA(W2, [(A2, B2) for _, _, A2, B2 in experts])
    return ref_block, Block(l1, l2), [l1, l2]


def test_two_gated_blocks_match_the_oracle_with_gradients():
    ref1, blk1, sw1 = build(0)
    ref2, blk2, sw2 = build(100)
    pad = PaddingMask()
    m1, m2 = MoLEBlock(blk1, sw1, 3, 4, pad, dtype=F64), MoLEBlock(blk2, sw2, 3, 4, pad, dtype=F64)
    with torch.no_grad():
        for m, s in ((m1, 1), (m2, 2)):
            m.gate.e.copy_(rand(12, 3, seed=200 + s))
            m.gate.tau.fill_(0.5 + s)
    h = rand(2, 5, 4, seed=7)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    pad.value = mask
    model = nn.ModuleList([m1, m2]).train()
    out = m2(m1(h, cache=None))
    loss = out.pow(2).sum() + aux_loss(model)

    e1, t1 = m1.gate.e.detach().clone().requires_grad_(), m1.gate.tau.detach().clone().requires_grad_()
    e2, t2 = m2.gate.e.detach().clone().requires_grad_(), m2.gate.tau.detach().clone().requires_grad_()
    o1, G1 = ref.mole_block(ref1, h, 3, e1, t1, attention_mask=mask)
    o2, G2 = ref.mole_block(ref2, o1, 3, e2, t2, attention_mask=mask)
    loss_ref = o2.pow(2).sum() + ref.MOLE_BALANCE_WEIGHT * ref.mole_balance_loss([G1, G2])
    assert torch.allclose(out, o2, atol=1e-12)
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-13)
    loss.backward()
    loss_ref.backward()
    for mine, theirs in ((m1.gate.e, e1), (m1.gate.tau, t1), (m2.gate.e, e2), (m2.gate.tau, t2)):
        assert torch.allclose(mine.grad, theirs.grad, atol=1e-10)
    assert all(layer.active_expert is None for layer in sw1 + sw2)   # switched back off


def test_step_zero_is_the_average_of_the_experts():
    ref_block, blk, sw = build(0)
    m = MoLEBlock(blk, sw, 3, 4, dtype=F64)
    h = rand(1, 3, 4, seed=9)
    want = ref_block(h, None) + sum(ref_block(h, i) - ref_block(h, None) for i in range(3)) / 3
    assert torch.allclose(m(h), want, atol=1e-12)


def test_incremental_decoding_is_refused():
    class Cache:
        def get_seq_length(self):
            return 4

    _, blk, sw = build(0)
    with pytest.raises(AdapterError, match="cannot decode with a KV cache: generate with use_cache=False"):
        MoLEBlock(blk, sw, 3, 4, dtype=F64)(rand(1, 1, 4), cache=Cache())
