"""Training throughput and peak memory: lmsmith's loop vs transformers (+peft), by hand and with Trainer.

    .venv/bin/python benchmarks/train.py                 # both cases, every engine
    .venv/bin/python benchmarks/train.py --case lora-smollm2 --steps 10 --warmup 2

Cases (identical settings for every engine: same weights, batches, AdamW lr 1e-4, fp32, grad-norm clip 1.0):
  lora-smollm2   LoRA r=8 (alpha 16, dropout 0.05) on q_proj/v_proj of SmolLM2-135M, causal LM, seq 128, batch 4
  full-minilm    full fine-tuning of MiniLM-L6 for 3-class sequence classification, seq 64, batch 32

Engines, each in its own subprocess (so peak RSS is the engine's own):
  lmsmith        lmsmith.train.loop.train
  hf-loop        transformers (+ peft) model in a plain PyTorch loop
  hf-trainer     transformers.Trainer
Batches are random token ids of exactly `seq` tokens (no padding), so every engine does the same work.
Tokens/s counts the steps after `--warmup`; peak RSS is the process's maximum resident set size.
On a shared machine, `--repeats N` runs the engines N times in turn and keeps each one's best run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    "lora-smollm2": {"seq": 128, "batch": 4, "task": "causal-lm"},
    "full-minilm": {"seq": 64, "batch": 32, "task": "sequence-classification"},
}
ENGINES = ("lmsmith", "hf-loop", "hf-trainer")
LR = 1e-4
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target": ("q_proj", "v_proj")}
CACHE = Path(tempfile.gettempdir()) / "lmsmith-bench-train"


# --- shared ----------------------------------------------------------------------------------------------

def model_folder(case: str) -> Path:
    """An HF folder both engines load: MiniLM as shipped; SmolLM2's GGUF exported once to safetensors."""
    from lmsmith.api import resolve

    if case == "full-minilm":
        return resolve("minilm-l6")
    folder = CACHE / "smollm2-135m-hf"
    if not (folder / "model.safetensors").exists():
        from lmsmith.api import load
        from lmsmith.io.checkpoint import save_hf_folder

        model, tokenizer = load("smollm2", task="causal-lm")
        save_hf_folder(model, folder, tokenizer)
    return folder


def batches(case: str, count: int, vocab: int) -> list[dict]:
    import torch

    spec = CASES[case]
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        ids = torch.randint(1000, vocab, (spec["batch"], spec["seq"]), generator=g)
        labels = ids if spec["task"] == "causal-lm" else torch.randint(0, 3, (spec["batch"],), generator=g)
        out.append({"input_ids": ids, "labels": labels})
    return out


def examples(batch_list: list[dict]) -> list[dict]:
    """The same batches as a flat list of examples (for engines that batch themselves)."""
    return [{k: v[i] for k, v in b.items()} for b in batch_list for i in range(b["input_ids"].shape[0])]


def report(step_times: list[float], warmup: int, case: str) -> dict:
    spec = CASES[case]
    timed = step_times[warmup:]
    tokens = spec["batch"] * spec["seq"] * len(timed)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"tokens_per_s": tokens / sum(timed), "step_s": sum(timed) / len(timed), "peak_rss_mb": peak_kb / 1024}


class StepClock:
    """Seconds per optimizer step, from consecutive step-end times."""

    def __init__(self):
        self.last, self.times = time.perf_counter(), []

    def tick(self) -> None:
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now


# --- engines --------------------------------------------------------------------------------------------

def run_lmsmith(case: str, total: int, folder: Path) -> list[float]:
    import torch

    from lmsmith.data import FeatureDataset
    from lmsmith.train.build import load_pretrained
    from lmsmith.train.loop import TrainData, TrainSettings, train
    from lmsmith.train.objectives import causal_lm, sequence_classification
    from lmsmith.train.peft import LoraConfig, apply_peft

    spec = CASES[case]
    labels = ("negative", "neutral", "positive")
    # as transformers does: a missing classification head is created on the pretrained encoder
    model, _ = load_pretrained(str(folder), spec["task"], labels if case == "full-minilm" else (), torch.float32)
    if case == "lora-smollm2":
        apply_peft(model, LoraConfig(target_modules=list(LORA["target"]), r=LORA["r"], lora_alpha=LORA["lora_alpha"],
                                     lora_dropout=LORA["lora_dropout"]))
    objective = causal_lm() if case == "lora-smollm2" else sequence_classification(labels)
    data = examples(batches(case, total, model.config.vocab_size))
    stack = lambda feats: {k: torch.stack([f[k] for f in feats]) for k in feats[0]}
    clock = StepClock()

    class Clock:
        def on_step_end(self, step, model):
            clock.tick()

    settings = TrainSettings(max_steps=total, batch_size=spec["batch"], lr=LR, weight_decay=0.0, schedule="constant",
                             max_grad_norm=1.0, precision="fp32", progress=False, tensorboard=False, log_every=10**6)
    with tempfile.TemporaryDirectory() as run_dir:
        clock.last = time.perf_counter()
        train(model.train(), objective, TrainData(FeatureDataset(data), stack), settings, run_dir,
              callbacks=[Clock()])
    return clock.times


def hf_model(case: str, folder: Path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if case == "full-minilm":
        return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3)
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(folder)
    config = LoraConfig(r=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
                        target_modules=list(LORA["target"]), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def run_hf_loop(case: str, total: int, folder: Path) -> list[float]:
    import torch

    model = hf_model(case, folder).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=True)
    clock = StepClock()
    for batch in batches(case, total, model.config.vocab_size):
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.tick()
    return clock.times


def run_hf_trainer(case: str, total: int, folder: Path) -> list[float]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = hf_model(case, folder)
    clock = StepClock()

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=CASES[case]["batch"], max_steps=total,
                                 learning_rate=LR, weight_decay=0.0, lr_scheduler_type="constant", max_grad_norm=1.0,
                                 logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=True,
                                 dataloader_num_workers=0, disable_tqdm=True, optim="adamw_torch_fused")
        data = examples(batches(case, total, model.config.vocab_size))
        Trainer(model=model, args=args, train_dataset=data, callbacks=[Clock()]).train()
    return clock.times


RUNNERS = {"lmsmith": run_lmsmith, "hf-loop": run_hf_loop, "hf-trainer": run_hf_trainer}


# --- driver ---------------------------------------------------------------------------------------------

def worker(engine: str, case: str, steps: int, warmup: int) -> None:
    import torch

    torch.manual_seed(0)
    times = RUNNERS[engine](case, warmup + steps, model_folder(case))
    print("RESULT " + json.dumps(report(times, warmup, case)))


def run_engine(engine: str, case: str, steps: int, warmup: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--case", case, "--steps", str(steps),
           "--warmup", str(warmup)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{engine} on {case} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def best_of(case: str, engines: list[str], steps: int, warmup: int, repeats: int) -> dict[str, dict]:
    """Each engine's fastest run out of `repeats`, engines interleaved so that load from other processes
    falls on all of them alike."""
    best: dict[str, dict] = {}
    for _ in range(repeats):
        for engine in engines:
            r = run_engine(engine, case, steps, warmup)
            if engine not in best or r["tokens_per_s"] > best[engine]["tokens_per_s"]:
                best[engine] = r
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=[*CASES, "all"], default="all")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=1, help="runs per engine, interleaved; the best is kept")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        worker(a.worker, a.case, a.steps, a.warmup)
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.steps} timed steps after {a.warmup}, "
          f"best of {a.repeats}")
    for case in CASES if a.case == "all" else [a.case]:
        model_folder(case)  # export once, outside the timed subprocesses
        results = best_of(case, a.engines.split(","), a.steps, a.warmup, a.repeats)
        print(f"\n{case} (seq {CASES[case]['seq']}, batch {CASES[case]['batch']})")
        print(f"  {'engine':<11} {'tokens/s':>9} {'s/step':>7} {'peak RSS MB':>12}")
        for engine, r in results.items():
            print(f"  {engine:<11} {r['tokens_per_s']:>9.0f} {r['step_s']:>7.2f} {r['peak_rss_mb']:>12.0f}")
        ours = results.get("lmsmith")
        for engine, r in results.items():
            if ours and engine != "lmsmith":
                print(f"  lmsmith / {engine}: tokens/s x{ours['tokens_per_s'] / r['tokens_per_s']:.2f}, "
                      f"peak RSS x{ours['peak_rss_mb'] / r['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
