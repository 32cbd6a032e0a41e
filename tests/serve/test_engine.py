"""The engine against lmsmith.generation (same tokens), text handling, failures, and the asyncio front."""
import asyncio
import gc
import threading
import time

import pytest
import torch

from lmsmith.generation import generate
from lmsmith.model.config import PRESETS, ModelConfig
from lmsmith.model.transformer import Transformer
from lmsmith.serve.engine import (
    AsyncEngine,
    Engine,
    EngineConfig,
    EngineDrainingError,
    RequestOutput,
    first_stop,
    resolve_num_blocks,
)
from lmsmith.serve.request import SamplingParams
from lmsmith.serve.scheduler import QueueFullError

EOS = 2


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny matmuls gain nothing from threads; on a busy machine OpenMP spinning makes them ~100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class LetterTokenizer:
    """Token i decodes to one letter; 0-2 are special (2 = eos). Enough for token-level comparisons."""

    eos_ids, eos_id, pad_id = frozenset({EOS}), EOS, 0

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(97 + i % 26) for i in ids if not (skip_special_tokens and i < 3))


class PieceTokenizer:
    """Token i decodes to the bytes PIECES[i] (UTF-8, possibly half a character); 0-2 special."""

    eos_ids, eos_id, pad_id = frozenset({EOS}), EOS, 0
    PIECES = {i: bytes([ord("a") + i - 10]) for i in range(10, 36)} | {40: b"\xc3", 41: b"\xa9"}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        pieces = [self.PIECES.get(i, b"<s>" if i < 3 else b"?") for i in ids
                  if not (skip_special_tokens and i < 3)]
        return b"".join(pieces).decode("utf-8", errors="replace")


def tiny_model(**changes) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny-llama"].replace(**changes)).eval()
    with torch.no_grad():  # peaked logits, so greedy outputs vary instead of repeating one token
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


def bigram_model(next_token: dict[int, int], vocab: int = 64) -> Transformer:
    """A real Transformer whose greedy next token is next_token[last token] (else the token itself):
    identity embeddings, attention and MLP outputs zeroed, lm_head = the bigram table."""
    config = ModelConfig(vocab_size=vocab, hidden_size=vocab, num_layers=1, num_heads=4, num_kv_heads=2,
                         intermediate_size=16, max_position_embeddings=128)
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.zero_()
        model.embed.tokens.weight.copy_(torch.eye(vocab))
        for i in range(vocab):
            model.lm_head.weight[next_token.get(i, i), i] = 1.0
    return model


def run_engine(engine: Engine, max_steps: int = 1000) -> dict[str, list[RequestOutput]]:
    outputs: dict[str, list[RequestOutput]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return outputs
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
        engine.scheduler.check_invariants()
    raise AssertionError("engine made no progress")


def tokens_of(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def assert_all_blocks_free(engine: Engine) -> None:
    stats = engine.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert stats["num_running"] == stats["num_waiting"] == 0


PROMPTS = [[5, 9, 33], list(range(40, 51)), list(range(100, 123)), [7] * 6 + [300, 301]]


# -- same tokens as lmsmith.generation --

@pytest.mark.parametrize("config", [
    EngineConfig(block_size=4),
    EngineConfig(block_size=4, max_num_batched_tokens=8),  # chunked prefill alongside decodes
    EngineConfig(block_size=4, max_num_batched_tokens=24, enable_prefix_caching=False, max_num_seqs=2),
], ids=["default", "chunked", "two-at-a-time"])
@pytest.mark.parametrize("sampling", [
    {"temperature": 0}, {"temperature": 0.9},
    {"temperature": 0.7, "top_k": 20, "top_p": 0.9, "repetition_penalty": 1.3}],
    ids=["greedy", "seeded", "filters"])
def test_concurrent_requests_match_single_prompt_generate(config, sampling):
    model, tok = tiny_model(), LetterTokenizer()
    engine = Engine(model, tok, config)
    for i, prompt in enumerate(PROMPTS):
        params = SamplingParams(max_tokens=10, seed=100 + i, ignore_eos=True, **sampling)
        engine.add_request(f"r{i}", prompt, params)
    outs = run_engine(engine)
    for i, prompt in enumerate(PROMPTS):
        want = generate(model, tok, [prompt], max_new_tokens=10, seed=100 + i, stop_token_ids=(),
                        **sampling)[0]
        assert tokens_of(outs[f"r{i}"]) == want.token_ids, f"request r{i}"
        final = outs[f"r{i}"][-1]
        assert final.finished and final.finish_reason == "length" and final.completion_tokens == 10
        assert final.text == want.text == "".join(o.new_text for o in outs[f"r{i}"])
    assert_all_blocks_free(engine)
    assert engine.runner.num_generators == 0


def test_preemption_recomputes_and_gives_identical_output():
    model, tok = tiny_model(), LetterTokenizer()
    # 12 blocks of 4 tokens: four requests of ~30 tokens each cannot all hold their blocks at once
    engine = Engine(model, tok, EngineConfig(block_size=4, num_blocks=12, max_num_batched_tokens=64))
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=20, temperature=0.8 if i % 2 else 0,
                                                           seed=i, ignore_eos=True))
    outs = run_engine(engine)
    assert engine.stats()["num_preemptions"] > 0
    for i, prompt in enumerate(PROMPTS):
        want = generate(model, tok, [prompt], max_new_tokens=20, temperature=0.8 if i % 2 else 0, seed=i,
                        stop_token_ids=())[0]
        assert tokens_of(outs[f"r{i}"]) == want.token_ids, f"request r{i}"
    assert_all_blocks_free(engine)


def test_prefix_cache_hit_gives_identical_output():
    model, tok = tiny_model(), LetterTokenizer()
    engine = Engine(model, tok, EngineConfig(block_size=4))
    prompt = list(range(60, 90))  # 30 tokens: 7 full blocks can be shared
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    engine.add_request("first", prompt, params)
    first = run_engine(engine)["first"]
    engine.add_request("second", prompt, params)
    engine.add_request("other", prompt[:17] + [5, 6, 7], params)  # shares 4 blocks
    outs = run_engine(engine)
    assert tokens_of(outs["second"]) == tokens_of(first)
    assert first[-1].cached_tokens == 0 and outs["second"][-1].cached_tokens == 28
    assert outs["other"][-1].cached_tokens == 16
    want = generate(model, tok, [prompt[:17] + [5, 6, 7]], max_new_tokens=8, stop_token_ids=())[0]
    assert tokens_of(outs["other"]) == want.token_ids
    assert engine.stats()["prefix_cache_hits"] == 44


# -- aborts, failures, limits --

def test_abort_mid_generation_frees_all_blocks():
    engine = Engine(tiny_model(), LetterTokenizer(), EngineConfig(block_size=4))
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.stats()["kv_blocks_free"] < engine.stats()["kv_blocks_total"]
    assert engine.abort("r1") and not engine.abort("r1") and not engine.abort("nope")
    outs = engine.step()
    aborted = [o for o in outs if o.request_id == "r1"]
    assert len(aborted) == 1 and aborted[0].finished and aborted[0].finish_reason == "abort"
    assert aborted[0].new_token_ids == [] and aborted[0].completion_tokens == 3
    assert all(o.request_id != "r1" for o in engine.step())
    assert engine.abort_all() == 3
    run_engine(engine)
    assert_all_blocks_free(engine)
    assert engine.stats()["finished_abort_total"] == 4


def test_a_failing_forward_ends_that_steps_requests_and_leaks_nothing():
    model, tok = tiny_model(), LetterTokenizer()
    engine = Engine(model, tok, EngineConfig(block_size=4))
    real_forward, calls = model.forward, []

    def flaky_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated device error")
        return real_forward(*args, **kwargs)

    model.forward = flaky_forward
    for i in range(2):
        engine.add_request(f"r{i}", PROMPTS[i], SamplingParams(max_tokens=5, ignore_eos=True))
    engine.step()
    failed = engine.step()
    assert {o.request_id for o in failed} == {"r0", "r1"}
    assert all(o.finished and o.finish_reason == "error" and "simulated" in o.error for o in failed)
    assert_all_blocks_free(engine)
    assert engine.stats()["num_failed_steps"] == 1
    engine.add_request("after", PROMPTS[2], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    outs = run_engine(engine)
    want = generate(model, tok, [PROMPTS[2]], max_new_tokens=6, stop_token_ids=())[0]
    assert tokens_of(outs["after"]) == want.token_ids
    assert_all_blocks_free(engine)


def test_add_request_rejects_bad_input_with_the_numbers():
    engine = Engine(tiny_model(), LetterTokenizer(), EngineConfig(block_size=4, max_waiting_requests=1))
    assert engine.max_model_len == 256
    with pytest.raises(ValueError, match=r"prompt of 250 tokens \+ max_tokens=10 = 260 tokens exceeds .*256"):
        engine.add_request("long", [5] * 250, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match=r"\[600\] are outside the vocabulary of 512"):
        engine.add_request("vocab", [5, 600], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", [], SamplingParams())
    engine.add_request("ok", [5, 6], SamplingParams())
    with pytest.raises(ValueError, match="already queued"):
        engine.add_request("ok", [5, 6], SamplingParams())
    with pytest.raises(QueueFullError):
        engine.add_request("full", [5, 6], SamplingParams())
    assert engine.stats()["num_waiting"] == 1


def test_engine_config_validation_and_memory_budget():
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=0)
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="kv_cache_memory_mb"):
        EngineConfig(kv_cache_memory_mb=0)
    model = tiny_model()
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        Engine(model, LetterTokenizer(), EngineConfig(max_model_len=1000))
    # tiny-llama: 2 layers x 2 kv heads x 16 dims x 4 bytes x (K, V) = 512 bytes per token
    assert resolve_num_blocks(EngineConfig(block_size=16, kv_cache_memory_mb=0.25), model, 256) == 32
    assert resolve_num_blocks(EngineConfig(block_size=16, max_num_seqs=2), model, 256) == 32  # capped by use
    assert resolve_num_blocks(EngineConfig(num_blocks=7), model, 256) == 7


def test_max_model_len_finishes_with_length():
    engine = Engine(tiny_model(), LetterTokenizer(), EngineConfig(block_size=4, max_model_len=12))
    engine.add_request("r", [5] * 8, SamplingParams(max_tokens=4, ignore_eos=True))
    final = run_engine(engine)["r"][-1]
    assert final.finish_reason == "length" and final.completion_tokens == 4 and final.prompt_tokens == 8


# -- text: stop strings, stop tokens, UTF-8 --

CYCLE = {10: 11, 11: 12, 12: 13, 13: 14, 14: 10}  # a -> b -> c -> d -> e -> a ...


def run_one(model, tok, prompt, **params) -> list[RequestOutput]:
    engine = Engine(model, tok, EngineConfig(block_size=4))
    engine.add_request("r", prompt, SamplingParams(temperature=0, **params))
    outs = run_engine(engine)["r"]
    assert_all_blocks_free(engine)
    return outs


def test_stop_string_is_held_back_then_cut():
    outs = run_one(bigram_model(CYCLE), PieceTokenizer(), [10], max_tokens=30, stop=("ea", "zz"))
    assert [o.new_text for o in outs] == ["b", "c", "d", "", ""]  # "e" might start "ea": held, then cut
    final = outs[-1]
    assert final.text == "bcd" and final.finish_reason == "stop" and final.stop_reason == "ea"
    assert final.completion_tokens == 5


def test_stop_string_on_the_last_allowed_token_wins_over_length():
    model, tok = bigram_model(CYCLE), PieceTokenizer()
    outs = run_one(model, tok, [10], max_tokens=5, stop="a")
    assert outs[-1].finish_reason == "stop" and outs[-1].text == "bcde"
    want = generate(model, tok, [[10]], max_new_tokens=5, stop=("a",), stop_token_ids=())[0]
    assert (want.text, want.finish_reason) == ("bcde", "stop")


def test_text_that_only_looked_like_a_stop_string_is_released():
    outs = run_one(bigram_model(CYCLE), PieceTokenizer(), [10], max_tokens=7, stop="dx")
    assert [o.new_text for o in outs] == ["b", "c", "", "de", "a", "b", "c"]
    assert outs[-1].text == "bcdeabc" and outs[-1].finish_reason == "length"


def test_eos_stops_and_its_text_is_not_shown():
    outs = run_one(bigram_model({10: 11, 11: 12, 12: EOS}), PieceTokenizer(), [10], max_tokens=10)
    assert tokens_of(outs) == [11, 12, EOS]
    assert outs[-1].text == "bc" and outs[-1].finish_reason == "stop" and outs[-1].stop_reason == EOS


def test_ignore_eos_keeps_going_but_stop_token_ids_still_stop():
    model, tok = bigram_model({10: 11, 11: EOS, EOS: 12, 12: 13}), PieceTokenizer()
    outs = run_one(model, tok, [10], max_tokens=4, ignore_eos=True)
    assert tokens_of(outs) == [11, EOS, 12, 13] and outs[-1].text == "bcd"
    outs = run_one(model, tok, [10], max_tokens=10, ignore_eos=True, stop_token_ids=(12,))
    assert tokens_of(outs) == [11, EOS, 12] and outs[-1].text == "b" and outs[-1].stop_reason == 12


def test_multibyte_characters_are_never_split_across_outputs():
    outs = run_one(bigram_model({10: 40, 40: 41, 41: 10}), PieceTokenizer(), [10], max_tokens=6)
    assert [o.new_text for o in outs] == ["", "é", "a", "", "é", "a"]
    assert outs[-1].text == "éaéa" and not any("\ufffd" in o.text for o in outs)


def test_first_stop_finds_the_earliest_stop_string():
    assert first_stop("xxabcab", ("ca", "ab")) == (2, "ab")
    assert first_stop("xxabcab", ("ca", "ab"), start=3) == (4, "ca")
    assert first_stop("xyz", ("q",)) is None


def test_stats_count_tokens_and_finishes():
    engine = Engine(tiny_model(), LetterTokenizer(), EngineConfig(block_size=4, max_num_batched_tokens=8))
    for i, prompt in enumerate(PROMPTS[:2]):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=3, ignore_eos=True))
    run_engine(engine)
    stats = engine.stats()
    assert stats["num_requests_total"] == 2 and stats["prompt_tokens_total"] == 14
    assert stats["generation_tokens_total"] == 6 and stats["finished_length_total"] == 2
    assert stats["prefill_tokens_total"] == 14  # the other steps were one-token decodes
    assert stats["batched_tokens_total"] == 14 + 4 and stats["num_steps"] >= 2


def engine_on_a_manual_clock() -> tuple[Engine, dict[str, list[RequestOutput]]]:
    """One slot, 4-token budget: `a` (arrives at 0) runs at 10-11; `b` (arrives at 1, 6-token prompt)
    waits, is first scheduled at 12 (first prefill chunk) and gets its first token at 13."""
    now = [0.0]
    engine = Engine(tiny_model(), LetterTokenizer(), EngineConfig(block_size=4, max_num_seqs=1,
                                                                  max_num_batched_tokens=4), clock=lambda: now[0])
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    engine.add_request("a", [5, 9, 33], params)
    now[0] = 1.0
    engine.add_request("b", list(range(40, 46)), params)
    outputs: dict[str, list[RequestOutput]] = {}
    for t in (10.0, 11.0, 12.0, 13.0, 14.0):
        now[0] = t
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    assert not engine.has_unfinished()
    return engine, outputs


def test_outputs_carry_the_first_scheduled_time():
    _, outputs = engine_on_a_manual_clock()
    a, b = outputs["a"], outputs["b"]
    assert [o.first_scheduled_time for o in a] == [10.0, 10.0] and a[0].first_token_time == 10.0
    assert [o.first_scheduled_time for o in b] == [12.0, 12.0]
    assert b[0].arrival_time == 1.0 and b[0].first_token_time == 13.0 and b[-1].finish_time == 14.0


def test_queue_time_metric_is_arrival_to_first_scheduled():
    from lmsmith.serve.metrics import ServingMetrics

    _, outputs = engine_on_a_manual_clock()
    metrics = ServingMetrics()
    for out in [*outputs["a"], *outputs["b"]]:
        metrics.observe_output(out)
    value = metrics.registry.get_sample_value
    labels = {"priority": "0"}
    assert value("lmsmith:request_queue_time_seconds_count", labels) == 2
    assert value("lmsmith:request_queue_time_seconds_sum", labels) == (10 - 0) + (12 - 1)
    assert value("lmsmith:time_to_first_token_seconds_sum", labels) == (10 - 0) + (13 - 1)


# -- the asyncio front --

def async_engine(model=None, tok=None, **config) -> AsyncEngine:
    config.setdefault("block_size", 4)
    engine = AsyncEngine(Engine(model or tiny_model(), tok or LetterTokenizer(), EngineConfig(**config)))
    engine.start()
    return engine


async def collect(stream) -> list[RequestOutput]:
    return [out async for out in stream]


async def wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


def test_async_streams_match_the_sync_engine_in_order():
    model = tiny_model()
    engine = async_engine(model)
    params = [SamplingParams(max_tokens=8, temperature=0.9 if i % 2 else 0, seed=i, ignore_eos=True)
              for i in range(len(PROMPTS))]

    async def main():
        streams = [engine.generate(p, params[i], request_id=f"r{i}") for i, p in enumerate(PROMPTS)]
        return await asyncio.gather(*(collect(s) for s in streams))

    try:
        results = asyncio.run(main())
        sync = Engine(model, LetterTokenizer(), EngineConfig(block_size=4))
        for i, p in enumerate(PROMPTS):
            sync.add_request(f"r{i}", p, params[i])
        want = run_engine(sync)
        for i, outs in enumerate(results):
            assert [o.completion_tokens for o in outs] == list(range(1, 9))  # one token per output, in order
            assert tokens_of(outs) == tokens_of(want[f"r{i}"])
            assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        assert engine.stats()["num_streams"] == 0
    finally:
        engine.shutdown()
    assert not engine.is_running


def test_cancelled_closed_and_dropped_streams_abort_and_free_their_blocks():
    engine = async_engine(max_num_seqs=8)
    long = SamplingParams(max_tokens=240, ignore_eos=True)

    async def main():
        tasks = [asyncio.create_task(collect(engine.generate(PROMPTS[i % 2], long))) for i in range(24)]
        await wait_until(lambda: engine.stats()["generation_tokens_total"] >= 16)  # 8 running, 16 waiting
        for task in tasks:  # the client went away while its handler awaited the next output
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for i in range(6):  # break out of an async for, then aclose()
            stream = engine.generate(PROMPTS[i % 2], long)
            async for _ in stream:
                break
            await stream.aclose()
        engine.generate(PROMPTS[0], long)  # never iterated: dropping it aborts (via __del__)
        gc.collect()
        await wait_until(lambda: not engine.engine.has_unfinished())

    try:
        asyncio.run(main())
        stats = engine.stats()
        assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["num_running"] == 0
        assert stats["finished_abort_total"] == 31 and stats["num_streams"] == 0
    finally:
        engine.shutdown()


def test_cancelling_before_the_first_output_aborts_too():
    engine = async_engine()

    async def main():
        stream = engine.generate(PROMPTS[0], SamplingParams(max_tokens=200, ignore_eos=True))
        task = asyncio.create_task(collect(stream))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: not engine.engine.has_unfinished())

    try:
        asyncio.run(main())
        assert engine.stats()["finished_abort_total"] == 1
    finally:
        engine.shutdown()


def test_errors_surface_at_the_generate_call():
    engine = async_engine(max_waiting_requests=1)
    gate = threading.Event()
    real_step = engine.engine.step
    engine.engine.step = lambda: (gate.wait(5), real_step())[1]  # hold the engine so the queue fills

    async def main():
        with pytest.raises(ValueError, match="exceeds the limit"):
            engine.generate([5] * 250, SamplingParams(max_tokens=100))
        first = engine.generate([5, 6], SamplingParams(max_tokens=2))
        with pytest.raises(QueueFullError):
            engine.generate([5, 6], SamplingParams(max_tokens=2))
        with pytest.raises(ValueError, match="already streaming"):
            engine.generate([5, 6], SamplingParams(max_tokens=2), request_id=first.request_id)
        gate.set()
        return await collect(first)

    try:
        outs = asyncio.run(main())
        assert outs[-1].finish_reason == "length"
    finally:
        gate.set()
        engine.shutdown()


def test_generate_needs_a_started_engine():
    engine = AsyncEngine(Engine(tiny_model(), LetterTokenizer(), EngineConfig(block_size=4)))

    async def main():
        engine.generate([5], SamplingParams())

    with pytest.raises(RuntimeError, match="start"):
        asyncio.run(main())
    assert not engine.is_ready


def test_drain_finishes_in_flight_requests_and_refuses_new_ones():
    engine = async_engine()

    async def main():
        short = asyncio.create_task(collect(engine.generate(PROMPTS[0], SamplingParams(max_tokens=3))))
        aborted = await engine.drain(timeout_s=10)
        with pytest.raises(EngineDrainingError):
            engine.generate(PROMPTS[0], SamplingParams())
        return aborted, await short

    try:
        aborted, outs = asyncio.run(main())
        assert aborted == 0 and outs[-1].finish_reason == "length"
        assert not engine.is_ready and engine.is_running
    finally:
        engine.shutdown()


def test_drain_timeout_aborts_what_is_left():
    engine = async_engine()

    async def main():
        long = asyncio.create_task(collect(engine.generate(PROMPTS[1], SamplingParams(max_tokens=200,
                                                                                     ignore_eos=True))))
        await asyncio.sleep(0.05)
        aborted = await engine.drain(timeout_s=0.05)
        return aborted, await long

    try:
        aborted, outs = asyncio.run(main())
        assert aborted == 1 and outs[-1].finish_reason == "abort" and outs[-1].completion_tokens < 200
        assert engine.stats()["kv_blocks_free"] == engine.stats()["kv_blocks_total"]
    finally:
        engine.shutdown()


def test_hooks_see_every_output_and_step_and_a_broken_hook_is_ignored():
    engine = async_engine()
    seen, steps = [], []
    engine.on_output.append(lambda out: seen.append((out.request_id, out.completion_tokens)))
    engine.on_output.append(lambda out: 1 / 0)
    engine.on_step.append(lambda stats, seconds: steps.append((stats["num_running"], seconds)))

    async def main():
        return await collect(engine.generate(PROMPTS[0], SamplingParams(max_tokens=4, ignore_eos=True),
                                             request_id="h"))

    try:
        outs = asyncio.run(main())
        assert seen == [("h", 1), ("h", 2), ("h", 3), ("h", 4)] and len(outs) == 4
        assert len(steps) >= 4 and all(seconds > 0 for _, seconds in steps)
    finally:
        engine.shutdown()


def test_shutdown_aborts_open_streams_and_stops_the_thread():
    engine = async_engine()

    async def main():
        stream = engine.generate(PROMPTS[0], SamplingParams(max_tokens=200, ignore_eos=True))
        await stream.__anext__()
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
        return await collect(stream)

    rest = asyncio.run(main())
    assert rest[-1].finish_reason == "abort"
    assert not engine.is_running and not engine.engine.has_unfinished()
    with pytest.raises(EngineDrainingError):
        asyncio.run(_generate(engine))


async def _generate(engine):
    engine.generate([5], SamplingParams())


def test_the_idle_engine_thread_sleeps():
    engine = async_engine()
    try:
        time.sleep(0.1)
        assert engine.is_ready and any(t.name == "lmsmith-engine" for t in threading.enumerate())
        before = time.process_time()  # CPU time of every thread of this process
        time.sleep(0.5)
        assert engine.engine.counters["num_steps"] == 0 and time.process_time() - before < 0.1
    finally:
        engine.shutdown()


# -- the real model --

REAL_PROMPTS = ["The history of the printing press begins", "def fibonacci(n):",
                "Write a short poem about the sea. Make it rhyme, and give it a title."]


@pytest.fixture(scope="module")
def smollm2():
    from lmsmith.api import load

    return load("smollm2")


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.8, "top_p": 0.95}],
                         ids=["greedy", "seeded"])
def test_real_model_engine_matches_generate(smollm2, sampling):
    model, tok = smollm2
    engine = Engine(model, tok, EngineConfig(block_size=16, max_num_batched_tokens=16, num_blocks=64))
    ids = [tok.encode(p) for p in REAL_PROMPTS]
    for i, prompt in enumerate(ids):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=24, seed=7 + i, **sampling))
    outs = run_engine(engine)
    for i, prompt in enumerate(ids):
        want = generate(model, tok, [prompt], max_new_tokens=24, seed=7 + i, **sampling)[0]
        got = tokens_of(outs[f"r{i}"])
        if outs[f"r{i}"][-1].finish_reason == "stop":
            assert got[-1] in tok.eos_ids
            got = got[:-1]  # generate does not return the stop token
        assert got == want.token_ids, f"prompt {i}"
        assert outs[f"r{i}"][-1].text == want.text and outs[f"r{i}"][-1].finish_reason == want.finish_reason
    assert_all_blocks_free(engine)
