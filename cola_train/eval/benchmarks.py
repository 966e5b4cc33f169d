"""The multiple-choice test sets the CoLA paper evaluates on, read from the authors' CSV files.

Layout under `<data root>/eval` (see the data README):

    mmlu/test/<subject>_test.csv      question, A, B, C, D, answer        (no header row)
    mmlu/dev/<subject>_dev.csv        same, 5 rows per subject
    gsm8k/gsm8k_test.csv              id, question, A-D, answer, explanation (header)
    fineval/test/<subject>.csv        [id,] question, A-D, answer[, explanation] (header)
    bbh/test/<task>.csv               id, question, A.., answer (header; option count varies)
    <benchmark>/mapping.json          subject -> {"name", "category"[, "option_num"]}

Every loader returns an `ExampleList` (a plain list of example dicts, plus `.skipped`, the
one-line reasons of the rows it skipped) of examples

    {"subject": str, "question": str, "options": [str, ...], "answer": "A".."Z",
     "source": "<path relative to eval/>:<record>"}

where <record> is the 1-based CSV record number in the file, counting the header row if there
is one (so it is the row number a spreadsheet shows).

Row rules (the same for every benchmark):
  * a row whose field count differs from the header's, an empty question, an empty option
    (BBH: an empty option *before* a filled one; trailing empty option cells just mean this
    task/row has fewer options, since a BBH file's header carries the task's largest count),
    or an answer that is not one of the row's option letters is a *bad row*: `EvalDataError`
    naming file and row, or, with `skip_bad_rows=True`, skipped and counted;
  * a file that is not valid UTF-8 is decoded with `read_text_robust` and never crashes.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import string
from pathlib import Path
from typing import Callable, Iterable

log = logging.getLogger("cola_train.eval")

LETTERS = string.ascii_uppercase


def _first(reasons: list[str], k: int = 3) -> str:
    """A few reasons for the log; all of them are in results.json (benchmark.skipped_rows)."""
    more = f"; and {len(reasons) - k} more" if len(reasons) > k else ""
    return "; ".join(reasons[:k]) + more


class EvalDataError(ValueError):
    """Bad or missing evaluation data or an unknown benchmark/subject: one line, no traceback."""


class ExampleList(list):
    """A list of examples that also remembers which rows were skipped and why."""

    def __init__(self, items: Iterable[dict] = (), skipped: Iterable[str] = ()):
        super().__init__(items)
        self.skipped: list[str] = list(skipped)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)


# ---------------------------------------------------------------------------------------------
# Files

def eval_dir(data_root: str | os.PathLike | None) -> Path:
    """`<data root>/eval`; a path that already is the eval folder is accepted as is."""
    if data_root is None or str(data_root) == "":
        raise EvalDataError("no data root for the benchmarks: set data.root or COLA_DATA_ROOT "
                            "to the folder that holds eval/")
    root = Path(data_root).expanduser()
    if (root / "eval").is_dir():
        return root / "eval"
    if any((root / b).is_dir() for b in ("mmlu", "gsm8k", "fineval", "bbh")):
        return root
    raise EvalDataError(f"benchmark data not found: {root / 'eval'} does not exist "
                        f"(set data.root or COLA_DATA_ROOT to the folder that holds eval/)")


def read_text_robust(path: Path) -> tuple[str, str]:
    """Decode a text file without ever raising on bad bytes; returns (text, encoding used).

    Strict UTF-8 (a BOM is dropped) first. If that fails, the file is judged by what it holds:
    mostly valid multi-byte UTF-8 with a few broken sequences (the case of gsm8k_test.csv and
    BBH's salient_translation_error_detection.csv, where some 3-byte sequences lost their last
    byte) is decoded as UTF-8 with each broken sequence replaced by U+FFFD; otherwise it is a
    legacy 8-bit file: cp1252, and latin-1 (which maps every byte) as the last resort.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise EvalDataError(f"benchmark file missing: {path}") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    # Invalid UTF-8 comes in two shapes: a multi-byte sequence cut short (a lead byte and some
    # continuation bytes: damaged UTF-8) or a lone high byte (a legacy 8-bit encoding, where
    # cp1252's "\xe9" or "\x93" stand alone). Valid multi-byte characters also vote for UTF-8.
    escaped = raw.decode("utf-8", errors="surrogateescape")
    runs = re.findall(r"[\udc80-\udcff]+", escaped)
    partial = sum(1 for run in runs if len(run) > 1 and 0xC2 <= ord(run[0]) - 0xDC00 <= 0xF4)
    n_good = sum(1 for ch in escaped if ord(ch) > 127 and not 0xDC80 <= ord(ch) <= 0xDCFF)
    if n_good + partial >= len(runs) - partial:
        log.warning("%s: not valid UTF-8; %d broken byte sequence(s) replaced by U+FFFD",
                    path, len(runs))
        text = re.sub(r"[\udc80-\udcff]+", "\ufffd", escaped)
        return text, f"utf-8 ({len(runs)} broken sequences replaced)"
    for encoding in ("cp1252", "latin-1"):
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            continue
        log.warning("%s: not UTF-8; decoded as %s", path, encoding)
        return text, encoding
    raise AssertionError("latin-1 decodes every byte")  # pragma: no cover


def _read_mapping(bench_dir: Path) -> dict:
    path = bench_dir / "mapping.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(read_text_robust(path)[0])
    except json.JSONDecodeError as err:
        raise EvalDataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None


# The authors' mmlu/mapping.json spells one key differently from its CSV file (a blanket
# "medical" -> "Medicine" rename in their copy); map such keys back to the file's subject name.
_MAPPING_KEY_FIXES = {"Medicine_genetics": "medical_genetics"}

# Used only if a mapping.json has no "Law"/"Medicine" category. The authors' file does have
# both (see docs/EVALUATION.md), so with the shipped data these lists are not consulted.
_FALLBACK_GROUPS = {
    "Law": ["international_law", "jurisprudence", "professional_law"],
    "Medicine": ["anatomy", "clinical_knowledge", "college_medicine", "medical_genetics",
                 "nutrition", "professional_medicine", "virology", "college_biology"],
}


# ---------------------------------------------------------------------------------------------
# One CSV file -> examples

def _parse_csv(path: Path, rel: str, subject: str, *, header: bool, varying_options: bool,
               skip_bad_rows: bool, skipped: list[str]) -> list[dict]:
    text, _ = read_text_robust(path)
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if header:
        if not rows:
            raise EvalDataError(f"{path}: empty file (expected a header row)")
        names = [h.strip().lstrip("\ufeff") for h in rows[0]]
        if "question" not in names or "answer" not in names:
            raise EvalDataError(f"{path}: header {rows[0]} lacks a 'question' or 'answer' column")
        q_col, a_col = names.index("question"), names.index("answer")
        opt_cols = [i for i, h in enumerate(names) if len(h) == 1 and h in LETTERS]
        letters = [names[i] for i in opt_cols]
        if not letters or letters != list(LETTERS[:len(letters)]):
            raise EvalDataError(f"{path}: option columns {letters} are not A, B, C, ... in order")
        body, first_record, width = rows[1:], 2, len(names)
    else:  # MMLU: question, A, B, C, D, answer
        q_col, opt_cols, a_col = 0, [1, 2, 3, 4], 5
        body, first_record, width = rows, 1, 6

    out = []
    for record, row in enumerate(body, start=first_record):
        if not row:  # a blank line between records
            continue
        where = f"{rel}:{record}"
        reason = None
        if len(row) != width:
            reason = f"has {len(row)} fields, expected {width} (a missing or extra option?)"
        else:
            question = row[q_col].strip()
            options = [row[i].strip() for i in opt_cols]
            if varying_options:
                while options and not options[-1]:
                    options.pop()
            answer = row[a_col].strip()
            empty = [LETTERS[i] for i, o in enumerate(options) if not o]
            if not question:
                reason = "empty question"
            elif empty:
                reason = f"option {empty[0]} is empty (missing option)"
            elif len(options) < 2:
                reason = f"only {len(options)} option(s)"
            elif answer not in LETTERS[:len(options)] or len(answer) != 1:
                reason = (f"answer {answer!r} is not one of the options "
                          f"A-{LETTERS[len(options) - 1]}")
        if reason:
            message = f"{path}:{record}: {reason}"
            if not skip_bad_rows:
                raise EvalDataError(f"{message} (set eval.skip_bad_rows=true to skip bad rows)")
            skipped.append(f"{where}: {reason}")
            continue
        out.append({"subject": subject, "question": question, "options": options,
                    "answer": answer, "source": where})
    return out


# ---------------------------------------------------------------------------------------------
# Benchmarks

def _subjects_from(bench_dir: Path, files_dir: Path, suffix: str) -> tuple[list[str], dict]:
    """Subjects in mapping.json order fixed up to file names; else the CSV files present."""
    mapping = _read_mapping(bench_dir)
    if mapping:
        fixed = {_MAPPING_KEY_FIXES.get(k, k): v for k, v in mapping.items()}
        return sorted(fixed), fixed
    if not files_dir.is_dir():
        raise EvalDataError(f"benchmark folder missing: {files_dir}")
    subjects = sorted(p.name[: -len(suffix)] for p in files_dir.glob(f"*{suffix}"))
    if not subjects:
        raise EvalDataError(f"no *{suffix} files in {files_dir}")
    return subjects, {}


def _check_subjects(bench: str, wanted, allowed: list[str]) -> list[str]:
    if wanted is None:
        return allowed
    if isinstance(wanted, str):
        wanted = [wanted]
    wanted = list(wanted)
    unknown = [s for s in wanted if s not in allowed]
    if unknown:
        raise EvalDataError(f"unknown subject(s) {', '.join(map(repr, unknown))} for benchmark "
                            f"{bench!r}; allowed: {', '.join(allowed)}")
    if not wanted:
        raise EvalDataError(f"eval.subjects is empty for benchmark {bench!r}")
    return [s for s in allowed if s in set(wanted)]


def _load_folder(bench: str, root: Path, folder: str, sub: str, suffix: str, *, header: bool,
                 varying_options: bool, subjects, skip_bad_rows: bool,
                 group: str | None = None) -> ExampleList:
    bench_dir = root / folder
    files_dir = bench_dir / sub
    allowed, mapping = _subjects_from(bench_dir, files_dir, suffix)
    if group is not None:
        in_group = [s for s in allowed if mapping.get(s, {}).get("category") == group]
        allowed = in_group or sorted(_FALLBACK_GROUPS[group])
    chosen = _check_subjects(bench, subjects, allowed)
    skipped: list[str] = []
    examples = []
    for subject in chosen:
        path = files_dir / f"{subject}{suffix}"
        if not path.is_file():
            raise EvalDataError(f"benchmark file missing: {path} (subject {subject!r} of {bench})")
        examples += _parse_csv(path, str(path.relative_to(root)), subject, header=header,
                               varying_options=varying_options, skip_bad_rows=skip_bad_rows,
                               skipped=skipped)
    if skipped:
        log.warning("%s: skipped %d bad row(s): %s", bench, len(skipped), _first(skipped))
    return ExampleList(examples, skipped)


def load_mmlu(data_root, subjects=None, skip_bad_rows: bool = False, split: str = "test"):
    return _load_folder("mmlu", eval_dir(data_root), "mmlu", split, f"_{split}.csv", header=False,
                        varying_options=False, subjects=subjects, skip_bad_rows=skip_bad_rows)


def load_mmlu_law(data_root, subjects=None, skip_bad_rows: bool = False, split: str = "test"):
    return _load_folder("mmlu_law", eval_dir(data_root), "mmlu", split, f"_{split}.csv",
                        header=False, varying_options=False, subjects=subjects,
                        skip_bad_rows=skip_bad_rows, group="Law")


def load_mmlu_medicine(data_root, subjects=None, skip_bad_rows: bool = False, split: str = "test"):
    return _load_folder("mmlu_medicine", eval_dir(data_root), "mmlu", split, f"_{split}.csv",
                        header=False, varying_options=False, subjects=subjects,
                        skip_bad_rows=skip_bad_rows, group="Medicine")


def load_gsm8k(data_root, subjects=None, skip_bad_rows: bool = False):
    root = eval_dir(data_root)
    _check_subjects("gsm8k", subjects, ["gsm8k"])
    path = root / "gsm8k" / "gsm8k_test.csv"
    if not path.is_file():
        raise EvalDataError(f"benchmark file missing: {path}")
    skipped: list[str] = []
    examples = _parse_csv(path, str(path.relative_to(root)), "gsm8k", header=True,
                          varying_options=False, skip_bad_rows=skip_bad_rows, skipped=skipped)
    if skipped:
        log.warning("gsm8k: skipped %d bad row(s): %s", len(skipped), _first(skipped))
    return ExampleList(examples, skipped)


def load_fineval(data_root, subjects=None, skip_bad_rows: bool = False):
    return _load_folder("fineval", eval_dir(data_root), "fineval", "test", ".csv", header=True,
                        varying_options=False, subjects=subjects, skip_bad_rows=skip_bad_rows)


def load_bbh(data_root, subjects=None, skip_bad_rows: bool = False):
    return _load_folder("bbh", eval_dir(data_root), "bbh", "test", ".csv", header=True,
                        varying_options=True, subjects=subjects, skip_bad_rows=skip_bad_rows)


BENCHMARKS: dict[str, Callable[..., ExampleList]] = {
    "mmlu": load_mmlu,
    "mmlu_law": load_mmlu_law,
    "mmlu_medicine": load_mmlu_medicine,
    "gsm8k": load_gsm8k,
    "fineval": load_fineval,
    "bbh": load_bbh,
}

DOMAIN_BENCHMARK = {"generality": "mmlu", "law": "mmlu_law", "medicine": "mmlu_medicine",
                    "math": "gsm8k", "finance": "fineval", "multitask": "bbh"}


def load_benchmark(name: str, data_root, subjects=None, skip_bad_rows: bool = False) -> ExampleList:
    """Examples of benchmark `name` (a key of BENCHMARKS), optionally only some subjects."""
    if name not in BENCHMARKS:
        raise EvalDataError(f"unknown benchmark {name!r}; allowed: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name](data_root, subjects=subjects, skip_bad_rows=skip_bad_rows)


def benchmark_for_domain(domain: str) -> str:
    if domain not in DOMAIN_BENCHMARK:
        raise EvalDataError(f"no benchmark for domain {domain!r}; known domains: "
                            f"{', '.join(DOMAIN_BENCHMARK)} (or set eval.benchmark to one of "
                            f"{', '.join(BENCHMARKS)})")
    return DOMAIN_BENCHMARK[domain]


def select_subset(examples: list[dict], k: int | None) -> list[dict]:
    """A deterministic subset of at most k examples spread across subjects: round-robin over
    the subjects (in order of first appearance), taking each subject's rows in file order."""
    if k is None or k >= len(examples):
        return list(examples)
    if k <= 0:
        raise EvalDataError(f"eval.max_examples must be positive, got {k}")
    by_subject: dict[str, list[dict]] = {}
    for ex in examples:
        by_subject.setdefault(ex["subject"], []).append(ex)
    queues = list(by_subject.values())
    out, depth = [], 0
    while len(out) < k:
        for queue in queues:
            if depth < len(queue):
                out.append(queue[depth])
                if len(out) == k:
                    break
        depth += 1
    return out
