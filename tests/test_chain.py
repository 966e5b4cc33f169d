"""Chain of LoRA (method=chain_of_lora): the switch is exact, the base collects the merged updates
(beside the weights by default, exact in bf16 too; into them with method.merge=weights),
the optimizer starts each link empty, links=1 is plain LoRA, resume replays the chain, DeepSpeed
ZeRO-2/3 agree with one plain process, and bad input is one line.

Trainer-level runs use TINY (tiny_llama, 8 samples, one batch of 8, 8 steps, checkpoints every 4)
with lr 5e-3 so the adapters move, and dropout 0 so DeepSpeed and plain runs see the same numbers.
With 8 steps and 3 equal links the switches are at steps 3 and 5 (links of 3, 2, 3 steps).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cola_train import chain
from cola_train.adapters import base_layers
from cola_train.adapters.io import unwrap
from cola_train.checks import validate
from cola_train.config import ConfigError, MethodConfig, method_view
from conftest import REPO, TINY, compose

CHAIN = TINY + ["method=chain_of_lora", "trainer.lr=5e-3", "method.dropout=0", "trainer.save_total_limit=3"]
IDS = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(0))
# DeepSpeed's CPU backend JIT-builds a shared-memory op at start-up; a cache of our own keeps it
# from being rebuilt whenever another build variant used the shared ~/.cache/torch_extensions.
EXTENSIONS = os.environ.get("TORCH_EXTENSIONS_DIR") or str(REPO / ".pytest_cache" / "torch_extensions")


# -- config ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,message", [
    (["method.links=0"], r"method\.links=0 must be an integer >= 1"),
    (["method.link_fractions=[0.5,0.3,0.1]"], r"link_fractions=\[0\.5, 0\.3, 0\.1\] sums to 0\.9, not 1"),
    (["method.link_fractions=[1.2,0.0,-0.2]"], r"link_fractions=\[1\.2, 0\.0, -0\.2\] has a non-positive entry 0\.0"),
    (["method.link_fractions=[0.5,0.5]"], r"method\.link_fractions has 2 entries but method\.links=3"),
    (["method.rank_schedule=[8,4]"], r"method\.rank_schedule has 2 entries but method\.links=3"),
    (["method.rank_schedule=[8,0,4]"], r"method\.rank_schedule=\[8, 0, 4\] has an entry 0 that is not an integer >= 1"),
    (["method.rank_schedule=[8,4,2]", "deepspeed=zero3"], r"changes the rank, which needs new parameter tensors"),
    (["method.base=hydralora"], r"method\.base='hydralora' routes each token"),
    (["method.base=dora"], r"method\.base='dora': a merged DoRA update is not low-rank"),
    (["method.base=fft"], r"method\.base='fft' is full fine-tuning"),
    (["method.base=chain_of_lora"], r"method\.base='chain_of_lora' is a chain itself"),
    (["method.base=lorra"], r"method\.base='lorra' is not a method config; choose from: .*cola_heuristic.*lora"),
    (["trainer.max_steps=2"], r"method\.links=3 needs at least 3 training steps, but trainer\.max_steps=2 gives 2"),
    (["trainer.max_steps=4", "method.link_fractions=[0.1,0.1,0.8]"], r"leaves link 0 with no steps"),
    (["method.link_warmup=linear"], r"method\.link_warmup='linear' is not one of scaled, full"),
    (["method.merge=lossy"], r"method\.merge='lossy' is not one of factors, weights"),
    (["trainer.scheduler=reduce_lr_on_plateau"], r"method\.restart_lr=true restarts the learning-rate schedule at "
                                                  r"each link, but trainer\.scheduler='reduce_lr_on_plateau' is not"),
])
def test_bad_chain_config_is_one_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        validate(compose(["method=chain_of_lora", *overrides]))
    assert "\n" not in str(err.value)


def test_bad_chain_config_on_the_command_line_is_one_line(tmp_path):
    from conftest import run_cli

    proc = run_cli(TINY + ["method=chain_of_lora", "method.link_fractions=[0.5,0.25,0.2]",
                           f"hydra.run.dir={tmp_path}"], timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == \
        "error: method.link_fractions=[0.5, 0.25, 0.2] sums to 0.95, not 1"


def test_base_method_takes_the_chains_lora_settings():
    cfg = compose(["method=chain_of_lora", "method.base=cola_heuristic", "method.r=4", "method.alpha=32",
                   "method.dropout=0.1", "method.target_modules=[q_proj,v_proj]"])
    validate(cfg)
    base = chain.base_method(cfg.method)
    assert (base.kind, base.strategy, base.init, base.num_A, base.num_B) == ("cola", "heuristic", "pissa", 2, 3)
    assert (base.r, base.alpha, base.dropout, base.target_modules) == (4, 32.0, 0.1, ["q_proj", "v_proj"])
    first = chain.base_method(compose(["method=chain_of_lora", "method.rank_schedule=[16,8,4]"]).method)
    assert (first.kind, first.r) == ("peft", 16)
    lora = compose(["method=lora"]).method
    assert chain.adapter_method(lora) == method_view(lora) == MethodConfig(name="lora", kind="peft", r=8, alpha=16,
                                                                            dropout=0.05)


def test_link_ends():
    assert chain.link_ends(8, [1 / 3] * 3) == [3, 5, 8]
    assert chain.link_ends(100, [0.5, 0.3, 0.2]) == [50, 80, 100]
    assert chain.link_ends(10, [0.1] * 10) == list(range(1, 11))
    assert chain.link_ends(7, [1.0]) == [7]


# -- the switch on a bare model (every mergeable base) ---------------------------------------------

def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=259,
                                        max_position_embeddings=64)).eval()


def _logits(model):
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=IDS).logits.double()
    model.train(was)
    return out


def _base_weights(model) -> dict:
    """Each adapted layer's effective base weight in float64: W plus the links committed beside it."""
    out = {}
    for name, base in base_layers(model).items():
        with chain.gathered([base.weight], modify=False):
            out[name] = base.weight.detach().double().clone()
    for module_name, module in unwrap(model).named_modules():
        # committed links: a hook on PEFT's base linear, a term of our layer
        if "committed_A" in module._buffers:
            name = module_name.removeprefix("base_model.model.").removesuffix(".base_layer")
            out[name] += module.committed_B.double() @ module.committed_A.double()
    return out


@torch.no_grad()
def _train_a_bit(model, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    for p in unwrap(model).parameters():
        if p.requires_grad:
            p.add_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))


@pytest.mark.parametrize("base,ranks,merge", [
    ("lora", [4, 4, 4], "factors"), ("lora", [4, 2, 6], "factors"), ("pissa", [4, 4, 4], "factors"),
    ("cola_heuristic", [4, 2, 4], "factors"), ("cola_random", [4, 4, 4], "factors"),
    ("cola_fully", [4, 4, 2], "factors"), ("lora", [4, 2, 6], "weights"), ("cola_heuristic", [4, 2, 4], "weights"),
])
def test_switch_is_exact_and_the_base_collects_every_update(base, ranks, merge, tmp_path):
    from cola_train.adapters import attach_adapter, load_adapter, merged_model, save_adapter

    schedule = ",".join(map(str, ranks))
    m = compose(["method=chain_of_lora", f"method.base={base}", f"method.rank_schedule=[{schedule}]",
                 "method.dropout=0"]).method
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = attach_adapter(_llama(), chain.adapter_method(m), targets)
    start = _base_weights(model)  # the live base at step 0 (PiSSA: the residual)
    total = {k: torch.zeros_like(v) for k, v in start.items()}
    for link in range(len(ranks)):
        _train_a_bit(model, seed=link)
        if link == len(ranks) - 1:
            break
        before = _logits(model)
        _, factors = chain.switch(model, ranks[link + 1], seed=7 + link, merge=merge)
        torch.testing.assert_close(_logits(model), before, rtol=0, atol=2e-5)   # the switch is exact
        for name, (A, B) in factors.items():
            total[name] += B.double() @ A.double()
        for name, W in _base_weights(model).items():                           # W = W_0 + sum of merged dW
            torch.testing.assert_close(W, start[name] + total[name], rtol=0, atol=2e-6)
        rank = ranks[link + 1]  # the fresh module's (CoLA heuristic, m=2: A stacks 2 x r rows)
        assert {A.shape[0] for A, _ in chain.current_factors(model).values()} <= {rank, 2 * rank}
    for name, (A, B) in chain.current_factors(model).items():                  # + the last link
        total[name] += B.double() @ A.double()
    save_adapter(model, tmp_path / "adapter")
    reloaded = load_adapter(_llama(), tmp_path / "adapter")                    # same seed, same W_0
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=2e-5)
    for final in (merged_model(model), merged_model(reloaded)):
        for name, layer in ((n, final.get_submodule(n)) for n in start):
            assert type(layer) is torch.nn.Linear and not layer._forward_hooks and not layer._buffers
            torch.testing.assert_close(layer.weight.detach().double(), start[name] + total[name],
                                       rtol=0, atol=2e-6)


@pytest.mark.parametrize("base", ["lora", "cola_heuristic"])
@pytest.mark.parametrize("merge", ["factors", "weights"])
def test_a_bf16_base_keeps_a_small_link_only_as_factors(base, merge):
    """A link's update far below bf16's rounding step of the weights (2^-8 of a weight, 8e-5 at
    this model's 0.02 scale): kept whole beside the weights, which stay bit for bit as they were;
    mostly lost when merged into them. Measured at the second switch: link 1 starts from
    Kaiming A and zero B in every base, so its update is as small as its training makes it."""
    from cola_train.adapters import attach_adapter

    m = compose(["method=chain_of_lora", f"method.base={base}", "method.dropout=0", "method.r=4"]).method
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = attach_adapter(_llama().to(torch.bfloat16), chain.adapter_method(m), targets)
    _train_a_bit(model, seed=0)
    chain.switch(model, 4, seed=7, merge=merge)
    _train_a_bit(model, seed=1, scale=1e-5)
    start = _base_weights(model)
    weights = {n: base.weight.detach().clone() for n, base in base_layers(model).items()}
    _, factors = chain.switch(model, 4, seed=8, merge=merge)
    effective = _base_weights(model)
    kept = []
    for name, (A, B) in factors.items():
        want = B.double() @ A.double()
        got = effective[name] - start[name]
        kept.append(float((got * want).sum() / (want * want).sum()))      # the share of dW kept along dW
    if merge == "factors":
        for name, base in base_layers(model).items():
            assert torch.equal(base.weight, weights[name]), name
        assert min(kept) > 0.999 and max(kept) < 1.001, kept
    else:
        assert sum(kept) / len(kept) < 0.5, kept


# -- trainer runs, instrumented --------------------------------------------------------------------

def probe_run(overrides: list[str], out: Path) -> dict:
    """run() with probes around every switch; returns what they saw (JSON-able, so a DeepSpeed run
    in a fresh process can report it too)."""
    from cola_train.run import run
    from cola_train.trainer import ColaTrainer, _innermost
    from transformers import TrainerCallback

    seen = {"switch_logit_diff": [], "sum_error": [], "state_after_reset": [], "groups_are_params": [],
            "fp32_gap": [], "steps_after_switch": []}
    box: dict = {}
    real_attach, real_switch, real_reset = chain.attach, chain.switch, ColaTrainer.reset_optimizer

    def fp32_gap(trainer) -> float:
        if not trainer.is_deepspeed_enabled:
            return 0.0
        opt = trainer.model_wrapped.optimizer
        if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
            pairs = zip(opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat)
        else:                                              # ZeRO-1/2, one rank
            pairs = ((b[0], f) for b, f in zip(opt.parallel_partitioned_bit16_groups,
                                               opt.single_partition_of_fp32_groups))
        return max(float((a.float() - b.float()).abs().max()) for a, b in pairs)

    class AfterSwitch(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            box["live"] = True  # switches from here on are the run's, not a resume's replay

        def on_step_end(self, args, state, control, **kwargs):
            if box.get("switched_at") == state.global_step - 1:  # the first step of a new link
                inner = _innermost(box["trainer"].optimizer)
                seen["steps_after_switch"].append(sorted({float(s["step"]) for s in inner.state.values()}))

        def on_train_end(self, args, state, control, **kwargs):
            box["final_weights"] = _base_weights(box["trainer"].model)
            box["final_factors"] = chain.current_factors(box["trainer"].model)

    def attach(cfg, trainer):
        schedule = real_attach(cfg, trainer)
        box.update(trainer=trainer, schedule=schedule, start=_base_weights(trainer.model))
        box["delta"] = {k: torch.zeros_like(v) for k, v in box["start"].items()}
        trainer.add_callback(AfterSwitch())
        return schedule

    def switch(model, rank, seed, merge="factors"):
        before = _logits(model)
        weights, factors = real_switch(model, rank, seed, merge)
        if box.get("live"):
            seen["switch_logit_diff"].append(float((_logits(model) - before).abs().max()))
            for name, (A, B) in factors.items():
                box["delta"][name] += B.double() @ A.double()
            now = _base_weights(model)
            seen["sum_error"].append(max(float((now[k] - box["start"][k] - box["delta"][k]).abs().max())
                                         for k in now))
        return weights, factors

    def reset(trainer, names_before=None):
        real_reset(trainer, names_before)
        inner = _innermost(trainer.optimizer)
        seen["state_after_reset"].append(len(inner.state))
        if not trainer.is_deepspeed_enabled:
            live = {id(p) for p in trainer.model.parameters() if p.requires_grad}
            in_groups = [id(p) for g in inner.param_groups for p in g["params"]]
            seen["groups_are_params"].append(set(in_groups) == live and len(in_groups) == len(live))
        seen["fp32_gap"].append(fp32_gap(trainer))
        box["switched_at"] = trainer.state.global_step

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chain, "attach", attach)
        mp.setattr(chain, "switch", switch)
        mp.setattr(ColaTrainer, "reset_optimizer", reset)
        results = run(compose(CHAIN + overrides), out)
    if "final_weights" in box:
        seen["end_sum_error"] = max(float((box["final_weights"][k] - box["start"][k] - box["delta"][k]).abs().max())
                                    for k in box["start"])
        seen["all_links"] = {k: (box["start"][k] + box["delta"][k]
                                 + box["final_factors"][k][1].double() @ box["final_factors"][k][0].double()).tolist()
                             for k in box["start"]}
    seen["results"] = results
    return seen


def _rows(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _rows(out) if "loss" in r}


def _adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted((out / "adapter").glob("*.safetensors")):
        tensors.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return tensors


@pytest.fixture(scope="module")
def equal_links(tmp_path_factory, data_root):
    """3 equal links of rank 8, lr restarting per link; checkpoints at steps 4 and 8."""
    out = tmp_path_factory.mktemp("chain") / "run"
    return out, probe_run([], out)


@pytest.fixture(scope="module")
def falling_ranks(tmp_path_factory, data_root):
    """3 links of rank 8, 4, 2 with one learning-rate schedule over the whole chain."""
    out = tmp_path_factory.mktemp("chain") / "run"
    return out, probe_run(["method.rank_schedule=[8,4,2]", "method.restart_lr=false"], out)


def _check_probes(seen: dict, switches: int = 2) -> None:
    assert len(seen["switch_logit_diff"]) == switches
    assert max(seen["switch_logit_diff"]) < 2e-5, seen["switch_logit_diff"]   # exact up to fp32 rounding
    assert max(seen["sum_error"]) < 1e-6, seen["sum_error"]                   # W = W_0 + sum merged dW
    assert seen["end_sum_error"] < 1e-6                                        # ... still at the end
    assert seen["state_after_reset"] == [0] * switches                         # no state survives a switch
    assert seen["steps_after_switch"] == [[1.0]] * switches                   # Adam restarts at step 1
    assert max(seen["fp32_gap"]) == 0.0                                        # ZeRO masters refreshed


@pytest.mark.parametrize("which", ["equal_links", "falling_ranks"])
def test_run_switches_exactly_and_logs_each_link(which, request):
    out, seen = request.getfixturevalue(which)
    _check_probes(seen)
    if which == "falling_ranks":
        assert seen["groups_are_params"] == [True, True]  # the optimizer trains the new tensors
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "completed" and res["train"]["steps"] == 8
    section = res["chain"]
    assert section["ends"] == [3, 5, 8] and section["links"] == 3
    assert [r["link"] for r in section["records"]] == [0, 1, 2]
    assert [r["merged"] for r in section["records"]] == [True, True, False]
    assert [r["rank"] for r in section["records"]] == ([8, 4, 2] if which == "falling_ranks" else [8, 8, 8])
    losses = _losses(out)
    assert sorted(losses) == list(range(1, 9)) and losses[8] < losses[1] * 0.95
    logged = [r for r in _rows(out) if "chain/link" in r]
    assert [(r["step"], r["chain/link"]) for r in logged] == [(3, 0), (5, 1)]
    for row, record in zip(logged, section["records"]):
        assert row["chain/loss_at_switch"] == record["loss_at_switch"] == losses[row["step"]]
        assert row["chain/delta_norm"] == pytest.approx(record["delta_norm"]) and record["delta_norm"] > 0
        per_layer = record["layer_norms"]
        assert math.sqrt(sum(v * v for v in per_layer.values())) == pytest.approx(record["delta_norm"])
    assert section["records"][1]["cumulative_delta_norm"] <= sum(r["delta_norm"] for r in section["records"][:2])
    lrs = [r["learning_rate"] for r in _rows(out) if "loss" in r]
    cosine = lambda t, n: 5e-3 * 0.5 * (1 + math.cos(math.pi * t / n))  # noqa: E731
    if which == "equal_links":   # restarts at each link: lengths 3, 2, 3
        expected = [cosine(t, n) for n in (3, 2, 3) for t in range(n)]
    else:                        # one schedule over the 8 steps
        expected = [cosine(t, 8) for t in range(8)]
    assert lrs == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("which", ["equal_links", "falling_ranks"])
def test_saved_adapter_is_the_original_base_plus_every_link(which, request):
    """The run's adapter reloads on a fresh base and merges to W_0 + dW_1 + ... + dW_L."""
    from cola_train.adapters import load_adapter, merged_model
    from cola_train.models import load_model, resolve_dtype

    out, seen = request.getfixturevalue(which)
    from transformers import set_seed

    cfg = compose(CHAIN)
    set_seed(cfg.seed)  # run() draws the tiny model's random weights right after this
    merged = merged_model(load_adapter(load_model(cfg.model, resolve_dtype(cfg.model.dtype)), out / "adapter"))
    for name, expected in seen["all_links"].items():
        got = merged.get_submodule(name).weight.detach().double()
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=2e-6)


@pytest.mark.parametrize("mode", ["scaled", "full"])
def test_each_link_warms_up_over_its_share_or_the_whole_warmup(mode, tmp_path, data_root):
    """trainer.warmup_steps=4 over 8 steps in links of 3, 2 and 3 steps. scaled: warm-ups of
    ceil(4*3/8) = 2, 1 and 2 steps, and every link reaches the peak lr; full: 4 warm-up steps in
    every link, so no link reaches it (what a 100-sample study run saw with 20 warm-up steps)."""
    from cola_train.run import run

    out = tmp_path / "run"
    res = run(compose(CHAIN + ["trainer.warmup_steps=4", f"method.link_warmup={mode}",
                               "trainer.save_steps=100"]), out)
    peak = 5e-3

    def lr(t: int, n: int, w: int) -> float:  # linear warm-up, then cosine to 0 over the link
        return peak * t / w if t < w else peak * 0.5 * (1 + math.cos(math.pi * (t - w) / (n - w)))

    warmups = {"scaled": (2, 1, 2), "full": (4, 4, 4)}[mode]
    expected = [lr(t, n, w) for n, w in zip((3, 2, 3), warmups) for t in range(n)]
    assert [r["learning_rate"] for r in _rows(out) if "loss" in r] == pytest.approx(expected, abs=1e-12)
    assert (max(expected) == peak) == (mode == "scaled")
    assert res["chain"]["link_warmup"] == mode


@pytest.mark.parametrize("dtype,merge,warned", [("bf16", "weights", True), ("bf16", "factors", False),
                                               ("fp32", "weights", False)])
def test_a_half_precision_base_is_named_as_losing_merged_updates(dtype, merge, warned, tmp_path, data_root,
                                                                 caplog):
    from cola_train.run import run

    with caplog.at_level("WARNING", logger="cola_train"):
        run(compose(CHAIN + [f"model.dtype={dtype}", f"method.merge={merge}", "trainer.max_steps=3",
                             "trainer.save_steps=100"]), tmp_path / "run")
    assert ("merges every link into bfloat16 base weights" in caplog.text) == warned


def test_one_link_is_plain_lora(tmp_path, data_root):
    from cola_train.run import run

    run(compose(TINY + ["method=lora", "trainer.lr=5e-3"]), tmp_path / "lora")
    res = run(compose(TINY + ["method=chain_of_lora", "method.links=1", "trainer.lr=5e-3"]), tmp_path / "chain")
    assert _losses(tmp_path / "chain") == _losses(tmp_path / "lora")   # bit for bit, every step
    ours, theirs = _adapter(tmp_path / "chain"), _adapter(tmp_path / "lora")
    assert ours.keys() == theirs.keys() and ours
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert [r["merged"] for r in res["chain"]["records"]] == [False]


@pytest.mark.parametrize("which", ["equal_links", "falling_ranks"])
def test_resume_replays_the_merged_links(which, request, tmp_path):
    """Killed after the step-4 checkpoint (link 1, one link merged; falling_ranks: rank 4), resumed:
    the same losses, link switch and final adapter as the uninterrupted run."""
    from cola_train.run import run

    full, _ = request.getfixturevalue(which)
    state = json.loads((full / "checkpoints" / "checkpoint-4" / chain.STATE_JSON).read_text())
    assert (state["link"], state["step_in_link"], len(state["records"])) == (1, 1, 1)
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "checkpoint-8")
    (part / "results.json").unlink()
    (part / "metrics.jsonl").unlink()
    extra = ["method.rank_schedule=[8,4,2]", "method.restart_lr=false"] if which == "falling_ranks" else []
    res = run(compose(CHAIN + extra + ["trainer.resume=true"]), part)
    assert res["train"]["resumed"] is True and res["chain"]["resumed_from"].endswith("checkpoint-4")
    full_losses, resumed = _losses(full), _losses(part)
    assert sorted(resumed) == [5, 6, 7, 8]
    assert [resumed[s] for s in resumed] == pytest.approx([full_losses[s] for s in resumed], rel=1e-6)
    assert [r["link"] for r in res["chain"]["records"]] == [0, 1, 2]
    full_res = json.loads((full / "results.json").read_text())
    assert res["eval"]["loss"] == pytest.approx(full_res["eval"]["loss"], rel=1e-6)
    ours, theirs = _adapter(part), _adapter(full)
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6)


def test_resume_from_a_checkpoint_of_the_per_link_scheduler_continues_the_same(equal_links, tmp_path):
    """Checkpoints written before ColaTrainer.restart (chain_state format 1) hold a scheduler that
    counted its steps from the link's start (at step 4 of link 1, which started at step 3: 1 step).
    Resumed now, the learning rates and losses are still those of the uninterrupted run."""
    from cola_train.run import run

    full, _ = equal_links
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "checkpoint-8")
    (part / "results.json").unlink()
    (part / "metrics.jsonl").unlink()
    ckpt = part / "checkpoints" / "checkpoint-4"
    state = json.loads((ckpt / chain.STATE_JSON).read_text())
    (ckpt / chain.STATE_JSON).write_text(json.dumps({**state, "format": "cola_train.chain/1"}))
    sched = torch.load(ckpt / "scheduler.pt", weights_only=True)
    assert sched["last_epoch"] == 4
    torch.save({**sched, "last_epoch": 1, "_step_count": 2}, ckpt / "scheduler.pt")
    run(compose(CHAIN + ["trainer.resume=true"]), part)
    want = {r["step"]: r for r in _rows(full) if "loss" in r}
    got = {r["step"]: r for r in _rows(part) if "loss" in r}
    assert sorted(got) == [5, 6, 7, 8]
    assert [got[s]["learning_rate"] for s in got] == pytest.approx([want[s]["learning_rate"] for s in got], abs=1e-12)
    assert [got[s]["loss"] for s in got] == pytest.approx([want[s]["loss"] for s in got], rel=1e-6)


def test_resume_refuses_a_different_chain(equal_links, tmp_path):
    from cola_train.run import run

    part = tmp_path / "part"
    shutil.copytree(equal_links[0], part)
    with pytest.raises(ConfigError, match=r"its chain has ranks=\[8, 8, 8\], this run has \[8, 4, 2\]"):
        run(compose(CHAIN + ["method.rank_schedule=[8,4,2]", "trainer.resume=force"]), part)


# -- DeepSpeed, one process (each in a fresh interpreter: DeepSpeed leaves global state) ---------

def _in_fresh_process(code: str) -> None:
    full = "import json, sys; from pathlib import Path; sys.path.insert(0, 'tests'); import test_chain; " + code
    proc = subprocess.run([sys.executable, "-c", full], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TORCH_EXTENSIONS_DIR": EXTENSIONS})
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_deepspeed_one_process_matches_plain_and_resumes(zero, equal_links, tmp_path):
    """ZeRO-2/3 on one CPU process: switches gather, merge and scatter back exactly, the optimizer
    restarts empty with its fp32 masters refreshed, and every step's loss matches the plain run.
    Then a resume from the step-4 checkpoint (mid link 1, lr restarted at step 3) continues it."""
    out = tmp_path / zero
    extra = [f"deepspeed={zero}"]
    if zero == "zero3":  # partition the small adapter matrices too
        extra.append("deepspeed.config.zero_optimization.stage3_param_persistence_threshold=0")
    else:  # 2e8-element buckets cost seconds per step on a CPU; the tiny model needs far less
        extra += [f"deepspeed.config.zero_optimization.{k}_bucket_size=1000000" for k in ("reduce", "allgather")]
    _in_fresh_process(f"seen = test_chain.probe_run({extra!r}, Path({str(out)!r})); seen.pop('all_links', None); "
                      f"Path({str(out / 'probe.json')!r}).write_text(json.dumps(seen, default=str))")
    seen = json.loads((out / "probe.json").read_text())
    _check_probes(seen)
    ref_out, _ = equal_links
    ref, ours = _losses(ref_out), _losses(out)
    assert sorted(ours) == list(range(1, 9))
    assert [ours[s] for s in ours] == pytest.approx([ref[s] for s in ours], rel=1e-5)
    res = json.loads((out / "results.json").read_text())
    ref_res = json.loads((ref_out / "results.json").read_text())
    for a, b in zip(res["chain"]["records"], ref_res["chain"]["records"]):
        assert a["delta_norm"] == pytest.approx(b["delta_norm"], rel=1e-4)
    theirs = _adapter(ref_out)  # Adam amplifies summation-order differences of tiny gradients
    for key, value in _adapter(out).items():
        torch.testing.assert_close(value, theirs[key], rtol=0, atol=1e-4)

    part = tmp_path / f"{zero}-part"
    shutil.copytree(out, part)
    shutil.rmtree(part / "checkpoints" / "checkpoint-8")
    for name in ("results.json", "metrics.jsonl", "probe.json"):
        (part / name).unlink()
    _in_fresh_process("from conftest import compose; from cola_train.run import run; "
                      f"run(compose(test_chain.CHAIN + {extra + ['trainer.resume=true']!r}), Path({str(part)!r}))")
    resumed = _losses(part)
    assert sorted(resumed) == [5, 6, 7, 8]
    assert [resumed[s] for s in resumed] == pytest.approx([ours[s] for s in resumed], rel=1e-6)
    assert json.loads((part / "results.json").read_text())["eval"]["loss"] == pytest.approx(res["eval"]["loss"],
                                                                                            rel=1e-6)


# -- DeepSpeed, two ranks --------------------------------------------------------------------------

@pytest.mark.distributed
@pytest.mark.timeout(900)
@pytest.mark.parametrize("base,zero", [("lora", "zero3"), ("lora", "zero2"), ("cola_heuristic", "zero3")])
def test_two_ranks_switch_links_like_one_process(tmp_path, data_root, base, zero, monkeypatch):
    """2 gloo ranks (batch 2 each) vs 1 process (batch 4): 2 links, switching at step 2 of 4. The
    ZeRO-3 lora case also resumes from the checkpoint written at the switch."""
    from test_distributed import _adapter_tensors, _train

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", EXTENSIONS)

    common = ["method=chain_of_lora", "method.links=2", f"method.base={base}", "trainer.save_steps=2",
              "trainer.save_total_limit=3"]
    ref_dir, ref = _train(tmp_path, "one", [*common, "trainer.batch_size=4"])
    extra = [*common, "trainer.batch_size=2", "trainer.devices=2", f"deepspeed={zero}"]
    if zero == "zero3":
        extra.append("deepspeed.config.zero_optimization.stage3_param_persistence_threshold=0")
    else:  # 2e8-element buckets cost seconds per step on a CPU
        extra += [f"deepspeed.config.zero_optimization.{k}_bucket_size=1000000" for k in ("reduce", "allgather")]
    run_dir, res = _train(tmp_path, "two", extra)
    assert [r["end_step"] for r in res["chain"]["records"]] == [2, 4]
    assert res["train"]["loss"] == pytest.approx(ref["train"]["loss"], rel=1e-4)
    assert res["eval"]["loss"] == pytest.approx(ref["eval"]["loss"], rel=1e-4)
    for a, b in zip(res["chain"]["records"], ref["chain"]["records"]):
        assert a["loss_at_switch"] == pytest.approx(b["loss_at_switch"], rel=1e-4)
        assert a["delta_norm"] == pytest.approx(b["delta_norm"], rel=1e-4)
    ours, theirs = _adapter_tensors(run_dir), _adapter_tensors(ref_dir)
    assert ours.keys() == theirs.keys() and ours
    for key, value in ours.items():
        assert (value.float() - theirs[key].float()).abs().max().item() < 1e-4, key
    if (base, zero) != ("lora", "zero3"):
        return
    part = tmp_path / "part,x=1"  # the dir _train(tmp_path, "part", ...) runs in
    shutil.copytree(run_dir, part)
    shutil.rmtree(part / "checkpoints" / "checkpoint-4")
    (part / "results.json").unlink()
    (part / "metrics.jsonl").unlink()
    _, resumed = _train(tmp_path, "part", [*extra, "trainer.resume=true"])
    assert resumed["train"]["resumed"] is True
    assert resumed["eval"]["loss"] == pytest.approx(res["eval"]["loss"], rel=1e-5)
    steps = [json.loads(l)["step"] for l in (part / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(l)]
    assert steps == [3, 4]
