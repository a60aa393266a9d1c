"""The run report on hand-made artifact folders: headline charts lead, every metric folded below, images
drawn once per metrics.jsonl (by its sha256 in the manifest) and reused without importing matplotlib."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import types

import pytest

from pipeline import report
from pipeline.config import PROJECT_ROOT

pytestmark = pytest.mark.timeout(60)


def _rows(n: int, every: int, train: dict, evaluation: dict) -> list[dict]:
    """Rows as the stages log them: a training row per step, an evaluation row every `every` steps."""
    rows = []
    for step in range(n + 1):
        if step:
            rows.append({"step": step, "batch_crc": 7, **{k: v / step for k, v in train.items()}})
        if step % every == 0:
            rows.append({"step": step, **{k: v * (1 + step / n) for k, v in evaluation.items()}})
    return rows


METRICS = {  # each stage's manifest metrics
    "ingest": {"docs_kept": 90, "docs_dropped": 10, "duplicates": 1, "bad_records": 0, "text_bytes": 9},
    "pretrain": {"val_loss": 4.5, "val_ppl": 90.0, "steps": 12, "expert_imbalance": 2.4,
                 "val_loss/Github": 3.5, "val_loss/Pile-CC": 5.0, "tokens_seen/Github": 512, "tokens_seen/Pile-CC": 2048},
    "sft": {"val_loss": 2.0, "task_accuracy": 0.25, "heldout_loss/Github": 3.75, "heldout_loss/Pile-CC": 5.25,
            "heldout_loss_pretrained/Github": 3.5},
    "reward": {"pairwise_accuracy": 0.8},
    "ppo": {"task_accuracy": 0.3, "score": 1.5, "heldout_loss/Pile-CC": 5.5, "task_accuracy_sft": 0.25,
            "task_accuracy_sampled": 0.35, "task_accuracy_sampled_sft": 0.3, "task_sampled_gained": 30,
            "task_sampled_lost": 10, "task_sampled_z": 3.16, "kl_sft": 1.2, "proxy_score": 0.8, "proxy_score_sft": 0.1,
            "selected_iteration": 6, "selected_why": "select=last: the last iteration", "gold_prompts": 400,
            "overoptimization_warning": "the proxy rose while sampled task accuracy fell beyond noise at iterations [6]"},
}  # fmt: skip
ROWS = {  # metrics.jsonl (a data stage has none)
    # a MoE model: MoE layers 1 and 3, three experts each (expert_load_l{layer}_{expert})
    "pretrain": _rows(
        12,
        4,
        {"loss": 9, "lr": 1e-3, **{f"expert_load_l{layer}_{e}": 0.3 for layer in (1, 3) for e in range(3)}},
        {"val_loss": 5},
    ),  # fmt: skip
    "sft": _rows(8, 4, {"loss": 3}, {"val_loss": 2, "task_accuracy": 0.2}),
    "reward": _rows(8, 4, {"loss": 1}, {"pairwise_accuracy": 0.6, "val_accuracy": 0.6}),  # the first drawn
    "ppo": _rows(6, 3, {"score": 1, "kl": 0.1, "entropy": 2},
                 {"task_accuracy": 0.2, "task_accuracy_sampled": 0.3, "kl_sft": 0.5, "proxy_score": 0.4}),
}  # fmt: skip
HEADLINE = {  # stage: the columns of its headline chart, as drawn
    "pretrain": ["loss", "val_loss"],
    "sft": ["val_loss", "task_accuracy"],
    "reward": ["pairwise_accuracy"],
    "ppo": ["score", "kl"],
}


def write_artifact(run_dir, name: str, metrics: dict, rows: list[dict] | None) -> types.SimpleNamespace:
    folder = run_dir / f"{name}-0123456789abcdef"
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    if rows is not None:
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        (folder / "metrics.jsonl").write_bytes(data)
        files["metrics.jsonl"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"stage": name, "fingerprint": "0123456789abcdef", "files": files, "metrics": metrics}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return types.SimpleNamespace(
        name=name, state="complete", manifest=manifest, path=str(folder), fingerprint="0123456789abcdef"
    )


def plan_of(run_dir) -> list:
    """The plan entries of a run dir's artifacts, manifests read back (as planning does)."""
    plan = []
    for name in METRICS:
        (folder,) = run_dir.glob(f"{name}-*")
        manifest = json.loads((folder / "manifest.json").read_text())
        plan.append(types.SimpleNamespace(name=name, state="complete", manifest=manifest, path=str(folder)))
    return plan


def cached(run_dir) -> dict[str, int]:
    cache = run_dir / ".work" / "report"
    return {p.relative_to(cache).as_posix(): p.stat().st_mtime_ns for p in cache.rglob("*.png")}


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """One report of the hand-made run, drawn with the labels of every line plotted noted."""
    from matplotlib.axes import Axes

    run_dir = tmp_path_factory.mktemp("root") / "tiny"
    plan = [write_artifact(run_dir, name, METRICS[name], ROWS.get(name)) for name in METRICS]
    missing = run_dir / "eval-0123456789abcdef"  # a stage not run yet: a table row, no section
    plan.append(types.SimpleNamespace(name="eval", state="missing", manifest=None, path=str(missing)))
    labels, plot = [], Axes.plot

    def noted(self, *args, **kwargs):
        labels.append(kwargs.get("label"))
        return plot(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Axes, "plot", noted)
        out = report.write_report(run_dir, plan, "kiln run <tiny>")
    return run_dir, plan, out.read_text(), labels


def sections(html: str) -> dict[str, str]:
    return dict(re.findall(r"<h2>(\w+)</h2>(.*?)(?=<h2>|$)", html, re.S))


def test_headline_charts_lead_and_every_metric_is_folded(drawn):
    run_dir, _, html, labels = drawn
    assert "<title>kiln run &lt;tiny&gt;</title>" in html
    table, _, _ = html.partition("<h2>")
    assert "docs_kept=90, docs_dropped=10, duplicates=1, bad_records=0</td>" in table  # not text_bytes
    assert "val_loss=4.5, val_ppl=90, steps=12, expert_imbalance=2.4</td>" in table
    assert "<td>eval</td><td>missing</td><td></td>" in table
    by_stage = sections(html)
    assert list(by_stage) == list(METRICS)
    # a data stage: no curves, its numbers (all of them) folded
    assert "<img" not in by_stage["ingest"] and "<td>text_bytes</td>" in by_stage["ingest"]
    for name in HEADLINE:
        headline, folded = by_stage[name].split("<details>")
        # the headline chart above the fold, and a MoE pretraining's expert load per layer
        assert headline.count("<img") == (2 if name == "pretrain" else 1)
        assert ("expert load per MoE layer" in headline) == (name == "pretrain")
        assert folded.count("<img") == 1 and "</details>" in folded  # the grid of every column, folded
    # the headline lines of each stage, in plan order, pretraining's experts after its headline (one
    # panel per MoE layer, a line per expert), then the grid's (unlabelled) lines
    experts = [f"expert {e}" for _ in (1, 3) for e in range(3)]
    headline_labels = [label for label in labels if label]
    assert headline_labels == HEADLINE["pretrain"] + experts + [
        c for n in HEADLINE if n != "pretrain" for c in HEADLINE[n]
    ] + ["ppo", "ppo"]  # then the post-training chart's two panels
    # every numeric column but step, checksums and the per-layer loads (drawn per layer instead)
    grids = {"pretrain": 3, "sft": 3, "reward": 3, "ppo": 7}
    assert labels.count(None) == sum(grids.values())
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 2 * len(HEADLINE) + 3  # and the post-training chart, the loss by source
    # headline, expert load (an empty file: nothing to draw) and grid of each stage with a metrics.jsonl,
    # the post-training chart and the loss by source
    assert len(cached(run_dir)) == 3 * len(HEADLINE) + 2


def test_the_post_training_stages_lead_side_by_side_on_the_gold_measure(drawn):
    """The table and the chart of proxy and gold against sqrt(KL) lead the report; the end-of-run table
    (launch.py run) shows the same cells."""
    from rich.console import Console

    from pipeline.compare import comparison, table

    _, plan, html, _ = drawn
    part = html[html.index("<h2>post-training") : html.index("<h2>held-out loss by source</h2>")]
    assert part.count("<img") == 1
    want = ["ppo", "0.250→0.300", "0.300→0.350", "30/10", "+3.2", "1.200", "0.100→0.800", "6", "yes"]
    assert "<tr>" + "".join(f"<td>{c}</td>" for c in want) + "</tr>" in part
    warning = "the proxy rose while sampled task accuracy fell beyond noise at iterations [6]"
    assert f"<p><b>ppo</b>: {warning}</p>" in part
    assert [r["stage"] for r in comparison(plan)] == ["ppo"]  # the stages with the gold measure only
    console = Console(record=True, width=300)
    console.print(table(comparison(plan)))
    text = console.export_text()
    assert all(c in text for c in want) and f"ppo: {warning}" in " ".join(text.split())


def test_heldout_loss_by_source_after_each_model_stage_beside_the_tokens_drawn(drawn):
    _, _, html, labels = drawn
    part = html[html.index("<h2>held-out loss by source</h2>") : html.index("<h2>ingest</h2>")]
    assert part.count("<img") == 1
    head = "<tr><th>source</th><th>tokens seen in pretraining</th><th>pretrain loss</th><th>sft loss</th><th>ppo loss</th></tr>"
    assert head in part
    assert "<tr><td>Github</td><td>512</td><td>3.5</td><td>3.75</td><td></td></tr>" in part
    assert "<tr><td>Pile-CC</td><td>2048</td><td>5</td><td>5.25</td><td>5.5</td></tr>" in part


def test_second_report_reuses_the_cache_without_matplotlib(drawn):
    run_dir, plan, html, _ = drawn
    before = cached(run_dir)
    entries = json.dumps([vars(p) for p in plan])  # the plan, to a fresh interpreter
    code = (
        "import json, sys, time, types\nfrom pathlib import Path\nfrom pipeline.report import write_report\n"
        "plan = [types.SimpleNamespace(**p) for p in json.loads(sys.argv[2])]\n"
        "t0 = time.perf_counter()\nwrite_report(Path(sys.argv[1]), plan, 'kiln run <tiny>')\n"
        "mpl = [m for m in sys.modules if m.startswith('matplotlib')]\n"
        "print(json.dumps([time.perf_counter() - t0, mpl]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(run_dir), entries], cwd=PROJECT_ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    seconds, matplotlib = json.loads(out.stdout)
    assert matplotlib == []
    assert seconds < 0.1
    assert cached(run_dir) == before  # nothing redrawn
    assert (run_dir / "report.html").read_text() == html


def test_a_changed_metrics_file_is_redrawn(drawn, tmp_path):
    run_dir = tmp_path / "tiny"
    shutil.copytree(drawn[0], run_dir)
    before = cached(run_dir)
    rows = ROWS["pretrain"][:-3]  # a forced rebuild: same fingerprint, another metrics.jsonl
    write_artifact(run_dir, "pretrain", METRICS["pretrain"], rows)
    report.write_report(run_dir, plan_of(run_dir), "kiln run tiny")
    after = cached(run_dir)
    assert {n: t for n, t in after.items() if not n.startswith("pretrain/")} == {
        n: t for n, t in before.items() if not n.startswith("pretrain/")
    }  # the other stages' images kept as they were
    new = sorted(n for n in after if n.startswith("pretrain/"))
    assert len(new) == 3 and not set(new) & set(before)  # the old build's images replaced
    sha = hashlib.sha256((run_dir / "pretrain-0123456789abcdef" / "metrics.jsonl").read_bytes()).hexdigest()
    assert all(n.startswith(f"pretrain/{sha[:16]}-") for n in new)
