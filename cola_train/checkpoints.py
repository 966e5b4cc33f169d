"""What a training checkpoint holds for our own adapter layers, and which checkpoint to resume.

Slim checkpoints. transformers' Trainer saves `model.state_dict()`: for our layers (plain
nn.Modules around a frozen base) that is the whole model, base weights included (630 MB for the
135M demo, tens of GB at 8B), though the base is rebuilt from the config on resume anyway. A
checkpoint of kind cola / hydralora / mole (and a Chain of LoRA of one of them) holds instead what
cannot be rebuilt: the adapter files of `adapters.io.save_adapter` (every layer's trainable
factors, frozen adapter tensors such as MoLE's experts, the initial factors A0/B0 and coefficient
that define the residual base W_res = W - coef * B0 A0, committed Chain-of-LoRA factors), plus
what the Trainer adds itself (optimizer, scheduler, RNG, trainer state). On resume the run builds
its model from the config as usual (base reloaded, adapter attached) and `load_slim` puts the
checkpoint's tensors into it. PEFT (adapter files already) and full fine-tuning (the model is
what is trained) keep the Trainer's own format; so does DeepSpeed (its engine checkpoint,
docs/CHECKPOINTS.md). A checkpoint written in the old full format still loads (the Trainer's path).

Usable checkpoints. A folder marked complete can still be unreadable (a disk that filled, a file
truncated by a copy): `last_usable_checkpoint` checks each file cheaply (a safetensors header
against the file size, a torch zip's central directory, trainer_state.json parses) and falls back
to the previous complete checkpoint with a one-line warning naming the bad one and why.
"""
from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path

log = logging.getLogger("cola_train")

COMPLETE = "CHECKPOINT_COMPLETE"   # written after the Trainer has written all of a checkpoint


class CheckpointError(RuntimeError):
    """Complete-marked checkpoints exist but none can be loaded."""


# ----------------------------------------------------------------------------------------------
# which checkpoint


def complete_checkpoints(folder) -> list[Path]:
    """checkpoint-N folders marked complete, newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    done = [p for p in folder.glob("checkpoint-*") if (p / COMPLETE).is_file() and p.name.split("-")[-1].isdigit()]
    return sorted(done, key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def last_complete_checkpoint(folder) -> str | None:
    done = complete_checkpoints(folder)
    return str(done[0]) if done else None


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path.name} is {size} bytes, too short for a safetensors header"
        n = int.from_bytes(head, "little")
        if n > size - 8:
            return f"{path.name} is {size} bytes but its header alone says {n + 8}"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return f"{path.name} has an unreadable safetensors header"
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return f"{path.name} is {size} bytes but its header says {8 + n + end}"
    return None


def _torch_zip_problem(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as z:  # reads the central directory at the end: truncation shows
            z.infolist()
    except (zipfile.BadZipFile, OSError) as err:
        return f"{path.name} is not a complete torch file ({err})"
    return None


def problem(checkpoint) -> str | None:
    """Why `checkpoint` cannot be loaded, or None. Cheap: headers and sizes, no tensors read."""
    checkpoint = Path(checkpoint)
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError) as err:
        return f"trainer_state.json does not load ({type(err).__name__})"
    engine = [p for p in checkpoint.glob("global_step*") if p.is_dir()]  # DeepSpeed's own files
    if not (any(checkpoint.glob("*.safetensors")) or any(checkpoint.glob("*.index.json")) or engine
            or (checkpoint / "pytorch_model.bin").is_file()):
        return "it has no weights file"
    for path in sorted(checkpoint.glob("*.safetensors")):
        why = _safetensors_problem(path)
        if why:
            return why
    for path in sorted([*checkpoint.glob("*.pt"), *checkpoint.glob("*.pth"), *checkpoint.glob("*.bin"),
                        *(q for d in engine for q in d.glob("*.pt"))]):
        why = _torch_zip_problem(path)
        if why:
            return why
    return None


def last_usable_checkpoint(folder) -> str | None:
    """The newest complete checkpoint that loads; each newer unusable one is named in a warning.
    None when there is no complete checkpoint (the run starts afresh); CheckpointError when there
    are some but none loads."""
    bad = []
    for checkpoint in complete_checkpoints(folder):
        why = problem(checkpoint)
        if why is None:
            if bad and os.environ.get("RANK", "0") == "0":
                for name, reason in bad:
                    log.warning("checkpoint %s is unusable (%s); resuming from %s instead", name, reason, checkpoint)
            return str(checkpoint)
        bad.append((checkpoint, why))
    if bad:
        listed = "; ".join(f"{p.name}: {why}" for p, why in bad)
        raise CheckpointError(f"no usable checkpoint to resume in {folder} ({listed}); "
                              "move that folder away to start afresh")
    return None


# ----------------------------------------------------------------------------------------------
# slim checkpoints of our own layers


def slim_model(model) -> bool:
    """Our own layers are attached (kind cola / hydralora / mole, alone or in a chain)."""
    from .adapters.io import adapter_info, unwrap

    info = adapter_info(unwrap(model))
    return info is not None and info["backend"].name == "ours"   # adapters.backends.OursBackend


def is_slim(checkpoint) -> bool:
    from .adapters.io import META, WEIGHTS

    checkpoint = Path(checkpoint)
    return (checkpoint / META).is_file() and (checkpoint / WEIGHTS).is_file() \
        and not (checkpoint / "model.safetensors").is_file()


def save_slim(model, directory) -> None:
    from .adapters.io import save_adapter

    save_adapter(model, directory)


def load_slim(model, checkpoint) -> None:
    """Put a slim checkpoint's tensors into the model this run built from its config (base
    reloaded, adapter attached; a Chain of LoRA's merged links already replayed)."""
    import torch
    from safetensors.torch import load_file

    from .adapters.io import META, WEIGHTS, _check_tensors, check_same_method, our_layers, require_info, unwrap
    from .adapters.spec import method_config

    checkpoint = os.fspath(checkpoint)
    model = unwrap(model)
    meta = json.loads(Path(checkpoint, META).read_text())
    saved = method_config(meta["method"])
    check_same_method(saved, require_info(model)["method"], checkpoint)
    layers = our_layers(model)
    per_layer = _check_tensors(layers, load_file(os.path.join(checkpoint, WEIGHTS)), saved, checkpoint)
    coefs = meta.get("init_coef", {})
    with torch.no_grad():
        for name, layer in layers.items():
            _load_layer(layer, per_layer[name], float(coefs.get(name, 1.0)), checkpoint)


def _same(live, saved) -> bool:
    import torch

    return live is not None and live.shape == saved.shape and torch.equal(live.detach().cpu(), saved.to(live.dtype))


def _load_layer(layer, state: dict, coef: float, checkpoint: str) -> None:
    """One layer: its own tensors copied in; the residual base and the committed path rebuilt
    only where this run's differ from the checkpoint's (an exact rebuild of what the run had)."""
    from .adapters import committed, init as inits
    from .adapters.lowrank import COMMITTED_A, COMMITTED_B, OPTIONAL_STATE

    layer.load_adapter_state({k: v for k, v in state.items() if k not in OPTIONAL_STATE}, coef)
    if "A0" in state:
        same = _same(layer.A0, state["A0"]) and _same(layer.B0, state["B0"]) and layer.init_coef == coef
        if not same:
            if layer.A0 is not None:  # this run's own init differs (another SVD): undo it first
                log.warning("%s: the initial factors differ from this run's; the residual base is rebuilt "
                            "from them (exact to float64 rounding)", checkpoint)
                weight = layer.base_layer.weight
                weight.data.copy_(inits.residual(weight.data, layer.A0, layer.B0, -layer.init_coef))
            layer.set_initial(state["A0"], state["B0"], coef)
    live = committed.factors(layer)
    if COMMITTED_A in state:
        if live is None or not (_same(live[0], state[COMMITTED_A]) and _same(live[1], state[COMMITTED_B])):
            committed.remove(layer)
            committed.append(layer, state[COMMITTED_A], state[COMMITTED_B])
    elif live is not None:
        committed.remove(layer)
