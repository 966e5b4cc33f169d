"""Golden loss curves (scripts/golden_curves.py): every method's first 8 training losses on
tiny_llama must match tests/golden/curves.json to 1e-6 relative.

The JSON was written by the code before the adapter refactor (issue #24), so it is a reference
independent of the code under test: a changed scaling, pairing, init, router, dropout stream or
chain commit moves a curve. Regenerate it (`scripts/golden_curves.py --write`) only for an
intended change of the maths, and say so in the commit.
"""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import load_script

golden = load_script("golden_curves")
PINNED = json.loads(golden.GOLDEN.read_text())


@pytest.fixture(scope="module")
def curves():
    return golden.all_curves()   # every method in one process: one model build per method


def test_every_method_is_pinned():
    assert sorted(PINNED["curves"]) == sorted(golden.METHODS)
    assert (PINNED["steps"], PINNED["seed"], PINNED["lr"]) == (golden.STEPS, golden.SEED, golden.LR)


@pytest.mark.parametrize("name", sorted(golden.METHODS))
def test_curve_matches_golden(curves, name):
    got, want = curves[name], PINNED["curves"][name]
    assert len(got) == len(want) == golden.STEPS
    assert golden.max_rel_error(got, want) <= 1e-6, (name, got, want)


def test_pinned_curves_tell_methods_apart():
    """Each pinned curve differs from every other by far more than the tolerance, so a method
    silently computing another's update (a lost pairing rule, a dropped router) fails."""
    items = sorted(PINNED["curves"].items())
    for i, (a, ca) in enumerate(items):
        for b, cb in items[i + 1:]:
            assert golden.max_rel_error(ca, cb) > 1e-4, (a, b)


# -- adapters saved by the code before the refactor ------------------------------------------------
saved = load_script("golden_adapters")


@pytest.mark.parametrize("name", sorted(saved.METHODS))
def test_adapter_saved_by_the_old_code_loads(name, tmp_path):
    """tests/golden/adapters_v1 was written by the code before the one-layer refactor (commit
    4327780, scripts/golden_adapters.py --write; git keeps its tensors as text, tensors.json,
    and `materialize` checks each rebuilt .safetensors against the old file's sha256): tensor
    names, residual base, committed links, routers and PEFT records load, and the loaded model
    computes the loss and logits the saving model did (losses.json, logits.json)."""
    wrong = saved.mismatch(name, *saved.load(name, saved.materialize(name, tmp_path)))
    assert wrong is None, f"{name}: {wrong}"


@pytest.mark.parametrize("name,file_name", [("pissa", "adapter_model.safetensors"),
                                            ("pissa", "cola_peft_record.safetensors"),
                                            ("chain_cola_heuristic", "cola_adapter.safetensors")])
def test_a_loader_that_loses_a_saved_tensor_fails_the_check(name, file_name, tmp_path):
    """The check above has teeth: with any one tensor of an old file dropped, or renamed (what a
    loader that skipped or misnamed it would see), loading fails or the logits move. (Every
    tensor of every fixture: checked once by hand, too slow for CI; these three files hold the
    PEFT adapter, PEFT's PiSSA record, and our layers with residual base and committed links.)"""
    from safetensors.torch import load_file, save_file

    from cola_train.adapters import AdapterError

    directory = saved.materialize(name, tmp_path / "fixture")
    tensors = load_file(str(directory / file_name))
    for i, key in enumerate(sorted(tensors)):
        out = tmp_path / str(i) / name
        shutil.copytree(directory, out)
        lost = dict(tensors)
        value = lost.pop(key)
        if i % 2:   # a renamed tensor every other time: as lost to the layer as a dropped one
            lost[key.replace(".", "._", 1)] = value
        save_file(lost, str(out / file_name), metadata={"format": "pt"})
        try:
            loss, logits = saved.load(name, out)
        except (AdapterError, KeyError, RuntimeError, ValueError):
            continue
        assert saved.mismatch(name, loss, logits) is not None, f"{name}: loaded without {key} unnoticed"
