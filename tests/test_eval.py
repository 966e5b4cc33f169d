"""Benchmarks and the option-fill scorer.

References here are written independently of cola_train.eval: a per-example loop with no
batching and no padding, fixture models whose right answers are known, and the row counts of
the real files.
"""
from __future__ import annotations

import os
import statistics
import string
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cola_train.config import EvalConfig
from cola_train.eval import (BENCHMARKS, DOMAIN_BENCHMARK, EvalDataError, evaluate_benchmark,
                             letter_logits, letter_tokens, load_benchmark, read_text_robust,
                             run_benchmark, select_subset)

REPO = Path(__file__).resolve().parent.parent
DATA_ROOT = Path(os.environ.get("COLA_DATA_ROOT") or REPO.parent / "shared" / "data")
LETTERS = string.ascii_uppercase


@pytest.fixture(scope="module")
def real_root() -> Path:
    if not (DATA_ROOT / "eval").is_dir():
        pytest.skip(f"real eval data not found at {DATA_ROOT / 'eval'} (set COLA_DATA_ROOT)")
    return DATA_ROOT


# ---------------------------------------------------------------------------------------------
# A tokenizer and models built offline

def space_letter_tokenizer():
    """Byte-level BPE whose only merges make " A" .. " Z" single tokens ("ĠA" ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merged = [f"Ġ{c}" for c in LETTERS]
    vocab = {t: i for i, t in enumerate(specials + alphabet + merged)}
    bpe = models.BPE(vocab=vocab, merges=[("Ġ", c) for c in LETTERS])
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


@pytest.fixture(scope="module")
def tok():
    t = space_letter_tokenizer()
    assert t.convert_ids_to_tokens(t(" A", add_special_tokens=False)["input_ids"]) == ["ĠA"]
    return t


def tiny_gpt2(vocab_size: int, seed: int = 0):
    """Learned absolute positions: left padding is only right if position ids start at each
    row's first real token (RoPE in Llama is shift-invariant and would not notice)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4,
                                      n_positions=1024))


def tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024)
    return LlamaForCausalLM(cfg)


def synthetic_examples(n: int = 23) -> list[dict]:
    """Prompts of very different lengths and option counts, over three subjects."""
    out = []
    for i in range(n):
        n_opt = 2 + i % 5
        out.append({"subject": ["alpha", "beta", "gamma_delta"][i % 3],
                    "question": f"Question {i}: " + "lorem ipsum " * (i * 7 % 19),
                    "options": [f"opt{i}-{k}" + "x" * (k * i % 4) for k in range(n_opt)],
                    "answer": LETTERS[(i * 5) % n_opt], "source": f"synthetic:{i}"})
    return out


def reference_prompt(ex: dict) -> str:
    """The documented prompt format, written out independently of build_prompt."""
    text = ("The following are multiple choice questions (with answers) about "
            + ex["subject"].replace("_", " ") + ".\n\n" + ex["question"] + "\n")
    for letter, option in zip(LETTERS, ex["options"]):
        text += f"{letter}. {option}\n"
    return text + "Answer:"


def brute_force(model, ids_of_prompt, letter_ids, examples):
    """One example at a time, no padding, no mask: logits of the option letters."""
    model.eval()
    out = []
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ids_of_prompt(ex)])
            logits = model(input_ids=ids).logits[0, -1]
            out.append([logits[letter_ids[k]].item() for k in range(len(ex["options"]))])
    return out


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_batched_scorer_equals_per_example_loop(tok, build):
    examples = synthetic_examples()
    model = build(len(tok))
    letter_ids = [tok.convert_tokens_to_ids(f"Ġ{c}") for c in LETTERS]
    ids_of_prompt = lambda ex: tok(reference_prompt(ex))["input_ids"]
    lengths = {len(ids_of_prompt(ex)) for ex in examples}
    assert max(lengths) - min(lengths) > 50          # left padding has real work to do

    expected = brute_force(model, ids_of_prompt, letter_ids, examples)
    model.train()
    got, truncated = letter_logits(model, tok, examples, batch_size=8)
    assert model.training                            # training mode restored
    assert truncated == 0
    for e, g in zip(expected, got):
        assert len(e) == len(g)
        assert torch.allclose(torch.tensor(g), torch.tensor(e), atol=1e-4), (e, g)

    preds = [LETTERS[max(range(len(s)), key=s.__getitem__)] for s in expected]
    correct = [p == ex["answer"] for p, ex in zip(preds, examples)]
    result = evaluate_benchmark(model, tok, examples, batch_size=5)
    assert result["n_examples"] == len(examples)
    assert result["accuracy"] == pytest.approx(sum(correct) / len(examples))
    by_subject = {}
    for ok, ex in zip(correct, examples):
        by_subject.setdefault(ex["subject"], []).append(ok)
    assert result["macro_accuracy"] == pytest.approx(
        statistics.mean(sum(v) / len(v) for v in by_subject.values()))
    for subject, oks in by_subject.items():
        assert result["per_subject"][subject]["n"] == len(oks)
        assert result["per_subject"][subject]["accuracy"] == pytest.approx(sum(oks) / len(oks))


def test_scorer_with_split_space_tokenizer():
    """A byte tokenizer encodes " A" as [" ", "A"]: the space is appended to the prompt and
    the letter token after it is scored."""
    models = pytest.importorskip("cola_train.models")
    if not hasattr(models, "byte_tokenizer"):
        pytest.skip("cola_train.models.byte_tokenizer not available")
    btok = models.byte_tokenizer()
    space = btok.convert_tokens_to_ids("Ġ")
    prefix, ids = letter_tokens(btok, 4)
    assert prefix == [space]
    assert ids == btok.convert_tokens_to_ids(list("ABCD"))

    examples = synthetic_examples(9)
    model = tiny_llama(len(btok), seed=1)
    expected = brute_force(model, lambda ex: btok(reference_prompt(ex) + " ")["input_ids"],
                           btok.convert_tokens_to_ids(list(LETTERS)), examples)
    got, _ = letter_logits(model, btok, examples, batch_size=4)
    for e, g in zip(expected, got):
        assert torch.allclose(torch.tensor(g), torch.tensor(e), atol=1e-4)


class LookupModel(nn.Module):
    """Logits from a table: the real (unmasked) tokens of a row -> scores per token id."""

    def __init__(self, vocab_size, table, default):
        super().__init__()
        self.vocab_size, self.table, self.default = vocab_size, table, default

    def forward(self, input_ids, attention_mask=None, **kwargs):
        batch, width = input_ids.shape
        logits = torch.zeros(batch, width, self.vocab_size)
        for row in range(batch):
            real = input_ids[row][attention_mask[row].bool()].tolist()
            for token_id, score in self.table.get(tuple(real), self.default).items():
                logits[row, -1, token_id] = score
        return SimpleNamespace(logits=logits)


def test_gold_model_scores_100_and_always_a_scores_share_of_a(tok):
    examples = synthetic_examples(31)
    ids = {c: tok.convert_tokens_to_ids(f"Ġ{c}") for c in LETTERS}
    key = lambda ex: tuple(tok(reference_prompt(ex))["input_ids"])

    gold = LookupModel(len(tok), {key(ex): {ids[ex["answer"]]: 5.0} for ex in examples}, {})
    result = evaluate_benchmark(gold, tok, examples, batch_size=4)
    assert result["accuracy"] == 1.0 and result["macro_accuracy"] == 1.0

    # "Z" scores highest but is never an option here, so the prediction must fall to "A".
    always_a = LookupModel(len(tok), {}, {ids["Z"]: 9.0, ids["A"]: 3.0, ids["B"]: 1.0})
    always_a.train()
    result = evaluate_benchmark(always_a, tok, examples, batch_size=4, return_predictions=True)
    assert always_a.training
    share = sum(ex["answer"] == "A" for ex in examples) / len(examples)
    assert 0 < share < 1
    assert result["accuracy"] == pytest.approx(share)
    assert {p["prediction"] for p in result["predictions"]} == {"A"}
    subjects = {ex["subject"] for ex in examples}
    macro = statistics.mean(
        statistics.mean(ex["answer"] == "A" for ex in examples if ex["subject"] == s)
        for s in subjects)
    assert result["macro_accuracy"] == pytest.approx(macro)


def test_select_subset_round_robin():
    examples = [{"subject": s, "i": i} for s, n in (("a", 5), ("b", 1), ("c", 3))
                for i in range(n)]
    chosen = select_subset(examples, 6)
    assert [(e["subject"], e["i"]) for e in chosen] == [
        ("a", 0), ("b", 0), ("c", 0), ("a", 1), ("c", 1), ("a", 2)]
    assert select_subset(examples, 6) == chosen
    assert len(select_subset(examples, None)) == 9
    assert len(select_subset(examples, 100)) == 9


# ---------------------------------------------------------------------------------------------
# Synthetic CSV files: bad rows, unknown names, missing files, encodings

def _write(path: Path, text: str, encoding="utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)


def test_bad_rows_raise_or_are_skipped(tmp_path):
    bbh = tmp_path / "eval" / "bbh" / "test"
    _write(bbh / "task.csv",
           "id,question,A,B,C,answer\n"
           "0,good one,x,y,,B\n"                    # 2 options (trailing empty): fine
           "1,hole,x,,z,A\n"                        # empty option before a filled one
           "2,out of range,x,y,,C\n"                # C is not an option of this row
           "3,short row,x,y\n"                      # missing field
           "4,good two,x,y,z,C\n")
    with pytest.raises(EvalDataError) as err:
        load_benchmark("bbh", tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert str(bbh / "task.csv") + ":3" in message and "option B is empty" in message

    examples = load_benchmark("bbh", tmp_path, skip_bad_rows=True)
    assert [e["question"] for e in examples] == ["good one", "good two"]
    assert examples[0]["options"] == ["x", "y"] and examples[1]["answer"] == "C"
    assert examples.n_skipped == 3
    assert [s.split(": ")[0] for s in examples.skipped] == [
        "bbh/test/task.csv:3", "bbh/test/task.csv:4", "bbh/test/task.csv:5"]
    assert "answer 'C' is not one of the options A-B" in examples.skipped[1]
    assert examples[1]["source"] == "bbh/test/task.csv:6"

    # MMLU: no header; an empty option in a 4-option benchmark is a missing option
    _write(tmp_path / "eval" / "mmlu" / "test" / "s_test.csv",
           'q1,a,b,c,d,D\n"q2, with comma",a,b,c,,A\nq3,a,b,c,d,E\n')
    with pytest.raises(EvalDataError, match=r"s_test\.csv:2: option D is empty"):
        load_benchmark("mmlu", tmp_path)
    examples = load_benchmark("mmlu", tmp_path, skip_bad_rows=True)
    assert len(examples) == 1 and examples.n_skipped == 2
    assert examples[0] == {"subject": "s", "question": "q1", "options": ["a", "b", "c", "d"],
                           "answer": "D", "source": "mmlu/test/s_test.csv:1"}


def test_unknown_names_and_missing_files(tmp_path):
    with pytest.raises(EvalDataError, match="unknown benchmark 'mmlu_pro'; allowed: mmlu, "
                                            "mmlu_law, mmlu_medicine, gsm8k, fineval, bbh"):
        load_benchmark("mmlu_pro", tmp_path)
    with pytest.raises(EvalDataError, match=r"no benchmark for domain 'poetry'.*generality"):
        run_benchmark(None, None, EvalConfig(), "poetry", tmp_path)
    with pytest.raises(EvalDataError, match="does not exist"):
        load_benchmark("gsm8k", tmp_path)
    with pytest.raises(EvalDataError, match="no data root"):
        load_benchmark("gsm8k", None)
    (tmp_path / "eval" / "gsm8k").mkdir(parents=True)
    with pytest.raises(EvalDataError, match="benchmark file missing: .*gsm8k_test.csv"):
        load_benchmark("gsm8k", tmp_path)
    _write(tmp_path / "eval" / "fineval" / "mapping.json",
           '{"tax": {"name": "tax", "category": "Other"}, "audit": {"name": "a"}}')
    _write(tmp_path / "eval" / "fineval" / "test" / "audit.csv", "question,A,B,answer\nq,x,y,A\n")
    with pytest.raises(EvalDataError, match="unknown subject.*'law'.*allowed: audit, tax"):
        load_benchmark("fineval", tmp_path, subjects=["law"])
    assert len(load_benchmark("fineval", tmp_path, subjects=["audit"])) == 1
    with pytest.raises(EvalDataError, match=r"benchmark file missing: .*tax\.csv"):
        load_benchmark("fineval", tmp_path)


def test_robust_decoding(tmp_path):
    damaged = tmp_path / "damaged.csv"   # UTF-8 whose 3-byte dash lost its last byte
    damaged.write_bytes("Größe ".encode() + b"76\xe2\x80?2 " + "Straße".encode())
    text, encoding = read_text_robust(damaged)
    assert text == "Größe 76\ufffd?2 Straße" and encoding.startswith("utf-8")
    legacy = tmp_path / "legacy.csv"
    legacy.write_bytes("café “quoted”".encode("cp1252"))
    assert read_text_robust(legacy) == ("café “quoted”", "cp1252")
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbfquestion")
    assert read_text_robust(bom) == ("question", "utf-8")


# ---------------------------------------------------------------------------------------------
# The real files

# README counts vs what the files hold. MMLU: the README's 13,985 (dev 228) is 57 short, one
# row per file: it was counted as if each CSV had a header row, but MMLU files have none; the
# files hold the standard MMLU test set of 14,042 rows (dev 285 = 57 x 5).
REAL_ROWS = {"mmlu": 13_985 + 57, "gsm8k": 1_319, "fineval": 265, "bbh": 6_509}
# Rows that are genuinely bad: an empty distractor (a missing option) in gsm8k's 4-option
# form; in BBH three object_counting rows with an empty option A, a movie_recommendation row
# whose unquoted "Monsters, Inc" shifted the answer column (answer 'o'), and a snarks row
# with a single option.
REAL_SKIPPED = {
    "mmlu": [], "fineval": [],
    "gsm8k": [f"gsm8k/gsm8k_test.csv:{r}" for r in
              (141, 195, 276, 430, 529, 617, 685, 746, 871, 926, 1141, 1147, 1150, 1218)],
    "bbh": ["bbh/test/movie_recommendation.csv:165", "bbh/test/object_counting.csv:14",
            "bbh/test/object_counting.csv:18", "bbh/test/object_counting.csv:228",
            "bbh/test/snarks.csv:90"],
}
N_SUBJECTS = {"mmlu": 57, "gsm8k": 1, "fineval": 32, "bbh": 27}


@pytest.mark.parametrize("name", ["mmlu", "gsm8k", "fineval", "bbh"])
def test_every_real_file_parses(real_root, name):
    examples = load_benchmark(name, real_root, skip_bad_rows=True)
    assert [s.split(": ")[0] for s in examples.skipped] == REAL_SKIPPED[name]
    assert len(examples) + examples.n_skipped == REAL_ROWS[name]
    assert len({e["subject"] for e in examples}) == N_SUBJECTS[name]
    for e in examples:
        assert e["question"] and all(e["options"])
        assert e["answer"] in LETTERS[:len(e["options"])]
    if REAL_SKIPPED[name]:
        with pytest.raises(EvalDataError, match="skip_bad_rows"):
            load_benchmark(name, real_root)
    else:
        assert len(load_benchmark(name, real_root)) == REAL_ROWS[name]


def test_real_data_mess(real_root):
    bbh = load_benchmark("bbh", real_root, skip_bad_rows=True)
    counts = {}
    for e in bbh:
        counts.setdefault(e["subject"], set()).add(len(e["options"]))
    assert counts["boolean_expressions"] == {2}
    assert counts["reasoning_about_colored_objects"] == {2, 7, 17, 18}
    assert counts["geometric_shapes"] == {10, 11}
    salient = [e for e in bbh if e["subject"] == "salient_translation_error_detection"]
    assert len(salient) == 250
    assert any("ä" in e["question"] for e in salient)              # decoded as UTF-8
    assert sum(e["question"].count("\ufffd") for e in salient) > 0  # broken bytes marked
    gsm = load_benchmark("gsm8k", real_root, skip_bad_rows=True)
    assert not any("â€" in e["question"] for e in gsm)              # no cp1252 mojibake
    assert len(load_benchmark("mmlu", real_root, subjects=["anatomy"])) == 135
    fineval = load_benchmark("fineval", real_root)
    assert not any(k.startswith("\ufeff") for e in fineval for k in e)


def test_law_and_medicine_groups_come_from_mapping(real_root):
    law = load_benchmark("mmlu_law", real_root)
    medicine = load_benchmark("mmlu_medicine", real_root)
    assert sorted({e["subject"] for e in law}) == [
        "international_law", "jurisprudence", "professional_law"]
    # mapping.json's "Medicine" category; its key "Medicine_genetics" is the file medical_genetics
    assert sorted({e["subject"] for e in medicine}) == [
        "anatomy", "clinical_knowledge", "college_medicine", "human_aging", "human_sexuality",
        "medical_genetics", "professional_medicine", "virology"]
    assert (len(law), len(medicine)) == (1763, 1465)
    with pytest.raises(EvalDataError, match="unknown subject.*'anatomy'.*international_law"):
        load_benchmark("mmlu_law", real_root, subjects=["anatomy"])
    assert set(DOMAIN_BENCHMARK.values()) == set(BENCHMARKS)


def test_run_benchmark_on_real_data(real_root, tok):
    model = tiny_llama(len(tok))
    cfg = EvalConfig(max_examples=30, batch_size=8, skip_bad_rows=True)
    result = run_benchmark(model, tok, cfg, "multitask", real_root)
    assert result["name"] == "bbh" and result["n_examples"] == 30
    assert result["n_skipped"] == 5
    assert len(result["per_subject"]) == 27                  # spread over every task
    assert 0.0 <= result["accuracy"] <= 1.0

    cfg = EvalConfig(benchmark="mmlu", subjects=["anatomy", "virology"], max_examples=10)
    result = run_benchmark(model, tok, cfg, "math", real_root)
    assert result["name"] == "mmlu"
    assert {k: v["n"] for k, v in result["per_subject"].items()} == {"anatomy": 5, "virology": 5}

    with pytest.raises(EvalDataError, match=r"gsm8k_test\.csv:141.*skip_bad_rows"):
        run_benchmark(model, tok, EvalConfig(), "math", real_root)


def test_adapter_wrapped_model_gets_position_ids(tok):
    """run.py scores the model still wrapped in PEFT: position ids must reach the base model."""
    peft = pytest.importorskip("peft")
    base = tiny_gpt2(len(tok), seed=2)
    config = peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True,
                             init_lora_weights=False)  # random B: the adapter changes outputs
    model = peft.get_peft_model(base, config)
    examples = synthetic_examples(12)
    letter_ids = [tok.convert_tokens_to_ids(f"Ġ{c}") for c in LETTERS]
    expected = brute_force(model, lambda ex: tok(reference_prompt(ex))["input_ids"], letter_ids,
                           examples)
    got, _ = letter_logits(model, tok, examples, batch_size=6)
    for e, g in zip(expected, got):
        assert torch.allclose(torch.tensor(g), torch.tensor(e), atol=1e-4)
