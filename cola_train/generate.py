"""Generate with, or chat with, a finished run.

    python -m cola_train.generate RUN_DIR --prompt "What is 12 * 7?"      # streams the reply
    python -m cola_train.generate RUN_DIR --file prompts.jsonl > out.jsonl
    python -m cola_train.generate RUN_DIR --interactive                 # multi-turn chat
Options: --max-new-tokens N (256), --min-new-tokens N, --temperature T (0 = greedy, the default), --top-p P,
--system TEXT (a system turn, chat templates only); `key=value` overrides the run's config
(e.g. model.path=/moved/base).

The model is the one `python -m cola_train.eval` scores (eval/run_dir.load_run): the base with
the run's adapter attached, not merged, so routed methods (HydraLoRA, MoLE), which have no
merged form, generate too. The prompt is built as training built it (data.template, see
data/template.py): the tokenizer's chat template with its generation prompt when data.template
is chat and the tokenizer has one, else the plain "### Instruction: ... ### Response:" template
after a BOS. A reply in --file mode is a JSON line {"prompt", "output"} per record; the record
is {"prompt": text}, an Alpaca record {"instruction", "input"}, or {"messages": [...]}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .__main__ import refuse
from .config import ConfigError


def uses_chat_template(tokenizer, template: str) -> bool:
    """Training's rule (data/template.encode): the chat template when asked for and present."""
    return template == "chat" and bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer, messages: list[dict], template: str) -> list[int]:
    """Token ids that end where training's prompt ended, so the model continues with a reply.

    Chat: the tokenizer's template over the conversation with its generation prompt, tokenized
    as it stands (it writes its own BOS), as data/template.py builds the training prompt.
    Plain: BOS + "### Instruction:\\n<user>\\n\\n### Response:\\n" per user turn, each earlier
    reply after its prompt followed by a blank line (training saw single turns only)."""
    from .data.template import PLAIN_PROMPT

    if uses_chat_template(tokenizer, template):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = ""
    for msg in messages:
        if msg["role"] == "user":
            text += PLAIN_PROMPT.format(instruction=msg["content"])
        elif msg["role"] == "assistant":
            text += msg["content"] + "\n\n"
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ([tokenizer.bos_token_id] + ids) if tokenizer.bos_token_id is not None else ids


def generate(model, tokenizer, ids: list[int], max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, min_new_tokens: int = 0, streamer=None) -> str:
    """The reply to prompt `ids`: greedy at temperature 0, else sampled. Stops at the
    tokenizer's EOS (and the model's generation-config EOS ids, e.g. a chat turn's end)."""
    import torch

    device = next(model.parameters()).device
    eos = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    eos.discard(None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 \
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    input_ids = torch.tensor([ids], device=device)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens or None,
                             eos_token_id=sorted(eos), pad_token_id=pad,
                             streamer=streamer, **sampling)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def read_prompts(path: Path) -> list[list[dict]]:
    """The conversations in a JSONL file; a bad line is a ConfigError naming file:line."""
    if not path.is_file():
        raise ConfigError(f"--file {path}: no such file")
    conversations = []
    with open(path, encoding="utf-8", errors="strict") as fh:
        try:
            lines = list(fh)
        except UnicodeDecodeError as err:
            raise ConfigError(f"--file {path}: not UTF-8 ({err.reason} at byte {err.start})")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{n}: not a JSON object ({err.msg})")
        conversations.append(_conversation(rec, f"{path}:{n}"))
    if not conversations:
        raise ConfigError(f"--file {path}: no prompts in it")
    return conversations


def _conversation(rec, where: str) -> list[dict]:
    if isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
        return [{"role": "user", "content": rec["prompt"]}]
    if isinstance(rec, dict) and isinstance(rec.get("instruction"), str):
        extra = rec.get("input") or ""
        return [{"role": "user", "content": f"{rec['instruction']}\n\n{extra}".strip() if extra
                 else rec["instruction"]}]
    if isinstance(rec, dict) and isinstance(rec.get("messages"), list) and rec["messages"]:
        msgs = rec["messages"]
        if all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
               and isinstance(m.get("content"), str) for m in msgs):
            return msgs
        raise ConfigError(f"{where}: each message needs a role (system, user or assistant) and a text content")
    raise ConfigError(f"{where}: a record needs \"prompt\", \"instruction\" or \"messages\"")


def _positive(kind, name):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value < 0 or (kind is int and value == 0):
            raise argparse.ArgumentTypeError(f"{name} must be a {'positive integer' if kind is int else 'number >= 0'}, "
                                             f"got {text!r}")
        return value
    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cola_train.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt; the reply is streamed to stdout")
    src.add_argument("--file", type=Path, help="a JSONL file of prompts; one JSON line per reply")
    src.add_argument("--interactive", action="store_true", help="chat, one turn per line (Ctrl-D ends)")
    p.add_argument("--max-new-tokens", type=_positive(int, "--max-new-tokens"), default=256)
    p.add_argument("--min-new-tokens", type=_positive(int, "--min-new-tokens"), default=None,
                   help="no EOS before this many tokens")
    p.add_argument("--temperature", type=_positive(float, "--temperature"), default=0.0)
    p.add_argument("--top-p", type=_positive(float, "--top-p"), default=1.0)
    p.add_argument("--system", help="a system turn before the first user turn (chat templates only)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    parser.error = refuse  # one line and exit 2, not argparse's usage block
    args = parser.parse_intermixed_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"unexpected argument {bad[0]!r}: give one run dir, then key=value overrides")
    from .errors import run_guarded
    from .eval.run_dir import cli_logging

    cli_logging()

    return run_guarded(lambda: _run(args)) or 0


def _run(args) -> int:
    from transformers import TextStreamer

    from .eval.run_dir import load_run

    conversations = read_prompts(args.file) if args.file else None
    cfg, model, tokenizer = load_run(args.run_dir, args.overrides)
    template = cfg.data.template
    if args.system and not uses_chat_template(tokenizer, template):
        raise ConfigError("--system needs a chat template (the run's data.template is plain or the "
                          "tokenizer has none)")
    system = [{"role": "system", "content": args.system}] if args.system else []
    opts = {"max_new_tokens": args.max_new_tokens, "min_new_tokens": args.min_new_tokens or 0,
            "temperature": args.temperature, "top_p": args.top_p}
    if conversations is not None:
        for conv in conversations:
            reply = generate(model, tokenizer, prompt_ids(tokenizer, system + conv, template), **opts)
            print(json.dumps({"prompt": conv[-1]["content"], "output": reply}, ensure_ascii=False), flush=True)
        return 0
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if args.prompt is not None:
        generate(model, tokenizer, prompt_ids(tokenizer, system + [{"role": "user", "content": args.prompt}],
                                              template), streamer=streamer, **opts)
        return 0
    history = list(system)
    print(f"chatting with {args.run_dir} ({cfg.method.name}); empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        reply = generate(model, tokenizer, prompt_ids(tokenizer, history, template), streamer=streamer, **opts)
        history.append({"role": "assistant", "content": reply})
    return 0


if __name__ == "__main__":
    sys.exit(main())
