"""How MOELoRA's layers learn the task of the sequences they see (method=moelora).

The batch carries `task_ids` (one LongTensor entry per sequence, data/tasks.py). The model's
forward does not take such an argument, and the gated linears are deep inside it, so a
`TaskInput` module is installed on the model as a child (visible in `print(model)`) with a
forward pre-hook on the model: the hook pops `task_ids` from the call's keyword arguments and
keeps it on the TaskInput, which every TaskGate combiner of the model holds a reference to (as
routed combiners hold their AuxCollector). No class-level switch and no module global: two
models in one process each have their own.

Every top-level forward sets it, to the batch's ids or to None (no ids: the benchmark, generation,
a plain `model(input_ids)`), so a value never leaks from one batch to the next; it is not cleared
after the forward, because gradient checkpointing replays the layers' forwards during backward
and they must see the same ids then.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

ATTR = "moelora_task_input"   # the child module's name on the model
BATCH_KEY = "task_ids"        # the batch entry (data/tasks.py puts it there)


class TaskInput(nn.Module):
    """Holds the task ids of the current forward for the model's TaskGate layers. No tensors of
    its own (nothing is saved); `current` is None when the forward had no ids."""

    def __init__(self, num_tasks: int, default_task: Optional[int]):
        super().__init__()
        self.num_tasks, self.default_task = int(num_tasks), default_task
        self.current: Optional[torch.Tensor] = None

    def extra_repr(self) -> str:
        default = "mean of the task gates" if self.default_task is None else f"task {self.default_task}"
        return f"num_tasks={self.num_tasks}, batch key {BATCH_KEY!r}, without it: {default}"


def _take_task_ids(module: nn.Module, args, kwargs):
    getattr(module, ATTR).current = kwargs.pop(BATCH_KEY, None)
    return args, kwargs


def install(model: nn.Module, num_tasks: int, default_task: Optional[int]) -> TaskInput:
    """The model's TaskInput (made and hooked once; a second call returns the same one)."""
    found = getattr(model, ATTR, None)
    if isinstance(found, TaskInput):
        return found
    task_input = TaskInput(num_tasks, default_task)
    model.add_module(ATTR, task_input)
    task_input.hook = model.register_forward_pre_hook(_take_task_ids, with_kwargs=True)
    return task_input


def uninstall(model: nn.Module) -> None:
    """Remove the module and its hook (merged_model: a plain model takes no task ids)."""
    found = getattr(model, ATTR, None)
    if isinstance(found, TaskInput):
        found.hook.remove()
        delattr(model, ATTR)
