"""Pretraining on CPU: the stage's worker group against a plain PyTorch loop, and ZeRO memory per rank.

    python bench/pretrain.py [--steps 40]

1. tokens/s of the stage's training (Ray Train, 2 workers, DeepSpeed ZeRO-2, fp32, gloo) against a
   plain single-process PyTorch loop (2 threads) of the same model and global batch, in one run.
   Goal: >= 0.9x. Both are steady-state medians (start-up reported separately) of one whole loop
   iteration: the plain loop's from its start to its end, the stage's between the times of two
   consecutive step rows (its reporting and progress included). The stage's own `tokens_per_s`
   (compute and collectives only) is printed beside it.
2. per-rank bytes of parameters + gradients + optimizer state for ZeRO 0/1/2/3 on 2 ranks,
   measured against the expected (bench/pretrain_memory.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_prep.synthetic import synthetic_tokens  # noqa: E402
from pipeline.config import PipelineConfig  # noqa: E402

TINY = PipelineConfig()  # the model of configs/tiny.yaml is the default ModelConfig


def stage_throughput(tokens: Path, steps: int) -> tuple[float, float, float]:
    """Of train_worker on a 2-worker Ray Train group: median tokens/s over whole iterations, median of
    the stage's own `tokens_per_s` (its compute and collectives only), wall seconds incl. start-up."""
    import ray

    from pipeline.context import Scaling
    from pipeline.ray_context import RayStageContext
    from stages.pretrain import PretrainJob, Vocab, train_worker

    os.environ["PYTHONPATH"] = str(ROOT)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    pcfg = replace(TINY.pretrain, steps=steps, checkpoint_every=10**6, eval_every=10**6, warmup_steps=5)
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-pretrain-"))
    job = PretrainJob(
        section=pcfg, model=TINY.model, seed=0, tokens_dir=tokens, tokenizer_dir=tokens,
        vocab=Vocab(size=4096, pad=1, eos=0, bos=0), export_dir=work / "export", wandb_run_id=None,
    )  # fmt: skip
    ctx = RayStageContext("pretrain", work)
    t0 = time.perf_counter()
    ctx.run_workers(train_worker, job, Scaling(num_workers=2, cpus_per_worker=1))
    wall = time.perf_counter() - t0
    ray.shutdown()
    rows = ctx.metrics.rows()
    # the same scope as the plain loop's: one whole iteration, from a step's row to the next one's (its
    # report, progress and the next batch included); the last step (evaluation, export) is left out
    tokens = TINY.pretrain.global_batch_size * TINY.tokenize.seq_len
    gaps = [b["time"] - a["time"] for a, b in zip(rows[5:-2], rows[6:-1], strict=True)]
    return tokens / statistics.median(gaps), statistics.median(r["tokens_per_s"] for r in rows[5:-1]), wall


def plain_throughput(tokens: Path, steps: int) -> float:
    """The same model and global batch (2 micro-batches of 8 x 256), one process, 2 threads."""
    import torch

    from data_prep.packed import PackedTokens
    from kiln import training as T
    from kiln.model import KilnForCausalLM, build_config

    torch.set_num_threads(2)
    p = TINY.pretrain
    torch.manual_seed(0)
    model = KilnForCausalLM(build_config(TINY.model, 4096, 1, 0, 0))
    opt = T.adamw(model, lr=p.lr, betas=(p.beta1, p.beta2), weight_decay=p.weight_decay)
    data = PackedTokens(tokens, "train")
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        ids = T.global_batch(step, p.global_batch_size, len(data), 0)
        for half in (ids[: p.micro_batch_size], ids[p.micro_batch_size :]):
            x, y = T.load_batch(data, half, "cpu")
            (model(input_ids=x, shift_labels=y).loss / 2).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return p.global_batch_size * data.seq_len / statistics.median(times[5:])


def zero_memory() -> dict:
    out = Path(tempfile.mkdtemp(prefix="kiln-bench-mem-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for stage in (0, 1, 2, 3):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29551",
               str(ROOT / "bench/pretrain_memory.py"), str(out), str(stage)]  # fmt: skip
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)
    return {s: json.loads((out / f"memory-zero{s}.json").read_text())[str(s)] for s in (0, 1, 2, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument(
        "--memory-only", action="store_true", help="only the ZeRO memory table (plan vs measured)"
    )
    args = ap.parse_args()
    if args.memory_only:
        print_memory(zero_memory())
        return
    seq = TINY.tokenize.seq_len
    tokens = synthetic_tokens(
        Path(tempfile.mkdtemp(prefix="kiln-bench-tokens-")),
        sequences=args.steps * 16 + 64,
        seq_len=seq,
        vocab=4096,
    )
    plain = plain_throughput(tokens, args.steps)
    stage, own, wall = stage_throughput(tokens, args.steps)
    mem = zero_memory()

    print(f"\nmodel: configs/tiny.yaml ({TINY.model.n_layers} layers, d_model {TINY.model.d_model}, "
          f"{TINY.model.n_experts} experts top-{TINY.model.top_k}), global batch 16 x {seq}, fp32, 2 CPU cores")  # fmt: skip
    print(f"{'measure':<58}{'value':>12}{'goal':>8}")
    print(f"{'plain PyTorch loop, 1 process x 2 threads (tokens/s)':<58}{plain:>12,.0f}")
    print(f"{'stage: Ray Train 2 workers + DeepSpeed ZeRO-2 (tokens/s)':<58}{stage:>12,.0f}")
    print(f"{'stage / plain':<58}{stage / plain:>12.2f}{'>= 0.9':>8}")
    print(f"{'  the stage logs, its compute and collectives only (tokens/s)':<58}{own:>12,.0f}")
    print(f"{'stage wall time for ' + str(args.steps) + ' steps incl. start-up (s)':<58}{wall:>12.1f}")
    print_memory(mem)


def print_memory(mem: dict) -> None:
    psi = mem[0]["psi"]
    print(
        f"\nZeRO per-rank memory, 2 ranks, fp32, Ψ = {psi / 1e6:.1f}M parameters (params + grads + Adam state)"
    )
    print(
        f"{'stage':<7}{'measured MB':>13}{'plan MB':>13}{'measured/Ψ':>12}{'plan/Ψ':>12}{'plan/measured':>15}"
    )
    for s, r in mem.items():
        print(
            f"{s:<7}{r['measured'] / 1e6:>13.1f}{r['expected'] / 1e6:>13.1f}{r['measured'] / psi:>11.2f}B"
            f"{r['expected'] / psi:>11.2f}B{r['expected'] / r['measured']:>15.2f}"
        )


if __name__ == "__main__":
    main()
