"""The generic Transformer on a GPU: every family gives the CPU's logits (full forward, padded batches,
cached decoding), `transformers` agrees on the GPU too, and bf16 stays close to fp32."""
import pytest
import torch

from lmsmith.generation import generate
from lmsmith.model.cache import StaticKVCache
from tests.conftest import cuda_tests
from tests.parity.test_families import DECODERS, ENCODERS, _pair

pytestmark = [*cuda_tests, pytest.mark.usefixtures("exact_fp32_on_cuda")]
TOL = 1e-4
CUDA = torch.device("cuda")


@pytest.mark.parametrize("family", sorted(DECODERS))
def test_decoder_logits_and_cached_decoding_match_the_cpu(tmp_path, family):
    hf, ours = _pair(tmp_path, DECODERS[family], "causal-lm")
    ids = torch.randint(1, 99, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        on_cpu = ours(ids, attention_mask=mask, position_ids=positions).logits
        ours.to(CUDA)
        hf.to(CUDA)
        on_gpu = ours(ids.to(CUDA), attention_mask=mask.to(CUDA), position_ids=positions.to(CUDA)).logits
        theirs = hf(ids.to(CUDA), attention_mask=mask.to(CUDA), position_ids=positions.to(CUDA)).logits
        cache = StaticKVCache(ours.config, batch_size=2, max_len=16, device=CUDA)
        full = ours(ids.to(CUDA)).logits
        steps = [ours(ids[:, :5].to(CUDA), cache=cache).logits]
        steps += [ours(ids[:, t:t + 1].to(CUDA), cache=cache).logits for t in range(5, 12)]
    assert on_gpu.device.type == "cuda"
    keep = mask.bool()
    assert (on_gpu.cpu() - on_cpu)[keep].abs().max() < TOL
    assert (theirs.cpu() - on_cpu)[keep].abs().max() < TOL
    assert (torch.cat(steps, dim=1) - full).abs().max() < TOL


@pytest.mark.parametrize("family", sorted(ENCODERS))
@pytest.mark.parametrize("task", ["masked-lm", "sequence-classification"])
def test_encoder_logits_with_padding_match_the_cpu(tmp_path, family, task):
    _, ours = _pair(tmp_path, ENCODERS[family], task)
    ids = torch.randint(1, 99, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        on_cpu = ours(ids, attention_mask=mask).logits
        on_gpu = ours.to(CUDA)(ids.to(CUDA), attention_mask=mask.to(CUDA)).logits.cpu()
    if task == "masked-lm":
        on_cpu, on_gpu = on_cpu[mask.bool()], on_gpu[mask.bool()]
    assert (on_gpu - on_cpu).abs().max() < TOL


def test_bf16_on_the_gpu_stays_close_to_fp32(tmp_path):
    _, ours = _pair(tmp_path, DECODERS["llama"], "causal-lm")
    ids = torch.randint(1, 99, (2, 16), device=CUDA)
    with torch.no_grad():
        fp32 = ours.to(CUDA)(ids).logits
        bf16 = ours.to(torch.bfloat16)(ids).logits.float()
    assert bf16.dtype == torch.float32 and (bf16 - fp32).norm() / fp32.norm() < 0.03


def test_greedy_generation_on_the_gpu_gives_the_cpu_tokens():
    from tests.serve.test_engine import LetterTokenizer, tiny_model

    model, tok = tiny_model(), LetterTokenizer()
    prompts = [[5, 9, 33], list(range(40, 51))]  # different lengths: a left-padded batch
    on_cpu = generate(model, tok, prompts, max_new_tokens=12, temperature=0, stop_token_ids=())
    on_gpu = generate(model.to(CUDA), tok, prompts, max_new_tokens=12, temperature=0, stop_token_ids=())
    assert [c.token_ids for c in on_gpu] == [c.token_ids for c in on_cpu]
