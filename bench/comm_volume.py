"""Bytes communicated per optimizer step under ZeRO 1/2/3, measured on 2 gloo ranks by DeepSpeed's
comms logger, beside what the plan (kiln/capacity.py, `run --dry-run`) predicts for the same setup
(fp32, and bf16 with the gradients reduced in fp32, the default, or in bf16).

    python bench/comm_volume.py            # starts `torchrun --nproc_per_node 2` on itself, prints the table

Each case builds the pretraining engine (kiln/training.py deepspeed_config, torch AdamW) over one
model, takes one optimizer step as a warm-up, then counts every collective of 2 more steps
(accumulation 2, so per-micro-step and per-step collectives differ). The logger reports an
all-gather by its per-rank shard and a reduce-scatter or all-reduce by the whole tensor; the table
gives tensor bytes (a gather's shard x world size), the plan's convention. The other ZeRO-3 cases
turn off parameter persistence, then reuse, then prefetching: only with neither reuse nor prefetch
is every weight released after forward and gathered again in backward.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import ModelConfig  # noqa: E402

MODEL = ModelConfig(
    n_layers=4, d_model=256, n_heads=8, n_kv_heads=4, d_ff=704, n_experts=4, top_k=2, max_seq_len=128
)
VOCAB, SEQ, MICRO, ACCUM, STEPS = 4096, 128, 2, 2, 2
CASES = {  # name: (zero stage, precision, gradients reduced in, stage-3 settings)
    "ZeRO-1": (1, "fp32", "fp32", {}),
    "ZeRO-2": (2, "fp32", "fp32", {}),
    "ZeRO-3": (3, "fp32", "fp32", {}),
    "ZeRO-3, nothing persistent": (3, "fp32", "fp32", {"stage3_param_persistence_threshold": 0}),
    "ZeRO-3, no reuse": (
        3, "fp32", "fp32", {"stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0},
    ),
    "ZeRO-3, no reuse, no prefetch": (
        3, "fp32", "fp32",
        {"stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0},
    ),
    "ZeRO-1 bf16": (1, "bf16", "fp32", {}),
    "ZeRO-1 bf16, reduced in bf16": (1, "bf16", "bf16", {}),
    "ZeRO-3 bf16": (3, "bf16", "fp32", {}),
}  # fmt: skip


def measure(out: Path) -> None:
    """One rank: every case's bytes per step by collective, into out/<rank>.json."""
    import deepspeed
    import deepspeed.comm as dscomm
    import torch
    import torch.distributed as dist

    from kiln import training as T
    from kiln.model import KilnForCausalLM, build_config

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    results = {}
    for name, (stage, precision, reduce, extra) in CASES.items():
        torch.manual_seed(0)
        model = KilnForCausalLM(build_config(MODEL, VOCAB, 0, 1))
        opt = T.adamw(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
        cfg = T.deepspeed_config(
            zero_stage=stage, precision=precision, micro_batch_size=MICRO, grad_accum=ACCUM, world_size=world,
            grad_clip=1.0, grad_reduce_dtype=reduce,
        )  # fmt: skip
        cfg["zero_optimization"].update(extra)
        cfg["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True}
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        x = torch.randint(2, VOCAB, (MICRO, SEQ), generator=torch.Generator().manual_seed(rank))
        for step in range(1 + STEPS):
            if step == 1:
                dist.barrier()
                dscomm.reset_log()
            for _ in range(ACCUM):
                engine.backward(engine(input_ids=x, labels=x).loss)
                engine.step()
        summary = dscomm.log_summary(return_dict=True)["summary"]
        by_op: dict[str, float] = {}
        for op, sizes in summary.items():
            scale = world if op.startswith("all_gather") else 1
            total = sum(v["msg_size_bytes"] * v["count"] for v in sizes.values()) * scale / STEPS
            key = (
                "all_gather"
                if op.startswith("all_gather")
                else "reduce_scatter"
                if op.startswith("reduce_scatter")
                else op
            )
            by_op[key] = by_op.get(key, 0) + total
        results[name] = {k: v for k, v in by_op.items() if v}
        del engine, model, opt
    (out / f"{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def predicted(stage: int, precision: str, reduce: str, extra: dict) -> dict[str, int]:
    from kiln import capacity as C
    from kiln.model_fields import hf_values

    tensors = C.parameter_tensors(hf_values(MODEL), VOCAB)
    setup = C.Setup(
        world=2, zero_stage=stage, precision=precision, micro_batch_size=MICRO, grad_accum=ACCUM, seq_len=SEQ,
        grad_reduce_dtype=reduce,
        persistence_threshold=extra.get("stage3_param_persistence_threshold", 100_000),
        max_reuse_distance=extra.get("stage3_max_reuse_distance", 1_000_000_000),
        prefetch_bucket_size=extra.get("stage3_prefetch_bucket_size", 50_000_000),
    )  # fmt: skip
    return C.training_cost(tensors, setup).comm


def main() -> None:
    out = Path(tempfile.mkdtemp(prefix="kiln-comm-"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571",
           __file__, "--worker", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=900)
    ranks = [json.loads((out / f"{r}.json").read_text()) for r in range(2)]
    print(f"model: {MODEL.n_layers} layers, d_model {MODEL.d_model}, {MODEL.n_experts} experts, vocab {VOCAB}; "
          f"2 gloo ranks, micro-batch {MICRO}, accumulation {ACCUM}; MB per optimizer step per rank")  # fmt: skip
    print("| case | collective | measured | plan | plan / measured |")
    print("|---|---|---|---|---|")
    for name, (stage, precision, reduce, extra) in CASES.items():
        got, plan = ranks[0][name], predicted(stage, precision, reduce, extra)
        assert ranks[1][name] == got, (name, ranks[1][name], got)  # both ranks move the same bytes
        for op in sorted(got.keys() | plan.keys()):
            m, p = got.get(op, 0) / 1e6, plan.get(op, 0) / 1e6
            if max(m, p) < 0.01:  # a loss or gradient-norm scalar
                continue
            print(f"| {name} | {op} | {m:.2f} | {p:.2f} | {p / m if m else float('nan'):.3f} |")
        m, p = sum(got.values()) / 1e6, sum(plan.values()) / 1e6
        print(f"| {name} | **total** | {m:.2f} | {p:.2f} | {p / m:.3f} |")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        measure(Path(sys.argv[2]))
    else:
        main()
