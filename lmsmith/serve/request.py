"""A serving request and its sampling settings: plain data shared by the scheduler, runner and API.

The scheduler owns a request's mutable state (status, computed tokens, block table); the runner
only reads it, and the API reads the outputs once the request is finished.
"""
from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Any


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, never scheduled
    RUNNING = "running"  # holds KV blocks (its prefill may still be in progress)
    PREEMPTED = "preempted"  # back in the queue, blocks freed; will recompute prompt + outputs
    FINISHED_STOPPED = "finished_stopped"  # eos, stop token or stop string
    FINISHED_LENGTH = "finished_length"  # max_tokens or the model's length limit
    FINISHED_ABORTED = "finished_aborted"  # cancelled by the caller

    @property
    def is_finished(self) -> bool:
        return self in _FINISH_REASON


# OpenAI-style finish_reason strings for each finished status.
_FINISH_REASON = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}
FINISH_STATUS_BY_REASON = {reason: status for status, reason in _FINISH_REASON.items()}


def finish_reason_of(status: RequestStatus) -> str | None:
    return _FINISH_REASON.get(status)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and not math.isnan(value)


def _as_tuple(value: Any, name: str, item_ok, allowed: str) -> tuple:
    """Accept one item or an iterable of items; reject anything whose items fail item_ok."""
    items = (value,) if isinstance(value, (str, int)) else tuple(value)
    for item in items:
        if not item_ok(item):
            raise ValueError(f"{name} contains {item!r}; allowed: {allowed}")
    return items


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Values that switch a filter off are its defaults."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off (-1, vLLM's "off", is accepted and stored as 0)
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings: matched by the runner on detokenized text
    stop_token_ids: tuple[int, ...] = ()  # always stop on these, even with ignore_eos
    ignore_eos: bool = False  # keep generating past the model's eos token(s)

    def __post_init__(self) -> None:
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        object.__setattr__(self, "stop", _as_tuple(
            self.stop, "stop", lambda s: isinstance(s, str) and s != "", "non-empty strings"))
        object.__setattr__(self, "stop_token_ids", _as_tuple(
            self.stop_token_ids, "stop_token_ids", lambda t: _is_int(t) and t >= 0, "ints >= 0"))
        for name, ok, allowed in self._checks():
            if not ok:
                raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r} must be {allowed}")

    def _checks(self) -> list[tuple[str, bool, str]]:
        num = _is_number
        return [
            ("max_tokens", _is_int(self.max_tokens) and self.max_tokens >= 1, "an int >= 1"),
            ("temperature", num(self.temperature) and 0 <= self.temperature <= 100, "in [0, 100]"),
            ("top_k", _is_int(self.top_k) and self.top_k >= 0, "an int >= 0 (0 or -1 = off)"),
            ("top_p", num(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", num(self.min_p) and 0 <= self.min_p < 1, "in [0, 1)"),
            ("repetition_penalty", num(self.repetition_penalty) and 0 < self.repetition_penalty <= 100,
             "in (0, 100]"),
            ("seed", self.seed is None or _is_int(self.seed), "None or an int"),
            ("ignore_eos", isinstance(self.ignore_eos, bool), "a bool"),
        ]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(eq=False)  # identity equality: two requests are never "the same" because their fields match
class Request:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    priority: int = 0  # lower = more important (as in vLLM)
    arrival_time: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # same clock as arrival_time; earlier = served first among equals
    eos_token_ids: tuple[int, ...] = ()  # the model's end tokens; ignored with ignore_eos
    cache_salt: str | None = None  # requests with different salts never share cached KV blocks

    # State, written by the scheduler.
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)  # written by the KV block manager
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at the last admission
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError(f"request_id={self.request_id!r} must be a non-empty string")
        self.prompt_token_ids = _as_tuple(
            self.prompt_token_ids, "prompt_token_ids", lambda t: _is_int(t) and t >= 0, "ints >= 0")
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r}: prompt_token_ids is empty; need >= 1 token")
        self.eos_token_ids = _as_tuple(
            self.eos_token_ids, "eos_token_ids", lambda t: _is_int(t) and t >= 0, "ints >= 0")
        if not isinstance(self.sampling_params, SamplingParams):
            kind = type(self.sampling_params).__name__
            raise TypeError(f"sampling_params must be SamplingParams, got {kind}")
        if not _is_int(self.priority):
            raise ValueError(f"priority={self.priority!r} must be an int (lower = more important)")
        if not _is_number(self.arrival_time):
            raise ValueError(f"arrival_time={self.arrival_time!r} must be a number")
        if self.deadline is not None and not _is_number(self.deadline):
            raise ValueError(f"deadline={self.deadline!r} must be None or a number")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return [*self.prompt_token_ids, *self.output_token_ids]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def token_ids_between(self, start: int, stop: int) -> list[int]:
        """Token ids at positions [start, stop) of prompt + outputs, without building the whole list."""
        prompt_len = self.num_prompt_tokens
        head = list(self.prompt_token_ids[start:min(stop, prompt_len)]) if start < prompt_len else []
        tail = self.output_token_ids[max(start - prompt_len, 0):max(stop - prompt_len, 0)]
        return head + tail

    def is_stop_token(self, token_id: int) -> bool:
        if token_id in self.sampling_params.stop_token_ids:
            return True
        return not self.sampling_params.ignore_eos and token_id in self.eos_token_ids

