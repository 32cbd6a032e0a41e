"""Resume after a real SIGKILL: a subprocess pretraining a tiny GPT (with dropout, so the RNG state
matters) is killed once a checkpoint exists, resumed with --resume, and must log exactly the losses
of an uninterrupted run."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lmsmith.train.loop import read_metrics
from lmsmith.train.state import list_checkpoints

from .conftest import tiny_recipe

ROOT = Path(__file__).resolve().parents[2]
STEPS = 400


def command(recipe: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lmsmith.train.cli_verbs", "pretrain", str(recipe), *extra]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_losses(tmp_path, corpus):
    recipe = tiny_recipe(tmp_path / "run", corpus, max_steps=STEPS, batch_size=4, save_every=25, lr=3e-3)
    recipe["model"]["config"].update(hidden_dropout=0.1, attention_dropout=0.1)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))

    reference = subprocess.run(command(path, f"output.dir={tmp_path / 'reference'}"), check=False, cwd=ROOT, env=env(),
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-2000:]

    victim = subprocess.Popen(command(path), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not any(step >= 50 for step, _ in list_checkpoints(tmp_path / "run")):
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    killed_at = len(read_metrics(tmp_path / "run"))
    assert killed_at < STEPS and not (tmp_path / "run" / "model").exists()

    resumed = subprocess.run(command(path, "--resume"), check=False, cwd=ROOT, env=env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "reference")]
    got = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "run")]
    assert len(expected) == STEPS
    assert got == expected  # bit for bit, every step, including those replayed after the checkpoint
    val_expected = read_metrics(tmp_path / "reference", "validation")
    assert read_metrics(tmp_path / "run", "validation") == val_expected
