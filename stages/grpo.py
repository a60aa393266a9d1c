"""grpo: critic-free RL from the SFT model: GRPO, Dr. GRPO or RLOO, with a KL to the SFT model.

    python launch.py run --only grpo --set grpo.iterations=40      # from the sft (and reward) artifacts
    python launch.py run --set grpo.enabled=true                   # in a run, beside ppo

An opt-in stage: a run builds it only with `grpo.enabled: true`, or when a selection names it
(`--only grpo`, `--from grpo`, `--until grpo`); the tiny preset leaves it off. Inputs: {"sft"},
{"reward"} when `grpo.reward_source: model`, and {"tokenize"} for pretraining's held-out windows. The
policy starts from the SFT model and a frozen copy of it is the reference; a response is scored by
the reward model (normalised to mean 0, std 1 with the statistics in its manifest) or, with
`reward_source: task`, by the shipped task's checking program (1 right, 0 wrong). No value model: a
response's advantage is its score against the other answers to the same prompt. Artifact:

    config.json, model.safetensors, generation_config.json, tokenizer files   the policy (KilnForCausalLM)
    prompt_stats.json                                                         prompts read / kept / malformed / too long
    metrics.jsonl                                                             one row per iteration

One iteration, on every rank of a Ray Train group (the loop ppo runs too: kiln/rl/loop.py; the actor is
a DeepSpeed engine, the reference and the reward model frozen):

    1. rollout     `rollout_batch_size` prompts in the order fixed by the seed (each rank its share,
                   whole groups), each sampled `group_size` times (G) with the KV cache, one generator
                   per response: response g of the prompt at position j draws from
                   rollout_seed(seed, iteration, j * G + g)
    2. experience  old logprobs and reference logprobs; each response's score (`missing_eos_penalty`
                   off a response that never ended); with `kl_in: reward` the score less beta times the
                   response's summed log ratio to the reference; one advantage per response from its
                   group's scores (kiln/rl/group_math.py): minus the group's mean (`baseline:
                   group_mean`, GRPO) or the mean of the other G - 1 (`leave_one_out`, RLOO), divided
                   by the group's std with `scale_advantages` (GRPO; Dr. GRPO leaves it out)
    3. update      `ppo_epochs` passes in mini-batches of responses (each rank its own order); PPO's
                   clipped objective with the response's advantage on each of its tokens, plus beta
                   times the per-token k3 KL to the reference with `kl_in: loss` (GRPO's eq. 4); token
                   losses weighted by `weighting`, with the whole mini-batch's counts on every rank, so
                   2 workers take the same step as 1 worker on the same rollouts

A group whose responses all score the same (all right, all wrong) has advantage 0: it moves the
policy only through the KL term (`flat_groups` counts them). With `kl_in: reward` and
`scale_advantages`, such a group's advantages are its KL differences divided by their own small std:
the KL then weighs as much as a score would; keep `kl_in: loss` (the default) unless that is meant.

Metrics per iteration: score (raw: the reward model's score or the program's verdict), score_norm,
reward (what the advantages are taken from, per response), kl (k1 per response, to the reference),
kl_k3, flat_groups (the share of groups without signal), advantage_abs (the mean |advantage|),
entropy, policy_loss, clip_frac, approx_kl, kl_penalty (the loss's k3 per token, `kl_in: loss`),
response_length, ended_frac, rollout_task_accuracy, gen_share, rollout_s, rollout_allgathers, rank
0's. The held-out evaluation and the manifest's gold keys are ppo's: `task_accuracy` (greedy) and
`task_accuracy_sampled` before (`_sft`), every `eval_every` and at the end, `task_sampled_gained` /
`task_sampled_lost` paired answer by answer with the SFT policy's, and `heldout_loss/<source>`
(before: `heldout_loss_sft/<source>`). Resume restores the actor with its optimizer, the iteration and
each rank's global RNGs: a resumed run repeats an uninterrupted one. The actor trains with dropout 0,
so the update's logprobs are the same function of the weights as the rollout's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.rl import loop as L
from kiln.rl import scoring as S
from kiln.training import HeldOutWindows
from kiln.workers import run_group
from pipeline.config import GrpoConfig

if TYPE_CHECKING:
    from torch import Tensor

VERSION = 2
"""What this stage produces, versioned: bump it when a change alters its output (README, "Changing a
stage"); its artifacts, and those downstream, are then rebuilt. Other code changes rebuild nothing."""


@dataclass
class GroupExperience:
    """What the update needs from one rollout batch (this rank's B = prompts x G responses, group by
    group: P prompt tokens, left padded, then R response tokens), computed once before the epochs."""

    tokens: Tensor  # (B, P + R) long: prompt and response token ids
    mask: Tensor  # (B, P + R) long: 1 on real tokens
    P: int  # the padded prompt width: responses start at column P
    rmask: Tensor  # (B, R) float: the response part of `mask`
    old_logp: Tensor  # (B, R) the rollout policy's logprob of each response token
    ref_logp: Tensor  # (B, R) the reference's
    advantages: Tensor  # (B,) one per response, from its group's rewards


@dataclass(frozen=True, kw_only=True)
class GrpoJob(L.RlJob):
    """What each GRPO worker receives: the RL stages' job (kiln/rl/loop.py)."""

    section: GrpoConfig
    stage: str = "grpo"
    """The stage's name (its config section): grpo, or rloo."""


def run(cfg, inputs, out: Path, ctx) -> dict:
    return run_stage(cfg, inputs, out, ctx, "grpo")


def run_stage(cfg, inputs, out: Path, ctx, stage: str) -> dict:
    """The stage under config section `stage` (grpo, or rloo: stages/rloo.py)."""
    p = getattr(cfg, stage)
    reward = inputs.get("reward")  # an input with `reward_source: model` only
    uses = ["the rewards"] if p.reward_source == "model" else []
    mean, std = L.reward_statistics(stage, reward.metrics if reward else {}, uses)
    L.reward_gate(p, stage, reward.metrics if reward else {}, ctx.logger)
    sft_dir = Path(inputs["sft"].path)
    prompts, stats, task = L.read_prompts(p, stage, sft_dir, ctx.logger)
    job = GrpoJob.new(
        ctx, cfg, p, sft_dir=sft_dir, reward_dir=Path(reward.path) if reward else None, reward_mean=mean,
        reward_std=std, prompts=prompts, task_prompts=task, heldout=HeldOutWindows.of(cfg, inputs["tokenize"].path),
        stage=stage,
    )  # fmt: skip
    metrics = run_group(ctx, train_worker, job, out)
    (out / "prompt_stats.json").write_text(json.dumps(stats, indent=2))
    return metrics | {"prompts": stats["kept"], "too_long_prompts": stats["too_long"]}


# ---------------------------------------------------------------------------------------------------- worker


def train_worker(job: GrpoJob, wctx) -> dict:
    """One data-parallel rank of the GRPO loop (module docstring). Returns the final metrics. A collective
    that waits past `grpo.collective_timeout_min` fails the rank, naming it and the collective."""
    from kiln import training as T

    with T.collective_timeouts(job.stage, wctx.rank, wctx.world_size, job.section.collective_timeout_min):
        return GrpoLoop(job, wctx).run()


class GrpoLoop(L.RlLoop):
    """The RL loop (kiln/rl/loop.py) with GRPO's models (no critic), group experience and update."""

    stage = "grpo"
    KEEP = ("score", "score_norm", "reward", "kl", "entropy", "response_length", "ended_frac", "flat_groups",
            "gen_share")  # fmt: skip

    def __init__(self, job: GrpoJob, wctx):
        self.stage = job.stage  # grpo or rloo: names its messages and checkpoints
        self.samples_per_prompt = job.section.group_size
        super().__init__(job, wctx)

    def build(self) -> L.Models:
        return L.build_models(self.job, self.world, self.device, self.tok.pad_token_id)

    def trained(self) -> dict:
        return {"actor": (self.models.actor, self.p.lr)}

    def learn(self, it, prompts, roll, rng) -> dict:
        convs = [q["messages"] for q in prompts for _ in range(self.samples_per_prompt)]  # as `roll`'s rows
        exp, row = experience(roll, convs, self.models, self.tok, self.job)
        return row | grpo_update(self.models.actor, exp, self.p, self.mini, self.world, rng)


def experience(roll, prompts, models: L.Models, tok, job: GrpoJob) -> tuple[GroupExperience, dict]:
    """Everything the update needs from one rollout batch (`prompts`: each response's conversation,
    group by group), and the rollout's metrics. Forward passes in micro-batches, model by model (under
    ZeRO-3 each gathered once for its passes: `grpo.gather_for_rollout`)."""
    from kiln.chat_eval import decode_responses, stop_ids
    from kiln.rl import group_math as G
    from kiln.rl import ppo_math as M

    p = job.section
    micro, gather = p.micro_batch_size, p.gather_for_rollout
    rmask = roll.response_mask.float()  # (B, R)
    old_logp = L.micro_passes(models.actor, roll, micro, gather, S.logprobs, p.temperature)
    ref_logp = L.micro_passes(models.ref, roll, micro, gather, S.logprobs, p.temperature)

    answers = decode_responses(tok, roll, stop_ids(tok))
    raw, score = S.score_answers(prompts, answers, models.reward, tok, job, old_logp.device)
    score = M.eos_penalty(score, roll.ended, p.missing_eos_penalty)
    if p.kl_in == "reward":
        reward = G.kl_penalized_scores(score, old_logp, ref_logp, rmask, p.kl_coef)
    else:
        reward = score.float()
    advantages = G.group_advantages(reward, p.group_size, baseline=p.baseline, scale=p.scale_advantages)
    exp = GroupExperience(
        tokens=roll.tokens, mask=roll.mask, P=roll.prompt_len, rmask=rmask, old_logp=old_logp,
        ref_logp=ref_logp, advantages=advantages,
    )  # fmt: skip
    groups = reward.view(-1, p.group_size)
    per_seq = lambda x: (x * rmask).sum(1).mean()  # noqa: E731  mean over responses of a per-token sum
    row = {
        "rollout_task_accuracy": S.checked(prompts, answers) if job.task_prompts else None,
        "score": raw.mean(),
        "score_norm": score.mean(),
        "reward": reward.mean(),
        "kl": per_seq(M.kl_k1(old_logp, ref_logp)),
        "kl_k3": per_seq(M.kl_k3(old_logp, ref_logp)),
        "flat_groups": (groups.amax(1) == groups.amin(1)).float().mean(),
        "advantage_abs": advantages.abs().mean(),
        "response_length": rmask.sum(1).mean(),
        "ended_frac": roll.ended.float().mean(),
    }
    return exp, row


def grpo_update(actor, exp: GroupExperience, p, mini: int, world: int, rng) -> dict:
    """`ppo_epochs` passes over this rank's responses in mini-batches of `mini` (its share of
    `mini_batch_size`); each mini-batch is one optimizer step of the actor. A micro-batch's loss is its
    part of the mini-batch's (`token_weights` with the whole mini-batch's responses and tokens), so the
    micro-batches' and the ranks' gradients sum to the mini-batch's."""
    from kiln.rl import group_math as G
    from kiln.rl import ppo_math as M

    P = exp.P
    kl_coef = p.kl_coef if p.kl_in == "loss" else 0.0  # in the reward, it is in the advantages already
    means = L.UpdateMeans(world, steps=p.ppo_epochs * (exp.tokens.shape[0] // mini))
    for idx, tokens in L.update_batches(exp.rmask, p.ppo_epochs, mini, p.micro_batch_size, world, rng):
        x, m, rmask = exp.tokens[idx], exp.mask[idx], exp.rmask[idx]
        logits = S.tempered_logits(actor, x, m, P, p.temperature)  # (b, R, V)
        logp = M.logprobs_from_logits(logits, x[:, P:])
        weights = G.token_weights(
            rmask, p.weighting, num_sequences=mini * world, num_tokens=tokens, max_len=p.max_new_tokens
        )
        loss, stats = G.group_policy_loss(logp, exp.old_logp[idx], exp.ref_logp[idx], exp.advantages[idx], rmask,
                                          weights, clip_eps=p.clip_eps, kl_coef=kl_coef)  # fmt: skip
        entropy = M.entropy_from_logits(logits.detach(), rmask)
        # DeepSpeed averages gradients over ranks; the weights already sum them
        actor.backward(loss * world, scale_wrt_gas=False)
        actor.step()

        found = {"entropy": entropy, "clip_frac": stats["clip_frac"], "approx_kl": stats["approx_kl"]}
        if "kl" in stats:
            found["kl_penalty"] = stats["kl"]
        means.tokens(found, rmask, tokens)  # token means over the mini-batch
        means.loss("policy_loss", loss)
    return means.values
