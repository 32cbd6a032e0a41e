"""Latency percentiles, throughput, generation timing and memory fields."""
import numpy as np
import pytest
import torch

from lmsmith.evaluate import evaluate
from lmsmith.evaluate.memory import (
    MemoryTracker,
    count_parameters,
    kv_cache_bytes_per_token,
    model_size_bytes,
)
from lmsmith.evaluate.speed import latency_stats, percentile, time_decode

from .conftest import FAST, TINY_DATASET, tiny_lm, varied_classifier


@pytest.mark.parametrize("q", [0, 10, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear_interpolation(q):
    samples = [5.0, 1.0, 3.0, 9.0, 7.5, 2.0, 4.0]
    assert percentile(samples, q) == pytest.approx(float(np.percentile(samples, q)))


def test_percentile_errors():
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile([1.0], 101)


def test_latency_stats_from_known_times():
    stats = latency_stats([0.010, 0.020, 0.030, 0.040], batch_size=4, tokens=64, unit="tokens/s")
    assert (stats.p50_ms, stats.mean_ms) == pytest.approx((25.0, 25.0))
    assert stats.throughput == pytest.approx(64 / 0.025) and stats.repeats == 4
    assert latency_stats([0.5], 2, 10, "examples/s").throughput == pytest.approx(4.0)
    with pytest.raises(ValueError, match="unit"):
        latency_stats([0.5], 2, 10, "requests/s")


def test_classifier_latency_fields_are_positive_and_ordered(tok):
    report = evaluate(varied_classifier(tok), tok, TINY_DATASET, device="cpu", repeats=5, batch_sizes=(4, 1, 2))
    assert [s.batch_size for s in report.latency] == [1, 2, 4]
    for s in report.latency:
        assert 0 < s.p50_ms <= s.p90_ms <= s.p99_ms and s.repeats == 5 and s.unit == "examples/s"
        assert s.throughput == pytest.approx(s.batch_size / (s.mean_ms / 1e3))
        assert s.tokens % s.batch_size == 0 and s.tokens >= s.batch_size
    assert report.generation is None and report.memory.kv_cache_bytes_per_token is None


def test_lm_latency_generation_and_memory(tok):
    model = tiny_lm(tok)
    report = evaluate(model, tok, device="cpu", seq_len=64, limit=2, latency_tokens=16, **FAST)
    for s in report.latency:
        assert 0 < s.p50_ms <= s.p90_ms <= s.p99_ms and s.unit == "tokens/s"
        assert s.tokens == 16 * s.batch_size and s.throughput == pytest.approx(s.tokens / (s.mean_ms / 1e3))
    g = report.generation
    assert g.batch_size == 1 and g.prompt_tokens == 16 and g.new_tokens == FAST["new_tokens"]
    assert g.ttft_ms > 0 and g.decode_ms_per_step > 0
    assert g.decode_tokens_per_s == pytest.approx(1e3 / g.decode_ms_per_step)  # median of 3: the same run
    c = model.config
    memory = report.memory
    assert memory.kv_cache_bytes_per_token == 2 * c.num_layers * c.kv_heads * c.dim_per_head * 4
    assert memory.parameters == model.num_parameters() == memory.nonzero_parameters
    assert memory.parameter_bytes == sum(t.nbytes for t in model.state_dict().values()) - (
        model.lm_head.weight.nbytes if c.tie_word_embeddings else 0)
    assert memory.peak_rss_delta_bytes >= 0 and memory.cuda_peak_allocated_bytes is None


def test_kv_cache_bytes_follow_dtype_and_grouped_heads(tok):
    config = tiny_lm(tok).config
    fp32 = kv_cache_bytes_per_token(config, torch.float32)
    assert kv_cache_bytes_per_token(config, torch.bfloat16) * 2 == fp32
    assert kv_cache_bytes_per_token(config.replace(num_kv_heads=config.num_heads), torch.float32) == (
        fp32 * config.num_heads // config.kv_heads)


def test_count_parameters_and_sizes(tok):
    model = varied_classifier(tok)
    total, nonzero = count_parameters(model)
    assert total == model.num_parameters()
    with torch.no_grad():
        model.layers[0].mlp.up_proj.weight[:5] = 0
    assert count_parameters(model)[1] == nonzero - 5 * model.config.hidden_size
    assert model_size_bytes(model) == sum(t.nbytes for t in model.state_dict().values())


def test_memory_tracker_sees_a_large_allocation():
    with MemoryTracker("cpu") as tracker:
        block = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
        del block
    assert tracker.growth_bytes >= 48 * 2**20 and tracker.peak_bytes >= tracker.growth_bytes


def test_time_decode_needs_two_tokens(tok):
    with pytest.raises(ValueError, match="new_tokens >= 2"):
        time_decode(tiny_lm(tok), [[1, 2, 3]], 1, tok.pad_id)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_memory_is_peak_allocated(tok):
    model = tiny_lm(tok)
    report = evaluate(model, tok, device="cuda", seq_len=64, limit=2, **FAST)
    assert report.device.startswith("cuda") and next(model.parameters()).is_cuda
    assert report.memory.peak_rss_delta_bytes is None
    assert report.memory.cuda_peak_allocated_bytes >= report.memory.parameter_bytes
    assert all(0 < s.p50_ms <= s.p90_ms <= s.p99_ms for s in report.latency)
