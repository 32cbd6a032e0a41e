"""Pictures of explanations: self-contained HTML pages (no network) and PNGs (matplotlib, Agg)."""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .attention import AttentionMaps
    from .explanation import Explanation

RED, BLUE, GREY = (214, 39, 40), (31, 119, 180), (150, 150, 150)


def signed_colour(value: float) -> str:
    """Red for positive (supports the target), blue for negative; opacity = |value| (value in [-1, 1])."""
    r, g, b = RED if value >= 0 else BLUE
    return f"rgba({r},{g},{b},{min(1.0, abs(value)):.3f})"


def _page(title: str, body: str, style: str = "", script: str = "") -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>\n{_BASE_STYLE}{style}</style>\n</head>\n"
            f"<body>\n{body}\n{script}</body>\n</html>\n")


_BASE_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:60em;color:#222}
table{border-collapse:collapse}td,th{padding:2px 8px;text-align:left}
.tok{padding:2px 1px;margin:0 2px;border-radius:3px;line-height:2.2;white-space:pre}
.special{outline:1px dashed #999;color:#666}.muted{color:#666;font-size:90%}
"""


# --- attributions ----------------------------------------------------------------------------------------
def explanation_html(e: Explanation) -> str:
    """Tokens coloured by signed, normalised attribution (hover for the value), then the numbers."""
    from .explanation import LARGE_GAP

    spans = []
    for token, value, norm, special in zip(e.tokens, e.scores, e.normalized(), e.special):
        style = f"background:{signed_colour(norm)}"
        css = "tok special" if special else "tok"
        spans.append(f'<span class="{css}" style="{style}" title="{value:+.4g}">{html.escape(token)}</span>')
    probs = "".join(f"<tr><td>{html.escape(name)}</td><td>{p:.4f}</td></tr>" for name, p in e.probabilities.items())
    gap = "" if e.completeness_gap is None else (
        f"<br>completeness: Σ scores = {sum(e.scores):.4g}, f(x) − f(baseline) = "
        f"{e.target_score - e.baseline_score:.4g}, gap {e.completeness_gap:.2g}"
        + (" <b>(large: raise n_steps before trusting these scores)</b>" if e.relative_gap > LARGE_GAP else ""))
    body = f"""<h1>Why {html.escape(repr(e.target))}?</h1>
<p>prediction: <b>{html.escape(repr(e.prediction))}</b>; target {html.escape(repr(e.target))}
(p = {e.target_probability:.4f}); attributed: {e.score} = {e.target_score:.4g}</p>
<p class="muted">method: {html.escape(_method_detail(e))}; unit: {e.unit}{gap}<br>
red raises the target's score, blue lowers it; colours are scaled by the largest |score| of an ordinary
{e.unit} (special tokens, dashed, are left out of that scale).</p>
<div>{"".join(spans)}</div>
<h2>Probabilities</h2>
<table>{probs}</table>
<h2>Scores</h2>
<table><tr><th>{e.unit}</th><th>score</th></tr>{_score_rows(e)}</table>"""
    return _page(f"lmsmith explain: {e.target}", body)


def _method_detail(e: Explanation) -> str:
    steps = f", {e.n_steps} steps" if e.n_steps else ""
    return e.method + steps + (f", baseline: {e.baseline}" if e.baseline else "")


def _score_rows(e: Explanation) -> str:
    return "".join(f"<tr><td>{html.escape(t)}</td><td>{s:+.4g}</td></tr>" for t, s in zip(e.tokens, e.scores))


def plot_attributions(e: Explanation, path: Path) -> Path:
    """Horizontal bars, first token on top; special tokens grey."""
    n = len(e.tokens)
    fig = _figure(7, max(2.0, 0.28 * n + 1.2))
    ax = fig.subplots()
    colours = [_rgb(GREY) if sp else _rgb(RED if s >= 0 else BLUE) for s, sp in zip(e.scores, e.special)]
    ax.barh(range(n), e.scores, color=colours)
    ax.set_yticks(range(n), [_tick(t) for t in e.tokens], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.6)
    rollout = e.method == "attention-rollout"
    ax.set_xlabel("rollout attention from the output position" if rollout else f"attribution to {e.score}")
    ax.set_title(f"{e.method}: target {e.target!r}, predicted {e.prediction!r}", fontsize=9)
    return _save(fig, path)


# --- attention -----------------------------------------------------------------------------------------
def plot_attention(maps: AttentionMaps, path: Path, layer: int | None = None, head: int | None = None) -> Path:
    """layer and head: one heatmap; layer only: that layer's heads (4 a row, token labels); neither: a
    layers × heads grid. `layer` indexes maps.weights (see AttentionMaps.layer_index); `head` is a model
    head number."""
    panels, columns = _attention_panels(maps, layer, head)
    rows = -(-len(panels) // columns)
    labelled = len(panels) == 1 or (layer is not None and len(maps.tokens) <= 32)
    size = 6.0 if len(panels) == 1 else (3.2 if labelled else min(2.2, 24.0 / max(rows, columns)))
    fig = _figure(size * columns + 0.5, size * rows + 0.6)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, (title, matrix) in zip(axes, panels):
        _heatmap(ax, matrix, maps.tokens if labelled else None, title)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    fig.suptitle("attention (row: query token, column: key token)", fontsize=10)
    return _save(fig, path, top_inches=0.4)


def _attention_panels(maps: AttentionMaps, layer: int | None, head: int | None):
    """[(title, (T, S) matrix)] and how many panels go in a row."""
    if head is not None and head not in maps.heads:
        raise ValueError(f"head {head} was not captured; captured heads are {list(maps.heads)}")
    if head is not None and layer is None:
        raise ValueError("choose a layer to draw a single head")
    if layer is None:
        return ([(f"L{lay} H{h}", maps.weights[i, j]) for i, lay in enumerate(maps.layers)
                 for j, h in enumerate(maps.heads)], len(maps.heads))
    name = maps.layers[layer]
    if head is not None:
        return [(f"layer {name}, head {head}", maps.weights[layer, maps.heads.index(head)])], 1
    panels = [(f"L{name} H{h}", maps.weights[layer, j]) for j, h in enumerate(maps.heads)]
    panels.append((f"L{name} mean of heads", maps.head_mean()[layer]))
    return panels, min(4, len(panels))


def _heatmap(ax, weights, tokens, title: str) -> None:
    ax.imshow(weights.numpy(), cmap="viridis", vmin=0.0, vmax=float(weights.max()) or 1.0)
    ax.set_title(title, fontsize=7)
    if tokens is None:
        ax.set_xticks([])
        ax.set_yticks([])
        return
    labels = [_tick(t) for t in tokens]
    ax.set_xticks(range(len(tokens)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(tokens)), labels, fontsize=7)


def attention_html(maps: AttentionMaps) -> str:
    """One page, data inline: pick a layer and a head (or the head mean, or rollout) to see its heatmap."""
    data = maps.to_dict(decimals=4)
    data["mean"] = maps.head_mean().round(decimals=4).tolist()
    data["rollout"] = maps.rollout().round(decimals=4).tolist()
    # JSON inside <script> must not close the tag: escape every '<' (tokens are user text).
    payload = json.dumps(data, ensure_ascii=False).replace("<", "\\u003c")
    body = f"""<h1>Attention</h1>
<p class="muted">row = query token, column = key token; darker = more attention. Rollout combines all
captured layers (Abnar &amp; Zuidema 2020).</p>
<p>layer <select id="layer"></select> head <select id="head"></select></p>
<div id="map"></div>
<script type="application/json" id="data">{payload}</script>"""
    style = ("#map td{width:1.6em;height:1.6em;padding:0;border:1px solid #fff}"
             "#map th{font-weight:normal;font-size:80%;white-space:pre}"
             "#map thead th{writing-mode:vertical-rl;vertical-align:bottom}\n")
    return _page("lmsmith attention", body, style, f"<script>\n{_ATTENTION_JS}</script>\n")


_ATTENTION_JS = """const D = JSON.parse(document.getElementById('data').textContent);
const layer = document.getElementById('layer'), head = document.getElementById('head');
function option(sel, value, text) { const o = document.createElement('option'); o.value = value;
  o.textContent = text; sel.appendChild(o); }
D.layers.forEach((l, i) => option(layer, i, String(l)));
option(head, 'mean', 'mean of heads'); option(head, 'rollout', 'rollout (all layers)');
D.heads.forEach((h, i) => option(head, i, String(h)));
function matrix() {
  if (head.value === 'rollout') return D.rollout;
  if (head.value === 'mean') return D.mean[layer.value];
  return D.weights[layer.value][head.value];
}
function cell(tag, text) { const c = document.createElement(tag); c.textContent = text; return c; }
function draw() {
  const m = matrix(), table = document.createElement('table'), top = document.createElement('tr');
  const thead = document.createElement('thead'); top.appendChild(cell('th', ''));
  D.tokens.forEach(t => top.appendChild(cell('th', t))); thead.appendChild(top); table.appendChild(thead);
  const peak = Math.max(...m.flat()) || 1;
  m.forEach((row, i) => { const tr = document.createElement('tr'); tr.appendChild(cell('th', D.tokens[i]));
    row.forEach((w, j) => { const td = cell('td', ''); td.title = D.tokens[i] + ' → ' + D.tokens[j] + ': ' + w;
      td.style.background = 'rgba(68,1,84,' + (w / peak).toFixed(3) + ')'; tr.appendChild(td); });
    table.appendChild(tr); });
  const holder = document.getElementById('map'); holder.replaceChildren(table);
}
layer.onchange = draw; head.onchange = draw; draw();
"""


# --- matplotlib plumbing -------------------------------------------------------------------------------
def _figure(width: float, height: float):
    # A bare Figure draws with the Agg canvas and never touches pyplot's global backend or figure list,
    # so this works headless and leaves a notebook's plotting state alone.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _save(fig, path: Path, top_inches: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # leave `top_inches` free for a suptitle, whatever the figure's height
    fig.tight_layout(rect=(0, 0, 1, 1 - top_inches / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    return path


def _rgb(colour: tuple[int, int, int]) -> tuple[float, float, float]:
    return tuple(c / 255 for c in colour)


def _tick(token: str) -> str:
    """Axis labels: show spaces and newlines (which would otherwise be invisible)."""
    return token.replace("\n", "\\n").replace(" ", "·") if token.strip() != token or not token else token
