import json

import pytest
import torch

from lmsmith.api import load
from lmsmith.compress.quantize import quantize_model
from lmsmith.io.artifact import is_artifact, load_artifact, new_manifest, read_manifest, save_artifact
from lmsmith.io.weights import CheckpointError
from lmsmith.model.config import PRESETS
from lmsmith.model.transformer import Transformer


def tiny():
    torch.manual_seed(0)
    return Transformer(PRESETS["tiny-llama"].replace(intermediate_size=128)).eval()


def test_float_artifact_keeps_manifest_and_is_an_hf_folder(tmp_path):
    model = tiny()
    manifest = new_manifest(model.config, "test")
    manifest["history"].append({"step": "noop"})
    path = save_artifact(model, tmp_path / "a", manifest=manifest)
    assert is_artifact(path) and (path / "config.json").exists()
    loaded, _ = load(path)
    assert loaded.manifest["history"] == [{"step": "noop"}]
    ids = torch.randint(0, 512, (1, 6))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("method", ["int8", "int4", "w8a8"])
def test_quantized_artifact_round_trips_without_requantizing(tmp_path, method):
    model = tiny()
    quantize_model(model, method, group_size=32)
    ids = torch.randint(0, 512, (1, 6))
    with torch.no_grad():
        expected = model(ids).logits
    save_artifact(model, tmp_path / "q", manifest=new_manifest(model.config, "test"))
    assert read_manifest(tmp_path / "q")["quantization"]["method"] == method
    loaded, _ = load_artifact(tmp_path / "q")
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, expected, atol=1e-5)


def test_bad_manifest_is_named(tmp_path):
    save_artifact(tiny(), tmp_path / "a")
    (tmp_path / "a" / "lmsmith.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="lmsmith.json"):
        load_artifact(tmp_path / "a")


@pytest.mark.parametrize("method", ["int8", "int4", "w8a8"])
def test_quantized_tied_head_round_trips_and_shrinks_the_artifact(tmp_path, method):
    from safetensors import safe_open

    from lmsmith.compress.quantize import QuantizedEmbedding
    from lmsmith.generation import GenerationConfig, iter_tokens

    sizes = {}
    for head in (False, True):
        model = tiny()
        quantize_model(model, method, group_size=32, include_lm_head=head)
        sizes[head] = (save_artifact(model, tmp_path / str(head)) / "model.safetensors").stat().st_size
    loaded, _ = load_artifact(tmp_path / "True")
    assert isinstance(loaded.embed.tokens, QuantizedEmbedding) and loaded.embed.tokens.source is loaded.lm_head
    assert set(loaded.state_dict()) == set(model.state_dict())
    with safe_open(str(tmp_path / "True" / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert "lm_head.qweight" in stored and not any(k.startswith("embed.tokens") for k in stored)
    ids = torch.randint(0, 512, (2, 6))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    def greedy(m):  # the KV-cache decode path (model.device, embedding lookups of single tokens)
        return [t.tolist() for t in iter_tokens(m, [[1, 2, 3], [4, 5]], GenerationConfig(max_new_tokens=4), 0)]

    assert greedy(loaded) == greedy(model)
    assert sizes[True] < sizes[False]  # the float 512 x 64 table became the int8/int4 head
