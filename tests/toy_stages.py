"""Toy stages for the pipeline-core tests: real files, real artifacts, no ML."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import ClassVar

from pipeline.config import RunConfig
from pipeline.dag import DAG, Stage

frozen = dataclasses.dataclass(frozen=True, kw_only=True)

VERSION = 1
"""The toy stages' declared version (part of their fingerprints)."""


@frozen
class ToySection:
    PLACEMENT_KEYS: ClassVar[tuple[str, ...]] = ("steps", "workers")
    CHECKPOINT_LAYOUT: ClassVar[tuple[str, ...]] = ("workers",)
    BUDGET_KEYS: ClassVar[tuple[str, ...]] = ("budget",)

    value: int = 1
    """What the stage writes."""
    steps: int = 3
    """How many steps (a placement key: changing it re-runs nothing)."""
    workers: int = 1
    """A placement key that checkpoints are tied to (as a training stage's world size is)."""
    budget: int = 0
    """A budget key: in the artifact's fingerprint, not in the work dir's key."""
    sleep: float = 0.0
    """Seconds each step sleeps (to make a stage slow enough to kill or overlap)."""
    fail: bool = False
    """Raise an error at the end."""
    meet: str = ""
    """Another stage this one waits to see started before it finishes (fails after 60 s if it never
    does): two stages that meet can only both complete if they run at the same time."""


@frozen
class ToyConfig:
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    """Run settings."""
    a: ToySection = dataclasses.field(default_factory=ToySection)
    """Stage a."""
    b: ToySection = dataclasses.field(default_factory=ToySection)
    """Stage b."""
    c: ToySection = dataclasses.field(default_factory=ToySection)
    """Stage c."""
    d: ToySection = dataclasses.field(default_factory=ToySection)
    """Stage d."""


def run_toy(cfg, inputs, out, ctx):
    """Sum the inputs' values plus this stage's value, step by step, with progress and metrics."""
    section = getattr(cfg, ctx.stage)
    total = section.value + sum(
        json.loads((a.path / "value.json").read_text())["value"] for a in inputs.values()
    )
    events = ctx.work_dir / "events.jsonl"
    with open(events, "a") as f:
        # whether a W&B key reached this process (never the key itself)
        row = {"start": time.time(), "pid": os.getpid(), "wandb_key_set": "WANDB_API_KEY" in os.environ}
        f.write(json.dumps(row) + "\n")
    for step in range(1, section.steps + 1):
        time.sleep(section.sleep)
        ctx.log({"step": step, "loss": 1.0 / step})
        ctx.progress(step, section.steps)
    if section.meet:
        _wait_until_started(ctx.work_dir.parent, section.meet, deadline=time.time() + 60)
    if section.fail:
        raise RuntimeError(f"stage {ctx.stage} failed on purpose")
    (out / "value.json").write_text(json.dumps({"value": total}))
    with open(events, "a") as f:
        f.write(json.dumps({"end": time.time()}) + "\n")
    return {"value": total}


def _wait_until_started(work_root, stage: str, deadline: float) -> None:
    while not any("start" in line for p in work_root.glob(f"{stage}-*/events.jsonl") for line in p.open()):
        if time.time() > deadline:
            raise TimeoutError(
                f"stage {stage} never started while this one ran: the stages ran one after the other"
            )
        time.sleep(0.05)


def squares(x):
    return x * x


def slow_squares(x):
    """Early items take longer, so results arrive out of item order."""
    time.sleep(0.1 * (5 - x))
    return x * x


def thread_widths(_item) -> list:
    """The thread-pool widths a task was given (tokenizers' rayon pool, OpenMP)."""
    import os

    return [os.environ.get("RAYON_NUM_THREADS"), os.environ.get("OMP_NUM_THREADS")]


def run_mapper(cfg, inputs, out, ctx):
    results = ctx.map(slow_squares, range(6), num_cpus=0.5)
    threads = {n: ctx.map(thread_widths, [0], num_cpus=n)[0] for n in (0.5, 2)}
    (out / "value.json").write_text(
        json.dumps({"value": sum(results), "results": results, "threads": threads})
    )
    return {"value": sum(results)}


def toy_config(root, *overrides, name: str = "toy"):
    """ToyConfig for a run under `root`, W&B disabled; `overrides` as with --set."""
    from pipeline.configlib import load

    base = [f"run.root={root}", f"run.name={name}", "run.wandb=disabled"]
    return load(ToyConfig, None, [*base, *overrides])


def plan_of(cfg, sel=None, deep=False) -> dict:
    """The toy DAG's plan for `cfg`, by stage name."""
    from pipeline.artifacts import ArtifactStore
    from pipeline.plan import Selection, make_plan

    store = ArtifactStore(cfg.run.root, cfg.run.name)
    return {p.name: p for p in make_plan(cfg, TOY_DAG, store, sel or Selection(), deep=deep)}


def actions(plan: dict) -> dict[str, str]:
    return {name: p.action for name, p in plan.items()}


def events(store, plan_entry) -> list[dict]:
    """The rows a toy stage appended to its work dir's events.jsonl (start/pid, end)."""
    path = store.work_dir(plan_entry.name, plan_entry.work_key) / "events.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line still being written
            pass
    return rows


def json_list_in(stdout: str) -> list:
    """The JSON list that `status --json` printed. Inside a test process Ray's own driver thread
    may print to the same stdout (e.g. "(raylet) A worker died ..."), so look for the list."""
    import re

    start = re.search(r"^\[", stdout, re.MULTILINE)
    assert start, f"no JSON list in {stdout!r}"
    return json.JSONDecoder().raw_decode(stdout, start.start())[0]


def patch_cli(monkeypatch, *overrides) -> None:
    """Make `launch.main` run and show TOY_DAG with ToyConfig (W&B disabled) instead of the real
    pipeline; the CLI's own flags (--root, --name, --set …) still apply on top of `overrides`."""
    from pipeline.configlib import load

    def load_config(path=None, cli_overrides=(), schema=None):
        return load(ToyConfig, None, ["run.wandb=disabled", *overrides, *cli_overrides])

    monkeypatch.setattr("pipeline.dag.PIPELINE", TOY_DAG)
    monkeypatch.setattr("pipeline.config.load_config", load_config)


# a -> b -> d ; a -> c -> d   (b and c are independent)
TOY_DAG = DAG(
    (
        Stage("a", "tests.toy_stages:run_toy", sections=("a",), headline="value"),
        Stage("b", "tests.toy_stages:run_toy", inputs=("a",), sections=("b",), headline="value"),
        Stage("c", "tests.toy_stages:run_toy", inputs=("a",), sections=("c",), headline="value"),
        Stage("d", "tests.toy_stages:run_toy", inputs=("b", "c"), sections=("d",), headline="value"),
    )
)
