"""Shared fixtures: a tiny chat model folder (random llama + a small byte-level BPE) for fast end-to-end tests."""
from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmsmith.io.checkpoint import save_hf_folder
from lmsmith.model.config import PRESETS
from lmsmith.model.transformer import Transformer
from lmsmith.tokenizer import SpecialTokens, Tokenizer

# CI has no GPU: these tests run where one is (`pytest -m cuda` on a GPU machine) and skip elsewhere.
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
cuda_tests = [pytest.mark.cuda, requires_cuda]


@pytest.fixture
def one_thread():
    """Tiny tensors on a busy 2-core machine: a second OpenMP thread costs far more than it saves."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def exact_fp32_on_cuda():
    """TF32 matmuls would put fp32 GPU results ~1e-3 away from the CPU's; compare exact fp32 instead."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world! How are you today?",
          "Language models predict the next token.", "Paris is the capital of France."] * 20


def tiny_tokenizer() -> Tokenizer:
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS, trainer)
    special = SpecialTokens(bos="<|im_start|>", eos="<|im_end|>", pad="<|endoftext|>")
    return Tokenizer(backend, special, chat_template=CHATML, model_max_length=256)


@pytest.fixture(scope="session")
def tiny_chat_folder(tmp_path_factory):
    """An HF folder with a random tiny llama and a real (trained) tokenizer: loads via lmsmith.load."""
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    config = PRESETS["tiny-llama"].replace(vocab_size=tok.vocab_size, max_position_embeddings=256,
                                           eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    return save_hf_folder(Transformer(config), tmp_path_factory.mktemp("tiny") / "tiny-chat", tokenizer=tok)
