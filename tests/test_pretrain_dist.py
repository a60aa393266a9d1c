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
from pathlib import Path

import pytest
import torch

from kiln import training as T
from tests.dist.common import CASES, PRETRAIN, SEED, STEPS, VOCAB, model_for, tokens_dir

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
