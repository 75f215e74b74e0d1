"""Plain inline SVG plots: nothing to install, nothing fetched, crisp at any zoom, and small (a 100-bin
histogram is about 10 KB). The page's script moves the threshold line using the ``data-`` attributes."""
from __future__ import annotations

from html import escape
from typing import Sequence

from .stats import Histogram

__all__ = ["histogram_svg", "scatter_svg", "num"]


def num(x: float) -> str:
    """A score as people read it: four significant digits."""
    return f"{x:.4g}"


def histogram_svg(hist: Histogram, label: str, output: str = "", width: int = 370, height: int = 150) -> str:
    """Bars of ``hist``; ``output`` names the score for the page's threshold line (empty: no line)."""
    left, right, top, bottom = 44, 10, 8, 30
    pw, ph = width - left - right, height - top - bottom
    n = len(hist.counts)
    peak = max(hist.counts, default=0) or 1
    end = hist.edge(n) if n else hist.start
    parts = [f'<svg class="plot hist" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'data-output="{escape(output)}" data-x0="{hist.start!r}" data-x1="{end!r}" data-px0="{left}" '
             f'data-px1="{left + pw}"><title>{escape(label)}</title>']
    bw = pw / n if n else pw
    for i, c in enumerate(hist.counts):
        h = ph * c / peak
        parts.append(f'<rect x="{left + i * bw:.2f}" y="{top + ph - h:.2f}" width="{max(bw - 0.5, 0.5):.2f}" '
                     f'height="{h:.2f}"><title>[{num(hist.edge(i))}, {num(hist.edge(i + 1))}): {c} rows</title></rect>')
    base = top + ph
    parts.append(f'<line class="axis" x1="{left}" y1="{base}" x2="{left + pw}" y2="{base}"/>')
    for frac in (0.0, 0.5, 1.0):
        x = left + pw * frac
        value = hist.start + (end - hist.start) * frac
        anchor = "start" if frac == 0 else "end" if frac == 1 else "middle"
        parts.append(f'<text x="{x:.1f}" y="{base + 14}" text-anchor="{anchor}">{num(value)}</text>')
    parts.append(f'<text x="{left - 4}" y="{top + 9}" text-anchor="end">{peak}</text>')
    parts.append(f'<text x="{left - 4}" y="{base}" text-anchor="end">0</text>')
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{height - 2}" text-anchor="middle" class="label">{escape(label)}</text>')
    if output:
        parts.append(f'<line class="thr" x1="{left}" y1="{top}" x2="{left}" y2="{base}" visibility="hidden"/>')
    parts.append("</svg>")
    return "".join(parts)


def scatter_svg(points: Sequence[tuple[float, float]], xname: str, yname: str, width: int = 340,
                height: int = 300) -> str:
    """One dot per sampled row; axes over the sample's range."""
    left, right, top, bottom = 52, 12, 10, 34
    pw, ph = width - left - right, height - top - bottom
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    y0, y1 = (min(ys), max(ys)) if ys else (0.0, 1.0)
    sx, sy = (x1 - x0) or 1.0, (y1 - y0) or 1.0
    parts = [f'<svg class="plot scatter" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
             f'<title>{escape(xname)} against {escape(yname)}</title>']
    r = 1.8 if len(points) > 300 else 3.5
    for x, y in points:
        cx, cy = left + pw * (x - x0) / sx, top + ph - ph * (y - y0) / sy
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{r}"/>')
    base = top + ph
    parts.append(f'<line class="axis" x1="{left}" y1="{base}" x2="{left + pw}" y2="{base}"/>'
                 f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{base}"/>')
    parts.append(f'<text x="{left}" y="{base + 14}">{num(x0)}</text>'
                 f'<text x="{left + pw}" y="{base + 14}" text-anchor="end">{num(x1)}</text>'
                 f'<text x="{left - 4}" y="{base}" text-anchor="end">{num(y0)}</text>'
                 f'<text x="{left - 4}" y="{top + 9}" text-anchor="end">{num(y1)}</text>'
                 f'<text x="{left + pw / 2:.1f}" y="{height - 2}" text-anchor="middle" class="label">{escape(xname)}</text>'
                 f'<text x="12" y="{top + ph / 2:.1f}" text-anchor="middle" class="label" '
                 f'transform="rotate(-90 12 {top + ph / 2:.1f})">{escape(yname)}</text>')
    parts.append("</svg>")
    return "".join(parts)
