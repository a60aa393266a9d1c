"""The plan before launch (`run --dry-run`): parameter counts exactly the model's, ZeRO memory and
communication as DeepSpeed lays them out, the preset's true size, warnings that name the keys.
(bench/comm_volume.py and bench/pretrain.py --memory-only compare the plan with DeepSpeed itself.)"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest
import torch

from kiln import capacity as C
from kiln.model_fields import hf_values
from pipeline.config import PROJECT_ROOT, ModelConfig, load_config
from pipeline.sizing import plan_of

PRESET = PROJECT_ROOT / "configs" / "multinode-moe.yaml"
MODELS = {
    "tiny": ModelConfig(),
    "dense gelu layernorm bias learned tied": ModelConfig(
        n_experts=0, activation="gelu", norm="layernorm", bias=True, position="learned", tie_embeddings=True
    ),
    "moe every other layer": ModelConfig(n_layers=3, moe_every=2, moe_d_ff=100, top_k=1),
    "the multi-node preset": load_config(PRESET).model,
}


@pytest.mark.parametrize("name", MODELS)
def test_parameter_tensors_are_the_models_own(name):
    from kiln.model import KilnForCausalLM, KilnForSequenceClassification, build_config

    section = MODELS[name]
    m = hf_values(section)
    with torch.device("meta"):  # no memory: the preset's 4B parameters build in a moment
        lm = KilnForCausalLM(build_config(section, 1000, 0, 1))
        config = build_config(section, 1000, 0, 1)
        config.num_labels = 1
        rm = KilnForSequenceClassification(config)
    for model, value_head in ((lm, False), (rm, True)):
        tensors = C.parameter_tensors(m, 1000, value_head=value_head)
        assert [(t.name, t.numel) for t in tensors] == [(n, p.numel()) for n, p in model.named_parameters()]
    tensors = C.parameter_tensors(m, 1000)
    assert C.active_parameters(tensors, m) == lm.num_parameters_active()
    assert C.flops_per_token(tensors, m, 512) == lm.flops_per_token(512)


def test_lora_parameters_are_what_peft_adds():
    from peft import LoraConfig, get_peft_model

    from kiln.model import KilnForCausalLM, build_config

    section = ModelConfig(n_layers=2)
    model = get_peft_model(
        KilnForCausalLM(build_config(section, 300, 0, 1)),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"),
    )
    added = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tensors = C.parameter_tensors(hf_values(section), 300)
    assert C.lora_parameters(tensors, 4, ("q_proj", "v_proj", "down_proj")) == added


def test_zero_memory_and_communication_per_rank_follow_the_stage():
    tensors = [C.Tensor(f"w{i}", 1_000_000, i) for i in range(10)]  # Ψ = 10M, nothing persistent
    psi = 10_000_000

    def cost(z, accum=1, precision="fp32"):
        s = C.Setup(
            world=4, zero_stage=z, precision=precision, micro_batch_size=1, grad_accum=accum, seq_len=8
        )
        return C.training_cost(tensors, s)

    states = ("weights", "gradients", "optimizer")
    per_param = {z: sum(cost(z).memory[k] for k in states) / psi for z in range(4)}
    assert per_param == {
        0: 16,
        1: 4 + 16 / 4,
        2: 4 + 16 / 4,
        3: 20 / 4,
    }  # fp32 Adam + DeepSpeed's fp32 partition
    assert cost(3).memory["zero3_gathered"] == 4 * psi  # a model this small is gathered whole
    assert cost(1, accum=2).memory["gradients"] == 4 * psi  # ZeRO-1 holds every gradient until the step
    assert cost(1, accum=4).comm == {"all_reduce": 4 * psi, "all_gather": 4 * psi}  # once per step
    assert cost(2, accum=4).comm["all_reduce"] == 4 * 4 * psi  # ZeRO-2: at every micro-step
    assert cost(3, accum=4).comm == {"all_gather": 4 * 4 * psi, "reduce_scatter": 4 * 4 * psi}
    bf16 = cost(1, precision="bf16")  # gradients reduced in fp32 by default, weights gathered in bf16
    assert bf16.comm == {"all_reduce": 4 * psi, "all_gather": 2 * psi}
    assert sum(bf16.memory[k] for k in states) == 2 * psi + (2 + 12) * psi // 4


def _dry_run_json(*args) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "launch.py", "run", *args, "--dry-run", "--json"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.stdout, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_dry_run_json_gives_the_presets_true_size_and_its_header_quotes_it():
    rows = {r["stage"]: r for r in _dry_run_json(str(PRESET))}
    plan = rows["pretrain"]["plan"]
    assert plan["params_total"] == 4_120_152_064 and plan["params_active"] == 1_628_735_488
    for key in ("memory_per_rank_bytes", "comm_bytes_per_step", "tokens_per_step", "step_time_s", "mfu"):
        assert plan[key] > 0, key
    assert {"sft", "reward", "ppo"} <= {s for s, r in rows.items() if "plan" in r}
    assert "plan" not in rows["ingest"]
    header = PRESET.read_text().split("\nrun:")[0]
    total, active = re.search(r"([\d.]+)B parameters in total, ([\d.]+)B active", header).groups()
    assert (float(total), float(active)) == (
        round(plan["params_total"] / 1e9, 2),
        round(plan["params_active"] / 1e9, 2),
    )
    quoted = re.search(r"pretrain ZeRO-(\d) x (\d+): ([\d.]+) GiB, ([\d.]+) GB", header).groups()
    assert quoted == (
        str(plan["zero_stage"]),
        str(plan["world_size"]),
        f"{plan['memory_per_rank_bytes'] / C.GiB:.1f}",
        f"{plan['comm_bytes_per_step'] / 1e9:.1f}",
    )


def test_warnings_name_the_keys_when_a_stage_will_not_fit_or_waits_on_the_network():
    cfg = load_config(PRESET)
    assert not any("zero_stage=" in w for w in plan_of(cfg, "pretrain")["warnings"])  # the preset's pick
    big = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, zero_stage=0))
    warnings = " ".join(plan_of(big, "pretrain")["warnings"])
    assert "more than 80% of the A100 80GB's 80 GiB" in warnings and "pretrain.zero_stage=2 needs" in warnings
    slow = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, zero_stage=3))
    warnings = " ".join(plan_of(slow, "pretrain")["warnings"])
    assert "communication-bound" in warnings and "pretrain.micro_batch_size" in warnings
    assert "pretrain.zero_stage=2 fits" in warnings
    # every expert on every GPU: the plan points at splitting them over a node's GPUs
    whole = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, expert_parallel=1))
    planned = plan_of(whole, "pretrain")
    assert sorted(planned["by_expert_parallel"]) == [1, 2, 4, 8]  # divisors of the 8 experts and 32 workers
    memory = [planned["by_expert_parallel"][P]["memory_per_rank_bytes"] for P in (1, 2, 4, 8)]
    assert memory == sorted(memory, reverse=True)
    assert "pretrain.expert_parallel=8 with zero_stage=2 fits" in " ".join(planned["warnings"])
    assert not any("expert_parallel=" in w for w in plan_of(cfg, "pretrain")["warnings"])  # the preset's pick
    assert plan_of(load_config(), "pretrain")["warnings"] == []  # no hardware described: no verdicts


def test_offloading_ppos_frozen_models_moves_their_shares_to_host_memory():
    """ppo.offload_frozen at ZeRO-3: the reference's and the reward model's shares are planned in host
    memory, not the accelerator's; nothing else moves."""
    cfg = load_config(PRESET)
    ppo = dataclasses.replace(cfg.ppo, zero_stage=3, offload_frozen=False)
    kept = plan_of(dataclasses.replace(cfg, ppo=ppo), "ppo")
    moved = plan_of(dataclasses.replace(cfg, ppo=dataclasses.replace(ppo, offload_frozen=True)), "ppo")
    frozen = kept["memory"]["frozen_models"]
    assert frozen > 0 and "frozen_models" not in moved["memory"]
    assert moved["host_memory"]["frozen_models"] == frozen
    assert moved["memory_per_rank_bytes"] == kept["memory_per_rank_bytes"] - frozen
    assert moved["host_memory_per_rank_bytes"] == kept["host_memory_per_rank_bytes"] + frozen
