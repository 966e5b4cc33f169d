"""scripts/count_ops.py's counter: aten ops land in the part of the step that dispatched them."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "count_ops.py"


def _script():
    spec = importlib.util.spec_from_file_location("count_ops", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_counter_attributes_ops_to_categories_and_layers():
    mod = _script()

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4, bias=False) for _ in range(2)])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x.sum()   # outside the layers: one sum

    net, x = Net(), torch.randn(3, 4)
    counter = mod.OpCounter()
    mod._layer_hooks(counter, net)
    with counter:
        net(x)                                    # not counted: the counter is off
        counter.active = True
        net(x)
        with counter.category("optimizer"):
            torch.add(x, 1)
    # each Linear without bias is t + mm (two ops, decomposed before the dispatch mode sees them)
    assert counter.by_op["forward (decoder layers)"] == {"t": 2, "mm": 2}
    assert counter.by_op["forward (outside layers)"] == {"sum": 1}
    assert counter.by_category["optimizer"] == 1 and counter.stack == ["other"]
    assert "| **total** | **6** | **0** |" in mod.table(counter, mod.OpCounter())
