"""HTML pages are well-formed and self-contained; PNGs are real images; JSON round-trips."""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest
import torch
from matplotlib.image import imread

from lmsmith.explain import AttentionMaps, attention_maps, explain

VOID = {"meta", "br", "hr", "img", "input", "link"}
HOSTILE = "<script>alert(1)</script> bad"


class TagBalance(HTMLParser):
    """Fails on a close tag that does not match the innermost open one; remembers what is left open."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()


def assert_well_formed(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    parser = TagBalance()
    parser.feed(page)
    parser.close()
    assert parser.stack == []
    assert not re.search(r"(src|href)\s*=|https?://|@import", page)  # nothing fetched from the network


def assert_png(path, min_width=200):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = imread(path).shape[:2]
    assert width >= min_width and height >= 100
    return width, height


def test_explanation_html_is_well_formed_and_escapes_the_text(classifier, wp_tokenizer):
    e = explain(classifier, wp_tokenizer, HOSTILE, method="occlusion", target="pos")
    page = e.to_html()
    assert_well_formed(page)
    assert "<script" not in page and "&lt;" in page  # the user's text never becomes markup
    for name, p in e.probabilities.items():
        assert f"<td>{name}</td><td>{p:.4f}</td>" in page
    assert page.count('class="tok') == len(e.tokens) and page.count('class="tok special"') == 2
    assert "rgba(214,39,40," in page or "rgba(31,119,180," in page  # signed colours


def test_attention_html_carries_its_data_inline(causal_lm, bpe_tokenizer):
    maps = attention_maps(causal_lm, bpe_tokenizer, "</script> Hello")
    page = maps.to_html()
    assert_well_formed(page)
    assert page.count("<script") == 2 and page.count("</script>") == 2  # the data block and the code
    raw = re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.DOTALL).group(1)
    data = json.loads(raw)
    assert data["tokens"] == list(maps.tokens) and "</script>" in "".join(data["tokens"])
    assert torch.allclose(torch.tensor(data["weights"]), maps.weights, atol=1e-4)
    assert torch.allclose(torch.tensor(data["rollout"]), maps.rollout(), atol=1e-4)
    assert len(data["mean"]) == len(maps.layers)


def test_explanation_save_writes_html_png_and_json(classifier, wp_tokenizer, tmp_path):
    e = explain(classifier, wp_tokenizer, "the movie was great", method="ig", n_steps=8, merge_words=True)
    paths = e.save(tmp_path / "out")
    assert sorted(paths) == ["html", "json", "png"] and all(p.is_file() for p in paths.values())
    assert_well_formed(paths["html"].read_text(encoding="utf-8"))
    assert_png(paths["png"])
    data = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert data == json.loads(e.to_json())
    assert data["tokens"] == list(e.tokens) and data["unit"] == "word" and data["method"] == "integrated-gradients"
    assert data["completeness_gap"] == pytest.approx(e.completeness_gap)


def test_attention_pngs_for_grid_layer_and_head(classifier, wp_tokenizer, tmp_path):
    maps = attention_maps(classifier, wp_tokenizer, "the movie was great")
    grid = assert_png(maps.save_png(tmp_path / "grid.png"))
    layer = assert_png(maps.save_png(tmp_path / "layer.png", layer=1))
    one = assert_png(maps.save_png(tmp_path / "one.png", layer=-1, head=2))
    assert len({grid, layer, one}) == 3  # three different layouts
    paths = maps.save(tmp_path / "a", layer=0, head=0)
    assert all(p.is_file() for p in paths.values())
    assert json.loads(paths["json"].read_text())["layers"] == [0, 1]


def test_attention_png_errors():
    maps = AttentionMaps(("a", "b"), torch.full((1, 2, 2, 2), 0.5), (3,), (0, 1))
    with pytest.raises(ValueError, match=r"head 5 was not captured; captured heads are \[0, 1\]"):
        maps.save_png("unused.png", layer=3, head=5)
    with pytest.raises(ValueError, match="choose a layer"):
        maps.save_png("unused.png", head=1)
    with pytest.raises(ValueError, match=r"captured layers are \[3\]"):
        maps.save_png("unused.png", layer=0)


def test_summary_reads_like_an_answer(classifier, wp_tokenizer):
    e = explain(classifier, wp_tokenizer, "I hate the movie", method="occlusion", target="neg", merge_words=True)
    text = e.summary(k=2)
    lines = text.splitlines()
    assert lines[0].startswith("prediction: ") and "'neg'" in lines[0] and "'pos'" in lines[0]
    assert lines[1].startswith("explaining: log-prob of 'neg'")
    best, value = e.top(1)[0] if e.top(1) else e.top(1, sign=-1)[0]
    assert f"{best!r} {value:+.3g}" in text
