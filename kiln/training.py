"""Training helpers shared by the DeepSpeed stages: config, schedule, data order, state, export.

Small pure functions where possible; the loops themselves live in the stage modules.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import traceback
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("kiln.training")

# ---------------------------------------------------------------------------------------------------- DeepSpeed


def deepspeed_config(
    *,
    zero_stage: int,
    precision: str,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    grad_clip: float,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    grad_reduce_dtype: str = "fp32",
    zero3_persistence_threshold: int = 100_000,
    zero3_max_reuse_distance: int = 1_000_000_000,
    zero3_prefetch_bucket_size: int = 50_000_000,
    zero3_shard_within: int = 0,
    overlap_comm: bool = True,
) -> dict:
    """The DeepSpeed config, built from the typed stage config (never from JSON files); the
    communication keyword arguments are a section's `comm_options`.

    fp16 uses dynamic loss scaling (loss_scale 0): start at 2^16, halve on overflow (the step is
    skipped), double after 1000 clean steps (Micikevicius et al. 2018, "Mixed Precision Training").
    Gradients are averaged over the ranks in `grad_reduce_dtype` (DeepSpeed 0.19's
    `communication_data_type`, read by ZeRO-0's all-reduce, ZeRO-1/2's and ZeRO-3's reductions)."""
    zero: dict = {"stage": zero_stage}
    if zero_stage >= 1:
        # overlap_comm: reduce gradient buckets while the backward pass goes on (2 buckets of
        # reduce_bucket_size). Measured on gloo (CPU, bench/comm_settings.py, 20 steps): ZeRO-1/2/3 with
        # it on give the losses of it off (2 ranks: identical; 4 ranks: within 3.6e-7, ZeRO-1 summing
        # its buckets in another order), so it is on for every backend, not only NCCL.
        zero.update(overlap_comm=overlap_comm, contiguous_gradients=True, reduce_bucket_size=5e7)
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if offload_params:
        zero["offload_param"] = param_offload()
    if zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        zero.update(
            zero3_gather(
                zero3_persistence_threshold, zero3_max_reuse_distance, zero3_prefetch_bucket_size,
                zero3_shard_within,
            )
        )  # fmt: skip
    return {
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "communication_data_type": grad_reduce_dtype,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {
            "enabled": precision == "fp16",
            "loss_scale": 0,  # 0 = dynamic
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "zero_allow_untested_optimizer": True,  # our client optimizer is torch's AdamW
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def param_offload() -> dict:
    """ZeRO-3's parameter offload to CPU memory (`zero_optimization.offload_param`), pinned when there
    are GPUs to copy to."""
    return {"device": "cpu", "pin_memory": torch.cuda.is_available()}


def zero3_gather(
    persistence_threshold: int, max_reuse_distance: int, prefetch_bucket_size: int, shard_within: int
) -> dict:
    """ZeRO-3's parameter gathering, as `zero_optimization` keys (training and frozen engines alike)."""
    out = {
        "stage3_param_persistence_threshold": persistence_threshold,
        "stage3_max_reuse_distance": max_reuse_distance,
        "stage3_prefetch_bucket_size": prefetch_bucket_size,
    }
    if shard_within:
        out["zero_hpz_partition_size"] = shard_within  # ZeRO++ hpZ: a secondary shard per N ranks
    return out


def comm_options(p) -> dict:
    """`deepspeed_config`'s communication arguments from a worker-group section (WorkerGroupConfig)."""
    return {
        "grad_reduce_dtype": p.grad_reduce_dtype,
        "zero3_persistence_threshold": p.zero3_persistence_threshold,
        "zero3_max_reuse_distance": p.zero3_max_reuse_distance,
        "zero3_prefetch_bucket_size": p.zero3_prefetch_bucket_size,
        "zero3_shard_within": p.zero3_shard_within,
    }


def adamw(model: torch.nn.Module, *, lr: float, betas, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with no decay on norms, biases and other 1-d params; fused kernels on GPU. A stacked MoE
    expert bias (`ffn.experts.up_proj_bias`, (experts, out)) is a bias, though 2-d. A parameter built
    partitioned under ZeRO-3 (kiln/sharded.py) counts by its full shape (`ds_shape`): its data is then
    an empty placeholder. Expert-parallel expert parameters (kiln/expert_parallel.py `for_deepspeed`) go
    into groups of their own, each with its group's weight decay, as DeepSpeed's MoE needs them
    (`split_params_into_different_moe_groups_for_optimizer`: `"moe": True`, named by their
    expert-parallel group, partitioned by ZeRO-1/2 over the expert-data-parallel ranks)."""
    from kiln.expert_parallel import is_expert_parameter

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            matrix = len(getattr(p, "ds_shape", p.shape)) >= 2 and not name.endswith("_bias")
            (decay if matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if any(is_expert_parameter(p) for p in decay + no_decay):
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer as split

        groups = split([{**g, "name": name} for g, name in zip(groups, ("decay", "no_decay"), strict=True)])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=torch.cuda.is_available())


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up to `lr`, then cosine decay to `min_lr` at `total` (step is 0-based)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------------- data order


@lru_cache(maxsize=4)
def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the n windows in epoch `epoch` of the natural (unweighted) draw."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def global_batch(step: int, batch: int, n: int, seed: int) -> np.ndarray:
    """Sequence ids of global batch `step` (0-based): each sequence once per epoch, in an order fixed
    by the seed. Pure index arithmetic, so resuming at any step needs no iterator replay."""
    out, pos = [], step * batch
    while len(out) < batch:
        epoch, offset = divmod(pos, n)
        take = min(batch - len(out), n - offset)
        out.extend(epoch_permutation(n, seed, epoch)[offset : offset + take].tolist())
        pos += take
    return np.asarray(out, dtype=np.int64)


def micro_batch(ids: np.ndarray, accum_step: int, rank: int, world: int, micro: int) -> np.ndarray:
    """The slice of a global batch that `rank` trains on in accumulation step `accum_step`.
    Global order = accumulation step, then rank, then position, so 4x1 and 1x4 see the same batch."""
    start = (accum_step * world + rank) * micro
    return ids[start : start + micro]


def load_batch(dataset, ids: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (B, seq_len), from windows of seq_len + 1 tokens."""
    return to_device(read_windows(dataset, ids, pin=torch.device(device).type == "cuda"), device)


def read_windows(dataset, ids: np.ndarray, pin: bool = False) -> torch.Tensor:
    """The windows of `ids` as one (B, seq_len + 1) int64 host tensor; in page-locked memory with `pin`,
    so that its copy to a GPU is asynchronous (a copy from pageable memory waits for the GPU)."""
    windows = torch.from_numpy(np.stack([dataset[int(i)] for i in ids]).astype(np.int64))  # (B, T+1)
    return windows.pin_memory() if pin else windows


def to_device(windows: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) views of `windows` on `device`: one copy, asynchronous from pinned memory (the
    GPU's stream orders it before the kernels that read it), none on the CPU."""
    on = windows.to(device, non_blocking=windows.is_pinned())
    return on[:, :-1], on[:, 1:]


def prefetched(read, items):
    """`read(item)` for each item in order, each next one read on a background thread while the caller
    works on the current one (so reading the data never stalls the accelerator). Same values, same
    order as `map(read, items)`; an error in `read` is raised where its item is taken."""
    from concurrent.futures import ThreadPoolExecutor

    items = iter(items)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-prefetch") as pool:
        ahead = None
        for item in items:
            if ahead is None:
                ahead = pool.submit(read, item)
                continue
            current, ahead = ahead, pool.submit(read, item)
            yield current.result()
        if ahead is not None:
            yield ahead.result()


def micro_batch_ids(start: int, total: int, draw, accum: int, rank: int, world: int, micro: int):
    """The sequence ids this rank trains on, micro-step by micro-step, from optimizer step `start` to
    `total` (`draw(step)`, the global batch, cut by `micro_batch`): what the pretraining loop reads, in its
    order."""
    for step in range(start, total):
        ids = draw(step)
        for a in range(accum):
            yield micro_batch(ids, a, rank, world, micro)


# ---------------------------------------------------------------------------------------------------- state


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_rng(path: Path) -> None:
    """Per-rank RNG state as tensors only, so it loads with weights_only=True."""
    s = rng_state()
    np_state = s["numpy"]
    tensors = {
        "torch": s["torch"],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": torch.tensor([np_state[2], np_state[3]], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_state[4]], dtype=torch.float64),
        "python": torch.tensor(list(s["python"][1]), dtype=torch.int64),
        "python_version": torch.tensor([s["python"][0]]),
    }
    if "cuda" in s:
        tensors["cuda"] = s["cuda"]
    torch.save(tensors, path)


def load_rng(path: Path) -> None:
    t = torch.load(path, weights_only=True)
    torch.set_rng_state(t["torch"])
    if "cuda" in t and torch.cuda.is_available():
        torch.cuda.set_rng_state(t["cuda"])
    pos, has_gauss = (int(v) for v in t["numpy_pos"])
    np.random.set_state(
        ("MT19937", t["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, float(t["numpy_gauss"]))
    )
    random.setstate((int(t["python_version"][0]), tuple(int(v) for v in t["python"]), None))


def check_resumed(done: int, total: int, key: str, ckpt) -> None:
    """A stage resumes from its own last checkpoint, and `key` is a budget (not in the fingerprint, so
    raising it continues). A checkpoint already past it (the key lowered since) cannot give a model
    of `total` steps: say so, rather than export a longer-trained model under the lower setting."""
    if done > total:
        raise ValueError(
            f"{key}={total}, but this stage's checkpoint ({ckpt}) is at {done}: set {key} to {done} or "
            f"more to finish from it, or delete the stage's work folder (<root>/<run>/.work/) to start over"
        )


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def export_engine(engine, out_dir, tokenizer_dir, rank: int) -> None:
    """A Hugging Face folder (safetensors in the training dtype + the tokenizer's files) from a live
    engine, streamed tensor by tensor (kiln/export.py): under ZeRO-3 each parameter is gathered in
    turn (a collective: every rank calls this); rank 0 writes it into a temporary folder that
    replaces `out_dir` once complete. Only the tensors are read from the engine (its config copied)."""
    from kiln.export import export_model

    export_model(engine.module, out_dir, rank=rank, engine=engine, tokenizer_dir=tokenizer_dir)


# ---------------------------------------------------------------------------------------------------- metrics


def all_reduce_mean(values: dict, device, local: dict | None = None) -> dict[str, float]:
    """Average scalar metrics (floats or 0-d tensors) over ranks: one collective, one host sync.
    `local`: 0-d tensors of this rank's own (not averaged), brought to the host in the same sync."""
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=device) for k in keys])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    own = sorted(local or {})
    if own:
        t = torch.cat([t, torch.stack([local[k].to(device=device, dtype=torch.float64) for k in own])])
    return dict(zip(keys + own, t.tolist(), strict=True))


@dataclass(frozen=True)
class HeldOutWindows:
    """The pretraining held-out windows a model stage scores by source: the first `count` of
    `heldout_windows` in the tokenize artifact's validation split (`tokens_dir`)."""

    tokens_dir: Path
    count: int

    @staticmethod
    def of(cfg, tokens_dir) -> HeldOutWindows:
        """The windows pretraining scores at each evaluation (eval_batches x workers micro-batches), so
        that every stage after it scores the same ones whatever its own number of workers."""
        p = cfg.pretrain
        return HeldOutWindows(Path(tokens_dir), p.eval_batches * p.num_workers * p.micro_batch_size)


def heldout_windows(n_val: int, n: int) -> np.ndarray:
    """`n` of a validation split's `n_val` windows spread evenly over it, the first among them: as the
    sources lie one after another, each gets its natural share."""
    n = min(n, n_val)
    return (np.arange(n) * n_val) // max(1, n)


def eval_share(ids: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's share of window `ids` (`kiln.chat_eval.rank_share`: every rank runs as many forward
    passes, each one collective under ZeRO-3), its padding as -1: scored, then left out."""
    from kiln.chat_eval import rank_share

    padded, real = rank_share(np.asarray(ids).tolist(), rank, world)
    return np.asarray(padded[:real] + [-1] * (len(padded) - real), dtype=np.int64)


def per_source_loss(logits_of, data, ids, micro: int, device) -> torch.Tensor:
    """Summed next-token loss of windows `ids` of `data` (a PackedTokens) by source: (2, sources + 2) float64 on
    the device, row 0 the sums of each window's mean token loss, row 1 the windows; column `sources` holds the
    windows of no source (packed data that does not keep its sources apart), the last one the padding (-1,
    `eval_share`). `logits_of(inputs)` is the model's (B, T, V) logits. Nothing waits for the host."""
    firsts = np.asarray([first for first, _ in data.sources.values()], dtype=np.int64)
    ends = np.asarray([first + n for first, n in data.sources.values()], dtype=np.int64)
    S = len(firsts)
    sums = torch.zeros(2, S + 2, dtype=torch.float64, device=device)
    for i in range(0, len(ids), micro):
        batch = np.asarray(ids[i : i + micro], dtype=np.int64)
        k = np.searchsorted(firsts, batch, side="right") - 1  # the source each window lies in
        inside = (k >= 0) & (batch < ends[np.clip(k, 0, None)]) if S else np.zeros(len(batch), bool)
        col = torch.as_tensor(np.where(batch < 0, S + 1, np.where(inside, k, S)), device=device)
        x, y = load_batch(data, np.where(batch < 0, 0, batch), device)
        logits = logits_of(x).float()  # (B, T, V)
        row = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)  # (B,)
        sums[0].index_add_(0, col, row.double())
        sums[1].index_add_(0, col, torch.ones_like(row, dtype=torch.float64))
    return sums


def loss_metrics(sums: torch.Tensor, sources: list[str], name: str) -> dict[str, float]:
    """`<name>` over every window scored and `<name>/<source>` over each source's, from `per_source_loss`
    sums added over the ranks (one collective, one host sync). A source with no window scored has no key."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    loss, windows = sums[:, :-1].tolist()  # the padding left out
    out = {name: sum(loss) / max(1.0, sum(windows))}
    return out | {f"{name}/{source}": loss[j] / windows[j] for j, source in enumerate(sources) if windows[j]}


def score_heldout(
    logits_of, held: HeldOutWindows, rank: int, world: int, micro: int, device, name: str
) -> dict:
    """`score_windows` of a model stage over the pretraining held-out windows `held`."""
    from data_prep.packed import PackedTokens

    return score_windows(
        logits_of, PackedTokens(held.tokens_dir, "val"), held.count, rank, world, micro, device, name
    )


def score_windows(logits_of, val, count: int, rank: int, world: int, micro: int, device, name: str) -> dict:
    """`loss_metrics` over `count` windows of the validation split `val` (a PackedTokens) spread over it
    (`heldout_windows`), each rank its share (`eval_share`), in micro-batches of `micro`."""
    ids = eval_share(heldout_windows(len(val), count), rank, world)
    with torch.no_grad():
        sums = per_source_loss(logits_of, val, ids, micro, device)
    return loss_metrics(sums, list(val.sources), name)


PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}  # dense bf16/fp16


def peak_flops(device) -> float | None:
    """Dense bf16 peak of the accelerator, for MFU; None on CPU (no meaningful peak)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


# ---------------------------------------------------------------------------------------------------- workers


def worker_device(wctx):
    """This worker's device: its local GPU (made current), or the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(wctx.local_rank)
        return torch.device("cuda", wctx.local_rank)
    return torch.device("cpu")


STALE_BUILD_LOCK_S = 600
"""A JIT build's lock file older than this is a killed build's: builds take a minute or two."""


def extension_cache() -> None:
    """Before DeepSpeed starts a process group: on CPU it JIT-compiles a C++ op for collectives
    (shm comm) into torch's extension cache, under a lock file that a process killed mid-build leaves
    behind, and every later build then waits on it forever. Each Python environment gets its own
    cache (two environments sharing one rebuild each other's op), and a lock older than
    STALE_BUILD_LOCK_S is removed with a warning."""
    import sys
    import time

    cache = Path(os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions")))
    for lock in cache.glob("*/lock"):
        try:
            age = time.time() - lock.stat().st_mtime
            if age > STALE_BUILD_LOCK_S:
                lock.unlink()
                log.warning("removed %s, a JIT build's lock left %.0f s ago by a killed process", lock, age)
        except FileNotFoundError:  # the build it guarded just finished
            pass


def init_distributed(device, timeout_min: float) -> None:
    """Join the process group unless the launcher did (Ray Train's TorchConfig does, with the same
    timeout): NCCL on GPUs, gloo on CPU. A collective that waits more than `timeout_min` minutes for
    the other ranks fails (`collective_timeouts` names it)."""
    extension_cache()
    if torch.distributed.is_initialized():
        return
    import deepspeed

    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=timeout_min))


class CollectiveTimeout(RuntimeError):
    """A collective waited past the stage's collective_timeout_min: a rank hangs or is gone."""


@contextmanager
def collective_timeouts(stage: str, rank: int, world: int, timeout_min: float):
    """Turns a collective's timeout inside the block into a `CollectiveTimeout` naming this rank, the
    collective and the code that called it; the worker fails with it, and Ray Train restarts the group
    from its last checkpoint (max_failures), as for any dead worker. NCCL's watchdog ends the process
    itself, after logging the rank and the collective (OpType) it timed out in."""
    try:
        yield
    except RuntimeError as e:
        text = str(e)
        collective, caller = _collective_of(e.__traceback__)
        distributed = collective != "unknown" or isinstance(e, torch.distributed.DistError)
        timed_out = any(w in text.lower() for w in ("timed out", "timeout"))
        if isinstance(e, CollectiveTimeout) or not (distributed and timed_out):
            raise
        raise CollectiveTimeout(
            f"{stage}: rank {rank} of {world} waited more than {stage}.collective_timeout_min={timeout_min:g} min "
            f"in the collective {collective} (called from {caller}) for the other ranks: one of them hangs or "
            f"died (see its log). The group restarts from its last checkpoint. ({text.strip()[:300]})"
        ) from e


def _collective_of(tb) -> tuple[str, str]:
    """(the torch.distributed / deepspeed.comm function a traceback failed in, the innermost project
    frame that called it as path:line function)."""
    collective, caller = "unknown", "unknown"
    root = Path(__file__).resolve().parent.parent
    for frame, line in traceback.walk_tb(tb):
        path = frame.f_code.co_filename.replace(os.sep, "/")
        name = frame.f_code.co_name
        if "torch/distributed/" in path and not name.startswith("_") and name != "wrapper":
            collective = name
        elif "deepspeed/comm/" in path and collective == "unknown" and name != "log_wrapper":
            collective = name
        elif path.startswith(root.as_posix() + "/") and "/site-packages/" not in path:
            caller = f"{Path(path).relative_to(root).as_posix()}:{line} {name}"
    return collective, caller


def trainable(model, checkpointing: bool):
    """Training mode for a model that is updated: `from_pretrained` returns eval mode, in which
    transformers does not recompute checkpointed layers (activation checkpointing would save nothing). Dropout
    is 0 (loaded so; as TRL's `disable_dropout`), so the mode changes no output: the rollout's
    logprobs and values and the update's are the same function of the weights."""
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    return model


def engine(model, p, lr, accum, world):
    """A DeepSpeed training engine around `model` with AdamW, as config section `p` (a worker-group
    section: zero_stage, precision, micro_batch_size, grad_clip, weight_decay) configures it."""
    import deepspeed

    optimizer = adamw(model, lr=lr, betas=(0.9, 0.95), weight_decay=p.weight_decay)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=engine_config(p, accum, world))
    return engine


def engine_config(p, accum, world, offload_params: bool = False) -> dict:
    """The DeepSpeed config `engine` gives its engines (section `p`, `accum` micro-steps, `world` ranks);
    with `offload_params` (ZeRO-3) the parameters' partitions in CPU memory, as `frozen(offload=True)`
    keeps them: the config ppo builds its frozen models under."""
    return deepspeed_config(
        zero_stage=p.zero_stage, precision=p.precision, micro_batch_size=p.micro_batch_size,
        grad_accum=accum, world_size=world, grad_clip=p.grad_clip, offload_params=offload_params,
        **comm_options(p),
    )  # fmt: skip


def frozen(model, p, device, offload: bool = False):
    """A model that only scores: under ZeRO-3 a DeepSpeed inference engine that shards it (section `p`'s
    zero_stage, micro_batch_size, precision; called as the model is, and `gathered` takes it), else
    the model on the device. `offload` (ZeRO-3 only): DeepSpeed's parameter offload, the partitions
    kept in CPU memory and copied to the device when gathered; a model built partitioned keeps them
    where its build put them, so build it under the same offload (`engine_config(offload_params=True)`)."""
    model.requires_grad_(False).eval()
    if offload and p.zero_stage != 3:
        raise ValueError(f"frozen: parameter offload is ZeRO-3's, and zero_stage is {p.zero_stage}")
    if p.zero_stage == 3:
        import deepspeed

        gather = zero3_gather(
            p.zero3_persistence_threshold, p.zero3_max_reuse_distance, p.zero3_prefetch_bucket_size,
            p.zero3_shard_within,
        )  # fmt: skip
        zero = {"stage": 3, **gather}
        if offload:
            zero["offload_param"] = param_offload()
        config = {
            "train_micro_batch_size_per_gpu": p.micro_batch_size,
            "zero_optimization": zero,
            "bf16": {"enabled": p.precision == "bf16"},
            "fp16": {"enabled": p.precision == "fp16"},
        }
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()  # the model's mode; DeepSpeed's `eval` leaves the engine's own flag, which callers read
        engine.training = False
        return engine
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(p.precision, torch.float32)
    return model.to(device=device, dtype=dtype)


@contextmanager
def gathered(*engines, enabled: bool = True):
    """The ZeRO-3 engines among `engines` with their parameters gathered whole once for the block,
    and their ZeRO-3 hooks off meanwhile: a forward pass inside calls no collective, where a ZeRO-3
    forward gathers every partitioned parameter again (in sampling, at every token). A rank may then
    run more or fewer forward passes than the others. As TRL's `unwrap_model_for_generation`: its
    `remove_hooks` / `add_hooks`, and here also the start-of-forward hook of the root module paused
    (its trace bookkeeping broadcasts while a trace is recorded, which `add_hooks` restarts).

    Every rank enters and leaves together (the gather and the release are collectives); parameters
    are read, not updated, inside. Each rank holds the whole of these models for the block (as TRL and
    OpenRLHF do for generation): `enabled=False` (a model too large to gather) leaves the block as it
    is, and so do models below ZeRO-3 (None among `engines` is skipped). Yields whether it gathered."""
    zero3 = [e for e in engines if enabled and _partitions_weights(e)]
    if not zero3:
        yield False
        return
    import deepspeed
    from trl.models.utils import add_hooks, remove_hooks

    with ExitStack() as stack:
        for e in zero3:
            stack.enter_context(deepspeed.zero.GatheredParameters(list(e.module.parameters())))
        paused = []
        try:
            for e in zero3:
                remove_hooks(e)
                paused.append((e, _pause_start_of_forward(e)))
            yield True
        finally:
            for e, resume in reversed(paused):
                resume()
                add_hooks(e)  # re-registers the hooks and invalidates the trace: the next forward records it


def _partitions_weights(engine) -> bool:
    return engine is not None and getattr(engine, "zero_optimization_partition_weights", lambda: False)()


def zero3_offload(engine):
    """What holds a ZeRO-3 engine's parameter hooks (DeepSpeed's DeepSpeedZeRoOffload): a training
    engine's optimizer's, an inference engine's optimizer itself (as TRL's `remove_hooks` finds it)."""
    return getattr(engine.optimizer, "parameter_offload", engine.optimizer)


def _pause_start_of_forward(engine):
    """Replaces the ZeRO-3 root module's start-of-forward hook by a no-op, in place (hook order kept);
    returns what puts it back."""
    offload = zero3_offload(engine)
    hooks, key = offload.module._forward_pre_hooks, offload.fwd_pre_hook.id
    hook = hooks[key]
    hooks[key] = lambda *_: None

    def resume():
        hooks[key] = hook

    return resume


ALLGATHER_METHODS = ("all_gather", "all_gather_into_tensor", "all_gather_base", "all_gather_coalesced")
"""The all-gather methods of DeepSpeed's communication backend (`deepspeed.comm.comm.cdb`, which the
engines make: torch.distributed underneath). deepspeed.comm's all-gathers (`allgather_fn`,
`all_gather_into_tensor`, `all_gather`, `all_gather_coalesced`) each call one of them once, ZeRO-3's
parameter fetches among them: in DeepSpeed 0.19 (measured on gloo; NCCL takes the same path), one
`all_gather_into_tensor` per partitioned parameter fetched, those of a module or of a
GatheredParameters launched together."""


class Count:
    """A running count (`counted_allgathers`)."""

    def __init__(self):
        self.n = 0


@contextmanager
def counted_allgathers():
    """Counts the all-gather calls this rank makes through DeepSpeed's communication backend inside
    the block (`ALLGATHER_METHODS`): calls, whatever their size; the project's own metric and
    object gathers (torch.distributed directly) are not counted. Yields a `Count` (`.n`, read at
    any time). Without a DeepSpeed process group it counts 0."""
    from deepspeed.comm import comm

    count, backend = Count(), comm.cdb
    saved = {name: vars(backend).get(name) for name in ALLGATHER_METHODS} if backend is not None else {}
    for name in saved:
        call = getattr(backend, name)

        def counting(*args, _call=call, **kwargs):
            count.n += 1
            return _call(*args, **kwargs)

        setattr(backend, name, counting)
    try:
        yield count
    finally:
        for name, before in saved.items():  # an outer count's wrapper, or the class's method
            if before is None:
                delattr(backend, name)
            else:
                setattr(backend, name, before)
