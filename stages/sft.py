"""sft: supervised fine-tuning of the pretrained model (TRL SFTTrainer, DeepSpeed ZeRO, Ray Train workers).

    python launch.py run --only sft --set sft.steps=600 --set sft.lora_r=8

Inputs: {"pretrain"} (weights and tokenizer only: a fresh optimizer, a fresh schedule) and
{"tokenize"} (pretraining's held-out windows, scored by source). Artifact:

    config.json, model.safetensors, generation_config.json   the fine-tuned KilnForCausalLM (LoRA merged in)
    tokenizer.json, tokenizer_config.json, chat_template.jinja
    data_stats.json                                          records read / kept / malformed, by file:line
    metrics.jsonl                                            one row per step; one per evaluation

Data (`sft.data`, `sft.eval_data`): TRL's prompt/completion or conversational messages, read and
normalised by data_prep/chat_data.py in this driver (bad records counted, listed with file:line),
then handed to the workers with the pipeline's seed. Loss on the completion only
(`completion_only_loss`), each example rendered by the tokenizer artifact's chat template, which ends
an assistant turn with `<|end|>`, so the model learns to stop. `sft.lora_r > 0` trains LoRA adapters
(peft) and merges them into the exported weights.

Held-out metrics at each evaluation (and at step 0, the pretrained model): `val_loss` on
`sft.eval_data`, and `task_accuracy`: greedy answers to `sft.task_prompts`, stopped at `<|end|>` or
EOS, judged by data_prep/task.py's `check`; and `heldout_loss/<source>`: the language-modelling loss
on the windows pretraining holds out (`val_loss/<source>` in its metrics), so the manifest shows
what fine-tuning cost each source (`heldout_loss_pretrained/<source>`: before it). Resume (a dead
worker group, or a re-run) continues from the stage's own last checkpoint: TRL's DeepSpeed state,
scheduler, RNG and data position.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from kiln import trl_bridge as B
from kiln.training import HeldOutWindows
from pipeline.config import stage_seed
from pipeline.preemption import STOPPED

VERSION = 1
"""What this stage produces, versioned: bump it when a change alters its output (README, "Changing a
stage"); its artifacts, and those downstream, are then rebuilt. Other code changes rebuild nothing."""

log = logging.getLogger("kiln.sft")


def run(cfg, inputs, out: Path, ctx) -> dict:
    s = cfg.sft
    train, held, stats = B.load_data("sft", s, "sft", stage_seed(cfg, s), ctx.logger)
    from kiln.chat_eval import read_task_prompts

    prompts = (
        read_task_prompts(s.task_prompts, s.task_eval_size, "sft.task_prompts") if s.task_prompts else []
    )
    ctx.logger.info(
        "sft: %d training and %d held-out records, %d task prompts", len(train), len(held), len(prompts)
    )
    heldout = HeldOutWindows.of(cfg, inputs["tokenize"].path)
    return B.run_trainer(
        ctx, cfg, s, inputs["pretrain"].path, train_worker, train, held, stats, out, task_prompts=prompts,
        heldout=heldout,
    )  # fmt: skip


def train_worker(job: B.TrlJob, wctx) -> dict:
    """One data-parallel rank: TRL's SFTTrainer under DeepSpeed, bridged to the worker context."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    import kiln.model  # noqa: F401  (registers the Kiln classes with the Auto classes)
    from kiln import sharded as S
    from kiln.chat_eval import stop_ids, task_accuracy
    from kiln.training import score_heldout

    s, seed = job.section, job.seed
    B.setup_worker(wctx, s.cpus_per_worker)
    resume, kiln_state = B.resume_point(wctx, s.steps, "sft.steps")
    tok = AutoTokenizer.from_pretrained(job.model_dir)
    # the trainer's arguments before the model: under ZeRO-3 the model loads already partitioned under
    # their DeepSpeed config, no rank holding all of it (kiln/sharded.py)
    out_dir = tempfile.mkdtemp(prefix=f"kiln-sft-rank{wctx.rank}-")
    args = SFTConfig(
        **B.trainer_args(s, seed, wctx.world_size, out_dir, fresh=resume is None),
        completion_only_loss=True,  # prompt tokens are context, not targets
        packing=False,
    )
    torch.manual_seed(seed)
    model = S.from_pretrained(AutoModelForCausalLM, job.model_dir, args.deepspeed, dtype=torch.float32)
    model.generation_config.eos_token_id = stop_ids(tok)  # an answer ends at <|end|> (or EOS)
    model.generation_config.pad_token_id = tok.pad_token_id
    synced = s.zero_stage == 3 and wctx.world_size > 1

    def evaluate(m) -> dict:
        scored = {}
        if job.heldout is not None:
            device = next(m.parameters()).device
            scored = score_heldout(lambda x: m(input_ids=x).logits, job.heldout, wctx.rank, wctx.world_size,
                                   s.micro_batch_size, device, "heldout_loss")  # fmt: skip
        if not job.task_prompts:
            return scored
        found = task_accuracy(
            m, tok, job.task_prompts, s.max_new_tokens, wctx.rank, wctx.world_size, synced=synced
        )
        if wctx.rank == 0:
            log.info("sft: task accuracy %.3f; e.g. %s", found["task_accuracy"], found["task_samples"])
        return scored | {k: v for k, v in found.items() if k != "task_samples"}

    bridge = B.KilnBridge(wctx, evaluate, wandb_run_id=job.wandb_run_id, resumed=kiln_state)
    lora = B.lora_config(s, "CAUSAL_LM")
    trainer, unused = B.make_trainer(
        SFTTrainer, model, args, job, tok, lora, bridge
    )  # unused: no completion token
    if unused and wctx.rank == 0:
        log.warning("sft: %d training records have no completion token within max_length", unused)

    B.train(trainer, resume, "sft")
    if bridge.stopped_at is not None:  # SIGTERM: that step's checkpoint is saved
        shutil.rmtree(out_dir, ignore_errors=True)
        return {STOPPED: bridge.stopped_at}
    B.export(trainer, job.export_dir, tok, lora, wctx.rank)
    shutil.rmtree(out_dir, ignore_errors=True)
    final = bridge.last_eval
    heldout = {k: v for k, v in final.items() if k.startswith("heldout_loss")}
    heldout |= {
        k.replace("heldout_loss", "heldout_loss_pretrained", 1): v
        for k, v in bridge.baseline.items()
        if k.startswith("heldout_loss")
    }
    return heldout | {
        "steps": trainer.state.global_step,
        "train_loss": _last_train_loss(trainer),
        "val_loss": final.get("val_loss"),
        "task_accuracy": final.get("task_accuracy"),
        "task_accuracy_pretrained": bridge.baseline.get("task_accuracy"),
        "val_loss_pretrained": bridge.baseline.get("val_loss"),
        "records_without_completion": unused,
        "lora_r": s.lora_r,
    }


def _last_train_loss(trainer) -> float | None:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses[-1] if losses else None
