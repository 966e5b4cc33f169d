"""parallel.py on two gloo ranks: the Runtime each rank builds, the one scalar all-reduce and the
one ZeRO-3 gather, checked against what each rank put in (not against the helpers' own output).
A single process is checked too: every helper must then be a no-op."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch

from conftest import compose


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from cola_train import parallel

    cfg = compose(["deepspeed=zero3"])
    rt = parallel.Runtime.of(cfg)
    got = {"runtime": [rt.rank, rt.world_size, rt.local_rank, rt.device, rt.zero_stage, rt.is_main],
           "sum_int": parallel.all_reduce(10 + rank),           # 10 + 11
           "sum_float": parallel.all_reduce(0.25 * (rank + 1)),  # 0.25 + 0.5
           "max": parallel.all_reduce([1, 2][rank], "max")}
    parallel.barrier()

    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path={"zero_optimization": {"stage": 3},
                                                   "train_micro_batch_size_per_gpu": 1}):
        linear = torch.nn.Linear(4, 3, bias=False)
    weight = linear.weight
    got["partitioned_shape"] = list(weight.shape)            # (0,) outside a gather
    with parallel.gathered(weight, modify=True):             # rank 0 writes, every rank gets it back
        got["gathered_shape"] = list(weight.shape)
        if rank == 0:
            weight.data.copy_(torch.arange(12, dtype=weight.dtype).reshape(3, 4))
    with parallel.gathered([weight]):                        # read-only
        got["after"] = weight.detach().clone().tolist()
    dist.destroy_process_group()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(got, f)


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_runtime_all_reduce_and_gather_on_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, _port(), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["runtime"] == [rank, 2, rank, "cpu", 3, rank == 0]
        assert got["sum_int"] == 21 and isinstance(got["sum_int"], int)
        assert got["sum_float"] == pytest.approx(0.75)
        assert got["max"] == 2
        assert got["partitioned_shape"] == [0] and got["gathered_shape"] == [3, 4]
        assert got["after"] == [[float(4 * i + j) for j in range(4)] for i in range(3)]  # rank 0's values


def test_single_process_helpers_are_no_ops(monkeypatch):
    from cola_train import parallel

    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    rt = parallel.Runtime.of(compose([]))
    assert (rt.rank, rt.world_size, rt.local_rank, rt.zero_stage, rt.is_main, rt.deepspeed) == (0, 1, 0, 0, True, False)
    with pytest.raises(Exception):  # frozen: built once per run
        rt.rank = 1
    assert parallel.all_reduce(7) == 7 and parallel.all_reduce(1.5, "max") == 1.5
    weight = torch.nn.Parameter(torch.ones(2, 2))
    with parallel.gathered(weight, modify=True):  # an ordinary tensor: nothing to gather
        weight.data.mul_(3)
    assert weight.sum().item() == 12
