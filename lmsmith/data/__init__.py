"""Data: sources → records → clean → split → encode (per objective) → collate into tensor batches.

Labels are aligned with input_ids throughout (causal-LM loss code shifts by one); -100 means no loss.
"""
from lmsmith.data.cleaning import CleaningReport, clean
from lmsmith.data.collators import FeatureDataset, MLMCollator, PackedDataset, collate_padded, collate_seq2seq
from lmsmith.data.encoding import (
    IGNORE_INDEX,
    encode_chat,
    encode_classification,
    encode_pair,
    encode_seq2seq,
    encode_tagged,
    encode_texts,
    mask_tokens,
    pack_for_causal_lm,
    special_token_ids,
    special_wrapping,
)
from lmsmith.data.records import DataError, TaggedRecord, TextRecord
from lmsmith.data.registry import LoadedDataset, dataset_names, load_dataset, register_dataset
from lmsmith.data.sampler import ResumableSampler
from lmsmith.data.sources import decode_lines, read_conll, read_csv, read_jsonl, read_text
from lmsmith.data.splits import Splits, split

__all__ = [
    "IGNORE_INDEX", "CleaningReport", "DataError", "FeatureDataset", "LoadedDataset", "MLMCollator",
    "PackedDataset", "ResumableSampler", "Splits", "TaggedRecord", "TextRecord", "clean", "collate_padded", "collate_seq2seq",
    "dataset_names", "decode_lines", "encode_chat", "encode_classification", "encode_pair", "encode_seq2seq", "encode_tagged",
    "encode_texts", "load_dataset", "mask_tokens", "pack_for_causal_lm", "read_conll", "read_csv",
    "read_jsonl", "read_text", "register_dataset", "special_token_ids", "special_wrapping", "split",
]
