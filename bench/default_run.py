"""The default pipeline (`python launch.py`, configs/tiny.yaml): its time beside a baseline commit, and its
ML outcomes over several seeds.

    python bench/default_run.py --baseline f3d56ba               # this tree vs a commit, alternating (~12 min)
    python bench/default_run.py --baseline f3d56ba --rounds 2    # twice each
    python bench/default_run.py --seeds 1234 7 99                # outcomes per seed, mean ± sd (~18 min)
    python bench/default_run.py --seeds 1234 7 99 --task-reward  # and ppo with the exact reward (+6 min)

Time: the baseline commit is checked out in a temporary git worktree (and with --this REV, that commit in
another, in place of the working tree); each round runs the baseline, then this side, each from a fresh root, as a user types it (`launch.py run --root R --set run.wandb=disabled`,
a fresh interpreter with this venv, `PYTHONPATH` set to its own tree so each side imports its own code,
Ray started and stopped by the run). Printed per side: wall time from the command to its exit, each
stage's own seconds (`launch.py status --json`), the ratio this / baseline, and whether every stage's
non-timing metrics are the same on both sides.

Outcomes: the tiny preset with `run.seed` set to each seed (one root for all, so the stages the seed
does not reach are built once): the SFT model's held-out task accuracy (greedy), the reward model's
held-out pairwise accuracy, and PPO's gold gain on the held-out task: sampled accuracy before → after,
answers gained (wrong → right) and lost, z = (gained − lost) / √(gained + lost) (McNemar), greedy
before → after. Then the mean and the sample standard deviation over the seeds. With --task-reward,
then ppo again per seed (the stages before it are reused) with the checking program as its reward,
the critic from the SFT model and kl_coef 0.1: what the loop does with an exact reward.
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMING = {"tokens_per_s", "tokens_per_second", "iteration_s", "gen_share", "seconds", "samples_per_second"}


def launch(tree: Path, root: Path, *sets: str) -> float:
    """`launch.py run` in `tree` with a fresh interpreter; its wall seconds. Exits on failure."""
    cmd = [sys.executable, "launch.py", "run", "--root", str(root), "--set", "run.wandb=disabled"]
    for s in sets:
        cmd += ["--set", s]
    log = root.with_suffix(".log")
    t0 = time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.call(cmd, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, stdout=out,
                             stderr=subprocess.STDOUT)  # fmt: skip
    wall = time.perf_counter() - t0
    if rc != 0:
        sys.exit(f"{' '.join(cmd)} (in {tree}) failed with exit code {rc}; its output: {log}")
    return wall


def stages(tree: Path, root: Path, *sets: str) -> dict[str, dict]:
    """Each stage's status entry (state, seconds, metrics) of the run at `root`, read by `tree`'s code."""
    cmd = [sys.executable, "launch.py", "status", "--root", str(root), "--json"]
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run(cmd, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return {e["stage"]: e for e in json.loads(out)}


def untimed(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMING and not k.endswith("_s")}


def compare(baseline: str, this: str | None, rounds: int, work: Path) -> None:
    base_tree, this_tree = work / "baseline", (work / "this" if this else ROOT)
    trees = [(base_tree, baseline)] + ([(this_tree, this)] if this else [])
    for tree, rev in trees:
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), rev], cwd=ROOT, check=True)

    def name(rev: str | None) -> str:
        args = ["rev-parse", "--short", rev] if rev else ["describe", "--always", "--dirty"]
        return subprocess.run(
            ["git", *args], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout.strip()

    sides = {
        f"baseline {name(baseline)}": base_tree,
        f"{'this' if this else 'this tree'} {name(this)}": this_tree,
    }
    walls: dict[str, list[float]] = {s: [] for s in sides}
    secs: dict[str, dict[str, list[float]]] = {s: {} for s in sides}
    found: dict[str, dict] = {}
    try:
        for r in range(rounds):
            for side, tree in sides.items():
                root = work / f"{'base' if tree == base_tree else 'this'}-{r}"
                walls[side].append(launch(tree, root))
                entries = stages(tree, root)
                for stage, e in entries.items():
                    secs[side].setdefault(stage, []).append(e["seconds"] or 0.0)
                found[side] = {n: untimed(e["metrics"] or {}) for n, e in entries.items()}
                print(f"round {r + 1} {side}: {walls[side][-1]:.1f} s", flush=True)
    finally:
        for tree, _ in trees:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT)
    (b, t) = sides
    med = {s: statistics.median(v) for s, v in walls.items()}
    print(f"\n{'stage':<10} {b:>22} {t:>22} {'ratio':>6}")
    for name in secs[t]:
        bs, ts = statistics.median(secs[b].get(name, [0.0])), statistics.median(secs[t][name])
        print(f"{name:<10} {bs:>20.1f} s {ts:>20.1f} s {ts / bs if bs else float('nan'):>6.2f}")
    print(f"{'wall':<10} {med[b]:>20.1f} s {med[t]:>20.1f} s {med[t] / med[b]:>6.2f}   (median of {rounds})")
    same = [n for n in found[t] if found[t][n] == found[b].get(n)]
    differ = [n for n in found[t] if n not in same]
    print(
        f"non-timing metrics the same on both sides: {', '.join(same) or 'none'}; differ: {', '.join(differ) or 'none'}"
    )
    for n in differ:
        print(f"  {n}: baseline {found[b].get(n)}\n  {n}: this     {found[t][n]}")


TASK_REWARD = ("ppo.reward_source=task", "ppo.critic_init=sft", "ppo.kl_coef=0.1")


def outcomes(seeds: list[int], work: Path, variant: tuple[str, ...] = ()) -> None:
    root = work / "seeds"
    rows = []
    if variant:
        print(f"\nwith {' '.join(variant)}:", flush=True)
    for seed in seeds:
        t0 = time.perf_counter()
        launch(ROOT, root, f"run.seed={seed}", *variant)
        m = {n: e["metrics"] or {} for n, e in stages(ROOT, root, f"run.seed={seed}", *variant).items()}
        sft, rew, ppo = m["sft"], m["reward"], m["ppo"]
        g, lost = ppo["task_sampled_gained"], ppo["task_sampled_lost"]
        rows.append({
            "seed": seed,
            "sft task acc": sft["task_accuracy"],
            "reward pairwise": rew["pairwise_accuracy"],
            "ppo sampled before": ppo["task_accuracy_sampled_sft"],
            "ppo sampled after": ppo["task_accuracy_sampled"],
            "gained": g,
            "lost": lost,
            "z": (g - lost) / math.sqrt(g + lost) if g + lost else 0.0,
            "greedy before": ppo["task_accuracy_sft"],
            "greedy after": ppo["task_accuracy"],
        })  # fmt: skip
        print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
    cols = list(rows[0])
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    if len(rows) > 1:
        stats = [f"{statistics.mean(r[c] for r in rows):.4g} ± {statistics.stdev(r[c] for r in rows):.2g}"
                 for c in cols[1:]]  # fmt: skip
        print(f"| mean ± sd (n={len(rows)}) | " + " | ".join(stats) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", help="a commit to time this tree against")
    ap.add_argument("--this", help="time this commit (a second worktree) instead of the working tree")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seeds", type=int, nargs="+", help="run.seed values for the outcomes table")
    ap.add_argument("--task-reward", action="store_true",
                    help="then ppo again per seed with the checking program as its reward: " + " ".join(TASK_REWARD))  # fmt: skip
    ap.add_argument("--work", type=Path, help="where the runs go (default: a temporary folder, removed)")
    args = ap.parse_args()
    if not args.baseline and not args.seeds:
        ap.error("give --baseline REV and/or --seeds S [S ...]")
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start", flush=True)
    with tempfile.TemporaryDirectory(prefix="kiln-default-run-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.baseline:
            compare(args.baseline, args.this, args.rounds, work)
        if args.seeds:
            outcomes(args.seeds, work)
            if args.task_reward:
                outcomes(args.seeds, work, TASK_REWARD)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
