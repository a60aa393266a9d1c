"""reward: a reward model trained on preference pairs (TRL RewardTrainer, DeepSpeed ZeRO, Ray Train workers).

    python launch.py run --only reward --set reward.init_from=sft --set 'reward.data=[hf:Anthropic/hh-rlhf:train]'

Inputs: {"pretrain"}, or {"sft"} with `reward.init_from: sft` (weights only). Artifact:

    config.json, model.safetensors       KilnForSequenceClassification: the backbone plus a `score` head
                                         (num_labels 1) read at the last real token, ready for PPO
    tokenizer.json, tokenizer_config.json, chat_template.jinja
    data_stats.json                      pairs read / kept / malformed, by file:line
    metrics.jsonl                        one row per step; one per evaluation

Data (`reward.data`, `reward.eval_data`): {prompt?, chosen, rejected, kind?} in TRL's standard or
conversational format, or Anthropic HH dialogue strings, normalised by data_prep/chat_data.py in this
driver. Each side is rendered by the tokenizer's chat template (prompt + answer); the loss is
Bradley-Terry, -log sigmoid(r_chosen - r_rejected) (Ouyang et al. 2022, eq. 1). Pairs longer than
`reward.max_length` are dropped by TRL: their count is reported (`too_long_pairs`); held-out pairs
over it are left out of the held-out figures (`eval_too_long_pairs`).

Held-out metrics at each evaluation (and at step 0): pairwise accuracy overall, per kind of rejected
answer and per class of kind (data_prep/task.py: well-formed-but-wrong vs damaged), mean margin,
Bradley-Terry loss, and the mean and std of the rewards of every held-out answer. The last two go into
the manifest (`reward_mean`, `reward_std`) so PPO can normalise rewards to mean 0, std 1. So do two
measures of whether the scores can be trusted as a reward: `calibration_ece` (expected calibration
error of the Bradley-Terry probability) and `length_correlation` (of a held-out answer's score with its
length in tokens). And, with `reward.answer_eval` (a policy's own sampled answers, labelled right or
wrong), `answer_auc`: how often a right answer outscores a wrong one to the same prompt (in-prompt AUC),
the ranking an RL stage's rollouts ask of the model. PPO and GRPO check all four before they start
(kiln/rl/loop.py `reward_gate`).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from data_prep.chat_data import load_records, warn_malformed
from kiln import trl_bridge as B
from pipeline.config import PROJECT_ROOT, ConfigError, stage_seed
from pipeline.preemption import STOPPED

VERSION = 2
"""What this stage produces, versioned: bump it when a change alters its output (README, "Changing a
stage"); its artifacts, and those downstream, are then rebuilt. Other code changes rebuild nothing."""

log = logging.getLogger("kiln.reward")


def run(cfg, inputs, out: Path, ctx) -> dict:
    from transformers import AutoTokenizer

    s = cfg.reward
    train, held, stats = B.load_data("preference", s, "reward", stage_seed(cfg, s), ctx.logger)
    model_dir = inputs[s.init_from].path
    held, too_long = within_length(AutoTokenizer.from_pretrained(model_dir), held, s.max_length)
    if not held:
        raise ValueError(
            f"reward.eval_data: all {too_long} held-out pairs are longer than reward.max_length="
            f"{s.max_length} tokens; raise it or give shorter pairs"
        )
    answers = []
    if s.answer_eval:
        try:
            answers, stats["answer_eval"] = load_records(
                [s.answer_eval], "answers", (Path.cwd(), PROJECT_ROOT), s.max_errors, "reward.answer_eval"
            )
        except ValueError as e:
            raise ConfigError(str(e).splitlines(), "reward") from None
        warn_malformed(ctx.logger, "reward.answer_eval", stats["answer_eval"])
    ctx.logger.info(
        "reward: %d training and %d held-out pairs (%d longer than max_length left out), %d prompts' labelled "
        "answers, from %s", len(train), len(held), too_long, len(answers), s.init_from,
    )  # fmt: skip
    metrics = B.run_trainer(ctx, cfg, s, model_dir, train_worker, train, held, stats, out, answers=answers)
    return metrics | {"eval_too_long_pairs": too_long}


def within_length(tok, pairs: list[dict], max_length: int) -> tuple[list[dict], int]:
    """The held-out pairs whose two sides, rendered by the chat template, fit `max_length` tokens, and
    how many did not: TRL drops longer training pairs, so the held-out figures (and the reward
    mean and std PPO normalises with) are of answers of the lengths the model was trained on."""
    from kiln.chat_eval import conversation_ids

    def fits(p: dict) -> bool:
        return all(
            len(conversation_ids(tok, p["prompt"] + p[s])) <= max_length for s in ("chosen", "rejected")
        )

    kept = [p for p in pairs if fits(p)]
    return kept, len(pairs) - len(kept)


def train_worker(job: B.TrlJob, wctx) -> dict:
    """One data-parallel rank: TRL's RewardTrainer under DeepSpeed, bridged to the worker context."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    import kiln.model  # noqa: F401  (registers the Kiln classes with the Auto classes)
    from kiln import sharded as S
    from kiln.chat_eval import rank_answers, score_pairs

    s, seed = job.section, job.seed
    B.setup_worker(wctx, s.cpus_per_worker)
    resume, kiln_state = B.resume_point(wctx, s.steps, "reward.steps")
    tok = AutoTokenizer.from_pretrained(job.model_dir)
    # the trainer's arguments before the model: under ZeRO-3 the model loads already partitioned under
    # their DeepSpeed config, no rank holding all of it (kiln/sharded.py)
    out_dir = tempfile.mkdtemp(prefix=f"kiln-reward-rank{wctx.rank}-")
    args = RewardConfig(**B.trainer_args(s, seed, wctx.world_size, out_dir, fresh=resume is None))
    torch.manual_seed(seed)  # the new `score` head's init
    model = S.from_pretrained(
        AutoModelForSequenceClassification, job.model_dir, args.deepspeed, num_labels=1, dtype=torch.float32
    )
    model.config.pad_token_id = tok.pad_token_id

    def evaluate(m) -> dict:
        found = score_pairs(m, tok, job.eval, rank=wctx.rank, world=wctx.world_size)
        if job.answers:
            found |= rank_answers(m, tok, job.answers, rank=wctx.rank, world=wctx.world_size)
        return found

    bridge = B.KilnBridge(wctx, evaluate, wandb_run_id=job.wandb_run_id, resumed=kiln_state)
    lora = B.lora_config(s, "SEQ_CLS")  # peft trains the `score` head in full beside the adapters
    trainer, too_long = B.make_trainer(RewardTrainer, model, args, job, tok, lora, bridge)
    if too_long and wctx.rank == 0:
        log.warning("reward: %d training pairs are longer than max_length=%d", too_long, s.max_length)

    B.train(trainer, resume, "reward")
    if bridge.stopped_at is not None:  # SIGTERM: that step's checkpoint is saved
        shutil.rmtree(out_dir, ignore_errors=True)
        return {STOPPED: bridge.stopped_at}
    B.export(trainer, job.export_dir, tok, lora, wctx.rank)
    shutil.rmtree(out_dir, ignore_errors=True)
    final = bridge.last_eval
    headline = {k: v for k, v in final.items() if k.startswith(("pairwise_accuracy", "reward_"))}
    return {
        "steps": trainer.state.global_step,
        **headline,
        "margin": final.get("margin"),
        "calibration_ece": final.get("calibration_ece"),
        "length_correlation": final.get("length_correlation"),
        "answer_auc": final.get("answer_auc"),
        "answer_auc_pairs": final.get("answer_auc_pairs"),
        "val_loss": final.get("val_loss"),
        "eval_pairs": final.get("eval_pairs"),
        "initial_pairwise_accuracy": bridge.baseline.get("pairwise_accuracy"),
        "too_long_pairs": too_long,
        "init_from": s.init_from,
        "lora_r": s.lora_r,
    }
