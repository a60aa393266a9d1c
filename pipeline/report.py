"""The static run report: `<root>/<run>/report.html` with each stage's headline numbers and curves.

Curves come from each artifact's metrics.jsonl (any numeric column against `step`), drawn with
matplotlib and embedded as PNG, so the file can be mailed or opened from a shared drive as is.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

SKIP = {"step", "epoch", "time", "batch_crc", "prompt_crc"}  # not curves: sample-order checksums


def write_report(run_dir: Path, plan, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [
        f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
        "img{max-width:100%}</style>",
        f"<h1>{html.escape(title)}</h1>",
        "<table><tr><th>stage</th><th>state</th><th>headline metrics</th><th>artifact</th></tr>",
    ]
    sections = []
    for p in plan:
        manifest = p.manifest
        if manifest is None and p.path and Path(p.path, "manifest.json").is_file():
            manifest = json.loads(Path(p.path, "manifest.json").read_text())
        state = "complete" if manifest else p.state
        metrics = (manifest or {}).get("metrics", {})
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items() if not isinstance(v, (dict, list)))
        parts.append(
            f"<tr><td>{p.name}</td><td>{state}</td><td>{html.escape(shown)}</td>"
            f"<td><code>{html.escape(p.path)}</code></td></tr>"
        )
        rows = _rows(Path(p.path) / "metrics.jsonl") if manifest else []
        if rows:
            sections.append(f"<h2>{p.name}</h2>" + _curves(plt, rows))
    parts.append("</table>")
    parts.extend(sections)
    out = run_dir / "report.html"
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(parts))
    tmp.replace(out)
    return out


def _rows(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def _curves(plt, rows: list[dict]) -> str:
    keys = sorted({k for r in rows for k, v in r.items() if k not in SKIP and isinstance(v, (int, float))})
    if not keys:
        return ""
    cols = 3
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(12, 2.8 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        pts = [(r.get("step", i), r[key]) for i, r in enumerate(rows) if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
