"""What the RL stages share (stages/ppo.py, stages/grpo.py): their prompts, models, rollouts, update
batches, held-out evaluation, checkpoints, and the iteration loop that runs them on every rank.

    class PpoLoop(RlLoop):                      # a stage defines what is its own ...
        stage = "ppo"
        def build(self): ...                    # its models (`build_models`)
        def trained(self): ...                  # the engines it trains, with their peak learning rates
        def learn(self, it, prompts, roll, rng): ...   # experience and update of one rollout batch
    metrics = PpoLoop(job, wctx).run()          # ... and the loop does the rest

One iteration of `RlLoop.run`, on every rank of a Ray Train group:

    1. schedule    every trained engine's learning rate, warm-up then cosine (kiln.training.lr_at)
    2. rollout     `rollout_batch_size` prompts in the order fixed by the seed, each rank its share,
                   each prompt sampled `samples_per_prompt` times with the KV cache
                   (kiln/rl/rollout.py); response g of the prompt at position j of the batch draws from
                   the stream `rollout_seed(seed, iteration, j * samples_per_prompt + g)`, so a response
                   depends on its prompt, its seed and the weights only
    3. learn       the stage's: experience passes (`micro_passes`, `score_answers`) and its update
                   (`update_batches`: epochs of mini-batches of micro-batches, one optimizer step per
                   mini-batch), each rank its own mini-batch order from (seed, iteration, rank)
    4. metrics     the row averaged over the ranks (one collective, which also carries whether any
                   rank was asked to stop: SIGTERM), the stage's `after_reduce` (ppo's KL controller)
    5. evaluation  before the first iteration, every `eval_every` and at the end (kiln/rl/evaluation.py):
                   pretraining's held-out windows scored by source, and the shipped task's held-out
                   prompts judged by its checking program, greedy and sampled, each sampled answer
                   paired with the first evaluation's, with the proxy and the KL to SFT beside it;
                   with `select: best_gold` the best iteration on the selection half is kept
    6. checkpoint  every `checkpoint_every`, at the end, and on SIGTERM (`save`): the trained engines
                   with their optimizers, the loop's state, each rank's global RNGs (and the kept
                   best policy)

Resume restores all of it; prompts, samples and mini-batch orders are functions of (seed, iteration),
so a resumed run repeats an uninterrupted one. Under ZeRO-3 with `gather_for_rollout` each model is
gathered whole once for its rollout or experience passes (kiln.training.gathered): a gathered forward
calls no collective, so the ranks sample without stepping together (`synced` otherwise).
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
from typing import TYPE_CHECKING, Any, ClassVar

from kiln.training import HeldOutWindows
from kiln.workers import WorkerJob
from pipeline.preemption import STOPPED

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True, kw_only=True)
class RlJob(WorkerJob):
    """What each worker of an RL stage receives (a stage's job adds its own fields)."""

    sft_dir: Path
    """The SFT model: the policy's start, the reference, the tokenizer."""
    reward_dir: Path | None
    """The reward model (None where nothing reads it: `reward_source: task`, no critic from it)."""
    reward_mean: float
    reward_std: float
    """The reward model's held-out score statistics: a score is used as (score - mean) / std."""
    prompts: list[dict]
    """Training prompts as {"messages", "ids"} (`load_prompts`)."""
    task_prompts: list
    """Held-out prompts of the shipped task (conversations), for the task accuracy."""
    heldout: HeldOutWindows | None = None
    """Pretraining's held-out windows, scored by source at each evaluation: what RL cost each source."""


@dataclass
class Models:
    """The models of an RL rank: the policy it trains (a DeepSpeed engine), ppo's value model (an
    engine; None in grpo), the frozen reference (the SFT policy) the KL is measured against, and the
    reward model (None with `reward_source: task`)."""

    actor: object
    critic: object | None
    ref: object
    reward: object | None


FINAL_SFT = ("score",)
"""The measures of the SFT policy's first rollouts a manifest repeats as `<key>_sft` (its gold measures:
kiln/rl/evaluation.py `final_measures`)."""


# ---------------------------------------------------------------------------------------------------- driver


def reward_statistics(stage: str, metrics: dict, uses: list[str]) -> tuple[float, float]:
    """The reward model's held-out (mean, std) from its manifest's `metrics`, checked when something
    `uses` them (names of what they normalise, for the message); (0, 1) when nothing does."""
    if not uses:
        return 0.0, 1.0
    missing = [k for k in ("reward_mean", "reward_std") if metrics.get(k) is None]
    if missing:
        raise ValueError(
            f"{stage}: the reward artifact's manifest has no {missing}, needed to normalise {' and '.join(uses)}; "
            "re-run the reward stage (launch.py run --only reward)"
        )
    if not metrics["reward_std"] > 0:
        raise ValueError(
            f"{stage}: the reward model's held-out reward_std is {metrics['reward_std']}: it scores every "
            f"answer alike; train it further (reward.steps) before {stage.upper()}"
        )
    return metrics["reward_mean"], metrics["reward_std"]


REWARD_GATE = (  # (measure in the reward manifest, the key bounding it, is it a lower bound, compared as |x|)
    ("pairwise_accuracy", "reward_min_accuracy", True, False),
    ("calibration_ece", "reward_max_ece", False, False),
    ("length_correlation", "reward_max_length_correlation", False, True),
    ("answer_auc", "reward_min_answer_auc", True, False),
)


def reward_gate(p, stage: str, metrics: dict, logger) -> list[str]:
    """Check the reward model's held-out measures (its manifest's `metrics`) against section `p`'s
    thresholds (`reward_gate`, `reward_min_accuracy`, ...); returns the failures, each naming the
    measure and the key to relax. `warn` logs them, `refuse` raises with them; a measure the artifact
    lacks (a reward stage older than it) is said, never refused on."""
    if p.reward_gate == "off" or p.reward_source != "model":
        return []
    failed = []
    for measure, key, lower, absolute in REWARD_GATE:
        value, bound = metrics.get(measure), getattr(p, key)
        if value is None:
            logger.warning(
                "%s: the reward artifact has no %s (an older reward stage, or not measured); not checked",
                stage,
                measure,
            )
            continue
        seen = abs(value) if absolute else value
        if (seen < bound) if lower else (seen > bound):
            shown = f"|{measure}| = {seen:.3f}" if absolute else f"{measure} = {value:.3f}"
            failed.append(f"{shown} {'below' if lower else 'above'} {stage}.{key} = {bound}")
    if failed and p.reward_gate == "refuse":
        raise ValueError(
            f"{stage}: the reward model fails its quality gate: {'; '.join(failed)}. Train a better reward "
            f"model, relax the named key, or set {stage}.reward_gate=warn to run anyway"
        )
    for line in failed:
        logger.warning(
            "%s: reward model quality: %s (%s.reward_gate=refuse would stop here)", stage, line, stage
        )
    return failed


def read_prompts(p, stage: str, sft_dir: Path, logger) -> tuple[list[dict], dict, list]:
    """(training prompts, their counts for prompt_stats.json, held-out task prompts) of section `p`,
    checked against the policy's positions (`check_positions`) and logged."""
    from kiln.chat_eval import read_task_prompts

    prompts, stats = load_prompts(p, stage, sft_dir)
    task = (
        read_task_prompts(p.task_prompts, p.task_eval_size, f"{stage}.task_prompts") if p.task_prompts else []
    )
    check_positions(p, stage, sft_dir, prompts, task)
    logger.info(
        "%s: %d prompts (%s), %d held-out task prompts", stage, len(prompts), counts(stats), len(task)
    )
    return prompts, stats, task


def load_prompts(p, stage: str, tok_dir: Path) -> tuple[list[dict], dict]:
    """Every prompt as {"messages", "ids"}: its chat-template token ids end with the opening of the
    assistant's turn. Bad records counted with file:line; prompts over `max_prompt_length` tokens
    counted and skipped."""
    from transformers import AutoTokenizer

    from data_prep.chat_data import load_records, warn_malformed
    from kiln.chat_eval import prompt_ids
    from pipeline.config import PROJECT_ROOT, ConfigError

    key = f"{stage}.prompts"
    try:
        records, stats = load_records(p.prompts, "prompt", (Path.cwd(), PROJECT_ROOT), p.max_errors, key)
    except ValueError as e:
        raise ConfigError(str(e).splitlines(), stage) from None
    tok = AutoTokenizer.from_pretrained(tok_dir)
    ids = [prompt_ids(tok, r["prompt"]) for r in records]
    kept = [{"messages": r["prompt"], "ids": x} for r, x in zip(records, ids, strict=True) if len(x) <= p.max_prompt_length]  # fmt: skip
    stats["too_long"] = len(ids) - len(kept)
    stats["kept"] = len(kept)  # read = kept + malformed + too_long
    warn_malformed(logging.getLogger(f"kiln.{stage}"), key, stats)
    if len(kept) < p.rollout_batch_size:
        raise ValueError(
            f"{key}: {len(kept)} usable prompts ({counts(stats)}), fewer than "
            f"{stage}.rollout_batch_size={p.rollout_batch_size}; give more prompts or lower the batch"
        )
    return kept, stats


def check_positions(p, stage: str, sft_dir: Path, prompts: list[dict], task: list) -> None:
    """A policy with a learned position table cannot sample past it (RoPE and ALiBi extrapolate):
    fail here, naming the keys, rather than with an index error in a worker."""
    conf = json.loads((sft_dir / "config.json").read_text())
    if conf.get("position") != "learned":
        return
    longest = {f"{stage}.prompts": max(len(x["ids"]) for x in prompts)}
    if task:
        from transformers import AutoTokenizer

        from kiln.chat_eval import prompt_ids

        tok = AutoTokenizer.from_pretrained(sft_dir)
        longest[f"{stage}.task_prompts"] = max(len(prompt_ids(tok, m)) for m in task)
    table = conf["max_position_embeddings"]
    for key, n in longest.items():
        if n + p.max_new_tokens > table:
            raise ValueError(
                f"{key}: a prompt of {n} tokens + {stage}.max_new_tokens={p.max_new_tokens} goes past the "
                f"policy's {table} learned positions ({sft_dir.name}/config.json); lower "
                f"{stage}.max_prompt_length or {stage}.max_new_tokens, or give shorter prompts"
            )


def counts(stats: dict) -> str:
    bad = sum(stats["malformed"].values())
    return f"{stats['read']} read, {stats['kept']} kept, {bad} malformed, {stats['too_long']} too long"


# ---------------------------------------------------------------------------------------------------- models


def build_models(job: RlJob, world: int, device, pad_id: int, critic_dir: Path | None = None) -> Models:
    """A rank's models: the actor (and, from `critic_dir`, ppo's critic at `critic_lr`) as DeepSpeed
    training engines, the reference and the reward model (None with `reward_source: task`) frozen
    (kiln.training.frozen). Under ZeRO-3 each is built partitioned (kiln/sharded.py): no rank ever
    holds a whole one, and the gathered weights are those of the plain load (tests/test_ppo.py). The
    trained models are built under their engines' DeepSpeed config; the frozen ones under it too, with
    `offload_frozen` plus DeepSpeed's parameter offload, so their partitions are made in CPU memory and
    stay there. Built in this order: policy, critic, reference, reward model (a fresh value head is
    the one random draw)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    import kiln.model  # noqa: F401  (registers the Kiln classes with the Auto classes)
    from kiln import sharded as S
    from kiln import training as T

    p = job.section
    accum = p.mini_batch_size // world // p.micro_batch_size  # micro-batches per optimizer step
    load = dict(dtype=torch.float32, dropout=0.0)  # no dropout: old and new logprobs, one function
    trained_config = T.engine_config(p, accum, world)
    frozen_config = T.engine_config(p, accum, world, offload_params=p.offload_frozen)
    policy = S.from_pretrained(AutoModelForCausalLM, job.sft_dir, trained_config, **load)
    critic = None
    if critic_dir is not None:
        critic = S.from_pretrained(
            AutoModelForSequenceClassification, critic_dir, trained_config, num_labels=1, **load
        )
        critic.config.pad_token_id = pad_id
    ref = S.from_pretrained(AutoModelForCausalLM, job.sft_dir, frozen_config, **load)
    reward = None
    if p.reward_source == "model":
        reward = S.from_pretrained(AutoModelForSequenceClassification, job.reward_dir, frozen_config, **load)
    for model in (policy, critic):
        if model is not None:
            T.trainable(model, p.activation_checkpointing)
    return Models(
        actor=T.engine(policy, p, p.lr, accum, world),
        critic=None if critic is None else T.engine(critic, p, p.critic_lr, accum, world),
        ref=T.frozen(ref, p, device, offload=p.offload_frozen),
        reward=None if reward is None else T.frozen(reward, p, device, offload=p.offload_frozen),
    )


# ---------------------------------------------------------------------------------------------------- rollout


def sample_rollout(model, prompts, seeds, p, stops, pad_id, synced):
    """One response per prompt id list, with section `p`'s sampling settings (kiln.rl.rollout.sample)."""
    from kiln.rl.rollout import sample

    return sample(model, prompts, seeds=seeds, max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                  top_p=p.top_p, stop_ids=stops, pad_id=pad_id, synced=synced)  # fmt: skip


def micro_passes(model, roll, micro: int, gather: bool, fn, *args) -> Tensor:
    """(B, R): `fn(model, tokens, mask, P, *args)` over the rollout's micro-batches of `micro` rows,
    without gradients, the model gathered once for all of them under ZeRO-3 when `gather`."""
    import torch

    from kiln import training as T

    P = roll.prompt_len
    parts = [
        (roll.tokens[i : i + micro], roll.mask[i : i + micro]) for i in range(0, len(roll.tokens), micro)
    ]
    with torch.no_grad(), T.gathered(model, enabled=gather):
        return torch.cat([fn(model, x, m, P, *args) for x, m in parts])


def sum_over_ranks(t):
    """`ppo_math.Reduce` on the data-parallel group: the tensor summed over every rank."""
    import torch.distributed as dist

    dist.all_reduce(t)
    return t


# ---------------------------------------------------------------------------------------------------- update


def update_batches(rmask: Tensor, epochs: int, mini: int, micro: int, world: int, rng):
    """The update's micro-batches of this rank's rollouts: `epochs` passes, each in a fresh order drawn
    from `rng`, cut into mini-batches of `mini` rows (this rank's share of one optimizer step), cut
    into micro-batches of `micro`. Yields (rows, tokens) per micro-batch: its row indices, and the
    mini-batch's response tokens over every rank (one all-reduce per mini-batch), so that a token mean
    over the whole mini-batch is the same whatever the split into workers and micro-batches."""
    import torch
    import torch.distributed as dist

    n = rmask.shape[0]
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(n))
        for k in range(0, n, mini):
            batch = order[k : k + mini]
            tokens = rmask[batch].sum().detach()
            if world > 1:  # the token mean runs over the whole mini-batch, every rank's share
                dist.all_reduce(tokens)
            for a in range(0, mini, micro):
                yield batch[a : a + micro], tokens


class UpdateMeans:
    """The update's statistics, each the mean over its `steps` optimizer steps of the mini-batch's
    value: a token mean (`tokens`) adds each micro-batch by its share of the mini-batch's tokens, a
    loss (already a micro-batch's part of its mini-batch's) as it is. Times `world`, before the
    metrics are averaged over the ranks, the shares sum to the mini-batch's value whatever the split."""

    def __init__(self, world: int, steps: int):
        self.world, self.steps = world, steps
        self.values: dict[str, float] = {}

    def tokens(self, stats: dict, rmask: Tensor, tokens: Tensor) -> None:
        share = float(rmask.sum() / tokens) * self.world / self.steps
        for name, v in stats.items():
            self.values[name] = self.values.get(name, 0.0) + float(v) * share

    def loss(self, name: str, value: Tensor) -> None:
        self.values[name] = self.values.get(name, 0.0) + float(value.detach()) * self.world / self.steps


# ---------------------------------------------------------------------------------------------------- checkpoints


def save(
    engines: dict, wctx, row: dict, state: dict, rank: int, stage: str, best: Path | None = None
) -> None:
    """The trained engines (name -> engine, with their optimizers), the loop state and this rank's RNG
    into a fresh folder, reported to Ray Train (which keeps its copy); with `best` (rank 0's exported
    policy of the best evaluated iteration, `select: best_gold`) a copy of it as `best_policy/`."""
    from kiln import training as T

    folder = Path(tempfile.mkdtemp(prefix=f"kiln-{stage}-{state['iteration']}-"))
    tag = f"iter{state['iteration']:06d}"
    for name, engine in engines.items():
        engine.save_checkpoint(str(folder / name), tag=tag)
    T.save_rng(folder / f"rng_rank{rank}.pt")
    if rank == 0:
        T.write_json(folder / "trainer_state.json", state | {"tag": tag, "last": row})
        if best is not None:
            shutil.copytree(best, folder / BEST_POLICY)
    wctx.report(row, checkpoint_dir=folder)  # the context stores it, then deletes the folder


BEST_POLICY = "best_policy"
"""A checkpoint's copy of the best evaluated policy (`select: best_gold`): one model's weights, so a
stage keeps at most one such copy per checkpoint it keeps (`checkpoints_to_keep`)."""


# ---------------------------------------------------------------------------------------------------- the loop


class RlLoop:
    """The iteration loop of an RL stage on one data-parallel rank (module docstring). A stage
    subclasses it: `stage`, `KEEP`, `build`, `trained`, `learn`, and where it has loop state of its
    own (ppo's KL controller) `after_reduce`, `state_dict` and `load_state_dict`."""

    stage: ClassVar[str]
    """The stage's name: its config section, in keys of messages, logs and checkpoint folders."""
    KEEP: ClassVar[tuple[str, ...]]
    """The last iteration's metrics its manifest keeps (beside the held-out losses and the SFT policy's)."""
    samples_per_prompt: int = 1
    """Responses sampled per prompt in a rollout (grpo's group size)."""

    def __init__(self, job: RlJob, wctx):
        import torch
        from transformers import AutoTokenizer

        from kiln import training as T
        from kiln.chat_eval import stop_ids

        p = self.p = job.section
        self.job, self.wctx, self.seed = job, wctx, job.seed
        self.rank, self.world = wctx.rank, wctx.world_size
        self.device = T.worker_device(wctx)
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(p.cpus_per_worker)))
        T.init_distributed(self.device, p.collective_timeout_min)
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        torch.manual_seed(self.seed)

        self.tok = AutoTokenizer.from_pretrained(job.sft_dir)
        self.stops = stop_ids(self.tok)
        self.local_n = p.rollout_batch_size // self.world  # this rank's prompts per rollout
        self.mini = p.mini_batch_size // self.world  # responses per rank per optimizer step
        self.models = self.build()
        # the held-out evaluations (kiln/rl/evaluation.py): the first (the SFT policy), the best on the selection
        # half with `select: best_gold` (its policy exported to rank 0's `best_dir`), the last
        self.select = p.select == "best_gold"
        self.first = self.best = self.last_ev = None
        self.overoptimized: list[int] = []
        self.best_dir = Path(tempfile.mkdtemp(prefix=f"kiln-{self.stage}-best-")) if self.select else None
        # ZeRO-3 forwards gather parameters collectively, so every rank steps the sampler until all are done;
        # with the parameters gathered for the rollout (T.gathered) a forward calls no collective
        self.synced = p.zero_stage == 3 and self.world > 1 and not p.gather_for_rollout

    # -- what a stage defines ---------------------------------------------------------------------

    def build(self) -> Models:
        raise NotImplementedError

    def trained(self) -> dict[str, tuple[Any, float]]:
        """name -> (engine, peak learning rate) of every model it trains, saved under that name."""
        raise NotImplementedError

    def learn(self, it: int, prompts: list[dict], roll, rng) -> dict:
        """Experience and update of this rank's share of rollout batch `it` (`prompts` as in the job,
        `roll` their responses, `samples_per_prompt` each, prompt by prompt; `rng` this rank's
        mini-batch order). Returns the iteration's metrics on this rank (None values left out)."""
        raise NotImplementedError

    def after_reduce(self, row: dict) -> None:
        """Once the row is averaged over the ranks, before it is logged."""

    def state_dict(self) -> dict:
        """The stage's own loop state, saved in each checkpoint's trainer_state.json."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> dict:
        """Train from the start or the last checkpoint; returns the final metrics, or {STOPPED: step}
        when asked to stop (that step's checkpoint saved)."""
        try:
            return self._run()
        finally:
            if self.best_dir is not None:
                shutil.rmtree(self.best_dir, ignore_errors=True)

    def _run(self) -> dict:
        import numpy as np

        from kiln import training as T
        from kiln.rl.rollout import rollout_seed

        p, job, wctx, seed, rank = self.p, self.job, self.wctx, self.seed, self.rank
        actor, tok, G = self.models.actor, self.tok, self.samples_per_prompt
        it, baseline, last = self._start()

        total = p.iterations
        while it < total:
            t0 = time.perf_counter()
            floor = p.min_lr / p.lr if p.lr > 0 else 0.0  # every engine decays by the same factor
            frac = T.lr_at(it, lr=1.0, min_lr=floor, warmup=p.warmup_steps, total=total)
            for engine, peak in self.trained().values():
                for group in engine.optimizer.param_groups:
                    group["lr"] = peak * frac

            # rollout: this rank's share of the iteration's prompts, one generator per response
            order = T.global_batch(it, p.rollout_batch_size, len(job.prompts), seed)
            # positions in the global rollout batch
            mine = range(rank * self.local_n, (rank + 1) * self.local_n)
            prompts = [job.prompts[order[j]] for j in mine]
            ids = [q["ids"] for q in prompts for _ in range(G)]
            seeds = [rollout_seed(seed, it, j * G + g) for j in mine for g in range(G)]
            t_roll = time.perf_counter()
            with T.counted_allgathers() as gathers, T.gathered(actor, enabled=p.gather_for_rollout):
                roll = sample_rollout(actor.module, ids, seeds, p, self.stops, tok.pad_token_id, self.synced)
            t_gen = time.perf_counter() - t0
            rollout = {"rollout_s": time.perf_counter() - t_roll, "rollout_allgathers": gathers.n}

            row = self.learn(it, prompts, roll, np.random.default_rng([seed, it, rank]))
            # asked to stop (SIGTERM) on any rank: every rank saves this iteration, then returns
            row["stop"] = float(wctx.stop_requested())
            row = T.all_reduce_mean({k: v for k, v in row.items() if v is not None}, self.device)
            stopping = row.pop("stop") > 0 and it + 1 < total
            self.after_reduce(row)

            it += 1
            if it == 1:
                baseline["score"] = row["score"]  # the SFT policy's rollouts, scored
            dt = time.perf_counter() - t0
            row.update(step=it, lr=p.lr * frac, iteration_s=dt, gen_share=t_gen / dt, **rollout)
            row["prompt_crc"] = zlib.crc32(order.tobytes())  # which prompts this iteration sampled
            if it % p.eval_every == 0 or it == total:
                row.update(self._evaluate(it))
            wctx.progress(it, total)
            if it % p.checkpoint_every == 0 or it == total or stopping:
                state = {"iteration": it, **self.state_dict(), "baseline": baseline, **self._gold_state(),
                         "wandb_run_id": job.wandb_run_id}  # fmt: skip
                save({name: e for name, (e, _) in self.trained().items()}, wctx, row, state, rank, self.stage,
                     best=self.best_dir if self.select else None)  # fmt: skip
            else:
                wctx.report(row)
            last = row
            if stopping:
                return {STOPPED: it}

        if self.select and self.best is not None:  # the best evaluated iteration's policy, as exported then
            if rank == 0:
                from kiln.export import atomic_folder

                with atomic_folder(job.export_dir) as tmp:
                    shutil.copytree(self.best_dir, tmp, dirs_exist_ok=True)
        else:
            T.export_engine(actor, job.export_dir, job.sft_dir, rank)
        if rank == 0 and (job.sft_dir / "generation_config.json").exists():
            shutil.copy2(job.sft_dir / "generation_config.json", job.export_dir)
        return self._final(last, baseline, it)

    def _evaluate(self, it: int) -> dict:
        """The evaluation row of the policy after `it` iterations (kiln/rl/evaluation.py): held-out losses, the
        gold measure with its proxy and KL; with `select: best_gold` a new best is exported to `best_dir`."""
        from kiln import training as T
        from kiln.rl import evaluation as G

        m = self.models
        scored, ev = G.evaluate(
            m.actor, m.ref, m.reward, self.tok, self.job, self.wctx, self.synced, self.stage, it
        )
        if ev is None:
            return scored
        first = self.first
        self.first = first or ev
        self.last_ev = ev
        row = scored | G.row_measures(first, ev, self.select)
        if row.get("overoptimized"):
            self.overoptimized.append(it)
            if self.rank == 0:
                logging.getLogger(f"kiln.{self.stage}").warning(
                    "%s: iteration %d: the proxy (proxy_score %.4f, was %.4f) rose while sampled task accuracy "
                    "fell beyond noise (%d gained, %d lost): over-optimisation of the reward; see the report's "
                    "chart of proxy and gold against sqrt(KL), and %s.select=best_gold",
                    self.stage, it, row["proxy_score"], first.measures()["proxy_score"],
                    row["task_sampled_gained"], row["task_sampled_lost"], self.stage,
                )  # fmt: skip
        if self.select and G.better(ev, self.best):  # the same on every rank: the export is collective
            self.best = ev
            T.export_engine(m.actor, self.best_dir, self.job.sft_dir, self.rank)
        return row

    def _gold_state(self) -> dict:
        """What the evaluations leave for the rest of the run, saved with each checkpoint."""
        evs = {"first": self.first, "best": self.best, "last": self.last_ev}
        return {
            "evaluations": {k: None if e is None else e.to_json() for k, e in evs.items()},
            "overoptimized": self.overoptimized,
        }

    def _start(self) -> tuple[int, dict, dict]:
        """(iteration, the SFT policy's measures, the last row): from the last checkpoint, or fresh
        after evaluating the SFT policy."""
        from kiln import training as T
        from kiln.rl.evaluation import Evaluation

        wctx, rank = self.wctx, self.rank
        ckpt = wctx.checkpoint()
        if ckpt is None:
            wctx.started_fresh()
            baseline = {"step": 0, **self._evaluate(0)}
            wctx.report(dict(baseline))
            return 0, baseline, {}
        state = json.loads((ckpt / "trainer_state.json").read_text())
        T.check_resumed(state["iteration"], self.p.iterations, f"{self.stage}.iterations", ckpt)
        for name, (engine, _) in self.trained().items():
            engine.load_checkpoint(str(ckpt / name), tag=state["tag"], load_lr_scheduler_states=False)
        self.load_state_dict(state)
        rng = ckpt / f"rng_rank{rank}.pt"  # the global RNGs (rollouts and shuffles have their own)
        if rng.exists():
            T.load_rng(rng)
        evs = state["evaluations"]
        self.first, self.best, self.last_ev = (
            Evaluation.from_json(evs[k]) for k in ("first", "best", "last")
        )
        self.overoptimized = state["overoptimized"]
        if self.select and rank == 0:
            shutil.copytree(ckpt / BEST_POLICY, self.best_dir, dirs_exist_ok=True)
        it = state["iteration"]
        wctx.resumed_from(it)
        # the last row: the stage's headline, should no iteration be left
        return it, state["baseline"], state.get("last", {})

    def _final(self, last: dict, baseline: dict, it: int) -> dict:
        """The manifest's metrics: the last iteration's `KEEP` and held-out losses, and the SFT policy's
        (`<key>_sft`, `heldout_loss_sft/<source>`); the gold figures of the exported iteration, with
        `selected_iteration` and why (kiln/rl/evaluation.py `final_measures`), and the over-optimisation warning."""
        from kiln.rl.evaluation import final_measures

        out = {k: last[k] for k in self.KEEP if k in last} | {"iterations": it}
        out |= final_measures(self.first, self.best if self.select else self.last_ev, it, self.select)
        out["overoptimized"] = len(self.overoptimized)
        if self.overoptimized:
            out["overoptimization_warning"] = (
                f"the proxy rose while sampled task accuracy fell beyond noise at iterations {self.overoptimized}"
            )
        out |= {k: v for k, v in last.items() if k.startswith("heldout_loss")}
        for k in FINAL_SFT:  # before RL (the SFT policy)
            if k in baseline:
                out[f"{k}_sft"] = baseline[k]
        out |= {
            k.replace("heldout_loss", "heldout_loss_sft", 1): v
            for k, v in baseline.items()
            if k.startswith("heldout_loss")
        }
        return out
