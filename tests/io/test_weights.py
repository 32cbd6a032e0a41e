"""Checkpoint name mapping: backbone prefixes, head modules stored inside the backbone, optional keys."""
import pytest
import torch

from lmsmith.io.weights import CheckpointError, detect_base_prefix, module_map, to_ours, to_theirs
from lmsmith.model.config import PRESETS
from lmsmith.model.transformer import Transformer

LABELS = ("neg", "neu", "pos")


@pytest.fixture(scope="module")
def classifier() -> Transformer:
    torch.manual_seed(0)
    config = PRESETS["tiny-bert"].replace(task="sequence-classification", labels=LABELS, num_layers=1)
    return Transformer(config).eval()


def bare_base_checkpoint(model: Transformer) -> dict[str, torch.Tensor]:
    """What a BertModel checkpoint holds (all-MiniLM-L6-v2's layout): the backbone and its pooler,
    no `bert.` prefix, no classifier."""
    theirs = to_theirs(model.state_dict(), model.config)
    return {name.removeprefix("bert."): t for name, t in theirs.items() if not name.startswith("classifier.")}


def test_task_checkpoint_keeps_the_pooler_under_the_backbone_prefix(classifier):
    theirs = to_theirs(classifier.state_dict(), classifier.config)
    assert "bert.pooler.dense.weight" in theirs and "classifier.weight" in theirs
    ours, unused = to_ours(theirs, classifier.config, set(classifier.state_dict()))
    assert not unused and torch.equal(ours["classifier.pooler.weight"], classifier.classifier.pooler.weight)


def test_bare_base_checkpoint_supplies_the_pooler_as_pooler_dense(classifier):
    theirs = bare_base_checkpoint(classifier)
    assert detect_base_prefix(classifier.config, set(theirs)) == ""
    pairs = {ours: name for ours, name, _ in module_map(classifier.config, "")}
    assert pairs["classifier.pooler"] == "pooler.dense"  # not bert.pooler.dense
    assert pairs["classifier.out"] == "classifier"  # heads outside the backbone keep their names
    assert pairs["embed.tokens"] == "embeddings.word_embeddings"
    wanted = {"classifier.pooler.weight", "classifier.pooler.bias"}
    ours, _ = to_ours(theirs, classifier.config, wanted)
    assert torch.equal(ours["classifier.pooler.weight"], classifier.classifier.pooler.weight)
    assert torch.equal(ours["classifier.pooler.bias"], classifier.classifier.pooler.bias)


def test_missing_head_is_named_unless_optional(classifier):
    theirs = bare_base_checkpoint(classifier)
    wanted = set(classifier.state_dict())
    with pytest.raises(CheckpointError, match="missing tensor 'classifier.weight'"):
        to_ours(theirs, classifier.config, wanted, source="minilm")
    head = frozenset(k for k in wanted if k.startswith("classifier."))
    ours, unused = to_ours(theirs, classifier.config, wanted, optional=head)
    assert {"classifier.pooler.weight", "classifier.pooler.bias"} <= set(ours)
    assert "classifier.out.weight" not in ours and not unused
    with pytest.raises(CheckpointError, match="missing tensor 'embeddings.word_embeddings.weight'"):
        del theirs["embeddings.word_embeddings.weight"]  # optional covers only the keys it names
        to_ours(theirs, classifier.config, wanted, optional=head)


def test_default_map_is_the_task_checkpoint_layout(classifier):
    assert module_map(classifier.config) == module_map(classifier.config, "bert.")
    assert ("classifier.pooler", "bert.pooler.dense", "copy") in module_map(classifier.config)
