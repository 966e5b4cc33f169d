"""Hand-written backward passes for a frozen linear plus a low-rank update,

    y = x W^T + b + (drop(x) A^T) B^T

Why: autograd would treat the base matmul and the update as two branches. It would write the
adapter's input gradient to its own activation-sized tensor and then sum it with the base's, and
it would keep extra activations alive. These functions cut that traffic and memory:

* `LowRankLinear`: dx = g W, then (g B) A is added into the same buffer (in place). The base
  weight is frozen, so only x itself (which q/k/v, or gate/up, share) and the small z = drop(x) A^T
  are saved.
* `GatedLowRankMLP`: the whole gated MLP tail, down(silu(gate) * up), when down_proj carries the
  update. It saves gate and up, which the frozen model keeps too, and recomputes the product in
  backward (gated_act: one Triton kernel each way on a GPU). The frozen model would store
  silu(gate) and the product, so an adapted MLP keeps less than a frozen one.
* `SharedInputLowRank`: adapted linears that read the same x (an attention's q, k and v; a gated
  MLP's gate and up): one GEMM for all their z = drop(x) A_i^T, one for dA, one for the adapters'
  part of dx, onto which every base input gradient accumulates (autograd would write one dx per
  linear and sum them). With dropout, one mask for the group's x (method.dropout_mask=shared, the
  default; per_layer gives each linear its own mask and runs them apart, as before).
* `RoutedLowRankLinear` (HydraLoRA, MoLE) and `GatedRoutedLowRankMLP`, the same on a gated MLP's
  down_proj, keeping gate and up as GatedLowRankMLP does.
* The update is written first and the base GEMM accumulates onto it (`addmm_`, beta = 1): the
  GEMM's epilogue reads it, for free, where adding it afterwards would read and write the
  activation-sized output once more. The same holds for dx in backward. For HydraLoRA and MoLE
  without dropout, the router and the A's share one GEMM over x, and their input gradients
  another.
* Dropout on the adapter's input keeps only a seed. The mask is a hash of the seed and the
  element's index (seeded_dropout), computed once in forward and again in backward. nn.Dropout
  would instead store the mask and the dropped copy of every adapted input. The mask is
  Bernoulli(1 - p) / (1 - p), as nn.Dropout's is, but from its own stream.

Both need: a plain frozen nn.Linear base (no ZeRO-3 partitioned weight) and one dtype for
activations and base weight. The factors are in that dtype too, or in float32 next to half-precision
activations (trainer.fp32_adapter_path, fp32_path.py): then the rank-r path runs in float32 and only
the update, once, is rounded to the activations' dtype; the fp32 copies of the input live only inside
each function. `can_fuse` checks this; otherwise callers use plain autograd ops. Autocast is off
inside: every input is already in the dtype it is used in. A and B are the effective factors
(scaling folded into B), so every CoLA combiner goes through here; their own gradients flow on to
the stored factors through autograd.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import gated_act
from .seeded_dropout import as_seed, dropped, new_seed


def can_fuse(base: nn.Module, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> bool:
    w = getattr(base, "weight", None)
    if type(base) is not nn.Linear or w is None or w.requires_grad or hasattr(w, "ds_id"):
        return False
    if base._forward_hooks:  # e.g. merged Chain-of-LoRA links (committed.py): the module call adds them
        return False
    if base.bias is not None and base.bias.requires_grad:
        return False
    if not (x.dtype == w.dtype and A.dtype == B.dtype) or x.device != w.device:
        return False
    if A.dtype != x.dtype and A.dtype != torch.float32:  # only an fp32 update beside half activations
        return False
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type) == x.dtype
    return True


def _seed(p: float, seed, like: torch.Tensor):
    """What backward needs to draw the mask again: None without dropout, else a 0-d tensor."""
    return None if p == 0.0 else as_seed(seed, like)


def _down_grad(gd: torch.Tensor, inp: torch.Tensor, p: float, seed) -> torch.Tensor:
    """dA = gd^T drop(inp): the input's dropped copy lives only for this."""
    return gd.t() @ dropped(inp.to(gd.dtype), p, seed)


def _no_autocast(t: torch.Tensor):
    return torch.autocast(t.device.type, enabled=False)


def _update_and_base(z: torch.Tensor, B: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias,
                     frozen=None) -> torch.Tensor:
    """z B^T (+ b) (+ (x A_c^T) B_c^T, the frozen committed links), then x W^T accumulated onto it
    by the base GEMM itself (beta = 1).

    In place in eager mode; out of place under torch.compile, where inductor plans the buffers
    itself: torch 2.11 (the GPU machines') gave every input of an autograd.Function whose output
    had been written in place a zero gradient, silently (docs/PERFORMANCE.md, run 8)."""
    in_place = not torch.compiler.is_compiling()
    if z.dtype == x.dtype:
        out = z @ B.t() if bias is None else torch.addmm(bias, z, B.t())
    else:  # an fp32 update beside half activations: rounded once, here
        out = (z @ B.t()).to(x.dtype)
        if bias is not None:
            out = out.add_(bias) if in_place else out + bias
    if frozen is not None:
        Ac, Bc = frozen
        out = out.addmm_(x @ Ac.t(), Bc.t()) if in_place else torch.addmm(out, x @ Ac.t(), Bc.t())
    return out.addmm_(x, weight.t()) if in_place else torch.addmm(out, x, weight.t())


def _input_grad(g: torch.Tensor, weight: torch.Tensor, gd: torch.Tensor, A: torch.Tensor, p: float,
                seed, Ac=None, Bc=None) -> torch.Tensor:
    """dx = drop(gd A) + g W (+ (g B_c) A_c): the adapter's part first, then the base GEMM (and the
    frozen committed path) accumulate onto it."""
    dx = dropped((gd @ A).to(g.dtype), p, seed)
    if Ac is not None:
        dx = dx.addmm_(g @ Bc, Ac)
    return dx.addmm_(g, weight)


def _frozen(Ac, Bc):
    return None if Ac is None else (Ac, Bc)


class LowRankLinear(torch.autograd.Function):
    """x: (T, d_in); p, seed: the adapter's dropout (p = 0: none); Ac, Bc: committed Chain-of-LoRA
    links, a frozen low-rank path beside the frozen base (in x's dtype), or None."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, p, seed, Ac=None, Bc=None):
        with _no_autocast(x):
            z = dropped(x.to(A.dtype), p, seed) @ A.t()
            out = _update_and_base(z, B, x, weight, bias, _frozen(Ac, Bc))
        ctx.p = p
        ctx.save_for_backward(x, weight, A, B, z, _seed(p, seed, x), Ac, Bc)
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight, A, B, z, seed, Ac, Bc = ctx.saved_tensors
        with _no_autocast(g):
            gu = g.to(B.dtype)
            gz = gu @ B
            dB = gu.t() @ z
            del gu
            dA = _down_grad(gz, x, ctx.p, seed)
            dx = _input_grad(g, weight, gz, A, ctx.p, seed, Ac, Bc) if ctx.needs_input_grad[0] else None
        return dx, None, None, dA, dB, None, None, None, None


class GatedLowRankMLP(torch.autograd.Function):
    """out = down(h) + (drop(h) A^T) B^T with h = silu(gate) * up; gate, up: (T, d_ff)."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias, A, B, p, seed, Ac=None, Bc=None):
        with _no_autocast(gate):
            h = gated_act.forward(gate, up)
            z = dropped(h.to(A.dtype), p, seed) @ A.t()
            out = _update_and_base(z, B, h, weight, bias, _frozen(Ac, Bc))
            del h
        ctx.p = p
        ctx.save_for_backward(gate, up, weight, A, B, z, _seed(p, seed, gate), Ac, Bc)
        return out

    @staticmethod
    def backward(ctx, g):
        gate, up, weight, A, B, z, seed, Ac, Bc = ctx.saved_tensors
        with _no_autocast(g):
            gu = g.to(B.dtype)
            gz = gu @ B
            dB = gu.t() @ z
            del gu
            dh = _input_grad(g, weight, gz, A, ctx.p, seed, Ac, Bc)
            h, dgate, dup = gated_act.backward(gate, up, dh)   # h again, for dA
            dA = _down_grad(gz, h, ctx.p, seed)
        return dgate, dup, None, None, dA, dB, None, None, None, None


def _apply(fn, *args, p: float, frozen=None):
    """fn.apply(*args, p, seed[, A_c, B_c]): a fresh seed per call (a tensor, so torch.compile
    traces it); the frozen committed path only when there is one (the common call is unchanged)."""
    seed = new_seed(args[0].device) if p else None
    if frozen is None:
        return fn.apply(*args, p, seed)
    return fn.apply(*args, p, seed, *frozen)


def low_rank_linear(base: nn.Linear, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                    p: float = 0.0, frozen=None) -> torch.Tensor:
    """x W^T + b + (drop(x) A^T) B^T (+ (x A_c^T) B_c^T with frozen = (A_c, B_c) in x's dtype)."""
    return _apply(LowRankLinear, x, base.weight, base.bias, A, B, p=p, frozen=frozen)


def gated_low_rank_mlp(base: nn.Linear, gate: torch.Tensor, up: torch.Tensor,
                       A: torch.Tensor, B: torch.Tensor, p: float = 0.0, frozen=None) -> torch.Tensor:
    return _apply(GatedLowRankMLP, gate, up, base.weight, base.bias, A, B, p=p, frozen=frozen)


class SharedInputLowRank(torch.autograd.Function):
    """k adapted linears reading one x: out_i = x W_i^T + b_i + (drop(x) A_i^T) B_i^T (+ (x A_ci^T) B_ci^T).

    One dropout mask for the whole group (p, seed; method.dropout_mask=shared): drop(x) is drawn
    once, so one GEMM gives every z_i = drop(x) A_i^T, one gives dA = gz^T drop(x) (the mask drawn
    again, not stored), and dx = drop(gz A) + sum_i g_i W_i (+ (g_i B_ci) A_ci) in one buffer.
    Each linear still sees Bernoulli(1 - p) / (1 - p) on its input, as with its own mask; the three
    masks are the same one. The committed Chain-of-LoRA links (Ac_i, Bc_i, or None) read the
    undropped x, as in LowRankLinear.

    A: the A_i stacked, (sum r_i, d_in); rest: (W_1, b_1, B_1, Ac_1, Bc_1, .., W_k, .., Bc_k).
    Returns the k outputs. An output nobody used gets no gradient: its B_i none, its part of dx
    and dA zero."""

    @staticmethod
    def forward(ctx, x, A, p, seed, *rest):
        weights, biases, Bs, Acs, Bcs = (rest[i::5] for i in range(5))
        with _no_autocast(x):
            z = dropped(x, p, seed) @ A.t()
            zs = z.split([B.shape[1] for B in Bs], dim=1)
            outs = tuple(_update_and_base(zi, B, x, W, b, _frozen(Ac, Bc))
                         for zi, B, W, b, Ac, Bc in zip(zs, Bs, weights, biases, Acs, Bcs))
        ctx.p = p
        ctx.save_for_backward(x, A, z, _seed(p, seed, x), *weights, *Bs, *Acs, *Bcs)
        return outs

    @staticmethod
    def backward(ctx, *gs):
        x, A, z, seed, *rest = ctx.saved_tensors
        k = len(gs)
        weights, Bs, Acs, Bcs = (rest[i * k:(i + 1) * k] for i in range(4))
        with _no_autocast(x):
            gz, dBs = [], []
            for g, B, zi in zip(gs, Bs, z.split([B.shape[1] for B in Bs], dim=1)):
                if g is None:
                    gz.append(zi.new_zeros(zi.shape))
                    dBs.append(None)
                else:
                    gz.append(g @ B)
                    dBs.append(g.t() @ zi)
            gz = torch.cat(gz, dim=1)
            dA = _down_grad(gz, x, ctx.p, seed)
            dx = None
            if ctx.needs_input_grad[0]:
                dx = dropped(gz @ A, ctx.p, seed)
                for g, W, Ac, Bc in zip(gs, weights, Acs, Bcs):
                    if g is not None:
                        if Ac is not None:
                            dx.addmm_(g @ Bc, Ac)
                        dx.addmm_(g, W)
        return (dx, dA, None, None) + tuple(grad for dB in dBs for grad in (None, None, dB, None, None))


def shared_input_low_rank(bases, x: torch.Tensor, factors, p: float = 0.0, frozen=None) -> tuple:
    """The outputs of adapted linears sharing x: bases their frozen nn.Linears, factors their (A, B),
    p their dropout (one mask for all, a fresh seed per call), frozen their committed links
    ((A_c, B_c) in x's dtype, or None; per linear)."""
    A = torch.cat([a for a, _ in factors])
    frozen = frozen or [None] * len(bases)
    rest = [t for base, (_, B), fz in zip(bases, factors, frozen)
            for t in (base.weight, base.bias, B, *(fz or (None, None)))]
    seed = new_seed(x.device) if p else None
    return SharedInputLowRank.apply(x, A, p, seed, *rest)


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """The router's softmax in at least float32 (float64 stays float64): promote_types as Python,
    not a dispatched op per routed layer."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _routed_update(x, weight, bias, R, A, B, r: int, p: float, seed):
    """RoutedLowRankLinear's forward maths: (out, probs, h, RA), RA = [R; A] where one GEMM over x
    computed the router and the A's (no dropout; backward reuses it), else None."""
    if p == 0.0:                                               # router and A's: one pass over x
        RA = torch.cat([R, A])
        logits, h = (x @ RA.t()).split([R.shape[0], A.shape[0]], dim=1)
    else:
        RA, (logits, h) = None, (x @ R.t(), dropped(x, p, seed) @ A.t())
    probs = torch.softmax(logits, dim=-1, dtype=_softmax_dtype(x.dtype))
    h = h.view(x.shape[0], -1, r)                              # columns of x [R; A]^T: a view, no copy
    del logits
    out = _update_and_base((probs.to(h.dtype).unsqueeze(-1) * h).flatten(1), B, x, weight, bias)
    return out, probs, h, RA


def _routed_small_grads(g, g_probs, B, h, probs, r: int):
    """(dB, [d_logits | d_h]): what needs neither x nor dx. The two gradients side by side, as the
    router and the A's sit side by side in one GEMM without dropout. g_probs None: probs unused
    (HydraLoRA), no zeros materialised for it."""
    gate = probs.to(h.dtype).unsqueeze(-1)                     # (T, E, 1)
    weighted = (gate * h).flatten(1)                           # (T, E r)
    dB = g.t() @ weighted
    del weighted
    d_w = (g @ B).view(g.shape[0], -1, r)                      # (T, E, r)
    d_probs = (d_w * h).sum(-1).to(probs.dtype)
    if g_probs is not None:
        d_probs = d_probs + g_probs
    d_logits = (probs * (d_probs - (probs * d_probs).sum(-1, keepdim=True))).to(g.dtype)
    d_h = d_w * gate
    if h.shape[1] == 1:                                        # shared A: sum over the heads
        d_h = d_h.sum(1, keepdim=True)
    return dB, torch.cat([d_logits, d_h.flatten(1)], dim=1)


def _routed_input_grad(g, weight, R, A, RA, d_both, p: float, seed):
    """dx = g W + d_logits R + drop(d_h A), in one buffer."""
    if p == 0.0:
        return (d_both @ RA).addmm_(g, weight)
    d_logits, d_h = d_both.split([R.shape[0], A.shape[0]], dim=1)
    return _input_grad(g, weight, d_h, A, p, seed).addmm_(d_logits, R)


def _routed_weight_grads(x, R, A, d_both, p: float, seed):
    """(dR, dA); without dropout in one pass over x."""
    if p == 0.0:
        return (d_both.t() @ x).split([R.shape[0], A.shape[0]])
    d_logits, d_h = d_both.split([R.shape[0], A.shape[0]], dim=1)
    return d_logits.t() @ x, _down_grad(d_h, x, p, seed)


def _output_grad(g, weight, h):
    """The output's gradient; zeros where only probs were used (grads are not materialised)."""
    return g if g is not None else weight.new_zeros(h.shape[0], weight.shape[0])


class RoutedLowRankLinear(torch.autograd.Function):
    """HydraLoRA and MoLE: a per-token softmax over E heads mixes low-rank updates.

        logits = x R^T,  probs = softmax(logits) in float32,  h = drop(x) A^T viewed (T, G, r)
        out = x W^T + b + sum_e probs[:, e] * h[:, e or 0] B_e^T      (B = [B_1 .. B_E], scaled)

    G = 1 (HydraLoRA: one shared A for every head) or E (MoLE: one A per expert). Returns
    (out, probs): probs carries MoLE's balance-loss gradient back in (HydraLoRA's is unused: its
    gradient stays None, not materialised zeros). The router reads the undropped x, as the official
    code does. dx = g W + d_logits R + d_h A in one buffer.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, R, A, B, r, p, seed):
        out, probs, h, RA = _routed_update(x, weight, bias, R, A, B, r, p, seed)
        ctx.p, ctx.r = p, r
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, R, A, RA, B, h, probs, _seed(p, seed, x))
        return out, probs

    @staticmethod
    def backward(ctx, g, g_probs):
        x, weight, R, A, RA, B, h, probs, seed = ctx.saved_tensors
        g = _output_grad(g, weight, h)
        dB, d_both = _routed_small_grads(g, g_probs, B, h, probs, ctx.r)
        dR, dA = _routed_weight_grads(x, R, A, d_both, ctx.p, seed)
        dx = _routed_input_grad(g, weight, R, A, RA, d_both, ctx.p, seed) if ctx.needs_input_grad[0] else None
        return dx, None, None, dR, dA, dB, None, None, None


class GatedRoutedLowRankMLP(torch.autograd.Function):
    """RoutedLowRankLinear on x = silu(gate) * up (HydraLoRA's and MoLE's adapted down_proj): keeps
    gate and up, not the d_ff-wide x, and recomputes x in backward, as GatedLowRankMLP does."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias, R, A, B, r, p, seed):
        x = gated_act.forward(gate, up)
        out, probs, h, RA = _routed_update(x, weight, bias, R, A, B, r, p, seed)
        del x
        ctx.p, ctx.r = p, r
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(gate, up, weight, R, A, RA, B, h, probs, _seed(p, seed, gate))
        return out, probs

    @staticmethod
    def backward(ctx, g, g_probs):
        gate, up, weight, R, A, RA, B, h, probs, seed = ctx.saved_tensors
        g = _output_grad(g, weight, h)
        dB, d_both = _routed_small_grads(g, g_probs, B, h, probs, ctx.r)
        dx = _routed_input_grad(g, weight, R, A, RA, d_both, ctx.p, seed)
        x, dgate, dup = gated_act.backward(gate, up, dx)       # x again, for dR and dA
        dR, dA = _routed_weight_grads(x, R, A, d_both, ctx.p, seed)
        return dgate, dup, None, None, dR, dA, dB, None, None, None


def routed_low_rank_linear(base: nn.Linear, x: torch.Tensor, R: torch.Tensor, A: torch.Tensor,
                           B: torch.Tensor, r: int, p: float = 0.0, up: Optional[torch.Tensor] = None):
    """(out, probs); see RoutedLowRankLinear. With up: x is gate, the input silu(gate) * up."""
    if up is not None:
        return _apply(GatedRoutedLowRankMLP, x, up, base.weight, base.bias, R, A, B, r, p=p)
    return _apply(RoutedLowRankLinear, x, base.weight, base.bias, R, A, B, r, p=p)
