"""results.json has one writer, results.RunRecord; every other module only reads it."""
from __future__ import annotations

import ast
import json
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cola_train"
WRITES = {"write_json_atomic", "open", "write_text", "write_bytes", "dump", "replace", "rename"}


def _docstrings(tree) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body \
                and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
            found.add(id(node.body[0].value))
    return found


def _writers(source: str) -> list[str]:
    """Functions (or module bodies) that name results.json in code and also write a file."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    bad = []
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    top = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    for name, nodes in [("<module>", top)] + [(f.name, [f]) for f in functions]:
        inside = [n for node in nodes for n in ast.walk(node)]
        names_it = any(isinstance(n, ast.Constant) and n.value == "results.json" and id(n) not in docs for n in inside)
        calls = {getattr(n.func, "attr", getattr(n.func, "id", None)) for n in inside if isinstance(n, ast.Call)}
        if names_it and calls & WRITES:
            bad.append(name)
    return bad


def test_the_check_finds_a_writer():
    """The check itself can fail: the pattern the old code used is caught."""
    old = 'def stop(out, results):\n    write_json_atomic(out / "results.json", {**results, "status": "x"})\n'
    assert _writers(old) == ["stop"]
    assert _writers('def read(out):\n    return json.loads((out / "results.json").read_text())\n') == []


def test_only_run_record_writes_results_json():
    offenders = {str(p.relative_to(PACKAGE)): _writers(p.read_text()) for p in PACKAGE.rglob("*.py")
                 if p.name != "results.py"}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_run_record_writes_status_first_and_keeps_what_it_gathered(tmp_path):
    from cola_train.results import RunRecord, completed_results, read_results

    record = RunRecord(tmp_path, config={"seed": 1})
    record["train"] = {"steps": 3}
    assert not (tmp_path / "results.json").exists()  # "running" lives in memory only
    record.write("preempted", train={"steps": 2, "max_steps": 4})
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert list(on_disk) == ["status", "config", "train"]
    assert on_disk == {"status": "preempted", "config": {"seed": 1}, "train": {"steps": 2, "max_steps": 4}}
    assert read_results(tmp_path) == on_disk and completed_results(tmp_path) is None
    RunRecord(tmp_path).write("failed", error="boom")
    assert json.loads((tmp_path / "results.json").read_text()) == {"status": "failed", "error": "boom"}
