"""cola_train/adapters/mole_gate.py against the float64 oracle tests/reference_moe.py (mole_block,
mole_balance_loss): gate, output and gradients for the gate's weight and temperature."""
from __future__ import annotations

import torch

import reference_moe as ref
from cola_train.adapters.mole_gate import BALANCE_WEIGHT, MoLEGate, aux_loss, balance_loss
from test_reference_moe import mlp_block, rand

F64 = torch.float64


def test_gate_output_and_gradients_match_the_oracle():
    block, _ = mlp_block()
    h = rand(2, 5, 4, seed=11)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    gate = MoLEGate(3, 4, dtype=F64)
    with torch.no_grad():
        gate.e.copy_(rand(12, 3, seed=12))
        gate.tau.fill_(0.8)
    base = block(h, None)
    outs = [block(h, i) - base for i in range(3)]
    G = gate(outs, mask)
    out = MoLEGate.mix(base, outs, G)
    e_ref = gate.e.detach().clone().requires_grad_()
    tau_ref = gate.tau.detach().clone().requires_grad_()
    out_ref, G_ref = ref.mole_block(block, h, 3, e_ref, tau_ref, attention_mask=mask)
    assert torch.allclose(G, G_ref, atol=1e-13) and torch.allclose(out, out_ref, atol=1e-12)
    w = rand(*out.shape, seed=13)
    loss = (out * w).sum() + BALANCE_WEIGHT * balance_loss([G])
    loss_ref = (out_ref * w).sum() + ref.MOLE_BALANCE_WEIGHT * ref.mole_balance_loss([G_ref])
    loss.backward()
    loss_ref.backward()
    assert torch.allclose(gate.e.grad, e_ref.grad, atol=1e-11)
    assert torch.allclose(gate.tau.grad, tau_ref.grad, atol=1e-11)


def test_zero_init_is_uniform_and_aux_loss_collects_training_gates():
    gate = MoLEGate(3, 4, dtype=F64)
    outs = [rand(2, 3, 4, seed=s) for s in range(3)]
    model = torch.nn.ModuleList([gate])
    model.train()
    G = gate(outs)
    assert torch.allclose(G, torch.full((2, 3), 1 / 3, dtype=F64))
    assert aux_loss(model).item() == (BALANCE_WEIGHT * ref.mole_balance_loss([G.detach()])).item()
    model.eval()
    gate(outs)
    assert aux_loss(model) is None
