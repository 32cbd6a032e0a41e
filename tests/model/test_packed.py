"""oneDNN-packed inference linears: same outputs, same state-dict keys, refuse autograd."""
import copy

import pytest
import torch
from torch import nn

from lmsmith.model.config import PRESETS
from lmsmith.model.packed import PackedLinear, pack_linears, packing_supported, unpack_linears
from lmsmith.model.transformer import Transformer

pytestmark = pytest.mark.skipif(not packing_supported("cpu", torch.float32),
                                reason="this torch build has no oneDNN reordered linear")


def tiny_llama() -> Transformer:
    torch.manual_seed(0)
    return Transformer(PRESETS["tiny-llama"]).eval()


@pytest.mark.parametrize("shape", [(5, 16), (2, 3, 16), (1, 16)])
def test_packed_linear_matches_nn_linear(shape):
    linear = nn.Linear(16, 24)
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(PackedLinear.from_linear(linear)(x), linear(x), atol=1e-5, rtol=1e-5)


def test_packing_a_model_keeps_logits_and_state_dict_keys():
    model = tiny_llama()
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        want = model(ids).logits
        keys = list(model.state_dict())
        names = pack_linears(model, min_weight_elements=0)
        got = model(ids).logits
    assert "layers.0.attn.q_proj" in names and "layers.0.mlp.down_proj" in names
    assert all(isinstance(model.get_submodule(n), PackedLinear) for n in names)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert list(model.state_dict()) == keys


def test_packed_state_dict_round_trips_into_plain_model():
    packed = tiny_llama()
    pack_linears(packed, min_weight_elements=0)
    plain = Transformer(PRESETS["tiny-llama"]).eval()
    plain.load_state_dict(packed.state_dict())
    ids = torch.randint(0, plain.config.vocab_size, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, packed(ids).logits, atol=1e-4, rtol=1e-4)


def test_loading_a_state_dict_repacks_and_rejects_wrong_shapes():
    source, target = tiny_llama(), Transformer(PRESETS["tiny-llama"]).eval()
    pack_linears(target, min_weight_elements=0)
    target.load_state_dict(source.state_dict())
    ids = torch.randint(0, source.config.vocab_size, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(target(ids).logits, source(ids).logits, atol=1e-4, rtol=1e-4)
    bad = dict(source.state_dict())
    bad["layers.0.attn.q_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(RuntimeError, match="layers.0.attn.q_proj.weight: shape"):
        target.load_state_dict(bad)


def test_unpack_restores_trainable_linears_and_deepcopy_works():
    model = tiny_llama()
    names = pack_linears(model, exclude=("lm_head",), min_weight_elements=0)
    assert "lm_head" not in names
    clone = copy.deepcopy(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 4))
    with torch.no_grad():
        torch.testing.assert_close(clone(ids).logits, model(ids).logits)
    assert unpack_linears(model) == len(names)
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    model.train()(ids).logits.sum().backward()  # trains again once unpacked
    assert model.layers[0].attn.q_proj.weight.grad is not None


def test_packed_linear_refuses_autograd():
    packed = PackedLinear.from_linear(nn.Linear(4, 4))
    with pytest.raises(RuntimeError, match="inference-only"):
        packed(torch.randn(2, 4, requires_grad=True))


def test_non_float32_or_subclassed_linears_are_left_alone():
    model = nn.Sequential(nn.Linear(4, 4).to(torch.bfloat16), nn.Linear(4, 4))
    assert pack_linears(model, min_weight_elements=0) == ["1"]
    assert isinstance(model[0], nn.Linear)


def test_by_default_only_large_weights_are_packed():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(4096, 1024, bias=False))
    assert pack_linears(model) == ["1"]
    assert isinstance(model[0], nn.Linear) and isinstance(model[1], PackedLinear)


def test_loading_without_the_bias_reports_it_missing():
    packed = PackedLinear.from_linear(nn.Linear(4, 4))
    result = packed.load_state_dict({"weight": torch.zeros(4, 4)}, strict=False)
    assert result.missing_keys == ["bias"]
