"""dpo: Direct Preference Optimization of the SFT policy (TRL DPOTrainer, DeepSpeed ZeRO, Ray Train workers).

    python launch.py run --only dpo --set dpo.loss_type=ipo --set dpo.beta=0.5
    python launch.py run --set dpo.enabled=true          # a whole run, dpo beside ppo

Inputs: {"sft"}: the policy's start and, frozen, the reference (a model of its own, loaded as the
policy is and prepared by TRL with DeepSpeed: replicated below ZeRO-3, partitioned under it; with LoRA
the policy with its adapters off). No reward model. Artifact:

    config.json, model.safetensors, generation_config.json   the trained KilnForCausalLM (LoRA merged in)
    tokenizer.json, tokenizer_config.json, chat_template.jinja
    data_stats.json                                          pairs read / kept / malformed, by file:line
    metrics.jsonl                                            one row per step; one per evaluation

Data (`dpo.data`, `dpo.eval_data`): preference pairs as reward's, {prompt?, chosen, rejected, kind?} in
TRL's standard or conversational format or Anthropic HH dialogue strings, normalised by
data_prep/chat_data.py in this driver; each side rendered by the tokenizer's chat template. Held-out
pairs longer than `dpo.max_length` are left out of the held-out figures (`eval_too_long_pairs`); TRL
drops training pairs whose prompt alone fills it (`too_long_pairs`) and truncates the others.
With `dpo.pairs: on_policy` the training pairs are the SFT policy's own answers instead: each rank
samples `pair_samples` answers to its share of `dpo.prompts` (fixed seeds: the same pairs on a resume,
on the same hardware), the checking program judges them, and a prompt with a right and a wrong answer
gives a pair (kind `on_policy`; counts `on_policy_pairs`, `all_right`, `all_wrong` in the manifest).

Loss (`dpo.loss_type`, TRL's): sigmoid is DPO's (Rafailov et al. 2023, eq. 7),
-log sigmoid(beta x [log pi/pi_ref (chosen) - log pi/pi_ref (rejected)]), each log ratio summed over
the answer's tokens; hinge, ipo and the rest are TRL's variants of it. `beta` scales the implicit reward.

Held-out metrics at each evaluation (and at step 0, the SFT policy, where the policy is its reference):
- `preference_accuracy`: share of held-out pairs whose implicit reward margin beta x (log pi/pi_ref
  (chosen) - log pi/pi_ref (rejected)) is > 0, a tie (margin exactly 0) counting one half: 0.5 at
  step 0, where every margin is 0 (`preference_ties` says so); per kind of rejected answer
  (`preference_accuracy/<kind>`), the mean `margin` and the mean implicit rewards of the chosen and
  rejected answers (`reward_chosen`, `reward_rejected`: both falling is DPO lowering the likelihood
  of both). All from TRL's own evaluation pass over the held-out pairs (`HeldOutCapture`: no second
  pass), whose batch means are there too (`val_loss`, `val_rewards/accuracies`: ties counted wrong;
  `val_loss` includes the MoE load-balancing term, so it is not log 2 at step 0).
- the gold measure, by the RL stages' own evaluation (kiln/rl/evaluation.py `judge`, without a proxy
  score): `task_accuracy`, greedy answers to `dpo.task_prompts` judged by data_prep/task.py's checking
  program; `task_accuracy_sampled` over `task_samples` answers per prompt sampled at `temperature` /
  `top_p` from the seeds the RL stages' evaluation draws, each paired with step 0's
  (`task_sampled_gained`, `_lost`); and `kl_sft`, the mean over the first answer to each prompt of
  the sum over its tokens of log pi(y_t) - log pi_ref(y_t) at the sampling temperature (0 at step 0).
The manifest repeats step 0's as `<key>_sft` (`preference_accuracy_sft`, `task_accuracy_sft`,
`task_accuracy_sampled_sft`) with the paired change's `task_sampled_z`. Resume (a dead worker group,
or a re-run) continues from the stage's own last checkpoint (TRL's DeepSpeed state, scheduler, RNG,
data position; step 0's evaluation in kiln_state.json).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from kiln import trl_bridge as B
from kiln.rl import evaluation as E
from pipeline.config import stage_seed
from pipeline.preemption import STOPPED

VERSION = 1
"""What this stage produces, versioned: bump it when a change alters its output (README, "Changing a
stage"); its artifacts, and those downstream, are then rebuilt. Other code changes rebuild nothing."""

log = logging.getLogger("kiln.dpo")


def run(cfg, inputs, out: Path, ctx) -> dict:
    from transformers import AutoTokenizer

    from kiln.chat_eval import read_task_prompts
    from stages.reward import within_length

    s = cfg.dpo
    if s.pairs == "on_policy":  # the training records are prompts: the workers sample the pairs
        train, held, stats = load_prompts(s, ctx.logger)
    else:
        train, held, stats = B.load_data("preference", s, "dpo", stage_seed(cfg, s), ctx.logger)
    model_dir = inputs["sft"].path
    held, too_long = within_length(AutoTokenizer.from_pretrained(model_dir), held, s.max_length)
    if not held:
        raise ValueError(
            f"dpo.eval_data: all {too_long} held-out pairs are longer than dpo.max_length={s.max_length} "
            "tokens; raise it or give shorter pairs"
        )
    prompts = (
        read_task_prompts(s.task_prompts, s.task_eval_size, "dpo.task_prompts") if s.task_prompts else []
    )
    ctx.logger.info(
        "dpo: %d training %s and %d held-out pairs (%d longer than max_length left out), %d task prompts; "
        "loss %s, beta %g", len(train), "prompts" if s.pairs == "on_policy" else "pairs", len(held), too_long,
        len(prompts), s.loss_type, s.beta,
    )  # fmt: skip
    metrics = B.run_trainer(
        ctx, cfg, s, model_dir, train_worker, train, held, stats, out, task_prompts=prompts
    )
    return metrics | {"eval_too_long_pairs": too_long}


def load_prompts(s, logger) -> tuple[list[dict], list[dict], dict]:
    """pairs=on_policy: (the training prompts as {"prompt": messages}, the held-out pairs, their stats),
    every source problem reported at once, as `B.load_data` does for pairs."""
    from data_prep.chat_data import load_records, warn_malformed
    from pipeline.config import PROJECT_ROOT, ConfigError

    roots, problems, loaded, stats = (Path.cwd(), PROJECT_ROOT), [], {}, {}
    for key, sources, kind in (("prompts", s.prompts, "prompt"), ("eval_data", s.eval_data, "preference")):
        try:
            loaded[key], stats[key] = load_records(sources, kind, roots, s.max_errors, f"dpo.{key}")
        except ValueError as e:
            problems.extend(str(e).splitlines())
    if problems:
        raise ConfigError(problems, "dpo")
    for key, st in stats.items():
        warn_malformed(logger, f"dpo.{key}", st)
        if not loaded[key]:
            raise ValueError(f"dpo.{key}: no usable records: {st['read']} read, malformed {st['malformed']}")
    return [{"prompt": r["prompt"]} for r in loaded["prompts"]], loaded["eval_data"], stats


def train_worker(job: B.TrlJob, wctx) -> dict:
    """One data-parallel rank: TRL's DPOTrainer under DeepSpeed, bridged to the worker context."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    import kiln.model  # noqa: F401  (registers the Kiln classes with the Auto classes)
    from kiln import sharded as S
    from kiln.chat_eval import stop_ids

    s, seed = job.section, job.seed
    B.setup_worker(wctx, s.cpus_per_worker)
    resume, kiln_state = B.resume_point(wctx, s.steps, "dpo.steps")
    tok = AutoTokenizer.from_pretrained(job.model_dir)
    # the trainer's arguments before the models: under ZeRO-3 they load already partitioned under
    # their DeepSpeed config, no rank holding all of either (kiln/sharded.py)
    out_dir = tempfile.mkdtemp(prefix=f"kiln-dpo-rank{wctx.rank}-")
    args = DPOConfig(
        **B.trainer_args(s, seed, wctx.world_size, out_dir, fresh=resume is None),
        beta=s.beta,
        loss_type=[s.loss_type],
    )
    torch.manual_seed(seed)
    model = S.from_pretrained(AutoModelForCausalLM, job.model_dir, args.deepspeed, dtype=torch.float32)
    model.generation_config.eos_token_id = stop_ids(tok)  # an answer ends at <|end|> (or EOS)
    model.generation_config.pad_token_id = tok.pad_token_id
    on_policy = {}
    if (
        s.pairs == "on_policy"
    ):  # the training pairs from the SFT policy's own answers (the same on every rank)
        pairs, on_policy = sample_pairs(model, tok, [r["prompt"] for r in job.train], s, seed, wctx)
        if not pairs:
            raise ValueError(
                f"dpo.pairs=on_policy: no prompt of {len(job.train)} got both a right and a wrong answer in "
                f"{s.pair_samples} samples ({on_policy}); the checking program knows the shipped task's prompts "
                "only (dpo.prompts); raise dpo.pair_samples or dpo.temperature"
            )
        job = replace(job, train=B.with_ids(pairs))
    lora = B.lora_config(s, "CAUSAL_LM")
    # the reference: the SFT model again, frozen (TRL prepares it with DeepSpeed); with LoRA none, TRL
    # then scores the reference as the policy with its adapters off
    ref = (
        None
        if lora
        else S.from_pretrained(AutoModelForCausalLM, job.model_dir, args.deepspeed, dtype=torch.float32)
    )
    synced = s.zero_stage == 3 and wctx.world_size > 1
    # each held-out pair with its id, which TRL's evaluation batches carry to `HeldOutCapture`
    kinds = [r.get("kind", "unspecified") for r in job.eval]
    job = replace(job, eval=[{**r, "pair_id": i} for i, r in enumerate(job.eval)])
    state: dict = {}

    def evaluate(m) -> dict:
        trainer = state["trainer"]
        ref_model, ref_context = (
            (trainer.ref_model, nullcontext) if trainer.ref_model is not None else (m, m.disable_adapter)
        )
        found = preference_metrics(state["capture"], kinds, s.beta, wctx.world_size)
        if job.task_prompts:
            step = trainer.state.global_step
            ev = E.judge(m, Reference(ref_model, ref_context), None, tok, job, wctx, synced, "dpo", step,
                         proxy=False)  # fmt: skip
            if step == 0:
                bridge.carry["first_evaluation"] = ev.to_json()  # what each later one is paired with
            bridge.carry["evaluation"] = ev.to_json()
            found |= E.row_measures(E.Evaluation.from_json(bridge.carry["first_evaluation"]) if step else None,
                                    ev, select=False)  # fmt: skip
        return found

    bridge = B.KilnBridge(wctx, evaluate, wandb_run_id=job.wandb_run_id, resumed=kiln_state)
    dpo_trainer = lambda **kw: DPOTrainer(ref_model=ref, **kw)  # noqa: E731  (make_trainer's other arguments)
    trainer, too_long = B.make_trainer(dpo_trainer, model, args, job, tok, lora, bridge)
    state.update(trainer=trainer, capture=HeldOutCapture(trainer))
    if too_long and wctx.rank == 0:
        log.warning(
            "dpo: %d training pairs have a prompt of max_length=%d tokens or more", too_long, s.max_length
        )

    B.train(trainer, resume, "dpo")
    if bridge.stopped_at is not None:  # SIGTERM: that step's checkpoint is saved
        shutil.rmtree(out_dir, ignore_errors=True)
        return {STOPPED: bridge.stopped_at}
    B.export(trainer, job.export_dir, tok, lora, wctx.rank)
    shutil.rmtree(out_dir, ignore_errors=True)
    final, base = bridge.last_eval, bridge.baseline
    per_kind = {k: v for k, v in final.items() if k.startswith("preference_accuracy/")}
    return {
        "steps": trainer.state.global_step,
        "loss_type": s.loss_type,
        "beta": s.beta,
        "train_loss": _last_train_loss(trainer),
        "val_loss": final.get("val_loss"),
        "val_loss_sft": base.get("val_loss"),
        "preference_accuracy": final.get("preference_accuracy"),
        "preference_accuracy_sft": base.get("preference_accuracy"),
        **per_kind,
        "margin": final.get("margin"),
        "reward_chosen": final.get("reward_chosen"),
        "reward_rejected": final.get("reward_rejected"),
        "eval_pairs": final.get("eval_pairs"),
        **gold_measures(bridge.carry, trainer.state.global_step),
        "too_long_pairs": too_long,
        "lora_r": s.lora_r,
        "pairs": s.pairs,
        **on_policy,
    }


def _last_train_loss(trainer) -> float | None:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses[-1] if losses else None


# ---------------------------------------------------------------------------------------------------- on-policy pairs

PAIR_ITERATION = -(1 << 20)
"""`rollout_seed`'s iteration of on-policy answer j: PAIR_ITERATION - j, no rollout's (>= 0) and no
evaluation sample's (-1 - j for j < task_samples)."""


def sample_pairs(model, tok, prompts: list[list[dict]], s, seed: int, wctx) -> tuple[list[dict], dict]:
    """pairs=on_policy: `pair_samples` answers of the SFT policy to each prompt, from fixed seeds (the same
    pairs again on a resume), judged by the checking program; a pair (the first right answer chosen over
    the first wrong one) per prompt that has both. Each rank samples its share of the prompts with the
    model gathered whole (under ZeRO-3: before any engine, no collective in a forward); every rank gets
    every pair, in prompt order, and the counts."""
    import torch

    from data_prep.task import check, prompt_text
    from kiln.chat_eval import decode_responses, gather, prompt_ids, rank_share, stop_ids
    from kiln.rl.rollout import rollout_seed, sample
    from kiln.sharded import is_partitioned

    k, stops = s.pair_samples, stop_ids(tok)
    padded, n_mine = rank_share(list(range(len(prompts))), wctx.rank, wctx.world_size)
    mine, found = padded[:n_mine], {}
    whole = nullcontext()
    if is_partitioned(model):
        import deepspeed

        whole = deepspeed.zero.GatheredParameters(list(model.parameters()))
    with whole, torch.no_grad():
        for b in range(0, len(mine), 64):
            rows = [(i, j) for i in mine[b : b + 64] for j in range(k)]
            roll = sample(model, [prompt_ids(tok, prompts[i]) for i, _ in rows],
                          seeds=[rollout_seed(seed, PAIR_ITERATION - j, i) for i, j in rows],
                          max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                          stop_ids=stops, pad_id=tok.pad_token_id)  # fmt: skip
            for (i, _), text in zip(rows, decode_responses(tok, roll, stops), strict=True):
                found.setdefault(i, []).append((check(prompt_text(prompts[i]), text), text))
    answers = {i: a for part in gather(found, wctx.world_size) for i, a in part.items()}
    pairs, counts = [], {"on_policy_prompts": len(answers), "all_right": 0, "all_wrong": 0}
    for i in sorted(answers):
        right = [t for ok, t in answers[i] if ok]
        wrong = [t for ok, t in answers[i] if not ok]
        if right and wrong:
            pairs.append({"prompt": prompts[i], "chosen": [{"role": "assistant", "content": right[0]}],
                          "rejected": [{"role": "assistant", "content": wrong[0]}], "kind": "on_policy"})  # fmt: skip
        else:
            counts["all_right" if right else "all_wrong"] += 1
    counts["on_policy_pairs"] = len(pairs)
    if wctx.rank == 0:
        log.info("dpo: %d on-policy pairs from %d prompts x %d answers (%d all right, %d all wrong)",
                 len(pairs), len(answers), k, counts["all_right"], counts["all_wrong"])  # fmt: skip
    return pairs, counts


# ---------------------------------------------------------------------------------------------------- held-out pairs


class HeldOutCapture:
    """The per-pair log-probabilities of TRL's own evaluation pass over the held-out pairs, so that the
    implicit reward's measures need no second pass: the ids of the pairs in each evaluation batch (noted
    by a wrapper of the collator: each held-out record carries its `pair_id`) and, per batch, the
    summed answer log-probabilities (TRL's fused LM head: `log_probs`, 0 off the answer) of the policy's
    forward pass and then the reference's, as TRL's loss makes them. A forward pass is noted only while
    the policy is in eval mode (TRL's evaluation loop), and only a fused one (not generation's)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.ids: list[list[int]] = []
        self.logps: dict[str, list] = {"policy": [], "ref": []}
        collate = trainer.data_collator

        def noting(examples):
            if "pair_id" in examples[0]:
                self.ids.append([int(e["pair_id"]) for e in examples])
            return collate(examples)

        trainer.data_collator = noting
        ref = getattr(trainer.ref_model, "module", trainer.ref_model)
        if ref is None:  # LoRA: the reference is the policy with its adapters off, called second
            trainer.model.register_forward_hook(self._hook(None))
        else:
            trainer.model.register_forward_hook(self._hook("policy"))
            ref.register_forward_hook(self._hook("ref"))

    def _hook(self, which: str | None):
        def hook(module, args, output):
            logps = getattr(output, "log_probs", None)
            if logps is None or self.trainer.model.training:
                return
            name = which or ("policy" if len(self.logps["policy"]) == len(self.logps["ref"]) else "ref")
            self.logps[name].append(logps.detach().float().sum(1).cpu())

        return hook

    def take(self, beta: float) -> dict[int, tuple[float, float]]:
        """{pair id: (implicit reward of the chosen answer, of the rejected)} of this rank's batches of
        the evaluation just run (a pair padded in twice counts once); then forget them."""
        batches = (len(self.ids), len(self.logps["policy"]), len(self.logps["ref"]))
        if len(set(batches)) != 1:
            raise RuntimeError(f"dpo: held-out batches, policy and reference passes do not match: {batches}")
        found = {}
        for ids, policy, ref in zip(self.ids, self.logps["policy"], self.logps["ref"], strict=True):
            (pc, pr), (rc, rr) = policy.chunk(2), ref.chunk(2)  # each batch is [chosen; rejected]
            for k, i in enumerate(ids):
                found[i] = (beta * float(pc[k] - rc[k]), beta * float(pr[k] - rr[k]))
        self.ids, self.logps = [], {"policy": [], "ref": []}
        return found


def preference_metrics(capture: HeldOutCapture, kinds: list[str], beta: float, world: int) -> dict:
    """The implicit reward's held-out measures (module docstring) from TRL's evaluation pass just run,
    every rank's pairs gathered: every rank gets the same."""
    from kiln.chat_eval import gather

    merged = {i: r for part in gather(capture.take(beta), world) for i, r in part.items()}
    return pair_measures([(c, r, kinds[i]) for i, (c, r) in sorted(merged.items())])


def pair_measures(scored: list[tuple[float, float, str]]) -> dict:
    """(implicit reward of the chosen answer, of the rejected, kind) per held-out pair -> the measures."""

    def accuracy(rows) -> float:
        return sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r, _ in rows) / len(rows)

    n = len(scored)
    out = {
        "preference_accuracy": accuracy(scored),
        "preference_ties": sum(c == r for c, r, _ in scored) / n,
        "margin": sum(c - r for c, r, _ in scored) / n,
        "reward_chosen": sum(c for c, _, _ in scored) / n,
        "reward_rejected": sum(r for _, r, _ in scored) / n,
        "eval_pairs": n,
    }
    for kind in sorted({k for _, _, k in scored}):
        out[f"preference_accuracy/{kind}"] = accuracy([x for x in scored if x[2] == kind])
    return out


# ---------------------------------------------------------------------------------------------------- gold


class Reference:
    """The reference as kiln/rl/evaluation.py's `judge` calls a model: its forward under `context` (with
    LoRA the policy with its adapters off; otherwise the frozen SFT model, under a context that does
    nothing)."""

    def __init__(self, model, context):
        self.model, self.context = model, context

    def __call__(self, *args, **kwargs):
        with self.context():
            return self.model(*args, **kwargs)


def gold_measures(carry: dict, steps: int) -> dict:
    """The manifest's gold figures: the last evaluation's, step 0's as `<key>_sft`, and the paired
    change between them with its z-score (kiln/rl/evaluation.py `final_measures`); none without task
    prompts."""
    last = E.Evaluation.from_json(carry.get("evaluation"))
    if last is None:
        return {}
    first = E.Evaluation.from_json(carry["first_evaluation"])
    out = E.final_measures(first, last, steps, select=False)
    return {k: v for k, v in out.items() if k not in ("selected_iteration", "selected_why", "gold_prompts")}
