"""The paper-protocol study's planner, lr pick and verdict (cola_train/study_plan.py, verdict.py,
scripts/study.py) on fabricated results.json files: no training, well under a second each."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from cola_train import study_plan as sp
from cola_train import verdict as vd

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "study.py"
LRS = ["5e-05", "0.0001", "0.0002"]


def _script():
    spec = importlib.util.spec_from_file_location("study_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _study(root, **kw) -> sp.Study:
    """A study whose data root holds math's training file (an empty one: nothing reads it here)."""
    data = Path(root) / "data"
    (data / "train").mkdir(parents=True, exist_ok=True)
    (data / "train" / "gsm8k_train.json").write_text("[]")
    base = dict(root=root, domains=["math"], arms=["lora", "cola_fully"], sizes=[100], seeds=[1, 2, 3], lrs=LRS,
                data_root=data, grid_sizes=[100], grid=((1, 2), (2, 1)))
    return sp.Study(**{**base, **kw})


def _write(path: Path, loss=0.5, letter=0.25, cloze=0.3, joules=100.0, status="completed", error=None,
           samples=100, timings=None):
    path.mkdir(parents=True, exist_ok=True)
    results = {"status": status, "eval": {"loss": loss}, "n_train_samples": samples,
               "benchmark": {"accuracy": letter, "scoring": ["letter", "cloze"],
                             "by_scoring": {"letter": {"accuracy": letter}, "cloze": {"accuracy": cloze}}},
               "energy": {"joules": joules}, "train": {"counted_from_step": 0}, "timings": timings or {}}
    if error:
        results["error"] = error
    (path / "results.json").write_text(json.dumps(results))


def test_the_lr_is_chosen_on_validation_loss_even_where_test_accuracy_disagrees(tmp_path):
    study = _study(tmp_path)
    # (validation loss, test accuracy) per lr: the best accuracy is at 5e-5, the best loss at 1e-4
    sweep = {"5e-05": (0.90, 0.60), "0.0001": (0.50, 0.20), "0.0002": (0.70, 0.40)}
    best_by_loss = min(sweep, key=lambda lr: sweep[lr][0])
    assert best_by_loss != max(sweep, key=lambda lr: sweep[lr][1])          # the case where they disagree
    for lr, (loss, acc) in list(sweep.items())[:2]:
        _write(sp.run_dir(tmp_path, "math", "lora", 100, lr, 1), loss=loss, letter=acc, cloze=acc)
    # one lr still running: no pick yet, and the other seeds wait
    assert sp.pick_lr(tmp_path, "math", "lora", 100, LRS, 1)["lr"] is None
    final = [j for j in sp.plan(study, ["final"]) if j.arm == "lora"]
    assert [j.status for j in final] == ["blocked", "blocked"] and "2/3 lrs" in final[0].why

    loss, acc = sweep["0.0002"]
    _write(sp.run_dir(tmp_path, "math", "lora", 100, "0.0002", 1), loss=loss, letter=acc, cloze=acc)
    pick = sp.pick_lr(tmp_path, "math", "lora", 100, LRS, 1)
    assert pick["lr"] == best_by_loss
    final = [j for j in sp.plan(study, ["final"]) if j.arm == "lora"]
    assert [(j.status, j.lr, j.seed) for j in final] == [("todo", best_by_loss, 2), ("todo", best_by_loss, 3)]
    assert f"trainer.lr={best_by_loss}" in final[0].overrides and "seed=2" in final[0].overrides
    assert final[0].dir == sp.run_dir(tmp_path, "math", "lora", 100, best_by_loss, 2)
    # the verdict's cell is the same lr, and its accuracy is that lr's, not the best one
    cell = vd.cell(study, "math", "lora", 100)
    assert cell.lr == best_by_loss and cell.values["letter"] == [sweep[best_by_loss][1]]


def test_a_diverged_lr_is_final_and_never_picked(tmp_path):
    _write(sp.run_dir(tmp_path, "math", "lora", 100, "5e-05", 1), loss=0.9)
    _write(sp.run_dir(tmp_path, "math", "lora", 100, "0.0001", 1), loss=0.8)
    _write(sp.run_dir(tmp_path, "math", "lora", 100, "0.0002", 1), loss=None, status="failed",
           error="loss became nan at step 3; ...")
    pick = sp.pick_lr(tmp_path, "math", "lora", 100, LRS, 1)
    assert pick["lr"] == "0.0001" and ("0.0002", None, "diverged") in pick["tried"]


def test_the_plan_skips_finished_runs_and_reruns_the_rest(tmp_path):
    """Resumable: completed (and diverged) runs are done; preempted, failed or absent ones are run."""
    study = _study(tmp_path, arms=["lora"])
    _write(sp.run_dir(tmp_path, "math", "lora", 100, "5e-05", 1))
    _write(sp.run_dir(tmp_path, "math", "lora", 100, "0.0001", 1), status="preempted")
    _write(sp.run_dir(tmp_path, "math", "lora", 100, "0.0002", 1), status="failed", error="CUDA out of memory")
    sweep = {j.lr: j.status for j in sp.plan(study, ["sweep"])}
    assert sweep == {"5e-05": "completed", "0.0001": "todo", "0.0002": "todo"}
    est = sp.estimate(sp.plan(study, sp.STAGES), sp.DEFAULT_COST)
    assert est["sweep"] == {**est["sweep"], "runs": 3, "done": 1, "todo": 2, "blocked": 0}
    assert est["final"]["blocked"] == 2
    assert est["grid"]["blocked"] == 2 * 3   # two shapes x three seeds, waiting for cola_heuristic's lr


def test_the_runner_runs_each_stage_once_its_inputs_exist_and_a_second_call_runs_nothing(tmp_path, monkeypatch,
                                                                                          capsys):
    study_script = _script()
    launched = []

    def fake_launch(job, extra, env, start, deadline):   # a run: results.json as a completed job writes it
        launched.append((job.stage, job.arm, job.lr, job.seed))
        _write(job.dir, loss=0.5 + 0.1 * LRS.index(job.lr) + 0.01 * job.seed)
        return 0

    monkeypatch.setattr(study_script, "launch", fake_launch)
    monkeypatch.setattr(vd, "plot", lambda *a, **k: [])     # the plots: test_fewer_than_three_seeds_...
    args = ["--sweep-dir", str(tmp_path), "--domains", "math", "--arms", "lora,cola_heuristic", "--sizes", "100",
            "--seeds", "1,2,3", "--grid", "1..2x2..2", "--parallel", "2"]
    assert study_script.main(args) == 0
    # sweep (2 arms x 3 lrs), then final at the lowest loss (5e-05) for seeds 2, 3, then the grid at that lr
    assert sorted(launched) == sorted([("sweep", a, lr, 1) for a in ("lora", "cola_heuristic") for lr in LRS]
                                      + [("final", a, "5e-05", s) for a in ("lora", "cola_heuristic") for s in (2, 3)]
                                      + [("grid", f"grid_cola_heuristic_A{a}B2", "5e-05", s)
                                         for a in (1, 2) for s in (1, 2, 3)])
    assert (tmp_path / "verdict" / "verdict.md").is_file()
    launched.clear()
    assert study_script.main(args) == 0
    assert launched == [] and "0 run(s) to run" in capsys.readouterr().out


def test_plan_prints_runs_and_gpu_time_from_measured_runs(tmp_path, capsys):
    pilot = tmp_path / "pilot"
    timings = {"model load (tiny_llama)": 10.0, "training": 20.0, "benchmark": 5.0, "step_s_median": 0.5,
               "mfu": 0.1, "time_to_first_step_s": 12.0}
    for seed in (1, 2):
        _write(sp.run_dir(pilot, "math", "lora", 100, "5e-05", seed), samples=100, timings=timings)
    cost = sp.measure_cost([pilot], parallel=2)
    assert cost["fixed_s"] == pytest.approx(sp.STARTUP_S + 10.0 + 5.0) and cost["per_sample_s"] == pytest.approx(0.2)
    rc = _script().main(["--sweep-dir", str(tmp_path / "study"), "--plan", "--domains", "math", "--arms", "lora",
                         "--sizes", "1000", "--seeds", "1,2", "--grid-sizes", "1000", "--grid", "1..1x1..1",
                         "--cost-from", str(pilot), "--parallel", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    # sweep 3 runs, final 1, grid 2 (1 shape x 2 seeds): 6 runs of 1,000 samples, 2 at a time
    per_run = sp.STARTUP_S + 15.0 + 0.2 * 1000
    assert f"{6 * per_run / 2 / 60:.1f} min" in out
    assert [line.split()[:2] for line in out.splitlines()[1:4]] == [["sweep", "3"], ["final", "1"], ["grid", "2"]]


def test_run_seconds_give_the_line_through_the_points():
    cost = sp.cost_from_points({100: 64.0, 1000: 240.0}, parallel=9)
    assert sp.run_seconds(cost, 100) == pytest.approx(64.0) and sp.run_seconds(cost, 1000) == pytest.approx(240.0)
    assert sp.run_seconds(cost, 550) == pytest.approx(152.0)
    assert sp.run_seconds(sp.cost_from_points({100: 50.0}, parallel=1), 1000) == 50.0
    # the default is the same line, from docs/RESULTS.md's timings
    assert sp.run_seconds(sp.DEFAULT_COST, 100) == pytest.approx(64.0, abs=0.1)
    assert sp.run_seconds(sp.DEFAULT_COST, 1000) == pytest.approx(240.0, abs=0.1)


def test_missing_data_and_unknown_methods_are_skipped_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setitem(sp.ARMS, "nosuch", sp.Arm("nosuch", ("method=nosuch",)))
    study = _study(tmp_path, domains=["math", "multitask"], arms=["lora", "nosuch"])
    jobs = sp.plan(study, ["sweep"])
    why = {(j.domain, j.arm): (j.status, j.why) for j in jobs}
    assert why[("math", "lora")][0] == "todo"
    assert why[("math", "nosuch")] == ("skipped", "skipped: method 'nosuch' is unknown in this checkout "
                                                  "(no conf/method/nosuch.yaml)")
    status, reason = why[("multitask", "cola_t_4x10")]
    assert status == "skipped" and "train/openorca.json" in reason and "not in the data root" in reason
    assert "experiment=cola_paper_multitask_cola_t" not in " ".join(o for j in jobs if j.domain == "multitask" for o in j.overrides)
    rows = [r for r in vd.build(study)["rows"] if r.claim == "multitask"]
    assert rows and all(r.result["verdict"].startswith("skipped: ") for r in rows)
    (grid,) = [r for r in vd.build(_study(tmp_path, domains=["medicine"]))["rows"] if r.claim == "grid"]
    assert grid.result["verdict"] == "skipped: --grid-domain math is not among --domains"


def test_fft_runs_the_protocol_without_its_adapter_keys():
    """experiment=cola_paper sets method.r, which method=fft has not: FFT gets the preset's other values."""
    study = sp.Study(root=Path("/tmp/x"), domains=["math"], arms=["fft"], sizes=[100], seeds=[1], lrs=LRS)
    overrides = sp.job_overrides(study, sp.ARMS["fft"], "math", 100, "1e-4", 1, Path("/tmp/x/run"))
    assert "experiment=cola_paper" not in overrides and not any(o.startswith("method.") for o in overrides)
    for key in ("trainer.epochs=5", "trainer.effective_batch=64", "data.cutoff_len=1024", "trainer.warmup_steps=20"):
        assert key in overrides
    assert overrides.index("trainer.lr=0.0001") > overrides.index("trainer.lr=5e-05")  # the study's lr wins


def test_the_verdict_says_not_separable_when_the_spreads_overlap():
    overlap = vd.compare([0.50, 0.53, 0.56], [0.51, 0.54, 0.57], lower_better=True, names=("cola", "lora"))
    assert overlap["verdict"] == "not separable" and overlap["p"] > 0.5
    apart = vd.compare([0.50, 0.51, 0.52], [0.60, 0.61, 0.62], lower_better=True, names=("cola", "lora"))
    assert apart["verdict"] == "cola better" and apart["p"] < 0.01
    assert vd.compare([0.3, 0.31, 0.32], [0.2, 0.21, 0.22], lower_better=False, names=("a", "b"))["verdict"] == "a better"
    # Welch's t against the formula: t = (ma - mb) / sqrt(va/na + vb/nb), here (0.51-0.61)/sqrt(2e-4/3)
    from scipy import stats

    t = (0.51 - 0.61) / (2 * 1e-4 / 3) ** 0.5
    df = (2 * 1e-4 / 3) ** 2 / (2 * (1e-4 / 3) ** 2 / 2)
    assert apart["p"] == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-6)


def test_fewer_than_three_seeds_get_no_verdict(tmp_path):
    few = vd.compare([0.1, 0.11], [0.9, 0.91, 0.92], lower_better=True)
    assert few["verdict"].startswith("n < 3") and few["p"] is None
    assert vd.compare([], [], lower_better=True)["verdict"] == "pending: not run"
    # in the written verdict: cola_fully with 2 seeds against lora with 3, far apart, is still no verdict
    study = _study(tmp_path, seeds=[1, 2, 3], lrs=["0.0001"])
    for seed, loss in ((1, 0.2), (2, 0.21)):
        _write(sp.run_dir(tmp_path, "math", "cola_fully", 100, "0.0001", seed), loss=loss)
    for seed, loss in ((1, 0.9), (2, 0.91), (3, 0.92)):
        _write(sp.run_dir(tmp_path, "math", "lora", 100, "0.0001", seed), loss=loss)
    paths = vd.write(study, tmp_path / "out")
    (row,) = [r for r in json.loads(paths["json"].read_text())["rows"]
              if (r["a"]["arm"], r["b"]["arm"], r["metric"]) == ("cola_fully", "lora", "eval_loss")]
    assert row["verdict"] == "n < 3 (n=2 vs 3): no verdict" and row["outcome"] == "no verdict"
    assert "| math | 100 | eval loss | cola_fully | 0.2050 ± 0.0071 (2) | lora | 0.9100 ± 0.0100 (3) |" in \
        paths["markdown"].read_text()


def test_a_separable_row_agrees_or_contradicts_the_paper(tmp_path):
    study = _study(tmp_path, arms=["lora", "cola_fully"], lrs=["0.0001"])
    for seed, (cola, lora) in zip((1, 2, 3), ((0.60, 0.40), (0.61, 0.41), (0.62, 0.42))):
        _write(sp.run_dir(tmp_path, "math", "cola_fully", 100, "0.0001", seed), loss=cola, letter=0.3 + seed / 100)
        _write(sp.run_dir(tmp_path, "math", "lora", 100, "0.0001", seed), loss=lora, letter=0.3 + seed / 100)
    rows = {(r.a, r.b, r.metric): r for r in vd.build(study)["rows"] if r.claim == "low_sample"}
    assert vd.outcome(rows[("cola_fully", "lora", "eval_loss")]) == "contradicts"      # lora's loss is lower
    assert vd.outcome(rows[("cola_fully", "lora", "letter")]) == "not separable"       # the same accuracies


def test_bad_study_arguments_stop_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        _script().main(["--sweep-dir", str(tmp_path), "--plan", "--arms", "lora,bogus"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: --arms bogus: not an arm of the study; choose from lora, pissa")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exit_:
        _script().main(["--sweep-dir", str(tmp_path), "--plan", "--cost-from", str(empty)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: --cost-from: no completed run with timings under {empty}\n"
    with pytest.raises(SystemExit) as exit_:
        _script().main(["--sweep-dir", str(tmp_path), "--plan", "--run-seconds", "100:64"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: --run-seconds '100:64': write SIZE=SECONDS pairs, e.g. 100=64,1000=240\n"
