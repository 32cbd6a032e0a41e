"""Small stand-ins shared by tests: a byte-level tokenizer and a model that plays back a script."""
from __future__ import annotations

import torch
import torch.nn as nn

from lmsmith.model.config import ModelConfig
from lmsmith.model.transformer import ModelOutput


class ByteTokenizer:
    """Token i+3 is byte i; 0 pad, 1 bos, 2 eos. Multi-byte characters span several tokens."""

    pad_id, bos_id, eos_id = 0, 1, 2
    eos_ids = {2}
    vocab_size = 259

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


class ScriptedModel(nn.Module):
    """Always predicts the next token of `script` (by how many tokens it has generated so far)."""

    def __init__(self, script: list[int], vocab: int = 259, context: int = 512):
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab, hidden_size=8, num_layers=1, num_heads=1, intermediate_size=8,
                                  max_position_embeddings=context)
        self.script, self.calls = script, 0
        self.anchor = nn.Parameter(torch.zeros(1))

    device = property(lambda self: self.anchor.device)
    dtype = property(lambda self: self.anchor.dtype)

    def forward(self, input_ids, cache=None, logits_to_keep=0, **_) -> ModelOutput:
        B, T = input_ids.shape
        token = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        logits = torch.full((B, T, self.config.vocab_size), -10.0)
        logits[..., token] = 10.0
        if cache is not None:
            cache.advance(T)
        return ModelOutput(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits,
                           hidden_states=torch.zeros(B, T, 8))
