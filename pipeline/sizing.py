"""The plan before launch: what each training stage will cost per rank, from the config alone.

    python launch.py run configs/multinode-moe.yaml --dry-run [--json]

For pretrain, sft, reward, ppo and grpo: parameters (total, active per token, trained), memory per rank
by kind, bytes communicated per optimizer step by collective, tokens per step; with `hardware:`
described, the step time and MFU these allow, and warnings that name the keys to change when a
stage will not fit or is communication-bound. The arithmetic is kiln/capacity.py's; this module
reads the config into it. No data, tokenizer or cluster is needed: the vocabulary is
`tokenizer.vocab_size`, the architecture `model:` (a stage started from `pretrain.init_from` is not
planned: its architecture is the checkpoint's).
"""

from __future__ import annotations

import dataclasses

from kiln import capacity as C
from kiln.model_fields import hf_values

TRAINING_STAGES = ("pretrain", "sft", "reward", "ppo", "grpo", "rloo")


def stage_plans(cfg) -> dict[str, dict]:
    """{stage: its plan} for the training stages the config has (see `plan_of`); none for a config
    of another shape (a test's toy pipeline)."""
    if not all(hasattr(cfg, s) for s in ("model", "tokenizer", "tokenize", "hardware")):
        return {}
    return {name: plan_of(cfg, name) for name in TRAINING_STAGES if hasattr(cfg, name)}


def plan_of(cfg, stage: str) -> dict:
    """The plan object of one training stage: params_total, params_active, params_trainable,
    memory_per_rank_bytes (and `memory` by kind), host_memory_per_rank_bytes (and `host_memory`), comm_bytes_per_step
    (and `comm` by collective, `comm_wire_bytes_per_step`), tokens_per_step, flops_per_step; with
    `hardware:` also compute_s, comm_s, step_time_s, mfu; `by_zero_stage`; `warnings`."""
    if cfg.pretrain.init_from:
        return {
            "unknown": "pretrain.init_from: the architecture is the checkpoint's, read when the stage runs"
        }
    m = hf_values(cfg.model)
    vocab = cfg.tokenizer.vocab_size
    section = getattr(cfg, stage)
    plan = _cost(cfg, stage, section, m, vocab, section.zero_stage)
    plan["by_zero_stage"] = {
        z: {k: v for k, v in _cost(cfg, stage, section, m, vocab, z).items() if k in _COMPARED}
        for z in (0, 1, 2, 3)
    }
    plan["by_expert_parallel"] = _by_expert_parallel(cfg, stage, section, m, vocab)
    plan["warnings"] = _warnings(cfg, stage, section, plan)
    return plan


def _by_expert_parallel(cfg, stage: str, section, m: dict, vocab: int) -> dict:
    """Pretraining of a MoE model: the compared costs at each expert_parallel the workers and experts allow
    (the divisors of both), under the configured ZeRO stage, or ZeRO-2 where that is 0 or 3 (expert
    parallelism runs under ZeRO-1/2 only). {} for other stages and dense models."""
    experts = m.get("num_experts") or 0
    if stage != "pretrain" or experts < 2:
        return {}
    zero = section.zero_stage if section.zero_stage in (1, 2) else 2
    out = {}
    for P in (p for p in range(1, experts + 1) if experts % p == 0 and section.num_workers % p == 0):
        other = dataclasses.replace(section, expert_parallel=P, zero_stage=zero)
        out[P] = {k: v for k, v in _cost(cfg, stage, other, m, vocab, zero).items() if k in _COMPARED}
        out[P]["zero_stage"] = zero
    return out


_COMPARED = ("memory_per_rank_bytes", "comm_bytes_per_step", "step_time_s", "mfu")


def _setup(section, zero_stage: int, micro: int, accum: int, seq_len: int, top_k: int = 0) -> C.Setup:
    # expert parallelism (pretraining) runs under ZeRO-1/2 only: the other stages' rows are without it
    ep = getattr(section, "expert_parallel", 1) if zero_stage in (1, 2) else 1
    return C.Setup(
        world=section.num_workers, zero_stage=zero_stage, precision=section.precision, micro_batch_size=micro,
        grad_accum=accum, seq_len=seq_len, activation_checkpointing=section.activation_checkpointing,
        grad_reduce_dtype=section.grad_reduce_dtype, offload_optimizer=getattr(section, "offload_optimizer", False),
        offload_params=getattr(section, "offload_params", False),
        persistence_threshold=section.zero3_persistence_threshold,
        max_reuse_distance=section.zero3_max_reuse_distance,
        prefetch_bucket_size=section.zero3_prefetch_bucket_size,
        shard_within=section.zero3_shard_within if zero_stage == 3 else 0, expert_parallel=ep, top_k=top_k,
    )  # fmt: skip


def _cost(cfg, stage: str, s, m: dict, vocab: int, zero_stage: int) -> dict:
    lm = C.parameter_tensors(m, vocab)
    if stage in ("ppo", "grpo", "rloo"):
        micro, seq = s.micro_batch_size, s.max_prompt_length + s.max_new_tokens
        accum = s.mini_batch_size // (s.num_workers * micro)
        setup = _setup(s, zero_stage, micro, accum, seq)
        value = C.parameter_tensors(m, vocab, value_head=True)
        # the actor, and ppo's critic
        trained = [(lm, None), (value, None)] if stage == "ppo" else [(lm, None)]
        frozen = [lm] + ([value] if s.reward_source == "model" else [])  # the reference and the reward model
        tokens = s.mini_batch_size * seq
    else:
        seq = cfg.tokenize.seq_len if stage == "pretrain" else s.max_length
        accum = s.global_batch_size // (s.num_workers * s.micro_batch_size)
        pairs = 2 if stage == "reward" else 1  # a preference pair is two sequences
        setup = _setup(s, zero_stage, pairs * s.micro_batch_size, accum, seq, m["num_experts_per_tok"])
        tensors = C.parameter_tensors(m, vocab, value_head=stage == "reward")
        lora = C.lora_parameters(tensors, s.lora_r, s.lora_targets) if getattr(s, "lora_r", 0) else None
        trained, frozen = [(tensors, lora)], []
        tokens = pairs * s.global_batch_size * seq
    cost = C.Cost()
    for tensors, trainable in trained:
        cost.add(C.training_cost(tensors, setup, trainable))
    b, n = C.BYTES[setup.precision], setup.world
    # ppo.offload_frozen (ZeRO-3): the frozen models' shares sit in host memory between their passes
    where = cost.host_memory if getattr(s, "offload_frozen", False) and zero_stage == 3 else cost.memory
    for tensors in frozen:
        share = b * sum(t.numel for t in tensors) // (n if zero_stage == 3 else 1)
        where["frozen_models"] = where.get("frozen_models", 0) + share
    cost.memory["activations"] = len(trained) * C.activation_bytes(m, setup, vocab)
    main = trained[0][0]
    flops = sum(C.flops_per_token(t, m, seq) for t, _ in trained) * tokens
    plan = {
        "params_total": sum(t.numel for t in main),
        "params_active": C.active_parameters(main, m),
        "params_trainable": sum(tr if tr is not None else sum(t.numel for t in ts) for ts, tr in trained),
        "memory_per_rank_bytes": sum(cost.memory.values()),
        "memory": cost.memory,
        "host_memory_per_rank_bytes": sum(cost.host_memory.values()),
        "host_memory": cost.host_memory,
        "comm_bytes_per_step": sum(cost.comm.values()),
        "comm": cost.comm,
        "comm_wire_bytes_per_step": cost.wire,
        "tokens_per_step": tokens,
        "flops_per_step": flops,
        "world_size": n,
        "zero_stage": zero_stage,
    }
    hw = cfg.hardware
    if hw.name is not None:
        plan |= C.step_time(flops, cost, setup, _hardware(hw))
    return plan


def _hardware(hw) -> C.Hardware:
    return C.Hardware(
        hw.name, hw.peak_tflops, hw.memory_gib, hw.gpus_per_node, hw.intra_node_gbs, hw.inter_node_gbs
    )


def _faster_expert_parallel(section, plan: dict, limit: float):
    """(P, its costs) of the expert parallelism that fits and is more than 5 % faster than the plan as
    configured, the fastest such; None if none is."""
    now = getattr(section, "expert_parallel", 1)
    fits = {
        P: p for P, p in plan.get("by_expert_parallel", {}).items() if p["memory_per_rank_bytes"] <= limit
    }
    faster = {P: p for P, p in fits.items() if P != now and p["step_time_s"] < 0.95 * plan["step_time_s"]}
    if not faster:
        return None
    P = min(faster, key=lambda q: (faster[q]["step_time_s"], q))
    return P, faster[P]


FITS = 0.8
"""A stage fits when a rank needs at most this share of the accelerator's memory: the allocator's
fragmentation, NCCL's buffers and the CUDA context take part of the rest."""


def _warnings(cfg, stage: str, section, plan: dict) -> list[str]:
    hw, out = cfg.hardware, []
    if hw.name is None:
        return out
    limit = FITS * hw.memory_gib * C.GiB
    fits = {z: p for z, p in plan["by_zero_stage"].items() if p["memory_per_rank_bytes"] <= limit}
    # the fastest that fits; within 5 % of it, the one that needs the least memory
    fastest = min((p["step_time_s"] for p in fits.values()), default=None)
    near = [z for z, p in fits.items() if fastest is not None and p["step_time_s"] <= 1.05 * fastest]
    best = min(near, key=lambda z: fits[z]["memory_per_rank_bytes"], default=None)
    gib = plan["memory_per_rank_bytes"] / C.GiB
    if plan["memory_per_rank_bytes"] > limit:
        fix = (
            f"{stage}.zero_stage={best} needs {fits[best]['memory_per_rank_bytes'] / C.GiB:.1f} GiB; "
            if best is not None
            else ""
        )
        out.append(
            f"{stage}: needs {gib:.1f} GiB per rank, more than {FITS:.0%} of the {hw.name}'s {hw.memory_gib:g} GiB: "
            f"{fix}or set {stage}.activation_checkpointing=true, lower {stage}.micro_batch_size, "
            f"or offload ({stage}.offload_optimizer)"
        )
    if plan["exposed_comm_s"] > 0.25 * plan["step_time_s"]:
        out.append(
            f"{stage}: communication-bound: {plan['exposed_comm_s']:.2f} s of a {plan['step_time_s']:.2f} s step is "
            f"communication that compute does not hide (MFU at most {plan['mfu']:.0%}); raise "
            f"{stage}.micro_batch_size or global_batch_size, or change zero_stage"
        )
    ep = _faster_expert_parallel(section, plan, limit)
    if ep is not None:
        P, alt = ep
        out.append(
            f"{stage}: {stage}.expert_parallel={P} with zero_stage={alt['zero_stage']} fits "
            f"({alt['memory_per_rank_bytes'] / C.GiB:.1f} GiB per rank) and is faster: {alt['step_time_s']:.2f} s "
            f"per step (MFU at most {alt['mfu']:.0%}) vs {plan['step_time_s']:.2f} s now"
        )
    if (
        best is not None
        and best != section.zero_stage
        and fits[best]["step_time_s"] < 0.95 * plan["step_time_s"]
    ):
        alt = fits[best]
        out.append(
            f"{stage}: {stage}.zero_stage={best} fits ({alt['memory_per_rank_bytes'] / C.GiB:.1f} GiB per rank) "
            f"and is faster: {alt['step_time_s']:.2f} s per step (MFU at most {alt['mfu']:.0%}) vs "
            f"{plan['step_time_s']:.2f} s at zero_stage={section.zero_stage}"
        )
    return out
