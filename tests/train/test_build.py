"""A pretrained source without the task's head: the backbone is kept, the head is new, and head parts the
checkpoint does hold (a bare BertModel's pooler) are used."""
import json

import pytest
import torch
from safetensors.torch import save_file

from lmsmith.api import load
from lmsmith.io.artifact import new_manifest, save_artifact
from lmsmith.io.weights import CheckpointError, to_theirs
from lmsmith.model.config import PRESETS
from lmsmith.model.families import config_to_hf
from lmsmith.model.transformer import Transformer
from lmsmith.train.build import load_head_parts, load_pretrained

LABELS = ("neg", "neu", "pos")


def tiny_bert(task: str, labels: tuple[str, ...] = (), seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(PRESETS["tiny-bert"].replace(task=task, labels=labels, num_layers=1, vocab_size=128)).eval()


@pytest.fixture(scope="module")
def bare_bert(tmp_path_factory):
    """A BertModel folder laid out like all-MiniLM-L6-v2: backbone and pooler, no `bert.` prefix."""
    model = tiny_bert("sequence-classification", LABELS)
    folder = tmp_path_factory.mktemp("bare")
    theirs = to_theirs(model.state_dict(), model.config)
    bare = {k.removeprefix("bert."): v for k, v in theirs.items() if not k.startswith("classifier.")}
    save_file(bare, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config_to_hf(model.config.replace(task="base", labels=()))))
    return model, folder


def test_bare_base_checkpoint_as_classifier_uses_the_pretrained_pooler(bare_bert):
    reference, folder = bare_bert
    with pytest.raises(CheckpointError, match="missing tensor 'classifier.weight'"):  # no longer the pooler
        load(folder, task="sequence-classification", labels=LABELS)
    torch.manual_seed(1)
    model, _ = load_pretrained(str(folder), "sequence-classification", LABELS, torch.float32)
    assert model.training and model.config.labels == LABELS
    assert torch.equal(model.classifier.pooler.weight, reference.classifier.pooler.weight)
    assert torch.equal(model.classifier.pooler.bias, reference.classifier.pooler.bias)
    assert torch.equal(model.embed.tokens.weight, reference.embed.tokens.weight)
    assert not torch.equal(model.classifier.out.weight, reference.classifier.out.weight)  # new head


def test_mlm_artifact_as_classifier_keeps_the_backbone_and_gets_a_fresh_head(tmp_path):
    mlm = tiny_bert("masked-lm")
    path = save_artifact(mlm, tmp_path / "mlm", manifest=new_manifest(mlm.config, "test"))
    model, _ = load_pretrained(str(path), "sequence-classification", LABELS, torch.float32)
    assert model.config.task == "sequence-classification"
    assert torch.equal(model.layers[0].attn.q_proj.weight, mlm.layers[0].attn.q_proj.weight)
    assert load_head_parts(model, str(path)) == []  # an MLM checkpoint has no pooler


def test_classifier_artifact_with_other_labels_keeps_the_pooler_and_replaces_the_output(tmp_path):
    trained = tiny_bert("sequence-classification", LABELS)
    path = save_artifact(trained, tmp_path / "cls", manifest=new_manifest(trained.config, "test"))
    same, _ = load_pretrained(str(path), "sequence-classification", ("pos", "neg", "neu"), torch.float32)
    assert same.config.labels == ("pos", "neg", "neu")  # the same classes, reordered: the trained head is kept
    assert torch.equal(same.classifier.out.weight, trained.classifier.out.weight[[2, 0, 1]])
    other, _ = load_pretrained(str(path), "sequence-classification", ("no", "yes"), torch.float32)
    assert other.config.labels == ("no", "yes") and other.classifier.out.weight.shape[0] == 2
    assert torch.equal(other.classifier.pooler.weight, trained.classifier.pooler.weight)
    renamed, _ = load_pretrained(str(path), "sequence-classification", ("a", "b", "c"), torch.float32)
    assert torch.equal(renamed.classifier.pooler.weight, trained.classifier.pooler.weight)
    assert not torch.equal(renamed.classifier.out.weight, trained.classifier.out.weight)  # other classes: new rows


@pytest.mark.slow
def test_embedded_minilm_classifier_gets_its_pretrained_pooler():
    from safetensors.torch import load_file

    from lmsmith.api import resolve

    tensors = load_file(str(resolve("minilm-l6") / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor 'classifier.weight'"):  # the pooler was found
        load("minilm-l6", task="sequence-classification", labels=("negative", "neutral", "positive"))
    model, _ = load_pretrained("minilm-l6", "sequence-classification", ("negative", "neutral", "positive"),
                               torch.float32)
    assert torch.equal(model.classifier.pooler.weight, tensors["pooler.dense.weight"])
    assert torch.equal(model.classifier.pooler.bias, tensors["pooler.dense.bias"])
