"""Resuming a DeepSpeed checkpoint under another world size, ZeRO stage or expert parallelism.

    saved = saved_layout(ckpt, tag, state)         # {"world_size": 2, "zero_stage": 2, "expert_parallel": 2}
    problem = layout_change_problem(saved, now)    # None, or why it cannot resume and what to do
    if needs_universal(saved, now):                # the engine built with "checkpoint": {"load_universal": True}
        ckpt = to_universal(ckpt, tag, out, layout=saved, param_groups=groups)  # the run's optimizer's
    engine.load_checkpoint(str(ckpt), tag=tag, load_lr_scheduler_states=False)
    repair_universal_load(engine, weight_decays)   # the AdamW groups' own

DeepSpeed 0.19.8 loads a ZeRO-1/2/3 checkpoint's per-rank shards only on the world size that wrote
them. Its converter (`ds_to_universal`) merges them into one file per parameter (a universal
checkpoint), which loads on any world size: ZeRO-1/2's into ZeRO-1/2, ZeRO-3's into ZeRO-3. ZeRO-1
and 2 load each other's shards as saved on the same world size, and ZeRO-0 (each rank holds the
whole optimizer state) on any; nothing crosses between ZeRO-0 and the others, nor between ZeRO-3
and ZeRO-1/2. Measured on CPU ranks, fp32 and bf16, 2 -> 1 and 1 -> 2 (tests/test_reshard.py).

Expert parallelism (`pretrain.expert_parallel`, kiln/expert_parallel.py; ZeRO-1/2 only). A checkpoint
written with P > 1 holds in each rank's shard the experts of its place in its expert-parallel group,
under the stacked parameter's global name (`...ffn.experts.up_proj`, E/P experts of E), and DeepSpeed
loads it only on the P and world size that wrote it. Its converter would take the P different slices
of one name for ZeRO fragments of one tensor (it fails on their sizes), so `to_universal` hides the
experts from it and re-lays them itself (`relay_experts`): each stacked expert parameter whole, (E, ...),
with its fp32 master weights and Adam moments, in the form DeepSpeed gives expert parameters (its AutoEP
layers'): marked `is_expert_param`, with `ep_num_experts`. From that form DeepSpeed's ZeRO-1/2 universal
loader gives each rank the experts of its expert-parallel rank under any P that divides E (under its
`deepspeed.utils.groups`, which kiln/expert_parallel.py `for_deepspeed` creates), and all of them with
P = 1. A ZeRO-1/2 checkpoint written with P = 1 is marked the same way (`mark_experts`). So a ZeRO-1/2
checkpoint of a MoE model resumes under any expert_parallel and number of workers that the configuration
accepts (P divides the workers and the experts); on the layout that wrote it, it loads as saved. Measured
on CPU ranks: 2 ranks with P = 2 -> P = 1 on 2 ranks and on 1, and P = 1 -> P = 2
(tests/test_expert_parallel_pretrain.py).

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
STACKED_EXPERTS = re.compile(r"^(.*\bffn\.experts)\.(gate_proj|up_proj|down_proj)(_bias)?$")
"""A stacked expert parameter (E, ...) of kiln/model.py's `Experts`: the pattern of `STACKED_EXPERTS` there
(not imported: kiln/model.py imports the configuration, which imports this module)."""
ZERO_SHARD = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_(optim|model)_states\.pt$")
RNG = re.compile(r"^rng_rank(\d+)\.pt$")
PARAM, EP_IS_EXPERT, EP_EXPERTS = "param", "is_expert_param", "ep_num_experts"
"""Keys of a universal checkpoint's per-parameter file (deepspeed.checkpoint.constants `PARAM`,
`EP_IS_EXPERT_PARAM`, `EP_NUM_EXPERTS`): the tensor, and for an expert parameter the mark and its experts."""


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
    under ZeRO-1/2/3, or a new expert parallelism (`expert_parallel`, 1 where absent). The rest that
    resumes loads as saved: ZeRO-0 holds the whole optimizer state on every rank, and ZeRO-1 and 2 load
    each other's shards on the same world size and expert parallelism."""
    if min(saved["zero_stage"], now["zero_stage"]) < 1 or layout_change_problem(saved, now) is not None:
        return False
    experts = saved.get("expert_parallel", 1) != now.get("expert_parallel", 1)
    return saved["world_size"] != now["world_size"] or experts


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


def layout_change_problem(saved: dict, now: dict) -> str | None:
    """Why a checkpoint of layout `saved` cannot resume under layout `now` (DeepSpeed 0.19.8), or None:
    only a change of ZeRO stage that `unsupported` names. The world size and the expert parallelism may
    change (through `to_universal`); that `now`'s expert parallelism divides the workers and the experts
    is the configuration's check (pipeline/config.py)."""
    old, new = saved["zero_stage"], now["zero_stage"]
    why = unsupported(old, new)
    if why is None:
        return None
    return (
        f"the checkpoint was written with zero_stage={old} on num_workers={saved['world_size']} and cannot "
        f"resume with zero_stage={new}: {why}. Set zero_stage back to {old} to resume from it (num_workers "
        "and expert_parallel may change), or delete the stage's work folder to start over"
    )


def to_universal(
    ckpt: Path,
    tag: str,
    out: Path,
    per_expert: bool = False,
    layout: dict | None = None,
    param_groups: list[dict] | None = None,
) -> Path:
    """DeepSpeed's universal form of checkpoint `ckpt`/`tag`, in `out` (returned): `out/<tag>/` and
    `out/latest_universal`, what `engine.load_checkpoint(str(out), tag=tag)` reads with
    `"checkpoint": {"load_universal": True}`. Written into a temporary sibling renamed into place, so
    `out` is complete or absent; a complete one is reused. `per_expert`: the checkpoint holds its
    experts one by one (`per_expert_layout`): the universal one is re-laid as the model stacks them.
    `layout`: the one it was written with (`saved_layout`; read from its files where None, which do not
    record the expert parallelism: 1). Under ZeRO-1/2 the stacked experts come out whole and marked
    (`relay_experts` from an expert-parallel checkpoint, `mark_experts` otherwise), for any expert
    parallelism to load; `param_groups`, the resuming run's optimizer groups, replace the checkpoint's
    (`take_groups`)."""
    out = Path(out)
    if (out / tag).is_dir():
        return out
    layout = layout or saved_layout(ckpt, tag, {})
    experts_split = layout.get("expert_parallel", 1) > 1
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    source, universal = Path(ckpt) / tag, tmp / "universal"
    try:
        if experts_split:  # what DeepSpeed's converter sees: the checkpoint without its experts
            shapes = hide_experts(source, tmp / "view" / tag)
            source = tmp / "view" / tag
        cmd = [
            sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
            "--output_folder", str(universal / tag), "--num_extract_workers", "1", "--num_merge_workers", "1",
            "--inject_missing_state", *(["--keep_temp_folder"] if experts_split else []),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
            raise RuntimeError(f"converting checkpoint {ckpt}/{tag} to a universal one failed:\n{tail}")
        if experts_split:
            relay_experts(universal / tag, Path(ckpt) / tag, layout["expert_parallel"], shapes)
        if per_expert:
            stack_experts(universal / tag)
        if not experts_split and layout["zero_stage"] in (1, 2):
            mark_experts(universal / tag)
        if param_groups is not None and layout["zero_stage"] in (1, 2):
            take_groups(universal / tag, param_groups)
        shutil.rmtree(out, ignore_errors=True)  # an incomplete one, or another tag's
        try:
            universal.rename(out)
        except OSError:  # another process put it in place meanwhile
            if not (out / tag).is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


MODEL_STATES = "mp_rank_00_model_states.pt"
"""ZeRO-1/2's model-states file (the module's weights, the optimizer groups' parameter shapes), rank 0's."""


def hide_experts(source: Path, view: Path) -> dict[str, torch.Size]:
    """Lay out in folder `view` ZeRO-1/2 checkpoint folder `source` (`<ckpt>/<tag>`) as DeepSpeed's converter
    is to see it: every file linked, but the model-states file without the stacked expert parameters (its
    `param_shapes` and `module`), which the converter merges by those. It still extracts their fragments
    from the optimizer shards (all it reads them by), for `relay_experts`. Returns {name: the shape a rank
    holds} of the experts hidden."""
    view.mkdir(parents=True)
    for f in source.iterdir():
        if f.name != MODEL_STATES:
            (view / f.name).symlink_to(f.resolve())
    sd = torch.load(source / MODEL_STATES, map_location="cpu", weights_only=True)
    shapes = {n: s for group in sd["param_shapes"] for n, s in group.items() if STACKED_EXPERTS.match(n)}
    sd["param_shapes"] = [
        type(g)((n, s) for n, s in g.items() if n not in shapes) for g in sd["param_shapes"]
    ]
    sd["module"] = type(sd["module"])((n, v) for n, v in sd["module"].items() if n not in shapes)
    torch.save(sd, view / MODEL_STATES)
    return shapes


def relay_experts(universal_tag: Path, source: Path, size: int, shapes: dict[str, torch.Size]) -> None:
    """Complete the universal checkpoint folder `universal_tag`, converted from the expert-parallel checkpoint
    folder `source` (written with expert parallelism `size`) with its experts hidden (`hide_experts`), with
    the stacked expert parameters `shapes` ({name: the shape a rank holds, (E/size, ...)}).

    The converter left each rank's fragments of them in `<universal_tag>/tmp/<name>/0/<state>.<rank>` (fp32,
    exp_avg, exp_avg_sq, step). Expert-parallel rank e's experts (global ids e*E/size ...) are held by the
    ranks e, e + size, e + 2 size, ... (its expert-data-parallel group, kiln/expert_parallel.py
    `deepspeed_groups`), which ZeRO-1/2 partition them over in that order: their fragments, concatenated,
    are rank e's slice, and the slices in expert-parallel order the whole parameter. DeepSpeed 0.19.8 does
    exactly this for its AutoEP layers (`consolidate_autoep_zero12_expert_states`, used here, which writes
    `zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt`, marked as expert parameters of E experts); its
    converter does it only for parameters named as AutoEP names them (`experts.w1`). The model-states file
    then gets the whole parameters (its `param_shapes` and `module`), and the fragments are removed."""
    from deepspeed.checkpoint.autoep_universal import consolidate_autoep_zero12_expert_states

    sd = torch.load(source / MODEL_STATES, map_location="cpu", weights_only=True)
    layers = {}  # DeepSpeed's description of each, as of an AutoEP layer's expert parameter
    for name, shape in shapes.items():
        layers[name] = {"num_experts": shape[0] * size, "num_local_experts": shape[0], "ep_size": size}
        layers[name]["expert_placement"] = None  # the consecutive experts of each rank
    fragments = universal_tag / "tmp"
    consolidate_autoep_zero12_expert_states(
        str(fragments), str(universal_tag), layers, shapes, dp_degree=sd["dp_world_size"], tp_degree=1,
        use_data_before_expert_parallel=False,  # deepspeed_groups' layout
    )  # fmt: skip
    shutil.rmtree(fragments)
    whole = {n: torch.load(universal_tag / "zero" / n / "fp32.pt", weights_only=True)[PARAM] for n in shapes}
    for name, value in whole.items():
        sd["module"][name] = value.to(sd["module"][name].dtype)
    for group in sd["param_shapes"]:
        for name in whole.keys() & group.keys():
            group[name] = whole[name].shape
    torch.save(sd, universal_tag / MODEL_STATES)


def mark_experts(universal_tag: Path) -> None:
    """Mark the stacked expert parameters of a ZeRO-1/2 universal checkpoint folder converted from a
    checkpoint written without expert parallelism (whole already) as expert parameters of E experts
    (`is_expert_param`, `ep_num_experts`), as `relay_experts` writes them: DeepSpeed's universal loader
    then gives each rank of an expert-parallel run its experts, and every expert to a run without. (Not
    under ZeRO-3, whose universal loader reads the mark as its AutoEP layers' and looks for their groups.)"""
    for folder in (Path(universal_tag) / "zero").iterdir():
        if not STACKED_EXPERTS.match(folder.name):
            continue
        for path in folder.glob("*.pt"):
            if path.name == "step.pt":
                continue
            value = torch.load(path, map_location="cpu", weights_only=True)
            value.update({EP_IS_EXPERT: True, EP_EXPERTS: value[PARAM].shape[0]})
            torch.save(value, path)


def take_groups(universal_tag: Path, param_groups: list[dict]) -> None:
    """Give ZeRO-1/2 universal checkpoint folder `universal_tag` the optimizer groups `param_groups` (the
    resuming run's, as built: their hyper-parameters, not their parameters) in place of the checkpoint's.

    Why: DeepSpeed 0.19.8's universal loader walks the run's groups beside the file's (`zip`), loading each
    group's parameters and copying the file's hyper-parameters onto it, so a group beyond the file's is
    never loaded. The groups follow the layout: with expert parallelism the expert parameters have groups of
    their own (as many as DeepSpeed's `split_params_into_different_moe_groups_for_optimizer` makes of
    them, splitting them by size), without it none. The hyper-parameters are the configuration's either
    way (`lr` is set at every step)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = Path(universal_tag) / "zero" / "optimizer_state.pt"
    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler]):  # the classes its file holds
        sd = torch.load(path, map_location="cpu", weights_only=True)
    sd["param_groups"] = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [i]} for i, g in enumerate(param_groups)
    ]
    torch.save(sd, path)


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


def prepare(
    wctx, ckpt: Path, tag: str, state: dict, now: dict, param_groups: list[dict] | None = None
) -> tuple[Path, bool]:
    """(the folder to load checkpoint `tag` from, whether the engine must be built with
    `"checkpoint": {"load_universal": True}`) for a worker of layout `now` ({"world_size",
    "zero_stage", "expert_parallel"}). Under the layout it was written with, the checkpoint as fetched;
    under another world size or expert parallelism, its universal form, converted once per node (by its
    local rank 0, from every rank's files) into a temporary folder the node's ranks share. A checkpoint
    of a MoE model written before
    its experts were stacked goes through the universal form too, re-laid (`stack_experts`), on any
    world size. `param_groups`: the resuming run's optimizer groups, which a ZeRO-1/2 universal form takes
    (`to_universal`). Raises with `layout_change_problem`'s message where DeepSpeed cannot load it (the
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
    # and layout resumed under (the universal form takes the run's optimizer groups, which follow the layout)
    named = (sorted(state.items(), key=str), tag, sorted(now.items()))
    key = hashlib.sha256(repr(named).encode()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"kiln-universal-{key}"
    if wctx.local_rank == 0:
        source = wctx.checkpoint(every_rank=True)
        to_universal(source, tag, out, per_expert=per_expert, layout=saved, param_groups=param_groups)
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
