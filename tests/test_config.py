"""Every option of every group composes; a typo fails at compose time naming the key."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from cola_train.config import ConfigError, validate
from conftest import CONF, compose

GROUPS = ["model", "method", "data", "trainer", "deepspeed", "logger", "eval"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(group, option):
    cfg = compose([f"{group}={option}"])
    validate(cfg)
    assert OmegaConf.select(cfg, group) is not None


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
