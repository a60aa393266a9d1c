"""Pretraining on CPU ranks (gloo) against an independent single-process PyTorch loop.

One torchrun launch (tests/dist/pretrain_cases.py) trains every case: ZeRO 0/1/2/3 x {fp32, bf16} (a
small MoE, 2 ranks x 2 micro-steps, 3 steps) and a dense model on the same global batch of 8 sequences
cut five ways (ranks x micro-steps 2x1, 2x2, 2x4, 1x1, 1x4; 5 steps, the last two on the cosine part of
the schedule). Each run is compared with tests/dist/reference.py, written from the documentation and not
from the stage's helpers, on what it trained on and at which learning rate, its losses, its gradient
norm before clipping at every step, and every parameter of the model it exports after the last step.

Why the gradient norm: AdamW's update m / (sqrt(v) + eps) hardly changes when every gradient is
multiplied by the same factor, so a sum where the mean over ranks or micro-steps belongs moves the losses
and the weights only through clipping and eps (measured: the loss by 2e-5 relative, the weights by 1-2 %
of their movement); the norm, which DeepSpeed takes before clipping, is 2x or 4x too large. Tolerances:
measured with `python bench/pretrain_equivalence.py` (on this code and on a copy with a broken average),
set 6x to 15x above the correct code's error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from datetime import timedelta
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kiln import training as T
from tests.dist.common import CASES, DENSE_CASES, MODEL, PRETRAIN, SEED, VOCAB, tokens_dir, torchrun
from tests.dist.reference import errors, for_case, schedule

ROOT = Path(__file__).resolve().parent.parent

# fp32, 2 gloo ranks against one process, measured: losses within 8.6e-8 relative, gradient norms within
# 6.9e-7 (sums of the same terms in another order: a few float32 epsilons, 1.2e-7), weights within 1.7e-5
# absolute and 7.9e-6 of how far training moved them. The element-wise error is the largest because Adam
# divides each gradient by its own magnitude: the few weights (tens of 40k) whose gradient is near zero
# turn a rounding difference into an update difference. Each tolerance is 6x or more above those. A
# gradient summed over 2 ranks instead of averaged: norm error 1.0, loss 3.5e-6 (MoE) to 2.1e-5 (dense),
# weights 3.4e-3 to 1.2e-2 absolute, 0.9-1.8 % of their movement; over 4 micro-steps: norm error 3.0.
FP32_LOSS, FP32_GRAD_NORM, FP32_PARAM_ABS, FP32_PARAM_REL = 1e-6, 1e-5, 1e-4, 1e-4
# bf16 keeps 8 significant bits: one rounding is off by up to 2^-9 relative, and one ulp is 2^-8. The
# loss and the gradient norm are means and sums over thousands of rounded values whose errors average
# out, so before any update (step 1: the same weights, the same batch) they stay within one ulp of fp32
# (measured: 1.4e-5 and 8.0e-5). After updates the bf16 run follows its own trajectory (Adam's first step
# is about lr * sign(g), and bf16 flips the sign of near-zero gradients), so later steps are held to the
# loss only (measured within 4.0e-4), and the weights (17-29 % of their movement apart) not at all.
BF16_ULP = 2.0**-8
NO_GRAD_NORM = {"zero0-fp32"}  # DeepSpeed 0.19 keeps no norm for a plain torch optimizer without ZeRO


@pytest.fixture(scope="module")
def ranks_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist-pretrain")
    tokens_dir(out)
    torchrun(ROOT / "tests/dist/pretrain_cases.py", out, timeout=600)
    return out


def section(case: str):
    return replace(PRETRAIN, **CASES[case])


def metrics(out: Path, case: str) -> list[dict]:
    rows = [json.loads(line) for line in (out / case / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, section(case).steps + 1))
    return rows


def exported(out: Path, case: str) -> dict[str, torch.Tensor]:
    return load_file(out / case / "export" / "model.safetensors")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", list(CASES))
def test_distributed_training_matches_an_independent_plain_loop(ranks_out, case):
    rows, want = metrics(ranks_out, case), for_case(ranks_out / "tokens", case)
    # each step trained on the documented global batch, at the documented learning rate
    assert [r["batch_crc"] for r in rows] == want.batch_crcs, case
    assert [r["lr"] for r in rows] == pytest.approx(want.lrs, rel=1e-12), case
    if case not in NO_GRAD_NORM:
        assert all("grad_norm" in r for r in rows), case  # the sum-or-mean evidence
    e = errors(rows, exported(ranks_out, case), want)
    if "bf16" in case:  # against fp32: bf16's precision, not the loss's change over the steps
        assert e["grad_norm_1"] <= BF16_ULP and e["loss_1"] <= BF16_ULP, (case, e)
        assert e["loss"] <= BF16_ULP, (case, e)
        return
    assert case in NO_GRAD_NORM or e["grad_norm"] <= FP32_GRAD_NORM, (case, e)  # every step, before clipping
    assert e["loss"] <= FP32_LOSS, (case, e)
    if "compiled" in case:  # fused kernels sum in another order; AdamW's step, g / sqrt(v), turns a last-bit
        # gradient difference on a coordinate whose v is near zero into up to lr: the weights within 0.1 % of
        # how far the training moved them, the losses and gradient norms as tight as any fp32 case
        assert e["param_rel"] <= 10 * FP32_PARAM_REL, (case, e)
        return
    assert e["param_max"] <= FP32_PARAM_ABS and e["param_rel"] <= FP32_PARAM_REL, (case, e)


@pytest.mark.timeout(900)
def test_every_cut_of_the_global_batch_trains_the_model_of_one_rank_without_accumulation(ranks_out):
    """Without the reference: 2x1, 2x2, 2x4 and 1x4 (ranks x micro-steps) against 1x1, which averages
    nothing. A sum over ranks or micro-steps would make that case's gradient norm 2x or 4x 1x1's."""
    one, one_params = metrics(ranks_out, "dense-1x1"), exported(ranks_out, "dense-1x1")
    for case in sorted(DENSE_CASES - {"dense-1x1"}):
        rows, params = metrics(ranks_out, case), exported(ranks_out, case)
        norms, losses = [r["grad_norm"] for r in rows], [r["loss"] for r in rows]
        assert norms == pytest.approx([r["grad_norm"] for r in one], rel=FP32_GRAD_NORM), case
        assert losses == pytest.approx([r["loss"] for r in one], rel=FP32_LOSS), case
        for name, value in one_params.items():
            torch.testing.assert_close(params[name], value, rtol=0, atol=FP32_PARAM_ABS, msg=name)


def test_global_batches_walk_one_seeded_permutation_per_epoch():
    """The reference takes its global batches' ids from `global_batch`; they are checked here on their own."""
    n, batch, seed = 5, 3, 7
    stream = np.concatenate([T.global_batch(step, batch, n, seed) for step in range(5)])  # 3 epochs
    # the order seed 7 gives, written out: a batch runs over an epoch's end into the next epoch's order
    assert stream.tolist() == [2, 0, 4, 1, 3, 3, 0, 2, 1, 4, 0, 2, 1, 3, 4]
    epochs = stream.reshape(3, n)
    assert all(sorted(e) == list(range(n)) for e in epochs)  # each sequence once per epoch
    assert len({tuple(e) for e in epochs}) == 3  # in a new order each epoch
    other_seed = np.concatenate([T.global_batch(step, batch, n, seed + 1) for step in range(5)])
    assert not np.array_equal(other_seed, stream)
    # the distributed cases: 5 steps of 8 of the 64 sequences, 40 different ones
    ids = np.concatenate([T.global_batch(step, 8, 64, SEED) for step in range(5)])
    assert len(set(ids.tolist())) == 40 and ids.min() >= 0 and ids.max() < 64


def test_the_reference_schedule_warms_up_linearly_then_follows_the_cosine_to_min_lr():
    lrs = [schedule(s, lr=1.0, min_lr=0.1, warmup=2, total=6) for s in range(7)]
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.1 + 0.9 * 0.85355339, 0.55, 0.1 + 0.9 * 0.14644661, 0.1])


def test_fp16_deepspeed_config_uses_dynamic_loss_scaling():
    cfg = T.deepspeed_config(
        zero_stage=2, precision="fp16", micro_batch_size=4, grad_accum=2, world_size=8, grad_clip=1.0
    )
    assert cfg["fp16"]["enabled"] and not cfg["bf16"]["enabled"]
    assert cfg["fp16"]["loss_scale"] == 0  # 0 = dynamic
    assert cfg["fp16"]["initial_scale_power"] == 16 and cfg["fp16"]["loss_scale_window"] == 1000
    assert cfg["train_batch_size"] == 4 * 2 * 8 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["zero_optimization"]["stage"] == 2


def test_bad_pretrain_configuration_fails_before_any_worker():
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(
            None,
            ["pretrain.precision=fp16", "pretrain.global_batch_size=10", "pretrain.zero_stage=3",
             "pretrain.compile=true", "pretrain.offload_params=true", "pretrain.zero_stage=1"],
        )  # fmt: skip
    text = str(e.value)
    assert "pretrain.precision: fp16" in text and "use bf16 or fp32" in text
    assert "pretrain.global_batch_size: 10 is not divisible" in text
    assert "pretrain.offload_params" in text
    with pytest.raises(ConfigError, match="pretrain.compile: ZeRO-3"):
        load_config(None, ["pretrain.zero_stage=3", "pretrain.compile=true"])


# ---------------------------------------------------------------------------------------------------- communication

COMM = dict(
    precision="bf16", zero_stage=3, num_workers=2, grad_reduce_dtype="bf16", zero3_persistence_threshold=1_000,
    zero3_max_reuse_distance=2_000, zero3_prefetch_bucket_size=3_000, zero3_shard_within=2, collective_timeout_min=0.5,
)  # fmt: skip
"""Every communication key away from its default, for each training stage's section."""


def comm_overrides(section: str, **more) -> list[str]:
    return [f"{section}.{k}={v}" for k, v in {**COMM, **more}.items()]


def assert_comm_settings(ds: dict) -> None:
    """`ds` is the DeepSpeed dict of a section set as COMM, and DeepSpeed 0.19 reads it so."""
    from deepspeed.runtime.config import get_communication_data_type
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero = DeepSpeedZeroConfig(**ds["zero_optimization"])  # DeepSpeed's names for the keys, no typo
    assert get_communication_data_type(ds) == torch.bfloat16
    assert zero.overlap_comm is True and zero.stage == 3
    assert (zero.param_persistence_threshold, zero.max_reuse_distance, zero.prefetch_bucket_size) == (
        1_000, 2_000, 3_000
    )  # fmt: skip
    assert zero.zero_hpz_partition_size == 2


class Captured(Exception):
    """Stops a worker at the call a test patched, with that call's arguments."""

    def __init__(self, args, kwargs):
        super().__init__()
        self.args, self.kwargs = args, kwargs


def capture(*args, **kwargs):
    raise Captured(args, kwargs)


def test_default_communication_settings_are_deepspeeds_but_overlap_and_fp32_reduction():
    from deepspeed.runtime.config import get_communication_data_type
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from pipeline.config import WorkerGroupConfig

    p = WorkerGroupConfig(zero_stage=3, precision="bf16")
    ds = T.deepspeed_config(
        zero_stage=3, precision="bf16", micro_batch_size=2, grad_accum=1, world_size=2, grad_clip=1.0,
        **T.comm_options(p),
    )  # fmt: skip
    assert get_communication_data_type(ds) == torch.float32  # bf16 gradients summed in fp32
    ours, theirs = DeepSpeedZeroConfig(**ds["zero_optimization"]), DeepSpeedZeroConfig(stage=3)
    for key in ("param_persistence_threshold", "max_reuse_distance", "prefetch_bucket_size"):
        assert getattr(ours, key) == getattr(theirs, key), key  # the keys' defaults are DeepSpeed's
    assert "zero_hpz_partition_size" not in ds["zero_optimization"]  # hpZ off
    for stage in (1, 2, 3):
        zero = T.deepspeed_config(
            zero_stage=stage, precision="fp32", micro_batch_size=2, grad_accum=1, world_size=2, grad_clip=1.0
        )["zero_optimization"]
        assert zero["overlap_comm"] is True, stage  # every backend: gloo measured (bench/comm_settings.py)


def test_pretrain_builds_its_engine_with_the_sections_communication_settings(tmp_path, monkeypatch):
    import deepspeed

    from pipeline.config import load_config
    from pipeline.context import EnvWorkerContext
    from stages.pretrain import PretrainJob, Vocab, train_worker

    section = load_config(None, comm_overrides("pretrain", micro_batch_size=2, global_batch_size=8)).pretrain
    job = PretrainJob(
        section=section, model=MODEL, seed=SEED, tokens_dir=tokens_dir(tmp_path), tokenizer_dir=tmp_path,
        vocab=Vocab(size=VOCAB, pad=0, eos=1, bos=None), export_dir=tmp_path / "export", wandb_run_id=None,
    )  # fmt: skip
    joined = []
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: joined.append(kw))
    monkeypatch.setattr(deepspeed, "initialize", capture)
    with pytest.raises(Captured) as got:
        train_worker(job, EnvWorkerContext(tmp_path / "run"))
    assert_comm_settings(got.value.kwargs["config"])
    assert joined == [{"dist_backend": "gloo", "timeout": timedelta(seconds=30)}]


def test_trl_stages_and_ppo_build_their_engines_with_the_sections_communication_settings(monkeypatch):
    import deepspeed

    from kiln.trl_bridge import trainer_args
    from pipeline.config import load_config

    for section in ("sft", "reward"):
        s = getattr(load_config(None, comm_overrides(section, micro_batch_size=4)), section)
        args = trainer_args(s, 7, world=2, output_dir="/tmp/x", fresh=True)
        assert_comm_settings(args["deepspeed"])
        assert args["ddp_timeout"] == 30  # seconds, where accelerate makes the process group
    p = load_config(None, comm_overrides("ppo", micro_batch_size=8)).ppo
    monkeypatch.setattr(deepspeed, "initialize", capture)
    with pytest.raises(Captured) as got:
        T.engine(torch.nn.Linear(4, 4), p, 1e-3, 1, 2)  # the actor's and the critic's
    assert_comm_settings(got.value.kwargs["config"])
    with pytest.raises(Captured) as got:
        T.frozen(torch.nn.Linear(4, 4), p, torch.device("cpu"))  # the reference and reward models
    zero = got.value.kwargs["config"]["zero_optimization"]
    assert zero == {"stage": 3, **T.zero3_gather(1_000, 2_000, 3_000, 2)}


def test_the_collective_timeout_reaches_ray_trains_process_group_and_the_workers_own(monkeypatch):
    import deepspeed

    from pipeline.config import load_config
    from pipeline.context import Scaling
    from pipeline.ray_context import torch_config
    from stages.ppo import PpoJob
    from stages.ppo import train_worker as ppo_worker

    cfg = load_config(None, ["pretrain.collective_timeout_min=0.5", "ppo.collective_timeout_min=2"])
    assert Scaling.of(cfg.pretrain).collective_timeout_s == 30
    tc = torch_config(Scaling.of(cfg.pretrain))
    assert (tc.backend, tc.timeout_s) == ("gloo", 30)
    assert torch_config(Scaling(gpus_per_worker=1, collective_timeout_s=0.2)).timeout_s == 1
    # where no launcher made the process group (torchrun, one process), the worker makes it
    monkeypatch.setattr(deepspeed, "init_distributed", capture)
    job = PpoJob(
        section=cfg.ppo, seed=1, export_dir=Path("/nonexistent"), wandb_run_id=None, sft_dir=Path("/nonexistent"),
        reward_dir=Path("/nonexistent"), reward_mean=0.0, reward_std=1.0, value_norm=(0.0, 1.0), prompts=[],
        task_prompts=[],
    )  # fmt: skip

    class Rank0:
        rank, world_size, local_rank = 0, 1, 0

    threads = torch.get_num_threads()  # the PPO worker sets its CPU share
    try:
        with pytest.raises(Captured) as got:
            ppo_worker(job, Rank0())
    finally:
        torch.set_num_threads(threads)
    assert got.value.kwargs == {"dist_backend": "gloo", "timeout": timedelta(minutes=2)}


@pytest.mark.timeout(120)
def test_a_rank_that_skips_a_collective_fails_the_other_within_the_timeout_naming_it():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(ROOT / "tests/dist/collective_timeout.py"), "5"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=100)
    assert proc.returncode != 0, proc.stdout[-3000:]
    failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED after")]
    assert len(failed) == 1, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    seconds = float(failed[0].split()[2])
    assert 4.5 <= seconds < 15, failed[0]  # the 5 s timeout, not torch's 30 min
    msg = failed[0]
    assert "pretrain: rank 0 of 2" in msg and "pretrain.collective_timeout_min" in msg
    assert "the collective all_reduce (called from kiln/training.py:" in msg and "all_reduce_mean" in msg


# ---------------------------------------------------------------------------------------------------- input


def test_prefetched_micro_batches_are_the_loops_own_in_its_order(tmp_path):
    from data_prep.packed import PackedTokens

    data = PackedTokens(tokens_dir(tmp_path), "train")
    start, total, batch, accum, world, micro = 3, 7, 8, 2, 2, 2
    for rank in range(world):
        want = [
            T.load_batch(data, T.micro_batch(T.global_batch(s, batch, len(data), SEED), a, rank, world, micro), "cpu")
            for s in range(start, total)
            for a in range(accum)
        ]  # fmt: skip
        draw = partial(T.global_batch, batch=batch, n=len(data), seed=SEED)
        ids = T.micro_batch_ids(start, total, draw, accum, rank, world, micro)
        got = [T.to_device(w, torch.device("cpu")) for w in T.prefetched(partial(T.read_windows, data), ids)]
        assert len(got) == len(want) == (total - start) * accum
        for (gx, gy), (wx, wy) in zip(got, want, strict=True):
            assert torch.equal(gx, wx) and torch.equal(gy, wy) and gx.dtype == torch.int64

    def read(i):
        if i == 2:
            raise ValueError("bad shard")
        return i

    it = T.prefetched(read, range(5))
    assert [next(it), next(it)] == [0, 1]
    with pytest.raises(ValueError, match="bad shard"):
        next(it)  # raised where its item is taken, not earlier


def test_expert_load_is_logged_per_moe_layer_and_a_collapsed_layer_heads_the_imbalance():
    from stages.pretrain import expert_imbalance, moe_metrics

    load = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0]])  # MoE layers 1 (balanced), 3 (collapsed)
    got = {k: float(v) for k, v in moe_metrics({"expert_load": load, "dropped_frac": torch.tensor([0.1, 0.3])}, [1, 3]).items()}  # fmt: skip
    assert got == pytest.approx(
        {"expert_load_0": 2 / 3, "expert_load_1": 1 / 6, "expert_load_2": 1 / 6, "dropped_frac": 0.2}
        | {f"expert_load_l1_{e}": 1 / 3 for e in range(3)}
        | {"expert_load_l3_0": 1.0, "expert_load_l3_1": 0.0, "expert_load_l3_2": 0.0}
    )
    assert expert_imbalance(got) == pytest.approx(
        {"expert_imbalance_l1": 1.0, "expert_imbalance_l3": 3.0, "expert_imbalance": 3.0}
    )
    assert expert_imbalance({"loss": 1.0}) == {}  # a dense model
