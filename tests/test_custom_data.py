"""Own data (data=custom, cola_train/data/custom.py): formats, bad records by file:line, records
past cutoff_len, loss on assistant turns only, and the CLI path (preflight, sampling, benchmark)."""
from __future__ import annotations

import json
import logging
import re

import pytest

from cola_train.config import ConfigError, DataConfig
from cola_train.data import DataError, load_domain_records, tokenize_records
from cola_train.data.template import IGNORE, encode, encode_messages
from cola_train.models import byte_tokenizer

from conftest import compose, run_cli

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And doubled?"},
        {"role": "assistant", "content": "It is 8."}]
# a ChatML template (the one SmolLM2 and Qwen use, without their default system prompt)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _cfg(path, **kw) -> DataConfig:
    return DataConfig(domain="custom", path=str(path), **kw)


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ----------------------------------------------------------------------------------------------
# formats


def test_each_format_is_detected_and_read(tmp_path):
    alpaca = {"instruction": "Add.", "input": "2+2", "output": "4"}
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
                "system": "Be kind."}
    text = {"text": "Once upon a time."}
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.json").write_text(json.dumps([alpaca, alpaca], indent=2))  # a JSON list
    _jsonl(tmp_path / "d" / "b.jsonl", [sharegpt])
    _jsonl(tmp_path / "d" / "c.jsonl", [{"messages": CHAT}])
    _jsonl(tmp_path / "d" / "d.jsonl", [text])
    (tmp_path / "d" / "notes.txt").write_text("not data")
    recs = load_domain_records(_cfg(tmp_path / "d"))
    assert [r["where"] for r in recs] == [f"{tmp_path}/d/a.json:2", f"{tmp_path}/d/a.json:7",
                                          f"{tmp_path}/d/b.jsonl:1", f"{tmp_path}/d/c.jsonl:1",
                                          f"{tmp_path}/d/d.jsonl:1"]
    assert recs[0]["messages"] == [{"role": "user", "content": "Add.\n\n2+2"}, {"role": "assistant", "content": "4"}]
    assert recs[2]["messages"] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                                   {"role": "assistant", "content": "Hello"}]
    assert recs[3]["messages"] == CHAT and recs[4]["text"] == text["text"]


def test_jsonl_records_split_on_newlines_only(tmp_path):
    path = tmp_path / "x.jsonl"  # U+2028 inside a string is not a line break of JSON lines; CRLF is
    path.write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\r\n" + json.dumps({"text": "c"}) + "\n")
    assert [(r["text"], r["where"]) for r in load_domain_records(_cfg(path))] == [("a\u2028b", f"{path}:1"),
                                                                                 ("c", f"{path}:2")]


def test_format_can_be_forced(tmp_path):
    path = _jsonl(tmp_path / "x.jsonl", [{"text": "abc", "output": "ignored"}])
    assert load_domain_records(_cfg(path, format="text"))[0]["text"] == "abc"
    with pytest.raises(DataError, match=r"x.jsonl:1: no 'instruction' field"):
        load_domain_records(_cfg(path, format="alpaca"))


def test_undetectable_format_names_file_line_and_keys(tmp_path):
    path = _jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError, match=r"x.jsonl:1: cannot tell the record's format from its keys "
                                        r"\['completion', 'prompt'\]; set data.format"):
        load_domain_records(_cfg(path))


# ----------------------------------------------------------------------------------------------
# bad records: file:line, or skipped and counted


GOOD = {"alpaca": {"instruction": "Add.", "output": "4"},
        "messages": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
        "sharegpt": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}}
BAD = [
    ("missing field", {"instruction": "Add."}, "alpaca", r"no 'output' field"),
    ("empty output", {"instruction": "Add.", "output": "  "}, "alpaca", r"empty 'output'"),
    ("unknown role", {"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}]},
     "messages", r"turn 2: unknown role 'bot'; allowed: system, user, assistant"),
    ("no assistant turn", {"messages": [{"role": "user", "content": "Hi"}]}, "messages", r"no assistant turn"),
    ("empty assistant turn", {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]},
     "messages", r"turn 2: empty assistant turn"),
    ("sharegpt role", {"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Yo"}]},
     "sharegpt", r"turn 2: unknown role 'robot'; allowed: system, human, user, gpt, assistant"),
]


@pytest.mark.parametrize("case,bad,fmt,message", BAD, ids=[b[0] for b in BAD])
def test_bad_record_names_file_and_line_or_is_skipped(tmp_path, caplog, case, bad, fmt, message):
    good = GOOD[fmt]
    path = _jsonl(tmp_path / "x.jsonl", [good, good, bad, good])
    with pytest.raises(DataError, match=rf"^{re.escape(path)}:3: {message}.*data.skip_bad_rows=true skips"):
        load_domain_records(_cfg(path, format=fmt))
    with caplog.at_level(logging.WARNING, logger="cola_train.data"):
        assert len(load_domain_records(_cfg(path, format=fmt, skip_bad_rows=True))) == 3
    assert "skipped 1 bad record(s) of 4" in caplog.text and f"{path}:3" in caplog.text


def test_non_utf8_bytes_make_only_their_record_bad(tmp_path, caplog):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"instruction": "Add.", "output": "4"}\n'
                     b'{"instruction": "Caf\xe9?", "output": "yes"}\n'
                     b'{"instruction": "Add.", "output": "5"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: not valid UTF-8 \(byte b'\\xe9' in 'instruction'\)"):
        load_domain_records(_cfg(path))
    with caplog.at_level(logging.WARNING, logger="cola_train.data"):
        recs = load_domain_records(_cfg(path, skip_bad_rows=True))
    assert [r["messages"][-1]["content"] for r in recs] == ["4", "5"]
    assert "skipped 1 bad record(s) of 3" in caplog.text


def test_broken_json_list_stops_at_its_line(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": "b"}\n]\n')
    with pytest.raises(DataError, match=rf"{path}:3: not valid JSON"):
        load_domain_records(_cfg(path, skip_bad_rows=True))


# ----------------------------------------------------------------------------------------------
# records past cutoff_len


def test_records_past_cutoff_are_truncated_or_dropped_and_counted(caplog):
    tok = byte_tokenizer()
    short, long = {"text": "a" * 10}, {"text": "b" * 100}
    with caplog.at_level(logging.WARNING, logger="cola_train.data"):
        kept = tokenize_records([short, long, long], tok, "chat", 32)
    assert [len(r) for r in kept["input_ids"]] == [12, 32, 32]  # BOS + 10 + EOS; cut at 32
    assert "2 of 3 records are longer than data.cutoff_len=32 tokens: truncated" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cola_train.data"):
        dropped = tokenize_records([short, long, long], tok, "chat", 32, too_long="drop")
    assert [len(r) for r in dropped["input_ids"]] == [12]
    assert "2 of 3 records are longer than data.cutoff_len=32 tokens: dropped (data.too_long=drop)" in caplog.text
    with pytest.raises(DataError, match=r"^data: none of 2 records is left to train or validate on "
                                        r"\(data.cutoff_len=32, data.too_long=drop\)$"):
        tokenize_records([long, long], tok, "chat", 32, too_long="drop")


def test_a_chat_whose_answers_are_all_past_cutoff_is_dropped(caplog):
    rec = {"messages": [{"role": "user", "content": "q" * 100}, {"role": "assistant", "content": "a"}]}
    with caplog.at_level(logging.WARNING, logger="cola_train.data"):
        ds = tokenize_records([rec, {"text": "ok"}], byte_tokenizer(), "plain", 64)
    assert len(ds) == 1 and "1 of 2 records dropped: no assistant token within data.cutoff_len=64" in caplog.text


# ----------------------------------------------------------------------------------------------
# loss on assistant turns only


def _spans(ids, labels):
    """The runs of consecutive trained positions, as token lists."""
    spans, cur = [], []
    for i, label in zip(ids, labels):
        if label == IGNORE:
            if cur:
                spans.append(cur)
            cur = []
        else:
            assert label == i
            cur.append(i)
    return spans + ([cur] if cur else [])


def test_messages_labels_only_on_assistant_turns_plain_template():
    tok = byte_tokenizer()  # no chat template: the plain one
    ids, labels = encode_messages(tok, CHAT, "chat")
    assistant = [t["content"] for t in CHAT if t["role"] == "assistant"]
    # independent reference: each assistant text tokenized alone, followed by EOS
    assert _spans(ids, labels) == [tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                                   for a in assistant]
    masked = tok.decode([i for i, l in zip(ids, labels) if l == IGNORE], skip_special_tokens=True)
    assert "What is 2+2?" in masked and "Be brief." in masked and "4" not in masked


def test_messages_labels_only_on_assistant_turns_chat_template():
    tok = byte_tokenizer()
    tok.chat_template = CHATML
    ids, labels = encode_messages(tok, CHAT, "chat")
    # the whole conversation is the template's rendering of it, token for token
    assert tok.decode(ids) == tok.apply_chat_template(CHAT, tokenize=False)
    # trained: each assistant text and its end-of-turn marker, nothing else
    assert [tok.decode(s) for s in _spans(ids, labels)] == ["4<|im_end|>\n", "It is 8.<|im_end|>\n"]


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_custom_alpaca_tokenizes_like_the_builtin_domains(template):
    tok = byte_tokenizer()
    tok.chat_template = CHATML
    rec = {"instruction": "Add.", "input": "2+2", "output": "4"}
    builtin = encode(tok, rec, template, 512)
    ids, labels = encode_messages(tok, [{"role": "user", "content": "Add.\n\n2+2"},
                                        {"role": "assistant", "content": "4"}], template)
    assert (ids, labels) == (builtin["input_ids"], builtin["labels"])


def test_a_template_that_refuses_a_chat_names_its_line(tmp_path):
    tok = byte_tokenizer()
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    recs = load_domain_records(_cfg(_jsonl(tmp_path / "x.jsonl", [{"messages": CHAT}])))
    with pytest.raises(DataError, match=rf"x.jsonl:1: the tokenizer's chat template refused it: "
                                        rf"Conversation roles must alternate"):
        tokenize_records(recs, tok, "chat", 256)


# ----------------------------------------------------------------------------------------------
# config and CLI


def test_data_custom_evaluates_only_when_a_benchmark_is_named():
    assert compose(["data=custom"]).eval.enabled is False
    cfg = compose(["data=custom", "eval.benchmark=mmlu"])
    assert cfg.eval.enabled is True and cfg.eval.benchmark == "mmlu" and cfg.eval.batch_size == 16
    assert compose(["data=math"]).eval.enabled is True  # built-in domains keep their benchmark


@pytest.mark.parametrize("args,pattern", [
    (["data=custom", "data.path=/nonexistent/my.jsonl"], r"^error: data.path=/nonexistent/my.jsonl does not exist "),
    (["data=custom"], r"^error: data=custom needs data.path=FILE_OR_FOLDER"),
    (["data=custom", "data.format=csv", "data.path=x"],
     r"^error: data.format='csv' is not one of auto, alpaca, sharegpt, messages, text$"),
    (["data=custom", "data.too_long=cut", "data.path=x"], r"^error: data.too_long='cut' is not one of truncate, drop$"),
    (["data=math", "data.path=my.jsonl"],
     r"^error: data.path=my.jsonl and data.sources \(gsm8k\) are both set: own data goes with data=custom$"),
])
def test_bad_path_or_key_fails_before_hydra_makes_a_run_dir(tmp_path, args, pattern):
    run_dir = tmp_path / "run"
    proc = run_cli(["model=tiny_llama", *args, f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), proc.stderr[-2000:]
    assert not run_dir.exists()


def test_empty_folder_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(ConfigError, match=r"the folder holds no .json or .jsonl file"):
        load_domain_records(_cfg(tmp_path / "d"))


@pytest.mark.slow
def test_cli_trains_on_own_chats_with_sampling_and_a_builtin_benchmark(tmp_path, data_root):
    from cola_train.data.sampling import n_train_samples

    rows = [{"messages": [{"role": "user", "content": f"What is {i}+{i}?"},
                          {"role": "assistant", "content": str(2 * i)}]} for i in range(40)]
    path = _jsonl(tmp_path / "mine.jsonl", rows)
    run_dir = tmp_path / "run"
    args = ["model=tiny_llama", "method=lora", "data=custom", f"data.path={path}", "data.fraction=0.5",
            "data.max_samples=12", "data.cutoff_len=64", "trainer.max_steps=2", "trainer.batch_size=4",
            "eval.benchmark=mmlu", "eval.subjects=[abstract_algebra]", "eval.max_examples=4",
            f"hydra.run.dir={run_dir}"]
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((run_dir / "results.json").read_text())
    expected = n_train_samples(DataConfig(fraction=0.5, max_samples=12), 40)  # min(floor(0.5*36), 12)
    assert res["n_train_samples"] == expected == 12 and res["n_val_samples"] == 4
    assert res["benchmark"]["name"] == "mmlu" and res["benchmark"]["n_examples"] == 4
    assert res["config"]["data"]["path"] == path and res["config"]["eval"]["enabled"] is True
