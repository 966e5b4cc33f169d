"""Every option of every group composes; a typo fails at compose time naming the key: each method
option has the schema of its kind (a key it lacks fails), each choice is an enum (a value outside
it fails, listing the allowed ones)."""
from __future__ import annotations

import dataclasses
import typing
from enum import Enum

import pytest
from omegaconf import OmegaConf

from cola_train import config as C
from cola_train.checks import validate
from cola_train.config import ConfigError
from conftest import CONF, compose, compose_node

GROUPS = ["model", "method", "data", "trainer", "deepspeed", "logger", "eval"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


# options that need a setting of another group to validate (method=moelora: a task id per record)
NEEDS = {("method", "moelora"): ["data.task_key=source"]}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(group, option):
    cfg = compose([f"{group}={option}", *NEEDS.get((group, option), [])])
    validate(cfg)
    assert getattr(cfg, group) is not None


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_experiments_compose(experiment):
    validate(compose([f"experiment={experiment}"]))


def test_groups_expected_by_the_design_exist():
    names = {g: {p.stem for p in (CONF / g).glob("*.yaml")} for g in GROUPS}
    assert {"llama3_1_8b", "llama3_2_3b", "opt_1_3b", "opt_125m", "smollm2_135m", "tiny_llama",
            "tiny_opt"} <= names["model"]
    assert {"generality", "law", "medicine", "math", "finance", "multitask"} <= names["data"]
    assert {"fft", "lora", "dora", "pissa", "cola_fully", "cola_random", "cola_heuristic",
            "hydralora", "mole", "chain_of_lora"} <= names["method"]


def test_unknown_key_fails_naming_it():
    with pytest.raises(Exception, match="nonexistent_key"):
        compose(["trainer.nonexistent_key=3"])


def test_wrong_type_fails_naming_the_key():
    with pytest.raises(Exception, match="batch_size"):
        compose(["trainer.batch_size=many"])


@pytest.mark.parametrize("override,message", [
    ("data.fraction=0", r"data.fraction=0.0 is outside \(0, 1\]"),
    ("data.fraction=1.5", r"data.fraction=1.5 is outside \(0, 1\]"),
    ("data.max_samples=0", r"data.max_samples=0 must be >= 1"),
    ("method.r=0", r"method.r=0 must be >= 1"),
    ("method.alpha=-1", r"method.alpha=-1.0 must be > 0"),
    ("method.strategy=sometimes", r"method.strategy='sometimes' is not one of fully, random, heuristic"),
])
def test_bad_values_give_one_line(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose([override]))


# -- one schema per method kind, enums for every choice (#24) ---------------------------------------

METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
# a real key of another method that this method's schema must not have (written from the papers:
# LoRA has one pair, CoLA no gate, HydraLoRA one A and no pairing rule, MoLE no DoRA, FFT no rank)
FOREIGN = {"lora": "num_B", "dora": "num_A", "pissa": "strategy", "fft": "r", "cola_fully": "balance_coef",
           "cola_random": "use_dora", "cola_heuristic": "expert_paths", "hydralora": "pairing",
           "mole": "use_dora", "chain_of_lora": "num_B", "lora_moe": "pairing", "mola": "expert_paths",
           "pissa_collapsed": "num_B", "moelora": "expert_paths"}


def test_every_method_option_names_the_schema_of_its_kind():
    for name in METHODS:
        method = C.typed(compose([f"method={name}"])).method
        assert type(method) is C.METHOD_SCHEMAS[method.kind], name


@pytest.mark.parametrize("method", METHODS)
def test_a_key_the_method_lacks_fails_at_compose_naming_it(method):
    key = FOREIGN[method]
    with pytest.raises(ConfigError, match=rf"^unknown key 'method\.{key}'; method \(kind \w+\) has: name, kind") as err:
        compose([f"method={method}", f"method.{key}=1"])
    assert "\n" not in str(err.value)


def _enum_fields(schema) -> list[tuple[str, type]]:
    hints = typing.get_type_hints(schema)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(schema)
            if isinstance(hints[f.name], type) and issubclass(hints[f.name], Enum)]


ENUM_CASES = [(m, key) for m in METHODS for key, _ in _enum_fields(type(C.typed(compose([f"method={m}"])).method))
              if key != "kind"]
ENUM_CASES += [(None, f"{group}.{key}") for group, schema in (("model", C.ModelConfig), ("data", C.DataConfig),
               ("trainer", C.TrainerConfig), ("logger", C.LoggerConfig)) for key, _ in _enum_fields(schema)]


@pytest.mark.parametrize("method,key", ENUM_CASES, ids=[f"{m or 'default'}:{k}" for m, k in ENUM_CASES])
def test_a_wrong_choice_fails_at_compose_naming_the_key_and_the_choices(method, key):
    key = key if "." in key else f"method.{key}"
    with pytest.raises(ConfigError) as err:
        compose(([f"method={method}"] if method else []) + [f"{key}=bogus"])
    message = str(err.value)
    assert message.startswith(f"{key}='bogus' is not one of "), message
    allowed = message.split(" is not one of ", 1)[1].split(", ")
    assert len(allowed) >= 2 and "bogus" not in allowed and "\n" not in message


def test_the_choices_are_those_the_docs_and_papers_name():
    """An independent list (README, docs/INIT.md, the papers): the enums say the same."""
    assert C.choices(C.Kind) == ("none", "peft", "cola", "hydralora", "mole", "mole_block", "mola", "moelora",
                                    "chain")
    assert C.choices(C.Strategy) == ("fully", "random", "heuristic")
    assert C.choices(C.Init) == ("lora", "pissa", "pissa_split") and C.choices(C.Svd) == ("lowrank", "exact")
    assert C.choices(C.Pairing) == ("paper", "code") and C.choices(C.Merge) == ("factors", "weights")
    assert C.choices(C.LinkWarmup) == ("scaled", "full") and C.choices(C.Precision) == ("auto", "bf16", "fp16", "fp32")
    from cola_train.adapters import spec

    assert spec.KINDS == ("none", "peft", "cola", "hydralora", "mole", "mole_block", "mola", "moelora") and spec.STRATEGIES == C.choices(C.Strategy)


def test_choices_read_as_text():
    """StrEnum values compare, hash and print as their text, so `kind == "peft"` keeps working."""
    cfg = compose(["method=lora"])
    assert cfg.method.kind == "peft" and f"{cfg.method.kind}" == "peft" and {"peft": 1}[cfg.method.kind] == 1
    assert OmegaConf.to_yaml(compose_node(["method=lora"])).count("kind: peft") == 1


# -- the chain's base comes from the defaults list ----------------------------------------------------

def test_chain_base_is_composed_by_hydra():
    cfg = compose(["method=chain_of_lora"])
    assert cfg.method.base.name == "lora" and cfg.method.base.kind == "peft"
    for spelling in ("method.base=cola_heuristic", "method@method.base=cola_heuristic"):
        base = compose(["method=chain_of_lora", spelling]).method.base
        assert (base.name, base.kind, base.strategy, base.num_B) == ("cola_heuristic", "cola", "heuristic", 3)
    typed = C.typed(compose(["method=chain_of_lora", "method.base=cola_heuristic"])).method
    assert isinstance(typed, C.ChainSchema) and isinstance(typed.base, C.ColaSchema)


def test_chain_base_keys_can_be_set_and_reach_the_adapter():
    """The base is a node of the config, so its own keys are overrides like any other (before,
    chain.py read conf/method/<base>.yaml from disk and nothing could change them)."""
    from cola_train import chain

    cfg = compose(["method=chain_of_lora", "method.base=cola_heuristic", "method.base.num_B=4",
                   "method.base.pairing=code", "method.r=4"])
    validate(cfg)
    base = chain.base_method(cfg.method)
    assert (base.kind, base.num_A, base.num_B, base.pairing, base.r) == ("cola", 2, 4, "code", 4)
    with pytest.raises(ConfigError, match=r"^unknown key 'method\.base\.num_B'; method\.base \(kind peft\)"):
        compose(["method=chain_of_lora", "method.base.num_B=4"])


# -- rules from the papers --------------------------------------------------------------------------

def test_pissa_init_with_a_routed_mixture_is_refused():
    """#23: with init=pissa every MoLE expert starts from the same SVD part; the gate and experts
    stay identical, so the combination is refused in one line naming it."""
    with pytest.raises(ConfigError, match=r"^method=lora_moe with method\.init=pissa is degenerate: .*use method\.init=lora$"):
        validate(compose(["method=lora_moe", "method.init=pissa"]))
    validate(compose(["method=lora_moe"]))                           # init=lora: fine
    validate(compose(["method=hydralora", "method.init=pissa"]))     # its router is not uniform
    validate(compose(["method=mole", "method.init=lora"]))


def test_a_chain_config_saved_with_the_base_as_a_name_still_loads():
    """Runs saved before the base was a node have `base: cola_heuristic` (eval/__main__ reloads them)."""
    from cola_train import chain

    saved = C.as_dict(compose(["method=chain_of_lora", "method.r=4"]))["method"]
    saved["base"] = "cola_heuristic"
    base = chain.base_method(saved)
    assert (base.kind, base.strategy, base.num_B, base.r) == ("cola", "heuristic", 3, 4)


def test_a_run_saved_in_the_old_layout_resumes_without_a_method_change():
    """Runs saved before #24 hold every method field (lora with num_B=1, strategy=fully ...) and a
    chain's base as a name: a resume or a re-run sweep must not see those as changes."""
    from cola_train.resume import differences

    old_union = dict(name="lora", kind="peft", r=8, alpha=16.0, dropout=0.05, target_modules=None, init="lora",
                     svd="lowrank", svd_niter=16, use_dora=False, strategy="fully", num_A=1, num_B=1, impl="fused",
                     pairing="paper", balance_coef=0.01, expert_paths=[], freeze_experts=False, base="lora", links=1,
                     link_fractions=None, rank_schedule=None, restart_lr=True, link_warmup="scaled", merge="factors")
    for overrides, method in ((["method=lora"], old_union),
                              (["method=chain_of_lora", "method.base=cola_heuristic"],
                               {**old_union, "name": "chain_of_lora", "kind": "chain", "base": "cola_heuristic",
                                "links": 3})):
        cfg = compose(overrides)
        saved = {**C.as_dict(cfg), "method": method}
        assert differences(saved, cfg) == {}, overrides
    cfg = compose(["method=lora"])
    saved = {**C.as_dict(cfg), "method": {**old_union, "num_B": 3}}
    assert differences(saved, cfg) == {"method.num_B": [3, "(absent)"]}


# -- the config is typed once, at the entry point ---------------------------------------------------

@pytest.mark.parametrize("method", ["fft", "lora", "cola_heuristic", "lora_moe", "mole", "chain_of_lora"])
def test_the_typed_config_reads_back_as_the_composed_node(method):
    """results.json, config.trained.yaml and resume's comparison get as_dict(typed config): the
    same plain data OmegaConf gives for Hydra's node, so records from before the typing compare."""
    import json

    node = compose_node([f"method={method}", "deepspeed=zero3"])
    expected = json.loads(json.dumps(OmegaConf.to_container(node, resolve=True), default=str))
    assert C.as_dict(C.typed(node)) == expected


def test_the_run_refuses_an_untyped_config():
    """Below the entry points (__main__'s job, check_values, compose.typed_config) the code takes
    the typed Config only: a DictConfig is a caller's bug, named, not silently converted again."""
    from cola_train.run import build_model, run

    node = compose_node(["model=tiny_llama"])
    for call in (lambda: validate(node), lambda: build_model(node), lambda: run(node, None), lambda: C.as_dict(node)):
        with pytest.raises(TypeError, match=r"takes the typed Config \(config\.typed\(cfg\) at the entry point\), got DictConfig"):
            call()
    typed = compose(["model=tiny_llama", "method=lora", "trainer.effective_batch=16", "trainer.batch_size=4"])
    assert isinstance(typed, C.Config) and isinstance(typed.method, C.PeftSchema)
    validate(typed)
    assert typed.trainer.grad_accum == 4   # derived on the object the run goes on with
