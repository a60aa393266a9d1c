"""The trained model as a Hugging Face folder, streamed from the live model one tensor at a time.

    export_model(engine.module, out_dir, rank=rank, engine=engine, tokenizer_dir=tok_dir)  # every rank calls it
    export_model(trainer.model, out_dir, rank=rank, engine=trainer.model_wrapped, tokenizer=tok, use_cache=True)

What it writes (into a temporary sibling of `out_dir`, moved into place with `os.replace` once complete,
so a crash never leaves a half folder at `out_dir`; a folder already there is replaced):
- the weights as `save_pretrained` lays them out: `model.safetensors`, or when they pass `max_shard_size`
  (5 GB by default, as huggingface_hub splits) `model-0000i-of-0000N.safetensors` shards and
  `model.safetensors.index.json` (`metadata.total_size`, `metadata.total_parameters`, `weight_map`);
- each tensor in the dtype it trains in (bf16 stays bf16, fp32 stays fp32), and `config.json` with `dtype`
  set to it, so `from_pretrained(dir, dtype="auto")` gives that dtype back; `generation_config.json` for a
  model that generates; the tokenizer's files.

The keys are those `save_pretrained` writes: every parameter and persistent buffer of the model's
`state_dict()`, less the tied duplicates (of tensors that share storage, the names the model declares
in `_tied_weights_keys` are dropped, as transformers drops them: with tied embeddings `lm_head.weight`
goes and `model.embed_tokens.weight` stays) and `_keys_to_ignore_on_save`.

Streaming. Shapes and dtypes are known before anything is gathered (`ds_shape` under ZeRO-3), so the
shard plan and every file's safetensors header are written first; then each tensor is gathered (under
ZeRO-3 one parameter at a time, `GatheredParameters([p], modifier_rank=None)`: a collective every rank
joins, in the same order) and rank 0 writes its bytes at their offset in their file and drops it; the
heap's freed pages are handed back after each (`release_freed_memory`). Host memory grows by about the
largest tensor (twice it while DeepSpeed gathers it on CPU), never by a shard or the model
(bench/export_memory.py).

Expert parallelism (kiln/expert_parallel.py): a rank holds E/P of a MoE layer's experts; the export writes all E,
expert by expert, each sent to rank 0 by the rank of its expert-parallel group that holds it (a broadcast every
rank of that group joins; the ranks of other groups leave at once), so the folder is the model without it.

LoRA (peft): each LoRA linear is merged while streaming, W + scaling * B @ A (transposed for
`fan_in_fan_out`; `lora_bias` adds scaling * B.bias to the bias), computed in fp32 from the gathered
W, A and B (gathered together) and cast back to W's dtype; the keys are the base model's
(`merge_and_unload()` then `save_pretrained`). `modules_to_save` copies (a reward model's `score`
head) are written under the wrapped module's name. DoRA and the other LoRA variants, LoRA on
embeddings or convolutions, several adapters, other peft tuners are refused with the reason.
"""

from __future__ import annotations

import copy
import itertools
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from kiln.expert_parallel import owner_expert
from kiln.model import STACKED_EXPERTS, MoE, checkpoint_names
from kiln.safetensors_stream import MAX_SHARD_SIZE, CheckpointWriter, TensorSpec
from kiln.sharded import release_freed_memory

# ---------------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Entry:
    """One tensor of the export: its spec, the live tensors it is made of (one, or a LoRA layer's W, A,
    B), and how to make it from them once gathered (None: the one tensor as it is)."""

    spec: TensorSpec
    sources: tuple[torch.Tensor, ...]
    combine: Callable[..., torch.Tensor] | None = None
    parameter: bool = True
    part: int | None = None  # of a stacked expert parameter, the expert this entry is
    expert_group: object = None  # an expert-parallel layer's group (a rank holds E/P experts): a collective


def _expert(t: torch.Tensor, e: int) -> torch.Tensor:
    return t[e]


def live_shape(t: torch.Tensor) -> tuple[int, ...]:
    """A tensor's full shape, also for a ZeRO-3 parameter whose local data is an empty partition."""
    return tuple(t.ds_shape) if hasattr(t, "ds_id") else tuple(t.shape)


def merged_weight(w, a, b, *, scaling: float, fan_in_fan_out: bool) -> torch.Tensor:
    """A LoRA linear's merged weight, W + scaling * B @ A, in fp32, cast back to W's dtype."""
    delta = b.float() @ a.float()
    if fan_in_fan_out:
        delta = delta.T
    return (w.float() + delta * scaling).to(w.dtype)


def merged_bias(bias, b_bias, *, scaling: float) -> torch.Tensor:
    """A LoRA linear's merged bias with `lora_bias`: bias + scaling * B.bias, in fp32, cast back."""
    return (bias.float() + b_bias.float() * scaling).to(bias.dtype)


def _peft_parts(model):
    """(the transformers model inside a peft model, or the model itself; {name: LoRA linear};
    {name: modules_to_save wrapper}), names as in the base model's state_dict; unsupported peft refused."""
    try:
        from peft import PeftModel
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
    except ImportError:  # no peft: nothing can be wrapped by it
        return model, {}, {}
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    lora, wrappers = {}, {}
    for name, m in base.named_modules():
        if isinstance(m, ModulesToSaveWrapper):
            wrappers[name] = m
        elif isinstance(m, AuxiliaryTrainingWrapper):
            raise NotImplementedError(
                f"export: {name} is a {type(m).__name__} (peft); only modules_to_save is supported"
            )
        elif isinstance(m, BaseTunerLayer):
            if type(m) is not LoraLinear:
                raise NotImplementedError(
                    f"export: {name} is a {type(m).__module__}.{type(m).__name__}; the streamed merge handles LoRA "
                    "on linear layers only (lora_targets naming linear layers)"
                )
            lora[name] = m
    for name, m in lora.items():
        _check_lora(name, m, BaseTunerLayer)
    for name in lora:
        if any(name.startswith(w + ".") for w in wrappers):
            raise NotImplementedError(f"export: LoRA inside modules_to_save ({name}) is not supported")
    return base, lora, wrappers


def _check_lora(name: str, m, tuner_layer) -> None:
    adapters = list(m.active_adapters)
    why = None
    if len(m.lora_A) != 1 or len(adapters) != 1 or adapters[0] not in m.lora_A:
        why = f"one active adapter is supported, found {sorted(m.lora_A)} (active {adapters})"
    elif m.merged:
        why = "its adapter is merged into the base weights already"
    elif m.disable_adapters:
        why = "its adapters are disabled"
    elif getattr(m, "lora_variant", None) or m.use_dora.get(adapters[0]) or len(m.lora_magnitude_vector):
        why = "DoRA and the other LoRA variants are not supported (plain LoRA only)"
    elif isinstance(m.base_layer, tuner_layer):
        why = "it wraps another adapter layer"
    if why:
        raise NotImplementedError(f"export: cannot merge the LoRA layer {name}: {why}")


def _owner(key: str, names) -> str | None:
    """The longest of the module names `names` (a set or dict) that `key` lies under."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if (prefix := ".".join(parts[:i])) in names:
            return prefix
    return None


def plan_export(model) -> tuple[torch.nn.Module, list[Entry]]:
    """(the model whose config and class the export names, the tensors to write in order): the keys
    `merge_and_unload()` + `save_pretrained` write for it, each with the live tensors it comes from."""
    base, lora, wrappers = _peft_parts(model)
    entries: list[Entry] = []
    special = {**lora, **wrappers}
    split = {
        n + ".experts": m
        for n, m in base.named_modules()
        if isinstance(m, MoE) and m.expert_parallel is not None
    }
    for key, t in base.state_dict(keep_vars=True).items():
        parameter = isinstance(t, torch.nn.Parameter)
        owner = _owner(key, special) if special else None
        if owner is None:
            shape = live_shape(t)
            if m := STACKED_EXPERTS.match(key):  # written expert by expert, as save_pretrained splits them
                moe = split.get(m[1])  # expert parallelism: this rank holds E/P of them
                if moe is not None:
                    shape = (moe.n_experts, *shape[1:])
                for e, name in enumerate(checkpoint_names(key, shape)):
                    spec = TensorSpec(name, shape[1:], t.dtype)
                    if moe is None:
                        entries.append(Entry(spec, (t,), partial(_expert, e=e), parameter=parameter, part=e))
                        continue
                    group = moe.expert_parallel
                    take = partial(owner_expert, e=e, n_experts=moe.n_experts, group=group)
                    entries.append(Entry(spec, (t,), take, parameter, part=e, expert_group=group))
            else:
                entries.append(Entry(TensorSpec(key, shape, t.dtype), (t,), parameter=parameter))
            continue
        rest = key[len(owner) + 1 :]
        if owner in wrappers:
            w = wrappers[owner]
            if len(w.active_adapters) > 1:
                raise NotImplementedError(f"export: {owner}: modules_to_save with several active adapters")
            keep = f"modules_to_save.{w.active_adapters[0]}." if w.active_adapters else "original_module."
            if rest.startswith(keep):
                name = f"{owner}.{rest[len(keep) :]}"
                entries.append(Entry(TensorSpec(name, live_shape(t), t.dtype), (t,), parameter=parameter))
            elif not rest.startswith(("modules_to_save.", "original_module.")):
                raise NotImplementedError(f"export: {key}: unknown tensor of a modules_to_save wrapper")
            continue
        m = lora[owner]
        adapter = m.active_adapters[0]
        scaling = float(m.scaling[adapter])
        if rest.split(".")[0] in ("lora_A", "lora_B"):
            continue  # merged into the base layer's weight (and bias)
        if not rest.startswith("base_layer."):
            raise NotImplementedError(f"export: {key}: unknown tensor of a LoRA layer")
        leaf = rest[len("base_layer.") :]
        spec = TensorSpec(f"{owner}.{leaf}", live_shape(t), t.dtype)
        if leaf == "weight":
            a, b = m.lora_A[adapter].weight, m.lora_B[adapter].weight
            combine = partial(merged_weight, scaling=scaling, fan_in_fan_out=bool(m.fan_in_fan_out))
            entries.append(Entry(spec, (t, a, b), combine))
        elif leaf == "bias" and m.lora_bias.get(adapter):
            combine = partial(merged_bias, scaling=scaling)
            entries.append(Entry(spec, (t, m.lora_B[adapter].bias), combine))
        else:
            entries.append(Entry(spec, (t,), parameter=parameter))
    return base, _untied(entries, base)


def _storage_key(t: torch.Tensor):
    if hasattr(t, "ds_id"):
        return ("zero", t.ds_id)
    if t.device.type == "meta" or t.numel() == 0:
        return ("object", id(t))
    return ("storage", t.device, t.untyped_storage().data_ptr(), t.data_ptr(), tuple(t.shape), t.dtype)


def _untied(entries: list[Entry], base) -> list[Entry]:
    """`entries` less the duplicates `save_pretrained` drops: of the names of one shared tensor, those
    matching a `_tied_weights_keys` entry (in name order, all but the last when all match), and the
    keys in `_keys_to_ignore_on_save`."""
    ignore = set(getattr(base, "_keys_to_ignore_on_save", None) or ())
    entries = [e for e in entries if e.spec.name not in ignore]
    patterns = []
    for prefix, sub in base.named_modules():
        tied = getattr(sub, "_tied_weights_keys", None) or {}
        patterns += [
            f"{prefix}.{k}" if prefix else k for k in (tied.keys() if isinstance(tied, dict) else tied)
        ]
    groups: dict = {}
    for e in entries:  # by the tensor each is (or, merged, is based on; or the expert of it)
        groups.setdefault((_storage_key(e.sources[0]), e.part), []).append(e)
    drop = set()
    for group in groups.values():
        if len(group) < 2:
            continue
        names = sorted(e.spec.name for e in group)
        if any(e.combine is not None for e in group):
            raise NotImplementedError(f"export: a LoRA layer's weight is shared with another tensor: {names}")
        found = 0
        for name in names:
            if any(re.search(p, name) for p in patterns):
                found += 1
                if found < len(names):
                    drop.add(name)
        if len(set(names) - drop) > 1:
            raise RuntimeError(
                f"export: {names} share one tensor but the model declares no tie between them "
                f"(_tied_weights_keys: {patterns}); save_pretrained refuses these too"
            )
    return [e for e in entries if e.spec.name not in drop]


# ---------------------------------------------------------------------------------------------------- export


@contextmanager
def _gathered(tensors: Sequence[torch.Tensor]):
    """The ZeRO-3 parameters among `tensors` gathered in full on every rank (a collective), released
    after; other tensors as they are."""
    zero = [t for t in tensors if hasattr(t, "ds_id")]
    if not zero:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero, modifier_rank=None):
        yield


def _value(entry: Entry) -> torch.Tensor:
    with torch.no_grad():
        live = [t.detach() for t in entry.sources]
        value = live[0] if entry.combine is None else entry.combine(*live)
    return value.to("cpu")


def stream_weights(
    entries: Sequence[Entry], rank: int, write: Callable[[str, torch.Tensor], None] | None
) -> None:
    """Each entry gathered in turn (every rank, the same order) and on rank 0 passed to `write` while
    it is gathered; then released (and the memory it took handed back). Consecutive entries of one
    tensor (the experts of a stacked parameter) share one gather. An expert of an expert-parallel layer
    comes from the rank that holds it, one expert at a time (every rank of rank 0's group takes part)."""
    for _, group in itertools.groupby(entries, key=lambda e: tuple(map(id, e.sources))):
        group = list(group)
        sources = group[0].sources
        with _gathered(sources):
            for e in group:
                if e.expert_group is not None:
                    value = _value(e)  # a collective of the expert-parallel group
                    if rank == 0:
                        write(e.spec.name, value)
                elif rank == 0:
                    write(e.spec.name, _value(e))
        gathered = any(hasattr(t, "ds_id") for t in sources)
        if gathered or group[0].combine is not None or sources[0].device.type != "cpu":
            release_freed_memory()


@contextmanager
def atomic_folder(out_dir: str | Path):
    """A temporary sibling folder to write into; on success it replaces `out_dir` (any folder there is
    removed), on failure it is removed and `out_dir` is left as it was."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):  # from a process killed mid-export
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        old = None
        if out.is_dir() and not out.is_symlink():
            old = out.parent / f".{out.name}.partial-old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
        elif out.exists() or out.is_symlink():
            out.unlink()
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _optimizer_hook(engine, name: str) -> None:
    """A ZeRO-3 optimizer's checkpoint_event_prologue (partition every parameter) / _epilogue (gather
    the persistent ones again), as DeepSpeed runs them around its own consolidated state dict."""
    hook = getattr(getattr(engine, "optimizer", None), name, None)
    if callable(hook):
        hook()


def export_model(
    model,
    out_dir: str | Path,
    *,
    rank: int,
    engine=None,
    tokenizer_dir: str | Path | None = None,
    tokenizer=None,
    use_cache: bool | None = None,
    max_shard_size: int | str = MAX_SHARD_SIZE,
) -> None:
    """Write `model` (a live transformers model, possibly a peft model, possibly ZeRO-3 sharded) to
    `out_dir` as a Hugging Face folder (module docstring). Every rank calls it (under ZeRO-3 each tensor
    is a collective); rank 0 writes. `engine`: the DeepSpeed engine around `model`, if any;
    `tokenizer_dir`: copy its tokenizer files; `tokenizer`: `save_pretrained` it; `use_cache`: set in
    the exported config (the trainers switch it off for training)."""
    from kiln.hf_convert import TOKENIZER_FILES

    base, entries = plan_export(model)
    sharded = any(hasattr(t, "ds_id") for e in entries for t in e.sources)
    # under expert parallelism the ranks of rank 0's expert-parallel group send it the experts they hold
    experts_from = {e.expert_group for e in entries if e.expert_group is not None}
    with_rank0 = any(0 in torch.distributed.get_process_group_ranks(g) for g in experts_from)
    if rank != 0 and not sharded and not with_rank0:
        return
    if sharded:
        _optimizer_hook(engine, "checkpoint_event_prologue")
    if rank != 0:
        stream_weights(entries, rank, None)
    else:
        with atomic_folder(out_dir) as tmp:
            specs = [e.spec for e in entries]
            total_parameters = sum(e.spec.numel for e in entries if e.parameter)
            with CheckpointWriter(tmp, specs, max_shard_size, total_parameters) as writer:
                stream_weights(entries, rank, writer.write)
            _write_configs(base, entries, tmp, use_cache)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            for name in TOKENIZER_FILES if tokenizer_dir is not None else ():
                src = Path(tokenizer_dir) / name
                if src.exists():
                    shutil.copy2(src, tmp / name)
    if sharded:
        _optimizer_hook(engine, "checkpoint_event_epilogue")


def _write_configs(base, entries: Sequence[Entry], folder: Path, use_cache: bool | None) -> None:
    """config.json with the training dtype (of the first floating-point parameter, as transformers
    names a model's dtype) and the class; generation_config.json when the model generates."""
    config = copy.deepcopy(base.config)
    floats = [e.spec.dtype for e in entries if e.parameter and e.spec.dtype.is_floating_point]
    if floats:
        config.dtype = str(floats[0]).removeprefix("torch.")
    config.architectures = [type(base).__name__]
    if use_cache is not None:
        config.use_cache = use_cache
    config.save_pretrained(folder)
    if base.can_generate() and getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(folder)
