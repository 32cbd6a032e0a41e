"""The embedded SmolLM2 GGUF, loaded by our code, matches transformers loading the same file."""
import pytest
import torch

from lmsmith.api import load, resolve
from lmsmith.generation import generate

pytestmark = pytest.mark.slow
PROMPT = "The history of the printing press begins"


@pytest.fixture(scope="module")
def pair():
    from transformers import AutoModelForCausalLM

    path = resolve("smollm2")
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ours, tok = load("smollm2")
    return ours, tok, theirs


def test_logits_match_transformers(pair):
    ours, tok, theirs = pair
    ids = torch.tensor([tok.encode(PROMPT)])
    with torch.no_grad():
        diff = (ours(ids).logits - theirs(ids).logits).abs().max()
    assert diff < 1e-3


def test_greedy_64_tokens_match_transformers(pair):
    ours, tok, theirs = pair
    ids = tok.encode(PROMPT)
    with torch.no_grad():
        expected = theirs.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, min_new_tokens=64,
                                   pad_token_id=tok.pad_id)[0, len(ids):].tolist()
    got = generate(ours, tok, [ids], max_new_tokens=64, stop_token_ids=())[0].token_ids
    assert got == expected


def test_batched_prompts_of_different_lengths_match_single_runs(pair):
    ours, tok, _ = pair
    prompts = ["Hi", "Once upon a time in a small village,", "1, 2, 3,"]
    batched = generate(ours, tok, prompts, max_new_tokens=12, stop_token_ids=())
    single = [generate(ours, tok, [p], max_new_tokens=12, stop_token_ids=())[0] for p in prompts]
    assert [c.token_ids for c in batched] == [c.token_ids for c in single]
