"""Orchestration overhead: the real default run re-run with nothing to do, as a user types it.

    python bench/orchestration.py --root DIR     # DIR: a complete default run (`launch.py --root DIR`)
    python bench/orchestration.py                # makes one first in a temporary root (~8 min, 2 cores)
    python bench/orchestration.py --root DIR --repeat 9 --no-runner

Each command is a fresh interpreter, start included, timed --repeat times round-robin after one
untimed warm-up round (median and min printed):
- `launch.py --root DIR --wandb disabled`: the default re-run with nothing to do (goal < 1 s);
- `launch.py status --root DIR` and `launch.py run --root DIR --dry-run --json`;
- the same run's floor: `python -c pass` (interpreter start) and `python -c "import rich, yaml"`
  (interpreter start plus what the CLI imports first); ratios are to the second.
Then, unless --no-runner, the runner's overhead per stage once Ray is up: six toy no-op stages
through `run_pipeline` vs the same functions called directly (goal < 0.5 s per stage).
A DIR that is not complete under this code is refused: re-running it would train, not measure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
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

CLI = (  # as typed, DIR standing for the run's root
    "launch.py --root DIR --wandb disabled",  # the re-run with nothing to do
    "launch.py status --root DIR",
    "launch.py run --root DIR --dry-run --json",
)
GOALS = {CLI[0]: 1.0}  # s: a re-run with nothing to do, interpreter start included
FLOOR = 'python -c "import rich, yaml"'
GOAL_PER_STAGE = 0.5  # s, the runner's overhead per stage with Ray up
N = 6
VERSION = 1
"""The toy stages' declared version (part of their fingerprints)."""
LAUNCH = str(ROOT / "launch.py")


def commands(root: str) -> dict[str, list[str]]:
    py = sys.executable
    cmds = {"python -c pass": [py, "-c", "pass"], FLOOR: [py, "-c", "import rich, yaml"]}
    for name in CLI:
        cmds[name] = [py, LAUNCH, *(root if word == "DIR" else word for word in name.split()[1:])]
    return cmds


def run_once(cmd: list[str]) -> tuple[float, str | None]:
    """Wall seconds of one command as a subprocess, and its error (None when it exited 0)."""
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    last = (out.stderr.strip().splitlines() or [""])[-1]
    return seconds, None if out.returncode == 0 else f"exit {out.returncode}: {last[:60]}"


def default_run(root: str | None) -> str:
    """A complete default run's root: `root` checked, or a fresh one made with the CLI."""
    if root is None:
        root = tempfile.mkdtemp(prefix="kiln-bench-orch-")
        print(f"making the default run under {root} (pass --root {root} next time)", flush=True)
        subprocess.run([sys.executable, LAUNCH, "--root", root, "--wandb", "disabled"], cwd=ROOT, check=True)
    out = subprocess.run(
        [sys.executable, LAUNCH, "status", "--root", root, "--json"], cwd=ROOT, capture_output=True, text=True
    )
    try:  # a status that is not all complete may exit non-zero: its rows say which
        rows = json.loads(out.stdout)
    except ValueError:
        rows = []
    undone = [f"{r['stage']} ({r['state']})" for r in rows if r["state"] != "complete"]
    if not rows or undone:
        sys.exit(f"{root} is not a complete default run under this code: {', '.join(undone) or out.stderr}")
    return root


def bench_cli(root: str, repeat: int) -> None:
    cmds = commands(root)
    times: dict[str, list[float]] = {name: [] for name in cmds}
    errors: dict[str, str] = {}
    for rep in range(repeat + 1):  # round 0: warm-up (page cache, bytecode), not counted
        for name, cmd in cmds.items():
            seconds, err = run_once(cmd)
            if err:
                errors[name] = err
            elif rep:
                times[name].append(seconds)
    floor = statistics.median(times[FLOOR])
    print(f"default run at {root}: each command a fresh interpreter, {repeat} runs after a warm-up")
    print(f"{'command':<44}{'median s':>10}{'min s':>8}{'x floor':>9}{'goal s':>8}")
    for name, ts in times.items():
        if name in errors:
            print(f"{name:<44}  failed: {errors[name]}")
            continue
        med = statistics.median(ts)
        goal = f"{GOALS[name]:>8.1f}  {'met' if med < GOALS[name] else 'MISSED'}" if name in GOALS else ""
        print(f"{name:<44}{med:>10.3f}{min(ts):>8.3f}{med / floor:>9.2f}{goal}")
    print(f"(x floor: median / the median of `{FLOOR}`, measured in this run)")


# -- the runner's own overhead per stage, on toy no-op stages -------------------------------------------


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


def bench_runner() -> None:
    import ray

    from pipeline.configlib import load
    from pipeline.runner import run_pipeline

    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-orch-"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.get(ray.remote(lambda: 0).remote())  # Ray up and a worker warm

    t0 = time.perf_counter()  # direct: the same stage functions, called in-process one after the other
    for i in range(N):
        out = tmp / "direct" / f"s{i}"
        out.mkdir(parents=True)
        noop(load(BenchConfig, None, []), {}, out, StageContext(f"s{i}", tmp / "direct" / "work"))
    direct = time.perf_counter() - t0

    cfg = load(BenchConfig, None, [f"run.root={tmp / 'runner'}", "run.wandb=disabled"])
    t0 = time.perf_counter()
    outcome = run_pipeline(cfg, CHAIN)
    via_runner = time.perf_counter() - t0
    assert outcome.ok and len(outcome.results) == N, outcome.errors
    ray.shutdown()

    per_stage = (via_runner - direct) / N
    print(
        f"\n{N} no-op toy stages, Ray up: {direct:.3f} s called directly, {via_runner:.3f} s via the runner"
    )
    ratio = per_stage / GOAL_PER_STAGE
    print(f"runner overhead per stage: {per_stage:.3f} s (goal < {GOAL_PER_STAGE} s, ratio {ratio:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", help="root of a complete default run (default: make one in a temporary root)")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs of each command (default 5)")
    ap.add_argument("--no-runner", action="store_true", help="skip the toy stages' runner overhead")
    args = ap.parse_args()
    bench_cli(default_run(args.root), args.repeat)
    if not args.no_runner:
        bench_runner()


if __name__ == "__main__":
    main()
