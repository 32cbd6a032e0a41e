"""Training: pretrain / fine-tune from a recipe (full or PEFT), the training loop, objectives, PEFT.

    from lmsmith.train import finetune
    result = finetune("minilm-sentiment-lora", ["train.max_steps=20"])

Imported lazily, so `from lmsmith.train import state` (or `.peft`) does not load the whole stack.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "pretrain": "lmsmith.train.api",
    "finetune": "lmsmith.train.api",
    "run": "lmsmith.train.api",
    "RunResult": "lmsmith.train.api",
}
__all__ = ["RunResult", "finetune", "pretrain", "run"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lmsmith.train' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
