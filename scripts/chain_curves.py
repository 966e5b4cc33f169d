"""Pin Chain of LoRA's per-step training record on tiny_llama: tests/golden/chain_curves.json.

The chain's schedule (when links switch, what is merged, how the optimizer and the learning-rate
schedule restart) is easy to change by accident while the code around it is reorganised; a
refactor must keep every step's loss. Each case is a short real run (run.run, 8 steps, dropout on
so the random stream matters too); the JSON holds, per case, every logged step's loss, learning
rate and grad norm, the chain/* rows, the chain summary of results.json, and the final eval loss.

    python scripts/chain_curves.py            # (re)write the JSON: only on purpose, from main
    tests/test_golden_chain.py                # compares a fresh run to it (1e-6)
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden" / "chain_curves.json"

# tiny_llama, 16 samples in batches of 4 (so the data order across a link switch and an epoch
# matters), 8 steps, lr 5e-3 so the adapters move
BASE = ["model=tiny_llama", "data=math", "data.max_samples=16", "data.max_val_samples=8", "data.cutoff_len=96",
        "trainer.batch_size=4", "trainer.eval_batch_size=8", "trainer.max_steps=8", "trainer.logging_steps=1",
        "eval=none", "trainer.save_steps=3", "trainer.lr=5e-3", "method=chain_of_lora"]
CASES = {
    "links2_restart_scaled_factors": ["method.links=2", "trainer.warmup_steps=4"],
    "links3_restart_full_weights": ["method.links=3", "trainer.warmup_steps=4", "method.link_warmup=full",
                                    "method.merge=weights"],
    "links3_one_schedule": ["method.links=3", "trainer.warmup_steps=2", "method.restart_lr=false"],
    "rank_schedule_fractions": ["method.links=3", "method.rank_schedule=[8,4,2]",
                                "method.link_fractions=[0.5,0.25,0.25]", "trainer.warmup_steps=2"],
    # pinned with per-layer dropout masks (method.dropout_mask's default, shared, is another stream)
    "heuristic_log2_weights": ["method.links=2", "method.base=cola_heuristic", "method.merge=weights",
                               "method.base.dropout_mask=per_layer",
                               "trainer.logging_steps=2", "trainer.warmup_steps=1"],
}
STEP_KEYS = ("loss", "learning_rate", "grad_norm")
SUMMARY_KEYS = ("ends", "ranks", "current_link")
RECORD_KEYS = ("link", "start_step", "end_step", "rank", "merged", "loss_at_switch", "delta_norm",
               "cumulative_delta_norm", "layer_norm_max")


def record(name: str) -> dict:
    """Run one case in this process and return what is pinned of it."""
    from cola_train.compose import typed_config as compose
    from cola_train.run import run

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / name
        results = run(compose(BASE + CASES[name]), out)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [{"step": r["step"], **{k: r[k] for k in STEP_KEYS}} for r in rows if "loss" in r]
    chain_rows = [{k: v for k, v in r.items() if k.startswith("chain/") or k == "step"}
                  for r in rows if "chain/link" in r]
    chain = results["chain"]
    return {"steps": steps, "chain_rows": chain_rows,
            "summary": {k: chain[k] for k in SUMMARY_KEYS},
            "records": [{k: r[k] for k in RECORD_KEYS} for r in chain["records"]],
            "train_steps": results["train"]["steps"], "eval_loss": results["eval"]["loss"]}


def main() -> None:
    names = sys.argv[1:] or list(CASES)
    pinned = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    for name in names:
        pinned[name] = record(name)
        print(name, [round(s["loss"], 6) for s in pinned[name]["steps"]], flush=True)
    GOLDEN.write_text(json.dumps(pinned, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
