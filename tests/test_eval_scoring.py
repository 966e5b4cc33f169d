"""eval.chat_template and eval.scoring=cloze, against references written here from the documented
formats (never from cola_train.eval's own prompt or scoring code): hand-built prompt strings and
a per-token float64 loop over the model's logits."""
from __future__ import annotations

import math
import string

import pytest
import torch

from cola_train.config import ConfigError, scoring_list
from cola_train.eval import EvalDataError, cloze_scores, evaluate_benchmark, letter_logits
from test_eval import reference_prompt, space_letter_tokenizer, tiny_gpt2, tiny_llama

LETTERS = string.ascii_uppercase
# a tiny chat template: <|user|>TEXT<|end|> then the generation prompt <|assistant|>
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def chat_tok():
    tok = space_letter_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def examples():
    """Options of very different lengths, so length normalisation changes some predictions."""
    rows = [("What is two plus two?", ["four", "a very long and wordy wrong answer", "5"], "A"),
            ("Colour of the sky?", ["blue", "green"], "A"),
            ("Pick one", ["x", "yy", "zzz", "the longest option of them all"], "D"),
            ("Capital of France", ["Paris", "Lyon", "Marseille"], "A")]
    return [{"subject": "misc_things", "question": q, "options": o, "answer": a, "source": f"t:{i}"}
            for i, (q, o, a) in enumerate(rows)]


# -- chat template ----------------------------------------------------------------------------------
def test_chat_template_letter_scoring_matches_the_hand_built_chat_prompt():
    """The whole question + options + "Answer:" text is the user turn; the letter is the first
    token after the generation prompt, with no space (LLaMA-Factory's evaluator)."""
    tok = chat_tok()
    exs = examples()
    model = tiny_gpt2(len(tok))
    letter_ids = [tok(c, add_special_tokens=False)["input_ids"][-1] for c in LETTERS]
    expected = []
    with torch.no_grad():
        for ex in exs:
            text = "<|user|>" + reference_prompt(ex) + "<|end|><|assistant|>"
            ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
            last = model.eval()(input_ids=ids).logits[0, -1]
            expected.append([last[letter_ids[k]].item() for k in range(len(ex["options"]))])
    got, truncated = letter_logits(model, tok, exs, batch_size=3, chat_template=True)
    assert truncated == 0
    for e, g in zip(expected, got):
        torch.testing.assert_close(torch.tensor(g), torch.tensor(e), atol=1e-5, rtol=1e-5)
    plain, _ = letter_logits(model, tok, exs, batch_size=3, chat_template=False)
    assert not torch.allclose(torch.tensor(plain[0]), torch.tensor(got[0]))   # the option changes the prompt


def test_chat_template_without_a_template_is_one_line_error():
    with pytest.raises(EvalDataError, match=r"eval.chat_template=true but the tokenizer .* has no chat template"):
        letter_logits(tiny_gpt2(300), space_letter_tokenizer(), examples(), chat_template=True)


@pytest.mark.slow
def test_chat_prompt_of_the_embedded_smollm2_tokenizer():
    """SmolLM2-Instruct's own template (ChatML with its default system turn), written out by hand."""
    from cola_train.compose import compose
    from cola_train.eval import chat_prompt, letter_tokens
    from cola_train.models import load_tokenizer

    tok = load_tokenizer(compose(["model=smollm2_135m"]).model)
    ex = examples()[0]
    expected = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                "<|im_end|>\n<|im_start|>user\n" + reference_prompt(ex) + "<|im_end|>\n<|im_start|>assistant\n")
    from cola_train.eval import build_prompt

    assert chat_prompt(tok, build_prompt(ex)) == expected
    prefix, ids = letter_tokens(tok, 4, chat_template=True)
    assert prefix == [] and tok.convert_ids_to_tokens(ids) == ["A", "B", "C", "D"]


# -- cloze ------------------------------------------------------------------------------------------
def cloze_reference(model, tok, exs, chat=False):
    """Per option: log p(option tokens | prompt) summed token by token in float64, from one
    unpadded forward each; the prediction is argmax of ll / len(option) (lm-eval's acc_norm)."""
    out = []
    model.eval()
    for ex in exs:
        prompt = ("The following are questions (with answers) about " + ex["subject"].replace("_", " ")
                  + ".\n\n" + ex["question"] + "\nAnswer:")
        lls = []
        for option in ex["options"]:
            if chat:
                context = "<|user|>" + prompt + "<|end|><|assistant|>"
                full = tok(context + option, add_special_tokens=False)["input_ids"]
                ctx = tok(context, add_special_tokens=False)["input_ids"]
            else:
                full = tok(prompt + " " + option)["input_ids"]
                ctx = tok(prompt)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([full])).logits[0].double()
            ll = 0.0
            for t in range(len(ctx), len(full)):
                row = logits[t - 1]
                ll += float(row[full[t]] - torch.logsumexp(row, dim=0))
            lls.append(ll)
        out.append(lls)
    return out


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_cloze_matches_a_per_token_loop(build, chat):
    tok = chat_tok()
    exs = examples()
    model = build(len(tok), seed=3)
    ref = cloze_reference(model, tok, exs, chat)
    norm, raw, truncated = cloze_scores(model, tok, exs, batch_size=4, chat_template=chat)
    assert truncated == 0
    for r, g, n, ex in zip(ref, raw, norm, exs):
        assert g == pytest.approx(r, abs=1e-4)
        assert n == pytest.approx([ll / len(o) for ll, o in zip(r, ex["options"])], abs=1e-5)
    preds = [LETTERS[max(range(len(r)), key=lambda k: r[k] / len(ex["options"][k]))] for r, ex in zip(ref, exs)]
    expected_acc = sum(p == ex["answer"] for p, ex in zip(preds, exs)) / len(exs)
    result = evaluate_benchmark(model, tok, exs, batch_size=2, scoring=["cloze"], chat_template=chat)
    assert result["accuracy"] == pytest.approx(expected_acc)
    assert result["scoring"] == ["cloze"] and result["by_scoring"]["cloze"]["accuracy"] == result["accuracy"]


def test_length_normalisation_decides_against_the_raw_sum():
    """A model that puts the same log-probability on every token: the raw sum prefers the shortest
    option, the normalised score (per character) does not."""
    tok = space_letter_tokenizer()

    class Flat(torch.nn.Module):
        training = False

        def forward(self, input_ids, attention_mask=None, **kwargs):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, len(tok))})()

    exs = [{"subject": "s", "question": "q", "options": ["aaaaaaaa", "b"], "answer": "A", "source": "t:0"}]
    norm, raw, _ = cloze_scores(Flat(), tok, exs, max_length=64)
    per_token = -math.log(len(tok))
    assert raw[0] == pytest.approx([9 * per_token, 2 * per_token])          # " aaaaaaaa" / " b" in bytes
    assert norm[0] == pytest.approx([9 * per_token / 8, 2 * per_token / 1])
    assert norm[0][0] > norm[0][1] and raw[0][0] < raw[0][1]


def test_both_scorings_are_reported_and_the_default_output_is_unchanged():
    tok = space_letter_tokenizer()
    exs = examples()
    model = tiny_llama(len(tok), seed=1)
    default = evaluate_benchmark(model, tok, exs)
    assert set(default) == {"accuracy", "macro_accuracy", "per_subject", "n_examples", "n_skipped", "n_truncated"}
    both = evaluate_benchmark(model, tok, exs, scoring=["letter", "cloze"])
    assert both["scoring"] == ["letter", "cloze"] and set(both["by_scoring"]) == {"letter", "cloze"}
    assert both["accuracy"] == default["accuracy"] == both["by_scoring"]["letter"]["accuracy"]
    cloze_only = evaluate_benchmark(model, tok, exs, scoring="cloze")
    assert both["by_scoring"]["cloze"]["accuracy"] == cloze_only["accuracy"]


def test_summary_line_shows_each_scoring(tmp_path):
    from cola_train.run import summary_line

    results = {"eval": {"loss_before": None, "loss": 1.0}, "train": {"tokens_per_s": 10.0},
               "n_train_samples": 8,
               "config": {"method": {"name": "lora"}, "data": {"domain": "math"}, "model": {"name": "m"}, "seed": 1},
               "benchmark": {"name": "gsm8k", "accuracy": 0.25, "n_examples": 4, "scoring": ["letter", "cloze"],
                             "by_scoring": {"letter": {"accuracy": 0.25}, "cloze": {"accuracy": 0.5}}}}
    assert "gsm8k letter accuracy 0.2500, cloze 0.5000 (4 questions)" in summary_line(results, tmp_path)


@pytest.mark.parametrize("value,names", [("cloze", ["cloze"]), (["letter", "cloze"], ["letter", "cloze"])])
def test_scoring_values(value, names):
    assert scoring_list(value) == names


@pytest.mark.parametrize("value", ["clozee", [], ["letter", "letter"], ["letter", "mc"]])
def test_bad_scoring_is_one_line(value):
    with pytest.raises(ConfigError, match=r"eval.scoring=.* must be one or more distinct of letter, cloze"):
        scoring_list(value)


def test_chat_template_without_a_template_stops_the_cli_before_training(tmp_path):
    """tiny_llama's byte tokenizer has no chat template: one line, exit 2, before any step."""
    from conftest import TINY, run_cli

    args = [a for a in TINY if a != "eval=none"] + ["eval.chat_template=true", f"hydra.run.dir={tmp_path}"]
    proc = run_cli(args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: eval.chat_template=true but the tokenizer ") and \
        lines[0].endswith(" has no chat template; set eval.chat_template=false or model.tokenizer to one "
                          "that has a template"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists() or (tmp_path / "metrics.jsonl").read_text() == ""
