"""The post-training stages of a run side by side: every stage whose manifest carries the held-out gold
measure (ppo, grpo, rloo, dpo; kiln/rl/evaluation.py), on the same held-out task prompts, against the same
SFT policy.

    rows = comparison(plan)          # one dict per post-training stage, in the plan's order
    console.print(table(rows))       # the end-of-run table (launch.py run); report.html draws the same rows

Each row: the SFT policy's greedy and sampled accuracy and the stage's, the paired change of the sampled
answers (gained / lost, and its z-score: beyond noise at |z| >= 2), the KL to the SFT policy on those
answers, the proxy the stage trained on (the reward model's normalised score, or the checking program's
verdict), which iteration was exported and the over-optimisation warning, if any. A stage that selects
(`select: best_gold`) gives its figures on the report half of the prompts (`gold_prompts` of them); the others
on all of them, so compare such rows by their SFT columns, which are on the same prompts as theirs.
"""

from __future__ import annotations

import json
from pathlib import Path

from kiln.rl.evaluation import z_score

GOLD = "task_accuracy_sampled_sft"
"""The key that marks a manifest as a post-training stage's with the gold measure."""


def manifest_of(p) -> dict | None:
    """A planned stage's manifest (as the plan holds it, or read from its folder), or None."""
    if p.manifest is not None:
        return p.manifest
    if p.path and Path(p.path, "manifest.json").is_file():
        return json.loads(Path(p.path, "manifest.json").read_text())
    return None


def comparison(plan) -> list[dict]:
    rows = []
    for p in plan:
        m = (manifest_of(p) or {}).get("metrics", {})
        if GOLD not in m:
            continue
        rows.append(
            {
                "stage": p.name,
                "greedy_sft": m.get("task_accuracy_sft"),
                "greedy": m.get("task_accuracy"),
                "sampled_sft": m.get(GOLD),
                "sampled": m.get("task_accuracy_sampled"),
                "gained": m.get("task_sampled_gained"),
                "lost": m.get("task_sampled_lost"),
                "z": _z(m),
                "kl_sft": m.get("kl_sft"),
                "proxy_sft": m.get("proxy_score_sft"),
                "proxy": m.get("proxy_score"),
                "selected": _selected(m),
                "prompts": m.get("gold_prompts"),
                "warning": m.get("overoptimization_warning", ""),
            }
        )
    return rows


def _z(m: dict) -> float | None:
    """The paired change's z-score, as the manifest gives it or from its gained / lost."""
    if m.get("task_sampled_z") is not None:
        return m["task_sampled_z"]
    gained, lost = m.get("task_sampled_gained"), m.get("task_sampled_lost")
    return None if gained is None or lost is None else z_score(gained, lost)


def _selected(m: dict) -> str:
    it = m.get("selected_iteration")
    if it is None:
        return ""
    return f"{it}*" if m.get("selected_why", "").startswith("select=best_gold") else f"{it}"


def cells(r: dict) -> list[str]:
    """A row's cells, in COLUMNS' order."""
    z = r["z"]
    return [
        r["stage"],
        _arrow(r["greedy_sft"], r["greedy"]),
        _arrow(r["sampled_sft"], r["sampled"]),
        f"{r['gained']}/{r['lost']}" if r["gained"] is not None else "",
        f"{z:+.1f}" if z is not None else "",
        _num(r["kl_sft"]),
        _arrow(r["proxy_sft"], r["proxy"]),
        r["selected"],
        "yes" if r["warning"] else "",
    ]


COLUMNS = ("stage", "greedy", "sampled", "+/-", "z", "KL", "proxy", "kept", "warn")
"""Accuracy SFT->stage (greedy, sampled), the sampled answers gained/lost and the z of that change, the
KL to SFT, the proxy SFT->stage, the exported ("kept") iteration (* when chosen by `select: best_gold`,
else the last), and whether the over-optimisation warning was raised (its text below the table)."""


def table(rows: list[dict]):
    """The end-of-run table (rich) of `comparison`'s rows."""
    from rich import box
    from rich.table import Table

    t = Table(
        title="post-training on held-out task prompts: SFT→stage; +/-: sampled answers gained/lost",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 1),
        collapse_padding=True,
        show_edge=False,
        caption_justify="left",
    )
    t.caption = "\n".join(f"{r['stage']}: {r['warning']}" for r in rows if r["warning"]) or None
    for col in COLUMNS:
        t.add_column(col, no_wrap=True)
    for r in rows:
        c = cells(r)
        if c[-1]:
            c[-1] = f"[yellow]{c[-1]}"
        t.add_row(*c)
    return t


def _arrow(before, after) -> str:
    if after is None:
        return ""
    return f"{_num(before)}→{_num(after)}" if before is not None else _num(after)


def _num(v) -> str:
    return "" if v is None else f"{v:.3f}"
