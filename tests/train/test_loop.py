"""The training loop: schedule, parameter groups, accumulation, resume, NaN handling, early stopping,
keep-best, logging, activation checkpointing, AdaLoRA callbacks."""
import json
import math

import pytest
import torch

from lmsmith.data import MLMCollator, PackedDataset
from lmsmith.model.config import PRESETS
from lmsmith.model.transformer import Transformer
from lmsmith.train import state as S
from lmsmith.train.build import collate_blocks
from lmsmith.train.loop import (
    NonFiniteLossError,
    TrainData,
    TrainSettings,
    lr_multiplier,
    parameter_groups,
    read_metrics,
    train,
)
from lmsmith.train.objectives import causal_lm, masked_lm
from lmsmith.train.peft import AdaLoraConfig, active_ranks, apply_peft, peft_callbacks

pytestmark = pytest.mark.usefixtures("one_thread")
# the loop's logic on the CPU, compared with CPU tensors (tests/train/test_cuda.py covers the GPU)
QUIET = {"progress": False, "tensorboard": False, "log_every": 1, "device": "cpu"}


def tiny_model(preset="tiny-gpt", dropout=0.0, **changes):
    torch.manual_seed(0)
    config = PRESETS[preset].replace(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64,
                                     hidden_dropout=dropout, attention_dropout=dropout, **changes)
    return Transformer(config)


def clm_data(n=32, length=12, seed=0):
    blocks = torch.randint(0, 512, (n, length), generator=torch.Generator().manual_seed(seed))
    return TrainData(PackedDataset(blocks), collate_blocks)


def eval_batches(seed=1):
    blocks = torch.randint(0, 512, (8, 12), generator=torch.Generator().manual_seed(seed))
    return [collate_blocks([{"input_ids": row} for row in blocks[i:i + 4]]) for i in (0, 4)]


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir, "train")]


# --- pure pieces ---------------------------------------------------------------------------------------------

def test_lr_schedules():
    linear = [lr_multiplier(s, total=10, warmup=2, schedule="linear") for s in range(11)]
    assert linear[:3] == [0.0, 0.5, 1.0] and linear[6] == pytest.approx(0.5) and linear[10] == 0.0
    cosine = [lr_multiplier(s, total=10, warmup=0, schedule="cosine", min_ratio=0.1) for s in (0, 5, 10)]
    assert cosine == pytest.approx([1.0, 0.55, 0.1])
    assert lr_multiplier(7, total=10, warmup=2, schedule="constant") == 1.0


def test_no_weight_decay_on_biases_norms_and_embeddings():
    model = tiny_model()
    decay, rest = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in rest["params"]}
    assert "layers.0.attn.q_proj.weight" in decayed and "layers.0.mlp.up_proj.weight" in decayed
    assert {"embed.tokens.weight", "embed.positions.weight", "layers.0.attn.q_proj.bias",
            "layers.0.attn_norm.weight", "norm.bias"} <= exempt
    assert not decayed & exempt
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))  # tied head counted once


def test_frozen_parameters_are_left_out_and_nothing_trainable_is_an_error():
    model = tiny_model()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        parameter_groups(model, 0.0)


def test_settings_validation():
    with pytest.raises(ValueError, match="schedule"):
        TrainSettings(schedule="step")
    with pytest.raises(ValueError, match="eval_every"):
        TrainSettings(patience=3)
    assert TrainSettings(metric="macro_f1").greater_is_better and not TrainSettings(metric="loss").greater_is_better


# --- the loop ------------------------------------------------------------------------------------------------

def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    big, small = tiny_model(), tiny_model()
    settings = dict(max_steps=3, lr=1e-2, warmup_steps=0, **QUIET)
    train(big, causal_lm(), clm_data(), TrainSettings(batch_size=8, **settings), tmp_path / "a")
    train(small, causal_lm(), clm_data(), TrainSettings(batch_size=4, grad_accum=2, **settings), tmp_path / "b")
    # Adam normalises each gradient, so float noise in a zero gradient (the key bias) shows up at 1e-5.
    for (name, p), q in zip(big.named_parameters(), small.parameters()):
        assert torch.allclose(p, q, atol=1e-4), name
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), abs=1e-5)


def test_training_lowers_the_loss_and_logs_every_step(tmp_path):
    model = tiny_model()
    result = train(model, causal_lm(), clm_data(n=8), TrainSettings(max_steps=30, batch_size=8, lr=1e-2, **QUIET),
                   tmp_path, eval_batches=eval_batches())
    log = losses(tmp_path)
    assert len(log) == 30 and log[-1] < log[0] - 0.5  # memorising 8 sequences
    records = read_metrics(tmp_path, "train")
    assert records[0]["lr"] == 0.0 or records[0]["lr"] > 0
    assert {"loss", "lr", "tokens_per_s", "grad_norm", "epoch"} <= set(records[0])
    assert records[-1]["epoch"] == 30  # one batch per epoch: the sampler moved on 30 times
    assert result.steps == 30 and "perplexity" in result.last_eval
    assert len(read_metrics(tmp_path, "validation")) == 1  # eval_every unset: once, at the end


def test_interrupted_run_resumes_with_identical_losses(tmp_path):
    """In-process version of the kill test, with dropout and masked-LM masking: the RNG states and
    the collator's generator must both be restored."""
    def run(run_dir, stop_at=None, resume=False):
        model = tiny_model("tiny-bert", dropout=0.1)
        data = TrainData(masked_features(), MLMCollator(pad_id=0, mask_id=4, vocab_size=512,
                                                        special_ids=frozenset({0, 1, 2, 3, 4}), seed=0))
        settings = TrainSettings(max_steps=8, batch_size=4, lr=5e-3, save_every=3, **QUIET)
        callbacks = [Interrupt(stop_at)] if stop_at else []
        return train(model, masked_lm(), data, settings, run_dir, callbacks=callbacks, resume=resume), model

    _, reference = run(tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", stop_at=5)  # dies after step 5; the last checkpoint is step 3
    assert [s for s, _ in S.list_checkpoints(tmp_path / "cut")] == [3]
    assert len(losses(tmp_path / "cut")) == 4  # step 4 was logged after the checkpoint: replayed on resume
    result, resumed = run(tmp_path / "cut", resume=True)
    assert result.resumed_from == 3
    assert losses(tmp_path / "cut") == losses(tmp_path / "ref")  # bit for bit
    for p, q in zip(reference.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


class Interrupt:
    def __init__(self, step):
        self.step = step

    def on_step_end(self, step, model):
        if step + 1 == self.step:
            raise KeyboardInterrupt


def masked_features(n=24):
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": [1, *torch.randint(5, 512, (int(torch.randint(4, 12, (1,), generator=g)),),
                                             generator=g).tolist(), 2]} for _ in range(n)]


def test_starting_over_a_run_with_checkpoints_is_refused(tmp_path):
    train(tiny_model(), causal_lm(), clm_data(), TrainSettings(max_steps=2, save_every=2, **QUIET), tmp_path)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(tiny_model(), causal_lm(), clm_data(), TrainSettings(max_steps=2, **QUIET), tmp_path)


class NaNAt:
    """causal_lm, but the loss of optimizer step `step` (1-based) is NaN."""

    name = "causal-lm"

    def __init__(self, step):
        self.step, self.calls = step, 0
        self.inner = causal_lm()

    def __call__(self, model, batch):
        self.calls += 1
        loss, metrics = self.inner(model, batch)
        return (loss * float("nan"), metrics) if self.calls == self.step else (loss, metrics)

    def num_targets(self, batch):
        return self.inner.num_targets(batch)

    def evaluate(self, model, batches):
        return self.inner.evaluate(model, batches)


def test_nan_loss_stops_with_step_and_loss_and_keeps_the_checkpoint(tmp_path):
    model = tiny_model()
    settings = TrainSettings(max_steps=6, batch_size=4, save_every=2, **QUIET)
    with pytest.raises(NonFiniteLossError, match=r"step 3: loss is nan.*step-00000002.*skip_nonfinite"):
        train(model, NaNAt(3), clm_data(), settings, tmp_path)
    saved = S.load_tensors(S.step_dir(tmp_path, 2) / S.MODEL_FILE)
    assert all(torch.isfinite(t).all() for t in saved.values())
    for name, p in model.named_parameters():  # step 3 never reached the weights
        assert torch.equal(p.detach(), saved[name]), name
    assert len(losses(tmp_path)) == 2


def test_nan_loss_is_skipped_when_asked(tmp_path):
    model = tiny_model()
    result = train(model, NaNAt(3), clm_data(), TrainSettings(max_steps=5, skip_nonfinite=True, **QUIET), tmp_path)
    assert result.steps == 5 and result.skipped_steps == 1
    records = read_metrics(tmp_path, "train")
    assert [r.get("skipped", False) for r in records] == [False, False, True, False, False]
    assert all(torch.isfinite(p).all() for p in model.parameters())


class WorseEachTime:
    """Validation loss that only gets worse after the first evaluation."""

    name = "causal-lm"

    def __init__(self):
        self.inner, self.evals = causal_lm(), 0

    def __call__(self, model, batch):
        return self.inner(model, batch)

    def num_targets(self, batch):
        return self.inner.num_targets(batch)

    def evaluate(self, model, batches):
        self.evals += 1
        return {"loss": float(self.evals)}


class Snapshot:
    def __init__(self):
        self.after = {}

    def on_step_end(self, step, model):
        self.after[step + 1] = {n: p.detach().clone() for n, p in model.named_parameters()}


def test_early_stopping_and_keep_best(tmp_path):
    model, snapshot = tiny_model(), Snapshot()
    settings = TrainSettings(max_steps=20, lr=1e-2, eval_every=2, patience=2, save_every=100, **QUIET)
    result = train(model, WorseEachTime(), clm_data(), settings, tmp_path, eval_batches=eval_batches(),
                   callbacks=[snapshot])
    assert result.stopped_early and result.steps == 6  # evals at 2 (best), 4, 6 (patience 2 used up)
    assert result.best_step == 2 and result.best_metric == 1.0
    for name, p in model.named_parameters():  # the best weights are back in the model
        assert torch.equal(p.detach(), snapshot.after[2][name]), name
    assert json.loads((tmp_path / "best" / "metrics.json").read_text())["step"] == 2
    assert [s for s, _ in S.list_checkpoints(tmp_path)] == [6]  # saved on stopping


def test_unknown_best_metric_lists_the_available_ones(tmp_path):
    settings = TrainSettings(max_steps=2, eval_every=1, metric="macro_f1", **QUIET)
    with pytest.raises(ValueError, match="perplexity"):
        train(tiny_model(), causal_lm(), clm_data(), settings, tmp_path, eval_batches=eval_batches())


def test_activation_checkpointing_gives_the_same_training(tmp_path):
    plain, checkpointed = tiny_model(), tiny_model()
    settings = dict(max_steps=3, lr=1e-2, **QUIET)
    train(plain, causal_lm(), clm_data(), TrainSettings(**settings), tmp_path / "a")
    train(checkpointed, causal_lm(), clm_data(), TrainSettings(activation_checkpointing=True, **settings),
          tmp_path / "b")
    assert checkpointed.activation_checkpointing
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), abs=1e-6)


def test_bf16_autocast_on_cpu_when_asked(tmp_path):
    model = tiny_model()
    train(model, causal_lm(), clm_data(), TrainSettings(max_steps=2, precision="bf16", **QUIET), tmp_path)
    assert model.dtype == torch.float32  # autocast: master weights stay fp32
    assert all(math.isfinite(x) for x in losses(tmp_path))


def test_tensorboard_and_jsonl_metrics(tmp_path):
    train(tiny_model(), causal_lm(), clm_data(), TrainSettings(max_steps=2, progress=False, log_every=1), tmp_path,
          eval_batches=eval_batches())
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    splits = [json.loads(line)["split"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert splits == ["train", "train", "validation"]


def test_adalora_rank_allocation_runs_inside_the_loop(tmp_path):
    model = tiny_model("tiny-llama")
    apply_peft(model, AdaLoraConfig(target_modules=["q_proj", "v_proj"], init_r=6, target_r=2, total_step=10,
                                    tinit=2, tfinal=2, deltaT=1))
    assert set(active_ranks(model).values()) == {0}  # Λ starts at zero
    train(model, causal_lm(), clm_data(), TrainSettings(max_steps=10, lr=1e-2, **QUIET), tmp_path,
          callbacks=peft_callbacks(model))
    ranks = active_ranks(model)
    assert sum(ranks.values()) == 2 * len(ranks)  # budget shrank from 6 to 2 per module on average
    assert all(r <= 6 for r in ranks.values())




@pytest.mark.parametrize("save_every, stop_at", [(3, 8), (11, 13)], ids=["scoring-phase", "final-phase"])
def test_adalora_run_interrupted_and_resumed_matches_the_uninterrupted_run(tmp_path, save_every, stop_at):
    """The allocator's importance EMAs (checkpoint at step 6, mid-schedule) and its frozen rank pattern
    (checkpoint at step 11, after the final allocation at step 10) must come back on resume."""
    def run(run_dir, stop=None, resume=False):
        model = tiny_model("tiny-llama", dropout=0.1)
        apply_peft(model, AdaLoraConfig(target_modules=["q_proj", "v_proj"], init_r=6, target_r=2, total_step=14,
                                        tinit=2, tfinal=4, deltaT=1, lora_dropout=0.1))
        adalora = peft_callbacks(model)
        recorder = AllocatorRecorder(adalora[0])
        callbacks = adalora + [recorder] + ([Interrupt(stop)] if stop else [])
        settings = TrainSettings(max_steps=14, batch_size=4, lr=1e-2, save_every=save_every, **QUIET)
        train(model, causal_lm(), clm_data(), settings, run_dir, callbacks=callbacks, resume=resume)
        return model, recorder.states

    reference, reference_states = run(tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", stop=stop_at)
    resumed, resumed_states = run(tmp_path / "cut", resume=True)
    assert min(resumed_states) == stop_at - stop_at % save_every  # resumed from the last checkpoint
    for step, state in resumed_states.items():  # the allocator continues exactly where it was
        assert state.keys() == reference_states[step].keys()
        assert all(torch.equal(t, reference_states[step][k]) for k, t in state.items()), step
    assert losses(tmp_path / "cut") == losses(tmp_path / "ref")  # bit for bit
    assert active_ranks(resumed) == active_ranks(reference)
    for p, q in zip(reference.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


class AllocatorRecorder:
    """Copies of the AdaLoRA allocator's state after each optimizer step (flattened to name → tensor)."""

    def __init__(self, adalora):
        self.adalora, self.states = adalora, {}

    def on_step_end(self, step, model):
        state = self.adalora.state_dict()
        flat = {f"{part}/{key}": t.clone() for part in ("sensitivity", "uncertainty")
                for key, t in state[part].items()}
        flat.update({f"pattern/{key}": t.clone() for key, t in (state["rank_pattern"] or {}).items()})
        self.states[step] = flat
