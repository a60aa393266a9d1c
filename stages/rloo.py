"""rloo: REINFORCE Leave-One-Out (Ahmadian et al. 2024) from the SFT model, beside ppo and grpo.

    python launch.py run --set rloo.enabled=true --set grpo.enabled=true   # ppo, grpo and rloo in one run
    python launch.py run --only rloo                                        # from the sft (and reward) artifacts

grpo's stage (stages/grpo.py: the loop, the experience and update, the artifact, the metrics) under its
own config section, `rloo`, whose defaults are RLOO's: each response's score against the mean of the
other group_size - 1 answers to its prompt, advantages unscaled, one token mean per mini-batch
(kiln/rl/group_math.py). Being a stage of its own, it runs beside grpo in one run, from the same sft and
reward artifacts, and the end-of-run table compares them (pipeline/compare.py). `grpo.baseline:
leave_one_out` gives the same algorithm within grpo. An opt-in stage, as grpo is.

Its VERSION moves with grpo's: what grpo's module makes, this stage makes.
"""

from __future__ import annotations

from pathlib import Path

from stages import grpo

VERSION = 2
"""What this stage produces, versioned: bump it when a change alters its output (README, "Changing a
stage"); with grpo's, whose code makes it. Other code changes rebuild nothing."""


def run(cfg, inputs, out: Path, ctx) -> dict:
    return grpo.run_stage(cfg, inputs, out, ctx, "rloo")
