"""Shared pieces for the training tests: a tiny text corpus, tiny recipes, one torch thread.

Fixtures here are opt-in (no autouse), so tests/train/test_peft.py is unaffected.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

WORDS = ("the cat dog bird sat ran flew on under over a mat log tree and then quickly slowly red blue "
         "big small happy sad tweet day night sun rain").split()
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_corpus(folder: Path, documents: int = 120, seed: int = 0) -> Path:
    """Two .txt files of short paragraphs drawn from a small vocabulary (deterministic)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for part in range(2):
        paragraphs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) + "."
                      for _ in range(documents // 2)]
        (folder / f"part{part}.txt").write_text("\n\n".join(paragraphs) + "\n")
    return folder


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def tiny_recipe(run_dir: Path, source: str | Path, objective: str = "causal-lm", preset: str = "tiny-gpt",
                **train) -> dict:
    """A recipe for a 1-layer, 32-wide model that trains in well under a second per step."""
    settings = {"max_steps": 6, "batch_size": 4, "lr": 3e-3, "log_every": 1, "progress": False,
                "tensorboard": False, "warmup_steps": 1, **train}
    return {
        "objective": objective,
        "model": {"preset": preset, "config": {"num_layers": 1, "hidden_size": 32, "num_heads": 2,
                                                "intermediate_size": 64, "max_position_embeddings": 64}},
        "tokenizer": {"train_vocab_size": 300},
        "data": {"source": str(source), "ratios": [0.8, 0.1, 0.1], "max_length": 24, "seed": 0},
        "train": settings,
        "output": {"dir": str(run_dir)},
    }


def write_labelled_jsonl(path: Path, n: int = 60, seed: int = 0) -> Path:
    """Text classification rows whose label is decidable from the words (happy → pos, sad → neg)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = ("pos", "neg")[i % 2]
        cue = "happy sun" if label == "pos" else "sad rain"
        filler = " ".join(rng.choice(WORDS[:12]) for _ in range(rng.randint(3, 8)))
        rows.append({"text": f"{filler} {cue} {filler}", "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def save_chat_tokenizer(folder: Path) -> Path:
    """A small byte-level BPE with ChatML markers and template, saved as an HF tokenizer folder."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from lmsmith.tokenizer import SpecialTokens, Tokenizer

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([" ".join(WORDS)] * 10 + ["user assistant positive negative"] * 10, trainer)
    tok = Tokenizer(backend, SpecialTokens(bos="<|im_start|>", eos="<|im_end|>", pad="<|endoftext|>"),
                    chat_template=CHATML)
    return tok.save(folder)


def write_chat_jsonl(path: Path, n: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(6))
        answer = "positive" if "happy" in words or "sun" in words else "negative"
        rows.append({"messages": [{"role": "user", "content": words}, {"role": "assistant", "content": answer}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
