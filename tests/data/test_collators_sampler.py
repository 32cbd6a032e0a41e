import pickle
from functools import partial

import pytest
import torch
from torch.utils.data import DataLoader

from lmsmith.data import (
    IGNORE_INDEX,
    FeatureDataset,
    MLMCollator,
    PackedDataset,
    ResumableSampler,
    TextRecord,
    collate_padded,
    encode_chat,
    encode_classification,
    encode_texts,
    pack_for_causal_lm,
)

# ---- collation --------------------------------------------------------------------------------

def test_collate_pads_right_with_attention_mask_and_sequence_labels():
    batch = collate_padded([{"input_ids": [5, 6, 7], "label": 1}, {"input_ids": [8], "label": 0}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]
    assert all(t.dtype == torch.long for t in batch.values())
    assert "token_type_ids" not in batch


def test_collate_token_labels_and_types_and_multiple():
    features = [{"input_ids": [5, 6], "labels": [IGNORE_INDEX, 6], "token_type_ids": [0, 1]},
                {"input_ids": [7, 8, 9], "labels": [7, 8, 9], "token_type_ids": [0, 0, 1]}]
    batch = collate_padded(features, pad_id=0, pad_to_multiple_of=4)
    assert batch["input_ids"].shape == (2, 4)
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, IGNORE_INDEX, IGNORE_INDEX], [7, 8, 9, IGNORE_INDEX]]
    assert batch["token_type_ids"].tolist() == [[0, 1, 0, 0], [0, 0, 1, 0]]


def test_collate_errors():
    with pytest.raises(ValueError, match="empty"):
        collate_padded([], pad_id=0)
    with pytest.raises(ValueError, match="pad_id is None"):
        collate_padded([{"input_ids": [1]}], pad_id=None)
    with pytest.raises(ValueError, match="1 of 2 features have 'token_type_ids'"):
        collate_padded([{"input_ids": [1], "token_type_ids": [0]}, {"input_ids": [2]}], pad_id=0)


def test_classification_through_a_dataloader(minilm_tokenizer):
    records = [TextRecord("good", "pos"), TextRecord("a much longer bad text", "neg")]
    features = encode_classification(records, minilm_tokenizer, labels=["neg", "pos"])
    loader = DataLoader(FeatureDataset(features), batch_size=2,
                        collate_fn=partial(collate_padded, pad_id=minilm_tokenizer.pad_id))
    batch = next(iter(loader))
    assert batch["labels"].tolist() == [1, 0]
    assert batch["attention_mask"].sum(1).tolist() == [len(f["input_ids"]) for f in features]


def test_packed_dataset_gives_labels_equal_to_inputs():
    dataset = PackedDataset(pack_for_causal_lm([list(range(5, 25))], seq_len=4, eos_id=2))
    batch = collate_padded([dataset[0], dataset[1]], pad_id=0)
    assert torch.equal(batch["input_ids"], batch["labels"]) and batch["attention_mask"].all()
    assert len(dataset) == 5
    with pytest.raises(ValueError, match="num_blocks, seq_len"):
        PackedDataset(torch.zeros(4, dtype=torch.long))


def test_chat_features_collate(char_tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    features = [encode_chat(messages, char_tokenizer, 64), encode_chat(messages, char_tokenizer, 10)]
    batch = collate_padded(features, pad_id=char_tokenizer.pad_id)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_mlm_collator_masks_only_real_tokens_and_resumes(minilm_tokenizer):
    texts = ["the quick brown fox jumps over the lazy dog"] * 6 + ["short"] * 2
    features = encode_texts(texts, minilm_tokenizer, max_length=32)
    collator = MLMCollator.from_tokenizer(minilm_tokenizer, probability=0.5, seed=3)
    collator(features)  # advance the generator
    saved = collator.state_dict()
    batch = collator(features)
    specials = torch.isin(batch["labels"], torch.tensor([0, 101, 102, 103]))
    assert not specials.any()  # no special token or padding is ever a target
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert (batch["labels"] != IGNORE_INDEX).any()
    restored = MLMCollator.from_tokenizer(minilm_tokenizer, probability=0.5, seed=99)
    restored.load_state_dict(saved)
    again = restored(features)
    assert torch.equal(again["input_ids"], batch["input_ids"]) and torch.equal(again["labels"], batch["labels"])
    copy = pickle.loads(pickle.dumps(collator))
    assert torch.equal(copy(features)["labels"], collator(features)["labels"])


def test_mlm_collator_needs_a_mask_token(chatml_tokenizer):
    with pytest.raises(ValueError, match="mask_id is None"):
        MLMCollator.from_tokenizer(chatml_tokenizer)


# ---- resumable sampler ------------------------------------------------------------------------

def test_sampler_epochs_are_seeded_permutations():
    sampler = ResumableSampler(10, batch_size=4, seed=1)
    epoch0 = list(sampler)
    assert [len(b) for b in epoch0] == [4, 4, 2]
    assert sorted(i for b in epoch0 for i in b) == list(range(10))
    assert sampler.epoch == 1  # finishing an epoch moves on
    epoch1 = list(sampler)
    assert epoch1 != epoch0
    assert list(ResumableSampler(10, 4, seed=1)) == epoch0
    assert list(ResumableSampler(10, 4, seed=2)) != epoch0
    assert len(ResumableSampler(10, 4, drop_last=True)) == 2
    assert list(ResumableSampler(5, 2, shuffle=False)) == [[0, 1], [2, 3], [4]]


def test_sampler_resumes_mid_epoch_exactly_like_an_uninterrupted_run():
    uninterrupted = ResumableSampler(23, batch_size=4, seed=7)
    expected = [batch for _ in range(3) for batch in uninterrupted]

    first = ResumableSampler(23, batch_size=4, seed=7)
    seen = [batch for batch in list(first)]  # epoch 0 whole
    iterator = iter(first)
    seen += [next(iterator) for _ in range(2)]  # two steps into epoch 1, then "crash"
    state = first.state_dict()
    assert state == {"n": 23, "batch_size": 4, "seed": 7, "epoch": 1, "next_batch": 2}

    resumed = ResumableSampler(23, batch_size=4, seed=0)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # a loop re-announcing the current epoch keeps the resumed position
    assert len(resumed) == 4
    seen += list(resumed) + list(resumed)  # rest of epoch 1, then epoch 2
    assert seen == expected


def test_sampler_resumes_through_a_dataloader():
    dataset = FeatureDataset([{"input_ids": [i]} for i in range(30)])
    collate = partial(collate_padded, pad_id=0)

    def loader(sampler):
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)

    reference = [b["input_ids"].flatten().tolist() for b in loader(ResumableSampler(30, 4, seed=3))]
    sampler = ResumableSampler(30, 4, seed=3)
    got = []
    for step, batch in enumerate(loader(sampler)):
        got.append(batch["input_ids"].flatten().tolist())
        if step == 2:
            state = sampler.state_dict()
            break
    resumed = ResumableSampler(30, 4, seed=3, epoch=state["epoch"], start_batch=state["next_batch"])
    got += [b["input_ids"].flatten().tolist() for b in loader(resumed)]
    assert got == reference


def test_sampler_errors():
    with pytest.raises(ValueError, match="batch_size >= 1"):
        ResumableSampler(10, 0)
    with pytest.raises(ValueError, match="start batch 4 outside 0..3"):
        ResumableSampler(10, 4, start_batch=4)
    sampler = ResumableSampler(10, 4)
    with pytest.raises(ValueError, match="batch_size=5, this one 4"):
        sampler.load_state_dict({"n": 10, "batch_size": 5, "seed": 0, "epoch": 0, "next_batch": 0})
