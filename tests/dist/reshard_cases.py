"""Checkpoints resumed on another world size (kiln/reshard.py), on CPU ranks (gloo).

    torchrun --nproc_per_node 2 tests/dist/reshard_cases.py OUT_DIR [CASE ...]

Started once by tests/test_reshard.py. A case `zero<saved>-zero<resumed>-<precision>` trains the tiny
model of tests/dist/common.py as pretrain does: SAVED steps, a checkpoint, MORE steps (the reference
continuation), once on 1 rank and once on 2, with the same global batches (1 rank accumulates twice
as many micro-batches). Each checkpoint then resumes on the other world size for MORE steps: through
`to_universal` (ZeRO-0's as saved), and a universal one on its own world size too. Phases: each
process trains its share of the 1-rank runs alone (a group of one); both join torchrun's group for
the 2-rank runs and the resumes on 2 ranks; each resumes its share on 1 rank alone again.

OUT_DIR/<case>/<run>.json, rank 0's: the per-step losses, the AdamW groups' weight decays after the
load and as built, whether the groups' states share one `step` tensor. Runs: `one`, `two` (the
references), `one-to-one`, `one-to-two`, `two-to-one`, `two-to-one-unrepaired` (no
`repair_universal_load`), `fetched` (2 ranks, each from only the files `rank_files` keeps).
OUT_DIR/convert-error.txt: what `to_universal` raises for a folder that is no checkpoint.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.dist.common import MODEL, PRETRAIN, SEED, VOCAB  # noqa: E402

SAVED, MORE = 2, 3  # steps before the checkpoint, steps after
TAG = f"step{SAVED:08d}"
EXPERTS_APART = "zero2-zero2-fp32"  # the case of a checkpoint written with the experts one by one
CASES = ["zero2-zero2-fp32", "zero3-zero3-fp32", "zero1-zero2-fp32", "zero3-zero3-bf16", "zero0-zero0-fp32"]


def parse(case: str) -> tuple[int, int, str]:
    saved, resumed, precision = case.split("-")
    return int(saved.removeprefix("zero")), int(resumed.removeprefix("zero")), precision


def universal(case: str) -> bool:
    """Whether the case's checkpoints resume on the other world size through `to_universal` (ZeRO-0's
    load as saved: each holds the whole optimizer state)."""
    return parse(case)[0] >= 1


def per_expert(model) -> None:
    """Each MoE layer's experts as Kiln held them before it stacked them: one MLP of nn.Linear layers per
    expert (checkpoint names `ffn.experts.{e}.up_proj.weight`), with the same values and function."""
    import torch

    from kiln.model import MLP

    class PerExpert(torch.nn.ModuleList):
        def forward(self, xs, counts, expert_of_row):
            return torch.cat([mlp(rows) for mlp, rows in zip(self, xs.split(counts.tolist()), strict=True)])

    for layer in model.model.layers:
        if layer.is_moe:
            stacked = layer.ffn.experts
            mlps = PerExpert(
                MLP(model.config, stacked.up_proj.shape[1]) for _ in range(stacked.up_proj.shape[0])
            )
            with torch.no_grad():
                for e, mlp in enumerate(mlps):
                    for name in ("gate_proj", "up_proj", "down_proj"):
                        getattr(mlp, name).weight.copy_(getattr(stacked, name)[e])
            layer.ffn.experts = mlps


def engine(zero: int, precision: str, world: int, load_universal: bool = False, experts_apart: bool = False):
    """pretrain's engine (the model built from the seed, partitioned under ZeRO-3; Kiln's AdamW), and
    the weight decays its optimizer was built with. `experts_apart`: the model as `per_expert` lays it."""
    import deepspeed
    import torch

    from kiln import sharded as S
    from kiln.model import KilnForCausalLM, build_config
    from kiln.training import adamw, deepspeed_config

    p = PRETRAIN
    config = deepspeed_config(
        zero_stage=zero, precision=precision, micro_batch_size=p.micro_batch_size,
        grad_accum=p.global_batch_size // (world * p.micro_batch_size), world_size=world, grad_clip=p.grad_clip,
    )  # fmt: skip
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    torch.manual_seed(SEED)
    with S.sharded_build(config):
        model = KilnForCausalLM(build_config(MODEL, VOCAB, 0, 1))
    if experts_apart:
        per_expert(model)
    optimizer = adamw(model, lr=p.lr, betas=(p.beta1, p.beta2), weight_decay=p.weight_decay)
    built = [g["weight_decay"] for g in optimizer.param_groups]
    eng, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return eng, built


def train(eng, train_data, start: int, stop: int) -> list[float]:
    """pretrain's loop from step `start` to `stop` (its schedule, its global batches): the loss of each
    step, averaged over its micro-batches and the ranks."""
    import torch

    from kiln import training as T

    p, world, rank = PRETRAIN, eng.world_size, eng.global_rank
    accum = p.global_batch_size // (world * p.micro_batch_size)
    losses = []
    for step in range(start, stop):
        for group in eng.optimizer.param_groups:
            group["lr"] = T.lr_at(step, lr=p.lr, min_lr=p.min_lr, warmup=p.warmup_steps, total=SAVED + MORE)
        ids = T.global_batch(step, p.global_batch_size, len(train_data), SEED)
        total = torch.zeros((), dtype=torch.float64)
        for a in range(accum):
            x, y = T.load_batch(train_data, T.micro_batch(ids, a, rank, world, p.micro_batch_size), "cpu")
            out = eng(input_ids=x, shift_labels=y)
            eng.backward(out.loss)
            eng.step()
            total += out.loss.detach().double() / accum
        losses.append(T.all_reduce_mean({"loss": total}, "cpu")["loss"])
    return losses


def optimizer_state(eng) -> dict:
    """The weight decays of the AdamW groups, and whether two of its states hold the same `step`."""
    inner = getattr(eng.optimizer, "optimizer", eng.optimizer)  # torch's AdamW (inside ZeRO's optimizer)
    steps = [id(s["step"]) for s in inner.state.values()]
    return {
        "weight_decays": [g["weight_decay"] for g in inner.param_groups],
        "shared_step": len(set(steps)) < len(steps),
    }


def write(out: Path, case: str, run: str, eng, row: dict) -> None:
    if eng.global_rank == 0:
        (out / case / f"{run}.json").write_text(json.dumps(row))


def save_run(out: Path, case: str, train_data, world: int, experts_apart: bool = False) -> None:
    """SAVED steps, a checkpoint in `one` or `two` as pretrain writes it (DeepSpeed's, RNG, the trainer
    state without a layout), then the MORE steps that follow it."""
    from kiln.training import save_rng, write_json

    saved, _, precision = parse(case)
    eng, _ = engine(saved, precision, world, experts_apart=experts_apart)
    train(eng, train_data, 0, SAVED)
    folder = out / case / {1: "one", 2: "two"}[world]
    eng.save_checkpoint(str(folder), tag=TAG)
    save_rng(folder / f"rng_rank{eng.global_rank}.pt")
    if eng.global_rank == 0:
        write_json(folder / "trainer_state.json", {"step": SAVED, "tag": TAG})
    write(out, case, folder.name, eng, {"losses": train(eng, train_data, SAVED, SAVED + MORE)})


def resume(
    out: Path, case: str, train_data, run: str, load_dir: Path, load_universal: bool, repair: bool = True
):
    """The MORE steps after the checkpoint in `load_dir`, on this group's world size."""
    import torch.distributed as dist

    from kiln.reshard import repair_universal_load

    _, resumed, precision = parse(case)
    eng, built = engine(resumed, precision, dist.get_world_size(), load_universal)
    eng.load_checkpoint(str(load_dir), tag=TAG, load_lr_scheduler_states=False)
    if repair:
        repair_universal_load(eng, built)
    loaded = optimizer_state(eng)
    loaded["experts"] = sorted(
        {n.rsplit(".", 1)[-1] for n, _ in eng.module.named_parameters() if ".experts." in n}
    )
    write(
        out, case, run, eng, {"losses": train(eng, train_data, SAVED, SAVED + MORE), "built": built, **loaded}
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alone() -> None:
    """Join a process group of one, on a store of its own (not torchrun's)."""
    import deepspeed.utils.groups
    import torch.distributed as dist

    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    )
    deepspeed.utils.groups._WORLD_GROUP = None  # DeepSpeed's clone of a closed group
    dist.init_process_group("gloo")


def together(torchrun_env: dict) -> None:
    """Join torchrun's group of all the processes."""
    import deepspeed.utils.groups
    import torch.distributed as dist
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    from deepspeed.runtime.zero.partition_parameters import Init

    os.environ.update(torchrun_env)
    deepspeed.utils.groups._WORLD_GROUP = None
    # ZeRO-3 numbers parameters and modules per process, on counters that the runs alone advanced
    # differently on each rank; the ranks must agree on the numbers
    Init.param_id = 0
    DeepSpeedZeRoOffload._register_deepspeed_module.__defaults__[0][0] = 0
    dist.init_process_group("gloo")


def main(out: Path, cases: list[str]) -> None:
    import logging

    import torch.distributed as dist
    from pyarrow.fs import LocalFileSystem

    from data_prep.packed import PackedTokens
    from kiln.reshard import fetch, per_expert_layout, to_universal
    from kiln.training import extension_cache

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    extension_cache()
    torchrun = {
        k: v
        for k, v in os.environ.items()
        if k.startswith(("TORCHELASTIC", "MASTER_", "RANK", "WORLD", "LOCAL"))
    }
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    train_data = PackedTokens(out / "tokens", "train")
    mine = cases[rank::world]
    for case in cases:
        (out / case).mkdir(parents=True, exist_ok=True)

    alone()
    for case in mine:
        save_run(out, case, train_data, 1)
        if universal(case):
            converted = to_universal(out / case / "one", TAG, out / case / "one-universal")
            resume(out, case, train_data, "one-to-one", converted, load_universal=True)
    if rank == 0:  # a checkpoint of experts one by one, resumed by the stacked model
        apart = out / "experts-apart"
        (apart / EXPERTS_APART).mkdir(parents=True, exist_ok=True)
        save_run(apart, EXPERTS_APART, train_data, 1, experts_apart=True)
        found = per_expert_layout(apart / EXPERTS_APART / "one", TAG)
        converted = to_universal(apart / EXPERTS_APART / "one", TAG, apart / "stacked", per_expert=found)
        resume(apart, EXPERTS_APART, train_data, "stacked", converted, load_universal=True)
        (apart / "found.json").write_text(json.dumps(found))
    dist.destroy_process_group()

    together(torchrun)
    for case in cases:
        save_run(out, case, train_data, 2)
        dist.barrier()
        source = out / case / ("one-universal" if universal(case) else "one")
        resume(out, case, train_data, "one-to-two", source, load_universal=universal(case))
        saved, resumed, _ = parse(case)
        if saved == resumed:  # each rank from its own files, as copied from an object store
            local = fetch(
                LocalFileSystem(), str(out / case / "two"), out / case / f"fetched-rank{rank}", rank
            )
            resume(out, case, train_data, "fetched", local, load_universal=False)
    dist.barrier()
    dist.destroy_process_group()

    alone()
    for case in mine:
        if not universal(case):
            resume(out, case, train_data, "two-to-one", out / case / "two", load_universal=False)
            continue
        converted = to_universal(out / case / "two", TAG, out / case / "two-universal")
        resume(out, case, train_data, "two-to-one", converted, load_universal=True)
        resume(out, case, train_data, "two-to-one-unrepaired", converted, load_universal=True, repair=False)
    if rank == 0:
        (out / "empty" / TAG).mkdir(parents=True)
        try:
            to_universal(out / "empty", TAG, out / "empty-universal")
        except RuntimeError as e:
            (out / "convert-error.txt").write_text(str(e))
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo can abort at interpreter exit after the work is done


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] or CASES)
