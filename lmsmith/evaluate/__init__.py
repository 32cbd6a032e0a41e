"""Measuring a model: quality (accuracy, F1, perplexity), latency and memory.

    from lmsmith.evaluate import evaluate
    report = evaluate(model, tokenizer, "tweets-sentiment", limit=300)
    print(report.to_markdown()); report.save("runs/eval")

Modules: metrics (pure metric functions), measure (eval sets and the compression pipeline's
Measurement rows), speed (latency, throughput, generation timing), memory (parameters, bytes, peak
memory), data (what to evaluate on), run (`evaluate`), report (EvalReport), plots (PNGs).
Names are imported lazily: lmsmith.train imports the metrics, and this package imports lmsmith.train.
`measure()` is `lmsmith.evaluate.measure.measure` (the package attribute `measure` is that module).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "evaluate": "run", "EvalSettings": "run", "EvalReport": "report", "MemoryStats": "report",
    "LatencyStats": "speed", "DecodeTiming": "speed", "MemoryTracker": "memory",
    "EvalSet": "measure", "Measurement": "measure", "MeasureSettings": "measure",
    "classifier_eval_set": "measure", "lm_eval_set": "measure",
    "classification_metrics": "metrics", "perplexity": "metrics", "token_classification_metrics": "metrics",
}
__all__ = [
    "DecodeTiming", "EvalReport", "EvalSet", "EvalSettings", "LatencyStats", "MeasureSettings", "Measurement",
    "MemoryStats", "MemoryTracker", "classification_metrics", "classifier_eval_set", "evaluate", "lm_eval_set",
    "perplexity", "token_classification_metrics",
]
assert sorted(__all__) == sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lmsmith.evaluate' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
