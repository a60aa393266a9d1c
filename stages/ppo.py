"""ppo: RLHF with PPO and a KL penalty against the SFT model, scored by the reward model.

    python launch.py run --only ppo --set ppo.iterations=80 --set ppo.kl_target=6

Inputs: {"sft", "reward"}, and {"tokenize"} for pretraining's held-out windows. The policy starts from the SFT model and a frozen copy of it is the
reference; the reward model scores responses, normalised to mean 0, std 1 with the statistics in its
manifest (`reward_mean`, `reward_std` on held-out data); the value model starts from the reward model
(or from the SFT backbone with a fresh head: `ppo.critic_init`). Artifact:

    config.json, model.safetensors, generation_config.json, tokenizer files   the PPO policy (KilnForCausalLM)
    prompt_stats.json                                                         prompts read / kept / malformed / too long
    metrics.jsonl                                                             one row per iteration

One iteration, on every rank of a Ray Train group (actor and critic are DeepSpeed engines; the
reference and reward models are frozen, ZeRO-3-sharded inference engines under ZeRO-3):

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
import logging
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.training import HeldOutWindows
from kiln.workers import WorkerJob, run_group
from pipeline.config import PpoConfig
from pipeline.preemption import STOPPED

if TYPE_CHECKING:
    from torch import Tensor

VERSION = 1
"""What this stage produces, versioned: bump it when a change alters its output (README, "Changing a
stage"); its artifacts, and those downstream, are then rebuilt. Other code changes rebuild nothing."""


@dataclass
class Models:
    """The four models of a PPO rank: the policy and value model it trains (DeepSpeed engines), the
    frozen reference (the SFT policy) the KL is measured against, and the reward model."""

    actor: object
    critic: object
    ref: object
    reward: object


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
class PpoJob(WorkerJob):
    """What each PPO worker receives."""

    section: PpoConfig
    sft_dir: Path
    """The SFT model: the policy's start, the reference, the tokenizer (and the critic's backbone)."""
    reward_dir: Path
    """The reward model (and the critic's start with `critic_init: reward`)."""
    reward_mean: float
    reward_std: float
    """The reward model's held-out score statistics: a score is used as (score - mean) / std."""
    value_norm: tuple[float, float]
    """(shift, scale) of the critic's output: the reward's statistics for a critic started from the
    reward model, so it starts out predicting normalised scores; (0, 1) for a fresh value head."""
    prompts: list[dict]
    """Training prompts as {"messages", "ids"} (`_load_prompts`)."""
    task_prompts: list
    """Held-out prompts of the shipped task (conversations), for the task accuracy."""
    heldout: HeldOutWindows | None = None
    """Pretraining's held-out windows, scored by source at each evaluation: what PPO cost each source."""


log = logging.getLogger("kiln.ppo")


def run(cfg, inputs, out: Path, ctx) -> dict:
    p = cfg.ppo
    reward_stats = inputs["reward"].metrics
    missing = [k for k in ("reward_mean", "reward_std") if reward_stats.get(k) is None]
    # the reward model's held-out mean and std normalise its scores, and a critic started from it
    use = []
    if p.reward_source == "model":
        use.append("the rewards")
    if p.critic_init == "reward":
        use.append("the critic's values")
    if use and missing:
        raise ValueError(
            f"ppo: the reward artifact's manifest has no {missing}, needed to normalise {' and '.join(use)}; "
            "re-run the reward stage (launch.py run --only reward)"
        )
    if use and not reward_stats["reward_std"] > 0:
        raise ValueError(
            f"ppo: the reward model's held-out reward_std is {reward_stats['reward_std']}: it scores every "
            "answer alike; train it further (reward.steps) before PPO"
        )
    prompts, stats = _load_prompts(p, cfg.run.seed, inputs["sft"].path)
    from kiln.chat_eval import read_task_prompts

    task = read_task_prompts(p.task_prompts, p.task_eval_size, "ppo.task_prompts") if p.task_prompts else []
    _check_positions(p, Path(inputs["sft"].path), prompts, task)
    ctx.logger.info("ppo: %d prompts (%s), %d held-out task prompts", len(prompts), _counts(stats), len(task))
    mean, std = reward_stats.get("reward_mean", 0.0), reward_stats.get("reward_std", 1.0)
    job = PpoJob.new(
        ctx, cfg, p, sft_dir=Path(inputs["sft"].path), reward_dir=Path(inputs["reward"].path),
        reward_mean=mean, reward_std=std, value_norm=(mean, std) if p.critic_init == "reward" else (0.0, 1.0),
        prompts=prompts, task_prompts=task, heldout=HeldOutWindows.of(cfg, inputs["tokenize"].path),
    )  # fmt: skip
    metrics = run_group(ctx, train_worker, job, out)
    (out / "prompt_stats.json").write_text(json.dumps(stats, indent=2))
    return metrics | {"prompts": stats["kept"], "too_long_prompts": stats["too_long"]}


def _load_prompts(p, seed: int, tok_dir: Path) -> tuple[list[dict], dict]:
    """Every prompt as {"messages", "ids"}: its chat-template token ids end with the opening of the
    assistant's turn. Bad records counted with file:line; prompts over `max_prompt_length` tokens
    counted and skipped."""
    from transformers import AutoTokenizer

    from data_prep.chat_data import load_records, warn_malformed
    from kiln.chat_eval import prompt_ids
    from pipeline.config import PROJECT_ROOT, ConfigError

    try:
        records, stats = load_records(
            p.prompts, "prompt", (Path.cwd(), PROJECT_ROOT), p.max_errors, "ppo.prompts"
        )
    except ValueError as e:
        raise ConfigError(str(e).splitlines(), "ppo") from None
    tok = AutoTokenizer.from_pretrained(tok_dir)
    ids = [prompt_ids(tok, r["prompt"]) for r in records]
    kept = [{"messages": r["prompt"], "ids": x} for r, x in zip(records, ids, strict=True) if len(x) <= p.max_prompt_length]  # fmt: skip
    stats["too_long"] = len(ids) - len(kept)
    stats["kept"] = len(kept)  # read = kept + malformed + too_long
    warn_malformed(log, "ppo.prompts", stats)
    if len(kept) < p.rollout_batch_size:
        raise ValueError(
            f"ppo.prompts: {len(kept)} usable prompts ({_counts(stats)}), fewer than "
            f"ppo.rollout_batch_size={p.rollout_batch_size}; give more prompts or lower the batch"
        )
    return kept, stats


def _check_positions(p, sft_dir: Path, prompts: list[dict], task: list) -> None:
    """A policy with a learned position table cannot sample past it (RoPE and ALiBi extrapolate):
    fail here, naming the keys, rather than with an index error in a worker."""
    conf = json.loads((sft_dir / "config.json").read_text())
    if conf.get("position") != "learned":
        return
    longest = {"ppo.prompts": max(len(x["ids"]) for x in prompts)}
    if task:
        from transformers import AutoTokenizer

        from kiln.chat_eval import prompt_ids

        tok = AutoTokenizer.from_pretrained(sft_dir)
        longest["ppo.task_prompts"] = max(len(prompt_ids(tok, m)) for m in task)
    table = conf["max_position_embeddings"]
    for key, n in longest.items():
        if n + p.max_new_tokens > table:
            raise ValueError(
                f"{key}: a prompt of {n} tokens + ppo.max_new_tokens={p.max_new_tokens} goes past the "
                f"policy's {table} learned positions ({sft_dir.name}/config.json); lower "
                "ppo.max_prompt_length or ppo.max_new_tokens, or give shorter prompts"
            )


def _counts(stats: dict) -> str:
    bad = sum(stats["malformed"].values())
    return f"{stats['read']} read, {stats['kept']} kept, {bad} malformed, {stats['too_long']} too long"


# ---------------------------------------------------------------------------------------------------- worker


def train_worker(job: PpoJob, wctx) -> dict:
    """One data-parallel rank of the PPO loop (module docstring). Returns the final metrics. A collective
    that waits past `ppo.collective_timeout_min` fails the rank, naming it and the collective."""
    from kiln import training as T

    with T.collective_timeouts("ppo", wctx.rank, wctx.world_size, job.section.collective_timeout_min):
        return _train(job, wctx)


def _train(job: PpoJob, wctx) -> dict:
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from kiln import training as T
    from kiln.chat_eval import stop_ids
    from kiln.rl import ppo_math as M
    from kiln.rl.rollout import rollout_seed

    p, seed = job.section, job.seed
    rank, world = wctx.rank, wctx.world_size
    device = T.worker_device(wctx)
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(p.cpus_per_worker)))
    T.init_distributed(device, p.collective_timeout_min)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    torch.manual_seed(seed)

    tok = AutoTokenizer.from_pretrained(job.sft_dir)
    stops = stop_ids(tok)
    local_n = p.rollout_batch_size // world
    mini = p.mini_batch_size // world  # rollouts per rank per optimizer step
    models = build_models(job, world, device, tok.pad_token_id)
    actor, critic = models.actor, models.critic
    # ZeRO-3 forwards gather parameters collectively, so every rank steps the sampler until all are done;
    # with the parameters gathered for the rollout (T.gathered) a forward calls no collective
    synced = p.zero_stage == 3 and world > 1 and not p.gather_for_rollout
    kl_ctl = (
        M.AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon)
        if p.kl_target is not None
        else M.FixedKLController(p.kl_coef)
    )

    # -- resume -------------------------------------------------------------------------------
    it, baseline, last = 0, {}, {}
    ckpt = wctx.checkpoint()
    if ckpt is not None:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        T.check_resumed(state["iteration"], p.iterations, "ppo.iterations", ckpt)
        for name, engine in (("actor", actor), ("critic", critic)):
            engine.load_checkpoint(str(ckpt / name), tag=state["tag"], load_lr_scheduler_states=False)
        kl_ctl.load_state_dict(state["kl_controller"])
        rng = ckpt / f"rng_rank{rank}.pt"  # the global RNGs (rollouts and shuffles have their own)
        if rng.exists():
            T.load_rng(rng)
        it, baseline, before = state["iteration"], state["baseline"], state.get("task_outcomes", "")
        last = state.get("last", {})  # the stage's headline, should no iteration be left
        wctx.resumed_from(it)
    else:
        wctx.started_fresh()
        metrics, before = _evaluate(actor, tok, job, wctx, synced)  # the SFT policy
        baseline = {"step": 0, **metrics}
        wctx.report(dict(baseline))

    total = p.iterations
    while it < total:
        t0 = time.perf_counter()
        floor = p.min_lr / p.lr if p.lr > 0 else 0.0  # the critic decays by the same factor
        frac = T.lr_at(it, lr=1.0, min_lr=floor, warmup=p.warmup_steps, total=total)
        for engine, peak in ((actor, p.lr), (critic, p.critic_lr)):
            for group in engine.optimizer.param_groups:
                group["lr"] = peak * frac

        # 1. rollout: this rank's share of the iteration's prompts, one generator per prompt
        order = T.global_batch(it, p.rollout_batch_size, len(job.prompts), seed)
        mine = range(rank * local_n, (rank + 1) * local_n)  # positions in the global rollout batch
        prompts = [job.prompts[order[j]] for j in mine]
        t_roll = time.perf_counter()
        with T.counted_allgathers() as gathers, T.gathered(actor, enabled=p.gather_for_rollout):
            roll = sample_rollout(actor.module, [q["ids"] for q in prompts], [rollout_seed(seed, it, j) for j in mine],
                                  p, stops, tok.pad_token_id, synced)  # fmt: skip
        t_gen = time.perf_counter() - t0
        rollout = {"rollout_s": time.perf_counter() - t_roll, "rollout_allgathers": gathers.n}

        # 2. experience
        convs = [q["messages"] for q in prompts]
        exp, row = experience(roll, convs, models, tok, job, kl_ctl.value, world)
        # 3. update
        rng = np.random.default_rng([seed, it, rank])
        row |= ppo_update(actor, critic, exp, p, mini, world, rng)
        # 4. controller: mean KL per response over all ranks, responses seen this iteration
        # asked to stop (SIGTERM) on any rank: every rank saves this iteration, then returns
        row["stop"] = float(wctx.stop_requested())
        row = T.all_reduce_mean({k: v for k, v in row.items() if v is not None}, device)
        stopping = row.pop("stop") > 0 and it + 1 < total
        row["kl_coef"] = kl_ctl.value
        kl_ctl.update(row["kl"], p.rollout_batch_size)

        it += 1
        if it == 1:
            baseline["score"] = row["score"]  # the SFT policy's rollouts, scored
        dt = time.perf_counter() - t0
        row.update(step=it, lr=p.lr * frac, iteration_s=dt, gen_share=t_gen / dt, **rollout)
        row["prompt_crc"] = zlib.crc32(order.tobytes())  # which prompts this iteration sampled
        if it % p.eval_every == 0 or it == total:
            metrics, after = _evaluate(actor, tok, job, wctx, synced)
            row.update(metrics, **_flips(before, after))
        wctx.progress(it, total)
        if it % p.checkpoint_every == 0 or it == total or stopping:
            state = {"iteration": it, "kl_controller": kl_ctl.state_dict(), "baseline": baseline,
                     "task_outcomes": before, "wandb_run_id": job.wandb_run_id}  # fmt: skip
            _save(actor, critic, wctx, row, state, rank)
        else:
            wctx.report(row)
        last = row
        if stopping:
            return {STOPPED: it}

    T.export_engine(actor, job.export_dir, job.sft_dir, rank)
    if rank == 0 and (job.sft_dir / "generation_config.json").exists():
        shutil.copy2(job.sft_dir / "generation_config.json", job.export_dir)
    keep = ("score", "score_norm", "reward", "kl", "kl_coef", "entropy", "response_length", "ended_frac", "gen_share",
            "task_accuracy", "task_accuracy_sampled", "task_sampled_gained", "task_sampled_lost")  # fmt: skip
    out = {k: last[k] for k in keep if k in last} | {"iterations": it}
    out |= {k: v for k, v in last.items() if k.startswith("heldout_loss")}
    for k in ("task_accuracy", "task_accuracy_sampled", "score"):  # before PPO (the SFT policy)
        if k in baseline:
            out[f"{k}_sft"] = baseline[k]
    out |= {
        k.replace("heldout_loss", "heldout_loss_sft", 1): v
        for k, v in baseline.items()
        if k.startswith("heldout_loss")
    }
    return out


def build_models(job: PpoJob, world: int, device, pad_id: int) -> Models:
    """A rank's four models: the actor and the critic as DeepSpeed training engines, the reference and
    the reward model (None with `reward_source: task`) frozen (kiln.training.frozen). Under ZeRO-3
    each is built partitioned (kiln/sharded.py): no rank ever holds a whole one, and the gathered
    weights are those of the plain load (tests/test_ppo.py). The actor and the critic are built under
    their engines' DeepSpeed config; the frozen ones under it too, with `ppo.offload_frozen` plus
    DeepSpeed's parameter offload, so their partitions are made in CPU memory and stay there."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    import kiln.model  # noqa: F401  (registers the Kiln classes with the Auto classes)
    from kiln import sharded as S
    from kiln import training as T

    p = job.section
    accum = p.mini_batch_size // world // p.micro_batch_size  # micro-batches per optimizer step
    load = dict(dtype=torch.float32, dropout=0.0)  # no dropout in PPO: old and new logprobs, one function
    trained_config = T.engine_config(p, accum, world)
    frozen_config = T.engine_config(p, accum, world, offload_params=p.offload_frozen)
    policy = S.from_pretrained(AutoModelForCausalLM, job.sft_dir, trained_config, **load)
    critic_dir = job.reward_dir if p.critic_init == "reward" else job.sft_dir
    critic = S.from_pretrained(
        AutoModelForSequenceClassification, critic_dir, trained_config, num_labels=1, **load
    )
    critic.config.pad_token_id = pad_id
    ref = S.from_pretrained(AutoModelForCausalLM, job.sft_dir, frozen_config, **load)
    reward = None
    if p.reward_source == "model":
        reward = S.from_pretrained(AutoModelForSequenceClassification, job.reward_dir, frozen_config, **load)
    for model in (policy, critic):
        T.trainable(model, p.activation_checkpointing)
    return Models(
        actor=T.engine(policy, p, p.lr, accum, world),
        critic=T.engine(critic, p, p.critic_lr, accum, world),
        ref=T.frozen(ref, p, device, offload=p.offload_frozen),
        reward=reward and T.frozen(reward, p, device, offload=p.offload_frozen),
    )


def sample_rollout(model, prompts, seeds, p, stops, pad_id, synced):
    from kiln.rl.rollout import sample

    return sample(model, prompts, seeds=seeds, max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                  top_p=p.top_p, stop_ids=stops, pad_id=pad_id, synced=synced)  # fmt: skip


def experience(
    roll, prompts, models: Models, tok, job: PpoJob, kl_coef: float, world: int
) -> tuple[Experience, dict]:
    """Everything the update needs from one rollout batch, and the rollout's metrics.
    Forward passes in micro-batches, model by model (under ZeRO-3 each gathered once for its passes:
    `ppo.gather_for_rollout`); rewards, GAE and whitening over the whole batch."""
    import torch

    from kiln import training as T
    from kiln.chat_eval import decode_responses, score_conversations, stop_ids
    from kiln.rl import ppo_math as M

    p = job.section
    P, micro, stops = roll.prompt_len, p.micro_batch_size, stop_ids(tok)
    rmask = roll.response_mask.float()  # (B, R)
    parts = [
        (roll.tokens[i : i + micro], roll.mask[i : i + micro]) for i in range(0, len(roll.tokens), micro)
    ]

    def passes(model, fn, *args):  # (B, R): `fn` over the micro-batches, the model gathered once
        with torch.no_grad(), T.gathered(model, enabled=p.gather_for_rollout):
            return torch.cat([fn(model, x, m, P, *args) for x, m in parts])

    old_logp = passes(models.actor, _logprobs, p.temperature)
    ref_logp = passes(models.ref, _logprobs, p.temperature)
    values = passes(models.critic, _values, job.value_norm)

    answers = decode_responses(tok, roll, stops)
    if p.reward_source == "task":  # the checking program: 1 right, 0 wrong (used as it is)
        from data_prep.task import check, prompt_text

        raw = torch.tensor([float(check(prompt_text(q), a)) for q, a in zip(prompts, answers, strict=True)])
        score = raw.to(values.device)
    else:
        convs = [q + [{"role": "assistant", "content": a}] for q, a in zip(prompts, answers, strict=True)]
        with T.gathered(models.reward, enabled=p.gather_for_rollout):
            found = score_conversations(models.reward, tok, convs, batch_size=micro)
        raw = torch.tensor(found, device=values.device)  # (B,)
        score = (raw - job.reward_mean) / job.reward_std
    score = M.eos_penalty(score, roll.ended, p.missing_eos_penalty)

    kl = M.kl_estimate(old_logp, ref_logp, p.kl_estimator)  # (B, R) what the rewards are charged
    rewards = M.penalized_rewards(score, kl, rmask, kl_coef)
    advantages, returns = M.gae(rewards, values, rmask, p.gamma, p.lam)
    if p.whiten_advantages:
        advantages = M.masked_whiten(advantages, rmask, reduce=_sum_over_ranks if world > 1 else None)
    exp = Experience(
        tokens=roll.tokens, mask=roll.mask, P=P, rmask=rmask, old_logp=old_logp, old_values=values,
        advantages=advantages, returns=returns, value_norm=job.value_norm,
    )  # fmt: skip
    per_seq = lambda x: (x * rmask).sum(1).mean()  # noqa: E731  mean over responses of a per-token sum
    row = {
        "rollout_task_accuracy": _checked(prompts, answers) if job.task_prompts else None,
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


def _checked(prompts: list[list[dict]], answers: list[str]) -> float:
    """Share of sampled answers the shipped task's program accepts (a measure training never sees)."""
    return sum(map(_is_right, prompts, answers)) / len(answers)


def _is_right(prompt: list[dict], answer: str) -> bool:
    from data_prep.task import check, prompt_text

    return check(prompt_text(prompt), answer)


def _response_logits(model, x, m, P, temperature: float):
    """Logits predicting the response tokens x[:, P:], (B, R, V), at the sampling temperature: the
    logprobs are then those of the distribution the rollouts were drawn from. The LM head runs on
    the response's positions only, not the prompt's."""
    from kiln.rl.rollout import response_logits

    logits = response_logits(model, x, m, P)
    return logits / temperature if temperature > 0 else logits


def _logprobs(model, x, m, P, temperature: float):
    from kiln.rl.ppo_math import logprobs_from_logits

    return logprobs_from_logits(_response_logits(model, x, m, P, temperature), x[:, P:])


def _values(critic, x, m, P, norm: tuple[float, float]):
    """Per-token values of the response, (B, R): the head's output at the position before each token,
    as (output - shift) / scale. A critic started from the reward model has the reward's normalisation
    (module docstring), so it starts out predicting normalised scores; a fresh head uses (0, 1)."""
    shift, scale = norm
    out = critic(input_ids=x, attention_mask=m, per_token=True).logits[:, P - 1 : -1, 0].float()
    return (out - shift) / scale


def _sum_over_ranks(t):
    """`ppo_math.Reduce` on the data-parallel group: the tensor summed over every rank."""
    import torch.distributed as dist

    dist.all_reduce(t)
    return t


def ppo_update(actor, critic, exp: Experience, p, mini: int, world: int, rng) -> dict:
    """`ppo_epochs` passes over this rank's rollouts in mini-batches of `mini` (its share of
    `mini_batch_size`); each mini-batch is one optimizer step of the actor and of the critic."""
    import torch
    import torch.distributed as dist

    from kiln.rl import ppo_math as M

    n, micro, P = exp.tokens.shape[0], p.micro_batch_size, exp.P
    sums: dict[str, float] = {}
    steps = p.ppo_epochs * (n // mini)
    for _ in range(p.ppo_epochs):
        order = torch.from_numpy(rng.permutation(n))
        for k in range(0, n, mini):
            batch = order[k : k + mini]
            tokens = exp.rmask[batch].sum().detach()
            if world > 1:  # the token mean runs over the whole mini-batch, every rank's share
                dist.all_reduce(tokens)
            for a in range(0, mini, micro):
                idx = batch[a : a + micro]
                x, m, rmask = exp.tokens[idx], exp.mask[idx], exp.rmask[idx]
                logits = _response_logits(actor, x, m, P, p.temperature)  # (b, R, V)
                logp = M.logprobs_from_logits(logits, x[:, P:])
                pg, stats = M.policy_loss(logp, exp.old_logp[idx], exp.advantages[idx], rmask, p.clip_eps, tokens)  # fmt: skip
                entropy = M.entropy_from_logits(logits.detach() if not p.entropy_coef else logits, rmask)
                loss = pg - p.entropy_coef * entropy * rmask.sum() / tokens
                # DeepSpeed averages gradients over ranks; the token mean already sums them
                actor.backward(loss * world, scale_wrt_gas=False)
                actor.step()

                values = _values(critic, x, m, P, exp.value_norm)
                vf, vstats = M.value_loss(values, exp.old_values[idx], exp.returns[idx], rmask, p.value_clip_eps, tokens)  # fmt: skip
                critic.backward(vf * world, scale_wrt_gas=False)
                critic.step()

                # Every statistic as a token mean over the mini-batch (like the losses): a micro-batch
                # counts by its share of the mini-batch's tokens; times `world` before the mean over
                # ranks, the shares sum to the mini-batch's value whatever the split into workers.
                share = float(rmask.sum() / tokens) * world / steps
                for name, v in {"entropy": entropy, **stats, **vstats}.items():
                    sums[name] = sums.get(name, 0.0) + float(v) * share
                sums["policy_loss"] = sums.get("policy_loss", 0.0) + float(pg.detach()) * world / steps
                sums["value_loss"] = sums.get("value_loss", 0.0) + float(vf.detach()) * world / steps
    return sums


def _evaluate(actor, tok, job: PpoJob, wctx, synced) -> tuple[dict, str]:
    """The shipped task's held-out accuracy, judged by its program (every rank joins; same result):
    `task_accuracy` of the greedy answers, and `task_accuracy_sampled` over `task_samples` answers
    per prompt sampled as the rollouts are (temperature, top-p). The samples' seeds are fixed per
    prompt and sample, so every evaluation draws the same noise and a change measures the policy.
    Also returns each sample's outcome ("1" right, "0" wrong, in (prompt, sample) order) for `_flips`.
    Under ZeRO-3 the policy is gathered once for all of it (`ppo.gather_for_rollout`)."""
    from kiln import training as T

    p = job.section
    with T.gathered(actor, enabled=p.gather_for_rollout):
        scored = {}
        if job.heldout is not None:  # the policy's loss on pretraining's held-out windows, by source
            device = next(actor.module.parameters()).device
            scored = T.score_heldout(lambda x: actor.module(input_ids=x).logits, job.heldout, wctx.rank,
                                     wctx.world_size, p.micro_batch_size, device, "heldout_loss")  # fmt: skip
        if not job.task_prompts:
            return scored, ""
        found, outcomes = _judge(actor, tok, job, wctx, synced)
        return scored | found, outcomes


def _judge(actor, tok, job: PpoJob, wctx, synced) -> tuple[dict, str]:
    """`_evaluate`'s measures, its policy as it is (gathered or not)."""
    from kiln.chat_eval import decode_responses, gather, prompt_ids, rank_share, stop_ids, task_accuracy
    from kiln.rl.rollout import rollout_seed, sample

    p, prompts = job.section, job.task_prompts
    rank, world = wctx.rank, wctx.world_size
    found = task_accuracy(actor.module, tok, prompts, p.max_new_tokens, rank, world, synced=synced)
    if rank == 0:
        log.info("ppo: task accuracy %.3f; e.g. %s", found["task_accuracy"], found["task_samples"])
    mine, n_mine = rank_share(list(range(len(prompts))), rank, world)
    real = n_mine * p.task_samples  # samples past this repeat a prompt: only for equal batch counts
    samples = [(i, j) for i in mine for j in range(p.task_samples)]
    ids_of = {i: prompt_ids(tok, prompts[i]) for i in mine}  # each prompt tokenised once, not per sample
    stops, outcomes = stop_ids(tok), {}
    for b in range(0, len(samples), 128):
        batch = samples[b : b + 128]
        ids = [ids_of[i] for i, _ in batch]
        seeds = [rollout_seed(job.seed, -1 - j, i) for i, j in batch]  # iteration -1 - j: never a rollout's
        roll = sample(actor.module, ids, seeds=seeds, max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                      top_p=p.top_p, stop_ids=stops, pad_id=tok.pad_token_id, synced=synced)  # fmt: skip
        answers = decode_responses(tok, roll, stops)
        for k, (key, a) in enumerate(zip(batch, answers, strict=True)):
            if b + k < real:
                outcomes[key] = _is_right(prompts[key[0]], a)
    merged = {key: ok for part in gather(outcomes, world) for key, ok in part.items()}
    bits = "".join("1" if merged[s] else "0" for s in sorted(merged))
    metrics = {
        "task_accuracy": found["task_accuracy"],
        "task_accuracy_sampled": bits.count("1") / max(1, len(bits)),
    }
    return metrics, bits


def _flips(before: str, after: str) -> dict:
    """The paired comparison of two evaluations' sampled answers (same prompts, same seeds): how many
    went wrong -> right (`task_sampled_gained`) and right -> wrong (`task_sampled_lost`). Under no change
    in the policy's accuracy the difference is ~N(0, gained + lost) (McNemar's test), which makes
    `(gained - lost) / sqrt(gained + lost)` the z-score of the change."""
    if not before or len(before) != len(after):
        return {}
    gained = sum(a == "0" and b == "1" for a, b in zip(before, after, strict=True))
    lost = sum(a == "1" and b == "0" for a, b in zip(before, after, strict=True))
    return {"task_sampled_gained": gained, "task_sampled_lost": lost}


def _save(actor, critic, wctx, row, state, rank) -> None:
    """Both engines (with their optimizers), the loop state and this rank's RNG into a fresh folder,
    reported to Ray Train (which keeps its copy)."""
    from kiln import training as T

    folder = Path(tempfile.mkdtemp(prefix=f"kiln-ppo-{state['iteration']}-"))
    tag = f"iter{state['iteration']:06d}"
    actor.save_checkpoint(str(folder / "actor"), tag=tag)
    critic.save_checkpoint(str(folder / "critic"), tag=tag)
    T.save_rng(folder / f"rng_rank{rank}.pt")
    if rank == 0:
        T.write_json(folder / "trainer_state.json", state | {"tag": tag, "last": row})
    wctx.report(row, checkpoint_dir=folder)  # the context stores it, then deletes the folder
