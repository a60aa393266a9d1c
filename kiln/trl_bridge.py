"""What the TRL stages (sft, reward, dpo) share: their data, their trainer arguments, the DeepSpeed check,
the one `TrainerCallback` that bridges TRL to Kiln's worker context, and the export.

    train, held, stats = load_data("sft", cfg.sft, "sft", seed, logger)     # in the stage's driver
    args = trainer_args(job.section, job.seed, wctx.world_size, out_dir, resume is None) # in a worker
    trainer = SFTTrainer(..., args=SFTConfig(**args, ...), callbacks=[bridge])
    check_deepspeed(trainer, zero_stage)                                    # no silent DDP fallback
    train(trainer, resume, "sft")                                           # no step past max_steps
    export(trainer, export_dir, tok, lora, wctx.rank)                       # merged LoRA, training dtype, + tokenizer

DeepSpeed comes from `TrainingArguments(deepspeed=<dict>)`, the dict built by the same function as
pretraining's (kiln/training.py `deepspeed_config`); accelerate then comes up as DeepSpeed inside a
Ray worker too, and `check_deepspeed` fails the stage if it did not, or with another ZeRO stage.
Under ZeRO-3 a stage makes its arguments before it loads the model: their DeepSpeed config is what
makes `from_pretrained` load it already partitioned (kiln/sharded.py); `make_trainer` refuses a
whole model.

The bridge (one small TrainerCallback, the whole of our extension of TRL's trainers) does six
things and nothing else:
- TRL's training logs -> one metrics row per step (`loss`, `lr`, `grad_norm`, the trainer's own
  metrics prefixed `train_`, `batch_crc` of the sample ids the step trained on) via `wctx.report`;
- each evaluation -> one row (`val_loss` and the stage's held-out metrics from its `evaluate` function);
- each checkpoint TRL saves -> `wctx.report(checkpoint_dir=...)` (every rank its own folder: Ray
  merges the ZeRO shards), with `kiln_state.json` (W&B run id, the step-0 and the latest evaluation,
  and what the stage keeps across evaluations in `bridge.carry`) beside it;
- `wctx.progress(step, total)`;
- a resume from a checkpoint at max_steps stops at train begin (`train`), with no step taken;
- SIGTERM on any rank (`wctx.stop_requested`, agreed in the step's gather of sample ids) saves
  that step's checkpoint and stops; the stage then returns `{preemption.STOPPED: step}`.
Sample ids: each training record carries a `kiln_id` column (its index in the normalised data); the
collator is wrapped to note the ids of each micro-batch it builds, and the bridge takes this step's
micro-batches (TRL's `current_gradient_accumulation_steps` of them) from that queue at the step's end.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import TrainerCallback

from data_prep.chat_data import load_records, split_eval, warn_malformed
from kiln.workers import WorkerJob, run_group
from pipeline.config import PROJECT_ROOT, ConfigError, TrlStageConfig

if TYPE_CHECKING:
    from kiln.training import HeldOutWindows

KILN_STATE = "kiln_state.json"
LOG_KEYS = {"loss": "loss", "learning_rate": "lr", "grad_norm": "grad_norm", "epoch": "epoch"}
QUIET_KEYS = ("runtime", "samples_per_second", "steps_per_second", "num_tokens", "total_flos")

# ---------------------------------------------------------------------------------------------------- driver


def load_data(kind: str, s, section: str, seed: int, logger) -> tuple[list[dict], list[dict], dict]:
    """(train records, held-out records, stats) of a stage's `data` / `eval_data`: every source
    problem reported at once, bad records counted and logged with file:line, never dropped silently."""
    roots, problems, stats = (Path.cwd(), PROJECT_ROOT), [], {}
    loaded = {}
    for key, sources in (("data", s.data), ("eval_data", s.eval_data)):
        if not sources:
            continue
        try:
            loaded[key], stats[key] = load_records(sources, kind, roots, s.max_errors, f"{section}.{key}")
        except ValueError as e:
            problems.extend(str(e).splitlines())
    if problems:
        raise ConfigError(problems, section)
    train = loaded["data"]
    held = loaded.get("eval_data")
    if held is None:
        train, held = split_eval(train, s.eval_fraction, seed)
    for key, st in stats.items():
        warn_malformed(logger, f"{section}.{key}", st)
    if not train:
        st = stats["data"]
        raise ValueError(
            f"{section}.data: no usable {kind} records: {st['read']} read, malformed {st['malformed']}, "
            f"e.g. {st['errors'][:3]}. The formats: data_prep/chat_data.py"
        )
    if not held:
        where = (
            "eval_data has none" if s.eval_data else f"eval_fraction={s.eval_fraction} of data held out none"
        )
        raise ValueError(f"{section}.eval_data: no held-out {kind} records ({where}); give eval_data")
    return train, held, stats


@dataclass(frozen=True, kw_only=True)
class TrlJob(WorkerJob):
    """What each worker of a TRL stage receives."""

    section: TrlStageConfig
    model_dir: Path
    """The model the stage starts from (a Hugging Face folder with its tokenizer)."""
    train: list[dict]
    """Training records in TRL's format, each with its `kiln_id` (`with_ids`)."""
    eval: list[dict]
    """Held-out records."""
    task_prompts: list = field(default_factory=list)
    """Held-out prompts of the shipped task, answered at each evaluation (sft)."""
    heldout: HeldOutWindows | None = None
    """Pretraining's held-out windows, scored by source at each evaluation (sft): what it cost each source."""
    answers: list[dict] = field(default_factory=list)
    """Sampled answers labelled right or wrong, {prompt, answers, right}, ranked at each evaluation (reward)."""


def run_trainer(ctx, cfg, s, model_dir, train_worker, train, held, stats, out: Path, **extra) -> dict:
    """The driver's part of a TRL stage: hand the records to `train_worker` on the section's Ray
    Train group, copy the exported model into the artifact with data_stats.json, and return the
    headline metrics (rank 0's and the data counts)."""
    job = TrlJob.new(ctx, cfg, s, model_dir=Path(model_dir), train=with_ids(train), eval=held, **extra)
    metrics = run_group(ctx, train_worker, job, out)
    (Path(out) / "data_stats.json").write_text(json.dumps(stats, indent=2))
    return metrics | data_headline(stats, train, held)


def data_headline(stats: dict, train: list, held: list) -> dict:
    """Counts that go into the manifest beside the training metrics: the records handed to the
    trainer and those held out (with `eval_fraction`, kept = train + held out), and the malformed."""
    return {
        "train_records": len(train),
        "eval_records": len(held),
        "malformed_records": sum(sum(st["malformed"].values()) for st in stats.values()),
    }


# ---------------------------------------------------------------------------------------------------- worker


def setup_worker(wctx, cpus: float) -> None:
    """Threads as the worker's CPU share; TRL, transformers and datasets quiet in the logs."""
    import datasets
    import torch
    import transformers

    from kiln.training import extension_cache

    extension_cache()  # before accelerate starts DeepSpeed's process group
    torch.set_num_threads(max(1, int(cpus)))
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_warning()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def trainer_args(s: TrlStageConfig, seed: int, world: int, output_dir: str, fresh: bool) -> dict:
    """Keyword arguments shared by SFTConfig and RewardConfig, from the typed stage section."""
    from kiln.training import comm_options, deepspeed_config

    accum = s.global_batch_size // (world * s.micro_batch_size)
    gpu = s.gpus_per_worker > 0
    ds = deepspeed_config(
        zero_stage=s.zero_stage, precision=s.precision, micro_batch_size=s.micro_batch_size,
        grad_accum=accum, world_size=world, grad_clip=s.grad_clip, **comm_options(s),
    )  # fmt: skip
    return dict(
        output_dir=output_dir, deepspeed=ds, use_cpu=not gpu, seed=seed, data_seed=seed,
        max_steps=s.steps, per_device_train_batch_size=s.micro_batch_size,
        per_device_eval_batch_size=2 * s.micro_batch_size, gradient_accumulation_steps=accum,
        learning_rate=s.lr, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": s.min_lr / s.lr},
        warmup_steps=s.warmup_steps, weight_decay=s.weight_decay, max_grad_norm=s.grad_clip,
        optim="adamw_torch_fused" if gpu else "adamw_torch",
        bf16=s.precision == "bf16", fp16=s.precision == "fp16",
        gradient_checkpointing=s.activation_checkpointing,
        logging_steps=1, eval_strategy="steps", eval_steps=s.eval_every, eval_on_start=fresh,
        save_strategy="steps", save_steps=s.checkpoint_every, save_total_limit=1,
        report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        ddp_timeout=max(1, round(s.collective_timeout_min * 60)),  # where accelerate makes the process group
        remove_unused_columns=False,  # keeps `kiln_id` for the sample-id record; the collators ignore it
        max_length=s.max_length,
    )  # fmt: skip


def lora_config(s: TrlStageConfig, task_type: str):
    if not s.lora_r:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
        target_modules=list(s.lora_targets), task_type=task_type,
    )  # fmt: skip


def make_trainer(trainer_cls, model, args, job: TrlJob, tok, lora, bridge):
    """A TRL trainer on the stage's records, bridged (quiet console, DeepSpeed checked, sample ids
    noted); also how many training records TRL left out (over max_length, or nothing to learn)."""
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback

    from kiln.sharded import is_partitioned

    if job.section.zero_stage == 3 and not is_partitioned(model):
        raise RuntimeError(
            "ZeRO-3: the model came in whole; load it after the trainer's arguments are made (their "
            "DeepSpeed config makes from_pretrained load it partitioned, kiln/sharded.py)"
        )
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(job.train),
        eval_dataset=Dataset.from_list(job.eval),
        processing_class=tok,
        peft_config=lora,
        callbacks=[bridge],
    )
    trainer.remove_callback(PrinterCallback)
    check_deepspeed(trainer, job.section.zero_stage)
    bridge.attach(trainer)
    return trainer, len(job.train) - len(trainer.train_dataset)


def check_deepspeed(trainer, zero_stage: int) -> None:
    """Fail unless accelerate runs DeepSpeed with the configured ZeRO stage (no silent DDP fallback)."""
    from accelerate.utils import DistributedType

    acc = trainer.accelerator
    plugin = acc.state.deepspeed_plugin
    got = (acc.distributed_type, plugin.zero_stage if plugin is not None else None)
    if got != (DistributedType.DEEPSPEED, zero_stage):
        raise RuntimeError(
            f"accelerate came up as {got[0]} with ZeRO stage {got[1]}, not DeepSpeed ZeRO-{zero_stage}: "
            "the TrainingArguments' deepspeed config was not applied (inside a Ray worker accelerate comes up as plain DDP unless DeepSpeed is asked for)"
        )


def resume_point(wctx, steps: int, key: str) -> tuple[str | None, dict]:
    """(checkpoint folder to resume from or None, the kiln_state.json saved with it). Tells `wctx`
    which: `resumed_from(step)` or `started_fresh()`."""
    from kiln.training import check_resumed

    ckpt = wctx.checkpoint()
    if ckpt is None:
        wctx.started_fresh()
        return None, {}
    state = json.loads((Path(ckpt) / "trainer_state.json").read_text())
    check_resumed(state["global_step"], steps, key, ckpt)
    kiln = Path(ckpt) / KILN_STATE
    extra = json.loads(kiln.read_text()) if kiln.exists() else {}
    wctx.resumed_from(state["global_step"])
    return str(ckpt), extra


class _NoStepsLeft(Exception):
    """The checkpoint resumed from is at max_steps already (see `train`)."""


def train(trainer, resume: str | None, section: str) -> None:
    """`trainer.train(resume_from_checkpoint=resume)`, less one step: transformers checks max_steps
    only after a step, so from a checkpoint already at max_steps (the worker died after its last
    save, before the artifact was written) it trains one step more, unless max_steps ends an epoch.
    The bridge stops it at train begin instead, once the engine holds the checkpoint's weights,
    ready for `export`. A collective that times out (`<section>.collective_timeout_min`) fails the
    rank, naming it and the collective."""
    from kiln.training import collective_timeouts

    a = trainer.args
    try:
        with collective_timeouts(section, a.process_index, a.world_size, a.ddp_timeout / 60):
            trainer.train(resume_from_checkpoint=resume)
    except _NoStepsLeft:
        pass


def with_ids(records: list[dict]) -> list[dict]:
    """Records with their index as `kiln_id`: the sample id the metrics record per step."""
    return [{**r, "kiln_id": i} for i, r in enumerate(records)]


class KilnBridge(TrainerCallback):
    """TRL's logs, evaluations and checkpoints -> the worker context (module docstring)."""

    def __init__(self, wctx, evaluate, *, wandb_run_id: str | None, resumed: dict):
        self.wctx, self.evaluate, self.wandb_run_id = wctx, evaluate, wandb_run_id
        # the step-0 evaluation and the latest one, carried through resumes (`resumed`: kiln_state.json)
        self.baseline: dict = resumed.get("baseline") or {}
        self.last_eval: dict = resumed.get("last_eval") or {}
        # what a stage's `evaluate` keeps from one evaluation to the next (dpo: the step-0 sampled outcomes)
        self.carry: dict = resumed.get("carry") or {}
        self.trainer = None
        self.batches: deque[list[int]] = deque()
        self.step_ids: list[int] = []
        self.stopped_at: int | None = None  # the step it stopped at on SIGTERM, its checkpoint saved

    def attach(self, trainer) -> None:
        """Wrap the trainer's collator so each micro-batch's `kiln_id`s are noted (eval sets have none)."""
        self.trainer = trainer
        collate, batches = trainer.data_collator, self.batches

        def noting(examples):
            if "kiln_id" in examples[0]:
                batches.append([int(e["kiln_id"]) for e in examples])
            return collate(examples)

        trainer.data_collator = noting

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            raise _NoStepsLeft

    def on_step_end(self, args, state, control, **kwargs):
        n = self.trainer.current_gradient_accumulation_steps
        mine = [i for _ in range(n) for i in self.batches.popleft()]
        from kiln.chat_eval import gather

        # each rank's sample ids, and whether it was asked to stop (SIGTERM): one collective
        parts = gather((self.wctx.stop_requested(), mine), self.wctx.world_size)
        self.step_ids = [i for _, part in parts for i in part]
        self.wctx.progress(state.global_step, state.max_steps)
        if any(asked for asked, _ in parts) and state.global_step < state.max_steps:
            control.should_save = control.should_training_stop = True  # every rank saves this step
            self.stopped_at = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:  # evaluation logs are reported by on_evaluate
            return
        row = {"step": state.global_step}
        for k, v in logs.items():
            if not k.startswith("train_") and not any(q in k for q in QUIET_KEYS):
                row[LOG_KEYS.get(k, f"train_{k}")] = v
        import numpy as np

        row["batch_crc"] = zlib.crc32(np.asarray(self.step_ids, dtype=np.int64).tobytes())
        self.wctx.report(row)

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        row = {"step": state.global_step}
        for k, v in (metrics or {}).items():
            name = k.removeprefix("eval_")
            if name != "epoch" and not any(q in name for q in QUIET_KEYS):
                row["val_loss" if name == "loss" else f"val_{name}"] = v
        row.update(self.evaluate(model))
        if state.global_step == 0:
            self.baseline = {k: v for k, v in row.items() if k != "step"}
        self.last_eval = row
        self.wctx.report(row)

    def on_save(self, args, state, control, **kwargs):
        saved = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        saved.mkdir(parents=True, exist_ok=True)  # a rank that saved no shard still reports
        if state.is_world_process_zero:
            kiln = {"step": state.global_step, "wandb_run_id": self.wandb_run_id, "baseline": self.baseline,
                    "last_eval": self.last_eval, "carry": self.carry}  # fmt: skip
            (saved / KILN_STATE).write_text(json.dumps(kiln, indent=2))
        # out of TRL's output dir (whose rotation would delete it while it uploads) into one the
        # worker context owns: it is stored, then deleted
        folder = Path(tempfile.mkdtemp(prefix=f"kiln-ckpt-{state.global_step}-"))
        os.replace(saved, folder)  # a rename onto the empty folder (both under the temp dir)
        self.wctx.report(None, checkpoint_dir=folder)


# ---------------------------------------------------------------------------------------------------- export


def export(trainer, out_dir: str, tok, lora, rank: int) -> None:
    """The trained model as a Hugging Face folder (safetensors in the training dtype + tokenizer),
    `use_cache` on again, streamed tensor by tensor from the live engine (kiln/export.py; ZeRO-3: each
    parameter gathered in turn, a collective every rank joins); rank 0 writes it into a temporary
    folder that replaces `out_dir` once complete. With LoRA (`lora`, the adapters' config) each adapted
    linear is merged as it streams, under the base model's names (what `merge_and_unload` writes)."""
    from kiln.export import export_model

    if lora is not None and not hasattr(trainer.model, "peft_config"):
        raise RuntimeError("export: LoRA was configured but the trainer's model carries no adapters")
    export_model(
        trainer.model, out_dir, rank=rank, engine=trainer.model_wrapped, tokenizer=tok, use_cache=True
    )
