"""method=moelora (combiners.TaskGate, adapters/task_input.py, data/tasks.py) against the float64
oracle tests/reference_moe.py (moelora_linear, moelora_merged_weight), written from the paper's
equations: the layer's output and gradients (loop and fused), the default of a forward without
task ids, the merge per task; on a tiny Llama: step 0 is the base model, the two tasks' outputs
part after a few steps, save/load; the task ids from a real batch of a two-file custom data set
reach the layers; bad task settings are one line."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import reference_moe as ref
from cola_train.adapters import (AdapterError, attach_adapter, export_peft, load_adapter, merge_adapter,
                                 merged_model, save_adapter)
from cola_train.adapters.combiners import TaskGate
from cola_train.adapters.lowrank import LowRankLinear
from cola_train.adapters import set_default_task
from cola_train.adapters.task_input import TaskInput
from cola_train.config import ConfigError, MethodConfig

F64 = torch.float64
E, R, ALPHA, TASKS = 4, 8, 16.0, 3


def layer(impl, default_task=None):
    torch.manual_seed(0)
    gate = TaskGate(E, E, num_tasks=TASKS, task_dim=5, default_task=default_task)
    lay = LowRankLinear(nn.Linear(6, 5, dtype=F64), gate, *gate.layer_rank(R, ALPHA), 0.0, impl)
    with torch.no_grad():
        lay.lora_B.normal_()           # B = 0 at init: give it values so every expert counts
    gate.tasks = TaskInput(TASKS, default_task)
    return lay


def factors(lay):
    """Copies of the layer's tensors as the oracle takes them: A_i (r/E x d_in), B_i (d_out x r/E)."""
    grab = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
    return ([grab(lay.lora_A[i]) for i in range(E)], [grab(lay.lora_B[:, i]) for i in range(E)],
            grab(lay.task_embedding.weight), grab(lay.task_gate.weight))


@pytest.mark.parametrize("impl", ["loop", "fused"])
def test_layer_matches_the_oracle_with_gradients(impl):
    lay = layer(impl)
    assert lay.lora_A.shape == (E, R // E, 6) and lay.scaling == ALPHA / R   # split rank, alpha / total r
    ids = torch.tensor([2, 0])
    lay.combiner.tasks.current = ids
    x = torch.randn(2, 3, 6, dtype=F64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y = lay(x)
    As, Bs, emb, W = factors(lay)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = ref.moelora_linear(x_ref, lay.base_layer.weight.detach(), lay.base_layer.bias.detach(), As, Bs,
                               ALPHA, R, ids, emb, W)
    assert torch.allclose(y, y_ref, atol=1e-12)
    w = torch.randn(y.shape, dtype=F64, generator=torch.Generator().manual_seed(2))
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-11)
    assert torch.allclose(lay.lora_A.grad, torch.stack([a.grad for a in As]), atol=1e-11)
    assert torch.allclose(lay.lora_B.grad, torch.stack([b.grad for b in Bs], 1), atol=1e-11)
    assert torch.allclose(lay.task_embedding.weight.grad, emb.grad, atol=1e-11)
    assert torch.allclose(lay.task_gate.weight.grad, W.grad, atol=1e-11)
    assert lay.task_gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("default_task", [None, 1])
def test_without_task_ids_the_default_task_or_the_mean_of_the_task_gates(default_task):
    lay = layer("fused", default_task)
    x = torch.randn(2, 3, 6, dtype=F64, generator=torch.Generator().manual_seed(1))
    As, Bs, emb, W = factors(lay)
    base = x @ lay.base_layer.weight.detach().T + lay.base_layer.bias.detach()
    if default_task is None:   # sum_t omega_t / T: the update of every task, averaged
        omega = ref.moelora_gate(torch.arange(TASKS), emb, W).mean(0)
    else:
        omega = ref.moelora_gate(torch.tensor([default_task]), emb, W)[0]
    want = base + sum(omega[i] * ref.lora_delta(x, As[i], Bs[i], ALPHA / R) for i in range(E))
    with torch.no_grad():
        assert torch.allclose(lay(x), want, atol=1e-12)


def test_merge_is_per_task_and_refused_without_one():
    lay = layer("fused", default_task=2)
    As, Bs, emb, W = factors(lay)
    want = ref.moelora_merged_weight(lay.base_layer.weight.detach(), As, Bs, ALPHA, R, 2, emb, W)
    A, B = lay.factors(dtype=F64)
    assert torch.allclose(lay.base_layer.weight + B @ A, want, atol=1e-12)

    model = attach_adapter(llama(), method(), ["q_proj"])          # default_task null
    with pytest.raises(AdapterError, match=r"^moelora weights its experts by each sequence's task: merge and "
                                           r"export need method.default_task=<task id>"):
        merge_adapter(model)


def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


def method(**changes):
    return MethodConfig(**{"name": "moelora", "kind": "moelora", "num_A": 4, "num_B": 4, "r": 4, "alpha": 8.0,
                           "dropout": 0.0, "num_tasks": 2, "task_embedding_dim": 8, **changes})


def test_tiny_llama_two_tasks_step_zero_training_and_save_load(tmp_path):
    base = llama()
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = base(input_ids=ids).logits
    model = attach_adapter(base, method(), ["q_proj", "v_proj", "down_proj"])
    assert "TaskInput(num_tasks=2" in str(model)                       # visible in print(model)
    task0, task1 = torch.tensor([0, 0]), torch.tensor([1, 1])
    with torch.no_grad():                                              # B = 0: the base model, any task
        for t in (task0, task1, None):
            got = model(input_ids=ids, **({} if t is None else {"task_ids": t})).logits
            assert torch.allclose(got, want, atol=1e-6)
    gate = model.model.layers[0].self_attn.q_proj
    before = gate.task_gate.weight.detach().clone()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(4):   # task 0 learns to predict token 1 everywhere, task 1 token 2
        loss = sum(model(input_ids=ids, labels=torch.full_like(ids, tok), task_ids=t).loss
                   for t, tok in ((task0, 1), (task1, 2)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert not torch.allclose(gate.task_gate.weight, before)          # the gate trains
    with torch.no_grad():
        out0 = model(input_ids=ids, task_ids=task0).logits
        out1 = model(input_ids=ids, task_ids=task1).logits
        mixed = model(input_ids=ids, task_ids=torch.tensor([0, 1])).logits
        default = model(input_ids=ids).logits
    assert (out0 - out1).abs().max() > 1e-3                            # the tasks' outputs part
    assert torch.allclose(mixed[0], out0[0], atol=1e-6) and torch.allclose(mixed[1], out1[1], atol=1e-6)
    save_adapter(model, tmp_path / "a")
    again = load_adapter(llama(), tmp_path / "a")
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids, task_ids=task1).logits, out1, atol=1e-6)
        assert torch.allclose(again(input_ids=ids).logits, default, atol=1e-6)
    with pytest.raises(AdapterError, match="num_tasks 2 != 3"):
        load_adapter(llama(), tmp_path / "a", method(num_tasks=3))

    # merge and export serve one task: refused without one, method.default_task's with one
    with pytest.raises(AdapterError, match=r"^moelora weights its experts by each sequence's task"):
        export_peft(model, tmp_path / "peft0")
    assert set_default_task(model, 1) == 6                             # 2 blocks x 3 adapted linears
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, out1, atol=1e-6)   # no ids: task 1 now
    export_peft(model, tmp_path / "peft1")
    from peft import PeftModel

    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(llama(), tmp_path / "peft1").eval()(input_ids=ids).logits
        assert torch.allclose(peft_logits, out1, atol=1e-5)
        plain = merged_model(model)
        assert not any(isinstance(m, TaskInput) for m in plain.modules())   # a plain model: no task hook
        assert torch.allclose(plain(input_ids=ids).logits, out1, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# data: the task id of each record, in the batch, to the layers


def two_files(tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    for name, prefix in (("a", "niv"), ("b", "cot")):
        with open(folder / f"{name}.jsonl", "w") as fh:
            for k in range(6):
                fh.write(json.dumps({"instruction": f"{name} question {k}", "output": f"{name} answer {k}",
                                     "id": f"{prefix}.{k}"}) + "\n")
    return folder


def test_task_ids_of_a_real_batch_reach_the_layers(tmp_path):
    from conftest import compose
    from cola_train import collate
    from cola_train.checks import validate
    from cola_train.data import load_domain_records, tasks
    from cola_train.run import build_data, build_model

    folder = two_files(tmp_path)
    cfg = compose(["model=tiny_llama", "data=custom", f"data.path={folder}", "data.task_key=source",
                   "data.val_fraction=0", "data.cutoff_len=48", "method=moelora", "method.num_tasks=2"])
    validate(cfg)
    records = load_domain_records(cfg.data)
    assert [r["task_id"] for r in records] == [0] * 6 + [1] * 6      # the file's place among data.path's
    tokenizer, model, _ = build_model(cfg)
    train, _ = build_data(cfg, tokenizer, records)
    collator = tasks.collator(collate.collator(tokenizer), cfg.method)
    rows = [train[i] for i in range(len(train))]
    batch = collator(rows)
    wanted = [0 if tokenizer.decode(r["input_ids"]).find("a question") >= 0 else 1 for r in rows]
    assert batch["task_ids"].dtype == torch.long and batch["task_ids"].tolist() == wanted
    assert set(wanted) == {0, 1}
    seen = {}
    gate = model.model.layers[0].self_attn.q_proj
    hook = gate.register_forward_hook(lambda m, a, o: seen.update(ids=m.combiner.tasks.current.clone()))
    with torch.no_grad():
        model(**batch)
    hook.remove()
    assert seen["ids"].tolist() == wanted
    lora = compose(["model=tiny_llama", "data=custom", f"data.path={folder}", "data.task_key=source"])
    assert "task_ids" not in tasks.collator(collate.collator(tokenizer), lora.method)(rows)   # lora: no ids


def test_task_from_a_field_cut_by_a_pattern(tmp_path):
    from conftest import compose
    from cola_train.data import load_domain_records

    folder = two_files(tmp_path)
    base = ["model=tiny_llama", "data=custom", f"data.path={folder}", "data.task_key=id",
            r"data.task_pattern='^([a-z]+)\.'"]
    records = load_domain_records(compose(base).data)
    assert [r["task_id"] for r in records] == [1] * 6 + [0] * 6      # sorted labels: cot 0, niv 1
    records = load_domain_records(compose(base + ["data.tasks=[niv,cot]"]).data)
    assert [r["task_id"] for r in records] == [0] * 6 + [1] * 6      # data.tasks' order


def test_bad_task_settings_are_one_line(tmp_path, capsys):
    from conftest import compose
    from cola_train.checks import check_values, validate
    from cola_train.data import DataError, load_domain_records, tasks

    folder = two_files(tmp_path)
    base = ["model=tiny_llama", "data=custom", f"data.path={folder}", "method=moelora"]
    with pytest.raises(SystemExit) as stop:
        check_values(base)
    assert stop.value.code == 2
    assert capsys.readouterr().err == ("error: method=moelora gates by each sequence's task: set data.task_key "
                                       "(a record field, e.g. id, or source for a mixture of sources; "
                                       "docs/DATA.md)\n")
    with pytest.raises(ConfigError, match=r"^data.task_pattern='\(\[' is not a regular expression"):
        validate(compose(base + ["data.task_key=id", "data.task_pattern='(['"]))
    cfg = compose(base + ["data.task_key=source", "method.num_tasks=1"])
    with pytest.raises(ConfigError, match=r"^the data has task id 1 \(data.task_key=source: 2 or more tasks\) "
                                          r"but method.num_tasks=1; set method.num_tasks=2$"):
        tasks.check_ids(load_domain_records(cfg.data), cfg)
    with pytest.raises(DataError, match=r"a.jsonl:1: no 'idx' field for data.task_key=idx"):
        load_domain_records(compose(base + ["data.task_key=idx"]).data)
    with pytest.raises(DataError, match=r"a.jsonl:1: task 'niv' is not in data.tasks=\['cot', 't0'\]"):
        load_domain_records(compose(base + ["data.task_key=id", r"data.task_pattern='^(\w+)\.'",
                                            "data.tasks=[cot,t0]"]).data)
    with pytest.raises(ConfigError, match="r=6 must be a multiple of method.num_A=8"):
        validate(compose(base + ["data.task_key=id", "method.r=6"]))
    packed = compose(base + ["data.task_key=id"])
    typed = __import__("cola_train.config", fromlist=["typed"]).typed(packed)
    typed.data.packing = True            # h-host's data.packing (flattened rows): one task id per row is lost
    with pytest.raises(ConfigError, match=r"^method=moelora reads one task id per sequence, which data.packing"):
        tasks.check_config(typed)


def test_preset_reads_openorcas_id_prefix_as_the_task():
    from conftest import compose

    cfg = compose(["experiment=cola_paper_multitask_moelora"])
    assert (cfg.method.num_tasks, cfg.data.task_key, list(cfg.data.tasks)) == (4, "id", ["cot", "flan", "niv", "t0"])
    import re
    assert [re.search(cfg.data.task_pattern, i).group(1) for i in ("niv.242684", "t0.1059221")] == ["niv", "t0"]


def test_a_run_saved_before_task_ids_resumes_without_changes():
    """data.task_key / task_pattern / tasks at their defaults train as before they existed."""
    from conftest import compose
    from cola_train.config import as_dict
    from cola_train.resume import differences

    cfg = compose(["model=tiny_llama"])
    saved = as_dict(cfg)
    for key in ("task_key", "task_pattern", "tasks"):
        del saved["data"][key]
    assert differences(saved, cfg) == {}
    assert list(differences(saved, compose(["model=tiny_llama", "data.task_key=source"]))) == ["data.task_key"]
