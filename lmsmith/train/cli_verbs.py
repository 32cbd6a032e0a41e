"""CLI verbs `lmsmith pretrain` and `lmsmith finetune` (merged into lmsmith/cli.py's VERBS table).

    lmsmith finetune minilm-sentiment-lora train.lr=3e-4 output.dir=runs/lora
    lmsmith pretrain tiny-gpt-clm data.path=my_texts/ --resume
    torchrun --nproc_per_node 2 -m lmsmith finetune minilm-sentiment-full

Also runnable on its own: `python -m lmsmith.train.cli_verbs finetune RECIPE ...`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable


def _setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="a recipe YAML file, or the name of a shipped recipe (lmsmith/recipes/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe keys, e.g. train.lr=3e-4")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _run(verb: str) -> Callable[[argparse.Namespace], None]:
    def run(a: argparse.Namespace) -> None:
        from .api import resolve_config
        from .api import run as run_recipe
        from .loop import NonFiniteLossError
        from .recipes import to_yaml

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        if a.print_config:
            print(to_yaml(resolve_config(a.recipe, a.overrides)), end="")
            return
        try:
            result = run_recipe(a.recipe, a.overrides, resume=a.resume, verb=verb)
        except NonFiniteLossError as e:
            raise SystemExit(f"lmsmith {verb}: {e}") from None
        if _is_main():
            print(json.dumps({"run_dir": str(result.run_dir), "model": _str(result.model_dir),
                              "adapter": _str(result.adapter_dir), "steps": result.steps,
                              "validation": result.validation, "test": result.test}, indent=2))
    return run


def _str(path) -> str | None:
    return str(path) if path is not None else None


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


VERBS: dict[str, tuple[str, Callable, Callable]] = {
    "pretrain": ("pretrain (or continue pretraining) a language model from a recipe", _setup, _run("pretrain")),
    "finetune": ("fine-tune a model (full or PEFT) from a recipe", _setup, _run("finetune")),
}


if __name__ == "__main__":  # the same verbs as `lmsmith pretrain|finetune`, through the one CLI
    from lmsmith.cli import main

    sys.exit(main())
