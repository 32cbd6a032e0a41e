"""lmsmith: build, adapt, compress, check, explain and serve language models.

The public API, imported lazily so `import lmsmith` stays cheap:

    model, tok = lmsmith.load()                       # the embedded SmolLM2 (or a path / name)
    lmsmith.generate(model, tok, ["Once upon a time"], max_new_tokens=32)
    lmsmith.chat(model, tok, [{"role": "user", "content": "Hi"}])
    lmsmith.finetune("minilm-sentiment-lora")          # a shipped recipe or a YAML file
    lmsmith.run_recipe("compress-smollm2-int8")     # compression: prune → distill → quantize
    lmsmith.serve.serve()                              # OpenAI-compatible HTTP server

The checking tools live in their packages (their names would clash with the package names here):
`from lmsmith.evaluate import evaluate`, `from lmsmith.explain import explain, attention_maps`,
`from lmsmith.robustness import ...`.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load": "lmsmith.api",
    "chat": "lmsmith.api",
    "info": "lmsmith.api",
    "generate": "lmsmith.generation",
    "stream": "lmsmith.generation",
    "GenerationConfig": "lmsmith.generation",
    "ModelConfig": "lmsmith.model.config",
    "Transformer": "lmsmith.model.transformer",
    "Tokenizer": "lmsmith.tokenizer",
    "save_hf_folder": "lmsmith.io.checkpoint",
    "save_artifact": "lmsmith.io.artifact",
    "export_gguf": "lmsmith.io.gguf_export",
    "finetune": "lmsmith.train.api",
    "pretrain": "lmsmith.train.api",
    "run_recipe": "lmsmith.compress.recipe",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lmsmith' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
