import itertools

import pytest
import torch

from lmsmith.data import (
    IGNORE_INDEX,
    TaggedRecord,
    TextRecord,
    encode_chat,
    encode_classification,
    encode_pair,
    encode_tagged,
    encode_texts,
    mask_tokens,
    pack_for_causal_lm,
    special_token_ids,
    special_wrapping,
)
from lmsmith.data.encoding import truncate_longest_first

# ---- special tokens ---------------------------------------------------------------------------

def test_special_wrapping_found_by_probing(char_tokenizer, minilm_tokenizer, chatml_tokenizer):
    assert (special_wrapping(char_tokenizer).prefix, special_wrapping(char_tokenizer).suffix) == ((1,), (2,))
    assert special_wrapping(minilm_tokenizer).wrap([7]) == [101, 7, 102]
    assert special_wrapping(chatml_tokenizer).wrap([7]) == [7]  # BPE without a post-processor adds none


def test_special_wrapping_rejects_inconsistent_tokenizer(char_tokenizer):
    class Weird(type(char_tokenizer)):
        def encode(self, text, add_special_tokens=True):
            return [1, 9, 2] if add_special_tokens else [8]

    with pytest.raises(ValueError, match="does not contain the plain ids"):
        special_wrapping(Weird())


def test_special_token_ids(char_tokenizer, minilm_tokenizer):
    assert special_token_ids(char_tokenizer) == {0, 1, 2, 3}
    assert special_token_ids(minilm_tokenizer) == {0, 101, 102, 103}
    minilm_tokenizer_without_names = type("Unnamed", (), {  # names no bos/eos but encode adds [CLS]/[SEP]
        "pad_id": 0, "mask_id": 103, "bos_id": None, "eos_id": None, "encode": minilm_tokenizer.encode})()
    assert special_token_ids(minilm_tokenizer_without_names) == {0, 101, 102, 103}


def test_encode_texts_truncates_inside_special_tokens(minilm_tokenizer):
    [short, long] = encode_texts(["hello world", "word " * 50], minilm_tokenizer, max_length=8)
    assert short["input_ids"] == minilm_tokenizer.encode("hello world")
    assert len(long["input_ids"]) == 8 and long["input_ids"][0] == 101 and long["input_ids"][-1] == 102
    with pytest.raises(ValueError, match="max_length 2 leaves no room"):
        encode_texts(["x"], minilm_tokenizer, max_length=2)


# ---- causal LM packing ------------------------------------------------------------------------

def test_pack_for_causal_lm_puts_eos_between_documents():
    blocks = pack_for_causal_lm([[5, 6], [7, 8, 9], [10], [11, 12]], seq_len=3, eos_id=2)
    # stream: 5 6 2 7 8 9 2 10 2 11 12 2 → four full blocks
    assert blocks.tolist() == [[5, 6, 2], [7, 8, 9], [2, 10, 2], [11, 12, 2]]
    assert blocks.dtype == torch.long
    dropped = pack_for_causal_lm([[5, 6], [7, 8, 9], [10]], seq_len=4, eos_id=2)
    assert dropped.tolist() == [[5, 6, 2, 7], [8, 9, 2, 10]]  # the trailing eos is the dropped remainder


def test_pack_for_causal_lm_errors():
    with pytest.raises(ValueError, match="fewer than one block"):
        pack_for_causal_lm([[5, 6]], seq_len=8, eos_id=2)
    with pytest.raises(ValueError, match="seq_len must be >= 2"):
        pack_for_causal_lm([[5, 6]], seq_len=1, eos_id=2)


# ---- masked LM --------------------------------------------------------------------------------

def masking_inputs(rows=200, cols=500, vocab=1000):
    ids = torch.randint(10, vocab, (rows, cols), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, -1] = 1, 2  # bos / eos at the ends
    attention = torch.ones_like(ids)
    attention[::2, -50:] = 0  # right padding on every other row
    ids[::2, -50:] = 0
    return ids, attention


def test_mask_tokens_80_10_10_on_large_sample():
    ids, attention = masking_inputs()
    masked, labels = mask_tokens(ids, mask_id=3, vocab_size=1000, special_ids={0, 1, 2, 3},
                                 attention_mask=attention, generator=torch.Generator().manual_seed(1))
    candidates = (attention == 1) & (ids > 3)
    picked = labels != IGNORE_INDEX
    assert abs(picked.sum() / candidates.sum() - 0.15) < 0.005
    assert torch.equal(labels[picked], ids[picked])
    n = picked.sum()
    as_mask = (masked[picked] == 3).sum() / n
    unchanged = (masked[picked] == ids[picked]).sum() / n
    assert abs(as_mask - 0.8) < 0.01
    assert abs(unchanged - 0.1) < 0.01
    assert abs(1 - as_mask - unchanged - 0.1) < 0.01  # replaced by a random token
    assert torch.equal(masked[~picked], ids[~picked])  # nothing changes outside the picked positions


def test_mask_tokens_never_touches_special_tokens_or_padding():
    ids, attention = masking_inputs(rows=50, cols=60)
    masked, labels = mask_tokens(ids, mask_id=3, vocab_size=1000, special_ids={1, 2}, attention_mask=attention,
                                 probability=1.0, generator=torch.Generator().manual_seed(0))
    protected = (ids == 1) | (ids == 2) | (attention == 0)
    assert (labels[protected] == IGNORE_INDEX).all() and torch.equal(masked[protected], ids[protected])
    assert (labels[~protected] != IGNORE_INDEX).all()  # probability 1 picks every other token


def test_mask_tokens_is_reproducible_with_a_seeded_generator():
    ids, attention = masking_inputs(rows=4, cols=64)
    def run(seed):
        return mask_tokens(ids, mask_id=3, vocab_size=1000, special_ids={0, 1, 2, 3}, attention_mask=attention,
                           generator=torch.Generator().manual_seed(seed))
    assert all(torch.equal(a, b) for a, b in zip(run(5), run(5)))
    assert not torch.equal(run(5)[1], run(6)[1])
    with pytest.raises(ValueError, match="probability"):
        mask_tokens(ids, mask_id=3, vocab_size=10, special_ids={0}, probability=1.5)


# ---- sequence classification ------------------------------------------------------------------

def test_encode_classification_single_texts(minilm_tokenizer):
    records = [TextRecord("Hello world", "pos"), TextRecord("bad " * 40, "neg"), TextRecord("unlabelled")]
    features = encode_classification(records, minilm_tokenizer, labels=["neg", "pos"], max_length=16)
    assert features[0] == {"input_ids": minilm_tokenizer.encode("Hello world"), "label": 1}
    assert len(features[1]["input_ids"]) == 16 and features[1]["input_ids"][-1] == 102
    assert features[1]["label"] == 0
    assert "label" not in features[2]


def test_encode_classification_unknown_label(char_tokenizer):
    with pytest.raises(ValueError, match=r"unknown label 'meh' in record f\.csv:3"):
        encode_classification([TextRecord("x", "meh", origin="f.csv:3")], char_tokenizer, labels=["a"])


def test_pairs_match_the_reference_bert_encoding(minilm_tokenizer):
    reference = minilm_tokenizer.tokenizer
    for first, second in [("a short one", "and its pair"), ("one " * 30, "two " * 5), ("x " * 9, "y " * 40)]:
        ids, types = encode_pair(minilm_tokenizer, first, second, max_length=24)
        reference.enable_truncation(24, strategy="longest_first")
        try:
            expected = reference.encode(first, second)
        finally:
            reference.no_truncation()
        assert ids == expected.ids and types == expected.type_ids
    [feature] = encode_classification([TextRecord("a", 0, text_pair="b")], minilm_tokenizer, labels=[0])
    assert feature["token_type_ids"] == [0, 0, 0, 1, 1]


def test_truncate_longest_first_matches_token_by_token_rule():
    def reference(a, b, budget):
        while len(a) + len(b) > budget:
            if len(a) > len(b):
                a = a[:-1]
            else:
                b = b[:-1]
        return a, b
    for la, lb, budget in itertools.product(range(8), range(8), range(2, 10)):
        a, b = list(range(la)), list(range(100, 100 + lb))
        assert truncate_longest_first(a, b, budget) == reference(a, b, budget), (la, lb, budget)


# ---- token classification ---------------------------------------------------------------------

def test_encode_tagged_labels_first_sub_token(char_tokenizer):
    [feature] = encode_tagged([TaggedRecord(("ab", "c"), ("B", "O"))], char_tokenizer, tags=["O", "B"])
    assert feature["input_ids"] == [1, 5 + ord("a"), 5 + ord("b"), 5 + ord("c"), 2]
    assert feature["labels"] == [IGNORE_INDEX, 1, IGNORE_INDEX, 0, IGNORE_INDEX]


def test_encode_tagged_with_wordpiece(minilm_tokenizer):
    record = TaggedRecord(("Peter", "unaffable", "."), ("B-PER", "O", "O"))
    [feature] = encode_tagged([record], minilm_tokenizer, tags=["O", "B-PER"])
    assert feature["input_ids"] == minilm_tokenizer.encode("Peter unaffable .")  # same as in context
    assert feature["labels"] == [IGNORE_INDEX, 1, 0, IGNORE_INDEX, IGNORE_INDEX, 0, IGNORE_INDEX]
    [cut] = encode_tagged([record], minilm_tokenizer, tags=["O", "B-PER"], max_length=4)
    assert cut["input_ids"][-1] == 102 and cut["labels"] == [IGNORE_INDEX, 1, 0, IGNORE_INDEX]
    with pytest.raises(ValueError, match="unknown label 'B-PER'"):
        encode_tagged([record], minilm_tokenizer, tags=["O"])


# ---- chat SFT ---------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Classify: great day"},
    {"role": "assistant", "content": "positive"},
    {"role": "user", "content": "Classify: awful day"},
    {"role": "assistant", "content": "negative"},
]


def labelled_runs(feature) -> list[list[int]]:
    runs, current = [], []
    for token, label in zip(feature["input_ids"], feature["labels"]):
        if label != IGNORE_INDEX:
            assert label == token  # labels aligned with inputs
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("tokenizer_name", ["char_tokenizer", "chatml_tokenizer"])
def test_chat_labels_cover_exactly_the_assistant_content(tokenizer_name, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    feature = encode_chat(CONVERSATION, tokenizer, max_length=1024, train_on_turn_end=False)
    assert [tokenizer.decode(run) for run in labelled_runs(feature)] == ["positive", "negative"]
    full_text = tokenizer.apply_chat_template(CONVERSATION)
    assert feature["input_ids"] == tokenizer.encode(full_text, add_special_tokens=False)


def test_chat_labels_include_turn_end_by_default(chatml_tokenizer):
    feature = encode_chat(CONVERSATION, chatml_tokenizer, max_length=1024)
    assert [chatml_tokenizer.decode(run) for run in labelled_runs(feature)] == \
        ["positive<|im_end|>", "negative<|im_end|>"]


def test_chat_default_system_prompt_is_context(chatml_tokenizer):
    messages = CONVERSATION[1:3]  # no system message: the template inserts its default one
    feature = encode_chat(messages, chatml_tokenizer, max_length=1024, train_on_turn_end=False)
    assert "SmolLM" in chatml_tokenizer.decode(feature["input_ids"])
    assert [chatml_tokenizer.decode(run) for run in labelled_runs(feature)] == ["positive"]


def test_chat_truncation(char_tokenizer):
    full = encode_chat(CONVERSATION, char_tokenizer, max_length=10_000)
    cut = encode_chat(CONVERSATION, char_tokenizer, max_length=70)
    assert len(cut["input_ids"]) == len(cut["labels"]) == 70
    assert cut["input_ids"] == full["input_ids"][:70] and cut["labels"] == full["labels"][:70]


def test_chat_template_that_does_not_extend_prefixes_is_rejected(char_tokenizer):
    class Reversed(type(char_tokenizer)):
        def apply_chat_template(self, messages, add_generation_prompt=False):
            return super().apply_chat_template(messages[::-1], add_generation_prompt)

    with pytest.raises(ValueError, match="message 2 as an extension"):
        encode_chat(CONVERSATION, Reversed(), max_length=100)


def test_chat_template_that_rewrites_content_is_rejected(char_tokenizer):
    class Shouting(type(char_tokenizer)):
        def apply_chat_template(self, messages, add_generation_prompt=False):
            return super().apply_chat_template(messages, add_generation_prompt).upper()

    with pytest.raises(ValueError, match="content 'positive' not found"):
        encode_chat(CONVERSATION, Shouting(), max_length=100)
