"""Training checkpoints without pickles: tensors in safetensors, everything else in JSON.

A checkpoint is a folder `checkpoints/step-00000012/` holding

* `model.safetensors`  the trainable parameters (all of them for full fine-tuning, the adapters and
  saved modules with PEFT; frozen weights are rebuilt from the recipe's source),
* `optimizer.safetensors` + `state.json`  optimizer, scheduler, loop counters, data position,
  collator and callback state, with every tensor replaced by a reference into the safetensors file,
* `rng-rank{r}.json` + `rng-rank{r}.safetensors`  each rank's python / numpy / torch RNG states.

Folders are written under a temporary name and renamed into place, so a run killed while saving
leaves the previous checkpoint as the latest one.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
TENSORS_FILE = "optimizer.safetensors"


# --- nested objects with tensors ↔ (JSON-able tree, flat tensor dict) -------------------------------------

def split_tensors(obj: Any, tensors: dict[str, torch.Tensor], path: str = "t") -> Any:
    """A JSON-able copy of `obj` with tensors and arrays moved into `tensors` (keys are their paths).

    Dicts become {"$dict": [[key, value], ...]} so int keys (optimizer state) survive; tuples are marked too.
    """
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous().clone()
        return {"$tensor": path}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(obj.astype(np.int64) if obj.dtype == np.uint32 else obj.copy())
        return {"$ndarray": path, "dtype": str(obj.dtype)}
    if isinstance(obj, Mapping):
        return {"$dict": [[k, split_tensors(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"$tuple": [split_tensors(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [split_tensors(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (at {path})")


def join_tensors(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of `split_tensors`."""
    if isinstance(tree, list):
        return [join_tensors(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "$tensor" in tree:
        return tensors[tree["$tensor"]]
    if "$ndarray" in tree:
        return tensors[tree["$ndarray"]].numpy().astype(tree["dtype"])
    if "$tuple" in tree:
        return tuple(join_tensors(v, tensors) for v in tree["$tuple"])
    if "$dict" in tree:
        return {k: join_tensors(v, tensors) for k, v in tree["$dict"]}
    raise ValueError(f"unrecognised checkpoint entry with keys {sorted(tree)}")


def write_tree(obj: Any, json_path: Path, tensor_path: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    tree = split_tensors(obj, tensors)
    save_file(tensors, str(tensor_path))
    json_path.write_text(json.dumps(tree))


def read_tree(json_path: Path, tensor_path: Path) -> Any:
    return join_tensors(json.loads(json_path.read_text()), load_file(str(tensor_path)))


# --- RNG ------------------------------------------------------------------------------------------------

def capture_rng() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- folders ----------------------------------------------------------------------------------------------

def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, folder), oldest first. Temporary folders are ignored."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return sorted((s, p) for s, p in found if (p / STATE_FILE).is_file())


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def new_temp_dir(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (and stale temporary folders)."""
    found = list_checkpoints(run_dir)
    for _, path in found[: max(len(found) - keep, 0)]:
        shutil.rmtree(path, ignore_errors=True)
    for stale in (run_dir / CHECKPOINTS).glob(".step-*"):
        shutil.rmtree(stale, ignore_errors=True)


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return load_file(str(path))
