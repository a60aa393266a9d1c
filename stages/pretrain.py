"""Pretraining: the GPT (MoE) decoder on the packed token shards, DeepSpeed ZeRO on a Ray Train group.

    python launch.py run --until pretrain --set pretrain.zero_stage=3 --set pretrain.steps=400

`run` checks the configuration against the token shards and the tokenizer before any worker starts,
then runs `train_worker` on `pretrain.num_workers` workers. Each worker is an explicit loop:
micro-steps -> clip -> step -> schedule -> log -> eval -> checkpoint. Data order is index arithmetic
(kiln/training.py), so a resume at step k trains on exactly the sequences an uninterrupted run
would. Checkpoints hold DeepSpeed's engine state plus a small JSON of loop state (step, tokens seen,
W&B run id) and per-rank RNG state; they are reported to Ray Train, which restarts a dead group from
the last one. At the end the model is exported from the live engine (gathered under ZeRO-3) as a
Hugging Face folder with the tokenizer. With `pretrain.expert_parallel` P > 1 each group of P ranks splits
the MoE layers' experts (kiln/expert_parallel.py `for_deepspeed`, ZeRO-1/2): the same model, every expert
in the exported folder; its checkpoints resume under any P and worker count the configuration accepts
(kiln/reshard.py re-lays the experts where either changes).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from kiln.workers import WorkerJob, run_group
from pipeline.config import ModelConfig, PretrainConfig
from pipeline.preemption import STOPPED

VERSION = 1
"""What this stage produces, versioned: bump it when a change alters its output (README, "Changing a
stage"); its artifacts, and those downstream, are then rebuilt. Other code changes rebuild nothing."""


@dataclass(frozen=True)
class Vocab:
    """The tokenizer's vocabulary size and special tokens, as the model's config needs them."""

    size: int
    pad: int | None
    eos: int | None
    bos: int | None


@dataclass(frozen=True, kw_only=True)
class PretrainJob(WorkerJob):
    """What each pretraining worker receives."""

    section: PretrainConfig
    model: ModelConfig
    """The architecture of a model trained from scratch (unused with `pretrain.init_from`)."""
    tokens_dir: Path
    """The tokenize artifact: packed train and val shards."""
    tokenizer_dir: Path
    """The tokenizer artifact, copied into the exported model folder."""
    vocab: Vocab


def run(cfg, inputs, out: Path, ctx) -> dict:
    tokens_dir, tok_dir = inputs["tokenize"].path, inputs["tokenizer"].path
    index = json.loads((tokens_dir / "index.json").read_text())
    vocab = _check_config(cfg, index, tok_dir)
    job = PretrainJob.new(
        ctx, cfg, cfg.pretrain, model=cfg.model, tokens_dir=Path(tokens_dir), tokenizer_dir=Path(tok_dir), vocab=vocab
    )  # fmt: skip
    return run_group(ctx, train_worker, job, out)


def _check_config(cfg, index: dict, tok_dir: Path) -> Vocab:
    """Problems that would only show inside the workers, reported before any starts."""
    from transformers import AutoTokenizer

    from pipeline.config import ConfigError

    tok = AutoTokenizer.from_pretrained(tok_dir)
    errors = []
    seq_len = index["seq_len"]
    if cfg.model.max_seq_len < seq_len:
        errors.append(
            f"model.max_seq_len: {cfg.model.max_seq_len} is shorter than the token shards' seq_len {seq_len} "
            f"(tokenize.seq_len); raise model.max_seq_len to >= {seq_len}"
        )
    n_train = index["splits"]["train"]["sequences"]
    if n_train < cfg.pretrain.global_batch_size:
        errors.append(
            f"pretrain.global_batch_size: {cfg.pretrain.global_batch_size} is more than the "
            f"{n_train} training sequences; lower it or ingest more data"
        )
    if cfg.pretrain.mixture:
        from kiln.mixture import mixture_problems

        sources = index["splits"]["train"].get("sources")
        if sources is None:
            errors.append(
                "pretrain.mixture: the token shards do not keep their sources apart (packed before tokenize "
                "version 2); re-run tokenize, or leave pretrain.mixture empty"
            )
        else:
            sources = {k: (v["first_sequence"], v["sequences"]) for k, v in sources.items()}
            errors.extend(mixture_problems(cfg.pretrain.mixture, sources))
    if cfg.pretrain.init_from:
        import transformers

        init_cfg = transformers.AutoConfig.from_pretrained(cfg.pretrain.init_from)
        if init_cfg.vocab_size < len(tok):
            errors.append(
                f"pretrain.init_from: the model's vocabulary ({init_cfg.vocab_size}) cannot hold the "
                f"tokenizer's {len(tok)} tokens; use that model's tokenizer (tokenizer.path)"
            )
        P = cfg.pretrain.expert_parallel
        experts = getattr(init_cfg, "num_local_experts", None) or getattr(init_cfg, "num_experts", None) or 0
        if P > 1 and (experts == 0 or experts % P):
            what = "is dense (no experts)" if experts == 0 else f"has {experts} experts per MoE layer"
            errors.append(
                f"pretrain.expert_parallel: {P} splits the experts of each MoE layer, and pretrain.init_from's model "
                f"{what}; set pretrain.expert_parallel to 1{f' or another divisor of {experts}' if experts else ''}"
            )
    if errors:
        raise ConfigError(errors, "pretrain")
    return Vocab(size=len(tok), pad=tok.pad_token_id, eos=tok.eos_token_id, bos=tok.bos_token_id)


def train_worker(job: PretrainJob, wctx) -> dict:
    """One data-parallel rank. Returns the final metrics (every rank; rank 0's are used). A collective
    that waits past `pretrain.collective_timeout_min` fails the rank, naming it and the collective."""
    from kiln import training as T

    with T.collective_timeouts("pretrain", wctx.rank, wctx.world_size, job.section.collective_timeout_min):
        return _train(job, wctx)


def _train(job: PretrainJob, wctx) -> dict:
    import deepspeed
    import torch

    from data_prep.packed import PackedTokens
    from kiln import expert_parallel as EP
    from kiln import reshard as R
    from kiln import sharded as S
    from kiln import training as T
    from kiln.mixture import Mixture
    from kiln.model import KilnForCausalLM, build_config

    p, seed = job.section, job.seed
    rank, world = wctx.rank, wctx.world_size
    device = T.worker_device(wctx)
    T.init_distributed(device, p.collective_timeout_min)
    torch.manual_seed(seed)

    # -- model, optimizer, engine --------------------------------------------------------------
    accum = p.global_batch_size // (world * p.micro_batch_size)
    ds_config = T.deepspeed_config(
        zero_stage=p.zero_stage, precision=p.precision, micro_batch_size=p.micro_batch_size,
        grad_accum=accum, world_size=world, grad_clip=p.grad_clip,
        offload_optimizer=p.offload_optimizer, offload_params=p.offload_params, **T.comm_options(p),
    )  # fmt: skip
    ckpt, state = wctx.checkpoint(), None  # the checkpoint to resume from
    if ckpt is not None:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        T.check_resumed(state["step"], p.steps, "pretrain.steps", ckpt)
    # under ZeRO-3 the model is built already partitioned (no rank holds all of it), with the initial
    # weights of the full build (kiln/sharded.py); below it, the plain build
    vocab = job.vocab
    if p.init_from:  # the architecture is the checkpoint's; the model section is not used
        model = S.import_model(p.init_from, ds_config)
    else:
        config = build_config(job.model, vocab.size, vocab.pad, vocab.eos, vocab.bos)
        with S.sharded_build(ds_config):
            model = KilnForCausalLM(config)
    if p.activation_checkpointing:
        model.gradient_checkpointing_enable()
    # expert parallelism: each rank keeps its group's share of the experts, marked for DeepSpeed, before the
    # optimizer (whose groups keep them apart) is built
    EP.for_deepspeed(model, p.expert_parallel)
    optimizer = T.adamw(model, lr=p.lr, betas=(p.beta1, p.beta2), weight_decay=p.weight_decay)
    decays = [g["weight_decay"] for g in optimizer.param_groups]
    # read before the engine is built: a checkpoint written under another world size or expert parallelism
    # loads through DeepSpeed's universal form (with this optimizer's groups), which the engine must be
    # configured for
    if state is not None:
        layout = {"world_size": world, "zero_stage": p.zero_stage, "expert_parallel": p.expert_parallel}
        ckpt, universal = R.prepare(wctx, ckpt, state["tag"], state, layout, optimizer.param_groups)
        if universal:
            ds_config["checkpoint"] = {"load_universal": True}
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if p.compile:
        engine.compile()

    train = PackedTokens(job.tokens_dir, "train")
    val = PackedTokens(job.tokens_dir, "val")
    mix = Mixture(train.sources, len(train), p.mixture or None, seed)
    draw = partial(mix.batch, size=p.global_batch_size)
    tokens_per_step = p.global_batch_size * train.seq_len
    flops_per_token = model.flops_per_token(train.seq_len) if hasattr(model, "flops_per_token") else None
    peak = T.peak_flops(device)
    moe_layers = [i for i in range(model.config.num_hidden_layers) if model.config.is_moe_layer(i)]

    # -- resume -------------------------------------------------------------------------------
    step, tokens_seen, total = 0, 0, p.steps
    last: dict = {}  # the last step's metrics row: the stage's headline
    if state is not None:
        engine.load_checkpoint(str(ckpt), tag=state["tag"], load_lr_scheduler_states=False)
        R.repair_universal_load(engine, decays)
        if p.expert_parallel > 1 and not universal:  # loaded as saved: rank 0's experts on every rank
            _restore_experts(engine)
        R.finish(wctx, ckpt, universal)
        rng = ckpt / f"rng_rank{rank}.pt"  # each rank's RNG streams: on the world size that wrote them
        if not universal and rng.exists():
            T.load_rng(rng)
        step, tokens_seen, last = state["step"], state["tokens_seen"], state.get("last", {})
        wctx.resumed_from(step)
    else:
        wctx.started_fresh()

    # this rank's micro-batches, from the step resumed at to the end, each read (pinned on GPU) while
    # the one before computes; the order is the index arithmetic's, as if read in the loop
    batches = T.prefetched(
        partial(T.read_windows, train, pin=device.type == "cuda"),
        T.micro_batch_ids(step, total, draw, accum, rank, world, p.micro_batch_size),
    )  # fmt: skip
    while step < total:
        t0 = time.perf_counter()
        lr = T.lr_at(step, lr=p.lr, min_lr=p.min_lr, warmup=p.warmup_steps, total=total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids = draw(step)
        # losses (and the grad norm, the MoE stats) stay on the device until the step is done: one host
        # sync per step (all_reduce_mean), none per micro-step
        sums = {
            k: torch.zeros((), dtype=torch.float64, device=device)
            for k in ("loss", "lm_loss", "aux_loss", "z_loss")
        }
        moe = None
        for _ in range(accum):
            x, y = T.to_device(next(batches), device)  # micro_batch(ids, a, rank, ...) of a = 0, 1, ...
            out = engine(input_ids=x, shift_labels=y)
            engine.backward(out.loss)
            engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
            for k in sums:
                v = getattr(out, k)
                if v is not None:
                    sums[k] += v.detach().double() / accum
            if out.moe_stats is not None:
                moe = out.moe_stats
        step += 1
        tokens_seen += tokens_per_step
        local, grad_norm = {}, engine.get_global_grad_norm()  # this rank's, not averaged
        if torch.is_tensor(grad_norm):
            local["grad_norm"] = grad_norm
        routing = moe_metrics(moe, moe_layers) if moe is not None else {}  # averaged over ranks
        # asked to stop (SIGTERM) on any rank: every rank saves this step, then returns
        sums["stop"] = torch.tensor(float(wctx.stop_requested()), dtype=torch.float64, device=device)
        got = T.all_reduce_mean(sums | routing, device, local)
        stopping = got.pop("stop") > 0 and step < total
        row = {k: got[k] for k in sorted(sums) if k != "stop"}  # the same on every rank
        if not math.isfinite(row["loss"]):
            raise FloatingPointError(
                f"pretrain: non-finite loss ({row['loss']}) at step {step}; the last good checkpoint is "
                "kept. Lower pretrain.lr, raise warmup_steps, or use bf16/fp32 instead of fp16."
            )
        dt = time.perf_counter() - t0
        row.update(step=step, lr=lr, tokens_seen=tokens_seen, tokens_per_s=tokens_per_step / dt)
        row["batch_crc"] = zlib.crc32(ids.tobytes())  # which sequences this step trained on
        if grad_norm is not None:
            row["grad_norm"] = got["grad_norm"] if "grad_norm" in local else float(grad_norm)
        if flops_per_token and peak:
            row["mfu"] = flops_per_token * tokens_per_step / dt / (peak * world)
        row.update({k: got[k] for k in routing})
        if engine.fp16_enabled():
            row["loss_scale"] = (
                float(engine.optimizer.cur_scale) if hasattr(engine.optimizer, "cur_scale") else None
            )
        if step % p.eval_every == 0 or step == total:
            row.update(_evaluate(engine, val, p, rank, world, device))
        wctx.progress(step, total)
        if step % p.checkpoint_every == 0 or step == total or stopping:
            _save(engine, wctx, row, step, tokens_seen, job.wandb_run_id, rank, world, p)
        else:
            wctx.report(row)
        last = row
        if stopping:
            return {STOPPED: step}

    T.export_engine(engine, job.export_dir, job.tokenizer_dir, rank)
    seen = {
        f"tokens_seen/{k}": n * train.seq_len
        for k, n in mix.windows_per_source(step, p.global_batch_size).items()
    }
    return (
        {k: v for k, v in last.items() if not k.startswith("expert_load_")}
        | expert_imbalance(last)
        | seen
        | {"steps": step}
    )


def moe_metrics(moe: dict, layers: list[int]) -> dict:
    """A step's routing metrics from the model's `moe_stats` (its last micro-batch): each expert's share of
    the (token, expert) assignments, averaged over the MoE layers (`expert_load_{e}`) and per MoE layer
    (`expert_load_l{layer}_{e}`, the model's layer index), and the share dropped over capacity."""
    load = moe["expert_load"].float()  # (MoE layers, experts)
    out = {f"expert_load_{e}": v for e, v in enumerate(load.mean(0))}
    out |= {f"expert_load_l{layer}_{e}": v for j, layer in enumerate(layers) for e, v in enumerate(load[j])}
    out["dropped_frac"] = moe["dropped_frac"].float().mean()
    return out


def expert_imbalance(row: dict) -> dict:
    """Per MoE layer, the busiest expert's share times the number of experts (1: balanced; the number of
    experts: one expert takes every token), and its worst layer: the stage's headline for collapse."""
    shares: dict[str, list[float]] = {}
    for key, v in row.items():
        if key.startswith("expert_load_l"):
            layer, _ = key[len("expert_load_l") :].split("_")
            shares.setdefault(layer, []).append(v)
    per_layer = {f"expert_imbalance_l{layer}": max(v) * len(v) for layer, v in shares.items()}
    return per_layer | ({"expert_imbalance": max(per_layer.values())} if per_layer else {})


def _evaluate(engine, val, p, rank, world, device) -> dict:
    """Held-out loss over eval_batches x workers micro-batches of validation windows spread over the split
    (`heldout_windows`, each rank its share): `val_loss` over them all, `val_loss/<source>` over each
    source's. Every later model stage scores the same windows (kiln.training.HeldOutWindows)."""
    import math

    from kiln import training as T

    n = p.eval_batches * world * p.micro_batch_size
    engine.eval()
    out = T.score_windows(
        lambda x: engine(input_ids=x).logits, val, n, rank, world, p.micro_batch_size, device, "val_loss"
    )
    engine.train()
    return out | {"val_ppl": math.exp(min(out["val_loss"], 50))}


def _save(engine, wctx, row, step, tokens_seen, wandb_run_id, rank, world, p: PretrainConfig) -> None:
    """DeepSpeed checkpoint + loop state + RNG into a fresh folder, reported (Ray copies it)."""
    from kiln import training as T

    folder = Path(tempfile.mkdtemp(prefix=f"kiln-ckpt-{step}-"))
    tag = f"step{step:08d}"
    engine.save_checkpoint(str(folder), tag=tag)
    T.save_rng(folder / f"rng_rank{rank}.pt")
    if rank == 0:
        layout = {"world_size": world, "zero_stage": p.zero_stage, "expert_parallel": p.expert_parallel}
        state = {"step": step, "tokens_seen": tokens_seen, "tag": tag, "wandb_run_id": wandb_run_id}
        state["layout"] = layout
        # the row too: the stage's headline, should a resume find no step left
        T.write_json(folder / "trainer_state.json", state | {"last": row})
    wctx.report(row, checkpoint_dir=folder)  # the context stores it, then deletes the folder


def _restore_experts(engine) -> None:
    """After DeepSpeed 0.19.8 loads an expert-parallel ZeRO-1/2 checkpoint on the layout that wrote it, each
    rank's own experts back into its module: the model-states file, written by rank 0 alone, holds rank 0's
    slice of each expert parameter (under the global name), which every rank loads; each rank's fp32 master
    partition came from its own ZeRO shard, and is copied into the module here (`update_lp_params`, as after
    an optimizer step). The steps that follow are those of the run without the interruption
    (tests/test_expert_parallel_pretrain.py)."""
    engine.optimizer.update_lp_params()
