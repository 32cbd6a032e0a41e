"""Interpretability: why did the model say that, and what does it attend to?

    from lmsmith.api import load
    from lmsmith.explain import explain, attention_maps

    model, tok = load("runs/tune-full-1/model")               # a fine-tuned classifier
    e = explain(model, tok, "worst service ever", method="ig", merge_words=True)
    print(e.summary()); e.save("out/")                          # HTML, PNG and JSON
    attention_maps(model, tok, "worst service ever").save("out/", layer=5)

Imports are lazy so `import lmsmith.explain` stays cheap.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "explain": "lmsmith.explain.explanation",
    "Explanation": "lmsmith.explain.explanation",
    "METHODS": "lmsmith.explain.explanation",
    "attention_maps": "lmsmith.explain.attention",
    "AttentionMaps": "lmsmith.explain.attention",
    "attention_rollout": "lmsmith.explain.attention",
    "head_mean": "lmsmith.explain.attention",
    "integrated_gradients": "lmsmith.explain.attribution",
    "gradient_x_input": "lmsmith.explain.attribution",
    "occlusion": "lmsmith.explain.attribution",
    "completeness_gap": "lmsmith.explain.attribution",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lmsmith.explain' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
