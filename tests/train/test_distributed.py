"""Data parallel training: the rank sharding of batches (fast), and 2 real processes on CPU with the
gloo backend (torchrun) matching one process with the same global batch, for DDP and FSDP (slow)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lmsmith.data import ResumableSampler
from lmsmith.train.distributed import DistContext, ShardedBatchSampler, setup, wrap
from lmsmith.train.loop import read_metrics

from .conftest import tiny_recipe

ROOT = Path(__file__).resolve().parents[2]


def test_ranks_split_each_global_batch_into_the_single_process_batch():
    single = list(ResumableSampler(20, 8, seed=3, drop_last=True))
    ranks = [list(ShardedBatchSampler(ResumableSampler(20, 8, seed=3, drop_last=True), r, 2)) for r in (0, 1)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 2
    for batch, part0, part1 in zip(single, *ranks):
        assert len(part0) == len(part1) == 4 and part0 + part1 == batch
    with pytest.raises(ValueError, match="does not split"):
        ShardedBatchSampler(ResumableSampler(20, 5), 0, 2)


def test_sharded_sampler_resumes_through_its_inner_state():
    sampler = ShardedBatchSampler(ResumableSampler(30, 6, seed=1), rank=1, world_size=3)
    it = iter(sampler)
    seen = [next(it) for _ in range(2)]
    fresh = ShardedBatchSampler(ResumableSampler(30, 6, seed=1), rank=1, world_size=3)
    fresh.load_state_dict(sampler.state_dict())
    assert list(fresh) == list(it) and all(len(b) == 2 for b in seen)


def test_single_process_setup_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = setup("cpu")
    assert ctx == DistContext(device=torch.device("cpu")) and ctx.is_main and not ctx.enabled
    model = torch.nn.Linear(2, 2)
    assert wrap(model, ctx) is model
    with pytest.raises(ValueError, match="strategy"):
        wrap(model, ctx, "zero3")


def run_cli(args, nproc=1, env=None):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run([*launcher, "-m", "lmsmith.train.cli_verbs", *args], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_cpu_processes_match_one_with_the_same_global_batch(tmp_path, corpus, strategy):
    recipe = tiny_recipe(tmp_path / "single", corpus, max_steps=5, batch_size=4, save_every=5)
    recipe["model"]["config"]["hidden_dropout"] = 0.0
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_cli(["pretrain", str(path)])
    run_cli(["pretrain", str(path), "train.batch_size=2", f"output.dir={tmp_path / 'multi'}",
             f"distributed.strategy={strategy}"], nproc=2)
    single = [r["loss"] for r in read_metrics(tmp_path / "single")]
    multi = [r["loss"] for r in read_metrics(tmp_path / "multi")]
    assert len(single) == len(multi) == 5 and single == pytest.approx(multi, abs=1e-5)
    a = load_file(str(tmp_path / "single" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "multi" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-4), name
    checkpoint = tmp_path / "multi" / "checkpoints" / "step-00000005"
    assert {"rng-rank0.json", "rng-rank1.json", "model.safetensors"} <= {p.name for p in checkpoint.iterdir()}
