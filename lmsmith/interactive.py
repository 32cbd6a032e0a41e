"""Terminal front ends: streaming generation and an interactive chat loop."""
from __future__ import annotations

import sys
import time

from .api import chat_stream, load
from .generation import GenerationConfig, stream
from .model.packed import pack_linears


def _print_stream(pieces, out=None) -> tuple[int, float]:
    """Print pieces as they arrive; return (characters, seconds)."""
    out = out or sys.stdout
    start, chars = time.perf_counter(), 0
    for piece in pieces:
        out.write(piece)
        out.flush()
        chars += len(piece)
    return chars, time.perf_counter() - start


def load_for_inference(model: str | None, device: str = "auto"):
    """Load, then pack the float32 CPU linears for oneDNN: these front ends only ever run inference."""
    m, tok = load(model, device=device)
    pack_linears(m)
    return m, tok


def generate_cli(prompt: str, model: str | None = None, chat: bool = False, device: str = "auto",
                 **gen) -> None:
    """Stream one completion (or one chat reply) and report tokens/s on stderr."""
    m, tok = load_for_inference(model, device)
    config = GenerationConfig(**gen)
    counter = _TokenCounter(tok)
    if chat:
        pieces = chat_stream(m, tok, [{"role": "user", "content": prompt}], config)
    else:
        pieces = stream(m, tok, prompt, config)
    _, seconds = _print_stream(counter.wrap(pieces))
    print(f"\n[{counter.tokens} tokens in {seconds:.2f}s: {counter.tokens / max(seconds, 1e-9):.1f} tokens/s]",
          file=sys.stderr)


class _TokenCounter:
    """Counts generated tokens from the streamed text (re-encoding it once at the end)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.text, self.tokens = tokenizer, "", 0

    def wrap(self, pieces):
        for piece in pieces:
            self.text += piece
            yield piece
        self.tokens = len(self.tokenizer.encode(self.text, add_special_tokens=False))


def chat_repl(model: str | None = None, system: str | None = None, device: str = "auto", **gen) -> None:
    """Interactive chat: type a message, get a streamed reply; /reset clears history, /exit quits."""
    m, tok = load_for_inference(model, device)
    config = GenerationConfig(**gen)
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    print("Chat with the model. /reset clears the conversation, /exit (or Ctrl-D) quits.", file=sys.stderr)
    while True:
        try:
            user = input("> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return
        if user in ("/exit", "/quit"):
            return
        if user == "/reset":
            history = history[:1] if system else []
            continue
        if not user:
            continue
        history.append({"role": "user", "content": user})
        counter = _TokenCounter(tok)
        _, seconds = _print_stream(counter.wrap(chat_stream(m, tok, history, config)))
        history.append({"role": "assistant", "content": counter.text})
        print(f"\n[{counter.tokens / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)
