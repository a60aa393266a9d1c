"""Orchestration overhead: six no-op stages through the runner vs the same functions called directly.

    python bench/orchestration.py

Prints the runner's overhead per stage once Ray is up (goal < 0.5 s) and the wall time of a re-run
with nothing to do, interpreter start included (goal < 3 s), both measured in this run.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import RunConfig  # noqa: E402
from pipeline.context import StageContext  # noqa: E402
from pipeline.dag import DAG, Stage  # noqa: E402

N = 6


@dataclasses.dataclass(frozen=True, kw_only=True)
class Section:
    value: int = 1
    """Written to the artifact."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    """Run settings."""
    noop: Section = dataclasses.field(default_factory=Section)
    """The no-op stages' settings."""


def noop(cfg, inputs, out, ctx):
    (out / "done.txt").write_text(str(cfg.noop.value))
    return {"value": cfg.noop.value}


CHAIN = DAG(
    tuple(
        Stage(f"s{i}", "bench.orchestration:noop", inputs=(f"s{i - 1}",) if i else (), sections=("noop",))
        for i in range(N)
    )
)

RERUN = """
import sys; sys.path.insert(0, {root!r})
from pipeline.configlib import load
from pipeline.runner import run_pipeline
from bench.orchestration import BenchConfig, CHAIN
cfg = load(BenchConfig, None, ["run.root={root_dir}", "run.wandb=disabled"])
out = run_pipeline(cfg, CHAIN)
assert all(p.action == "skip" for p in out.plan), [p.action for p in out.plan]
"""


def main() -> None:
    import ray

    from pipeline.configlib import load
    from pipeline.runner import run_pipeline

    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-orch-"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.get(ray.remote(lambda: 0).remote())  # Ray up and a worker warm

    # direct: the same stage functions, called in-process one after the other
    t0 = time.perf_counter()
    for i in range(N):
        out = tmp / "direct" / f"s{i}"
        out.mkdir(parents=True)
        noop(load(BenchConfig, None, []), {}, out, StageContext(f"s{i}", tmp / "direct" / "work"))
    direct = time.perf_counter() - t0

    cfg = load(BenchConfig, None, [f"run.root={tmp / 'runner'}", "run.wandb=disabled"])
    t0 = time.perf_counter()
    outcome = run_pipeline(cfg, CHAIN)
    through_runner = time.perf_counter() - t0
    assert outcome.ok and len(outcome.results) == N, outcome.errors
    ray.shutdown()

    t0 = time.perf_counter()
    code = RERUN.format(root=str(ROOT), root_dir=str(tmp / "runner"))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    rerun = time.perf_counter() - t0

    per_stage = (through_runner - direct) / N
    print(f"{'measure':<44}{'value':>10}{'goal':>10}{'ratio':>8}")
    print(f"{'six no-op stages, called directly (s)':<44}{direct:>10.3f}")
    print(f"{'six no-op stages, through the runner (s)':<44}{through_runner:>10.3f}")
    print(f"{'runner overhead per stage (s)':<44}{per_stage:>10.3f}{0.5:>10.2f}{per_stage / 0.5:>8.2f}")
    print(f"{'re-run with nothing to do, incl. python (s)':<44}{rerun:>10.3f}{3.0:>10.2f}{rerun / 3.0:>8.2f}")


if __name__ == "__main__":
    main()
