"""Models built already partitioned under ZeRO-3, so that no rank ever holds the whole model.

    with sharded_build(ds_config):              # KilnForCausalLM(config): random init (pretrain)
        model = KilnForCausalLM(config)
    model = from_pretrained(AutoModelForCausalLM, d, ds_config)   # sft, reward, ppo's four
    model = import_model(src_dir, ds_config)    # pretrain.init_from

Below ZeRO-3 (`ds_config` None or its `zero_optimization.stage` < 3), or with no process group
joined, every one of them is the plain build: nothing changes. Under ZeRO-3:

- `sharded_build` builds inside DeepSpeed's `zero.Init`: each module's parameters are partitioned
  as soon as that module exists (a rank holds 1/N of the model, plus the one module being built).
  The model's `post_init` would then initialise empty shards, so inside the scope it initialises
  each module gathered (`init_weights_sharded`): the same modules, in the same order, with the
  same random draws as the full build.
- `from_pretrained` builds inside zero.Init with no init and fills the model module by module
  from the checkpoint, rank 0 reading one tensor at a time (transformers' ZeRO-3 loader would read
  the whole checkpoint on rank 0 first); what the checkpoint lacks is then initialised as above.
- Every random draw made while building or loading (the layers' default init, the model's
  `_init_weights`, a new head's init) is made on the CPU in fp32 into a temporary of the
  parameter's shape and copied in, as the full build makes it on the CPU in fp32: with the same
  seed, the gathered weights equal the full build's exactly, in whatever dtype zero.Init gives the
  parameters (bf16 equals the full build cast to bf16; tests/test_sharded_build.py, on CPU ranks),
  and every rank's RNG ends where the full build leaves it. On GPUs zero.Init builds on the device,
  whose generator is not the CPU's: the draws stay on the CPU for the same reason.

Memory (bench/sharded_build.py, gloo ranks): a gathered module costs its full size (twice, on
gloo's all-gather) for as long as it is gathered. glibc keeps freed blocks in its heap, so inside
a build or a load every large block is a mapping of its own, handed back when freed
(`large_frees_returned`), and the rest is trimmed after each gather (`release_freed_memory`).
"""

from __future__ import annotations

import ctypes
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

RANDOM_INITS = (
    "uniform_", "normal_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_",
    "trunc_normal_", "orthogonal_", "sparse_",
)  # fmt: skip
"""The init functions that draw random numbers (the rest fill constants, the same on any device)."""


def zero3(ds_config: dict | None) -> bool:
    """Whether a DeepSpeed config partitions the parameters (ZeRO stage 3)."""
    return bool(ds_config) and ds_config.get("zero_optimization", {}).get("stage", 0) == 3


def partitions(ds_config: dict | None) -> bool:
    """Whether models are built and loaded partitioned under `ds_config`: ZeRO-3, and a process group
    to partition across (a stage joins one first; without one, as where a test stops a worker at
    its engine, the plain build)."""
    return zero3(ds_config) and torch.distributed.is_available() and torch.distributed.is_initialized()


def join_deepspeed() -> None:
    """DeepSpeed's communication layer on the process group already joined. Ray Train's workers join
    torch's before any DeepSpeed code runs, and zero.Init reads the world size from DeepSpeed's
    layer (without it, 1: the config's batch sizes then fail its check); `deepspeed.initialize`
    would set it up later the same way."""
    import deepspeed
    import deepspeed.comm

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())


def is_partitioned(model: torch.nn.Module) -> bool:
    """Every parameter is a ZeRO-3 parameter (built or loaded under zero.Init, or wrapped by an engine)."""
    return all(hasattr(p, "ds_id") for p in model.parameters())


# ---------------------------------------------------------------------------------------------------- draws


@contextmanager
def cpu_draws():
    """Random init functions draw on the CPU in fp32, into a temporary of the tensor's shape that is
    then copied into the tensor: the numbers, and how far the CPU generator advances, are those of a
    model built on the CPU in fp32. Covers torch's own init functions (the layers' `reset_parameters`)
    and the ones transformers' `initialization` module calls (a model's `_init_weights`)."""
    import sys

    from transformers import initialization as hf_init

    saved_table = dict(hf_init.TORCH_INIT_FUNCTIONS)
    saved_attrs = []
    try:
        for name in RANDOM_INITS:
            if name in saved_table:
                hf_init.TORCH_INIT_FUNCTIONS[name] = _on_cpu(saved_table[name])
        for module_name in hf_init.TORCH_MODULES_TO_PATCH:
            module = sys.modules.get(module_name)
            for name in RANDOM_INITS:
                if module is not None and hasattr(module, name):
                    saved_attrs.append((module, name, getattr(module, name)))
                    setattr(module, name, _on_cpu(getattr(module, name)))
        yield
    finally:
        for module, name, fn in reversed(saved_attrs):
            setattr(module, name, fn)
        hf_init.TORCH_INIT_FUNCTIONS.clear()
        hf_init.TORCH_INIT_FUNCTIONS.update(saved_table)


def _on_cpu(fn):
    if getattr(fn, "kiln_on_cpu", False):
        return fn

    def drawn_on_cpu(tensor, *args, **kwargs):
        if tensor.device.type == "cpu" and tensor.dtype == torch.float32:
            return fn(tensor, *args, **kwargs)
        # new_empty: zero.Init redirects torch.empty & co. to its device and dtype, not this
        tmp = tensor.new_empty(tensor.shape, dtype=torch.float32, device="cpu")
        fn(tmp, *args, **kwargs)
        with torch.no_grad():
            tensor.copy_(tmp)
        return tensor

    drawn_on_cpu.kiln_on_cpu = True
    return drawn_on_cpu


@lru_cache(maxsize=1)
def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc: nothing to tune
        return None


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
STEADY_MMAP_THRESHOLD = 32 << 20
"""Where glibc's own mmap threshold ends up in a process that frees large blocks (its dynamic threshold
rises to the largest block freed, up to this ceiling on 64-bit hosts; the trim threshold follows at
twice it)."""


@contextmanager
def large_frees_returned(threshold: int = 1 << 20):
    """Inside, every host allocation of `threshold` bytes or more is a mapping of its own, handed back
    to the OS the moment it is freed (glibc's M_MMAP_THRESHOLD; elsewhere nothing changes). A
    partitioned build or load frees one full module after another, and a rank that receives them
    (the gathers' buffers) otherwise keeps them in its heap: measured with 8 ranks, 400-470 MiB
    more at the peak than what the rank held (bench/sharded_build.py), which `malloc_trim` after
    each module does not hand back. Setting the threshold turns glibc's dynamic one off for the
    process, so on exit it is set where the dynamic one settles (`STEADY_MMAP_THRESHOLD`)."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, STEADY_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, 2 * STEADY_MMAP_THRESHOLD)


def release_freed_memory() -> None:
    """Hands the pages of freed host memory back to the OS (glibc's `malloc_trim`; elsewhere nothing).
    glibc keeps freed blocks under its mmap threshold (which grows up to 32 MiB) in the heap, resident,
    and the full tensors a partitioned build or a streamed export frees one by one (gathered modules
    and tensors, rank 0's checkpoint) are not all reused for the next ones: the resident set then grows
    past what the process holds (bench/sharded_build.py; in bench/export_memory.py, ZeRO-3 on 1 gloo
    rank, a ~290M-parameter fp32 model: 628 MiB over the largest tensor's 156 MiB without it, 322 MiB,
    the gather's own two buffers, with it). About 1 ms a call."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


# ---------------------------------------------------------------------------------------------------- build


def init_weights_sharded(model) -> None:
    """A transformers model's weight init (`initialize_weights`: its modules children first, each by
    the `_init_weights` of the model it belongs to, those already initialised skipped) with each
    module's partitioned parameters gathered around its init. Every rank runs the init, drawing as
    the full build does (`cpu_draws`), so every rank's RNG advances alike; rank 0's values are kept
    (broadcast) when the module is partitioned again."""
    import deepspeed
    from transformers import PreTrainedModel
    from transformers import initialization as hf_init

    custom = model.is_custom_code()

    def visit(module, init_fn):
        for child in module.children():
            visit(child, child._initialize_weights if isinstance(child, PreTrainedModel) else init_fn)
        if getattr(module, "_is_hf_initialized", False):  # what `_initialize_weights` skips: no gather
            return
        params = [p for p in module.parameters(recurse=False) if hasattr(p, "ds_id")]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=bool(params)):
            init_fn(module, custom)
        if params and params[0].device.type == "cpu":  # the gather was in host memory
            release_freed_memory()

    # cpu_draws outside the guard: the guard's functions check a parameter's "already loaded" flag
    # on the parameter itself, then call the (CPU-drawing) torch function
    with torch.no_grad(), cpu_draws(), hf_init.guard_torch_init_functions():
        visit(model, model._initialize_weights)


@contextmanager
def sharded_build(ds_config: dict | None):
    """Models constructed inside are partitioned as they are built (zero.Init, with `ds_config`'s
    dtype, offload and hpZ settings: the engines' config) and initialised module by module
    (`init_weights_sharded`, from their `post_init`). No-op below ZeRO-3."""
    if not partitions(ds_config):
        yield
        return
    import deepspeed
    from transformers import PreTrainedModel

    def init_weights(self):  # PreTrainedModel.init_weights (what post_init calls), gathered
        init_weights_sharded(self)
        self.tie_weights(recompute_mapping=False)

    join_deepspeed()
    plain = PreTrainedModel.init_weights
    PreTrainedModel.init_weights = init_weights
    try:
        with large_frees_returned(), cpu_draws(), deepspeed.zero.Init(config_dict_or_path=ds_config):
            yield
    finally:
        PreTrainedModel.init_weights = plain


def from_pretrained(model_class, path, ds_config: dict | None, **kwargs):
    """`model_class.from_pretrained(path, **kwargs)` (an Auto class or a model class; `kwargs` as
    there: `dtype`, and config overrides such as `num_labels`), built partitioned under ZeRO-3.

    Under ZeRO-3 the model is built inside zero.Init with no weight init, then filled module by
    module: each module's parameters gathered, rank 0 reads their tensors from the checkpoint one
    at a time (`CheckpointReader`: plain file reads, nothing of the file kept mapped) and the
    values go back out to every rank's partition. A rank thus holds its partitions, one gathered
    module and, on rank 0, one tensor read. transformers' own ZeRO-3 load reads the whole
    checkpoint on rank 0 first. Parameters the checkpoint lacks (a new `score` head) are then
    initialised as a full load initialises them (`init_weights_sharded`: the same draws), tied ones
    tied; checkpoint tensors the model has no place for (a causal LM's head, loaded as a classifier)
    are left out, as transformers leaves them. Below ZeRO-3, `model_class.from_pretrained` itself."""
    if not partitions(ds_config):
        return model_class.from_pretrained(path, **kwargs)
    import deepspeed
    from transformers import AutoConfig, GenerationConfig
    from transformers import initialization as hf_init

    from kiln.safetensors_stream import CheckpointReader

    join_deepspeed()
    dtype = kwargs.pop("dtype", None)
    config = AutoConfig.from_pretrained(path, **kwargs)
    if dtype is not None:
        config.dtype = dtype
    cls = _concrete(model_class, config)
    with large_frees_returned():
        with hf_init.no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = cls(config)
        reader = CheckpointReader(path)
        names = dict(_checkpoint_names(model, reader))
        _check_shapes(model, reader, names, path)
        _fill(model, reader, names)
        init_weights_sharded(model)  # what the checkpoint lacked, drawn as the full load draws it
    model.tie_weights()
    if model.can_generate() and (Path(path) / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(path)
    release_freed_memory()
    return model.eval()  # as from_pretrained returns it


def _concrete(model_class, config):
    """The model class an Auto class builds for `config` (a model class is its own)."""
    from transformers import PreTrainedModel

    if isinstance(model_class, type) and issubclass(model_class, PreTrainedModel):
        return model_class
    return model_class._model_mapping[type(config)]  # the Auto class's config -> model table


def _checkpoint_names(model, reader) -> dict:
    """Parameter or buffer name -> the checkpoint's names for it (one; or one per expert for stacked expert
    weights, kiln/model.py's `checkpoint_names`): the same, or without the model's base prefix (a base
    model's checkpoint), as transformers matches them."""
    from kiln.model import checkpoint_names

    prefix = getattr(model, "base_model_prefix", "")
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        stored = checkpoint_names(name, tuple(getattr(t, "ds_shape", t.shape)))
        if all(n in reader for n in stored):
            yield name, stored
        elif prefix and name.startswith(prefix + "."):
            short = [n[len(prefix) + 1 :] for n in stored]
            if all(n in reader for n in short):
                yield name, short


def _fill(model, reader, names: dict) -> None:
    """Copy the checkpoint into `model`, module by module, its partitioned parameters gathered around
    the copy (rank 0 reads, the gather's release sends its values to every rank's partition); the
    parameters and buffers filled are marked initialised, so the init after skips them."""
    import deepspeed
    import torch.distributed as dist

    from kiln.model import STACKED_EXPERTS

    rank = dist.get_rank()
    for module_name, module in model.named_modules():
        dot = f"{module_name}." if module_name else ""
        params = [(dot + n, p) for n, p in module.named_parameters(recurse=False) if dot + n in names]
        if params:
            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0), torch.no_grad():
                if rank == 0:
                    for name, p in params:  # one tensor read at a time (one expert's, for stacked ones)
                        stored = names[name]
                        if not STACKED_EXPERTS.match(name):
                            p.data.copy_(reader.read(stored[0]))
                        else:
                            for e, n in enumerate(stored):
                                p.data[e].copy_(reader.read(n))
            if params[0][1].device.type == "cpu":
                release_freed_memory()
        for name, buf in module.named_buffers(recurse=False):  # not partitioned: every rank reads them
            if buf is not None and dot + name in names:
                with torch.no_grad():
                    buf.copy_(reader.read(names[dot + name][0]))
                buf._is_hf_initialized = True
        for _, p in params:
            p._is_hf_initialized = True
        own = list(module.parameters(recurse=False))  # a tied head's matrix was filled as the embedding
        if own and all(getattr(p, "_is_hf_initialized", False) for p in own):
            module._is_hf_initialized = True


def _check_shapes(model, reader, names: dict, path) -> None:
    """On every rank, before any gather: a checkpoint that does not fit the model fails them all alike."""
    from kiln.model import STACKED_EXPERTS

    shapes = {
        n: tuple(getattr(t, "ds_shape", t.shape))
        for n, t in [*model.named_parameters(), *model.named_buffers()]
    }
    for name, stored in names.items():
        expected = shapes[name][1:] if STACKED_EXPERTS.match(name) else shapes[name]
        for n in stored:
            if tuple(reader.spec(n).shape) != expected:
                raise ValueError(
                    f"{path}: the checkpoint's {n} is {tuple(reader.spec(n).shape)}, the model's "
                    f"{name} {shapes[name]}: the folder's config.json does not describe its weights"
                )


def import_model(src_dir, ds_config: dict | None):
    """kiln/hf_convert.py's `import_model` (a Llama or Mixtral folder -> KilnForCausalLM), the
    result partitioned under ZeRO-3: rank 0 converts the checkpoint (it alone holds the whole model
    meanwhile), every rank builds the Kiln model partitioned (`sharded_build`: the same draws as the
    full import's build, so the RNG ends alike) and rank 0's converted values fill it parameter by
    parameter. Below ZeRO-3, `import_model` itself."""
    from kiln import hf_convert

    if not partitions(ds_config):
        return hf_convert.import_model(src_dir)
    import deepspeed
    import torch.distributed as dist

    from kiln.model import KilnForCausalLM

    rank = dist.get_rank()
    rng = torch.get_rng_state()
    full = hf_convert.import_model(src_dir) if rank == 0 else None
    torch.set_rng_state(rng)  # the build below makes the import's draws, on every rank
    box = [full.config if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    with sharded_build(ds_config):
        model = KilnForCausalLM(box[0])
    values = dict(full.named_parameters()) if rank == 0 else {}
    for name, p in model.named_parameters():  # a tied matrix once
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
            if rank == 0:
                p.data.copy_(values[name])
    return model
