"""Requests and the continuous-batching scheduler, driven by a fake clock and fake sampled tokens."""
import random

import pytest

from lmsmith.serve.kv_blocks import KVBlockManager
from lmsmith.serve.request import Request, RequestStatus, SamplingParams
from lmsmith.serve.scheduler import QueueFullError, Scheduler, SchedulerConfig, SchedulerOutput

TOKEN = 7  # what the fake model always samples (never a stop token unless a test says so)


def make(num_blocks: int = 64, block_size: int = 4, prefix: bool = True, **config) -> Scheduler:
    config.setdefault("aging_interval_s", None)
    return Scheduler(SchedulerConfig(**config), KVBlockManager(num_blocks, block_size, prefix))


def add(s: Scheduler, rid: str, prompt, max_tokens: int = 4, t: float = 0.0, **kw) -> Request:
    prompt = list(range(100, 100 + prompt)) if isinstance(prompt, int) else list(prompt)
    r = Request(rid, prompt, SamplingParams(max_tokens=max_tokens), arrival_time=t, **kw)
    s.add(r)
    return r


def step(s: Scheduler, now: float = 0.0, token: int = TOKEN) -> SchedulerOutput:
    """One engine step; checks the plan's basic promises on the way."""
    out = s.schedule(now)
    assert out.num_batched_tokens <= s.config.max_num_batched_tokens
    assert len(out.scheduled) <= s.config.max_num_seqs
    s.update({seq.request_id: token for seq in out.scheduled if seq.samples_token}, now)
    s.check_invariants()
    return out


def run(s: Scheduler, now: float = 0.0, dt: float = 1.0, max_steps: int = 500,
        token: int = TOKEN) -> list[SchedulerOutput]:
    outs = []
    while s.has_unfinished():
        assert len(outs) < max_steps, "scheduler made no progress"
        outs.append(step(s, now, token))
        now += dt
    return outs


def seqs_of(outs: list[SchedulerOutput], rid: str):
    return [seq for out in outs for seq in out.scheduled if seq.request_id == rid]


# -- SamplingParams and Request --

def test_sampling_params_defaults_and_normalization():
    p = SamplingParams(stop="###", stop_token_ids=[5, 6], top_k=-1, temperature=0)
    assert p.stop == ("###",) and p.stop_token_ids == (5, 6) and p.top_k == 0 and p.greedy
    with pytest.raises(AttributeError):
        p.max_tokens = 3  # frozen


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", 2.0), ("temperature", -0.1), ("temperature", float("nan")),
    ("top_k", -2), ("top_p", 0.0), ("top_p", 1.5), ("min_p", 1.0), ("repetition_penalty", 0.0),
    ("seed", "42"), ("ignore_eos", 1),
])
def test_sampling_params_reject_out_of_range(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}="):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("kwargs, match", [
    ({"stop": ["ok", ""]}, "stop contains ''"),
    ({"stop_token_ids": [3, -1]}, "stop_token_ids contains -1"),
])
def test_sampling_params_reject_bad_stops(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"request_id": ""}, ValueError, "request_id"),
    ({"prompt_token_ids": []}, ValueError, "empty"),
    ({"prompt_token_ids": [1, -3]}, ValueError, "prompt_token_ids contains -3"),
    ({"priority": 1.5}, ValueError, "priority=1.5"),
    ({"deadline": "soon"}, ValueError, "deadline="),
    ({"sampling_params": {"max_tokens": 3}}, TypeError, "SamplingParams"),
])
def test_request_validation(kwargs, error, match):
    args = {"request_id": "r", "prompt_token_ids": [1, 2], **kwargs}
    with pytest.raises(error, match=match):
        Request(**args)


def test_request_token_views():
    r = Request("r", [1, 2, 3], eos_token_ids=[0])
    r.output_token_ids += [4, 5]
    assert r.num_tokens == 5 and r.all_token_ids == [1, 2, 3, 4, 5]
    assert r.token_ids_between(0, 5) == [1, 2, 3, 4, 5]
    assert r.token_ids_between(2, 4) == [3, 4] and r.token_ids_between(4, 5) == [5]
    assert r.is_stop_token(0) and not r.is_stop_token(4)


# -- configuration and admission errors --

@pytest.mark.parametrize("kwargs, match", [
    ({"max_num_seqs": 0}, "max_num_seqs=0"),
    ({"max_num_batched_tokens": -5}, "max_num_batched_tokens=-5"),
    ({"max_waiting_tokens": 0}, "max_waiting_tokens=0"),
    ({"aging_interval_s": 0.0}, "aging_interval_s=0.0"),
    ({"max_model_len": 1}, "max_model_len=1"),
])
def test_scheduler_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SchedulerConfig(**kwargs)


def test_add_rejects_requests_that_can_never_run():
    s = make(num_blocks=4, block_size=4, max_model_len=12)
    add(s, "a", 5)
    with pytest.raises(ValueError, match="already queued"):
        add(s, "a", 5)
    with pytest.raises(ValueError, match="no room to generate"):
        add(s, "long", 12)
    with pytest.raises(TypeError):
        s.add("not a request")
    used = Request("used", [1])
    used.output_token_ids.append(3)
    with pytest.raises(ValueError, match="not fresh"):
        s.add(used)
    no_chunks = make(max_num_batched_tokens=8, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="no room to generate"):
        add(no_chunks, "big", 9)


def test_queue_bounds_raise_queue_full():
    s = make(max_waiting_requests=2, max_num_seqs=1)
    add(s, "a", 3)
    add(s, "b", 3)
    with pytest.raises(QueueFullError, match="2 of 2 requests"):
        add(s, "c", 3)
    step(s)  # "a" leaves the queue
    add(s, "c", 3)
    assert s.num_waiting == 2

    t = make(max_waiting_tokens=10, max_num_seqs=1)
    add(t, "a", 6)
    with pytest.raises(QueueFullError, match="max_waiting_tokens=10"):
        add(t, "b", 6)
    assert t.num_waiting_tokens == 6
    with pytest.raises(ValueError, match="can never fit"):
        add(t, "huge", 11)
    step(t)
    add(t, "b", 6)  # room again once "a" runs
    assert t.num_waiting_tokens == 6


def test_update_must_follow_schedule_and_cover_sampling_sequences():
    s = make()
    add(s, "a", 3)
    s.schedule(0.0)
    with pytest.raises(RuntimeError, match="update"):
        s.schedule(1.0)
    with pytest.raises(ValueError, match="no sampled token"):
        s.update({}, 0.0)
    s.update({"a": TOKEN, "unknown": 1}, 0.0)
    assert s.get("a").output_token_ids == [TOKEN]


# -- batching --

def test_token_budget_respected_every_step_and_used():
    s = make(max_num_batched_tokens=10, max_num_seqs=8)
    prompts = [3, 25, 7, 14, 1, 9]
    reqs = [add(s, f"r{i}", n, max_tokens=5, t=float(i)) for i, n in enumerate(prompts)]
    outs = run(s)  # step() asserts the budget
    assert max(o.num_batched_tokens for o in outs) == 10
    assert all(r.num_output_tokens == 5 and r.finish_reason == "length" for r in reqs)
    assert s.block_manager.num_free_blocks == 64


def test_chunked_prefill_splits_a_long_prompt_and_mixes_with_decodes():
    s = make(max_num_batched_tokens=8)
    short = add(s, "short", 2, max_tokens=10)
    step(s)  # short's prefill; it decodes from now on
    add(s, "long", 20, max_tokens=2, t=1.0)
    outs = [step(s, 1.0) for _ in range(3)]
    chunks = [{seq.request_id: seq for seq in o.scheduled} for o in outs]
    assert all(c["short"].num_new_tokens == 1 and not c["short"].is_prefill for c in chunks)
    assert [c["long"].num_new_tokens for c in chunks] == [7, 7, 6]
    assert [c["long"].start_position for c in chunks] == [0, 7, 14]
    assert [c["long"].samples_token for c in chunks] == [False, False, True]
    assert all(c["long"].is_prefill for c in chunks)
    assert chunks[1]["long"].token_ids == tuple(range(107, 114))
    assert s.get("long").output_token_ids == [TOKEN] and short.num_output_tokens == 4


def test_without_chunked_prefill_prompts_run_whole_in_rank_order():
    s = make(max_num_batched_tokens=8, enable_chunked_prefill=False, prefix=False)
    add(s, "a", 6)
    add(s, "b", 5, t=1.0)
    add(s, "c", 1, t=2.0)
    first = step(s)
    # "b" does not fit in the 2 tokens left, and "c" may not overtake it (head of line).
    assert [(q.request_id, q.num_new_tokens) for q in first.scheduled] == [("a", 6)]
    second = step(s)
    assert [(q.request_id, q.num_new_tokens) for q in second.scheduled] == [("a", 1), ("b", 5), ("c", 1)]


def test_max_num_seqs_caps_running_requests():
    s = make(max_num_seqs=2)
    for i in range(5):
        add(s, f"r{i}", 3, max_tokens=3, t=float(i))
    outs = run(s)
    assert max(len(o.scheduled) for o in outs) == 2
    assert s.num_running == 0 and s.stats().num_waiting == 0
    first_steps = {rid: next(i for i, o in enumerate(outs) if rid in {q.request_id for q in o.scheduled})
                   for rid in ("r0", "r1", "r2", "r3", "r4")}
    assert first_steps == {"r0": 0, "r1": 0, "r2": 3, "r3": 3, "r4": 6}  # FCFS, 3 steps per request


def test_prefix_cache_shares_a_common_prompt_prefix():
    s = make(block_size=4)
    system = list(range(50, 62))  # 3 full blocks shared by both prompts
    a = add(s, "a", system + [1, 2], max_tokens=2)
    step(s)  # computes a's prompt and publishes its full blocks
    shared_blocks = tuple(a.block_table[:3])
    b = add(s, "b", system + [3], max_tokens=2, t=1.0)
    out = step(s, 1.0)
    seq_b = next(q for q in out.scheduled if q.request_id == "b")
    assert (seq_b.start_position, seq_b.num_new_tokens) == (12, 1)
    assert b.num_cached_tokens == 12
    assert seq_b.block_table[:3] == shared_blocks
    bm = s.block_manager
    assert bm.prefix_cache_hits == 12 and bm.prefix_cache_queries == 14 + 13
    run(s)
    assert s.stats().prefix_cache_hit_rate == pytest.approx(12 / 27)
    assert bm.num_free_blocks == bm.num_blocks


# -- preemption --

def test_preemption_by_recompute_when_blocks_run_out():
    s = make(num_blocks=6, block_size=2, prefix=False)
    a = add(s, "a", 2, max_tokens=6)
    b = add(s, "b", 2, max_tokens=6, t=1.0)
    outs = run(s)
    preempting = [i for i, o in enumerate(outs) if o.preempted_ids]
    assert preempting and all(outs[i].preempted_ids == ("b",) for i in preempting)  # the later arrival
    assert a.num_preemptions == 0 and b.num_preemptions >= 1 and s.num_preemptions == b.num_preemptions
    # Back in, b recomputes its prompt and the tokens it had generated, then carries on.
    resumed = seqs_of(outs[preempting[0] + 1:], "b")[0]
    tokens_before = sum(q.samples_token for q in seqs_of(outs[:preempting[0]], "b"))
    assert resumed.start_position == 0 and resumed.num_new_tokens == 2 + tokens_before and resumed.is_prefill
    assert a.output_token_ids == b.output_token_ids == [TOKEN] * 6
    assert a.finish_reason == b.finish_reason == "length"
    assert s.block_manager.num_free_blocks == 6


def test_priority_preemption_frees_a_slot():
    s = make(max_num_seqs=1)
    low = add(s, "low", 3, max_tokens=5, priority=5)
    step(s)
    step(s)
    high = add(s, "high", 3, max_tokens=2, priority=0, t=2.0)
    out = step(s, 2.0)
    assert out.preempted_ids == ("low",) and [q.request_id for q in out.scheduled] == ["high"]
    assert low.status is RequestStatus.PREEMPTED and low.block_table == []
    run(s, 3.0)
    assert high.finish_time < low.finish_time
    assert low.output_token_ids == [TOKEN] * 5 and low.num_preemptions == 1


def test_priority_preemption_frees_blocks_and_unschedules_the_victim():
    s = make(num_blocks=4, block_size=4, prefix=False, max_num_seqs=4, max_num_batched_tokens=8)
    low = add(s, "low", 8, max_tokens=8, priority=3)
    for _ in range(4):
        step(s)  # low holds 3 of the 4 blocks
    assert len(low.block_table) == 3
    add(s, "high", 8, max_tokens=2, priority=1, t=4.0)
    out = step(s, 4.0)
    # low was scheduled first (running go first), then preempted: its decode must not be in the step.
    assert out.preempted_ids == ("low",) and [q.request_id for q in out.scheduled] == ["high"]
    assert out.scheduled[0].num_new_tokens == 8  # low's decode token went back into the budget
    run(s, 5.0)
    assert low.output_token_ids == [TOKEN] * 8 and s.block_manager.num_free_blocks == 4


@pytest.mark.parametrize("config", [{"priority_preemption": False}, {}])
def test_no_preemption_when_disabled_or_not_strictly_better(config):
    s = make(max_num_seqs=1, **config)
    first = add(s, "first", 3, max_tokens=3, priority=2)
    step(s)
    later = add(s, "later", 3, max_tokens=3, priority=0 if config else 2, t=1.0)
    outs = run(s, 1.0)
    assert all(not o.preempted_ids for o in outs)
    assert first.num_preemptions == 0 and first.finish_time < later.finish_time


def ids(out: SchedulerOutput) -> list[str]:
    return [q.request_id for q in out.scheduled]


def test_urgent_prefill_runs_without_worse_decodes_which_keep_their_blocks():
    s = make(max_num_seqs=4)
    lows = [add(s, f"low{i}", 3, max_tokens=6, priority=5) for i in range(2)]
    step(s)
    tables = [list(r.block_table) for r in lows]
    add(s, "high", 5, max_tokens=3, priority=0, t=1.0)
    out = step(s, 1.0)
    assert ids(out) == ["high"] and out.scheduled[0].is_prefill and not out.preempted_ids
    assert [r.block_table for r in lows] == tables and all(r.num_output_tokens == 1 for r in lows)
    out = step(s, 2.0)  # high has its first token: everyone decodes together again
    assert sorted(ids(out)) == ["high", "low0", "low1"]


def test_urgent_prefill_isolation_can_be_turned_off():
    s = make(max_num_seqs=4, isolate_urgent_prefill=False)
    add(s, "low", 3, max_tokens=6, priority=5)
    step(s)
    add(s, "high", 5, max_tokens=3, priority=0, t=1.0)
    assert sorted(ids(step(s, 1.0))) == ["high", "low"]


def test_urgent_prefill_keeps_same_level_decodes_and_spans_its_chunks():
    s = make(max_num_seqs=4, max_num_batched_tokens=4, block_size=4)
    add(s, "low", 2, max_tokens=8, priority=5)
    add(s, "vip", 2, max_tokens=8, priority=0)
    step(s)
    add(s, "high", 10, max_tokens=2, priority=0, t=1.0)
    chunks = [step(s, 1.0 + k) for k in range(4)]
    # vip (same level as high) keeps decoding; low waits until high's prompt (10 tokens, 3 per step
    # next to vip's decode) has produced the first token.
    assert [sorted(ids(o)) for o in chunks] == [["high", "vip"]] * 4
    assert [q.num_new_tokens for o in chunks for q in o.scheduled if q.request_id == "high"] == [3, 3, 3, 1]
    assert "low" in ids(step(s, 5.0))


def test_urgent_request_that_cannot_start_does_not_stall_the_running_ones():
    s = make(max_num_seqs=1, priority_preemption=False)
    low = add(s, "low", 3, max_tokens=4, priority=5)
    step(s)
    high = add(s, "high", 3, max_tokens=2, priority=0, t=1.0)
    out = step(s, 1.0)  # no free slot and preemption is off: low goes on
    assert ids(out) == ["low"]
    run(s, 2.0)
    assert low.finish_time < high.finish_time and low.num_preemptions == 0


def test_first_scheduled_time_is_the_first_admission_and_survives_preemption():
    s = make(max_num_seqs=1)
    low = add(s, "low", 3, max_tokens=5, priority=5, t=0.0)
    assert low.first_scheduled_time is None  # queued, not yet scheduled
    step(s, 1.5)
    assert low.first_scheduled_time == 1.5 and low.first_token_time == 1.5
    high = add(s, "high", 3, max_tokens=2, priority=0, t=2.0)
    out = step(s, 3.0)
    assert out.preempted_ids == ("low",) and high.first_scheduled_time == 3.0
    run(s, 4.0)
    assert low.num_preemptions == 1 and low.finish_reason == "length"
    assert low.first_scheduled_time == 1.5  # readmitted later, but its queue time ended at 1.5


def test_first_scheduled_time_is_set_by_the_first_prefill_chunk():
    s = make(max_num_batched_tokens=4, block_size=4)
    r = add(s, "r", 10, max_tokens=2, t=0.0)
    step(s, 1.0)
    step(s, 2.0)
    assert r.first_scheduled_time == 1.0 and r.first_token_time is None  # still prefilling
    step(s, 3.0)
    assert r.first_token_time == 3.0 and r.first_scheduled_time == 1.0


def drive_with_stream(s: Scheduler, low: Request, steps: int, dt: float) -> int | None:
    """Add one priority-0 request per step; return the step at which `low` is first scheduled."""
    for k in range(steps):
        add(s, f"h{k}", 4, max_tokens=2, priority=0, t=k * dt)
        out = step(s, k * dt)
        if low.request_id in {q.request_id for q in out.scheduled}:
            return k
    return None


def test_aging_bounds_the_wait_of_a_low_priority_request():
    interval, dt, steps_per_request = 1.0, 0.25, 2
    s = make(max_num_seqs=1, aging_interval_s=interval)
    low = add(s, "low", 4, max_tokens=2, priority=3)
    first = drive_with_stream(s, low, 200, dt)
    # Ahead of "low" are only the priority-0 requests that arrived less than 3 aging intervals after
    # it (their level is lower); each takes 2 steps and one runs at a time.
    bound = int((low.priority - 0) * interval / dt) * steps_per_request
    assert first is not None and first <= bound
    for k in range(first + 1, first + 3):
        add(s, f"h{k}", 4, max_tokens=2, priority=0, t=k * dt)
        step(s, k * dt)
    # Later arrivals of a better base priority do not push the aged request back out.
    assert low.finish_reason == "length" and low.num_preemptions == 0
    assert s.effective_priority(low, now=first * dt) <= 0


def test_without_aging_a_low_priority_request_starves():
    s = make(max_num_seqs=1, aging_interval_s=None)
    low = add(s, "low", 4, max_tokens=2, priority=3)
    assert drive_with_stream(s, low, 200, 0.25) is None


def test_deadlines_order_requests_of_equal_priority():
    for by_deadline, expected in ((True, ["soon", "later", "none"]), (False, ["none", "later", "soon"])):
        s = make(max_num_seqs=1, order_by_deadline=by_deadline)
        add(s, "none", 2, max_tokens=1, t=0.0)
        add(s, "later", 2, max_tokens=1, t=1.0, deadline=30.0)
        add(s, "soon", 2, max_tokens=1, t=2.0, deadline=10.0)
        add(s, "vip", 2, max_tokens=1, t=3.0, priority=-1)
        order = [o.scheduled[0].request_id for o in run(s, 3.0)]
        assert order == ["vip"] + expected


# -- finishing --

def test_stop_tokens_eos_and_ignore_eos():
    s = make()
    eos = Request("eos", [1, 2], SamplingParams(max_tokens=9), eos_token_ids=(0,), arrival_time=0.0)
    keep = Request("keep", [1, 2], SamplingParams(max_tokens=3, ignore_eos=True), eos_token_ids=(0,),
                   arrival_time=0.0)
    custom = Request("custom", [1, 2], SamplingParams(max_tokens=9, stop_token_ids=(0,), ignore_eos=True),
                     arrival_time=0.0)
    for r in (eos, keep, custom):
        s.add(r)
    finished_now = None
    for _ in range(3):
        out = s.schedule(0.0)
        finished_now = s.update({q.request_id: 0 for q in out.scheduled if q.samples_token}, 0.0)
        if eos.is_finished:
            break
    assert sorted(finished_now) == ["custom", "eos"]
    assert eos.finish_reason == custom.finish_reason == "stop" and eos.stop_reason == 0
    assert eos.output_token_ids == [0] and not keep.is_finished
    run(s, token=0)
    assert keep.output_token_ids == [0, 0, 0] and keep.finish_reason == "length"
    # Each finish is reported once, by the next schedule().
    assert s.schedule(9.0).finished_ids == ("keep",)
    s.update({}, 9.0)
    assert s.schedule(10.0).finished_ids == ()


def test_finish_for_stop_strings_and_length_limit():
    s = make(max_model_len=6)
    a = add(s, "a", 3, max_tokens=50)
    b = add(s, "b", 3, max_tokens=50)
    step(s)
    assert s.finish("b", "stop", stop_reason="###", now=1.0)
    assert b.finish_reason == "stop" and b.stop_reason == "###" and b.finish_time == 1.0
    with pytest.raises(ValueError, match="finish reason 'done'"):
        s.finish("a", "done")
    out = step(s, 1.0)
    assert out.finished_ids == ("b",)
    run(s, 2.0)
    assert a.num_tokens == 6 and a.finish_reason == "length"
    assert not s.finish("a", "stop")  # already finished


# -- abort --

def _abort_scenario(stage: str):
    """A scheduler with the target request at `stage`; returns (scheduler, target)."""
    s = make(num_blocks=8, block_size=4, prefix=False, max_num_batched_tokens=8, max_num_seqs=4)
    if stage == "waiting":
        return s, add(s, "t", 5)
    if stage == "mid-prefill":
        target = add(s, "t", 20)
        step(s)  # 8 of 20 prompt tokens computed
        assert target.status is RequestStatus.RUNNING and target.num_computed_tokens == 8
        return s, target
    if stage == "scheduled":  # between schedule() and update()
        target = add(s, "t", 5)
        s.schedule(0.0)
        return s, target
    if stage == "decoding":
        target = add(s, "t", 5, max_tokens=10)
        for _ in range(3):
            step(s)
        return s, target
    assert stage == "preempted"
    add(s, "hog", 12, max_tokens=20)
    target = add(s, "t", 12, max_tokens=20, t=1.0)
    while target.status is not RequestStatus.PREEMPTED:
        step(s)
    return s, target


@pytest.mark.parametrize("stage", ["waiting", "mid-prefill", "scheduled", "decoding", "preempted"])
def test_abort_at_every_stage_frees_every_block(stage):
    s, target = _abort_scenario(stage)
    assert s.abort("t", now=5.0)
    assert target.status is RequestStatus.FINISHED_ABORTED and target.finish_reason == "abort"
    assert target.block_table == [] and s.get("t") is None
    assert not s.abort("t")  # idempotent
    if stage == "scheduled":
        s.update({}, 0.0)  # the aborted request's token is no longer expected
    s.check_invariants()
    s.abort("hog")  # the other request of the "preempted" scenario
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks
    assert "t" in s.schedule(6.0).finished_ids
    assert not s.has_unfinished()


# -- randomized simulation --

def _random_config(rng: random.Random) -> tuple[SchedulerConfig, KVBlockManager]:
    config = SchedulerConfig(
        max_num_seqs=rng.randint(1, 6), max_num_batched_tokens=rng.randint(4, 24),
        max_waiting_requests=rng.randint(3, 12), max_waiting_tokens=rng.randint(30, 200),
        enable_chunked_prefill=rng.random() < 0.7, aging_interval_s=rng.choice([None, 2.0]),
        priority_preemption=rng.random() < 0.6, max_model_len=rng.choice([None, 40]))
    return config, KVBlockManager(rng.randint(6, 24), rng.choice([1, 2, 4]), rng.random() < 0.7)


def _random_request(rng: random.Random, rid: str, now: float, limit: int) -> Request:
    shared = [1, 2, 3, 4, 5, 6, 7, 8][:rng.randint(0, 8)]  # common prefixes exercise the cache
    prompt = shared + [rng.randint(1, 9) for _ in range(rng.randint(1, 12))]
    params = SamplingParams(max_tokens=rng.randint(1, 10), ignore_eos=rng.random() < 0.2)
    deadline = now + rng.uniform(1, 20) if rng.random() < 0.3 else None
    return Request(rid, prompt[:limit - 1], params, priority=rng.randint(0, 3), arrival_time=now,
                   deadline=deadline, eos_token_ids=(0,))


def _check_plan(s: Scheduler, out: SchedulerOutput) -> None:
    ids = [q.request_id for q in out.scheduled]
    assert len(ids) == len(set(ids)) and set(ids).isdisjoint(out.preempted_ids)
    bs = s.block_manager.block_size
    for q in out.scheduled:
        r = s.get(q.request_id)
        assert q.start_position == r.num_computed_tokens and q.num_new_tokens >= 1
        assert len(q.block_table) * bs >= q.start_position + q.num_new_tokens
        assert list(q.token_ids) == r.token_ids_between(q.start_position, q.start_position + q.num_new_tokens)
        if not s.config.enable_chunked_prefill:
            assert q.samples_token


def _simulate(seed: int, num_ops: int = 150) -> None:
    rng = random.Random(seed)
    config, manager = _random_config(rng)
    s = Scheduler(config, manager)
    everyone: list[Request] = []
    now = 0.0
    for op in range(num_ops):
        roll = rng.random()
        if roll < 0.35:
            r = _random_request(rng, f"r{op}", now, s.max_model_len)
            try:
                s.add(r)
                everyone.append(r)
            except QueueFullError:
                pass
        elif roll < 0.45 and everyone:
            s.abort(rng.choice(everyone).request_id, now)
        else:
            out = s.schedule(now)
            _check_plan(s, out)
            if rng.random() < 0.1 and out.scheduled:  # abort in the middle of a step
                s.abort(rng.choice(out.scheduled).request_id, now)
            tokens = {q.request_id: rng.choice([0, 5, 6, 7, 8, 9]) for q in out.scheduled if q.samples_token}
            s.update(tokens, now)
            if rng.random() < 0.05 and s.num_running:  # the runner matched a stop string
                running = [r for r in everyone if r.status is RequestStatus.RUNNING]
                s.finish(rng.choice(running).request_id, "stop")
        s.check_invariants()
        now += rng.choice([0.0, 0.5, 1.0])
    for _ in range(2000):  # drain: everything must finish without aborts (no livelock)
        if not s.has_unfinished():
            break
        s.update({q.request_id: 9 for q in s.schedule(now).scheduled if q.samples_token}, now)
        s.check_invariants()
        now += 1.0
    assert not s.has_unfinished(), f"seed {seed}: requests never finished"
    assert manager.num_free_blocks == manager.num_blocks
    assert all(manager.pool.ref_count(b) == 0 for b in range(manager.num_blocks))
    for r in everyone:
        assert r.is_finished and r.block_table == []
        assert r.num_output_tokens <= r.sampling_params.max_tokens
        if r.finish_reason == "length":
            assert r.num_output_tokens == r.sampling_params.max_tokens or r.num_tokens == s.max_model_len


@pytest.mark.parametrize("seed", range(40))
def test_randomized_simulation_keeps_invariants_and_frees_everything(seed):
    _simulate(seed)
