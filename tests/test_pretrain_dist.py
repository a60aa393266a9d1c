"""Pretraining on 2 CPU ranks (gloo) against a plain single-process PyTorch loop.

ZeRO 0/1/2/3 x {fp32, bf16}: the first steps' losses equal a plain loop over the same global batch
(fp32 within 1e-5); gradient accumulation 4x1 equals 1x4. The ranks run under torchrun once for all
cases (tests/dist/pretrain_cases.py); the reference runs here.
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

import pytest
import torch

from kiln import training as T
from tests.dist.common import CASES, MODEL, PRETRAIN, SEED, STEPS, VOCAB, model_for, tokens_dir

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ranks_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist-pretrain")
    tokens_dir(out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           str(ROOT / "tests/dist/pretrain_cases.py"), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out


def losses(out: Path, case: str) -> list[float]:
    rows = [json.loads(line) for line in (out / case / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return [r["loss"] for r in rows]


def reference_losses(tokens: Path, case: str) -> list[float]:
    """The same training, written as a plain loop: one process, the whole global batch."""
    from data_prep.packed import PackedTokens
    from kiln.model import KilnForCausalLM, build_config

    pcfg = replace(PRETRAIN, **CASES[case])
    torch.manual_seed(SEED)
    model = KilnForCausalLM(build_config(model_for(case), VOCAB, 0, 1, None))
    opt = T.adamw(model, lr=pcfg.lr, betas=(pcfg.beta1, pcfg.beta2), weight_decay=pcfg.weight_decay)
    data = PackedTokens(tokens, "train")
    world, micro = pcfg.num_workers, pcfg.micro_batch_size
    accum = pcfg.global_batch_size // (world * micro)
    out = []
    for step in range(STEPS):
        for g in opt.param_groups:
            g["lr"] = T.lr_at(step, lr=pcfg.lr, min_lr=pcfg.min_lr, warmup=pcfg.warmup_steps, total=STEPS)
        ids = T.global_batch(step, pcfg.global_batch_size, len(data), SEED)
        micro_losses = []
        for a in range(accum):  # every (micro-step, rank) slice, as the ranks see them
            for rank in range(world):
                x, y = T.load_batch(data, T.micro_batch(ids, a, rank, world, micro), "cpu")
                micro_losses.append(model(input_ids=x, shift_labels=y).loss)
        loss = torch.stack(micro_losses).mean()  # DeepSpeed averages over ranks and micro-steps
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), pcfg.grad_clip)
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
    return out


@pytest.mark.timeout(900)
@pytest.mark.parametrize("case", list(CASES))
def test_distributed_losses_match_a_plain_loop(ranks_out, case):
    got, want = losses(ranks_out, case), reference_losses(ranks_out / "tokens", case)
    if "bf16" in case:
        # bf16 keeps 8 bits of mantissa: weights and activations round at ~4e-3 relative, and the
        # loss (~5.5 here) moves by a few 1e-2 over three steps at lr 1e-2. fp32 master weights
        # keep the runs from drifting apart, so 0.05 absolute separates "same training" from not.
        assert got == pytest.approx(want, abs=5e-2), (case, got, want)
    else:
        assert got == pytest.approx(want, abs=1e-5, rel=0), (case, got, want)


@pytest.mark.timeout(900)
def test_gradient_accumulation_4x1_equals_1x4(ranks_out):
    a, b = losses(ranks_out, "accum-4x1"), losses(ranks_out, "accum-1x4")
    assert a == pytest.approx(b, abs=1e-5, rel=0)


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
        ids = T.micro_batch_ids(start, total, batch, len(data), SEED, accum, rank, world, micro)
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
