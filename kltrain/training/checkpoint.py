"""Atomic checkpoints of the run state, and resuming from them.

Layout: ``<run>/checkpoints/step-00000012/`` holding
- ``model/`` (safetensors via ``save_pretrained``, or the PEFT adapter);
- ``modules/<name>.safetensors`` (algorithm-owned modules such as a value head);
- ``optimizer.pt`` and ``scheduler.pt`` (tensors and plain values only, read back with
  ``weights_only=True``); under a sharding engine ``optimizer/process-00000.pt``, ... in place of
  ``optimizer.pt``: each process's state of its own shards, written by that process;
- ``state.json`` (step and every stateful object's ``state_dict()``; tensors inside a state are
  stored in ``state_tensors.pt``, also read with ``weights_only=True``, and referred to by name);
- ``rng.json`` (every process's Python, NumPy, torch and CUDA generator states);
- ``config.yaml`` (the resolved config) and, written last, the completeness marker ``COMPLETE``.

A checkpoint is written into a hidden temporary folder and renamed into place only once complete;
folders without the marker are never loaded and never counted; old checkpoints are deleted only
after the new one is complete, so some complete checkpoint exists at every moment.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import yaml
from safetensors.torch import load_file

from kltrain.config import ConfigError

MARKER = "COMPLETE"
STATE_TENSORS = "state_tensors.pt"
TENSOR_REF = "__tensor__"  # {"__tensor__": name} in state.json stands for a tensor of STATE_TENSORS
PREFIX = "step-"
TMP_PREFIX = ".tmp-"
#: Where each process of a sharding engine writes its optimizer state before the main process
#: moves the folder into the checkpoint (as ``optimizer/``): ``.staging-step-00000012``.
STAGING_PREFIX = ".staging-"
PER_PROCESS_OPTIMIZER = "optimizer"

#: Config fields that do not change what a run computes: they may differ on resume.
NON_RUN_FIELDS = (
    "name",
    "trainer.output_dir",
    "trainer.save_every",
    "trainer.keep_last",
    "trainer.log_samples_every",
    "trainer.eval_every",
    "trainer.resume",
    "trainer.max_consecutive_skips",
    "kl.max",
    "tracking.",
)


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from; the message names it and what to do."""


def save(
    root: Path,
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    states: dict[str, Any],
    keep_last: int,
    modules: dict[str, torch.nn.Module | dict[str, torch.Tensor]] | None = None,
    rng: list[dict[str, Any]] | None = None,
    config_text: str | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_staging: Path | None = None,
) -> Path:
    """Write the checkpoint of ``step`` atomically and prune to the newest ``keep_last``.
    ``model_state``: what to write in place of ``model.state_dict()`` (a sharded run's gathered
    weights); ``optimizer_staging``: the folder of per-process optimizer states
    (:func:`write_process_state`), moved in as ``optimizer/`` in place of ``optimizer.pt``."""
    root = Path(root)
    weights = model_state if model_state is not None else model.state_dict()
    _refuse_non_finite(step, {"model": weights, **_states(modules or {})})
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f"{TMP_PREFIX}{PREFIX}{step:08d}-{os.getpid()}"
    optimizer_state = optimizer.state_dict() if optimizer_staging is None else None
    try:
        _write(tmp, model, model_state, optimizer_state, scheduler, step, states, modules, rng)
        if optimizer_staging is not None:
            os.replace(optimizer_staging, tmp / PER_PROCESS_OPTIMIZER)
        if config_text is not None:
            (tmp / "config.yaml").write_text(config_text)
        _write_durably(tmp / MARKER, "complete\n")
    except (OSError, RuntimeError) as err:  # disk full (torch.save says RuntimeError): the
        # half-written folder goes, the previous checkpoint stays
        shutil.rmtree(tmp, ignore_errors=True)
        if optimizer_staging is not None:
            shutil.rmtree(optimizer_staging, ignore_errors=True)
        previous = latest(root)
        kept = f"the previous checkpoint {previous} is kept" if previous else "none was before"
        raise CheckpointError(
            f"could not write the checkpoint of step {step} into {root}: "
            f"{getattr(err, 'strerror', None) or err} ({type(err).__name__}); nothing was "
            f"marked complete, {kept}. Free space (or fix the folder's permissions) and rerun "
            f"with --resume"
        ) from err
    _install(tmp, final)
    prune(root, keep_last)
    return final


def _write(tmp, model, model_state, optimizer_state, scheduler, step, states, modules, rng) -> None:
    """Every file of a checkpoint but the config and the ``COMPLETE`` marker into ``tmp``."""
    tmp.mkdir()
    given = {} if model_state is None else {"state_dict": model_state}
    model.save_pretrained(tmp / "model", safe_serialization=True, **given)
    if modules:
        (tmp / "modules").mkdir()
        for name, module in modules.items():
            file = str(tmp / "modules" / f"{name}.safetensors")
            if isinstance(module, dict):  # a sharded module's gathered full weights
                safetensors.torch.save_file(module, file)
            else:  # save_model: a module with tied weights (a model copy) is stored once
                safetensors.torch.save_model(module, file)
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    plain, tensors = split_tensors({"step": step, **states})
    if tensors:
        torch.save(tensors, tmp / STATE_TENSORS)
    (tmp / "state.json").write_text(json.dumps(plain, indent=1))
    (tmp / "rng.json").write_text(json.dumps(rng or []))


def _states(modules: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    return {name: m if isinstance(m, dict) else m.state_dict() for name, m in modules.items()}


def _refuse_non_finite(step: int, states: dict[str, dict[str, torch.Tensor]]) -> None:
    """A checkpoint holding NaN or ±inf weights would be resumed into a dead run: never write
    one (so none is ever marked complete). A NaN or ±inf anywhere makes a tensor's fp32 sum
    non-finite (one pass, no temporary of the tensor's size)."""
    for owner, state in states.items():
        for name, tensor in state.items():
            if tensor.is_floating_point() and not bool(tensor.sum(dtype=torch.float32).isfinite()):
                raise CheckpointError(
                    f"refusing to save the checkpoint of step {step}: {owner} tensor {name} "
                    f"holds non-finite values (NaN or inf)"
                )


def staging_folder(root: Path, step: int) -> Path:
    """The folder every process of a sharding engine writes its optimizer state into, for the
    checkpoint of ``step`` under ``root`` (the same path on every process)."""
    return Path(root) / f"{STAGING_PREFIX}{PREFIX}{step:08d}"


def prepare_staging(staging: Path) -> None:
    """Main process, before the others write: an empty staging folder (a killed save's leftover
    of the same step is removed, as are other steps' leftovers)."""
    staging.parent.mkdir(parents=True, exist_ok=True)
    for stale in staging.parent.glob(f"{STAGING_PREFIX}{PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging.mkdir()


def write_process_state(staging: Path, process_index: int, state: Any) -> str | None:
    """This process's optimizer state (tensors and plain values) into ``staging``; the error,
    as text, when it could not be written (every process must learn of it: see the trainer)."""
    try:
        torch.save(state, _process_file(staging, process_index))
    except (OSError, RuntimeError) as err:
        return f"{getattr(err, 'strerror', None) or err} ({type(err).__name__})"
    return None


def load_process_state(path: Path, process_index: int) -> Any:
    """Process ``process_index``'s optimizer state from a checkpoint of a sharding engine."""
    file = _process_file(Path(path) / PER_PROCESS_OPTIMIZER, process_index)
    if not file.is_file():
        raise CheckpointError(
            f"{path} holds no optimizer state for process {process_index} ({file} is missing): "
            "it was not written by a sharding engine (FSDP2, DeepSpeed) with this many processes"
        )
    return load_tensors(file)


def _process_file(folder: Path, process_index: int) -> Path:
    return folder / f"process-{process_index:05d}.pt"


def _remove_stale_tmp(root: Path) -> None:
    """Temporary folders of saves that were killed: never complete, never loaded, removed."""
    for stale in root.glob(f"{TMP_PREFIX}{PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def _install(tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` to ``final``. A ``final`` that exists comes from a timeline
    abandoned by resuming an older checkpoint: it is replaced (that older checkpoint is still
    there meanwhile, so a complete checkpoint exists at every moment)."""
    if final.exists():
        old = final.with_name(f"{TMP_PREFIX}old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def is_complete(path: Path) -> bool:
    return path.is_dir() and path.name.startswith(PREFIX) and (path / MARKER).is_file()


def list_complete(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if is_complete(p))


def latest(root: Path) -> Path | None:
    found = list_complete(root)
    return found[-1] if found else None


def prune(root: Path, keep_last: int) -> None:
    for old in list_complete(root)[:-keep_last]:
        shutil.rmtree(old)


def load_state(path: Path) -> dict[str, Any]:
    """The state of a complete checkpoint (step, sampler, β controller, ...), with the tensors
    of ``state_tensors.pt`` put back where ``state.json`` refers to them."""
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    state = json.loads((path / "state.json").read_text())
    file = path / STATE_TENSORS
    return join_tensors(state, load_tensors(file) if file.is_file() else {}, file)


def split_tensors(state: Any, name: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """``(state with every tensor replaced by {TENSOR_REF: name}, {name: tensor})``, name the
    tensor's path of keys and list indices (``algorithm.fit_buffer.0.phi``): JSON for the
    plain values, exact bytes (any dtype) for the tensors."""
    if isinstance(state, torch.Tensor):
        return {TENSOR_REF: name}, {name: state.detach().cpu()}
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(state, dict):
        out = {}
        for key, value in state.items():
            out[key], found = split_tensors(value, f"{name}.{key}" if name else str(key))
            tensors.update(found)
        return out, tensors
    if isinstance(state, (list, tuple)):
        out_list = []
        for i, value in enumerate(state):
            plain, found = split_tensors(value, f"{name}.{i}")
            out_list.append(plain)
            tensors.update(found)
        return out_list, tensors
    return state, tensors


def join_tensors(state: Any, tensors: dict[str, torch.Tensor], file: Path) -> Any:
    """The inverse of :func:`split_tensors`; a reference to a tensor the file lacks is an
    error naming both."""
    if isinstance(state, dict):
        if set(state) == {TENSOR_REF}:
            if state[TENSOR_REF] not in tensors:
                raise CheckpointError(
                    f"{file}: state.json refers to tensor {state[TENSOR_REF]!r}, which the file "
                    f"does not hold ({sorted(tensors)[:5]}); the checkpoint is damaged, resume "
                    f"from another"
                )
            return tensors[state[TENSOR_REF]]
        return {key: join_tensors(value, tensors, file) for key, value in state.items()}
    if isinstance(state, list):
        return [join_tensors(value, tensors, file) for value in state]
    return state


def load_tensors(path: Path) -> Any:
    """Optimizer/scheduler state: tensors and plain values only; a pickle that would run code
    (or build any other object) is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for a hostile file, others for a corrupt one
        first = str(err).split(". ")[0]
        raise CheckpointError(
            f"{path}: refused to load: it is not a plain tensor file that weights_only=True can "
            f"read ({type(err).__name__}: {first}). kltrain never unpickles code; remove this "
            f"checkpoint or resume from another"
        ) from None


def load_rng(path: Path) -> list[dict[str, Any]]:
    return json.loads((Path(path) / "rng.json").read_text())


def load_config_dict(path: Path) -> dict[str, Any] | None:
    """The resolved config saved with the checkpoint (None for a checkpoint without one)."""
    file = Path(path) / "config.yaml"
    return yaml.safe_load(file.read_text()) if file.is_file() else None


# ----------------------------------------------------------------------------------------------
# Weights


def load_model(path: Path, model: torch.nn.Module) -> None:
    """Load ``model/`` of a checkpoint into ``model`` in place: the PEFT adapter for a PEFT
    model, else the full weights (tied weights, saved once, are filled through their tie)."""
    folder = Path(path) / "model"
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        try:
            tensors.update(load_file(str(file)))
        except Exception as err:  # SafetensorError for a truncated or corrupt file
            raise CheckpointError(
                f"{file} cannot be read ({type(err).__name__}: {err}); the checkpoint is "
                f"damaged: resume from another one (--resume PATH) or remove it"
            ) from err
    if not tensors:
        raise CheckpointError(f"{folder} holds no .safetensors weights; the checkpoint is damaged")
    if hasattr(model, "peft_config"):
        _load_adapter(folder, model, tensors)
        return
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    loaded = {t.data_ptr() for k, t in model.state_dict().items() if k in tensors}
    untied = [k for k in missing if model.state_dict()[k].data_ptr() not in loaded]
    if untied or unexpected:
        raise CheckpointError(
            f"{folder}: weights do not match the model: missing {untied[:5]}, unexpected "
            f"{unexpected[:5]}; was this checkpoint written for another model.policy?"
        )


def _load_adapter(folder: Path, model: torch.nn.Module, tensors: dict) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, tensors)
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    if result.unexpected_keys or len(tensors) != trainable:
        raise CheckpointError(
            f"{folder}: the adapter has {len(tensors)} tensors for {trainable} trainable "
            f"parameters (unexpected {list(result.unexpected_keys)[:5]}); was it written with "
            f"another model.lora?"
        )


def load_modules(path: Path, modules: dict[str, torch.nn.Module]) -> None:
    """Algorithm-owned modules (``Algorithm.modules()``), strictly by name."""
    for name, module in modules.items():
        file = Path(path) / "modules" / f"{name}.safetensors"
        if not file.is_file():
            raise CheckpointError(f"{file} is missing: the checkpoint has no module {name!r}")
        missing, unexpected = safetensors.torch.load_model(module, str(file), strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{file} does not match module {name!r}: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )


# ----------------------------------------------------------------------------------------------
# Random generators


def encode_state(state: torch.Tensor) -> str:
    """A generator state (uint8 tensor) as base64 text, so it fits in JSON."""
    return base64.b64encode(state.cpu().numpy().tobytes()).decode("ascii")


def decode_state(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def capture_rng() -> dict[str, Any]:
    """This process's global generators: Python, NumPy, torch CPU and every CUDA device (the
    ones ``generate`` samples from)."""
    py = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    out: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        "torch": encode_state(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        out["cuda"] = [encode_state(s) for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng(record: dict[str, Any]) -> None:
    version, state, gauss = record["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = record["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(decode_state(record["torch"]))
    if "cuda" in record and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([decode_state(s) for s in record["cuda"]])


# ----------------------------------------------------------------------------------------------
# Finding what to resume, and whether the config allows it


def find_resume(resume: str, output_dir: str | None) -> tuple[Path, Path | None]:
    """``(run folder, checkpoint or None)`` for ``resume``: ``auto`` (the newest complete
    checkpoint of ``output_dir``, None for a run that has none yet), a checkpoint folder, or a
    run folder (its newest)."""
    if resume == "auto":
        if not output_dir:
            raise CheckpointError(
                "--resume / trainer.resume=auto needs trainer.output_dir (the run folder to "
                "continue); set it, or pass --resume PATH to a checkpoint or run folder"
            )
        return Path(output_dir), latest(Path(output_dir) / "checkpoints")
    path = Path(resume)
    if is_complete(path):
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return Path(output_dir) if output_dir else run, path
    if not path.is_dir():
        raise CheckpointError(f"--resume {path}: no such checkpoint or run folder")
    found = latest(path / "checkpoints") or latest(path)
    if found is None:
        raise CheckpointError(
            f"--resume {path}: not a complete checkpoint (no {MARKER} marker: its save was "
            f"interrupted) and no complete checkpoint inside it; complete ones near it: "
            f"{[p.name for p in list_complete(path.parent)] or 'none'}"
        )
    return Path(output_dir) if output_dir else (found.parent.parent), found


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved → current`` for every field that changes what the run computes."""
    old, new = flatten_config(saved), flatten_config(current)
    lines = []
    for key in sorted(set(old) | set(new)):
        if key in ("versions", "gradient_followed") or key.startswith("versions."):
            continue
        if any(key == f or (f.endswith(".") and key.startswith(f)) for f in NON_RUN_FIELDS):
            continue
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            lines.append(f"{key}: {old.get(key, '<absent>')!r} → {new.get(key, '<absent>')!r}")
    return lines


def flatten_config(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dict → ``{"section.key": value}`` (empty dicts kept as values)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flatten_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
