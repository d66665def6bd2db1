"""report.html: a summary table on top, then every sample's prompt, answer and scores side by side.

The page is static (no network, no JavaScript library): images are the PNG files of the run,
linked by relative paths, so the run directory can be copied or served as is. Small images are
drawn large with nearest-neighbour scaling so 32 px pictures stay legible.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

from omni.utils import atomic_write_text

MAX_SAMPLES = 2000  # samples drawn in the page; the rest are counted, not shown
IMAGE_PX = 96  # displayed side of an image

CSS = f"""
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; background: #fafafa; }}
h1 {{ margin: 0 0 4px 0; }} .sub {{ color: #666; margin-bottom: 16px; }}
table {{ border-collapse: collapse; margin: 8px 0 20px 0; background: white; }}
th, td {{ border: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; font-size: 14px; }}
th {{ background: #f0f0f0; }} td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
.overall {{ font-size: 28px; font-weight: 600; }}
.sample {{ background: white; border: 1px solid #ddd; border-radius: 6px; margin: 10px 0; padding: 10px; }}
.sample.ok {{ border-left: 6px solid #3a3; }} .sample.bad {{ border-left: 6px solid #c33; }}
.cols {{ display: grid; grid-template-columns: 1fr 1.4fr 1fr 0.8fr; gap: 12px; }}
.cols h4 {{ margin: 0 0 4px 0; font-size: 12px; text-transform: uppercase; color: #888; }}
.seq {{ display: flex; flex-wrap: wrap; align-items: center; gap: 6px; }}
.seq .t {{ white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 13px; background: #f6f6f6;
          padding: 2px 6px; border-radius: 4px; }}
img.im {{ width: {IMAGE_PX}px; height: {IMAGE_PX}px; image-rendering: pixelated; border: 1px solid #ccc; background: #fff; }}
img.broken {{ outline: 3px dashed #c33; }}
.meta {{ color: #777; font-size: 12px; }}
"""

SCRIPT = """
document.querySelectorAll('img.im').forEach(function (im) {
  im.addEventListener('error', function () { im.classList.add('broken'); im.alt = 'missing image'; });
});
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return html.escape(str(v))


def _seq(items: list[dict[str, str]], base: str) -> str:
    parts = []
    for it in items:
        if "text" in it:
            parts.append(f'<span class="t">{html.escape(it["text"])}</span>')
        else:
            src = quote(f"{base}/{it['image']}")
            parts.append(f'<img class="im" src="{src}" alt="{html.escape(it["image"])}" loading="lazy">')
    return f'<div class="seq">{"".join(parts) or "<span class=meta>(nothing)</span>"}</div>'


def _summary(results: dict[str, Any]) -> str:
    tasks = results.get("tasks", {})
    names: list[str] = []
    for m in tasks.values():
        names += [k for k in m if k not in names]
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = "".join(
        f"<tr><th>{html.escape(t)}</th>"
        + "".join(f'<td class="num">{_fmt(m.get(n, ""))}</td>' for n in names)
        + "</tr>"
        for t, m in tasks.items()
    )
    out = f"<table><tr><th>task</th>{head}</tr>{rows}</table>"
    if results.get("metrics"):
        out += (
            "<table>"
            + "".join(
                f'<tr><th>{html.escape(k)}</th><td class="num">{_fmt(v)}</td></tr>'
                for k, v in results["metrics"].items()
            )
            + "</table>"
        )
    info = {
        "checkpoint": results.get("checkpoint"),
        "generation": results.get("generation"),
        "seed": f"{results.get('seed')} ({results.get('seed_rule', '')})",
        "judge": results.get("judge"),
        "data": results.get("data"),
        "exports": results.get("exports"),
        "time": results.get("time"),
    }
    out += (
        "<table>"
        + "".join(
            f"<tr><th>{k}</th><td><code>{html.escape(json.dumps(v, default=str) if not isinstance(v, str) else v)}</code></td></tr>"
            for k, v in info.items()
            if v is not None
        )
        + "</table>"
    )
    return out


def _sample_html(rec: dict[str, Any]) -> str:
    base = f"samples/{rec['id']}"
    scores = rec.get("scores", {})
    nums = [v for v in scores.values() if isinstance(v, (int, float))]
    cls = "ok" if nums and min(nums) >= 1 else "bad" if nums else ""
    score_rows = "".join(
        f'<tr><th>{html.escape(k)}</th><td class="num">{_fmt(v)}</td></tr>' for k, v in scores.items()
    )
    details = {k: v for k, v in rec.get("details", {}).items() if k not in ("detected",)}
    detail_html = "".join(
        f'<div class="meta">{html.escape(k)}: {html.escape(json.dumps(v, default=str))}</div>'
        for k, v in details.items()
        if v
    )
    extra = "".join(
        f"<div><h4>{html.escape(name)}</h4>{_seq(items, base)}</div>"
        for name, items in rec.get("extra", {}).items()
    )
    return (
        f'<div class="sample {cls}" id="{html.escape(rec["id"])}">'
        f'<div class="meta">#{rec.get("index")} &middot; {html.escape(rec["id"])} &middot; task '
        f"<b>{html.escape(str(rec.get('task')))}</b> &middot; seed {rec.get('seed')} &middot; "
        f"finish {html.escape(str(rec.get('finish_reason')))}</div>"
        f'<div class="cols"><div><h4>prompt</h4>{_seq(rec.get("prompt", []), base)}</div>'
        f"<div><h4>generated</h4>{_seq(rec.get('output', []), base)}{extra}</div>"
        f"<div><h4>ground truth</h4>{_seq(rec.get('answer', []), base)}</div>"
        f"<div><h4>scores</h4><table>{score_rows}</table>{detail_html}</div></div></div>"
    )


def render_report(results: dict[str, Any], records: list[dict[str, Any]]) -> str:
    shown = records[:MAX_SAMPLES]
    more = (
        f'<p class="meta">{len(records) - len(shown)} more samples not shown.</p>'
        if len(records) > len(shown)
        else ""
    )
    title = f"omni eval: {results.get('benchmark', '')}"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><div class='sub'>{html.escape(results.get('description', ''))}</div>"
        f"<div>overall <span class='overall'>{_fmt(results.get('overall'))}</span> "
        f"over {results.get('n_samples', len(records))} samples</div>"
        f"{_summary(results)}<h2>Samples</h2>{''.join(_sample_html(r) for r in shown)}{more}"
        f"<script>{SCRIPT}</script></body></html>"
    )


def write_report(run_dir: str | Path, results: dict[str, Any], records: list[dict[str, Any]]) -> Path:
    path = Path(run_dir) / "report.html"
    atomic_write_text(path, render_report(results, records))
    return path
