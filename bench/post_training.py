"""The post-training stages side by side, timed: reward and ppo (the baselines), then grpo, rloo and dpo, one
after another from the same sft artifact (and the reward model built here), each alone on the cores.

    python launch.py                                   # the tiny run, if there is none yet
    python bench/post_training.py --root runs          # ~20 min on 2 cores

The upstream artifacts of the run at --root (ingest to sft) are copied into a temporary root; each stage
then runs there with `launch.py run --only STAGE` in a fresh interpreter (Ray started and stopped by the
run, as a user types it), with configs/tiny.yaml's settings: grpo and rloo on the checking program, dpo on
the shipped preference pairs. Printed per stage: its seconds (the manifest's, from its start to its
commit) and their ratio to ppo's (the goal: grpo within ppo's time) and to reward's (the goal: dpo within
reward training's time; reward alone here, where the preset runs it beside sft), then the gold figures of
the comparison table: held-out task accuracy greedy and sampled against the SFT policy's, the sampled answers gained
(wrong to right) and lost, z, and KL to the SFT policy. Figures are printed, never asserted.

    python bench/post_training.py --root runs --seeds 1234 1 2     # each stage once per seed, ~40 min

With `--seeds`, every stage after reward runs once per seed, its own seed set (`STAGE.seed`, the run's
seed left unset) from the same sft and reward artifacts, so the spread is that of the post-training stage
alone; then each stage's mean and standard deviation over the seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.artifacts import ArtifactStore  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.dag import PIPELINE  # noqa: E402
from pipeline.plan import Selection, make_plan  # noqa: E402

STAGES = ("reward", "ppo", "grpo", "rloo", "dpo")
UPSTREAM = ("ingest", "tokenizer", "tokenize", "pretrain", "sft")
POST = STAGES[1:]


def artifacts(root: Path, stages, sets=()) -> dict:
    """stage -> its complete artifact under the tiny preset and `sets` at `root` (None if there is none)."""
    cfg = load_config(overrides=[f"run.root={root}", *sets])
    store = ArtifactStore(str(root), cfg.run.name)
    plan = {p.name: p for p in make_plan(cfg, PIPELINE, store, Selection(only=tuple(stages)))}
    return {s: store.find(s, plan[s].fingerprint) for s in stages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=ROOT / "runs", help="a finished tiny run (default: runs)")
    ap.add_argument("--stages", nargs="+", default=list(POST), choices=POST, help="after reward")
    ap.add_argument("--seeds", type=int, nargs="+", help="run each stage after reward once per seed")
    args = ap.parse_args()
    run_seed = load_config().run.seed
    seeds = args.seeds or [run_seed]
    have = artifacts(args.root, UPSTREAM)
    missing = [s for s, a in have.items() if a is None]
    if missing:
        sys.exit(f"{args.root} lacks complete {', '.join(missing)} artifacts: run `python launch.py` first")
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start", flush=True)
    seconds, metrics = {}, {}
    with tempfile.TemporaryDirectory(prefix="kiln-post-training-") as tmp:
        root = Path(tmp) / "runs"
        run_dir = root / load_config().run.name
        run_dir.mkdir(parents=True)
        for art in have.values():
            shutil.copytree(art.path, run_dir / art.path.name)
        runs = [("reward", None)] + [(stage, seed) for seed in seeds for stage in args.stages]
        for stage, seed in runs:
            sets = [] if seed in (None, run_seed) else [f"{stage}.seed={seed}"]
            cmd = [sys.executable, "launch.py", "run", "--only", stage, "--root", str(root),
                   "--set", "run.wandb=disabled", *(a for x in sets for a in ("--set", x))]  # fmt: skip
            t0 = time.perf_counter()
            log = Path(tmp) / f"{stage}-{seed}.log"
            with open(log, "w") as out:
                rc = subprocess.call(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
            if rc != 0:
                sys.exit(f"{' '.join(cmd)} failed ({rc}):\n{log.read_text()[-3000:]}")
            art = artifacts(root, (stage,), sets)[stage]
            manifest = json.loads((art.path / "manifest.json").read_text())
            seconds[stage, seed], metrics[stage, seed] = manifest["seconds"], manifest["metrics"]
            took = f"{seconds[stage, seed]:.0f} s (wall {time.perf_counter() - t0:.0f} s)"
            gold = {k: v for k, v in manifest["metrics"].items() if k.startswith(("task_", "kl_sft"))}
            print(f"{stage}{'' if seed is None else f' seed {seed}'}: {took} {json.dumps(gold)}", flush=True)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end\n")
    table(args.stages, seeds, seconds, metrics)
    if len(seeds) > 1:
        spread(args.stages, seeds, seconds, metrics)


def table(stages, seeds, seconds, metrics) -> None:
    """A row per stage and seed: time against the baselines (ppo's of the same seed), then gold figures."""
    print(
        "| stage | seed | seconds | / ppo's | / reward's | greedy (SFT) | sampled (SFT) | gained / lost | z | KL to SFT |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for seed in seeds:
        ppo_s = seconds.get(("ppo", seed))
        for stage in stages:  # reward's figures are not gold ones
            m, s = metrics[stage, seed], seconds[stage, seed]
            to_ppo = f"{s / ppo_s:.2f}" if ppo_s else ""
            print(
                f"| {stage} | {seed} | {s:.0f} | {to_ppo} | {s / seconds['reward', None]:.2f} | {m['task_accuracy']:.3f} "
                f"({m['task_accuracy_sft']:.3f}) | {m['task_accuracy_sampled']:.3f} ({m['task_accuracy_sampled_sft']:.3f}) "
                f"| {m['task_sampled_gained']} / {m['task_sampled_lost']} | {m.get('task_sampled_z', float('nan')):+.1f} "
                f"| {m.get('kl_sft', float('nan')):.2f} |"
            )


def spread(stages, seeds, seconds, metrics) -> None:
    """Each stage's mean ± standard deviation over the seeds."""

    def ms(values) -> str:
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"

    print(f"\nover {len(seeds)} seeds (mean ± standard deviation):\n")
    print("| stage | seconds | sampled accuracy | sampled - SFT's | z | runs with z >= 3 | KL to SFT |")
    print("|---|---|---|---|---|---|---|")
    for stage in stages:
        m = [metrics[stage, seed] for seed in seeds]
        z = [x.get("task_sampled_z", float("nan")) for x in m]
        print(
            f"| {stage} | {statistics.mean(seconds[stage, s] for s in seeds):.0f} "
            f"| {ms([x['task_accuracy_sampled'] for x in m])} "
            f"| {ms([x['task_accuracy_sampled'] - x['task_accuracy_sampled_sft'] for x in m])} "
            f"| {statistics.mean(z):+.1f} ± {statistics.stdev(z):.1f} | {sum(v >= 3 for v in z)} of {len(z)} "
            f"| {ms([x.get('kl_sft', float('nan')) for x in m])} |"
        )


if __name__ == "__main__":
    main()
