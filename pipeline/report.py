"""The static run report: `<root>/<run>/report.html`, led by each stage's headline numbers and curves.

    write_report(store.run_dir, plan, "kiln run tiny")    # -> <run_dir>/report.html

A table of every stage with its headline numbers (NUMBERS); the post-training stages side by side
(`post_training`: their held-out gold measure, proxy and KL to SFT, in a table and charted against
sqrt(KL)); the held-out loss of each source after each
model stage (`by_source`: pretraining's validation windows, scored again after every later stage, so
that what fine-tuning cost each source shows) beside the tokens pretraining drew from it; then a
section per complete stage: its
headline chart (CHARTS: the columns a user looks at first, those missing left out), for a MoE
pretraining each MoE layer's expert load over the steps (collapse or imbalance at a glance) and, folded in
`<details>`, every metric: all the manifest's numbers and a grid of every numeric metrics.jsonl
column against `step`. Images are PNG embedded as base64, so the file can be mailed or opened from a
shared drive as is.

Drawing (matplotlib, seconds) happens once per artifact: the PNGs are cached under
`<run_dir>/.work/report/<stage>/`, keyed by the sha256 of the artifact's metrics.jsonl in its manifest
(a forced rebuild keeps the fingerprint but changes the file). With every image cached, matplotlib is
not imported.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import os
import uuid
from pathlib import Path

SKIP = {"step", "epoch", "time", "batch_crc", "prompt_crc"}  # not curves: sample-order checksums
CACHE_VERSION = 2  # raise when the drawing changes, so that cached images are redrawn
PER_LAYER_LOAD = "expert_load_l"  # pretrain's expert_load_l{layer}_{expert}: drawn per layer, not in the grid

NUMBERS = {  # stage: the manifest metrics shown in the table (a stage not listed shows all of them)
    "ingest": ("docs_kept", "docs_dropped", "duplicates", "bad_records"),
    "tokenizer": ("vocab_size", "chars_per_token", "heldout_roundtrip_failures"),
    "tokenize": ("train_tokens", "val_tokens", "tail_tokens_dropped"),
    "pretrain": ("val_loss", "val_ppl", "loss", "steps", "expert_imbalance"),
    "sft": ("val_loss", "task_accuracy", "task_accuracy_pretrained"),
    "reward": ("pairwise_accuracy", "initial_pairwise_accuracy", "margin"),
    "ppo": ("task_accuracy", "task_accuracy_sampled", "score", "score_sft", "kl_sft", "selected_iteration"),
    "grpo": ("task_accuracy", "task_accuracy_sampled", "score", "kl_sft", "selected_iteration"),
    "rloo": ("task_accuracy", "task_accuracy_sampled", "score", "kl_sft", "selected_iteration"),
}
CHARTS = {  # stage: {panel title: its columns ("a|b": a, else b)}; the panels of a stage share the step axis
    "pretrain": {"loss (train and held-out)": ("loss", "val_loss")},
    "sft": {"held-out loss": ("val_loss",), "task accuracy (held-out prompts)": ("task_accuracy",)},
    "reward": {"held-out pairwise accuracy": ("pairwise_accuracy|val_accuracy",)},
    "ppo": {"rollouts: reward-model score": ("score",), "rollouts: KL to the SFT policy": ("kl",)},
    **dict.fromkeys(
        ("grpo", "rloo"),
        {"rollouts: score (reward model or program)": ("score",), "rollouts: KL to the SFT policy": ("kl",)},
    ),
}  # the RL stages' gold measure leads the report: `post_training`


def write_report(run_dir: Path, plan, title: str) -> Path:
    parts = [
        f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
        "img{max-width:100%}summary{cursor:pointer;color:#555}</style>",
        f"<h1>{html.escape(title)}</h1>",
        "<table><tr><th>stage</th><th>state</th><th>headline metrics</th><th>artifact</th></tr>",
    ]
    sections, every = [], {}
    for p in plan:
        manifest = p.manifest
        if manifest is None and p.path and Path(p.path, "manifest.json").is_file():
            manifest = json.loads(Path(p.path, "manifest.json").read_text())
        metrics = {
            k: v for k, v in (manifest or {}).get("metrics", {}).items() if not isinstance(v, (dict, list))
        }
        shown = {k: metrics[k] for k in NUMBERS.get(p.name, ()) if k in metrics} or metrics
        parts.append(
            f"<tr><td>{html.escape(p.name)}</td><td>{'complete' if manifest else p.state}</td>"
            f"<td>{html.escape(_numbers(shown))}</td><td><code>{html.escape(p.path)}</code></td></tr>"
        )
        if manifest:
            sections.append(_section(run_dir, p, manifest, metrics))
            every[p.name] = metrics
    parts.append("</table>")
    parts.append(post_training(run_dir / ".work" / "report", plan))
    parts.append(by_source(run_dir / ".work" / "report", every))
    parts.extend(sections)
    out = run_dir / "report.html"
    _write_atomic(out, "\n".join(parts).encode())
    return out


def post_training(cache: Path, plan) -> str:
    """The post-training stages side by side (pipeline/compare.py): their table, and a chart of each
    stage's proxy and gold measure at every evaluation against sqrt(KL to the SFT policy), as Gao et al.
    (2022) plot reward over-optimisation (a proxy still rising while gold falls); "" without such stages."""
    from pipeline.compare import COLUMNS, cells, comparison

    rows = comparison(plan)
    if not rows:
        return ""
    paths = {p.name: p.path for p in plan}
    curves = {}
    for r in rows:
        evals = [e for e in _rows(Path(paths[r["stage"]]) / "metrics.jsonl") if _number(e.get("kl_sft"))]
        curves[r["stage"]] = [
            (
                math.sqrt(max(0.0, e["kl_sft"])),
                e.get("proxy_score"),
                e.get("task_accuracy_sampled"),
                e.get("step"),
            )
            for e in evals
        ]
    key = hashlib.sha256(json.dumps([CACHE_VERSION, curves], sort_keys=True).encode()).hexdigest()[:16]
    png = cache / "post_training" / f"{key}.png"
    if not png.is_file():
        _write_atomic(png, _over_optimisation(curves))
        for old in png.parent.glob("*.png"):
            if old != png:
                old.unlink(missing_ok=True)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells(r)) + "</tr>" for r in rows)
    warnings = "".join(f"<p><b>{html.escape(r['stage'])}</b>: {html.escape(r['warning'])}</p>" for r in rows if r["warning"])  # fmt: skip
    return (
        "<h2>post-training: held-out gold measure, proxy and KL to SFT</h2>"
        + f"<table><tr>{head}</tr>{body}</table>{warnings}"
        + _img(png.read_bytes())
    )


def _over_optimisation(curves: dict[str, list]) -> bytes:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), squeeze=False)
    panels = (("proxy: the score trained on (normalised)", 1), ("gold: sampled task accuracy", 2))
    for ax, (title, i) in zip(axes.flat, panels, strict=True):
        for stage, pts in curves.items():
            got = [(pt[0], pt[i]) for pt in pts if _number(pt[i])]
            ax.plot([x for x, _ in got], [y for _, y in got], marker="o", label=stage)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("sqrt(KL to the SFT policy), nats^0.5", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    return _png(plt, fig)


def by_source(cache: Path, metrics: dict[str, dict]) -> str:
    """Per source: the tokens pretraining drew from it (`tokens_seen/<source>`) and its held-out loss after
    each model stage (pretrain's `val_loss/<source>`, a later stage's `heldout_loss/<source>`), as a
    table and a grouped bar chart (drawn once per set of numbers, cached); "" when no stage has them."""
    losses = {}
    for stage, m in metrics.items():
        prefix = "val_loss/" if stage == "pretrain" else "heldout_loss/"
        got = {k.removeprefix(prefix): v for k, v in m.items() if k.startswith(prefix) and _number(v)}
        if got:
            losses[stage] = got
    if not losses:
        return ""
    tokens = {k.removeprefix("tokens_seen/"): v for k, v in metrics.get("pretrain", {}).items()
              if k.startswith("tokens_seen/")}  # fmt: skip
    sources = sorted(set(tokens).union(*losses.values()))
    head = "".join(f"<th>{html.escape(s)} loss</th>" for s in losses)
    rows = "".join(
        f"<tr><td>{html.escape(src)}</td><td>{tokens.get(src, '')}</td>"
        + "".join(f"<td>{_fmt(losses[s][src]) if src in losses[s] else ''}</td>" for s in losses)
        + "</tr>"
        for src in sources
    )
    key = hashlib.sha256(json.dumps([CACHE_VERSION, losses], sort_keys=True).encode()).hexdigest()[:16]
    png = cache / "by_source" / f"{key}.png"
    if not png.is_file():
        _write_atomic(png, _source_bars(losses, sources))
        for old in png.parent.glob("*.png"):
            if old != png:
                old.unlink(missing_ok=True)
    return (
        "<h2>held-out loss by source</h2>"
        + _img(png.read_bytes())
        + f"<table><tr><th>source</th><th>tokens seen in pretraining</th>{head}</tr>{rows}</table>"
    )


def _source_bars(losses: dict[str, dict[str, float]], sources: list[str]) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(sources) * len(losses)), 3.2))
    width = 0.8 / len(losses)
    for j, (stage, got) in enumerate(losses.items()):
        xs = [i + j * width for i, src in enumerate(sources) if src in got]
        ax.bar(xs, [got[src] for src in sources if src in got], width, label=stage)
    ax.set_xticks(
        [i + 0.4 - width / 2 for i in range(len(sources))], sources, rotation=30, ha="right", fontsize=7
    )
    ax.set_ylabel("held-out loss", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    return _png(plt, fig)


def _section(run_dir: Path, p, manifest: dict, metrics: dict) -> str:
    """A complete stage: its headline chart, then every metric folded."""
    sha = manifest.get("files", {}).get("metrics.jsonl", {}).get("sha256")
    headline, experts, grid = _images(
        run_dir / ".work" / "report", p.name, Path(p.path) / "metrics.jsonl", sha
    )
    numbers = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(_fmt(v))}</td></tr>" for k, v in metrics.items()
    )
    return (
        f"<h2>{html.escape(p.name)}</h2>"
        + _img(headline)
        + (f"<h3>expert load per MoE layer</h3>{_img(experts)}" if experts else "")
        + f"<details><summary>every metric of {html.escape(p.name)}</summary>"
        + (f"<table>{numbers}</table>" if numbers else "")
        + _img(grid)
        + "</details>"
    )


def _images(cache: Path, name: str, path: Path, sha: str | None) -> tuple[bytes, bytes, bytes]:
    """(headline PNG, expert-load PNG, grid PNG) of a stage's metrics.jsonl, b"" where there is nothing
    to draw; drawn once per `sha` and kept in `cache/<stage>/` (an empty file: nothing to draw)."""
    if sha is None:
        return b"", b"", b""
    stem = f"{sha[:16]}-v{CACHE_VERSION}"
    files = tuple(cache / name / f"{stem}.{kind}.png" for kind in ("headline", "experts", "grid"))
    if all(f.is_file() for f in files):
        return tuple(f.read_bytes() for f in files)
    rows = _rows(path)
    images = _headline(rows, CHARTS.get(name, {})), _expert_load(rows), _grid(rows)
    for f, data in zip(files, images, strict=True):
        _write_atomic(f, data)
    for old in (cache / name).glob("*.png"):  # an earlier build's images of this stage
        if old not in files:
            old.unlink(missing_ok=True)
    return images


def _rows(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r.get("step", i), r[key]) for i, r in enumerate(rows) if _number(r.get(key))]
    return [x for x, _ in pts], [y for _, y in pts]


def _headline(rows: list[dict], panels: dict[str, tuple[str, ...]]) -> bytes:
    keys = _columns(rows)
    panels = {title: [c for spec in cols for c in _logged(spec, keys)] for title, cols in panels.items()}
    panels = {title: cols for title, cols in panels.items() if cols}
    if not panels:
        return b""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * max(2, len(panels)), 3), sharex=True, squeeze=False)
    for ax, (title, cols) in zip(axes.flat, panels.items(), strict=True):
        for col in cols:
            xs, ys = _series(rows, col)
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=col)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    return _png(plt, fig)


def _expert_load(rows: list[dict]) -> bytes:
    """One panel per MoE layer: each expert's share of the layer's assignments over the steps, and the
    balanced share (1 / experts) dashed: a collapsed layer shows one line near 1, the rest near 0."""
    layers: dict[int, list[str]] = {}
    for key in sorted(_columns(rows)):
        if key.startswith(PER_LAYER_LOAD):
            layers.setdefault(int(key[len(PER_LAYER_LOAD) :].split("_")[0]), []).append(key)
    if not layers:
        return b""
    plt = _pyplot()
    cols = min(4, len(layers))
    nrows = (len(layers) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3 * cols, 2.4 * nrows), sharey=True, squeeze=False)
    for ax, (layer, keys) in zip(axes.flat, sorted(layers.items()), strict=False):
        for key in sorted(keys, key=lambda k: int(k.rsplit("_", 1)[1])):
            xs, ys = _series(rows, key)
            ax.plot(xs, ys, linewidth=1, label=f"expert {key.rsplit('_', 1)[1]}")
        ax.axhline(1 / len(keys), color="k", linestyle="--", linewidth=0.8)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(layers) :]:
        ax.axis("off")
    if len(next(iter(layers.values()))) <= 16:  # a legend one can read
        axes.flat[0].legend(fontsize=6)
    return _png(plt, fig)


def _grid(rows: list[dict]) -> bytes:
    keys = sorted(k for k in _columns(rows) if not k.startswith(PER_LAYER_LOAD))
    if not keys:
        return b""
    plt = _pyplot()
    cols = 3
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(12, 2.8 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        xs, ys = _series(rows, key)
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    return _png(plt, fig)


def _logged(spec: str, keys: set[str]) -> list[str]:
    """The first of a column spec's alternatives ("a|b") that was logged: [column], or []."""
    return [c for c in spec.split("|") if c in keys][:1]


def _columns(rows: list[dict]) -> set[str]:
    return {k for r in rows for k, v in r.items() if k not in SKIP and _number(v)}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(plt, fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def _img(png: bytes) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}">' if png else ""


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _numbers(metrics: dict) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
