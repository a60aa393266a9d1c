"""How long training waits when it saves a checkpoint to an object-store root: background upload
(Kiln's) against uploading before training goes on (the baseline, measured in the same run).

    python bench/checkpoint_stall.py [--mb 512] [--saves 4] [--compute-s 3]

A real S3 server on loopback (SeaweedFS, tests/s3server.py) is the root; one Ray Train worker group
of 2 ranks, through Kiln's own worker context (pipeline/ray_context.py), alternates `--compute-s`
seconds of a training step's work (the host idle, as while a GPU computes; `--host-busy`: matrix
products on the CPU, which on 2 cores slow the upload thread and the S3 server) with a save: each rank writes a `--mb` MB shard
into a fresh folder (the local write, timed apart) and reports it (`wctx.report`, timed: what the
loop waits for). The baseline is the same loop with the upload thread switched off, where
`report` uploads before it returns (what Kiln did before). Prints per-save waits and their ratio;
asserts nothing. Loopback S3 is fast; a real bucket over a network makes the synchronous wait longer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def worker(arg: dict, wctx) -> dict:
    """One rank: compute, save, report; returns the waits (seconds) per save."""
    import torch

    if arg["sync"]:  # the baseline: report uploads, then returns (read by the worker context)
        os.environ["KILN_CHECKPOINT_UPLOAD"] = "sync"
    torch.manual_seed(wctx.rank)
    a = torch.randn(512, 512)
    writes, waits = [], []
    for i in range(arg["saves"]):
        if arg["host_busy"]:  # the step's work on these CPU cores, beside the upload thread
            until = time.perf_counter() + arg["compute_s"]
            while time.perf_counter() < until:
                a = torch.tanh(a @ a) * 0.5
        else:  # a GPU's step: the host waits for the device
            time.sleep(arg["compute_s"])
        wctx.progress(i + 1, arg["saves"])
        t0 = time.perf_counter()
        folder = Path(tempfile.mkdtemp(prefix=f"kiln-bench-ckpt-{i}-"))
        with open(folder / f"shard_rank{wctx.rank}.bin", "wb") as f:  # this rank's shard
            f.write(os.urandom(arg["mb"] << 20))
            f.flush()
            os.fsync(f.fileno())
        t1 = time.perf_counter()
        wctx.report({"step": i + 1}, checkpoint_dir=folder)
        writes.append(t1 - t0)
        waits.append(time.perf_counter() - t1)
    return {"writes": writes, "waits": waits}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=512, help="MB per rank per checkpoint")
    ap.add_argument("--saves", type=int, default=4)
    ap.add_argument("--compute-s", type=float, default=3.0, help="seconds of compute between saves")
    ap.add_argument(
        "--host-busy", action="store_true",
        help="compute with matrix products on the CPU (default: the host idles, as while a GPU computes)",
    )  # fmt: skip
    args = ap.parse_args()

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    import ray

    from pipeline.artifacts import ArtifactStore
    from pipeline.context import Scaling
    from pipeline.ray_context import RayStageContext
    from tests.s3server import serving

    base = Path(tempfile.mkdtemp(prefix="kiln-bench-stall-"))
    with serving(base / "s3", access_key="AKIABENCH0000000000", secret_key="bench-secret-0000000000") as s3:
        os.environ.update(s3.env())
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        results = {}
        for mode in ("sync", "async"):  # the baseline first, then Kiln's
            store = ArtifactStore("s3://kiln-bench/root", f"stall-{mode}")
            ctx = RayStageContext("bench", base / mode, store=store, work_key=mode)
            arg = {"sync": mode == "sync", "mb": args.mb, "saves": args.saves, "compute_s": args.compute_s,
                   "host_busy": args.host_busy}  # fmt: skip
            started = time.perf_counter()
            out = ctx.run_workers(worker, arg, Scaling(num_workers=2, checkpoints_to_keep=2))
            results[mode] = {"ranks": out, "total_s": time.perf_counter() - started}
        ray.shutdown()

    how = "matrix products on the CPU" if args.host_busy else "the host idle, as while a GPU computes"
    print(f"\n{args.saves} saves of {args.mb} MB per rank (2 ranks), {args.compute_s:g} s between ({how})")
    print("| upload | local write, s (median) | training waits per save, s (median, max) | loop total, s |")
    print("|---|---|---|---|")
    med = {}
    for mode, r in results.items():
        writes = [w for rank in r["ranks"] for w in rank["writes"]]
        waits = [w for rank in r["ranks"] for w in rank["waits"]]
        med[mode] = statistics.median(waits)
        print(
            f"| {mode} | {statistics.median(writes):.2f} | {med[mode]:.2f}, {max(waits):.2f} | {r['total_s']:.1f} |"
        )
    print(f"\nwait per save, async / sync: {med['async'] / med['sync']:.3f}")
    print(json.dumps({m: r["ranks"] for m, r in results.items()}))


if __name__ == "__main__":
    main()
