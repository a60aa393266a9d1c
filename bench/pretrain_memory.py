"""Per-worker memory of parameters + gradients + optimizer state under ZeRO 0/1/2/3, 2 CPU ranks.

    torchrun --nproc_per_node 2 bench/pretrain_memory.py OUT_DIR STAGE     (bench/pretrain.py starts it)

One ZeRO stage per process (a freed engine's tensors linger in reference cycles and would blur the
next stage's count): DeepSpeed engine over the same model (fp32, torch AdamW), one forward/backward
(measured before the step, when gradients exist) and one step; counts the bytes of every distinct
tensor storage the process holds (gc), minus what it held before the engine existed, and compares
with the plan's per-rank bytes (kiln/capacity.py; Rajbhandari et al. 2020, fp32) for Ψ parameters
on N ranks, without accumulation:
  stage 0: 4Ψ params + 4Ψ grads + 8Ψ Adam moments
  stage 1: 4Ψ + (4Ψ grads + 8Ψ + 4Ψ fp32 partition)/N    DeepSpeed keeps a flat fp32 partition copy
  stage 2: 4Ψ + (4Ψ grads + 8Ψ + 4Ψ)/N                   and, with no accumulation, ZeRO-1 keeps only
  stage 3: (4Ψ + 4Ψ + 8Ψ + 4Ψ)/N                         this rank's gradient partition, as ZeRO-2
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import ModelConfig  # noqa: E402

MODEL = ModelConfig(
    n_layers=4, d_model=256, n_heads=8, n_kv_heads=4, d_ff=704, n_experts=4, top_k=2, max_seq_len=128
)
VOCAB, SEQ, MICRO = 4096, 128, 2


def tensor_bytes() -> int:
    """Bytes of every distinct tensor storage reachable from Python objects in this process."""
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if torch.is_tensor(obj) and obj.device.type == "cpu":
                st = obj.untyped_storage()
                if st.data_ptr() not in seen and st.nbytes():
                    seen.add(st.data_ptr())
                    total += st.nbytes()
        except Exception:  # noqa: BLE001  (meta tensors, freed storages)
            continue
    return total


def expected(stage: int, world: int) -> int:
    """The plan's bytes (kiln/capacity.py, what `run --dry-run` prints) of weights, gradients and
    optimizer state per rank, for this model and setup."""
    from kiln import capacity as C
    from kiln.model_fields import hf_values

    setup = C.Setup(world=world, zero_stage=stage, precision="fp32", micro_batch_size=MICRO, grad_accum=1,
                    seq_len=SEQ, persistence_threshold=0)  # fmt: skip
    mem = C.training_cost(C.parameter_tensors(hf_values(MODEL), VOCAB), setup).memory
    return mem["weights"] + mem["gradients"] + mem["optimizer"]


def main(out: Path, stage: int) -> None:
    import deepspeed
    import torch.distributed as dist

    from kiln import training as T
    from kiln.model import KilnForCausalLM, build_config

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    gc.collect()
    torch.manual_seed(0)
    model = KilnForCausalLM(build_config(MODEL, VOCAB, 0, 1))
    psi = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    before = tensor_bytes()
    torch.manual_seed(0)
    model = KilnForCausalLM(build_config(MODEL, VOCAB, 0, 1))
    opt = T.adamw(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    cfg = T.deepspeed_config(
        zero_stage=stage,
        precision="fp32",
        micro_batch_size=MICRO,
        grad_accum=1,
        world_size=world,
        grad_clip=1.0,
    )
    # small buckets, so communication buffers do not hide the states being measured
    cfg["zero_optimization"].update(reduce_bucket_size=2e5, allgather_bucket_size=2e5)
    if stage == 3:
        cfg["zero_optimization"].update(stage3_prefetch_bucket_size=2e5, stage3_param_persistence_threshold=0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    del model, opt
    x = torch.randint(2, VOCAB, (MICRO, SEQ))
    engine.backward(engine(input_ids=x, labels=x).loss)
    engine.step()  # moments exist after the first step
    engine.backward(engine(input_ids=x, labels=x).loss)  # gradients held again, before the next step
    gc.collect()
    measured = tensor_bytes() - before
    results[stage] = {"psi": psi, "measured": measured, "expected": expected(stage, world)}
    engine.step()
    del engine
    gc.collect()
    if rank == 0:
        (out / f"memory-zero{stage}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
