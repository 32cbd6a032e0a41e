"""HF folder loading: bad inputs give errors naming the file and tensor; saving is atomic."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmsmith.io.checkpoint import load_hf_folder, save_hf_folder
from lmsmith.io.weights import CheckpointError
from lmsmith.model.config import PRESETS
from lmsmith.model.transformer import Transformer


@pytest.fixture
def folder(tmp_path):
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny-llama"])
    return save_hf_folder(model, tmp_path / "m"), model


def test_round_trip_is_exact(folder):
    path, model = folder
    again = load_hf_folder(path)
    ids = torch.randint(0, 512, (1, 7))
    assert torch.equal(model(ids).logits, again(ids).logits)


def test_missing_config(tmp_path):
    tmp_path.joinpath("model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_folder(tmp_path)


def test_unsupported_architecture_is_named(folder):
    path, _ = folder
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture.*mamba"):
        load_hf_folder(path)


def test_truncated_safetensors_names_the_file(folder):
    path, _ = folder
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_hf_folder(path)


def test_missing_tensor_is_named(folder):
    path, _ = folder
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        load_hf_folder(path)


def test_shape_mismatch_is_named(folder):
    path, _ = folder
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"layers.0.attn.q_proj.weight.*\(3, 3\)"):
        load_hf_folder(path)


def test_pickled_weights_refused_with_reason(folder):
    path, model = folder
    (path / "model.safetensors").unlink()
    torch.save({}, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        load_hf_folder(path)


def test_pickled_weights_allowed_explicitly_still_load_tensors_only(folder):
    path, model = folder
    from lmsmith.io.weights import to_theirs
    state = to_theirs({k: v for k, v in model.state_dict().items()}, model.config)
    (path / "model.safetensors").unlink()
    torch.save(state, path / "pytorch_model.bin")
    loaded = load_hf_folder(path, allow_pickle=True)
    ids = torch.randint(0, 512, (1, 5))
    assert torch.allclose(loaded(ids).logits, model(ids).logits)


def test_sharded_checkpoint_loads(folder, tmp_path):
    path, model = folder
    tensors = load_file(path / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    (path / "model.safetensors").unlink()
    save_file({n: tensors[n] for n in names[:half]}, path / "model-00001-of-00002.safetensors")
    save_file({n: tensors[n] for n in names[half:]}, path / "model-00002-of-00002.safetensors")
    index = {"weight_map": {n: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, n in enumerate(names)}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    ids = torch.randint(0, 512, (1, 5))
    assert torch.equal(load_hf_folder(path)(ids).logits, model(ids).logits)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard files missing"):
        load_hf_folder(path)


def test_failed_save_leaves_previous_folder_intact(folder, monkeypatch):
    path, model = folder
    before = (path / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("lmsmith.io.checkpoint.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_hf_folder(model, path)
    assert (path / "model.safetensors").read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp folders left behind
