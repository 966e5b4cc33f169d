"""GPU energy over the training loop from NVML's cumulative counter (millijoules since driver
load), read on the GPU each rank uses and summed over ranks. Absent (None), not zero, where no
NVIDIA GPU or no NVML is present: a missing measurement must not read as a free one."""
from __future__ import annotations

import os

import torch

from .parallel import all_reduce


def _nvml_index(device: int) -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if device < len(ids) and ids[device].isdigit():
            return int(ids[device])
    return device


class EnergyMeter:
    def __init__(self):
        self.handle = None
        self.start_mj = None
        if not torch.cuda.is_available():
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(_nvml_index(torch.cuda.current_device()))
            self._read = lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self._read()
        except Exception:  # no NVML library, or a GPU without the counter
            self.handle = None

    def start(self) -> None:
        if self.handle is not None:
            torch.cuda.synchronize()
            self.start_mj = self._read()

    def joules(self) -> float | None:
        """Joules used since start() on all ranks together (a collective under torch.distributed)."""
        if self.handle is None or self.start_mj is None:
            return None
        torch.cuda.synchronize()
        return all_reduce((self._read() - self.start_mj) / 1000.0)


def energy_summary(joules: float | None, tokens: int) -> dict | None:
    """results.json's energy: the run's joules (all ranks) and per trained token; None if unmeasured."""
    if joules is None:
        return None
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return {"joules": joules, "joules_per_token": joules / max(tokens, 1), "gpus": world}
