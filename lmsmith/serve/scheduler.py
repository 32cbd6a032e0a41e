"""Continuous-batching scheduler: every step, which requests run and how many tokens each computes.

The scheduler is plain bookkeeping over `Request`s and a `KVBlockManager`; it returns plain data
(`SchedulerOutput`) and never touches tensors. An engine step is `schedule(now)` → run the model on
the scheduled tokens → `update(sampled_tokens, now)`.

Policy
------
* **One token budget per step** (`max_num_batched_tokens`), no separate prefill and decode phases.
  Running requests are served first, best first: each gets the tokens it still needs (one, for a
  decode; the rest of its prompt, for a prefill in progress), capped by what is left of the budget.
  Waiting requests then fill what is left of the budget and of the `max_num_seqs` slots, best first.
  With chunked prefill a long prompt is cut to fit the budget and finishes over several steps,
  batched with the other requests' decodes.
* **Order.** A request's rank is `(level, deadline, arrival)` with
  `level = priority + floor(arrival_time / aging_interval_s)`, lower first. Its *effective priority*
  at time `now` is `level - floor(now / aging_interval_s)`: it improves by one level per aging
  interval spent in the system. Since every request ages at the same rate, comparing effective
  priorities at any moment is comparing levels, so the order is static and never flips back and
  forth. Starvation is bounded: a request of priority p is ranked ahead of every request of
  priority q that arrives more than `(p - q + 1)` aging intervals after it. Deadlines (optional)
  order requests of equal level, earliest first; arrival breaks the remaining ties.
* **Head of line.** The waiting queue is served strictly in rank order: if the best waiting request
  does not fit (blocks, slots, or the whole prompt in the budget without chunking), no worse one is
  admitted in this step, so a large request is never starved by a stream of small ones.
* **Preemption by recompute.** When a running request cannot get a block for its next tokens, the
  worst-ranked running request (possibly itself) is preempted: its blocks are freed and it goes back
  to the waiting queue with its generated tokens kept; when it is admitted again it recomputes prompt
  + generated tokens (cheaply, when the prefix cache still holds its blocks) and carries on.
* **Priority preemption** (`priority_preemption`). A waiting request that cannot get blocks or a
  slot preempts running requests of *strictly* worse level, worst first. A victim ranks after its
  preemptor for ever (static order), so it can never preempt it back: no thrashing. A running request
  that got in by aging keeps the level that let it in, so later arrivals of a better base priority do
  not push it out unless their level is strictly better.
* **Urgent prefill steps** (`isolate_urgent_prefill`). While a request that has not produced its
  first token yet ranks at a strictly better level than some running request, the step holds only
  requests at or above that level: the worse-level running requests skip one or a few decode steps
  (they keep their blocks). A high-priority arrival's time to first token is then its own prefill
  plus the rest of the step in flight, not a prefill batched with every running decode. If no such
  request can actually be scheduled (no slot and no preemption allowed), the step falls back to the
  normal plan, so nothing waits on a request that cannot start. Aging bounds the pauses: a stream of
  urgent arrivals stops outranking the paused requests after a few aging intervals.
* **Bounded queue.** `add` raises `QueueFullError` when the waiting queue holds `max_waiting_requests`
  requests or the new prompt would push its tokens past `max_waiting_tokens`; preempted requests
  count towards these bounds (back-pressure) but are never rejected.
* **Finishing.** `update` appends the sampled tokens and finishes requests on a stop token (eos
  unless `ignore_eos`), `max_tokens`, or the length limit (`max_model_len`, the KV pool's capacity,
  and without chunked prefill the token budget, so that a preempted request can always be recomputed).
  Stop strings need text, so the caller checks them and calls `finish(request_id, "stop")`.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from .kv_blocks import KVBlockManager
from .request import FINISH_STATUS_BY_REASON, Request, RequestStatus, finish_reason_of


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; retry later (an API maps this to HTTP 429/503)."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # requests running at once
    max_num_batched_tokens: int = 2048  # token budget per step
    max_waiting_requests: int = 1024
    max_waiting_tokens: int = 1 << 20  # tokens (prompt + generated) of all waiting requests
    enable_chunked_prefill: bool = True
    aging_interval_s: float | None = 10.0  # one level of priority gained per interval; None = no aging
    priority_preemption: bool = True
    isolate_urgent_prefill: bool = True  # a better-level first prefill runs without worse-level decodes
    order_by_deadline: bool = True
    max_model_len: int | None = None  # prompt + output tokens; None = bounded only by the KV pool

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting_requests", "max_waiting_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SchedulerConfig.{name}={value!r} must be an int >= 1")
        length = self.max_model_len
        if length is not None and (not isinstance(length, int) or length < 2):
            raise ValueError(f"SchedulerConfig.max_model_len={length!r} must be None or an int >= 2")
        interval = self.aging_interval_s
        if interval is not None and not (isinstance(interval, (int, float)) and 0 < interval < math.inf):
            raise ValueError(f"SchedulerConfig.aging_interval_s={interval!r} must be None or a number > 0")


@dataclass(frozen=True)
class ScheduledSeq:
    """One request's share of a step: compute tokens [start_position, start_position + num_new_tokens)."""

    request_id: str
    num_new_tokens: int
    start_position: int
    block_table: tuple[int, ...]  # covers every position up to start_position + num_new_tokens
    is_prefill: bool  # False only for a one-token step after the request has produced output
    token_ids: tuple[int, ...]  # the num_new_tokens token ids to feed
    samples_token: bool  # the step reaches the end of the known tokens: sample the next one


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledSeq, ...]
    preempted_ids: tuple[str, ...]  # preempted in this step (their cached K/V is gone)
    finished_ids: tuple[str, ...]  # finished or aborted since the previous schedule()

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(frozen=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_waiting_tokens: int
    num_preemptions: int  # since start
    kv_usage: float
    prefix_cache_hit_rate: float


@dataclass
class _Step:
    """A step being planned."""

    budget: int
    scheduled: dict[str, ScheduledSeq] = field(default_factory=dict)
    preempted: list[str] = field(default_factory=list)


class Scheduler:
    """Continuous batching over one KVBlockManager (policy in the module docstring).

    `now` arguments and the requests' arrival_time/deadline must all come from one clock.
    """

    def __init__(self, config: SchedulerConfig, block_manager: KVBlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = self._length_limit()
        self.num_preemptions = 0
        self._requests: dict[str, Request] = {}  # unfinished requests
        self._ranks: dict[str, tuple] = {}
        self._waiting: list[Request] = []  # sorted by rank; includes preempted requests
        self._running: list[Request] = []  # sorted by rank
        self._num_waiting_tokens = 0
        self._pending: dict[str, ScheduledSeq] = {}  # scheduled, not yet updated
        self._finished_since_schedule: list[str] = []
        self._num_added = 0

    # -- queries --

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_waiting_tokens(self) -> int:
        return self._num_waiting_tokens

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def get(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    def stats(self) -> SchedulerStats:
        bm = self.block_manager
        return SchedulerStats(self.num_running, self.num_waiting, self._num_waiting_tokens,
                              self.num_preemptions, bm.usage, bm.prefix_cache_hit_rate)

    def effective_priority(self, request: Request, now: float) -> int:
        """Priority minus the aging intervals it has waited through (lower = more important)."""
        interval = self.config.aging_interval_s
        return self._level(request) - (math.floor(now / interval) if interval else 0)

    # -- requests in and out --

    def add(self, request: Request) -> None:
        """Queue a new request. ValueError if it can never run, QueueFullError if the queue is full now."""
        self._check_new(request)
        cfg = self.config
        if len(self._waiting) >= cfg.max_waiting_requests:
            raise QueueFullError(
                f"waiting queue is full: {len(self._waiting)} of {cfg.max_waiting_requests} requests")
        if self._num_waiting_tokens + request.num_tokens > cfg.max_waiting_tokens:
            raise QueueFullError(
                f"waiting queue is full: {self._num_waiting_tokens} tokens queued, "
                f"+{request.num_tokens} would exceed max_waiting_tokens={cfg.max_waiting_tokens}")
        self._requests[request.request_id] = request
        self._ranks[request.request_id] = self._rank(request)
        self._num_added += 1
        self._enqueue(request)

    def abort(self, request_id: str, now: float | None = None) -> bool:
        """Cancel a request at any stage, releasing all its blocks. False if it is unknown or finished."""
        return self.finish(request_id, "abort", now=now)

    def finish(self, request_id: str, reason: str, stop_reason: int | str | None = None,
               now: float | None = None) -> bool:
        """End a request ("stop", "length" or "abort"), e.g. when the caller matched a stop string."""
        if reason not in FINISH_STATUS_BY_REASON:
            raise ValueError(f"finish reason {reason!r} must be one of {sorted(FINISH_STATUS_BY_REASON)}")
        request = self._requests.get(request_id)
        if request is None:
            return False
        self._finish(request, FINISH_STATUS_BY_REASON[reason], stop_reason, now)
        return True

    # -- the step --

    def schedule(self, now: float) -> SchedulerOutput:
        if self._pending:
            raise RuntimeError("schedule() called twice: call update() with the previous step's tokens first")
        step = _Step(budget=self.config.max_num_batched_tokens)
        urgent = self._urgent_level()
        if urgent is not None:
            self._schedule_running(step, max_level=urgent)
            self._schedule_waiting(step, now, max_level=urgent)
            if not any(seq.is_prefill for seq in step.scheduled.values()):
                urgent = None  # the urgent request cannot start: plan the step as usual
        if urgent is None:
            self._schedule_running(step)
            self._schedule_waiting(step, now)
        self._pending = step.scheduled
        finished, self._finished_since_schedule = self._finished_since_schedule, []
        return SchedulerOutput(tuple(step.scheduled.values()), tuple(step.preempted), tuple(finished))

    def update(self, output_tokens: dict[str, int], now: float) -> list[str]:
        """Record the step's results: one sampled token per sequence that `samples_token`.

        Tokens for requests aborted since schedule() are ignored. Returns the ids finished here.
        """
        missing = [rid for rid, seq in self._pending.items()
                   if seq.samples_token and rid not in output_tokens]
        if missing:
            raise ValueError(f"no sampled token for scheduled requests {missing}")
        pending, self._pending = self._pending, {}
        finished = []
        for rid, seq in pending.items():
            request = self._requests[rid]
            request.num_computed_tokens += seq.num_new_tokens
            self.block_manager.mark_computed(request)
            if seq.samples_token and self._append_token(request, output_tokens[rid], now):
                finished.append(rid)
        return finished

    def check_invariants(self) -> None:
        """Consistency of queues, statuses and blocks (for tests; cost is linear in requests and blocks)."""
        self.block_manager.check_invariants()
        for queue in (self._waiting, self._running):
            ranks = [self._rank_of(r) for r in queue]
            assert ranks == sorted(ranks), "queue out of rank order"
        assert len(self._waiting) + len(self._running) == len(self._requests) == len(self._ranks)
        assert len(self._running) <= self.config.max_num_seqs
        for r in self._waiting:
            assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED), (r.request_id, r.status)
            assert not r.block_table and r.num_computed_tokens == 0, f"waiting {r.request_id} holds KV state"
        for r in self._running:
            assert r.status is RequestStatus.RUNNING and r.block_table, (r.request_id, r.status)
            assert r.num_tokens < self.max_model_len, f"{r.request_id} outlived the length limit"
        assert self._num_waiting_tokens == sum(r.num_tokens for r in self._waiting)
        assert set(self._pending) <= {r.request_id for r in self._running}

    # -- running requests --

    def _schedule_running(self, step: _Step, max_level: float = math.inf) -> None:
        i = 0
        while i < len(self._running) and step.budget > 0:
            request = self._running[i]
            if self._rank_of(request)[0] > max_level:
                break  # sorted by rank: every later request is at a worse level too
            if request.request_id in step.scheduled:
                i += 1  # served by an earlier pass of this step
                continue
            num_new = min(request.num_uncomputed_tokens, step.budget)
            assert num_new > 0, f"running request {request.request_id} has nothing to compute"
            if self._allocate_or_preempt(request, num_new, step):
                self._add_seq(request, num_new, step)
                i += 1  # else the request preempted itself and left the list

    def _allocate_or_preempt(self, request: Request, num_new: int, step: _Step) -> bool:
        """Blocks for a running request, preempting the worst not-yet-served running request as needed.

        Requests served earlier in this step rank better, so the worst one is never among them.
        """
        while self.block_manager.allocate_for(request, num_new) is None:
            victim = self._running[-1]
            self._preempt(victim, step)
            if victim is request:
                return False
        return True

    # -- waiting requests --

    def _schedule_waiting(self, step: _Step, now: float, max_level: float = math.inf) -> None:
        while self._waiting and step.budget > 0:
            head = self._waiting[0]
            if self._rank_of(head)[0] > max_level:
                break
            if head.request_id in step.preempted:
                break  # just preempted; admitting anything ranked after it would break the order
            if not self._admit(head, step, now):
                break  # head of line: nobody overtakes the best waiting request

    def _urgent_level(self) -> int | None:
        """The best level among requests before their first token, if strictly better than the worst
        running request's level (policy: "Urgent prefill steps"); else None."""
        if not self.config.isolate_urgent_prefill or not self._running:
            return None
        levels = [self._rank_of(r)[0] for r in self._running if r.num_output_tokens == 0]
        if self._waiting:
            head = self._waiting[0]
            if head.num_output_tokens == 0:
                levels.append(self._rank_of(head)[0])
        if not levels:
            return None
        best = min(levels)
        return best if best < self._rank_of(self._running[-1])[0] else None

    def _admit(self, request: Request, step: _Step, now: float) -> bool:
        while True:
            cached = self.block_manager.num_cached_prefix_tokens(request)
            num_new = self._prefill_chunk(request.num_tokens - cached, step.budget)
            if num_new == 0:
                return False
            if len(self._running) < self.config.max_num_seqs:
                attached = self.block_manager.allocate_for(request, num_new)
                if attached is not None:
                    assert attached == cached
                    self._start_running(request, cached, now)
                    self._add_seq(request, num_new, step)
                    return True
            if not self._preempt_for(request, step):
                return False

    def _prefill_chunk(self, num_to_compute: int, budget: int) -> int:
        if self.config.enable_chunked_prefill:
            return min(num_to_compute, budget)
        return num_to_compute if num_to_compute <= budget else 0

    def _preempt_for(self, request: Request, step: _Step) -> bool:
        """Priority preemption: free the worst running request if its level is strictly worse."""
        if not self.config.priority_preemption or not self._running:
            return False
        victim = self._running[-1]
        if self._level(victim) <= self._level(request):
            return False
        self._preempt(victim, step)
        return True

    def _start_running(self, request: Request, num_cached: int, now: float) -> None:
        self._dequeue(request)
        request.status = RequestStatus.RUNNING
        request.num_computed_tokens = num_cached
        request.num_cached_tokens = num_cached
        if request.first_scheduled_time is None:
            request.first_scheduled_time = now
        bisect.insort(self._running, request, key=self._rank_of)

    # -- state changes --

    def _add_seq(self, request: Request, num_new: int, step: _Step) -> None:
        start = request.num_computed_tokens
        end = start + num_new
        is_decode = num_new == 1 and end == request.num_tokens and request.num_output_tokens > 0
        step.scheduled[request.request_id] = ScheduledSeq(
            request_id=request.request_id, num_new_tokens=num_new, start_position=start,
            block_table=tuple(request.block_table), is_prefill=not is_decode,
            token_ids=tuple(request.token_ids_between(start, end)), samples_token=end == request.num_tokens)
        step.budget -= num_new

    def _preempt(self, victim: Request, step: _Step) -> None:
        self.block_manager.free(victim)
        self._running.remove(victim)
        unscheduled = step.scheduled.pop(victim.request_id, None)
        if unscheduled is not None:  # preempted by a later arrival in the same step: refund its tokens
            step.budget += unscheduled.num_new_tokens
        victim.num_computed_tokens = 0
        victim.status = RequestStatus.PREEMPTED
        victim.num_preemptions += 1
        self.num_preemptions += 1
        step.preempted.append(victim.request_id)
        self._enqueue(victim)

    def _append_token(self, request: Request, token_id: int, now: float) -> bool:
        """Append a sampled token; finish the request if it should stop. True if it finished."""
        request.output_token_ids.append(token_id)
        if request.first_token_time is None:
            request.first_token_time = now
        if request.is_stop_token(token_id):
            self._finish(request, RequestStatus.FINISHED_STOPPED, token_id, now)
        elif request.num_output_tokens >= request.sampling_params.max_tokens or \
                request.num_tokens >= self.max_model_len:
            self._finish(request, RequestStatus.FINISHED_LENGTH, None, now)
        return request.is_finished

    def _finish(self, request: Request, status: RequestStatus, stop_reason, now: float | None) -> None:
        if request.status is RequestStatus.RUNNING:
            self._running.remove(request)
        else:
            self._dequeue(request)
        self.block_manager.free(request)
        request.status = status
        request.finish_reason = finish_reason_of(status)
        request.stop_reason = stop_reason
        request.finish_time = now
        rid = request.request_id
        del self._requests[rid], self._ranks[rid]
        self._pending.pop(rid, None)
        self._finished_since_schedule.append(rid)

    def _enqueue(self, request: Request) -> None:
        bisect.insort(self._waiting, request, key=self._rank_of)
        self._num_waiting_tokens += request.num_tokens

    def _dequeue(self, request: Request) -> None:
        self._waiting.remove(request)
        self._num_waiting_tokens -= request.num_tokens

    # -- ranks and limits --

    def _level(self, request: Request) -> int:
        interval = self.config.aging_interval_s
        return request.priority + (math.floor(request.arrival_time / interval) if interval else 0)

    def _rank(self, request: Request) -> tuple:
        use_deadline = self.config.order_by_deadline and request.deadline is not None
        deadline = request.deadline if use_deadline else math.inf
        return (self._level(request), deadline, request.arrival_time, self._num_added)

    def _rank_of(self, request: Request) -> tuple:
        return self._ranks[request.request_id]

    def _length_limit(self) -> int:
        """Most tokens (prompt + output) a request may reach; it finishes with "length" there."""
        bm, cfg = self.block_manager, self.config
        limit = bm.num_blocks * bm.block_size + 1  # the last token needs no K/V slot
        if cfg.max_model_len is not None:
            limit = min(limit, cfg.max_model_len)
        if not cfg.enable_chunked_prefill:
            limit = min(limit, cfg.max_num_batched_tokens + 1)  # a preempted request recomputes in one step
        return limit

    def _check_new(self, request: Request) -> None:
        if not isinstance(request, Request):
            raise TypeError(f"expected a Request, got {type(request).__name__}")
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already queued or running")
        if request.status is not RequestStatus.WAITING or request.output_token_ids or request.block_table:
            raise ValueError(f"request {request.request_id!r} is not fresh (status {request.status.value})")
        if request.num_tokens >= self.max_model_len:
            raise ValueError(f"prompt of {request.num_tokens} tokens leaves no room to generate: the limit "
                             f"is {self.max_model_len} tokens (max_model_len, KV pool, or token budget)")
        if request.num_tokens > self.config.max_waiting_tokens:
            raise ValueError(f"prompt of {request.num_tokens} tokens can never fit the waiting queue "
                             f"(max_waiting_tokens={self.config.max_waiting_tokens})")
