"""Peak host memory and time of exporting a trained model: the streamed export (kiln/export.py)
against the export it replaced (kept below as `old_export_engine`, the baseline, measured in the
same run).

    python bench/export_memory.py                 # 1 rank, bf16 and fp32: ~1.5 min of CPU (2 cores)
    python bench/export_memory.py --zero3-ranks   # also ZeRO-3 on 2 gloo ranks (torchrun): ~3 min of CPU

Each measurement runs in a fresh process (`--one`): it builds a dense Kiln decoder whose weights
dominate the process (about 290M parameters: vocabulary 32000, d_model 1280, 8 layers, FFN 5120)
in its training dtype, wraps it as the setup says, collects garbage, and then

    before = VmRSS                      (the process's resident memory just before the export)
    echo 5 > /proc/self/clear_refs      (resets VmHWM, the peak resident memory, to the current RSS)
    export the model to a folder        (old or new path, timed)
    rise = VmHWM - before               (the highest resident memory during the export, less before)

`size` is the model's bytes in its training dtype (parameters x element size). The goal for the
new path is rise <= 1.2 x size for the whole export. Setups:
- `1 rank`: the model as a ZeRO-0/1/2 engine holds it (every weight in memory on rank 0; the old
  path only reads `engine.module`, so the engine is that module's stand-in);
- `zero3 1 rank`: a DeepSpeed ZeRO-3 engine on one gloo rank (each parameter gathered on export);
- `zero3 2 ranks` (`--zero3-ranks`): ZeRO-3 over 2 gloo ranks under torchrun, rank 0 measured (it
  gathers and writes; rank 1 only joins the gathers).
Exports go to a temporary folder, removed after, on /dev/shm when it has room (so the seconds are
the export's own work, not the disk's; files written with write() are page cache, never part of a
process's resident memory), else in the system's temporary folder. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DIMS = dict(vocab_size=32000, hidden_size=1280, num_hidden_layers=8, num_attention_heads=16,
            num_key_value_heads=16, intermediate_size=5120, max_position_embeddings=256)  # fmt: skip
SETUPS = ("1 rank", "zero3 1 rank", "zero3 2 ranks")


def old_export_engine(engine, make_model, out_dir, tokenizer_dir, zero_stage: int, rank: int) -> None:
    """The export before the streamed one (kiln/training.py `export_engine` until it streamed), as it
    was: under ZeRO-3 the whole model gathered to rank 0, loaded into a fresh fp32 model, saved with
    `save_pretrained` (fp32 safetensors)."""
    import torch

    from kiln.hf_convert import TOKENIZER_FILES

    if zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank calls it
    else:
        state = engine.module.state_dict() if rank == 0 else None
    if rank != 0:
        return
    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    model = make_model()
    model.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in state.items()}, strict=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        src = Path(tokenizer_dir) / name
        if src.exists():
            shutil.copy2(src, out / name)


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one(path: str, dtype_name: str, setup: str, out: Path) -> dict:
    """One measurement in this process (module docstring)."""
    import torch

    from kiln.export import export_model
    from kiln.model import KilnConfig, KilnForCausalLM

    torch.set_num_threads(2 if setup != "zero3 2 ranks" else 1)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    config = KilnConfig(**DIMS, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = KilnForCausalLM(config).to(dtype)
    size = sum(p.numel() for p in model.parameters()) * dtype.itemsize
    rank, zero_stage = 0, 0
    if setup == "1 rank":
        engine = SimpleNamespace(module=model)
    else:
        import deepspeed

        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        deepspeed.init_distributed(dist_backend="gloo")
        rank, zero_stage = int(os.environ["RANK"]), 3
        ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
              "bf16": {"enabled": dtype_name == "bf16"}}  # fmt: skip
        engine, *_ = deepspeed.initialize(model=model, config=ds)
        del model
    gc.collect()
    tok_dir = Path(tempfile.mkdtemp(dir=out))  # no tokenizer files: nothing to copy
    target = out / f"export-{path}-{dtype_name}"
    before = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    if path == "old":
        old_export_engine(engine, lambda: KilnForCausalLM(config), target, tok_dir, zero_stage, rank)
    else:
        export_model(engine.module, target, rank=rank, engine=engine, tokenizer_dir=tok_dir)
    seconds = time.perf_counter() - t0
    rise = (status_kib("VmHWM") - before) * 1024
    return {"path": path, "dtype": dtype_name, "setup": setup, "size": size, "rise": rise, "seconds": seconds,
            "rank": rank}  # fmt: skip


def scratch() -> str | None:
    """/dev/shm when it has room for the largest export (and the old path's), else None (the default)."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and shutil.disk_usage(shm).free > 6 * 2**30 else None


def measure(path: str, dtype: str, setup: str) -> dict:
    """One measurement in a fresh process (2 torchrun ranks for `zero3 2 ranks`); rank 0's numbers."""
    with tempfile.TemporaryDirectory(prefix="kiln-export-bench-", dir=scratch()) as out:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1" if "2 ranks" in setup else "2"}
        args = [str(Path(__file__).resolve()), "--one", path, dtype, setup, out]
        if setup == "zero3 2 ranks":
            args = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                    *args]  # fmt: skip
            env.pop("MASTER_PORT", None)
        proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{path} {dtype} {setup} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
            )
        rows = [json.loads(line.removeprefix("RESULT ")) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]  # fmt: skip
        return next(r for r in rows if r["rank"] == 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zero3-ranks", action="store_true", help="also ZeRO-3 on 2 gloo ranks")
    parser.add_argument("--one", nargs=4, metavar=("PATH", "DTYPE", "SETUP", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        path, dtype, setup, out = args.one
        print("RESULT " + json.dumps(one(path, dtype, setup, Path(out))), flush=True)
        sys.stdout.flush()
        os._exit(0)  # gloo can abort at interpreter exit after the work is done
    setups = SETUPS if args.zero3_ranks else SETUPS[:2]
    gib = 2.0**30
    print(f"{'setup':<14} {'dtype':<5} {'size GiB':>8} {'old rise':>9} {'new rise':>9} {'new/size':>8} "
          f"{'old/new':>8} {'old s':>6} {'new s':>6}")  # fmt: skip
    for setup in setups:
        for dtype in ("bf16", "fp32"):
            old, new = measure("old", dtype, setup), measure("new", dtype, setup)
            ratio = old["rise"] / new["rise"] if new["rise"] > 0 else float("inf")
            print(f"{setup:<14} {dtype:<5} {new['size'] / gib:8.2f} {old['rise'] / gib:9.2f} {new['rise'] / gib:9.2f} "
                  f"{new['rise'] / new['size']:8.2f} {ratio:8.1f} {old['seconds']:6.1f} {new['seconds']:6.1f}",
                  flush=True)  # fmt: skip
    print("rise: peak resident memory during the export minus resident memory just before it (GiB); "
          "goal new/size <= 1.2")  # fmt: skip


if __name__ == "__main__":
    main()
