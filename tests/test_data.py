"""Data: real files load, sampling is deterministic and disjoint, prompts are masked."""
from __future__ import annotations

import json

import pytest

from cola_train.config import ConfigError, DataConfig, DataSource
from cola_train.data import DataError, load_domain_records, split_train_val
from cola_train.data.template import IGNORE, encode
from cola_train.models import byte_tokenizer


def _cfg(root, **kw):
    src = kw.pop("sources", [DataSource(name="gsm8k", file="train/gsm8k_train.json")])
    return DataConfig(root=str(root), sources=src, **kw)


def test_real_domains_load(data_root):
    for f, n in [("gsm8k_train.json", 7475), ("GenMedGPT-5k.json", 5452), ("fineval_train-en.json", 1056)]:
        recs = load_domain_records(_cfg(data_root, sources=[DataSource(name=f, file=f"train/{f}")]))
        assert len(recs) == n and set(recs[0]) == {"instruction", "input", "output"}


def test_sampling_is_deterministic_disjoint_and_sized(data_root):
    recs = load_domain_records(_cfg(data_root))
    cfg = _cfg(data_root, max_samples=100)
    a_train, a_val = split_train_val(recs, cfg, seed=1)
    b_train, b_val = split_train_val(recs, cfg, seed=1)
    c_train, c_val = split_train_val(recs, cfg, seed=2)
    assert a_train == b_train and len(a_train) == 100
    assert a_val == c_val and len(a_val) == 200          # same held-out set for every seed
    assert a_train != c_train
    key = lambda r: (r["instruction"], r["input"], r["output"])
    assert not {key(r) for r in a_train} & {key(r) for r in a_val}
    frac_train, _ = split_train_val(recs, _cfg(data_root, fraction=0.1, max_samples=None), seed=1)
    assert len(frac_train) == int(0.1 * (len(recs) - 200))


def test_fraction_outside_range_is_rejected(data_root):
    recs = load_domain_records(_cfg(data_root))
    with pytest.raises(ConfigError, match=r"data.fraction=1.5 is outside \(0, 1\]"):
        split_train_val(recs, _cfg(data_root, fraction=1.5), seed=1)


def test_missing_source_names_file_root_and_hub(tmp_path):
    cfg = _cfg(tmp_path, sources=[DataSource(name="us_terms", file="train/us_terms.json",
                                             hub_id="someone/us_terms")])
    with pytest.raises(DataError, match=r"'us_terms' is missing: looked for .*train/us_terms.json; hub id someone/us_terms"):
        load_domain_records(cfg)


def test_skip_missing_keeps_the_sources_present(data_root):
    cfg = _cfg(data_root, skip_missing=True, sources=[
        DataSource(name="iCliniq", file="train/iCliniq.json"),
        DataSource(name="GenMedGPT-5k", file="train/GenMedGPT-5k.json")])
    assert len(load_domain_records(cfg)) == 5452
    cfg.skip_missing = False
    with pytest.raises(DataError, match="iCliniq"):
        load_domain_records(cfg)


@pytest.mark.parametrize("rows,message", [
    ([{"instruction": "a", "output": "b"}, {"instruction": "a"}], r"bad.json row 1: needs a non-empty 'output'"),
    ([{"instruction": "a", "output": 3}], r"bad.json row 0: 'output' must be a string, got int"),
    (["just a string"], r"bad.json row 0: expected an object"),
])
def test_malformed_rows_name_file_and_row(tmp_path, rows, message):
    (tmp_path / "bad.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=message):
        load_domain_records(_cfg(tmp_path, sources=[DataSource(name="bad", file="bad.json")]))


def test_prompt_tokens_are_masked_and_response_kept():
    tok = byte_tokenizer()
    rec = {"instruction": "Add.", "input": "2+2", "output": "4"}
    ex = encode(tok, rec, "plain", 512)
    n_masked = sum(1 for l in ex["labels"] if l == IGNORE)
    assert ex["labels"][n_masked:] == ex["input_ids"][n_masked:]
    assert tok.decode(ex["input_ids"][n_masked:], skip_special_tokens=True) == "4"
    assert ex["input_ids"][-1] == tok.eos_token_id
    short = encode(tok, {**rec, "input": "x" * 400}, "plain", 64)
    assert len(short["input_ids"]) == 64 and short["labels"][-1] == tok.eos_token_id
