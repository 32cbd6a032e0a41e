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
