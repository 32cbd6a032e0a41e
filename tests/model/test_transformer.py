"""The generic Transformer's own behaviour: config validation, dtypes, masks, hidden states, attentions."""
import pytest
import torch

from lmsmith.model.cache import StaticKVCache
from lmsmith.model.config import PRESETS, ModelConfig
from lmsmith.model.transformer import Transformer


def tiny(name="tiny-llama", **changes):
    torch.manual_seed(0)
    return Transformer(PRESETS[name].replace(**changes)).eval()


@pytest.mark.parametrize("bad,match", [
    (dict(num_heads=3), "multiple of num_kv_heads"),
    (dict(task="translation"), "task"),
    (dict(norm="batchnorm"), "norm"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(task="sequence-classification"), "labels"),
])
def test_invalid_config_names_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        PRESETS["tiny-llama"].replace(**bad)


def test_config_round_trips_through_dict():
    cfg = PRESETS["tiny-bert"].replace(task="sequence-classification", labels=("a", "b"))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "wings": 2})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_is_close_to_fp32(dtype):
    model = tiny()
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
        low = model.to(dtype)(ids).logits.float()
    assert (low - ref).abs().max() < 0.05 * ref.abs().max()


def test_sequence_longer_than_context_is_rejected():
    model = tiny(max_position_embeddings=16)
    with pytest.raises(ValueError, match="17 tokens exceeds the context window of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_kv_cache_overflow_is_rejected():
    model = tiny()
    cache = StaticKVCache(model.config, 1, 4)
    with pytest.raises(ValueError, match="KV cache holds 4 positions"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_hidden_states_and_attention_maps_are_exposed():
    model = tiny()
    out = model(torch.randint(0, 512, (1, 6)), output_hidden_states=True, output_attentions=True)
    assert len(out.all_hidden_states) == model.config.num_layers + 1
    assert len(out.attentions) == model.config.num_layers
    attn = out.attentions[0]  # (B, H, T, S): causal rows sum to one, nothing above the diagonal
    assert attn.shape == (1, 4, 6, 6)
    assert torch.allclose(attn.sum(-1), torch.ones(1, 4, 6))
    assert attn.triu(1).abs().max() == 0


def test_logits_to_keep_returns_only_the_last_positions():
    model = tiny()
    ids = torch.randint(0, 512, (2, 7))
    full = model(ids).logits
    assert torch.allclose(model(ids, logits_to_keep=1).logits, full[:, -1:], atol=1e-6)


def test_activation_checkpointing_gives_the_same_gradients():
    model = tiny().train()
    ids = torch.randint(0, 512, (2, 8))
    model(ids).logits.sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing = True
    model(ids).logits.sum().backward()
    assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(model.parameters(), expected))


def test_tied_embeddings_share_storage():
    model = tiny()
    assert model.lm_head.weight is model.embed.tokens.weight


def test_rope_frequencies_stay_float32_when_the_weights_go_bf16():
    model = Transformer(PRESETS["tiny-llama"]).to(torch.bfloat16)
    assert model.embed.tokens.weight.dtype == torch.bfloat16
    assert model.inv_freq.dtype == torch.float32
    assert torch.equal(model.inv_freq, Transformer(PRESETS["tiny-llama"]).inv_freq)
    ids = torch.randint(0, 512, (1, 4))
    far = torch.full((1, 4), 1000) + torch.arange(4)  # bf16 positions/frequencies would be badly off here
    with torch.no_grad():
        bf16 = model(ids, position_ids=far).logits.float()
        fp32 = model.float()(ids, position_ids=far).logits
    assert (bf16 - fp32).norm() / fp32.norm() < 0.05


def test_building_on_the_meta_device_does_not_import_dynamo():
    """Checkpoint loading builds the model on the meta device; nn.Embedding's own random init there
    imported torch._dynamo, 1.4 s of every `load`. Fresh interpreter: the test process has it already."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from lmsmith.model.config import PRESETS\n"
            "from lmsmith.model.transformer import Transformer\n"
            "with torch.device('meta'):\n"
            "    for name in ('tiny-llama', 'tiny-bert', 'tiny-gpt', 'tiny-t5'):\n"
            "        Transformer(PRESETS[name])\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_random_init_still_initialises_every_embedding():
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny-t5"])
    tables = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    assert len(tables) >= 2  # tokens and the relative-position table(s)
    for weight in tables:
        assert torch.isfinite(weight).all() and 0.015 < weight.std().item() < 0.025
