"""Recipes: shipped YAML files, dotted overrides, validation errors, the frozen resolved config."""
import dataclasses

import pytest
import yaml

from lmsmith.train.peft import AdaLoraConfig, LoraConfig
from lmsmith.train.recipes import (
    RunConfig,
    apply_overrides,
    from_dict,
    load_recipe,
    parse_overrides,
    peft_config,
    shipped_recipes,
    to_dict,
    to_yaml,
)

SHIPPED = ("minilm-sentiment-full", "minilm-sentiment-lora", "smollm2-chat-sft-lora", "tiny-bert-mlm", "tiny-gpt-clm")


def test_every_shipped_recipe_loads_and_states_its_seed_and_sizes():
    assert set(SHIPPED) <= set(shipped_recipes())
    for name in SHIPPED:
        cfg = load_recipe(name)
        assert isinstance(cfg, RunConfig) and cfg.name == name
        assert cfg.train.seed == 0 and cfg.data.seed == 0
    minilm = load_recipe("minilm-sentiment-full")
    assert dict(minilm.data.sizes) == {"train": 8000, "validation": 1000, "test": 2000}
    assert minilm.data.max_length == 64 and minilm.train.batch_size == 16 and minilm.train.epochs == 1
    lora = load_recipe("minilm-sentiment-lora")
    assert lora.peft.method == "lora" and lora.peft.params["r"] == 16 and lora.peft.params["lora_alpha"] == 32
    assert (lora.data.sizes, lora.data.max_length, lora.train.batch_size, lora.train.epochs) == (
        minilm.data.sizes, minilm.data.max_length, minilm.train.batch_size, minilm.train.epochs)  # as full


def test_overrides_set_nested_keys_with_typed_values():
    cfg = load_recipe("minilm-sentiment-lora", ["train.lr=3e-4", "peft.r=16", "data.sizes.train=100",
                                                "peft.target_modules=[q_proj, k_proj]", "train.max_steps=null"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)  # YAML 1.1 would read "3e-4" as a string
    assert cfg.peft.params["r"] == 16 and cfg.data.sizes["train"] == 100
    assert list(cfg.peft.params["target_modules"]) == ["q_proj", "k_proj"]
    assert cfg.train.max_steps is None
    keyword_style = load_recipe("minilm-sentiment-lora", {"train__batch_size": 8})
    assert keyword_style.train.batch_size == 8


def test_config_is_frozen_and_round_trips_through_yaml():
    cfg = load_recipe("tiny-gpt-clm", ["train.betas=[0.9, 0.98]"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0
    with pytest.raises(TypeError):
        cfg.model.config["num_layers"] = 3  # mappings are read-only views
    assert cfg.train.betas == (0.9, 0.98)
    again = from_dict(yaml.safe_load(to_yaml(cfg)))
    assert again == cfg or to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize("override, key", [
    (["train.lrr=1"], "train.lrr"),
    (["trian.lr=1"], "trian"),
    (["model.sourc=x"], "model.sourc"),
    (["peft.rank=4"], "peft.rank"),
])
def test_bad_keys_name_the_key_and_list_valid_ones(override, key):
    with pytest.raises(ValueError, match="valid keys") as info:
        load_recipe("minilm-sentiment-lora", override)
    assert repr(key) in str(info.value)
    if key == "train.lrr":
        assert "'lr'" in str(info.value) and "'grad_accum'" in str(info.value)
    if key == "peft.rank":
        assert "'r'" in str(info.value) and "'lora_alpha'" in str(info.value)


@pytest.mark.parametrize("override, message", [
    (["train.schedule=step"], "schedule"),
    (["train.precision=fp8"], "precision"),
    (["train.batch_size=0"], "batch_size"),
    (["train.lr=fast"], "must be a number"),
    (["objective=regression"], "objective"),
    (["peft.method=qlora"], "peft.method"),
    (["train.patience=2", "train.eval_every=null"], "eval_every"),
    (["model.preset=tiny-gpt"], "exactly one of model.source"),
    (["train=3"], "must be a mapping"),
])
def test_bad_values_are_value_errors(override, message):
    with pytest.raises(ValueError, match=message):
        load_recipe("minilm-sentiment-lora", override)


def test_override_syntax_errors():
    with pytest.raises(ValueError, match="section.key=value"):
        parse_overrides(["train.lr"])
    with pytest.raises(ValueError, match="not a section"):
        apply_overrides({"train": {"lr": 1}}, {"train.lr.x": 2})
    with pytest.raises(FileNotFoundError, match="shipped recipes"):
        load_recipe("no-such-recipe")


def test_peft_section_becomes_the_methods_config():
    lora = load_recipe("minilm-sentiment-lora")
    config = peft_config(lora.peft, total_steps=100)
    every_linear = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    assert isinstance(config, LoraConfig) and config.r == 16 and config.target_modules == every_linear
    dora = load_recipe("minilm-sentiment-lora", ["peft.method=dora"])
    assert peft_config(dora.peft, 100).use_dora
    with pytest.raises(ValueError, match="'peft.r'"):  # the LoRA recipe's r is not an AdaLoRA key
        load_recipe("minilm-sentiment-lora", ["peft.method=adalora"])
    ada = from_dict({**to_dict(lora), "peft": {"method": "adalora", "init_r": 6, "target_r": 2,
                                               "target_modules": ["q_proj"]}})
    config = peft_config(ada.peft, total_steps=40)
    assert isinstance(config, AdaLoraConfig) and config.total_step == 40  # schedule length = the run's steps
    assert peft_config(load_recipe("minilm-sentiment-full").peft, 10) is None
