"""`lmsmith.train` exposes the recipe entry points, lazily."""
import subprocess
import sys

import pytest

import lmsmith.train
from lmsmith.train import api


def test_entry_points_are_exported():
    from lmsmith.train import RunResult, finetune, pretrain, run

    assert (finetune, pretrain, run, RunResult) == (api.finetune, api.pretrain, api.run, api.RunResult)
    assert set(lmsmith.train.__all__) == {"finetune", "pretrain", "run", "RunResult"}
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lmsmith.train.nope  # noqa: B018


@pytest.mark.slow  # a fresh interpreter imports torch: seconds, 20 s on a busy machine
def test_importing_a_submodule_does_not_load_the_training_stack():
    code = "import sys, lmsmith.train.state; print('lmsmith.train.api' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
