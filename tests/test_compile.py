"""Regional torch.compile (each decoder layer compiled on its own) against eager mode: the same loss and
gradients after a step, one graph for every layer (no graph break, no recompilation per layer or per
step), CoLA random's resample still taking effect, and dropout traced with eager's masks. CI's torch
(2.13) never showed the zero gradients that the GPU image's torch 2.11 gave the fused functions under
compile (docs/PERFORMANCE.md, run 8): run this file on the GPU machine too."""
from __future__ import annotations

import json
import re

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from cola_train.adapters import attach_adapter, aux_loss, kernels_of, resample, set_kernels
from cola_train.config import MethodConfig
from cola_train.regional_compile import compile_blocks
from test_fused_ops import ROUTED, TARGETS, _cola, _llama


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _adapted(method: str, dropout: float = 0.0):
    if method.startswith("cola_"):
        cfg = _cola(method[len("cola_"):], dropout)
    else:
        cfg = MethodConfig(name=method, r=4, alpha=8.0, dropout=dropout, balance_coef=0.5, **ROUTED[method])
    model = attach_adapter(_llama(torch.float32), cfg, TARGETS)
    model.enable_input_require_grads()   # else layer 0, whose input needs no gradient, has a graph of its own
    with torch.no_grad():   # distinct B's (PiSSA's are copies, the others' zero) and a non-uniform MoLE gate
        for m in model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.normal_(0, 0.1)
            if hasattr(getattr(m, "combiner", None), "balance_coef"):
                m.gate.weight.normal_(0, 0.5)
    return model


def _step(model, ids, step: int = 0, seed: int = 0):
    model.train()
    model.zero_grad(set_to_none=True)
    resample(model, step, 0)
    torch.manual_seed(seed)   # dropout's mask seeds
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    aux = aux_loss(model)
    loss = loss + aux if aux is not None else loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _compile_layers(model, backend: str = "inductor") -> CompileCounterWithBackend:
    counter = CompileCounterWithBackend(backend)
    assert compile_blocks(model, backend=counter) == list(model.model.layers)
    return counter


def _assert_same(got, ref):
    (loss, grads), (ref_loss, ref_grads) = got, ref
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        scale = ref_grads[name].abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method, backend", [("cola_heuristic", "inductor"), ("hydralora", "aot_eager"),
                                             ("mole", "aot_eager")])  # inductor compiles for ~30 s on CPU
def test_compiled_layers_match_eager(method, backend):
    """Through the fused functions (CoLA's gated MLP too; MoLE's balance loss read from the layers
    after the compiled call): one graph for both layers, no graph break, eager's loss and gradients."""
    model = _adapted(method)
    ref = _step(model, IDS)
    counter = _compile_layers(model, backend)
    _assert_same(_step(model, IDS), ref)
    _assert_same(_step(model, IDS), ref)
    assert counter.frame_count == 1, "a graph per layer or per step: a guard on something per layer"
    assert not counters["graph_break"]


def test_resample_takes_effect_under_compile():
    """CoLA random's pairing is a buffer that resample() rewrites in place: the compiled layers read the
    new draw, without compiling again."""
    model = _adapted("cola_random")
    steps = (0, 1)
    ref = [_step(model, IDS, step) for step in steps]
    assert ref[0][0] != ref[1][0]   # the two draws differ
    counter = _compile_layers(model, "aot_eager")   # dynamo and AOTAutograd; inductor: the test above
    for step, expected in zip(steps, ref):
        _assert_same(_step(model, IDS, step), expected)
    assert counter.frame_count == 1


@pytest.mark.parametrize("method", ["cola_heuristic", "hydralora"])
def test_dropout_is_traced_with_eager_masks(method):
    """The fused functions' dropout (a hash of a seed tensor, seeded_dropout) traces: one graph, no
    break, the masks of eager mode; a new seed each step compiles nothing new."""
    model = _adapted(method, dropout=0.1)
    set_kernels(model, dropout_mask="per_layer")   # what compiled blocks draw (compile_blocks sets it)
    ref = [_step(model, IDS, seed=seed) for seed in (0, 1)]
    assert ref[0][0] != ref[1][0]   # other masks
    set_kernels(model, dropout_mask="shared")
    counter = _compile_layers(model, "aot_eager")
    assert kernels_of(model)["dropout_mask"] == "per_layer"   # compiling says what the blocks draw
    _assert_same(_step(model, IDS, seed=0), ref[0])
    frames = counter.frame_count
    _assert_same(_step(model, IDS, seed=1), ref[1])
    assert counter.frame_count == frames == 1
    assert not counters["graph_break"]


@pytest.mark.parametrize("method, extra", [
    ("cola_heuristic", []), ("lora", []),
    # the setup of the GPU run that trained nothing (PERFORMANCE.md runs 7-8): bf16 weights, fp32 master factors
    ("cola_heuristic", ["model.dtype=bf16", "trainer.precision=bf16"]),
    # links merged mid-run: the blocks' modules change under the compiled graph
    ("chain_of_lora", ["method.links=2"]),
])
def test_a_run_with_trainer_compile_matches_eager(data_root, tmp_path, method, extra):
    """trainer.compile=true, the whole run (Trainer, save): the losses of the eager run, and the same
    adapter file, parameter for parameter. All keep their configs' dropout (0.05): CoLA's seeds and
    PEFT's nn.Dropout draw from torch's generator, as in eager mode (inductor's fallback_random)."""
    from safetensors.torch import load_file

    from conftest import TINY, compose
    from cola_train.run import run

    # compiled blocks draw one dropout mask per linear (compile_blocks): the eager run too
    masks = ["method.dropout_mask=per_layer"] if method.startswith("cola_") else []
    common = TINY + [f"method={method}", "trainer.max_steps=4", "eval=none"] + masks + extra
    eager = run(compose(common), tmp_path / "eager")
    assert not counters["stats"]["unique_graphs"]
    compiled = run(compose(common + ["trainer.compile=true"]), tmp_path / "compiled")
    assert counters["stats"]["unique_graphs"] >= 1   # the blocks did run compiled
    assert compiled["status"] == "completed" and compiled["train"]["steps"] == 4
    assert compiled["train"]["loss"] == pytest.approx(eager["train"]["loss"], rel=1e-4)
    assert compiled["eval"]["loss"] == pytest.approx(eager["eval"]["loss"], rel=1e-4)
    half = "trainer.precision=bf16" in extra
    norms = [_grad_norms(tmp_path / mode) for mode in ("eager", "compiled")]
    assert len(norms[0]) == 4 and all(n > 0 for n in norms[1])
    assert norms[1] == pytest.approx(norms[0], rel=1e-2 if half else 1e-4)
    if half:  # inductor rounds to bf16 once where eager rounds per op, and Adam's first steps (about
        return  # +-lr per element) then differ wherever a gradient is near 0: the weights cannot match to 1e-4
    files = sorted(p.relative_to(tmp_path / "eager") for p in (tmp_path / "eager" / "adapter").rglob("*.safetensors"))
    assert files
    for f in files:
        a, b = load_file(tmp_path / "eager" / f), load_file(tmp_path / "compiled" / f)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)


def _grad_norms(out) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["grad_norm"] for r in rows if "grad_norm" in r]


def _outputs_written_in_place(graph_module) -> list[str]:
    """In-place method calls whose result or target is among what the traced forward returns."""
    from torch.fx.node import map_arg

    nodes = list(graph_module.graph.nodes)
    returned: set = set()
    map_arg(nodes[-1].args, returned.add)
    return [str(n.target) for n in nodes
            if n.op == "call_method" and str(n.target).endswith("_") and not str(n.target).startswith("__")
            and (n in returned or n.args[0] in returned)]


@pytest.mark.parametrize("fn", ["linear", "gated", "routed"])
@pytest.mark.parametrize("bias, factors", [(False, torch.float32), (True, torch.float64)])
def test_compiled_fused_forwards_write_no_output_in_place(fn, bias, factors):
    """torch 2.11 silently gave every input of an autograd.Function a zero gradient when its forward
    wrote the output in place (out.addmm_, PERFORMANCE.md run 8): the compiled forwards write none.
    float64 factors beside float32 activations: the cast path that adds the bias separately."""
    from cola_train.adapters import fused_ops

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(16, 24, bias=bias).requires_grad_(False)
    x, up = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    A = torch.randn(6, 16, generator=g, dtype=factors).requires_grad_()
    B = torch.randn(24, 6, generator=g, dtype=factors).requires_grad_()
    R = torch.randn(3, 16, generator=g).requires_grad_()
    call = {"linear": lambda: fused_ops.low_rank_linear(base, x, A, B),
            "gated": lambda: fused_ops.gated_low_rank_mlp(base, x, up, A, B),
            "routed": lambda: fused_ops.routed_low_rank_linear(base, x, R, A.float()[:6], B.float(), 2)[0]}[fn]
    counter = CompileCounterWithBackend("eager")
    torch.compile(call, backend=counter, fullgraph=True)().sum().backward()
    forwards = [m for gm in counter.graphs for name, m in gm.named_modules() if name.startswith("fwd_body")]
    assert forwards, "no autograd.Function traced"
    assert not [c for m in forwards for c in _outputs_written_in_place(m)]


def test_a_model_without_a_block_class_is_refused_in_one_line():
    from cola_train.config import ConfigError
    from cola_train.regional_compile import compile_blocks

    with pytest.raises(ConfigError, match=r"^trainer.compile=true: Sequential lists no repeated block class"):
        compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("version, extra, refused", [
    ("2.11.0+cu130", [], True), ("2.12.1", [], True), ("2.13.0+cpu", [], False),
    ("2.11.0+cu130", ["method.balance_coef=0"], False)])
def test_mole_balance_loss_under_compile_is_refused_on_a_torch_that_gets_it_wrong(version, extra, refused):
    """torch 2.11 gave MoLE's balance loss wrong gradients under compile (measured, PERFORMANCE.md run 8)."""
    from unittest import mock

    from conftest import TINY, compose
    from cola_train.checks import validate
    from cola_train.config import ConfigError

    cfg = compose(TINY + ["method=lora_moe", "trainer.compile=true"] + extra)
    with mock.patch.object(torch, "__version__", version):
        if not refused:
            validate(cfg)
            return
        expected = (r"^trainer.compile=true with method=lora_moe \(balance_coef=0.01\) computes wrong gradients on "
                    rf"torch {re.escape(version)}; needs torch>=2.13")
        with pytest.raises(ConfigError, match=expected):
            validate(cfg)

