"""hydra-submitit-launcher's launchers, with requeued jobs resuming from their checkpoint.

conf/hydra/launcher/slurm.yaml and local.yaml point `_target_` here. When submitit requeues a
preempted or timed-out job it re-runs the pickled launcher call; `checkpoint` adds
trainer.resume=true to that job's overrides (trainer.resume is left out of the job's dir name,
so the job comes back to the same dir) and the run resumes from its last checkpoint.
"""
from __future__ import annotations

import sys
from typing import Any, Sequence

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher

RESUME = "trainer.resume=true"


def with_resume(overrides: Sequence[str]) -> list[str]:
    kept = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] != "trainer.resume"]
    return [*kept, RESUME]


class _ResumeOnRequeue:
    def checkpoint(self, sweep_overrides, *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, with_resume(sweep_overrides), *args, **kwargs)


class ResumableSlurmLauncher(_ResumeOnRequeue, SlurmLauncher):
    def launch(self, job_overrides, initial_job_idx):
        from .distributed import sbatch_missing

        message = sbatch_missing()
        if message:  # one line, not a traceback (also checked on the command line)
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)
        return super().launch(job_overrides, initial_job_idx)


class ResumableLocalLauncher(_ResumeOnRequeue, LocalLauncher):
    pass
