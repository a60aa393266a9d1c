"""The communication settings of kiln/training.py `deepspeed_config`, before and after, on 2 gloo ranks.

    python bench/comm_settings.py [--steps 20] [--ranks 2]    # starts `torchrun --nproc_per_node 2` on itself

1. Losses: the pretraining worker (stages/pretrain.py `train_worker`, its data order, prefetching and
   metrics) trains one tiny MoE for `--steps` steps under ZeRO 0/1/2/3, fp32, with the settings before
   this change (overlap_comm off, no communication_data_type, no stage3_* keys: the dict as it was
   built, reproduced by wrapping `deepspeed_config`) and with today's defaults (overlap_comm on,
   gradients reduced in fp32, DeepSpeed's ZeRO-3 gather defaults spelled out), and ZeRO-3 with hpZ
   (`zero3_shard_within=2`). Prints both loss curves per stage and the largest difference. Under
   bf16 it compares reducing gradients in bf16 (DeepSpeed's default, the old behaviour) with fp32:
   on 2 ranks both round the sum of two bf16 values once, so they agree; `--ranks 4` shows them differ.
2. Bytes: DeepSpeed's comms logger counts the gradient-reduction collectives of one bf16 optimizer
   step per ZeRO stage with `grad_reduce_dtype` bf16 and fp32: twice the bytes in fp32 shows that
   the stage honours `communication_data_type`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import ModelConfig, PretrainConfig  # noqa: E402

SEED, VOCAB, SEQ = 7, 256, 32
MODEL = ModelConfig(
    n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, n_experts=4, top_k=2, max_seq_len=SEQ
)
PRETRAIN = PretrainConfig(
    num_workers=2, micro_batch_size=2, global_batch_size=8, lr=1e-2, min_lr=1e-3, warmup_steps=2,
    checkpoint_every=1000, eval_every=1000, eval_batches=1, precision="fp32", zero_stage=0,
)  # fmt: skip
# name: (settings, changes to the pretrain section)
CASES: dict[str, tuple[str, dict]] = {}
for z in (0, 1, 2, 3):
    CASES[f"zero{z}-fp32-old"] = ("old", {"zero_stage": z})
    CASES[f"zero{z}-fp32-new"] = ("new", {"zero_stage": z})
CASES["zero3-fp32-hpz2"] = ("new", {"zero_stage": 3, "zero3_shard_within": 2})
for z in (1, 2, 3):
    CASES[f"zero{z}-bf16-old"] = ("old", {"zero_stage": z, "precision": "bf16"})
    CASES[f"zero{z}-bf16-new"] = ("new", {"zero_stage": z, "precision": "bf16"})


def old_settings(build):
    """`deepspeed_config` as it was before: overlap_comm off, DeepSpeed's default communication
    dtype (the training precision), no stage3_* keys (DeepSpeed's defaults, the same values)."""

    def config(**kw):
        cfg = build(**kw, overlap_comm=False)
        del cfg["communication_data_type"]
        for key in (
            "stage3_param_persistence_threshold",
            "stage3_max_reuse_distance",
            "stage3_prefetch_bucket_size",
        ):
            cfg["zero_optimization"].pop(key, None)
        return cfg

    return config


def losses_worker(out: Path, steps: int, ranks: int) -> None:
    import torch.distributed as dist

    from kiln import training as T
    from pipeline.context import EnvWorkerContext
    from stages.pretrain import PretrainJob, Vocab, train_worker

    new = T.deepspeed_config
    for name, (settings, changes) in CASES.items():
        T.deepspeed_config = old_settings(new) if settings == "old" else new
        job = PretrainJob(
            section=replace(PRETRAIN, steps=steps, num_workers=ranks, **changes), model=MODEL, seed=SEED, tokens_dir=out / "tokens",
            tokenizer_dir=out / "tokens", vocab=Vocab(size=VOCAB, pad=0, eos=1, bos=None),
            export_dir=out / name / "export", wandb_run_id=None,
        )  # fmt: skip
        train_worker(job, EnvWorkerContext(out / name))
        dist.barrier()
    T.deepspeed_config = new
    bytes_worker(out)
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo can abort at interpreter exit after the work is done


def bytes_worker(out: Path) -> None:
    """Bytes of the gradient reductions (all_reduce, reduce_scatter) of one bf16 optimizer step."""
    import deepspeed
    import deepspeed.comm as dscomm
    import torch
    import torch.distributed as dist

    from kiln import training as T
    from kiln.model import KilnForCausalLM, build_config

    rank, world = dist.get_rank(), dist.get_world_size()
    found = {}
    for stage in (0, 1, 2, 3):
        for dtype in ("bf16", "fp32"):
            torch.manual_seed(0)
            model = KilnForCausalLM(build_config(MODEL, VOCAB, 0, 1))
            opt = T.adamw(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
            cfg = T.deepspeed_config(
                zero_stage=stage, precision="bf16", micro_batch_size=2, grad_accum=1, world_size=world,
                grad_clip=1.0, grad_reduce_dtype=dtype,
            )  # fmt: skip
            cfg["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True}
            engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
            x = torch.randint(2, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(rank))
            engine.backward(engine(input_ids=x, labels=x).loss)  # a first step: buffers, hooks
            engine.step()
            dist.barrier()
            dscomm.reset_log()
            engine.backward(engine(input_ids=x, labels=x).loss)
            engine.step()
            summary = dscomm.log_summary(return_dict=True)["summary"]
            found[f"zero{stage}-{dtype}"] = sum(
                v["msg_size_bytes"] * v["count"]
                for op, sizes in summary.items()
                if op.startswith(("all_reduce", "reduce_scatter"))
                for v in sizes.values()
            )
            del engine, model, opt
    if rank == 0:
        (out / "bytes.json").write_text(json.dumps(found))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ranks", type=int, default=2, choices=(2, 4))
    args = ap.parse_args()
    from data_prep.synthetic import synthetic_tokens

    out = Path(tempfile.mkdtemp(prefix="kiln-comm-settings-"))
    synthetic_tokens(out / "tokens", sequences=64, seq_len=SEQ, vocab=VOCAB, seed=SEED)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks),
           "--master_port", "29573", __file__, "--worker", str(out), str(args.steps), str(args.ranks)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0 or not (out / "bytes.json").exists():
        sys.exit(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")

    def losses(name: str) -> list[float]:
        rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, args.steps + 1)), name
        return [r["loss"] for r in rows]

    print(
        f"{args.ranks} gloo ranks, {args.steps} steps, tiny MoE (2 layers, d_model 32, 4 experts), global batch 8, micro 2"
    )
    pairs = [(f"zero{z}-fp32-old", f"zero{z}-fp32-new") for z in (0, 1, 2, 3)]
    pairs += [("zero3-fp32-old", "zero3-fp32-hpz2")]
    pairs += [(f"zero{z}-bf16-old", f"zero{z}-bf16-new") for z in (1, 2, 3)]
    for a, b in pairs:
        la, lb = losses(a), losses(b)
        diff = max(abs(x - y) for x, y in zip(la, lb, strict=True))
        print(f"\n{a} vs {b}: max |loss difference| = {diff:.3g}")
        print("  step " + " ".join(f"{i:>8d}" for i in range(1, len(la) + 1)))
        print(f"  {a.rsplit('-', 1)[1]:>4} " + " ".join(f"{v:8.5f}" for v in la))
        print(f"  {b.rsplit('-', 1)[1]:>4} " + " ".join(f"{v:8.5f}" for v in lb))
    sizes = json.loads((out / "bytes.json").read_text())
    print(
        "\nbf16 training, bytes of the gradient reductions (all_reduce, reduce_scatter) of one step, rank 0:"
    )
    print("| ZeRO | grad_reduce_dtype=bf16 | fp32 | fp32 / bf16 |")
    print("|---|---|---|---|")
    for z in (0, 1, 2, 3):
        b, f = sizes[f"zero{z}-bf16"], sizes[f"zero{z}-fp32"]
        print(f"| {z} | {b:,} | {f:,} | {f / b:.2f} |")


if __name__ == "__main__":
    if len(sys.argv) > 4 and sys.argv[1] == "--worker":
        losses_worker(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
