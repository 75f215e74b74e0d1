"""The report as one self-contained HTML page: inline CSS, inline SVG, thumbnails as data URIs and a little
plain JavaScript for the threshold. No network URL anywhere, so it opens offline and can be mailed as one file.

Every piece of user text (prompts, paths, errors) is HTML-escaped; the script reads its data from a JSON block
with ``<`` escaped, and from ``data-`` attributes, so a prompt can never become markup or code.
"""
from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Optional, Sequence

from .collect import ReportData
from .read import ScoreRow
from .svg import histogram_svg, num, scatter_svg
from .thumbs import Thumbnails

__all__ = ["render_page"]

STYLE = """
:root{--fg:#1d2430;--muted:#5b6473;--line:#d9dee6;--bg:#f6f7f9;--card:#fff;--accent:#2f6fdf;--bad:#c0392b}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
header,section{max-width:1180px;margin:0 auto;padding:14px 20px}header h1{margin:8px 0 2px;font-size:22px}
h2{font-size:17px;margin:6px 0 10px;border-bottom:1px solid var(--line);padding-bottom:4px}h3{font-size:14px;margin:12px 0 4px}
.muted,.src{color:var(--muted)}table{border-collapse:collapse;background:var(--card)}td,th{border:1px solid var(--line);padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef1f5}.kv td:first-child{color:var(--muted)}.row{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.plot{background:var(--card);border:1px solid var(--line)}.plot rect{fill:var(--accent)}.plot circle{fill:var(--accent);fill-opacity:.45}
.plot text{font-size:10px;fill:var(--muted)}.plot .label{font-size:11px;fill:var(--fg)}.plot .axis{stroke:#8a93a3}.plot .thr{stroke:var(--bad);stroke-width:2}
.controls{position:sticky;top:0;z-index:2;background:#e9eef7;border-bottom:1px solid var(--line);max-width:none}
.controls .inner{max-width:1140px;margin:0 auto;display:flex;flex-wrap:wrap;gap:10px 18px;align-items:center}
.controls input[type=range]{width:260px}.controls input[type=number]{width:110px}code{background:#fff;border:1px solid var(--line);padding:1px 5px;border-radius:3px}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(168px,1fr));gap:10px}
.card{margin:0;background:var(--card);border:1px solid var(--line);border-radius:4px;overflow:hidden;display:flex;flex-direction:column}
.card img{width:100%;height:150px;object-fit:contain;background:#222}.noimg{height:150px;display:flex;align-items:center;justify-content:center;padding:6px;background:#eee;color:var(--muted);font-size:11px;text-align:center;word-break:break-all}
figcaption{padding:5px 7px;font-size:12px}figcaption .prompt{display:block;color:var(--fg);max-height:3.9em;overflow:hidden}
figcaption .path{display:block;color:var(--muted);font-size:11px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.rank{display:inline-block;background:var(--accent);color:#fff;border-radius:3px;padding:0 4px;margin-right:4px}
[hidden]{display:none!important}.count{font-weight:normal;color:var(--muted);font-size:13px}.err td{font-size:12px;word-break:break-word}.warn{color:var(--bad)}
"""

SCRIPT = r"""
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("report-data").textContent);
  var sel = document.getElementById("thr-output"), rng = document.getElementById("thr-range"),
      val = document.getElementById("thr-value"), inv = document.getElementById("thr-invert");
  var cards = Array.prototype.slice.call(document.querySelectorAll(".card"));
  cards.forEach(function (c) { c._s = JSON.parse(c.getAttribute("data-scores")); });
  function setup() {
    var h = D.hist[sel.value];
    rng.min = val.min = h.start; rng.max = val.max = h.end; rng.step = val.step = h.width;
    rng.value = val.value = h.start;
  }
  function atLeast(h, t) {
    var i = Math.max(0, Math.ceil(Math.round((t - h.start) / h.width * 1e6) / 1e6)), n = 0;
    for (; i < h.counts.length; i++) n += h.counts[i];
    return n;
  }
  function apply() {
    var o = sel.value, j = D.outputs.indexOf(o), t = parseFloat(val.value), invert = inv.checked;
    cards.forEach(function (c) {
      var keep = isNaN(t) || c._s[j] >= t;
      c.hidden = invert ? keep : !keep;
    });
    document.querySelectorAll("[data-gallery]").forEach(function (g) {
      var all = g.querySelectorAll(".card"), shown = g.querySelectorAll(".card:not([hidden])");
      var out = document.getElementById("count-" + g.getAttribute("data-gallery"));
      if (out) out.textContent = shown.length + " of " + all.length + " shown";
    });
    var gallery = document.querySelector('[data-gallery="sample"]');
    document.getElementById("visible-count").textContent = gallery ? gallery.querySelectorAll(".card:not([hidden])").length : 0;
    var h = D.hist[o], kept = isNaN(t) ? D.scored : atLeast(h, t);
    document.getElementById("file-count").textContent = kept + " of " + D.scored;
    document.getElementById("select-cmd").textContent =
      "ipiqa select " + D.source + " --min " + o + "=" + (isNaN(t) ? h.start : t) + " -o keep.csv";
    document.querySelectorAll("svg.hist").forEach(function (s) {
      var line = s.querySelector(".thr");
      if (!line) return;
      var x0 = +s.getAttribute("data-x0"), x1 = +s.getAttribute("data-x1"),
          p0 = +s.getAttribute("data-px0"), p1 = +s.getAttribute("data-px1");
      if (s.getAttribute("data-output") !== o || isNaN(t) || x1 <= x0) { line.setAttribute("visibility", "hidden"); return; }
      var x = p0 + (Math.min(Math.max(t, x0), x1) - x0) / (x1 - x0) * (p1 - p0);
      line.setAttribute("x1", x); line.setAttribute("x2", x); line.setAttribute("visibility", "visible");
    });
  }
  sel.addEventListener("change", function () { setup(); apply(); });
  rng.addEventListener("input", function () { val.value = rng.value; apply(); });
  val.addEventListener("input", function () { rng.value = val.value; apply(); });
  inv.addEventListener("change", apply);
  setup();
  var m = /^#([^=]+)=(.+)$/.exec(decodeURIComponent(location.hash));  // #quality=0.6 opens with that threshold
  if (m && D.outputs.indexOf(m[1]) >= 0) { sel.value = m[1]; setup(); val.value = m[2]; rng.value = m[2]; }
  apply();
  document.body.setAttribute("data-ready", "1");
})();
"""


def _scores_text(row: ScoreRow, outputs: Sequence[str], by: str) -> str:
    parts = []
    for name, value in zip(outputs, row.scores or ()):
        text = f"{escape(name)} {num(value)}"
        parts.append(f"<b>{text}</b>" if name == by else text)
    return " · ".join(parts)


class _Cards:
    """Gallery cards: thumbnail, scores (the ranking one bold), prompt, file name."""

    def __init__(self, data: ReportData, thumb: Thumbnails, images_root: Optional[Path]):
        self.data, self.thumb, self.root = data, thumb, images_root

    def card(self, row: ScoreRow, rank: Optional[int] = None) -> str:
        t = self.thumb.for_row(row.image, self.root)
        name = escape(Path(row.image).name or row.image)
        img = (f'<img src="{t.uri}" alt="{name}">' if t.uri else
               f'<div class="noimg">no preview: {escape(t.why or "")}</div>')
        scores = json.dumps(list(row.scores or ()))
        badge = f'<span class="rank">#{rank}</span>' if rank is not None else ""
        prompt = escape(row.prompt) if row.prompt is not None else '<span class="muted">(no prompt)</span>'
        return (f'<figure class="card" data-index="{row.index}" data-image="{escape(row.image)}" '
                f'data-scores="{escape(scores)}">{img}<figcaption>{badge}{_scores_text(row, self.data.outputs, self.data.by)}'
                f'<span class="prompt">{prompt}</span><span class="path" title="{escape(row.image)}">'
                f'row {row.index + 1}: {name}</span></figcaption></figure>')

    def gallery(self, key: str, rows: Sequence[ScoreRow], ranked: bool = False) -> str:
        cards = "".join(self.card(r, i + 1 if ranked else None) for i, r in enumerate(rows))
        return f'<div class="gallery" data-gallery="{key}">{cards}</div>'


def _summary(d: ReportData, run: Sequence[tuple[str, str]]) -> str:
    rows = [("scores file" if d.single else "scores set", escape(d.described)), ("rows", f"{d.rows:,}"), ("scored", f"{d.scored:,}"),
            ("errors", f"{d.errors:,}"), ("outputs", escape(", ".join(d.outputs))), ("images ranked by", escape(d.by))]
    if not d.complete:
        which = "the file ends" if d.single else f"{', '.join(map(str, d.incomplete[:3]))} end{'s' if len(d.incomplete) == 1 else ''}"
        rows.append(("note", f'<span class="warn">{escape(which)} in a partial record (a killed run?); the rows before '
                             "it are reported. Finish it with ipiqa score ... --resume</span>"))
    rows += [(escape(k), escape(v)) for k, v in run] or [
        ("run", '<span class="muted">not recorded: no run record beside the scores (written before ipiqa recorded '
                "runs, or to stdout); pass --bundle DIR to show the bundle's</span>")]
    kv = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows)
    stats = "".join(f"<tr><td>{escape(s.name)}</td><td>{num(s.mean)}</td><td>{num(s.std)}</td><td>{num(s.min)}</td>"
                    f"<td>{num(s.max)}</td></tr>" for s in d.summaries)
    causes = "".join(f"<tr><td>{escape(c)}</td><td>{n:,}</td></tr>" for c, n in d.causes)
    parts = [f'<table class="kv">{kv}</table>']
    if d.scored:
        parts.append(f"<table><tr><th>output</th><th>mean</th><th>std</th><th>min</th><th>max</th></tr>{stats}</table>")
    if causes:
        parts.append(f'<table id="causes"><tr><th>error cause</th><th>rows</th></tr>{causes}</table>')
    return f'<section id="summary"><h2>Summary</h2><div class="row">{"".join(parts)}</div></section>'


def _controls(d: ReportData) -> str:
    options = "".join(f'<option value="{escape(o)}"{" selected" if o == d.by else ""}>{escape(o)}</option>'
                      for o in d.outputs)
    return ('<section class="controls" id="threshold"><div class="inner">'
            f'<label>Threshold: keep <select id="thr-output">{options}</select> &ge; '
            '<input type="range" id="thr-range"> <input type="number" id="thr-value"></label>'
            '<label><input type="checkbox" id="thr-invert"> show the dropped rows instead</label>'
            '<span>gallery: <b id="visible-count">0</b> shown · whole file: <b id="file-count">0</b> scored rows '
            'kept (from the histogram bins)</span><code id="select-cmd"></code></div></section>')


def _distributions(d: ReportData) -> str:
    plots = [histogram_svg(s.histogram, f"{s.name} (all {d.scored:,} scored rows; bin width {s.histogram.width_text})",
                           s.name) for s in d.summaries]
    if len(d.outputs) >= 2 and d.scatter:
        r = "" if d.pearson is None else f"; Pearson r over all rows {d.pearson:.3f}"
        plots.append(f'<figure style="margin:0;width:342px">{scatter_svg(d.scatter, d.outputs[0], d.outputs[1])}'
                     f'<figcaption class="muted">{escape(d.outputs[0])} against {escape(d.outputs[1])}: a uniform sample '
                     f"of {len(d.scatter):,} of {d.scored:,} rows{r}</figcaption></figure>")
    return f'<section id="distributions"><h2>Distributions</h2><div class="row">{"".join(plots)}</div></section>'


def _gallery_section(key: str, title: str, note: str, body: str) -> str:
    return (f'<section id="{key}"><h2>{title} <span class="count" id="count-{key}"></span></h2>'
            f'<p class="muted">{note}</p>{body}</section>')


def _prompts(d: ReportData, cards: _Cards) -> str:
    if not d.prompts:
        return ""
    share = "" if d.within_share is None else (f" {d.within_share:.0%} of the variance of {escape(d.by)} lies within "
                                               "prompts (what best-of-N selection can gain from).")
    untracked = (f" {d.untracked_rows:,} rows of prompts beyond the first {d.options.max_prompts:,} distinct ones "
                 "are not in these figures." if d.untracked_rows else "")
    head = (f'<p class="muted">{d.prompts:,} distinct prompts, {d.prompts_multi:,} with two or more images.{share}'
            f"{untracked} Shown: the {len(d.groups)} prompts whose images spread the most, each prompt's best "
            f"{d.options.per_prompt} ranked.</p>")
    if d.spread is not None:
        head += histogram_svg(d.spread, f"per-prompt range of {d.by} (max - min), {d.prompts_multi:,} prompts")
    groups = []
    for i, g in enumerate(d.groups):
        s = g.stats
        more = f", {s.n - len(g.best)} more not shown" if s.n > len(g.best) else ""
        groups.append(f'<div class="group"><h3>{escape(s.prompt or "(no prompt)")} '
                      f'<span class="count" id="count-prompt-{i}"></span></h3><p class="muted">{s.n} images: mean '
                      f"{num(s.mean)}, std {num(s.std)}, range {num(s.min)} to {num(s.max)}{more}</p>"
                      f"{cards.gallery(f'prompt-{i}', g.best, ranked=True)}</div>")
    return (f'<section id="prompts"><h2>Best of N per prompt</h2>{head}{"".join(groups)}'
            f'{"" if d.groups else "<p>Every prompt has one image: nothing to choose between.</p>"}</section>')


def _errors(d: ReportData) -> str:
    if not d.errors:
        return '<section id="errors"><h2>Errors</h2><p>No error rows.</p></section>'
    rows = "".join(f"<tr><td>{r.index + 1}</td><td>{escape(r.image)}</td><td>{escape(r.prompt or '')}</td>"
                   f"<td>{escape(r.error or '')}</td></tr>" for r in d.error_rows)
    more = (f"<p>The first {len(d.error_rows):,} of {d.errors:,} error rows; the causes above count them all.</p>"
            if d.errors > len(d.error_rows) else "")
    return (f'<section id="errors"><h2>Errors <span class="count">{d.errors:,} rows</span></h2>{more}'
            f'<table class="err"><tr><th>row</th><th>image</th><th>prompt</th><th>error</th></tr>{rows}</table></section>')


def render_page(d: ReportData, thumb: Thumbnails, images_root: Optional[Path] = None,
                run: Sequence[tuple[str, str]] = (), title: Optional[str] = None) -> str:
    """The page's HTML. ``thumb`` makes each image's thumbnail; ``run``: (label, value) pairs of the run that
    wrote the scores (the bundle's precision, ...), shown in the summary."""
    cards = _Cards(d, thumb, images_root)
    data = {"outputs": list(d.outputs), "scored": d.scored, "source": Path(d.source).name,
            "hist": {s.name: {"start": s.histogram.start, "end": s.histogram.edge(len(s.histogram.counts)),
                              "width": float(s.histogram.width_text), "counts": list(s.histogram.counts)}
                     for s in d.summaries}}
    blob = json.dumps(data).replace("<", "\\u003c")
    name = escape(title or f"ipiqa report: {Path(d.source).name}")
    body = [f'<header><h1>{name}</h1><p class="src">{d.rows:,} rows · {d.scored:,} scored · {d.errors:,} error{"" if d.errors == 1 else "s"} · '
            f"{escape(str(d.source))}</p></header>", _summary(d, run)]
    if d.scored:
        by = escape(d.by)
        body += [_controls(d), _distributions(d),
                 _gallery_section("worst", f"Worst {len(d.worst)} by {by}", "Lowest first.", cards.gallery("worst", d.worst)),
                 _gallery_section("best", f"Best {len(d.best)} by {by}", "Highest first.", cards.gallery("best", d.best)),
                 _prompts(d, cards),
                 _gallery_section("sample", "Gallery", f"A uniform sample of {len(d.sample):,} of the {d.scored:,} "
                                  f"scored rows (seeded: the same file gives the same sample), best {by} first. The "
                                  "threshold above filters every gallery.", cards.gallery("sample", d.sample))]
    body.append(_errors(d))
    body.append('<section class="muted">Made by ipiqa report; self-contained, works offline.</section>')
    script = f'<script type="application/json" id="report-data">{blob}</script><script>{SCRIPT}</script>' if d.scored else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1"><title>{name}</title><style>{STYLE}</style></head>'
            f'<body>{"".join(body)}{script}</body></html>')
