"""ServingMetrics fed hand-made engine outputs: which latency each histogram records, and when."""
from __future__ import annotations

from lmsmith.serve.engine import RequestOutput
from lmsmith.serve.metrics import ServingMetrics, priority_label

LABELS = {"priority": "0"}


def output(rid: str, tokens: list[int], *, scheduled: float | None, first_token: float | None,
           finished: str | None = None, arrival: float = 0.0) -> RequestOutput:
    return RequestOutput(
        request_id=rid, new_token_ids=tokens, new_text="x" * len(tokens), text="", finished=finished is not None,
        finish_reason=finished, prompt_tokens=3, completion_tokens=len(tokens), cached_tokens=0,
        arrival_time=arrival, first_scheduled_time=scheduled, first_token_time=first_token,
        finish_time=9.0 if finished else None, priority=0)


def samples(metrics: ServingMetrics, name: str) -> tuple[float | None, float | None]:
    value = metrics.registry.get_sample_value
    return value(f"lmsmith:{name}_count", LABELS), value(f"lmsmith:{name}_sum", LABELS)


def test_queue_time_ends_at_first_scheduled_not_at_first_token():
    metrics = ServingMetrics()
    metrics.observe_output(output("r", [7], scheduled=2.0, first_token=5.0, arrival=0.5))
    metrics.observe_output(output("r", [8], scheduled=2.0, first_token=5.0, arrival=0.5, finished="length"))
    assert samples(metrics, "request_queue_time_seconds") == (1, 1.5)
    assert samples(metrics, "time_to_first_token_seconds") == (1, 4.5)
    assert samples(metrics, "inter_token_latency_seconds")[0] == 1  # the second token only
    assert samples(metrics, "e2e_request_latency_seconds") == (1, 8.5)


def test_aborted_requests_record_queue_time_only_if_they_were_scheduled():
    metrics = ServingMetrics()
    metrics.observe_output(output("queued", [], scheduled=None, first_token=None, finished="abort"))
    assert samples(metrics, "request_queue_time_seconds") == (None, None)  # no series yet: nothing observed
    metrics.observe_output(output("prefilling", [], scheduled=3.0, first_token=None, finished="abort"))
    assert samples(metrics, "request_queue_time_seconds") == (1, 3.0)
    assert samples(metrics, "time_to_first_token_seconds") == (None, None)  # it never had a token
    value = metrics.registry.get_sample_value
    assert value("lmsmith:request_success_total", {"finished_reason": "abort"}) == 2


def test_queue_time_is_recorded_once_per_request():
    metrics = ServingMetrics()
    for i in range(4):
        metrics.observe_output(output("r", [i], scheduled=1.0, first_token=2.0, finished="length" if i == 3 else None))
    assert samples(metrics, "request_queue_time_seconds") == (1, 1.0)
    assert samples(metrics, "inter_token_latency_seconds")[0] == 3


def test_priority_labels_are_bounded():
    assert [priority_label(p) for p in (-11, -10, 0, 10, 11, 999)] == ["<-10", "-10", "0", "10", ">10", ">10"]
