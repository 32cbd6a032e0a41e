"""The shipped recipes on the real embedded models, cut to a few steps (slow)."""
import json

import pytest
import torch

from lmsmith.api import load, resolve
from lmsmith.train.api import finetune

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
SMALL = ["data.sizes={train: 64, validation: 32, test: 32}", "train.batch_size=16", "train.max_steps=4",
         "train.eval_every=4", "train.progress=false", "train.tensorboard=false", "train.log_every=1"]


def test_minilm_lora_recipe_adapter_loads_in_peft_and_matches(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    result = finetune("minilm-sentiment-lora", SMALL, output__dir=str(tmp_path))
    assert result.steps == 4 and {"accuracy", "macro_f1"} <= set(result.test)
    texts = ["what a lovely day", "this is the worst service ever"]
    batch = AutoTokenizer.from_pretrained(result.model_dir)(texts, padding=True, return_tensors="pt")
    batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    ours, _ = load(result.model_dir)  # the merged model
    base = AutoModelForSequenceClassification.from_pretrained(resolve("minilm-l6"), num_labels=3)
    with_adapter = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(result.model_dir).eval()
    with torch.no_grad():
        expected = ours(batch["input_ids"], attention_mask=batch["attention_mask"],
                        token_type_ids=batch["token_type_ids"]).logits
        assert (with_adapter(**batch).logits - expected).abs().max() < 1e-4
        assert (merged(**batch).logits - expected).abs().max() < 1e-4
    assert merged.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}


def test_minilm_full_recipe_few_steps(tmp_path):
    result = finetune("minilm-sentiment-full", SMALL, output__dir=str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["data_sizes"] == {"train": 64, "validation": 32, "test": 32}
    assert result.model_dir == tmp_path / "model" and result.adapter_dir is None


def test_smollm2_chat_sft_lora_recipe_few_steps(tmp_path):
    result = finetune("smollm2-chat-sft-lora", ["data.sizes={train: 8, validation: 4, test: 4}",
                                                "train.batch_size=2", "train.grad_accum=2", "train.max_steps=2",
                                                "train.progress=false", "train.tensorboard=false",
                                                "peft.save_merged=false"], output__dir=str(tmp_path))
    assert result.steps == 2 and result.test["loss"] < 5  # an instruct model already half knows the answer
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["target_modules"][0].startswith("model.layers.") and config["task_type"] == "CAUSAL_LM"
