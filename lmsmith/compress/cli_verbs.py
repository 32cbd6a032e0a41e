"""The `compress` verb, merged into `lmsmith.cli.VERBS`:

    lmsmith compress compress-smollm2-int8                     # a shipped recipe, by name
    lmsmith compress my-recipe.yaml output=runs/x steps.0.quantize.method=int4
"""
from __future__ import annotations

import argparse


def setup_compress(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file, or the name of a shipped recipe (lmsmith/recipes/compress-*)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override recipe keys, e.g. output=runs/x data.sizes.test=200 steps.1.quantize.method=int4")


def run_compress(a: argparse.Namespace) -> None:
    from .recipe import run_recipe

    result = run_recipe(a.recipe, a.overrides)
    print()
    print(result.table)
    print(f"\nfinal artifact: {result.final}\nreport: {result.report}")


VERBS = {
    "compress": ("run a compression recipe (prune / distill / quantize steps with quality gates)",
                 setup_compress, run_compress),
}
