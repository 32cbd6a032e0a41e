import pytest
import torch

from lmsmith.generation import GenerationConfig, find_stop, generate, held_back, stream
from lmsmith.model.config import PRESETS
from lmsmith.model.transformer import Transformer
from tests.fakes import ByteTokenizer, ScriptedModel

TOK = ByteTokenizer()


def script(text: str, end: bool = True) -> list[int]:
    return TOK.encode(text) + ([TOK.eos_id] if end else [])


def tiny_model(context=64):
    torch.manual_seed(0)
    return Transformer(PRESETS["tiny-llama"].replace(vocab_size=259, max_position_embeddings=context)).eval()


def test_stops_at_eos_and_reports_stop():
    out = generate(ScriptedModel(script("hello")), TOK, ["hi"], max_new_tokens=20)[0]
    assert (out.text, out.finish_reason, len(out.token_ids)) == ("hello", "stop", 5)


def test_max_new_tokens_gives_length():
    out = generate(ScriptedModel(script("hello world")), TOK, ["hi"], max_new_tokens=4)[0]
    assert (out.text, out.finish_reason) == ("hell", "length")


def test_stop_string_cuts_text_before_it():
    out = generate(ScriptedModel(script("one two STOP three")), TOK, ["x"], max_new_tokens=40, stop=("STOP",))[0]
    assert (out.text, out.finish_reason) == ("one two ", "stop")


def test_stream_concatenates_to_the_completion_and_never_splits_characters():
    text = "Grüße 你好 🙂 done"
    pieces = list(stream(ScriptedModel(script(text)), TOK, "x", max_new_tokens=60))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) > 3  # it really streamed


def test_stream_holds_back_a_possible_stop_string():
    pieces = list(stream(ScriptedModel(script("abc<EN")), TOK, "x", max_new_tokens=60, stop=("<END>",)))
    assert "".join(pieces) == "abc<EN"  # emitted at the end, once it's clear no stop string came
    pieces = list(stream(ScriptedModel(script("abc<END>zz")), TOK, "x", max_new_tokens=60, stop=("<END>",)))
    assert "".join(pieces) == "abc"


def test_held_back_and_find_stop():
    assert held_back("hello <e", ("<end>",)) == 2
    assert held_back("hello", ("<end>",)) == 0
    assert find_stop("a STOP b END", ("END", "STOP")) == 2


def test_prompt_longer_than_context_is_a_clear_error():
    with pytest.raises(ValueError, match="prompt has 70 tokens but the context window is 64"):
        generate(tiny_model(64), TOK, ["x" * 70], max_new_tokens=2)


def test_prompt_truncation_only_when_asked():
    out = generate(tiny_model(64), TOK, ["x" * 70], max_new_tokens=2, truncate_prompt=True, stop_token_ids=())[0]
    assert len(out.token_ids) == 1  # 63 prompt tokens kept, room for exactly one more


def test_new_tokens_are_capped_by_the_context():
    out = generate(tiny_model(64), TOK, ["x" * 60], max_new_tokens=50, stop_token_ids=())[0]
    assert (len(out.token_ids), out.finish_reason) == (4, "length")


def test_empty_prompt_rejected():
    with pytest.raises(ValueError, match="empty"):
        generate(tiny_model(), TOK, [""])


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(max_new_tokens=0),
                                 dict(min_p=1.0), dict(repetition_penalty=0)])
def test_invalid_generation_settings_name_the_field(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        GenerationConfig(**bad)


def test_batched_generation_equals_one_by_one_on_a_random_model():
    model = tiny_model(128)
    prompts = ["a", "hello there", "xyz xyz xyz xyz"]
    batched = generate(model, TOK, prompts, max_new_tokens=10, stop_token_ids=())
    alone = [generate(model, TOK, [p], max_new_tokens=10, stop_token_ids=())[0] for p in prompts]
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    model = tiny_model(128)
    run = lambda seed: generate(model, TOK, ["abc"], max_new_tokens=12, temperature=1.0, seed=seed,  # noqa: E731
                                stop_token_ids=())[0].token_ids
    assert run(5) == run(5)
    assert run(5) != run(6)


def test_repetition_penalty_discourages_repeats_in_greedy_output():
    model = tiny_model(128)
    plain = generate(model, TOK, ["abc"], max_new_tokens=20, stop_token_ids=())[0].token_ids
    penalised = generate(model, TOK, ["abc"], max_new_tokens=20, stop_token_ids=(), repetition_penalty=50.0)[0].token_ids
    assert len(set(penalised)) > len(set(plain))
