"""Peak host memory per rank while building models under ZeRO-3: full build vs sharded (kiln/sharded.py).

    python bench/sharded_build.py [--layers 8] [--d-model 1024] [--vocab 50000] [--only build|ppo|stage]

Two gloo ranks (torchrun; `--ranks N` for more), every case in fresh processes, all in one run; each rank reads its own
peak resident set (VmHWM in /proc/self/status) before building (the process itself: Python, torch,
DeepSpeed, the process group) and after. Both paths end with the model partitioned:
- build: pretraining's random init. full: `KilnForCausalLM(config)` on every rank, then partitioned
  as `deepspeed.initialize` does (`zero.Init(module=model)`); sharded: built under `sharded_build`.
- ppo: a saved checkpoint of the same model loaded four times as ppo loads (policy and reference as
  causal LMs, value and reward models as classifiers). full: four `from_pretrained`, then each
  partitioned (transformers maps an fp32 safetensors checkpoint lazily: a model's pages become
  resident when it is partitioned, one model after the other); sharded: each with
  `sharded.from_pretrained`, as stages/ppo.py loads them (built partitioned, filled module by
  module, rank 0 reading one tensor at a time).
- stage: stages/ppo.py's own `build_models` at ZeRO-3, from an SFT folder (the causal LM) and a
  reward folder (a classifier of the same size): the four models and their DeepSpeed engines (AdamW
  for the actor and the critic, ZeRO-3 inference engines for the reference and the reward model).
  sharded: as the stage builds them; full: the same with `kiln.sharded.from_pretrained` swapped for
  transformers' plain load, as ppo built them before (each model whole on every rank until its
  engine partitions it). Both end holding what the engines keep, the same in both: the four models'
  shards and, for the actor and the critic, ZeRO-3's optimizer partitions (fp32 master weights and
  AdamW's two moments, which DeepSpeed creates as it builds the engine: 3/N of each model), which
  bound the ratio.
Every case runs twice: with glibc's default allocator, whose heap keeps pages that partitioned
builds free (how many depends on the order of frees, so on the rank), and with every free of 1 MiB
or more handed back to the OS at once (MALLOC_MMAP_THRESHOLD_), where VmHWM is what the process
held. Prints the tables; asserts nothing. A model whose weights dominate the process (default 16
layers of d_model 1024, ~222M fp32 parameters, 0.85 GB), so the ratio shows the weights, not the
interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASES = [(w, m) for w in ("build", "ppo", "stage") for m in ("full", "sharded")]
ALLOCATORS = {
    "glibc default": {},
    # every free of 1 MiB or more goes back to the OS at once: VmHWM is then what the process held
    # at its peak, without the freed pages glibc's heap keeps (which depend on the order of frees)
    "MALLOC_MMAP_THRESHOLD_=1MiB": {"MALLOC_MMAP_THRESHOLD_": "1048576"},
}


SAVED = ("ckpt", "reward")
"""The checkpoints the ppo and stage cases load, saved once per run and linked into each case's folder."""


def model_config(args):
    from kiln.model import build_config
    from pipeline.config import ModelConfig

    m = ModelConfig(
        n_layers=args.layers, d_model=args.d_model, n_heads=8, n_kv_heads=8, d_ff=args.d_ff, n_experts=0,
        max_seq_len=128,
    )  # fmt: skip
    return build_config(m, args.vocab, 0, 1)


def vm_hwm_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def ds_config(world: int) -> dict:
    from kiln.training import deepspeed_config

    return deepspeed_config(
        zero_stage=3, precision="fp32", micro_batch_size=1, grad_accum=1, world_size=world, grad_clip=1.0
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------- worker


def worker(what: str, mode: str, args, out: Path) -> None:
    import logging

    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from kiln import sharded as S
    from kiln.model import KilnForCausalLM
    from kiln.training import init_distributed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    init_distributed(torch.device("cpu"), 10)
    rank = dist.get_rank()
    config = model_config(args)
    ds = ds_config(dist.get_world_size())
    dist.barrier()
    before, t0 = vm_hwm_kb(), time.perf_counter()
    torch.manual_seed(0)
    if what == "build":
        if mode == "full":
            models = [KilnForCausalLM(config)]
        else:
            with S.sharded_build(ds):
                models = [KilnForCausalLM(config)]
    elif what == "stage":
        models = ppo_stage(mode, out, dist.get_world_size())
    else:
        ckpt = out / "ckpt"
        load = dict(dtype=torch.float32, dropout=0.0)

        causal, classifier = AutoModelForCausalLM, AutoModelForSequenceClassification
        head = dict(num_labels=1)
        if mode == "full":
            models = [causal.from_pretrained(ckpt, **load), classifier.from_pretrained(ckpt, **head, **load),
                      causal.from_pretrained(ckpt, **load), classifier.from_pretrained(ckpt, **head, **load)]  # fmt: skip
        else:  # as stages/ppo.py loads them
            models = [S.from_pretrained(causal, ckpt, ds, **load), S.from_pretrained(classifier, ckpt, ds, **head, **load),
                      S.from_pretrained(causal, ckpt, ds, **load), S.from_pretrained(classifier, ckpt, ds, **head, **load)]  # fmt: skip
    if mode == "full" and what != "stage":  # (the stage's engines did it already)
        for m in models:  # what deepspeed.initialize does first with a whole model under ZeRO-3
            deepspeed.zero.Init(module=m, config_dict_or_path=ds)
    seconds = time.perf_counter() - t0
    assert all(S.is_partitioned(m) for m in models)
    local = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for m in models for p in m.parameters())
    full = sum(p.ds_numel * p.ds_tensor.element_size() for m in models for p in m.parameters())
    dist.barrier()
    row = {
        "before_kb": before,
        "peak_kb": vm_hwm_kb(),
        "seconds": seconds,
        "local_bytes": local,
        "full_bytes": full,
    }
    (out / f"{what}-{mode}-rank{rank}.json").write_text(json.dumps(row))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def ppo_stage(mode: str, out: Path, world: int) -> list:
    """The "stage" case: stages/ppo.py's `build_models` on this rank (the smallest batch for `world`
    ranks); returns the four engines' models."""
    import torch

    from kiln import sharded as S
    from pipeline.config import PpoConfig
    from stages import ppo

    p = PpoConfig(
        num_workers=world, zero_stage=3, micro_batch_size=1, mini_batch_size=world, rollout_batch_size=world
    )
    job = ppo.PpoJob(
        section=p, seed=0, export_dir=out / "export", wandb_run_id=None, sft_dir=out / "ckpt",
        reward_dir=out / "reward", reward_mean=0.0, reward_std=1.0, value_norm=(0.0, 1.0), prompts=[],
        task_prompts=[],
    )  # fmt: skip

    def plain_load(model_class, path, ds_config, **kwargs):
        return model_class.from_pretrained(path, **kwargs)

    if mode == "full":  # ppo before kiln/sharded.py: each model loaded whole, its engine partitions it
        S.from_pretrained = plain_load
    m = ppo.build_models(job, world, torch.device("cpu"), pad_id=0)
    return [m.actor.module, m.critic.module, m.ref.module, m.reward.module]


def save_checkpoint(args, out: Path) -> None:
    """The checkpoint of the "ppo" case (also the "stage" case's SFT folder) and the "stage" case's
    reward folder (a classifier of the same config, its value head included)."""
    import torch

    from kiln.model import KilnForCausalLM, KilnForSequenceClassification

    torch.manual_seed(0)
    config = model_config(args)
    KilnForCausalLM(config).save_pretrained(out / "ckpt")
    config.num_labels = 1
    KilnForSequenceClassification(config).save_pretrained(out / "reward")


# ---------------------------------------------------------------------------------------------------- driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flags(args) -> list[str]:
    return ["--layers", str(args.layers), "--d-model", str(args.d_model), "--d-ff", str(args.d_ff),
            "--vocab", str(args.vocab)]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--d-ff", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument(
        "--only", choices=["build", "ppo", "stage"], help="run one of the cases (default: all)"
    )
    parser.add_argument("--ranks", type=int, default=2, help="gloo ranks (a GPU node has 8; memory only)")
    parser.add_argument("--worker", nargs=3, metavar=("WHAT", "MODE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", metavar="OUT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        what, mode, out = args.worker
        return worker(what, mode, args, Path(out))
    if args.checkpoint:
        return save_checkpoint(args, Path(args.checkpoint))

    cases = [(w, m) for w, m in CASES if args.only in (None, w)]
    out = Path(tempfile.mkdtemp(prefix="kiln-sharded-bench-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    try:
        t0 = time.perf_counter()
        me = str(Path(__file__).resolve())
        if any(w in ("ppo", "stage") for w, _ in cases):  # the checkpoints ppo's models load
            subprocess.run([sys.executable, me, "--checkpoint", str(out), *flags(args)], env=env, check=True)
        for folder in SAVED:
            (out / folder).mkdir(exist_ok=True)
        for a, extra in enumerate(ALLOCATORS.values()):
            for what, mode in cases:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks),
                       "--master_port", str(free_port()), me, "--worker", what, mode, str(out / str(a)), *flags(args)]  # fmt: skip
                (out / str(a)).mkdir(exist_ok=True)
                for folder in SAVED:
                    (out / str(a) / folder).symlink_to(out / folder)
                proc = subprocess.run(cmd, env=env | extra, capture_output=True, text=True)
                for folder in SAVED:
                    (out / str(a) / folder).unlink()
                if proc.returncode != 0:
                    print(f"{what} {mode} failed:\n{proc.stderr[-4000:]}", file=sys.stderr)
                    return
        report(out, args, cases, time.perf_counter() - t0)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def report(out: Path, args, cases, total_s: float) -> None:
    mib = 1024.0
    rows = {
        (a, w, m, r): json.loads((out / str(a) / f"{w}-{m}-rank{r}.json").read_text())
        for a in range(len(ALLOCATORS)) for w, m in cases for r in range(args.ranks)
    }  # fmt: skip
    models = 1 if cases[0][0] == "build" else 4  # ppo and stage: four of the same size
    one = rows[(0, *cases[0], 0)]["full_bytes"] / models
    print(f"model: {args.layers} layers, d_model {args.d_model}, d_ff {args.d_ff}, vocab {args.vocab}: "
          f"{one / 4 / 1e6:.0f}M fp32 parameters, {one / 2**20:.0f} MiB; {args.ranks} gloo ranks, ZeRO-3\n")  # fmt: skip
    for a, name in enumerate(ALLOCATORS):
        print(f"host allocator: {name}")
        print(f"{'case':<14}{'rank':>5}{'process MiB':>13}{'peak MiB':>10}{'build MiB':>11}"
              f"{'its shards MiB':>16}{'seconds':>9}")  # fmt: skip
        for w, m in cases:
            for r in range(args.ranks):
                x = rows[(a, w, m, r)]
                print(f"{w + ' ' + m:<14}{r:>5}{x['before_kb'] / mib:>13.0f}{x['peak_kb'] / mib:>10.0f}"
                      f"{(x['peak_kb'] - x['before_kb']) / mib:>11.0f}{x['local_bytes'] / 2**20:>16.0f}"
                      f"{x['seconds']:>9.1f}")  # fmt: skip
        print()
    print(
        "sharded / full, peak RSS per rank (and the build's part: peak minus the process before it); goal <= 0.6"
    )
    print(f"{'':<8}{'rank':>5}" + "".join(f"{name:>30}" for name in ALLOCATORS))
    for w in dict.fromkeys(w for w, _ in cases):
        for r in range(args.ranks):
            cells = []
            for a in range(len(ALLOCATORS)):
                f, s = rows[(a, w, "full", r)], rows[(a, w, "sharded", r)]
                build = (s["peak_kb"] - s["before_kb"]) / max(1, f["peak_kb"] - f["before_kb"])
                cells.append(f"{s['peak_kb'] / f['peak_kb']:.2f} ({build:.2f})")
            print(f"{w:<8}{r:>5}" + "".join(f"{c:>30}" for c in cells))
    print(f"\n(peak RSS: VmHWM of each rank; {total_s:.0f} s in all)")


if __name__ == "__main__":
    main()
