"""ppo: RLHF with PPO and a KL penalty against the SFT model, scored by the reward model.

    python launch.py run --only ppo --set ppo.iterations=80 --set ppo.kl_target=6

Inputs: {"sft", "reward"}, and {"tokenize"} for pretraining's held-out windows. The policy starts from the SFT model and a frozen copy of it is the
reference; the reward model scores responses, normalised to mean 0, std 1 with the statistics in its
manifest (`reward_mean`, `reward_std` on held-out data); the value model starts from the reward model
(or from the SFT backbone with a fresh head: `ppo.critic_init`). Artifact:

    config.json, model.safetensors, generation_config.json, tokenizer files   the PPO policy (KilnForCausalLM)
    prompt_stats.json                                                         prompts read / kept / malformed / too long
    metrics.jsonl                                                             one row per iteration

One iteration, on every rank of a Ray Train group (the RL stages' loop, kiln/rl/loop.py, which grpo
runs too; actor and critic are DeepSpeed engines; the reference and reward models are frozen,
ZeRO-3-sharded inference engines under ZeRO-3):

    1. rollout     `rollout_batch_size` prompts in the order fixed by the seed (each rank its share),
                   sampled with the KV cache (kiln/rl/rollout.py), one generator per prompt
    2. experience  old logprobs, reference logprobs, values; the reward model's score (normalised,
                   `missing_eos_penalty` off a response that never ended); per-token rewards with the
                   KL penalty (kiln/rl/ppo_math.py); GAE; advantages whitened over all ranks
    3. update      `ppo_epochs` passes in mini-batches (each rank's own order); clipped policy and
                   value losses, token means over the whole mini-batch on every rank, so 2 workers
                   take the same step as 1 worker on the same rollouts
    4. controller  a fixed beta, or the adaptive one (Ziegler et al. 2019) toward `kl_target`

Under ZeRO-3 (`ppo.gather_for_rollout`, default on) the policy's parameters are gathered whole once
for the rollout, with DeepSpeed's hooks off (kiln.training.gathered), rather than by the hooks at every
forward pass, that is at every sampled token (all of them for a model larger than what DeepSpeed keeps
gathered between uses: `zero3_prefetch_bucket_size`, `zero3_max_reuse_distance`); each model's are
gathered once for its experience passes, and the policy's for the held-out evaluation. A gathered forward calls no collective, so the ranks sample
without stepping together (below, or without the gather, they step until every rank is done). Each
rank holds one whole model at a time meanwhile, as TRL and OpenRLHF do for generation: turn the key off
for a model too large for that. The numbers are the same either way (the same weights, gathered once
or per forward pass).

Under ZeRO-3 all four models are built partitioned (`build_models`, kiln/sharded.py): no rank holds a
whole one while they load. With `ppo.offload_frozen` the reference's and the reward model's partitions
are made and kept in CPU memory (DeepSpeed's parameter offload) and copied to the accelerator only
when gathered for their experience passes: between those it holds none of the two.

Metrics per iteration: score (raw reward-model score), score_norm, reward (score_norm plus the KL
penalty, per response), kl (k1 per response), kl_coef, entropy, policy/value loss, clip fractions,
approx_kl, response_length, ended_frac, gen_share (the share of the iteration spent sampling),
rollout_s (the rollout's wall time) and rollout_allgathers (the all-gather calls it made through
DeepSpeed, ZeRO-3's parameter fetches: kiln.training.counted_allgathers; 0 below ZeRO-3), rank 0's.
The shipped task's checking program judges the policy's answers to held-out prompts before the first
iteration, every `eval_every` and at the end (`task_accuracy` greedy, `task_accuracy_sampled` as the
rollouts sample, with the same seeds each time): nothing in training sees it. Each later evaluation
is paired with the first, answer by answer: `task_sampled_gained` went wrong -> right, `task_sampled_lost`
right -> wrong (McNemar's test: a real change when gained - lost > 2 sqrt(gained + lost)). Each
evaluation also scores the windows pretraining holds out, by source (`heldout_loss/<source>`; before
PPO: `heldout_loss_sft/<source>`), so the manifest shows what PPO cost each source.
Resume restores both engines with their optimizers, the KL controller, the iteration and each rank's
global RNGs; prompts, samples and mini-batch orders are functions of (seed, iteration), so a resumed
run repeats an uninterrupted one. Actor and critic train with dropout 0 (as TRL's `disable_dropout`):
the update's logprobs and values are the same function of the weights as the rollout's.

`ppo.reward_source: task` scores answers with the task's checking program instead of the reward
model (RL from a verifiable reward); the task accuracy is then what training optimises.
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
from pipeline.config import PpoConfig

if TYPE_CHECKING:
    from torch import Tensor

VERSION = 2
"""What this stage produces, versioned: bump it when a change alters its output (README, "Changing a
stage"); its artifacts, and those downstream, are then rebuilt. Other code changes rebuild nothing."""


@dataclass
class Experience:
    """What the update needs from one rollout batch (this rank's B rollouts: P prompt tokens, left
    padded, then R response tokens), computed once before the update's epochs."""

    tokens: Tensor  # (B, P + R) long: prompt and response token ids
    mask: Tensor  # (B, P + R) long: 1 on real tokens
    P: int  # the padded prompt width: responses start at column P
    rmask: Tensor  # (B, R) float: the response part of `mask` (1 on generated tokens, 0 after the end)
    old_logp: Tensor  # (B, R) the rollout policy's logprob of each response token
    old_values: Tensor  # (B, R) the critic's value at the position before each response token
    advantages: Tensor  # (B, R) GAE advantages, whitened over the batch when configured
    returns: Tensor  # (B, R) GAE returns: the critic's target
    value_norm: tuple[float, float]  # (shift, scale): a value is (critic output - shift) / scale


@dataclass(frozen=True, kw_only=True)
class PpoJob(L.RlJob):
    """What each PPO worker receives: the RL stages' job (kiln/rl/loop.py) and the critic's scale."""

    section: PpoConfig
    value_norm: tuple[float, float]
    """(shift, scale) of the critic's output: the reward's statistics for a critic started from the
    reward model, so it starts out predicting normalised scores; (0, 1) for a fresh value head."""


def run(cfg, inputs, out: Path, ctx) -> dict:
    p = cfg.ppo
    # the reward model's held-out mean and std normalise its scores, and a critic started from it
    uses = [use for use, on in (("the rewards", p.reward_source == "model"), ("the critic's values", p.critic_init == "reward")) if on]  # fmt: skip
    mean, std = L.reward_statistics("ppo", inputs["reward"].metrics, uses)
    L.reward_gate(p, "ppo", inputs["reward"].metrics, ctx.logger)
    sft_dir = Path(inputs["sft"].path)
    prompts, stats, task = L.read_prompts(p, "ppo", sft_dir, ctx.logger)
    job = PpoJob.new(
        ctx, cfg, p, sft_dir=sft_dir, reward_dir=Path(inputs["reward"].path), reward_mean=mean, reward_std=std,
        value_norm=(mean, std) if p.critic_init == "reward" else (0.0, 1.0), prompts=prompts, task_prompts=task,
        heldout=HeldOutWindows.of(cfg, inputs["tokenize"].path),
    )  # fmt: skip
    metrics = run_group(ctx, train_worker, job, out)
    (out / "prompt_stats.json").write_text(json.dumps(stats, indent=2))
    return metrics | {"prompts": stats["kept"], "too_long_prompts": stats["too_long"]}


# ---------------------------------------------------------------------------------------------------- worker


def train_worker(job: PpoJob, wctx) -> dict:
    """One data-parallel rank of the PPO loop (module docstring). Returns the final metrics. A collective
    that waits past `ppo.collective_timeout_min` fails the rank, naming it and the collective."""
    from kiln import training as T

    with T.collective_timeouts("ppo", wctx.rank, wctx.world_size, job.section.collective_timeout_min):
        return PpoLoop(job, wctx).run()


class PpoLoop(L.RlLoop):
    """The RL loop (kiln/rl/loop.py) with PPO's models, experience, update and KL controller."""

    stage = "ppo"
    KEEP = ("score", "score_norm", "reward", "kl", "kl_coef", "entropy", "response_length", "ended_frac", "gen_share")  # fmt: skip

    def __init__(self, job: PpoJob, wctx):
        from kiln.rl import ppo_math as M

        super().__init__(job, wctx)
        p = self.p
        self.kl_ctl = (
            M.AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon)
            if p.kl_target is not None
            else M.FixedKLController(p.kl_coef)
        )

    def build(self) -> L.Models:
        return build_models(self.job, self.world, self.device, self.tok.pad_token_id)

    def trained(self) -> dict:
        return {"actor": (self.models.actor, self.p.lr), "critic": (self.models.critic, self.p.critic_lr)}

    def learn(self, it, prompts, roll, rng) -> dict:
        convs = [q["messages"] for q in prompts]
        exp, row = experience(roll, convs, self.models, self.tok, self.job, self.kl_ctl.value, self.world)
        return row | ppo_update(
            self.models.actor, self.models.critic, exp, self.p, self.mini, self.world, rng
        )

    def after_reduce(self, row: dict) -> None:
        # the controller: mean KL per response over all ranks, responses seen this iteration
        row["kl_coef"] = self.kl_ctl.value
        self.kl_ctl.update(row["kl"], self.p.rollout_batch_size)

    def state_dict(self) -> dict:
        return {"kl_controller": self.kl_ctl.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.kl_ctl.load_state_dict(state["kl_controller"])


def build_models(job: PpoJob, world: int, device, pad_id: int) -> L.Models:
    """A rank's four models (kiln.rl.loop.build_models): the actor and the critic as DeepSpeed training
    engines, the critic from the reward model (`critic_init: reward`) or the SFT backbone with a fresh
    value head; the reference and the reward model (None with `reward_source: task`) frozen."""
    critic_dir = job.reward_dir if job.section.critic_init == "reward" else job.sft_dir
    return L.build_models(job, world, device, pad_id, critic_dir=critic_dir)


def experience(
    roll, prompts, models: L.Models, tok, job: PpoJob, kl_coef: float, world: int
) -> tuple[Experience, dict]:
    """Everything the update needs from one rollout batch, and the rollout's metrics.
    Forward passes in micro-batches, model by model (under ZeRO-3 each gathered once for its passes:
    `ppo.gather_for_rollout`); rewards, GAE and whitening over the whole batch."""
    from kiln.chat_eval import decode_responses, stop_ids
    from kiln.rl import ppo_math as M

    p = job.section
    P, micro, gather = roll.prompt_len, p.micro_batch_size, p.gather_for_rollout
    rmask = roll.response_mask.float()  # (B, R)
    old_logp = L.micro_passes(models.actor, roll, micro, gather, S.logprobs, p.temperature)
    ref_logp = L.micro_passes(models.ref, roll, micro, gather, S.logprobs, p.temperature)
    values = L.micro_passes(models.critic, roll, micro, gather, _values, job.value_norm)

    answers = decode_responses(tok, roll, stop_ids(tok))
    raw, score = S.score_answers(prompts, answers, models.reward, tok, job, values.device)
    score = M.eos_penalty(score, roll.ended, p.missing_eos_penalty)

    kl = M.kl_estimate(old_logp, ref_logp, p.kl_estimator)  # (B, R) what the rewards are charged
    rewards = M.penalized_rewards(score, kl, rmask, kl_coef)
    advantages, returns = M.gae(rewards, values, rmask, p.gamma, p.lam)
    if p.whiten_advantages:
        advantages = M.masked_whiten(advantages, rmask, reduce=L.sum_over_ranks if world > 1 else None)
    exp = Experience(
        tokens=roll.tokens, mask=roll.mask, P=P, rmask=rmask, old_logp=old_logp, old_values=values,
        advantages=advantages, returns=returns, value_norm=job.value_norm,
    )  # fmt: skip
    per_seq = lambda x: (x * rmask).sum(1).mean()  # noqa: E731  mean over responses of a per-token sum
    row = {
        "rollout_task_accuracy": S.checked(prompts, answers) if job.task_prompts else None,
        "score": raw.mean(),
        "score_norm": score.mean(),
        "reward": rewards.sum(1).mean(),
        "kl": per_seq(M.kl_k1(old_logp, ref_logp)),
        "kl_k3": per_seq(M.kl_k3(old_logp, ref_logp)),
        "response_length": rmask.sum(1).mean(),
        "ended_frac": roll.ended.float().mean(),
        "values": M.masked_mean(values, rmask),
        "returns": M.masked_mean(returns, rmask),
    }
    return exp, row


def _values(critic, x, m, P, norm: tuple[float, float]):
    """Per-token values of the response, (B, R): the head's output at the position before each token,
    as (output - shift) / scale. A critic started from the reward model has the reward's normalisation
    (module docstring), so it starts out predicting normalised scores; a fresh head uses (0, 1)."""
    shift, scale = norm
    out = critic(input_ids=x, attention_mask=m, per_token=True).logits[:, P - 1 : -1, 0].float()
    return (out - shift) / scale


def ppo_update(actor, critic, exp: Experience, p, mini: int, world: int, rng) -> dict:
    """`ppo_epochs` passes over this rank's rollouts in mini-batches of `mini` (its share of
    `mini_batch_size`); each mini-batch is one optimizer step of the actor and of the critic."""
    from kiln.rl import ppo_math as M

    P = exp.P
    means = L.UpdateMeans(world, steps=p.ppo_epochs * (exp.tokens.shape[0] // mini))
    for idx, tokens in L.update_batches(exp.rmask, p.ppo_epochs, mini, p.micro_batch_size, world, rng):
        x, m, rmask = exp.tokens[idx], exp.mask[idx], exp.rmask[idx]
        logits = S.tempered_logits(actor, x, m, P, p.temperature)  # (b, R, V)
        logp = M.logprobs_from_logits(logits, x[:, P:])
        pg, stats = M.policy_loss(logp, exp.old_logp[idx], exp.advantages[idx], rmask, p.clip_eps, tokens)
        entropy = M.entropy_from_logits(logits.detach() if not p.entropy_coef else logits, rmask)
        loss = pg - p.entropy_coef * entropy * rmask.sum() / tokens
        # DeepSpeed averages gradients over ranks; the token mean already sums them
        actor.backward(loss * world, scale_wrt_gas=False)
        actor.step()

        values = _values(critic, x, m, P, exp.value_norm)
        vf, vstats = M.value_loss(values, exp.old_values[idx], exp.returns[idx], rmask, p.value_clip_eps, tokens)  # fmt: skip
        critic.backward(vf * world, scale_wrt_gas=False)
        critic.step()

        # every statistic as a token mean over the mini-batch (like the losses)
        means.tokens({"entropy": entropy, **stats, **vstats}, rmask, tokens)
        means.loss("policy_loss", pg)
        means.loss("value_loss", vf)
    return means.values
