import pickle

import pytest

from lmsmith.data import (
    DataError,
    TaggedRecord,
    TextRecord,
    decode_lines,
    read_conll,
    read_csv,
    read_jsonl,
    read_text,
)


def write(tmp_path, name, content: str | bytes):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


# ---- decoding ---------------------------------------------------------------------------------

def test_invalid_utf8_names_file_line_and_column(tmp_path):
    path = write(tmp_path, "bad.csv", b"text\nfine\ncaf\xc3\xa9 \xd1x\n")
    with pytest.raises(DataError) as caught:
        decode_lines(path)
    error = caught.value
    assert (error.path, error.line, error.column) == (str(path), 3, 6)  # 'é' is one character
    assert str(path) in str(error) and "line 3" in str(error) and "column 6" in str(error)
    assert "0xd1" in str(error) and "errors='replace'" in str(error)


def test_replace_mode_repairs_and_reports_lines(tmp_path):
    path = write(tmp_path, "bad.txt", b"ok\n\xff bad\nok\nbad \x81\n")
    decoded = decode_lines(path, errors="replace")
    assert decoded.repaired == {2, 4}
    assert decoded.lines[1] == "\ufffd bad\n"


def test_empty_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"empty\.csv: empty file"):
        read_csv(write(tmp_path, "empty.csv", b"  \n\n"))


def test_unknown_errors_mode(tmp_path):
    with pytest.raises(ValueError, match="'ignore'"):
        decode_lines(write(tmp_path, "a.txt", "x"), errors="ignore")


def test_byte_order_mark_is_dropped(tmp_path):
    records = read_csv(write(tmp_path, "bom.csv", "\ufefftext\nhello\n"))
    assert records == [TextRecord("hello")]


def test_data_error_pickles_and_is_a_value_error():
    error = DataError("bad", "f.csv", 3, "text")
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, ValueError) and str(copy) == str(error) == "f.csv, line 3, column 'text': bad"


# ---- plain text -------------------------------------------------------------------------------

def test_text_file_per_document_and_folder_order(tmp_path):
    write(tmp_path, "b.txt", "second doc\n")
    (tmp_path / "sub").mkdir()
    write(tmp_path, "sub/a.txt", "third\n")
    write(tmp_path, "a.txt", "first doc\nline two\n")
    write(tmp_path, "skip.md", "not text")
    records = read_text(tmp_path)
    assert [r.text for r in records] == ["first doc\nline two\n", "second doc\n", "third\n"]
    assert records[0].origin.endswith("a.txt")


def test_text_paragraphs(tmp_path):
    path = write(tmp_path, "p.txt", "one\nstill one\n\n  \ntwo\r\n\nthree")
    records = read_text(path, unit="paragraph")
    assert [r.text for r in records] == ["one\nstill one", "two", "three"]
    assert [r.origin.rsplit(":", 1)[1] for r in records] == ["1", "5", "7"]


def test_text_paragraph_repair_flag(tmp_path):
    path = write(tmp_path, "p.txt", b"good\n\nbad \xff\nmore\n")
    records = read_text(path, unit="paragraph", errors="replace")
    assert [r.repaired for r in records] == [False, True]


def test_text_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        read_text(tmp_path / "missing")
    with pytest.raises(DataError, match=r"no files matching '\*\.txt'"):
        read_text(tmp_path)
    with pytest.raises(ValueError, match="unit"):
        read_text(write(tmp_path, "x.txt", "x"), unit="line")
    with pytest.raises(DataError, match="empty file"):
        read_text(write(tmp_path, "y.txt", ""))


# ---- CSV --------------------------------------------------------------------------------------

CSV = 'label,text,pair\npos,"hello, world",a\n\nneg,"two\nlines",b\npos, spaced ,c\n'


def test_csv_with_column_mapping_and_multiline_field(tmp_path):
    path = write(tmp_path, "d.csv", CSV)
    records = read_csv(path, {"text": "text", "label": "label", "text_pair": "pair"}, labels={"pos", "neg"})
    assert records == [TextRecord("hello, world", "pos", "a"), TextRecord("two\nlines", "neg", "b"),
                       TextRecord(" spaced ", "pos", "c")]
    assert [r.origin.rsplit(":", 1)[1] for r in records] == ["2", "4", "6"]


def test_csv_missing_column(tmp_path):
    path = write(tmp_path, "d.csv", CSV)
    with pytest.raises(DataError) as caught:
        read_csv(path, {"text": "body"})
    assert (caught.value.line, caught.value.column) == (1, "body")
    assert "d.csv, line 1, column 'body': missing column" in str(caught.value)


def test_csv_unknown_label(tmp_path):
    path = write(tmp_path, "d.csv", CSV)
    with pytest.raises(DataError) as caught:
        read_csv(path, {"text": "text", "label": "label"}, labels={"pos"})
    assert (caught.value.line, caught.value.column) == (4, "label")
    assert "unknown label 'neg'" in str(caught.value)


def test_csv_short_row(tmp_path):
    path = write(tmp_path, "d.csv", "a,text\n1,x\n2\n")
    with pytest.raises(DataError) as caught:
        read_csv(path)
    assert (caught.value.line, caught.value.column) == (3, 2)


def test_csv_non_utf8_strict_and_replace(tmp_path):
    path = write(tmp_path, "d.csv", b"label,text\npos,fine\nneg,caf\xe9\npos,ok\n")
    with pytest.raises(DataError) as caught:
        read_csv(path)
    assert (caught.value.line, caught.value.column) == (3, 8)
    records = read_csv(path, {"text": "text", "label": "label"}, errors="replace")
    assert [r.repaired for r in records] == [False, True, False]
    assert records[1].text == "caf\ufffd"


def test_csv_malformed_and_bad_column_map(tmp_path):
    with pytest.raises(DataError, match="malformed CSV") as caught:
        read_csv(write(tmp_path, "q.csv", 'text\nfine\n"a"b\nmore\n'))
    assert caught.value.line == 3
    with pytest.raises(ValueError, match="must include 'text'"):
        read_csv(write(tmp_path, "d.csv", CSV), {"label": "label"})
    with pytest.raises(ValueError, match="'body'"):
        read_csv(write(tmp_path, "d.csv", CSV), {"text": "text", "body": "pair"})


# ---- JSONL ------------------------------------------------------------------------------------

def test_jsonl_reads_objects_and_skips_blank_lines(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"t": "a", "y": 1}\n\n{"t": "b", "y": 0, "extra": true}\n')
    records = read_jsonl(path, {"text": "t", "label": "y"}, labels={0, 1})
    assert records == [TextRecord("a", 1), TextRecord("b", 0)]
    assert records[1].origin.endswith(":3")


@pytest.mark.parametrize("content, line, column, message", [
    ('{"text": "a"}\n{"text": "b",}\n', 2, 14, "invalid JSON"),
    ('{"text": "a"}\n["b"]\n', 2, None, "expected a JSON object"),
    ('{"text": "a"}\n{"body": "b"}\n', 2, "text", "missing key"),
    ('{"text": 3}\n', 1, "text", "expected str, got int"),
])
def test_jsonl_errors(tmp_path, content, line, column, message):
    path = write(tmp_path, "d.jsonl", content)
    with pytest.raises(DataError, match=message) as caught:
        read_jsonl(path)
    assert (caught.value.path, caught.value.line, caught.value.column) == (str(path), line, column)


def test_jsonl_unknown_label(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "z"}\n')
    with pytest.raises(DataError, match="unknown label 'z'") as caught:
        read_jsonl(path, {"text": "text", "label": "label"}, labels={"x", "y"})
    assert (caught.value.line, caught.value.column) == (2, "label")


# ---- CoNLL ------------------------------------------------------------------------------------

CONLL = "-DOCSTART- -X- O\n\nEU NNP B-ORG\nrejects VBZ O\n\n\nPeter NNP B-PER\nBlackburn NNP I-PER\n"


def test_conll_sentences(tmp_path):
    records = read_conll(write(tmp_path, "d.conll", CONLL), tags={"O", "B-ORG", "B-PER", "I-PER"})
    assert records == [TaggedRecord(("EU", "rejects"), ("B-ORG", "O")),
                       TaggedRecord(("Peter", "Blackburn"), ("B-PER", "I-PER"))]
    assert records[1].origin.endswith(":7")


def test_conll_tab_delimited_with_comments(tmp_path):
    path = write(tmp_path, "d.tsv", "# sent_id = 1\nNew York\tB-LOC\nis\tO\n")
    records = read_conll(path, delimiter="\t", comment_prefix="# ")
    assert records == [TaggedRecord(("New York", "is"), ("B-LOC", "O"))]


def test_conll_unknown_tag_and_missing_field(tmp_path):
    path = write(tmp_path, "d.conll", CONLL)
    with pytest.raises(DataError, match="unknown tag 'I-PER'") as caught:
        read_conll(path, tags={"O", "B-ORG", "B-PER"})
    assert (caught.value.line, caught.value.column) == (8, 3)
    short = write(tmp_path, "s.conll", "EU B-ORG\nrejects\n")
    with pytest.raises(DataError, match="expected at least 2 fields, found 1") as caught:
        read_conll(short)
    assert (caught.value.line, caught.value.column) == (2, 2)


def test_conll_column_choice(tmp_path):
    path = write(tmp_path, "d.conll", "EU NNP B-ORG\n")
    assert read_conll(path, tag_column=1) == [TaggedRecord(("EU",), ("NNP",))]
    with pytest.raises(ValueError, match="both 1"):
        read_conll(path, token_column=1, tag_column=1)
    with pytest.raises(DataError, match="expected at least 4 fields, found 3"):
        read_conll(path, tag_column=3)


def test_tagged_record_needs_one_tag_per_token():
    with pytest.raises(ValueError, match="2 tokens but 1 tags"):
        TaggedRecord(("a", "b"), ("O",))
