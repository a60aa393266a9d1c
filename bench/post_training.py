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
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def artifacts(root: Path, stages) -> dict:
    """stage -> its complete artifact under the tiny preset at `root` (None if there is none)."""
    cfg = load_config(overrides=[f"run.root={root}"])
    store = ArtifactStore(str(root), cfg.run.name)
    plan = {p.name: p for p in make_plan(cfg, PIPELINE, store, Selection(only=tuple(stages)))}
    return {s: store.find(s, plan[s].fingerprint) for s in stages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=ROOT / "runs", help="a finished tiny run (default: runs)")
    ap.add_argument("--stages", nargs="+", default=list(POST), choices=POST, help="after reward")
    args = ap.parse_args()
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
        for stage in ("reward", *args.stages):
            cmd = [sys.executable, "launch.py", "run", "--only", stage, "--root", str(root),
                   "--set", "run.wandb=disabled"]  # fmt: skip
            t0 = time.perf_counter()
            with open(Path(tmp) / f"{stage}.log", "w") as out:
                rc = subprocess.call(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
            if rc != 0:
                sys.exit(
                    f"{' '.join(cmd)} failed ({rc}):\n{(Path(tmp) / f'{stage}.log').read_text()[-3000:]}"
                )
            art = artifacts(root, (stage,))[stage]
            manifest = json.loads((art.path / "manifest.json").read_text())
            seconds[stage], metrics[stage] = manifest["seconds"], manifest["metrics"]
            print(f"{stage}: {seconds[stage]:.0f} s (wall {time.perf_counter() - t0:.0f} s)", flush=True)
    reward_s = seconds["reward"]
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end\n")
    print(
        "| stage | seconds | / ppo's | / reward's | greedy (SFT) | sampled (SFT) | gained / lost | z | KL to SFT |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    ppo_s = seconds.get("ppo")
    for stage in args.stages:  # reward's figures are not gold ones
        m, s = metrics[stage], seconds[stage]
        to_ppo = f"{s / ppo_s:.2f}" if ppo_s else ""
        print(
            f"| {stage} | {s:.0f} | {to_ppo} | {s / reward_s:.2f} | {m['task_accuracy']:.3f} "
            f"({m['task_accuracy_sft']:.3f}) | {m['task_accuracy_sampled']:.3f} ({m['task_accuracy_sampled_sft']:.3f}) "
            f"| {m['task_sampled_gained']} / {m['task_sampled_lost']} | {m.get('task_sampled_z', float('nan')):+.1f} "
            f"| {m.get('kl_sft', float('nan')):.2f} |"
        )


if __name__ == "__main__":
    main()
