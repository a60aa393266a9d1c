"""Expert parallelism in pretraining (pretrain.expert_parallel, kiln/expert_parallel.py) on 2 gloo ranks: the step
time with the experts split over both ranks against every expert on each, and the bytes the MoE layers' all-to-alls
move per optimizer step beside what the plan (kiln/capacity.py `all_to_all_bytes`, `run --dry-run`) predicts.

    python bench/expert_parallel.py        # starts `torchrun --nproc_per_node 2` on itself, prints the table (~1 min)

For ZeRO-1 and ZeRO-2 it builds two pretraining engines as stages/pretrain.py does (`for_deepspeed`,
kiln/training.py `adamw` and `deepspeed_config`) over the bench/comm_volume.py model (4 layers, d_model 256, 4
experts top-2), fp32, expert_parallel 1 and 2, and steps them in turn (so that the machine's slower spells fall on
both): WARMUP optimizer steps, then STEPS timed (accumulation 2, each rank its own tokens). The all-to-alls are
counted where kiln/expert_parallel.py calls `torch.distributed.all_to_all_single`: the tensor bytes entering (the
plan's convention, as bench/comm_volume.py) and the bytes bound for the other rank (what crosses the link; the plan
assumes an even routing). On a 2-core CPU an all-to-all is a memory copy: the step-time ratio says what the
exchange and the grouped matmuls of half the experts cost here, not what they cost on GPUs over NVLink.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.comm_volume import ACCUM, MICRO, MODEL, SEQ, VOCAB  # noqa: E402

WARMUP, STEPS = 2, 10
ZERO_STAGES = (1, 2)


def name_of(zero: int, ep: int) -> str:
    return f"ZeRO-{zero}, expert_parallel={ep}"


def counting_all_to_all(log: dict):
    """torch.distributed.all_to_all_single, adding to `log` the bytes entering and those bound elsewhere."""
    import torch.distributed as dist

    call = dist.all_to_all_single

    def counted(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **kwargs):
        size, me = dist.get_world_size(group), dist.get_rank(group)
        nbytes = input.numel() * input.element_size()
        if input_split_sizes is None:  # even: 1/size to each rank
            away = nbytes * (size - 1) // size
        else:
            row = nbytes // max(1, input.shape[0])
            away = row * sum(n for j, n in enumerate(input_split_sizes) if j != me)
        log["entering"] += nbytes
        log["away"] += away
        return call(output, input, output_split_sizes, input_split_sizes, group=group, **kwargs)

    return counted


def measure(out: Path) -> None:
    """One rank: each case's step times, all-to-all bytes per step and losses, into out/<rank>.json."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from kiln import expert_parallel as EP
    from kiln import training as T
    from kiln.model import KilnForCausalLM, build_config

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    results = {}
    log = {"entering": 0, "away": 0}
    dist.all_to_all_single = counting_all_to_all(log)

    def engine_for(zero: int, ep: int):
        torch.manual_seed(0)
        model = EP.for_deepspeed(KilnForCausalLM(build_config(MODEL, VOCAB, 0, 1)), ep)
        opt = T.adamw(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
        cfg = T.deepspeed_config(
            zero_stage=zero, precision="fp32", micro_batch_size=MICRO, grad_accum=ACCUM, world_size=world, grad_clip=1.0
        )  # fmt: skip
        return deepspeed.initialize(model=model, optimizer=opt, config=cfg)[0]

    def step(engine, i: int) -> tuple[float, float, dict]:
        """One optimizer step: (seconds, the last micro-step's loss, all-to-all bytes)."""
        log.update(entering=0, away=0)
        dist.barrier()
        t0 = time.perf_counter()
        for a in range(ACCUM):
            x = torch.randint(
                2, VOCAB, (MICRO, SEQ), generator=torch.Generator().manual_seed(1000 * i + 10 * a + rank)
            )
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
        dist.barrier()
        return time.perf_counter() - t0, loss.item(), dict(log)

    for zero in ZERO_STAGES:
        # both engines at once, their steps taken in turn: a slower spell of the machine falls on both
        engines = {ep: engine_for(zero, ep) for ep in (1, 2)}
        rows: dict[int, list] = {ep: [] for ep in engines}
        for i in range(WARMUP + STEPS):
            for ep, engine in engines.items():
                rows[ep].append(step(engine, i))
        for ep, got in rows.items():
            measured = got[WARMUP:]
            results[name_of(zero, ep)] = {
                "times": [t for t, _, _ in measured],
                "entering": statistics.mean(b["entering"] for _, _, b in measured),
                "away": statistics.mean(b["away"] for _, _, b in measured),
                "losses": [loss for _, loss, _ in got],
            }
        del engines
    (out / f"{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def predicted(zero: int, ep: int) -> tuple[int, int]:
    """The plan's all-to-all tensor bytes and wire bytes per optimizer step per rank."""
    from kiln import capacity as C
    from kiln.model_fields import hf_values

    m = hf_values(MODEL)
    setup = C.Setup(
        world=2, zero_stage=zero, precision="fp32", micro_batch_size=MICRO, grad_accum=ACCUM, seq_len=SEQ,
        expert_parallel=ep, top_k=m["num_experts_per_tok"],
    )  # fmt: skip
    cost = C.training_cost(C.parameter_tensors(m, VOCAB), setup)
    size = cost.comm.get("all_to_all", 0)
    return size, int(size * (ep - 1) / ep)


def _pairs(xs: list, ys: list):
    return zip(xs, ys, strict=True)


def main() -> None:
    out = Path(tempfile.mkdtemp(prefix="kiln-ep-"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29573",
           __file__, "--worker", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=900)
    ranks = [json.loads((out / f"{r}.json").read_text()) for r in range(2)]
    print(
        f"model: {MODEL.n_layers} layers, d_model {MODEL.d_model}, {MODEL.n_experts} experts top-{MODEL.top_k}, "
        f"vocab {VOCAB}; 2 gloo ranks (CPU), fp32, micro-batch {MICRO} x {SEQ} tokens, accumulation {ACCUM}; "
        f"{STEPS} steps after {WARMUP}, expert_parallel 1 and 2 in turn"
    )
    print("| case | step s (median) | vs expert_parallel=1 (median of paired steps) | all-to-all MB/step/rank: measured | plan | bound for the other rank: measured (rank 0, 1) | plan | max loss diff vs expert_parallel=1 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for zero in ZERO_STAGES:
        for ep in (1, 2):
            rows = [r[name_of(zero, ep)] for r in ranks]
            base = [r[name_of(zero, 1)] for r in ranks]
            times = [max(ts) for ts in zip(*(r["times"] for r in rows), strict=True)]  # the slower rank's
            base_times = [max(ts) for ts in zip(*(r["times"] for r in base), strict=True)]
            ratio = statistics.median(t / b for t, b in zip(times, base_times, strict=True))
            entering = statistics.mean(r["entering"] for r in rows) / 1e6  # the ranks' mean: the plan's
            away = ", ".join(f"{r['away'] / 1e6:.2f}" for r in rows)
            plan, plan_away = (v / 1e6 for v in predicted(zero, ep))
            diff = max(
                abs(a - b)
                for r, q in zip(rows, base, strict=True)
                for a, b in _pairs(r["losses"], q["losses"])
            )
            cells = [
                f"{statistics.median(times):.3f}",
                f"{ratio:.2f}",
                f"{entering:.2f}",
                f"{plan:.2f}",
                away,
            ]
            print("| " + " | ".join([name_of(zero, ep), *cells, f"{plan_away:.2f}", f"{diff:.1e}"]) + " |")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        measure(Path(sys.argv[2]))
    else:
        main()
