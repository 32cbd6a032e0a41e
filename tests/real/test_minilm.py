"""The embedded MiniLM encoder, loaded by our code, matches transformers' hidden states."""
import pytest
import torch

from lmsmith.api import load, resolve

pytestmark = pytest.mark.slow


def test_minilm_hidden_states_match_transformers():
    from transformers import AutoModel, AutoTokenizer

    folder = resolve("minilm-l6")
    ours, _ = load("minilm-l6")
    theirs = AutoModel.from_pretrained(folder).eval()
    batch = AutoTokenizer.from_pretrained(folder)(
        ["A sentence about cats.", "Une phrase un peu plus longue, avec de la ponctuation !"],
        padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = theirs(**batch).last_hidden_state
        got = ours(batch["input_ids"], attention_mask=batch["attention_mask"],
                   token_type_ids=batch["token_type_ids"]).hidden_states
    real = batch["attention_mask"].bool()
    assert ours.config.family == "bert" and ours.config.num_layers == 6
    assert (expected[real] - got[real]).abs().max() < 1e-4
