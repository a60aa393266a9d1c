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


@frozen
class ToySection:
    NOT_IN_FINGERPRINT: ClassVar[tuple[str, ...]] = ("steps",)

    value: int = 1
    """What the stage writes."""
    steps: int = 3
    """Budget: how many steps (not fingerprinted)."""
    sleep: float = 0.0
    """Seconds each step sleeps (to make a stage slow enough to kill or overlap)."""
    fail: bool = False
    """Raise an error at the end."""


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
        f.write(json.dumps({"start": time.time(), "pid": os.getpid()}) + "\n")
    for step in range(1, section.steps + 1):
        time.sleep(section.sleep)
        ctx.log({"step": step, "loss": 1.0 / step})
        ctx.progress(step, section.steps)
    if section.fail:
        raise RuntimeError(f"stage {ctx.stage} failed on purpose")
    (out / "value.json").write_text(json.dumps({"value": total}))
    with open(events, "a") as f:
        f.write(json.dumps({"end": time.time()}) + "\n")
    return {"value": total}


def squares(x):
    return x * x


def run_mapper(cfg, inputs, out, ctx):
    results = ctx.map(squares, range(5), num_cpus=0.5)
    (out / "value.json").write_text(json.dumps({"value": sum(results)}))
    return {"value": sum(results)}


# a -> b -> d ; a -> c -> d   (b and c are independent)
TOY_DAG = DAG(
    (
        Stage("a", "tests.toy_stages:run_toy", sections=("a",), headline="value"),
        Stage("b", "tests.toy_stages:run_toy", inputs=("a",), sections=("b",), headline="value"),
        Stage("c", "tests.toy_stages:run_toy", inputs=("a",), sections=("c",), headline="value"),
        Stage("d", "tests.toy_stages:run_toy", inputs=("b", "c"), sections=("d",), headline="value"),
    )
)
