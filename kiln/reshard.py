"""Resuming a DeepSpeed checkpoint under another world size or ZeRO stage.

    saved = saved_layout(ckpt, tag, state)         # {"world_size": 2, "zero_stage": 3}
    problem = layout_change_problem(saved, now)    # None, or why it cannot resume and what to do
    if needs_universal(saved, now):                # the engine built with "checkpoint": {"load_universal": True}
        ckpt = to_universal(ckpt, tag, out)
    engine.load_checkpoint(str(ckpt), tag=tag, load_lr_scheduler_states=False)
    repair_universal_load(engine, weight_decays)   # the AdamW groups' own

DeepSpeed 0.19.8 loads a ZeRO-1/2/3 checkpoint's per-rank shards only on the world size that wrote
them. Its converter (`ds_to_universal`) merges them into one file per parameter (a universal
checkpoint), which loads on any world size: ZeRO-1/2's into ZeRO-1/2, ZeRO-3's into ZeRO-3. ZeRO-1
and 2 load each other's shards as saved on the same world size, and ZeRO-0 (each rank holds the
whole optimizer state) on any; nothing crosses between ZeRO-0 and the others, nor between ZeRO-3
and ZeRO-1/2. Measured on CPU ranks, fp32 and bf16, 2 -> 1 and 1 -> 2 (tests/test_reshard.py).

`rank_files` / `fetch` copy from an object store only the files that one rank reads. `prepare` and
`finish` are what a training stage calls around building its engine and loading the checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

PER_EXPERT = re.compile(r"^(.*\.ffn\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|bias)$")
"""A parameter of a checkpoint written while each expert was its own layers (kiln/model.py's `Experts` stacks
them now): `model.layers.1.ffn.experts.3.up_proj.weight` is expert 3's slice of `...ffn.experts.up_proj`."""
ZERO_SHARD = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_(optim|model)_states\.pt$")
RNG = re.compile(r"^rng_rank(\d+)\.pt$")


def saved_layout(ckpt: Path, tag: str, state: dict) -> dict:
    """The world size and ZeRO stage a checkpoint was written with: `state["layout"]` (trainer_state.json)
    when recorded, else DeepSpeed's model-states file (its `dp_world_size` and `ds_config`, read with
    weights_only), else the file names: one optimizer shard per rank (none under ZeRO-0, whose world
    size the RNG files give), per-rank model states under ZeRO-3. ZeRO-1 and 2 write the same files,
    and each loads the other's: the names say 1. With the expert parallelism where recorded
    (`expert_parallel`; a checkpoint without it was written before it existed, with 1)."""
    if "layout" in state:
        keys = [k for k in ("world_size", "zero_stage", "expert_parallel") if k in state["layout"]]
        return {k: int(state["layout"][k]) for k in keys}
    folder = Path(ckpt) / tag
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        try:
            sd = torch.load(folder / name, map_location="cpu", weights_only=True, mmap=True)
            stage = sd["ds_config"].get("zero_optimization", {}).get("stage", 0)
            return {"world_size": int(sd["dp_world_size"]), "zero_stage": int(stage)}
        except (OSError, RuntimeError, pickle.UnpicklingError, KeyError, AttributeError):
            continue  # absent, or not loadable with weights_only
    shards = [m for m in map(ZERO_SHARD.match, os.listdir(folder)) if m]
    ranks = {m[1] for m in shards if m[2] == "optim"} or {m[1] for m in map(RNG.match, os.listdir(ckpt)) if m}
    stage = 3 if any(m[2] == "model" for m in shards) else 1 if shards else 0
    return {"world_size": len(ranks), "zero_stage": stage}


def per_expert_layout(ckpt: Path, tag: str) -> bool:
    """Whether checkpoint `tag` holds a MoE model's experts one by one (written before they were stacked):
    its parameter names, from the model-states file."""
    folder = Path(ckpt) / tag
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        try:
            sd = torch.load(folder / name, map_location="cpu", weights_only=True, mmap=True)
        except (OSError, RuntimeError, pickle.UnpicklingError):
            continue
        return any(PER_EXPERT.match(n) for group in sd.get("param_shapes") or [] for n in group)
    return False


def _stacked_name(m: re.Match) -> str:
    return f"{m[1]}.{m[3]}{'' if m[4] == 'weight' else '_bias'}"


def _stack_dict(named: dict) -> dict:
    """name -> value with each per-expert run replaced, where its first expert was, by the stacked entry
    (`stack` of the values in expert order)."""
    out, experts = {}, {}
    for name, value in named.items():
        if m := PER_EXPERT.match(name):
            stacked = _stacked_name(m)
            if stacked not in experts:
                out[stacked] = None  # keeps the place
                experts[stacked] = {}
            experts[stacked][int(m[2])] = value
        else:
            out[name] = value
    for stacked, values in experts.items():
        ordered = [values[e] for e in range(len(values))]
        if all(isinstance(v, torch.Tensor) for v in ordered):
            out[stacked] = torch.stack(ordered)
        else:  # shapes (torch.Size)
            out[stacked] = torch.Size([len(ordered), *ordered[0]])
    return out


def stack_experts(universal_tag: Path) -> None:
    """Re-lay a universal checkpoint's folder (`<out>/<tag>`) of a per-expert model as the stacked model
    loads it: each projection's per-expert folders (`zero/<name>/fp32.pt`, `exp_avg.pt`, `exp_avg_sq.pt`:
    {"param": tensor, "cat_dim": 0}; `step.pt`) become one folder of the stacked values, and the module
    weights and parameter shapes of the model-states files are renamed and stacked alike."""
    zero = Path(universal_tag) / "zero"
    groups: dict[str, dict[int, Path]] = {}
    for folder in zero.iterdir():
        if m := PER_EXPERT.match(folder.name):
            groups.setdefault(_stacked_name(m), {})[int(m[2])] = folder
    for stacked, folders in groups.items():
        ordered = [folders[e] for e in range(len(folders))]
        (zero / stacked).mkdir()
        for file in sorted(p.name for p in ordered[0].iterdir()):
            parts = [torch.load(f / file, map_location="cpu", weights_only=True) for f in ordered]
            if isinstance(parts[0], dict):  # the parameter's fp32 value or an optimizer moment
                value = {**parts[0], "param": torch.stack([p["param"] for p in parts])}
            else:  # step: one count for all
                value = parts[0]
            torch.save(value, zero / stacked / file)
        for f in ordered:
            shutil.rmtree(f)
    for path in Path(universal_tag).glob("*model_states.pt"):
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(sd.get("module"), dict):
            sd["module"] = type(sd["module"])(_stack_dict(sd["module"]))
        if sd.get("param_shapes"):
            sd["param_shapes"] = [type(g)(_stack_dict(g)) for g in sd["param_shapes"]]
        torch.save(sd, path)


def needs_universal(saved: dict, now: dict) -> bool:
    """Whether the checkpoint goes through `to_universal` before layout `now` loads it: a new world size
    under ZeRO-1/2/3. The rest that resumes loads as saved: ZeRO-0 holds the whole optimizer state on
    every rank, and ZeRO-1 and 2 load each other's shards on the same world size."""
    changed = saved["world_size"] != now["world_size"] and min(saved["zero_stage"], now["zero_stage"]) >= 1
    return changed and layout_change_problem(saved, now) is None


def unsupported(old_stage: int, new_stage: int) -> str | None:
    """Why DeepSpeed 0.19.8 cannot load a checkpoint of ZeRO stage `old_stage` under `new_stage` on
    any world size, or None."""
    if old_stage == new_stage or {old_stage, new_stage} == {1, 2}:
        return None
    if 0 in (old_stage, new_stage):
        return (
            "ZeRO-0 keeps the whole optimizer state in one file that only ZeRO-0 loads, and DeepSpeed's "
            "conversion (universal checkpoints) reads only ZeRO-1/2/3 shards, which ZeRO-0 cannot load"
        )
    return (
        "DeepSpeed converts a ZeRO-3 checkpoint into a universal one that only ZeRO-3 loads, and a "
        "ZeRO-1/2 one into one that only ZeRO-1/2 load"
    )


def expert_layout_problem(saved_ep: int, saved_world: int, ep: int, world: int) -> str | None:
    """Why a checkpoint written with expert parallelism `saved_ep` on `saved_world` ranks cannot resume with
    `ep` on `world` ranks, or None: only on the layout it was written with, when either is above 1."""
    if saved_ep == ep and (ep == 1 or saved_world == world):
        return None
    return (
        "each rank's shards hold the experts of its place in its expert-parallel group; DeepSpeed loads them "
        "only as saved, and its conversion to the universal form, which reshards, would merge the different "
        "experts of one name as if they were shards of one tensor"
    )


def layout_change_problem(saved: dict, now: dict) -> str | None:
    """Why a checkpoint of layout `saved` cannot resume under layout `now` (DeepSpeed 0.19.8), or None.
    `expert_parallel` where absent: 1."""
    was, ep = saved.get("expert_parallel", 1), now.get("expert_parallel", 1)
    if why := expert_layout_problem(was, saved["world_size"], ep, now["world_size"]):
        return (
            f"the checkpoint was written with expert_parallel={was} on num_workers={saved['world_size']} and "
            f"cannot resume with expert_parallel={ep} on num_workers={now['world_size']}: {why}. Set them back "
            "to resume from it, or delete the stage's work folder to start over"
        )
    old, new = saved["zero_stage"], now["zero_stage"]
    why = unsupported(old, new)
    if why is None:
        return None
    return (
        f"the checkpoint was written with zero_stage={old} on num_workers={saved['world_size']} and cannot "
        f"resume with zero_stage={new}: {why}. Set zero_stage back to {old} to resume from it (num_workers "
        "may change), or delete the stage's work folder to start over"
    )


def to_universal(ckpt: Path, tag: str, out: Path, per_expert: bool = False) -> Path:
    """DeepSpeed's universal form of checkpoint `ckpt`/`tag`, in `out` (returned): `out/<tag>/` and
    `out/latest_universal`, what `engine.load_checkpoint(str(out), tag=tag)` reads with
    `"checkpoint": {"load_universal": True}`. Written into a temporary sibling renamed into place, so
    `out` is complete or absent; a complete one is reused. `per_expert`: the checkpoint holds its
    experts one by one (`per_expert_layout`): the universal one is re-laid as the model stacks them."""
    out = Path(out)
    if (out / tag).is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    cmd = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(Path(ckpt) / tag),
        "--output_folder", str(tmp / tag), "--num_extract_workers", "1", "--num_merge_workers", "1",
        "--inject_missing_state",
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
            raise RuntimeError(f"converting checkpoint {ckpt}/{tag} to a universal one failed:\n{tail}")
        if per_expert:
            stack_experts(tmp / tag)
        shutil.rmtree(out, ignore_errors=True)  # an incomplete one, or another tag's
        try:
            tmp.rename(out)
        except OSError:  # another process put it in place meanwhile
            if not (out / tag).is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def repair_universal_load(engine, weight_decays: list[float]) -> None:
    """Undo what DeepSpeed's ZeRO-3 universal loader gets wrong: it gives every param group group 0's
    hyper-parameters (the no-decay group decays) and every group's state one shared `step` tensor
    (advanced once per group per step). No-op elsewhere."""
    if not (engine.load_universal_checkpoint() and engine.zero_optimization_stage() == 3):
        return
    inner = engine.optimizer.optimizer  # the torch AdamW, its groups ZeRO's flat partitions
    for group, wd in zip(inner.param_groups, weight_decays, strict=True):
        group["weight_decay"] = wd
    for state in inner.state.values():
        if "step" in state:
            state["step"] = state["step"].clone()


def rank_files(names: list[str], rank: int) -> list[str]:
    """The files of a checkpoint (relative paths) that `rank` reads to resume on the same layout: all
    but the other ranks' ZeRO shards and RNG states (`mp_rank_00` is the model-parallel rank: kept).
    A conversion reads every rank's files, and a universal checkpoint is loaded whole."""

    def other(name: str) -> bool:
        m = ZERO_SHARD.match(Path(name).name) or RNG.match(Path(name).name)
        return m is not None and int(m[1]) != rank

    return [n for n in names if not other(n)]


def fetch(filesystem, path: str, dest: Path, rank: int | None) -> Path:
    """Copy the checkpoint at `path` on a pyarrow.fs FileSystem into `dest` (relative paths kept): the
    files `rank` reads (`rank_files`), or all of them with rank None (for a conversion)."""
    from pyarrow import fs

    base = path.rstrip("/")
    infos = filesystem.get_file_info(fs.FileSelector(base, recursive=True))
    names = [i.path.removeprefix(base + "/") for i in infos if i.type == fs.FileType.File]
    for name in names if rank is None else rank_files(names, rank):
        target = Path(dest) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with filesystem.open_input_stream(f"{base}/{name}") as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    return Path(dest)


def prepare(wctx, ckpt: Path, tag: str, state: dict, now: dict) -> tuple[Path, bool]:
    """(the folder to load checkpoint `tag` from, whether the engine must be built with
    `"checkpoint": {"load_universal": True}`) for a worker of layout `now` ({"world_size",
    "zero_stage"}). Under the layout it was written with, the checkpoint as fetched; under another
    world size, its universal form, converted once per node (by its local rank 0, from every rank's
    files) into a temporary folder the node's ranks share. A checkpoint of a MoE model written before
    its experts were stacked goes through the universal form too, re-laid (`stack_experts`), on any
    world size. Raises with `layout_change_problem`'s message where DeepSpeed cannot load it (the
    run's planning refuses those first)."""
    import torch.distributed as dist

    saved = saved_layout(ckpt, tag, state)
    problem = layout_change_problem(saved, now)
    if problem:
        raise RuntimeError(problem)
    per_expert = per_expert_layout(ckpt, tag)
    if per_expert and saved["zero_stage"] == 0:
        raise RuntimeError(
            f"checkpoint {ckpt}/{tag} holds its MoE experts one by one (written before Kiln stacked them) under "
            "ZeRO-0, whose optimizer state has no universal form to re-lay: resume it with the Kiln version "
            "that wrote it, or start the stage again"
        )
    if not (needs_universal(saved, now) or per_expert):
        return Path(ckpt), False
    # the same name on every rank of the run (all read the same trainer_state.json), another per checkpoint
    key = hashlib.sha256(repr((sorted(state.items(), key=str), tag)).encode()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"kiln-universal-{key}"
    if wctx.local_rank == 0:
        to_universal(wctx.checkpoint(every_rank=True), tag, out, per_expert=per_expert)
    if dist.is_initialized():
        dist.barrier()  # the node's conversion is complete
    return out, True


def finish(wctx, folder: Path, universal: bool) -> None:
    """After every rank has loaded: the node's universal copy is removed."""
    import torch.distributed as dist

    if not universal:
        return
    if dist.is_initialized():
        dist.barrier()
    if wctx.local_rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
