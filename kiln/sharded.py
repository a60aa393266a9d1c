"""Models built already partitioned under ZeRO-3, so that no rank ever holds the whole model.

    with sharded_build(ds_config):              # KilnForCausalLM(config): random init (pretrain)
        model = KilnForCausalLM(config)
    with sharded_load(ds_config):               # from_pretrained (sft and reward: under their
        model = AutoModelForCausalLM.from_pretrained(d)   # TrainingArguments' own config)
    model = from_pretrained(AutoModelForCausalLM, d, ds_config)   # the same, one model (ppo's four)
    model = import_model(src_dir, ds_config)    # pretrain.init_from

Below ZeRO-3 (`ds_config` None or its `zero_optimization.stage` < 3), or with no process group
joined, every one of them is the plain build: nothing changes. Under ZeRO-3:

- `sharded_build` builds inside DeepSpeed's `zero.Init`: each module's parameters are partitioned
  as soon as that module exists (a rank holds 1/N of the model, plus the one module being built).
  The model's `post_init` would then initialise empty shards, so inside the scope it initialises
  each module gathered (`init_weights_sharded`): the same modules, in the same order, with the
  same random draws as the full build.
- `sharded_load` keeps a `transformers.integrations.HfDeepSpeedConfig` alive, which is what makes
  `from_pretrained` build under `zero.Init` and copy the checkpoint in module by module. Rank 0
  reads the whole checkpoint meanwhile (transformers' loader), the other ranks only its shapes.
  sft and reward need no new config: their `TrainingArguments(deepspeed=...)` makes one, so they
  make their arguments first.
- Every random draw made while building or loading (the layers' default init, the model's
  `_init_weights`, a new head's init) is made on the CPU in fp32 into a temporary of the
  parameter's shape and copied in, as the full build makes it on the CPU in fp32: with the same
  seed, the gathered weights equal the full build's exactly, in whatever dtype zero.Init gives the
  parameters (bf16 equals the full build cast to bf16; tests/test_sharded_build.py, on CPU ranks),
  and every rank's RNG ends where the full build leaves it. On GPUs zero.Init builds on the device,
  whose generator is not the CPU's: the draws stay on the CPU for the same reason.

Memory (bench/sharded_build.py, 2 gloo ranks): a gathered module costs its full size (twice, on
gloo's all-gather) for as long as it is gathered; glibc keeps freed heap pages mapped, so the
scopes hand them back (`release_freed_memory`) after each host-memory gather and each load.
"""

from __future__ import annotations

import ctypes
from contextlib import contextmanager
from functools import lru_cache

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
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


def release_freed_memory() -> None:
    """Hands the pages of freed host memory back to the OS (glibc's `malloc_trim`; elsewhere nothing).
    glibc keeps freed blocks under its mmap threshold (which grows up to 32 MiB) in the heap, resident,
    and the full tensors a partitioned build or a streamed export frees one by one (gathered modules
    and tensors, rank 0's checkpoint) are not all reused for the next ones: the resident set then grows
    past what the process holds (bench/sharded_build.py; in bench/export_memory.py, ZeRO-3 on 1 gloo
    rank, a ~290M-parameter fp32 model: 628 MiB over the largest tensor's 156 MiB without it, 322 MiB,
    the gather's own two buffers, with it). About 1 ms a call."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


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
        with cpu_draws(), deepspeed.zero.Init(config_dict_or_path=ds_config):
            yield
    finally:
        PreTrainedModel.init_weights = plain


@contextmanager
def sharded_load(ds_config: dict | None):
    """`from_pretrained` inside loads partitioned under ZeRO-3: transformers builds the model under
    zero.Init and copies the checkpoint in module by module while a `HfDeepSpeedConfig` is alive
    (one is made from `ds_config` unless one of ZeRO-3 already is, as TrainingArguments' is, and
    dropped on exit); a new head's random init draws as the full load's does. No-op below ZeRO-3."""
    if not partitions(ds_config):
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    join_deepspeed()
    own = None if is_deepspeed_zero3_enabled() else HfDeepSpeedConfig(ds_config)  # held: a weak reference
    try:
        with cpu_draws():
            yield
    finally:
        if own is not None:
            unset_hf_deepspeed_config()
            del own
        release_freed_memory()  # rank 0 read the whole checkpoint


def from_pretrained(auto_class, path, ds_config: dict | None, **kwargs):
    """`auto_class.from_pretrained(path, **kwargs)` under `sharded_load(ds_config)`: one model at a
    time, so that the memory of the checkpoint rank 0 read is handed back before the next load."""
    with sharded_load(ds_config):
        return auto_class.from_pretrained(path, **kwargs)


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
