"""CLI verb `lmsmith explain` (merged into lmsmith/cli.py's VERBS table).

    lmsmith explain runs/tune-full-1/model "worst day ever" --method ig --out explain-out
    lmsmith explain smollm2 "The capital of France is" --target " Paris" --method occlusion
    lmsmith explain minilm-l6 "some text" --method attention --layer 5
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

CLI_METHODS = ("ig", "gradxinput", "occlusion", "rollout", "attention")


def _setup(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="embedded model name, GGUF file or model folder (a classifier or a causal LM)")
    p.add_argument("text", help="the input to explain")
    p.add_argument("--method", default="ig", help=f"one of {', '.join(CLI_METHODS)} (default ig); "
                   "'attention' draws attention maps instead of attributions")
    p.add_argument("--target", default=None, help="class label (classifiers) or next token / continuation "
                   "(causal LMs); default: what the model predicts")
    p.add_argument("--layer", type=int, default=None, help="attention: draw this layer's heads (default: all layers)")
    p.add_argument("--head", type=int, default=None, help="attention: with --layer, draw only this head")
    p.add_argument("--out", default="explain-out", help="folder for the HTML, PNG and JSON files")
    p.add_argument("--steps", type=int, default=50, help="integrated gradients: integration steps")
    p.add_argument("--batch-size", type=int, default=16, help="inputs per forward pass (ig steps, occlusions)")
    p.add_argument("--score", default="log-prob", help="attribute the target's log-prob or logit")
    p.add_argument("--baseline", default=None, help="pad or zero (default: pad when the tokenizer has one)")
    p.add_argument("--tokens", action="store_true", help="show word pieces instead of merging them into words")
    p.add_argument("--task", default=None, help="load the model as this task (default: as saved)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")


def _run(a: argparse.Namespace) -> None:
    from ..api import load
    from .attention import attention_maps
    from .explanation import explain

    model, tokenizer = load(a.model, task=a.task, device=a.device)
    if a.method == "attention":
        maps = attention_maps(model, tokenizer, a.text)
        paths = maps.save(a.out, layer=a.layer, head=a.head)
        print(maps.summary(layer=a.layer))
    else:
        result = explain(model, tokenizer, a.text, method=a.method, target=a.target,
                         score=a.score, baseline=a.baseline, n_steps=a.steps, batch_size=a.batch_size,
                         merge_words=not a.tokens)
        paths = result.save(a.out)
        print(result.summary())
    print("wrote " + ", ".join(str(p) for p in paths.values()))


VERBS: dict[str, tuple[str, Callable, Callable]] = {
    "explain": ("why a model predicted what it did: token attributions or attention maps (HTML/PNG/JSON)",
                _setup, _run),
}

