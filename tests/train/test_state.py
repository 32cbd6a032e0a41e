"""Checkpoint serialisation without pickles: nested state ↔ JSON + safetensors, RNG states, folders."""
import json
import random

import numpy as np
import pytest
import torch

from lmsmith.io.checkpoint import replace_dir
from lmsmith.train import state as S


def test_optimizer_state_round_trips_with_int_keys_tuples_and_tensors(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), betas=(0.8, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    saved = optimizer.state_dict()
    S.write_tree(saved, tmp_path / "s.json", tmp_path / "s.safetensors")
    loaded = S.read_tree(tmp_path / "s.json", tmp_path / "s.safetensors")
    assert set(loaded["state"]) == {0, 1}  # int keys survive JSON
    assert loaded["param_groups"][0]["betas"] == (0.8, 0.9)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(loaded["state"][0][key], saved["state"][0][key])
    fresh = torch.optim.AdamW(model.parameters(), betas=(0.8, 0.9))
    fresh.load_state_dict(loaded)  # accepted by torch as is
    assert json.loads((tmp_path / "s.json").read_text())  # plain JSON, no pickle anywhere


def test_rng_states_are_restored_exactly(tmp_path):
    S.seed_everything(7)
    S.write_tree(S.capture_rng(), tmp_path / "r.json", tmp_path / "r.safetensors")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    S.seed_everything(123)
    S.restore_rng(S.read_tree(tmp_path / "r.json", tmp_path / "r.safetensors"))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_unsupported_objects_are_refused():
    with pytest.raises(TypeError, match="cannot store a object"):
        S.split_tensors({"x": object()}, {})


def test_checkpoint_folders_commit_atomically_and_prune(tmp_path):
    for step in (2, 4, 6):
        tmp = S.new_temp_dir(S.step_dir(tmp_path, step))
        (tmp / S.STATE_FILE).write_text("{}")
        replace_dir(tmp, S.step_dir(tmp_path, step))
    half_written = S.new_temp_dir(S.step_dir(tmp_path, 8))  # a run killed while saving step 8
    (half_written / S.STATE_FILE).write_text("{}")
    assert [s for s, _ in S.list_checkpoints(tmp_path)] == [2, 4, 6]
    assert S.latest_checkpoint(tmp_path) == S.step_dir(tmp_path, 6)
    S.prune_checkpoints(tmp_path, keep=2)
    assert [s for s, _ in S.list_checkpoints(tmp_path)] == [4, 6]
    assert not half_written.exists()
    assert S.latest_checkpoint(tmp_path / "nothing") is None
