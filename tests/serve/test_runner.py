"""The paged runner: index planning, the paged KV cache against the plain model, sampling."""
import pytest
import torch

from lmsmith.model.config import PRESETS
from lmsmith.model.transformer import Transformer
from lmsmith.sampling import SamplingSettings, make_generator, sample
from lmsmith.serve.request import Request, SamplingParams
from lmsmith.serve.runner import ModelRunner, PagedKVCache, plan_step, seen_tokens
from lmsmith.serve.scheduler import ScheduledSeq

BLOCK = 4


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny matmuls gain nothing from threads; on a busy machine OpenMP spinning makes them ~100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(preset: str = "tiny-llama", **changes) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(PRESETS[preset].replace(**changes)).eval()
    with torch.no_grad():  # larger weights than the init: peaked logits, varied greedy outputs
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


class Seq:
    """A sequence being fed to the runner step by step, with its own (scattered) blocks."""

    def __init__(self, rid: str, tokens: list[int], blocks: list[int]):
        self.rid, self.tokens, self.blocks, self.done = rid, tokens, blocks, 0

    def chunk(self, n: int) -> ScheduledSeq:
        start, end = self.done, min(self.done + n, len(self.tokens))
        self.done = end
        table = tuple(self.blocks[:-(-end // BLOCK)])
        return ScheduledSeq(self.rid, end - start, start, table, True, tuple(self.tokens[start:end]),
                            samples_token=end == len(self.tokens))


def scattered_blocks(num_blocks: int, counts: list[int], seed: int = 0) -> list[list[int]]:
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    out, at = [], 0
    for n in counts:
        out.append(order[at:at + n])
        at += n
    return out


def full_logits(model: Transformer, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]  # (T, V)


# -- plan_step --

def test_plan_step_slots_positions_and_mask():
    # row 0: blocks [3, 1], 1 token cached, 2 new at positions 1, 2; row 1: block [0], 1 new at position 0
    lay = plan_step([[3, 1], [0]], [1, 0], [2, 1], block_size=2)
    assert lay.positions.tolist() == [[1, 2], [0, 0]]  # row 1's padding query repeats its last position
    assert lay.write_slots.tolist() == [3 * 2 + 1, 1 * 2 + 0, 0]
    assert lay.write_rows.tolist() == [0, 1, 2]  # flat (B*T) index 3 is row 1's padding
    assert lay.gather_slots.view(2, 3).tolist() == [[6, 7, 2], [0, 0, 0]]  # row 1 pads re-reading a key
    assert lay.mask.shape == (2, 1, 2, 3)
    assert lay.mask[0, 0].tolist() == [[True, True, False], [True, True, True]]
    assert lay.mask[1, 0].tolist() == [[True, False, False], [True, False, False]]


def test_plan_step_without_padding_skips_the_row_selection():
    lay = plan_step([[5], [2]], [3, 0], [1, 1], block_size=4)
    assert lay.write_rows is None and lay.write_slots.tolist() == [23, 8]
    assert lay.mask[:, 0, 0].tolist() == [[True] * 4, [True, False, False, False]]


def test_plan_step_sliding_window_hides_old_keys():
    lay = plan_step([[0, 1]], [0], [5], block_size=4, sliding_window=2)
    assert lay.mask[0, 0, 4].tolist() == [False, False, False, True, True]


@pytest.mark.parametrize("tables, starts, counts", [
    ([[0]], [2], [3]),  # 5 tokens in one block of 4
    ([[0], [1]], [0], [1, 1]),  # lengths disagree
    ([[0]], [0], [0]),  # nothing to compute
    ([], [], []),
])
def test_plan_step_rejects_bad_steps(tables, starts, counts):
    with pytest.raises(ValueError):
        plan_step(tables, starts, counts, block_size=4)


# -- the paged cache against the plain model --

@pytest.mark.parametrize("preset, changes", [
    ("tiny-llama", {}), ("tiny-gpt", {}), ("tiny-llama", {"sliding_window": 5})])
def test_ragged_prefill_chunked_prefill_and_decode_match_the_plain_model(preset, changes):
    model = tiny_model(preset, **changes)
    runner = ModelRunner(model, num_blocks=32, block_size=BLOCK)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (13, 19, 6)]
    a, b, c = (Seq(f"r{i}", p, t) for i, p, t in zip(range(3), prompts, scattered_blocks(32, [6, 8, 4])))
    by_id = {"r0": a, "r1": b, "r2": c}
    errors = []

    def run(step):
        out, _ = runner.forward(step)
        for row, s in enumerate(step):
            end = s.start_position + s.num_new_tokens
            want = full_logits(model, by_id[s.request_id].tokens[:end])[s.start_position:]
            errors.append((out.logits[row, :s.num_new_tokens] - want).abs().max().item())

    run([a.chunk(13), b.chunk(6)])  # a whole prompt + a first chunk
    run([b.chunk(9), c.chunk(6)])  # a middle chunk + a new prompt; a sits this step out
    a.tokens.append(77)
    c.tokens.append(88)
    run([a.chunk(1), b.chunk(4), c.chunk(1)])  # decodes + the last chunk
    run([_decode(c, 89), _decode(a, 78)])  # pure decode, rows in another order
    assert len(errors) == 9 and max(errors) < 1e-4


def _decode(seq: Seq, token: int) -> ScheduledSeq:
    seq.tokens.append(token)
    return seq.chunk(1)


def test_compute_logits_takes_each_sampling_rows_last_real_position():
    model = tiny_model()
    runner = ModelRunner(model, num_blocks=16, block_size=BLOCK)
    a = Seq("a", list(range(10, 19)), [3, 7, 1])  # 9 tokens
    b = Seq("b", list(range(40, 52)), [0, 2, 5])  # 12 tokens, first chunk of 5 does not sample
    c = Seq("c", [5, 6, 7], [9])
    step = [a.chunk(9), b.chunk(5), c.chunk(3)]  # mixed lengths: the lm_head-on-hidden-states path
    logits = runner.compute_logits(step)
    assert logits.shape == (2, model.config.vocab_size)
    assert torch.allclose(logits[0], full_logits(model, a.tokens)[-1], atol=1e-4)
    assert torch.allclose(logits[1], full_logits(model, c.tokens)[-1], atol=1e-4)
    a.tokens.append(99)
    c.tokens.append(98)
    decode = [a.chunk(1), c.chunk(1)]  # every row ends at the last column: the logits_to_keep path
    logits = runner.compute_logits(decode)
    assert torch.allclose(logits[0], full_logits(model, a.tokens)[-1], atol=1e-4)
    assert torch.allclose(logits[1], full_logits(model, c.tokens)[-1], atol=1e-4)


def test_cache_holds_the_written_keys_in_their_slots():
    model = tiny_model()
    runner = ModelRunner(model, num_blocks=8, block_size=BLOCK)
    runner.forward([Seq("a", [11, 12, 13, 14, 15], [6, 2]).chunk(5)])
    cache = runner.cache
    assert cache.k[0].shape == (8, BLOCK, 2, 16) and cache.attention_mask_4d is None  # cleared after the step
    written = [(b, o) for b in range(8) for o in range(BLOCK) if cache.k[0][b, o].abs().sum() > 0]
    assert written == [(2, 0), (6, 0), (6, 1), (6, 2), (6, 3)]  # positions 4 | 0-3
    assert cache.num_bytes == 2 * 2 * 8 * BLOCK * 2 * 16 * 4


def test_update_without_prepare_is_an_error():
    cache = PagedKVCache(PRESETS["tiny-llama"], 2, BLOCK)
    with pytest.raises(AssertionError):
        cache.update(0, torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16))


# -- execute: sampling --

def request(rid: str, prompt: list[int], **params) -> Request:
    return Request(rid, prompt, SamplingParams(**params))


def test_execute_greedy_returns_the_argmax_and_skips_rows_that_do_not_sample():
    model = tiny_model()
    runner = ModelRunner(model, num_blocks=16, block_size=BLOCK)
    a, b = Seq("a", [4, 5, 6, 7, 8], [0, 1]), Seq("b", list(range(20, 30)), [2, 3, 4])
    reqs = {"a": request("a", a.tokens, temperature=0), "b": request("b", b.tokens, temperature=0)}
    tokens = runner.execute([a.chunk(5), b.chunk(4)], reqs)
    assert tokens == {"a": int(full_logits(model, a.tokens)[-1].argmax())}
    assert runner.execute([], reqs) == {}
    assert runner.execute([b.chunk(3)], reqs) == {}  # still mid-prompt


def test_seeded_generator_is_created_once_and_kept_across_steps():
    model = tiny_model()
    runner = ModelRunner(model, num_blocks=16, block_size=BLOCK)
    prompt = [4, 5, 6, 7, 8]
    req = request("s", prompt, temperature=1.0, seed=123)
    seq = Seq("s", list(prompt), [5, 6, 7])
    got = []
    for _ in range(4):
        token = runner.execute([seq.chunk(len(seq.tokens) - seq.done)], {"s": req})["s"]
        seq.tokens.append(token)
        req.output_token_ids.append(token)
        got.append(token)
    # the same draws from one generator seeded 123, on the plain model's logits
    gen, ids, want = make_generator(123), list(prompt), []
    settings = SamplingSettings.from_rows([req.sampling_params])
    for _ in range(4):
        want.append(int(sample(full_logits(model, ids)[-1:], settings, [gen])[0]))
        ids.append(want[-1])
    assert got == want
    assert runner.num_generators == 1
    runner.release("s")
    runner.release("never-seen")
    assert runner.num_generators == 0


def test_greedy_requests_get_no_generator():
    runner = ModelRunner(tiny_model(), num_blocks=4, block_size=BLOCK)
    runner.execute([Seq("g", [4, 5], [0]).chunk(2)], {"g": request("g", [4, 5], temperature=0)})
    assert runner.num_generators == 0


def test_seen_tokens_marks_prompt_and_output_ids():
    seen = seen_tokens([[1, 3, 3], [2]], vocab_size=5)
    assert seen.tolist() == [[False, True, False, True, False], [False, False, True, False, False]]


def test_runner_rejects_models_it_cannot_serve():
    with pytest.raises(ValueError, match="causal LM"):
        ModelRunner(Transformer(PRESETS["tiny-bert"]), num_blocks=4, block_size=BLOCK)


def test_forward_rejects_token_count_mismatch():
    runner = ModelRunner(tiny_model(), num_blocks=4, block_size=BLOCK)
    bad = ScheduledSeq("x", 3, 0, (0,), True, (4, 5), True)
    with pytest.raises(ValueError, match="2 token ids for 3 tokens"):
        runner.forward([bad])
