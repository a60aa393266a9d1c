"""The pipeline's config: one frozen dataclass per stage, composed into `PipelineConfig`.

    from pipeline.config import load_config
    cfg = load_config("configs/tiny.yaml", ["pretrain.lr=3e-4"])
    cfg.pretrain.lr

Every field has its docstring right below it (`python launch.py run --help-config` lists them).
Three kinds of keys are treated specially by the artifact store:
- `PLACEMENT_KEYS`: how and where a stage runs, not what it makes (workers, CPUs and GPUs per worker,
  micro-batch with the global batch fixed, ZeRO stage, offload, checkpoint cadence, where to write
  and report). They are in neither the artifact's fingerprint nor the work dir's key: changing them
  re-runs nothing, and a partial stage continues under the new placement.
- `CHECKPOINT_LAYOUT`: the placement keys an in-stage checkpoint is recorded with (the world size and
  the ZeRO stage). A partial stage whose checkpoint was written under other values is refused when
  the run is planned, naming the keys, why, and the ways out (pipeline/plan.py), unless its section's
  `layout_problem` accepts the change: pretraining resumes on another number of workers or expert
  parallelism.
- `BUDGET_KEYS`: how long to train, not what to train. They are part of the artifact's fingerprint
  (training longer gives a new model, and its downstream re-runs) but not of the stage's work dir,
  so raising `pretrain.steps` after a finished run continues from its last checkpoint.
Cross-field rules live in each section's `check()`; all problems are reported at once.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import ClassVar, Literal

from kiln.model_fields import PIPELINE_NAMES, hf_values, model_problems
from pipeline.configlib import ConfigError, load, to_dict

__all__ = ["ConfigError", "PipelineConfig", "load_config", "to_dict", "PROJECT_ROOT"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "tiny.yaml"
TASK_DATA = "data_prep/sample/task"  # the tiny preset's SFT / preference / prompt sets (build_task_data.py)

Precision = Literal["bf16", "fp16", "fp32"]
frozen = dataclasses.dataclass(frozen=True, kw_only=True)


@frozen
class RunConfig:
    # Stages that read `run` depend on its seed only.
    PLACEMENT_KEYS: ClassVar[tuple[str, ...]] = (
        "name",
        "root",
        "wandb",
        "wandb_project",
        "resource_wait_s",
        "preempt_grace_s",
    )

    name: str = "tiny"
    """Pipeline run name: artifacts go to <root>/<name>/; the W&B group."""
    root: str = "runs"
    """Artifact root: a local/NFS path, or an object-store URI (s3://bucket/prefix)."""
    seed: int = 1234
    """Seed for every stage (data order, init, sampling)."""
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    """W&B mode; auto = online when WANDB_API_KEY is set or `wandb login` was run, offline otherwise."""
    wandb_project: str = "kiln"
    """W&B project that every stage's run goes to."""
    resource_wait_s: float = 60.0
    """How long a stage waits for the cluster to offer its resources before failing with what is missing."""
    preempt_grace_s: float = 60.0
    """After SIGTERM, how long the run waits for its training stages to save a checkpoint at their current
    step and stop, before it cancels them (they then resume from their last periodic checkpoint)."""

    def check(self):
        if not self.name or "/" in self.name:
            yield f"name: {self.name!r} must be a non-empty name without '/'"
        if self.resource_wait_s < 0:
            yield "resource_wait_s: must be >= 0"
        if self.preempt_grace_s <= 0:
            yield "preempt_grace_s: must be > 0 (seconds)"


@frozen
class IngestConfig:
    PLACEMENT_KEYS: ClassVar[tuple[str, ...]] = ("num_cpus", "split_mb")

    sources: tuple[str, ...] = ("data_prep/sample/pile_sample.jsonl.zst",)
    """Input shards: paths or globs (.jsonl, .jsonl.zst, .jsonl.gz), relative to the working directory
    or the project; or `hf:NAME[:SPLIT]` for a `datasets` hub dataset (needs a network)."""
    split_mb: float = 256
    """MiB of text per cleaning task when a file is cut: byte ranges of a plain .jsonl larger than this,
    runs of sized .zst frames, or blocks of a file one reader must read whole (a .zst of one frame, as
    the Pile's, or a .gz, when its compressed size is over a quarter of this). The output is the same
    bytes however files are cut: a placement key (changing it re-runs nothing)."""
    min_chars: int = 64
    """Documents shorter than this (in characters, after stripping) are dropped as `too_short`."""
    max_chars: int = 200_000
    """Documents longer than this are dropped as `too_long`."""
    dedup: bool = True
    """Drop exact duplicates (by content hash) across all files; the first in input order is kept."""
    near_dedup: bool = True
    """Drop near-duplicates (`near_duplicate`): MinHash LSH over word shingles (data_prep/near_dup.py).
    Documents are clustered by similar pairs across all files; of each cluster the first in input order
    is kept. A pair of Jaccard similarity s (of their shingle sets) is found with probability
    1 - (1 - s^rows)^bands: with the defaults 0.05 at s = 0.5, 0.56 at 0.7, 0.92 at 0.8, 0.98 at 0.84,
    0.9996 at 0.9: the threshold is Jaccard ~0.8 (found 92% of the time from there; half the pairs at
    ~0.72 are)."""
    near_dedup_bands: int = 14
    """LSH bands: a pair is found when its MinHash values agree over a whole band of `near_dedup_rows`."""
    near_dedup_rows: int = 8
    """MinHash values per band (bands x rows hash functions in all). More rows: a sharper threshold,
    higher; more bands: more recall, a lower one."""
    near_dedup_shingle: int = 5
    """Words per shingle (lowercased, split at whitespace; a shorter document is one shingle)."""
    decontaminate: tuple[str, ...] = (
        f"{TASK_DATA}/sft_val.jsonl.zst",
        f"{TASK_DATA}/pref_val.jsonl.zst",
        f"{TASK_DATA}/prompts_val.jsonl.zst",
    )
    """Held-out sets (paths or globs of .jsonl[.zst|.gz] records in any layout, or `hf:NAME[:SPLIT]`)
    that pretraining must not see: a document sharing a `decontaminate_ngram`-word n-gram with a text
    in them, or holding a shorter text whole, is dropped as `contaminated` (data_prep/decontaminate.py).
    The default: the shipped task's held-out sets (sft.eval_data, reward.eval_data, the task prompts).
    Training sets may be listed too; empty turns the check off. The files are part of the stage's
    identity: editing one re-runs ingest."""
    decontaminate_ngram: int = 13
    """n of the n-gram overlap that counts as contamination, in words (13, as GPT-3)."""
    include_sets: tuple[str, ...] = ()
    """Keep only these Pile subsets (`meta.pile_set_name`); empty keeps all."""
    set_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    """Per-subset sampling weight: 2.0 writes each document twice, 0.5 keeps half (by content hash)."""
    on_bad_file: Literal["fail", "skip"] = "fail"
    """A truncated or corrupt compressed file stops the stage (fail) or is recorded as skipped (skip)."""
    docs_per_shard: int = 20_000
    """Documents per output Parquet shard."""
    max_errors: int = 200
    """How many bad records `stats.json` lists with file:line (all are counted)."""
    num_cpus: float = 1
    """CPUs each per-file ingest task asks Ray for."""

    def check(self):
        if not self.sources:
            yield "sources: give at least one path, glob or hf: dataset"
        if not self.split_mb * 2**20 >= 1:
            yield f"split_mb: {self.split_mb} must be positive (MiB of text per cleaning task; the default is 256)"
        if self.min_chars < 0 or self.max_chars <= self.min_chars:
            yield "max_chars: must be greater than min_chars (and min_chars >= 0)"
        for name, w in self.set_weights.items():
            if w < 0:
                yield f"set_weights.{name}: weights must be >= 0"
        if self.docs_per_shard < 1:
            yield "docs_per_shard: must be >= 1"
        if self.max_errors < 0:
            yield "max_errors: must be >= 0"
        if self.near_dedup_bands < 1:
            yield "near_dedup_bands: must be >= 1"
        if self.near_dedup_rows < 1:
            yield "near_dedup_rows: must be >= 1"
        if self.near_dedup_shingle < 1:
            yield "near_dedup_shingle: must be >= 1 (words per shingle)"
        if self.decontaminate_ngram < 1:
            yield "decontaminate_ngram: must be >= 1 (words)"


@frozen
class TokenizerConfig:
    PLACEMENT_KEYS: ClassVar[tuple[str, ...]] = ("num_cpus",)

    path: str | None = None
    """An existing Hugging Face tokenizer folder to use instead of training one."""
    vocab_size: int = 4096
    """Vocabulary size of the trained byte-level BPE (special tokens included)."""
    sample_bytes: int = 8_000_000
    """How many bytes of documents the BPE is trained on (a deterministic sample)."""
    min_frequency: int = 2
    """A pair must occur this often to be merged."""
    chat_template: Literal["auto", "kiln"] = "auto"
    """With `path`: auto keeps the folder's chat template if it marks assistant turns with
    {% generation %} (adds Kiln's if it has none, refuses otherwise); kiln always installs Kiln's."""
    num_cpus: float = 1
    """CPUs the training task asks Ray for."""

    def check(self):
        if self.path is None and self.vocab_size < 300:
            yield "vocab_size: must be >= 300 (256 bytes + special tokens + merges)"
        if self.sample_bytes < 1:
            yield "sample_bytes: must be >= 1"


@frozen
class TokenizeConfig:
    PLACEMENT_KEYS: ClassVar[tuple[str, ...]] = ("partitions", "num_cpus")

    seq_len: int = 256
    """Tokens the model sees per sequence; each packed window holds seq_len + 1 tokens (inputs + shifted labels)."""
    val_fraction: float = 0.02
    """Fraction of documents (chosen by document hash) that go to the validation split."""
    sequences_per_shard: int = 16_384
    """Packed windows per memory-mapped shard file."""
    partitions: int = 0
    """Parallel tokenize tasks, each over a contiguous range of documents; 0 = max(document
    shards, 4). The output does not depend on it (partitions are stitched in document order)."""
    num_cpus: float = 1
    """CPUs each per-shard tokenize task asks Ray for."""

    def check(self):
        if self.seq_len < 8:
            yield "seq_len: must be >= 8"
        if self.sequences_per_shard < 1:
            yield "sequences_per_shard: must be >= 1"
        if self.partitions < 0:
            yield "partitions: must be >= 0 (0 = automatic)"
        if not 0.0 <= self.val_fraction < 0.5:
            yield "val_fraction: must be in [0, 0.5)"


@frozen
class ModelConfig:
    n_layers: int = 4
    """Transformer blocks."""
    d_model: int = 128
    """Residual stream width."""
    n_heads: int = 4
    """Attention (query) heads."""
    n_kv_heads: int = 2
    """Key/value heads: = n_heads is multi-head, 1 is multi-query, in between grouped-query."""
    d_ff: int = 352
    """Hidden width of the dense feed-forward."""
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    """Normalisation before attention and feed-forward (pre-norm)."""
    norm_eps: float = 1e-5
    """Epsilon of the norm."""
    activation: Literal["swiglu", "gelu"] = "swiglu"
    """Feed-forward activation."""
    position: Literal["rope", "alibi", "learned"] = "rope"
    """Position encoding."""
    rope_theta: float = 10000.0
    """RoPE base."""
    max_seq_len: int = 256
    """Longest sequence (learned positions table size; generation limit)."""
    n_experts: int = 4
    """Experts per MoE layer; 0 = dense feed-forward everywhere."""
    top_k: int = 2
    """Experts per token (1 = Switch Transformer)."""
    moe_every: int = 1
    """MoE on every k-th layer (1 = every layer; needed for Mixtral export)."""
    moe_d_ff: int | None = None
    """Hidden width of each expert (None = d_ff)."""
    capacity_factor: float | None = None
    """Expert capacity = factor * tokens * top_k / n_experts; overflow tokens skip the layer. None = no limit."""
    aux_loss_coef: float = 0.01
    """Load-balancing loss coefficient (Switch Transformer), in pretraining and SFT (TRL adds it through
    the exported model's `router_aux_loss_coef`); the reward model and PPO train without it."""
    z_loss_coef: float = 0.001
    """Router z-loss coefficient (ST-MoE), in pretraining only: TRL's losses have no z term."""
    tie_embeddings: bool = False
    """Share the input embedding and output projection."""
    init_std: float = 0.02
    """Std of the normal init; residual projections are scaled by 1/sqrt(2 * n_layers)."""
    dropout: float = 0.0
    """Dropout on attention and residual branches."""
    bias: bool = False
    """Biases in linear layers."""

    def check(self):
        # The rules are KilnConfig's (kiln/model_fields.py), reported here under the keys of this section.
        for key, message in model_problems(hf_values(self), names=PIPELINE_NAMES).items():
            yield f"{key}: {message}"


@frozen
class WorkerGroupConfig:
    """What every training stage (pretrain, sft, reward, ppo, grpo) sets the same way: its workers,
    DeepSpeed, the optimizer and its schedule, evaluation and checkpoint cadence."""

    # How the group communicates is placement too, grad_reduce_dtype included: under bf16 it moves the
    # losses as much as the ZeRO stage does (rounding of the sums), and under fp32 not at all.
    PLACEMENT_KEYS: ClassVar[tuple[str, ...]] = (
        "num_workers", "gpus_per_worker", "cpus_per_worker", "zero_stage", "activation_checkpointing",
        "checkpoint_every", "keep_last", "max_failures", "grad_reduce_dtype", "zero3_persistence_threshold",
        "zero3_max_reuse_distance", "zero3_prefetch_bucket_size", "zero3_shard_within", "collective_timeout_min",
    )  # fmt: skip
    CHECKPOINT_LAYOUT: ClassVar[tuple[str, ...]] = ("num_workers", "zero_stage")
    CHECKPOINT_TIED: ClassVar[str] = "its DeepSpeed checkpoints hold one shard per rank, loaded as saved"
    """Why the stage's checkpoint resumes only on the placement it was written with (refusals say it)."""
    UNSET_KEYS: ClassVar[tuple[str, ...]] = ("seed",)
    """Keys added after artifacts were built that, while unset (None), are left out of the stage's
    identity and record: those artifacts keep their fingerprints."""

    seed: int | None = None
    """This stage's own seed (data order, initialisation, sampling); unset, `run.seed`. Set it to train
    the stage again from the same inputs under another seed (one artifact per seed, upstream reused)."""
    num_workers: int = 1
    """Ray Train workers (data-parallel ranks)."""
    gpus_per_worker: float = 0
    """GPUs per worker; 0 trains on CPU with gloo."""
    cpus_per_worker: float = 1
    """CPUs per worker."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage: 1 shards optimizer state, 2 also gradients, 3 also parameters."""
    precision: Precision = "fp32"
    """bf16, fp16 (dynamic loss scaling, GPU only) or fp32."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    min_lr: float = 1e-4
    """Final learning rate of the cosine decay."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    activation_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    checkpoint_every: int = 50
    """Save a resumable checkpoint every this many steps (and at the end)."""
    keep_last: int = 2
    """Checkpoints kept."""
    eval_every: int = 50
    """Held-out evaluation every this many steps (and at the start and the end)."""
    max_failures: int = 2
    """Restarts of a dead worker group from the last checkpoint before the stage fails."""
    grad_reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """The dtype gradients are averaged over the ranks in (DeepSpeed's `communication_data_type`, every
    ZeRO stage): fp32 sums bf16 gradients without rounding each partial sum; bf16 halves the bytes sent
    and rounds. bf16 goes with precision=bf16 only (fp16's loss-scaled gradients are summed in fp32;
    under fp32 nothing changes)."""
    zero3_persistence_threshold: int = 100_000
    """ZeRO-3: parameters of at most this many elements are not sharded but kept whole on every rank
    (fewer, larger gathers; DeepSpeed's stage3_param_persistence_threshold, default 1e5)."""
    zero3_max_reuse_distance: int = 1_000_000_000
    """ZeRO-3: a gathered parameter used again within this many elements of parameter traffic is kept
    rather than released and gathered again (stage3_max_reuse_distance, default 1e9)."""
    zero3_prefetch_bucket_size: int = 50_000_000
    """ZeRO-3: elements of upcoming parameters gathered ahead of their use, overlapping the gathers with
    compute (stage3_prefetch_bucket_size, default 5e7)."""
    zero3_shard_within: int = 0
    """ZeRO-3 across nodes: N > 0 keeps a second copy of the parameters sharded over groups of N ranks
    (the GPUs of a node, typically), so the gathers of the backward pass stay inside a node (ZeRO++
    hpZ, DeepSpeed's zero_hpz_partition_size); 0 = off. Costs one more 1/N share of parameter memory."""
    collective_timeout_min: float = 10
    """Minutes a collective (all-reduce, all-gather, barrier) may wait for the other ranks before the
    worker fails, naming the rank and the collective; Ray Train then restarts the group from its last
    checkpoint (max_failures). A hung rank costs this long, not Ray Train's default 30 min."""

    def check(self):
        if self.num_workers < 1:
            yield "num_workers: must be >= 1"
        if self.grad_reduce_dtype == "bf16" and self.precision != "bf16":
            yield (
                f"grad_reduce_dtype: bf16 reduces bf16 gradients, and precision is {self.precision}; "
                "set grad_reduce_dtype=fp32 or precision=bf16"
            )
        for key in ("zero3_persistence_threshold", "zero3_max_reuse_distance", "zero3_prefetch_bucket_size"):
            if getattr(self, key) < 0:
                default = WorkerGroupConfig.__dataclass_fields__[key].default
                yield f"{key}: must be >= 0 (a number of elements; DeepSpeed's default is {default:_})"
        if self.zero3_shard_within:
            n = self.zero3_shard_within
            if self.zero_stage != 3:
                yield (
                    f"zero3_shard_within: {n} shards a second copy of ZeRO-3's parameters and zero_stage is "
                    f"{self.zero_stage}; set zero_stage=3 or zero3_shard_within=0"
                )
            elif n < 2 or self.num_workers % n:
                yield (
                    f"zero3_shard_within: {n} must be 0 (off) or a divisor >= 2 of num_workers={self.num_workers} "
                    "(the GPUs of one node, typically)"
                )
        if not self.collective_timeout_min > 0:
            yield "collective_timeout_min: must be > 0 (minutes a collective may wait for the other ranks)"
        if self.precision == "fp16" and self.gpus_per_worker == 0:
            yield "precision: fp16 (loss scaling) runs on GPUs only and gpus_per_worker=0; use bf16 or fp32 on CPU"
        if self.checkpoint_every < 1 or self.eval_every < 1:
            yield "checkpoint_every and eval_every: must be >= 1"
        if not 0 <= self.min_lr <= self.lr:
            yield f"min_lr: {self.min_lr} must be in [0, lr={self.lr}] (the cosine decays from lr to min_lr)"


@frozen
class PretrainConfig(WorkerGroupConfig):
    BUDGET_KEYS: ClassVar[tuple[str, ...]] = ("steps",)
    # The data order follows the global batch, so these change no step's sequences. They are not
    # bit-for-bit neutral: sums run in another order, an MoE model's load-balancing loss and expert
    # capacity are per micro-batch, and `val_loss` averages eval_batches x workers x micro-batch
    # sequences. What one changes to fit a cluster does not make another model by name.
    # expert_parallel is placement too: it decides which rank computes an expert's rows, not what is
    # computed (every token meets the same experts with the same weights; the gradients are the same sums,
    # reduced over other groups). Measured against expert_parallel=1 on the same ranks: losses within
    # float32 rounding (tests/test_expert_parallel_pretrain.py).
    PLACEMENT_KEYS: ClassVar[tuple[str, ...]] = (
        *WorkerGroupConfig.PLACEMENT_KEYS, "micro_batch_size", "offload_optimizer", "offload_params",
        "expert_parallel",
    )  # fmt: skip
    # DeepSpeed saves one shard per rank, laid out by ZeRO stage, and under expert parallelism each rank's
    # experts: the checkpoint records the three, and `layout_problem` says which changes it resumes under
    # (kiln/reshard.py converts it for the others).
    CHECKPOINT_LAYOUT: ClassVar[tuple[str, ...]] = (*WorkerGroupConfig.CHECKPOINT_LAYOUT, "expert_parallel")

    steps: int = 200
    """Optimizer steps to train for (a budget: raising it continues a finished run)."""
    num_workers: int = 2
    """Ray Train workers (data-parallel ranks)."""
    micro_batch_size: int = 8
    """Sequences per worker per forward/backward."""
    global_batch_size: int = 16
    """Sequences per optimizer step; accumulation = global / (workers * micro)."""
    mixture: dict[str, float] = dataclasses.field(default_factory=dict)
    """Weight of each source (a document's Pile subset, `meta.pile_set_name`) when batches are drawn
    (kiln/mixture.py): {"Pile-CC": 2, "Github": 1} draws twice as many windows from Pile-CC; a source not
    listed is not drawn. Empty: every source in its natural proportion, each window once per epoch.
    Changing it re-runs pretraining and what follows, not the data stages."""
    weight_decay: float = 0.1
    """AdamW weight decay (not on norms and biases)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    offload_optimizer: bool = False
    """ZeRO optimizer-state offload to CPU."""
    offload_params: bool = False
    """ZeRO-3 parameter offload to CPU."""
    compile: bool = False
    """torch.compile the model."""
    eval_every: int = 50
    """Validation loss every this many steps (and at the end)."""
    eval_batches: int = 4
    """Validation micro-batches per evaluation."""
    init_from: str | None = None
    """A Llama or Mixtral Hugging Face folder to start from (weights only) instead of random init."""
    expert_parallel: int = 1
    """Expert parallelism (GShard; kiln/expert_parallel.py): each group of this many consecutive workers
    splits every MoE layer's experts, each worker holding n_experts / expert_parallel of them and sending
    each token's rows to the worker holding its experts (all-to-all, dropless). 1 = every worker holds
    every expert. Divides num_workers and the MoE model's experts; zero_stage 1 or 2 (DeepSpeed 0.19
    partitions expert-parallel parameters with ZeRO-1/2 only). The same losses and model as 1: what it
    changes is the memory of the experts (and their optimizer state) per worker, and the traffic. A
    checkpoint resumes under another expert_parallel or num_workers too: kiln/reshard.py re-lays its
    experts, each whole with its optimizer state, for the new split."""

    @staticmethod
    def layout_problem(old: dict, new: dict) -> str | None:
        """Pretraining resumes on another number of workers and under another expert parallelism
        (kiln/reshard.py converts the checkpoint to DeepSpeed's universal form, its experts re-laid), not
        under a ZeRO stage DeepSpeed cannot load it into (`unsupported`)."""
        from kiln.reshard import unsupported

        why = unsupported(old["zero_stage"], new["zero_stage"])
        if why is None:
            return None
        return (
            f"pretrain.zero_stage={old['zero_stage']} and cannot be resumed with pretrain.zero_stage="
            f"{new['zero_stage']} ({why}): set pretrain.zero_stage={old['zero_stage']} to resume from it "
            "(pretrain.num_workers may change)"
        )

    def check(self):
        yield from super().check()
        if self.steps < 1:
            yield "steps: must be >= 1"
        if self.micro_batch_size < 1:
            yield "micro_batch_size: must be >= 1"
        elif self.num_workers >= 1 and self.global_batch_size % (self.num_workers * self.micro_batch_size):
            per_step = self.num_workers * self.micro_batch_size
            yield (
                f"global_batch_size: {self.global_batch_size} is not divisible by num_workers x "
                f"micro_batch_size = {per_step}; use a multiple of {per_step}"
            )
        for name, w in self.mixture.items():
            if not (isinstance(w, int | float) and w >= 0 and math.isfinite(w)):
                yield f"mixture.{name}: {w!r} is not a weight (a finite number >= 0)"
        if self.mixture and not any(isinstance(w, int | float) and w > 0 for w in self.mixture.values()):
            yield "mixture: no source has a weight > 0; give one a weight > 0 (or leave the mixture empty)"
        if self.offload_params and self.zero_stage != 3:
            yield "offload_params: parameter offload needs zero_stage=3"
        if self.offload_optimizer and self.zero_stage == 0:
            yield "offload_optimizer: optimizer offload needs zero_stage >= 1"
        if self.zero_stage == 3 and self.compile:
            yield (
                "compile: ZeRO-3 fetches parameters through hooks that torch.compile cannot trace; "
                "set pretrain.compile=false or pretrain.zero_stage<=2"
            )
        yield from self._expert_parallel_problems()

    def _expert_parallel_problems(self):
        P = self.expert_parallel
        if P < 1:
            yield "expert_parallel: must be >= 1 (1 = every worker holds every expert)"
            return
        if P == 1:
            return
        if self.num_workers >= 1 and self.num_workers % P:
            yield (
                f"expert_parallel: {P} does not divide num_workers={self.num_workers} (the workers form groups of "
                f"{P} that split the experts); use a divisor of num_workers"
            )
        if self.zero_stage == 3:
            yield (
                f"expert_parallel: {P} needs zero_stage 1 or 2, and zero_stage is 3: DeepSpeed 0.19 partitions "
                "expert-parallel parameters over their expert-data-parallel group with ZeRO-1/2 only (its ZeRO-3 "
                "takes its own AutoEP layers, not Kiln's MoE layer), and the ZeRO-3 build partitions the experts "
                "before they can be split; set pretrain.zero_stage=2 or pretrain.expert_parallel=1"
            )
        elif self.zero_stage == 0:
            yield (
                f"expert_parallel: {P} needs zero_stage 1 or 2, and zero_stage is 0: DeepSpeed 0.19's ZeRO-0 clips "
                "gradients by the mean of the ranks' norms, each of which sees its own experts only, so the model "
                "would depend on expert_parallel (measured: losses 4e-4 apart after 20 steps), and its checkpoint "
                "holds rank 0's experts alone; set pretrain.zero_stage=1 (the same traffic, the optimizer state "
                "partitioned) or pretrain.expert_parallel=1"
            )
        if self.compile:
            yield (
                f"compile: expert_parallel={P} exchanges each MoE layer's rows with an all-to-all whose split sizes "
                "are read on the host, untested under torch.compile; set pretrain.compile=false or "
                "pretrain.expert_parallel=1"
            )


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@frozen
class TrlStageConfig(WorkerGroupConfig):
    """The TRL trainer stages (sft, reward): their data, batch and LoRA."""

    BUDGET_KEYS: ClassVar[tuple[str, ...]] = ("steps",)
    PLACEMENT_KEYS: ClassVar[tuple[str, ...]] = (
        *WorkerGroupConfig.PLACEMENT_KEYS, "micro_batch_size", "max_errors",
    )  # fmt: skip
    CHECKPOINT_LAYOUT: ClassVar[tuple[str, ...]] = (*WorkerGroupConfig.CHECKPOINT_LAYOUT, "micro_batch_size")
    CHECKPOINT_TIED: ClassVar[str] = (
        "TRL's checkpoint holds one DeepSpeed shard per rank and each rank's position in its data, "
        "counted in its own micro-batches"
    )

    data: tuple[str, ...] = ()
    """Training records: paths or globs (.jsonl, .jsonl.zst, .jsonl.gz) or `hf:NAME[:SPLIT]` in TRL's
    standard formats (data_prep/chat_data.py)."""
    eval_data: tuple[str, ...] = ()
    """Held-out records; empty = hold out `eval_fraction` of `data` (by hash)."""
    eval_fraction: float = 0.05
    """Share of `data` held out when `eval_data` is empty."""
    steps: int = 200
    """Optimizer steps (a budget: raising it continues a finished run)."""
    micro_batch_size: int = 16
    """Examples per worker per forward/backward."""
    global_batch_size: int = 16
    """Examples per optimizer step; accumulation = global / (workers * micro)."""
    max_length: int = 256
    """Longest tokenised example (prompt + answer)."""
    lora_r: int = 0
    """LoRA rank (peft); 0 = full fine-tuning. The artifact holds the merged weights either way."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch."""
    lora_targets: tuple[str, ...] = LORA_TARGETS
    """Module names that get LoRA adapters: attention and dense feed-forward layers. A MoE layer's experts are
    stacked parameters of one module, not linear layers: LoRA leaves them (and the router) as they are."""
    max_errors: int = 200
    """How many bad records data_stats.json lists with file:line (all are counted)."""

    def check(self):
        yield from super().check()
        if self.steps < 1:
            yield "steps: must be >= 1"
        if not self.data:
            yield "data: give at least one path, glob or hf: dataset"
        if not self.eval_data and not 0.0 < self.eval_fraction < 0.5:
            yield "eval_fraction: must be in (0, 0.5) when eval_data is empty"
        if self.micro_batch_size < 1:
            yield "micro_batch_size: must be >= 1"
        elif self.num_workers >= 1 and self.global_batch_size % (self.num_workers * self.micro_batch_size):
            per_step = self.num_workers * self.micro_batch_size
            yield (
                f"global_batch_size: {self.global_batch_size} is not divisible by num_workers x "
                f"micro_batch_size = {per_step}; use a multiple of {per_step}"
            )
        if self.max_length < 8:
            yield "max_length: must be >= 8"
        if self.lora_r < 0:
            yield "lora_r: must be >= 0 (0 = full fine-tuning)"
        elif self.lora_r and not self.lora_targets:
            yield "lora_targets: LoRA needs at least one module name"


@frozen
class SftConfig(TrlStageConfig):
    data: tuple[str, ...] = (f"{TASK_DATA}/sft_train.jsonl.zst",)
    """Training records in TRL's prompt/completion or conversational `messages` format."""
    eval_data: tuple[str, ...] = (f"{TASK_DATA}/sft_val.jsonl.zst",)
    """Held-out records for the validation loss; empty = hold out `eval_fraction` of `data`."""
    task_prompts: str | None = f"{TASK_DATA}/prompts_val.jsonl.zst"
    """Held-out prompts of the shipped task (data_prep/task.py): greedy answers, checked by its program,
    give `task_accuracy`. Null for data of another task."""
    task_eval_size: int = 200
    """Task prompts answered at each evaluation (the first ones of `task_prompts`)."""
    max_new_tokens: int = 16
    """Longest answer generated for the task accuracy (generation stops at <|end|> or EOS)."""

    def check(self):
        yield from super().check()
        if self.task_eval_size < 1 or self.max_new_tokens < 1:
            yield "task_eval_size and max_new_tokens: must be >= 1"


@frozen
class RewardConfig(TrlStageConfig):
    init_from: Literal["pretrain", "sft"] = "pretrain"
    """Backbone the reward model starts from (weights only): pretrain runs it beside sft; sft after it."""
    data: tuple[str, ...] = (f"{TASK_DATA}/pref_train.jsonl.zst",)
    """Preference pairs as {prompt?, chosen, rejected, kind?} or Anthropic HH dialogue strings; pairs
    longer than `max_length` are dropped and counted (`too_long_pairs`)."""
    eval_data: tuple[str, ...] = (f"{TASK_DATA}/pref_val.jsonl.zst",)
    """Held-out pairs for pairwise accuracy and reward statistics; empty = hold out `eval_fraction` of `data`."""
    answer_eval: str | None = f"{TASK_DATA}/policy_answers_val.jsonl.zst"
    """A policy's own sampled answers to held-out prompts, each labelled right or wrong ({prompt, answers,
    right}; the shipped file: the tiny SFT policy's, labelled by the task's checking program,
    data_prep/build_policy_pairs.py): the reward model's in-prompt AUC on them (`answer_auc`), how well it
    ranks what an RL stage's rollouts will contain. Null: not measured."""


@frozen
class RlConfig(WorkerGroupConfig):
    """What the RL stages (ppo, grpo: kiln/rl/loop.py) set the same way: prompts, sampling, the rollout
    and update batches, the held-out task evaluation, what scores a response, the frozen models."""

    BUDGET_KEYS: ClassVar[tuple[str, ...]] = ("iterations",)
    # As for pretraining, not bit-for-bit neutral: each rank shuffles its own share of a rollout
    # batch into mini-batches, so the world size decides which rollouts share an update.
    PLACEMENT_KEYS: ClassVar[tuple[str, ...]] = (
        *WorkerGroupConfig.PLACEMENT_KEYS, "micro_batch_size", "max_errors", "gather_for_rollout",
        "offload_frozen", "reward_gate", "reward_min_accuracy", "reward_max_ece", "reward_max_length_correlation",
        "reward_min_answer_auc",
    )  # fmt: skip

    prompts: tuple[str, ...] = (f"{TASK_DATA}/prompts_train.jsonl.zst",)
    """Prompts to sample responses for: paths or globs or `hf:NAME[:SPLIT]`, {"prompt": str | messages}
    per record (or HH strings ending with a Human turn; data_prep/chat_data.py)."""
    task_prompts: str | None = f"{TASK_DATA}/prompts_val.jsonl.zst"
    """Held-out prompts of the shipped task: greedy answers judged by data_prep/task.py's program before,
    during and after training (`task_accuracy`), a measure that training never optimises (unless
    `reward_source: task`). Null for another task."""
    task_eval_size: int = 200
    """Task prompts answered at each evaluation."""
    task_samples: int = 4
    """Answers sampled per task prompt (as the rollouts are) for `task_accuracy_sampled`."""
    iterations: int = 40
    """Iterations, each a rollout then `ppo_epochs` passes over it (a budget: raising it continues)."""
    rollout_batch_size: int = 32
    """Prompts sampled per iteration, over all workers."""
    mini_batch_size: int = 16
    """Responses per optimizer step, over all workers: each epoch takes (responses per iteration) /
    mini_batch_size steps."""
    micro_batch_size: int = 16
    """Responses per worker per forward/backward (gradient accumulation up to the mini-batch)."""
    ppo_epochs: int = 2
    """Passes over each rollout batch (in a fresh order each time)."""
    max_prompt_length: int = 128
    """Longest prompt in tokens; longer prompts are skipped and counted (`too_long_prompts`)."""
    max_new_tokens: int = 16
    """Longest response; one that has not ended by then is cut (and penalised by `missing_eos_penalty`)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p. Logprobs,
    ratios and the KL use the full softmax (as TRL's do), not the truncated distribution: keep 1.0
    unless the rollouts need it."""
    kl_coef: float = 0.05
    """beta: weight of the KL penalty against the reference (the SFT model)."""
    clip_eps: float = 0.2
    """Policy ratio clip range."""
    missing_eos_penalty: float = 1.0
    """Subtracted from the normalised score of a response that never ended (0 = off)."""
    reward_source: Literal["model", "task"] = "model"
    """What scores a response: the reward model (RLHF), or the shipped task's checking program
    (data_prep/task.py: 1 right, 0 wrong; RL from a verifiable reward). With `task` the task accuracy is
    what training optimises, no longer an independent measure."""
    max_errors: int = 200
    """How many bad prompt records are listed with file:line (all are counted)."""
    gather_for_rollout: bool = True
    """ZeRO-3: each model's parameters gathered whole once per rollout (the policy's for sampling and
    for the held-out evaluation, each model's for its experience passes) rather than at every forward
    pass, that is at every sampled token; the ranks then sample without stepping together. Every rank
    holds one whole model meanwhile (as TRL and OpenRLHF do): false for a model too large for that,
    which then samples gathering per forward pass. The same numbers either way; no effect below ZeRO-3."""
    select: Literal["last", "best_gold"] = "last"
    """Which policy the stage exports: the last iteration's (`last`), or that of the evaluated iteration
    (the SFT policy's, iteration 0, included) with the best sampled task accuracy on the selection half
    of the held-out task prompts (`best_gold`); its figures in the manifest are then those of the other
    half, the report half (kiln/rl/evaluation.py). The manifest says which (`selected_iteration`) and why.
    With best_gold each checkpoint also keeps that policy's weights (one model). Needs task_prompts."""
    reward_gate: Literal["warn", "refuse", "off"] = "warn"
    """What the stage does, before any worker starts, when the reward model it scores with
    (`reward_source: model`) misses a threshold below on its held-out measures (the reward artifact's
    manifest): log a warning naming the measure and the key (`warn`), refuse to start (`refuse`), or
    check nothing (`off`). A reward model that ranks held-out pairs poorly, whose probabilities are
    miscalibrated or whose score follows the answer's length is one RL learns to exploit."""
    reward_min_accuracy: float = 0.6
    """Lowest held-out pairwise accuracy (`pairwise_accuracy`) the gate accepts."""
    reward_max_ece: float = 0.1
    """Highest expected calibration error of its Bradley-Terry probabilities (`calibration_ece`)."""
    reward_max_length_correlation: float = 0.5
    """Highest |correlation| of its score with the response's length (`length_correlation`)."""
    reward_min_answer_auc: float = 0.6
    """Lowest in-prompt AUC on a policy's own labelled answers (`answer_auc`, `reward.answer_eval`)."""
    offload_frozen: bool = False
    """ZeRO-3: the frozen models' parameters (the reference and the reward model) kept in CPU memory
    (DeepSpeed's parameter offload; they are built there, partitioned) and copied to the accelerator
    only for their experience passes, so that between those it holds none of them, where it would hold
    their 1/num_workers shares. Each pass then copies the model from host memory. The same numbers
    either way; on CPU workers no effect. Needs zero_stage=3."""

    def check(self):
        yield from super().check()
        if self.offload_frozen and self.zero_stage != 3:
            yield (
                f"offload_frozen: offloads ZeRO-3's partitioned parameters and zero_stage is {self.zero_stage} "
                "(each rank holds the frozen models whole); set zero_stage=3 or offload_frozen=false"
            )
        if self.iterations < 1:
            yield "iterations: must be >= 1"
        if not self.prompts:
            yield "prompts: give at least one path, glob or hf: dataset"
        if min(self.rollout_batch_size, self.mini_batch_size, self.micro_batch_size, self.ppo_epochs) < 1:
            yield "rollout_batch_size, mini_batch_size, micro_batch_size and ppo_epochs: must be >= 1"
        elif self.num_workers >= 1:
            yield from self.batch_problems()
        if not 0 < self.top_p <= 1 or self.temperature < 0:
            yield "top_p must be in (0, 1] and temperature >= 0"
        if min(self.max_new_tokens, self.max_prompt_length, self.task_eval_size, self.task_samples) < 1:
            yield "max_new_tokens, max_prompt_length, task_eval_size and task_samples: must be >= 1"
        if self.kl_coef < 0:
            yield "kl_coef: must be >= 0 (0 = no KL penalty)"
        if (
            not 0 <= self.reward_min_accuracy <= 1
            or not 0 <= self.reward_min_answer_auc <= 1
            or self.reward_max_ece < 0
            or self.reward_max_length_correlation < 0
        ):
            yield (
                "reward_min_accuracy and reward_min_answer_auc must be in [0, 1]; reward_max_ece and "
                "reward_max_length_correlation >= 0"
            )
        if self.select == "best_gold" and (not self.task_prompts or self.task_eval_size < 2):
            yield (
                "select: best_gold chooses on one half of the held-out task prompts and reports on the other; "
                "give task_prompts and task_eval_size >= 2, or set select=last"
            )
        if self.reward_source == "task" and not self.task_prompts:
            yield "reward_source: task needs the shipped task's prompts (task_prompts); use model for other data"

    def batch_problems(self):
        """The rules between the batch sizes and the workers (each at least 1)."""
        per_step = self.num_workers * self.micro_batch_size
        if self.mini_batch_size % per_step:
            yield (
                f"mini_batch_size: {self.mini_batch_size} is not divisible by num_workers x "
                f"micro_batch_size = {per_step}; use a multiple of {per_step}"
            )


@frozen
class PpoConfig(RlConfig):
    """PPO with a KL penalty (stages/ppo.py): the policy from sft, the reward (and value) model from reward."""

    kl_coef: float = 0.05
    """beta: weight of the per-token KL penalty against the reference (the SFT model) in the rewards."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimator in the rewards: k1 = log(pi / ref) (unbiased), k3 = (r - 1) - log r (>= 0)."""
    kl_target: float | None = None
    """With a target (nats per response), beta adapts toward it (Ziegler et al. 2019); null = fixed beta."""
    kl_horizon: float = 10000
    """Responses over which the adaptive controller moves beta by about e^0.2 under a persistent error."""
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """lambda of GAE."""
    value_clip_eps: float = 0.2
    """Value clip range (in units of the normalised reward)."""
    entropy_coef: float = 0.0
    """Weight of an entropy bonus in the policy loss."""
    whiten_advantages: bool = True
    """Normalise advantages to mean 0, std 1 over each rollout batch (all workers)."""
    critic_init: Literal["reward", "sft"] = "reward"
    """Value model start: the reward model, or the SFT backbone with a fresh value head."""
    critic_lr: float = 5e-4
    """Peak learning rate of the value model."""

    def check(self):
        yield from super().check()
        if self.kl_target is not None and not (self.kl_target > 0 and self.kl_horizon > 0):
            yield "kl_target and kl_horizon: must be > 0 (or kl_target null for a fixed kl_coef)"
        elif self.kl_target is not None:
            if not self.kl_coef > 0:
                yield "kl_coef: must be > 0 with kl_target (the adaptive controller scales it: from 0 it stays 0)"
            if not self.kl_horizon > 0.2 * self.rollout_batch_size:
                yield (
                    f"kl_horizon: must be > 0.2 x rollout_batch_size = {0.2 * self.rollout_batch_size:g}, or one "
                    f"update can scale beta by 1 - 0.2 x {self.rollout_batch_size} / {self.kl_horizon:g} <= 0"
                )
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            yield "gamma and lam: must be in [0, 1]"

    def batch_problems(self):
        if self.rollout_batch_size % self.mini_batch_size:
            yield (
                f"rollout_batch_size: {self.rollout_batch_size} is not a multiple of mini_batch_size "
                f"{self.mini_batch_size}"
            )
        yield from super().batch_problems()


@frozen
class GrpoConfig(RlConfig):
    """GRPO and its relatives, Dr. GRPO and RLOO (stages/grpo.py): `group_size` responses per prompt,
    each scored against its group's, no value model. An opt-in stage: off unless `enabled`.

        GRPO       baseline: group_mean,    scale_advantages: true,  weighting: sequence_mean
        Dr. GRPO   baseline: group_mean,    scale_advantages: false, weighting: constant
        RLOO       baseline: leave_one_out, scale_advantages: false, weighting: token_mean"""

    # `enabled` says whether a run builds the stage, not what the stage makes
    PLACEMENT_KEYS: ClassVar[tuple[str, ...]] = (*RlConfig.PLACEMENT_KEYS, "enabled")

    enabled: bool = False
    """Whether a run builds grpo (beside ppo, from the same sft and reward artifacts). Off by default:
    `--set grpo.enabled=true` adds it to a run; a selection that names it (`--only grpo`, `--from grpo`,
    `--until grpo`) runs it whatever this says. Changes no artifact's identity."""
    group_size: int = 8
    """G: responses sampled per prompt; each one's advantage is its score against its group's (>= 2).
    An iteration samples rollout_batch_size x group_size responses."""
    baseline: Literal["group_mean", "leave_one_out"] = "group_mean"
    """What a response's score is compared with: its group's mean (GRPO, Shao et al. 2024), or the mean
    of the other group_size - 1 (RLOO, Ahmadian et al. 2024; kiln/rl/group_math.py)."""
    scale_advantages: bool = True
    """Divide each advantage by its group's standard deviation (GRPO); false leaves it unscaled
    (Dr. GRPO, Liu et al. 2025: the division weighs the prompts that are too easy or too hard the most)."""
    weighting: Literal["sequence_mean", "token_mean", "constant"] = "sequence_mean"
    """How the token losses of a mini-batch are averaged: sequence_mean, each response's own mean then
    the mean over responses (GRPO); token_mean, one mean over all tokens (DAPO, RLOO); constant, the sum
    over 1 / (responses x max_new_tokens) (Dr. GRPO: no response's length divides its loss)."""
    kl_in: Literal["loss", "reward"] = "loss"
    """Where the KL to the reference goes: a loss term, beta times the per-token k3 estimate (GRPO's
    eq. 4), or the reward, beta times the response's summed log ratio (k1) off its score before the group
    baseline (as PPO charges it)."""
    kl_coef: float = 0.04
    """beta: weight of the KL to the reference (the SFT model), in the loss or the reward (`kl_in`)."""

    def check(self):
        yield from super().check()
        if self.group_size < 2:
            yield "group_size: must be >= 2 (a response is scored against the rest of its group)"

    def batch_problems(self):
        responses = self.rollout_batch_size * self.group_size
        if self.rollout_batch_size % self.num_workers:
            yield (
                f"rollout_batch_size: {self.rollout_batch_size} is not divisible by num_workers={self.num_workers} "
                "(each worker samples the groups of its own prompts)"
            )
        elif responses % self.mini_batch_size:
            yield (
                f"mini_batch_size: {self.mini_batch_size} does not divide rollout_batch_size x group_size = "
                f"{responses} responses"
            )
        yield from super().batch_problems()


@frozen
class RlooConfig(GrpoConfig):
    """RLOO (Ahmadian et al. 2024) as a stage of its own (stages/rloo.py): grpo's loop and keys with RLOO's
    defaults, so that one run compares it with GRPO and PPO from the same artifacts. Opt-in: `enabled`."""

    enabled: bool = False
    """Whether a run builds rloo (beside ppo and grpo, from the same artifacts): `--set rloo.enabled=true`;
    `--only rloo` runs it whatever this says. Changes no artifact's identity."""
    baseline: Literal["group_mean", "leave_one_out"] = "leave_one_out"
    """Each response's score against the mean of the other group_size - 1 (RLOO)."""
    scale_advantages: bool = False
    """RLOO leaves the advantages unscaled."""
    weighting: Literal["sequence_mean", "token_mean", "constant"] = "token_mean"
    """One mean over all the mini-batch's tokens (RLOO)."""


DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero",
    "apo_down", "discopop", "sigmoid_norm",
)  # fmt: skip
"""TRL 1.16's DPOConfig.loss_type values that need no key Kiln does not expose (exo_pair needs label
smoothing; sft alone is sft's stage): tests/test_dpo.py checks each against the installed TRL."""


@frozen
class DpoConfig(TrlStageConfig):
    """Direct Preference Optimization (stages/dpo.py, Rafailov et al. 2023): the SFT policy trained on
    preference pairs against itself frozen as the reference, no reward model. An opt-in sibling of ppo:
    off unless `enabled`. Every ZeRO stage: the reference is replicated below ZeRO-3 and partitioned
    under it, as the policy is."""

    PLACEMENT_KEYS: ClassVar[tuple[str, ...]] = (*TrlStageConfig.PLACEMENT_KEYS, "enabled")

    enabled: bool = False
    """Whether a run builds dpo (beside ppo, from the same sft artifact). Off by default: `--set
    dpo.enabled=true` adds it to a run; a selection that names it (`--only dpo`, `--from dpo`, `--until
    dpo`) runs it whatever this says. Changes no artifact's identity."""
    data: tuple[str, ...] = (f"{TASK_DATA}/pref_train.jsonl.zst",)
    """Preference pairs as {prompt?, chosen, rejected, kind?} or Anthropic HH dialogue strings, as
    reward's; pairs whose prompt alone fills `max_length` are dropped and counted (`too_long_pairs`)."""
    eval_data: tuple[str, ...] = (f"{TASK_DATA}/pref_val.jsonl.zst",)
    """Held-out pairs for the implicit reward's preference accuracy; empty = hold out `eval_fraction` of `data`."""
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    min_lr: float = 1e-5
    """Final learning rate of the cosine decay."""
    beta: float = 0.1
    """How far the policy may move from the reference: the implicit reward is beta x log(pi / pi_ref)
    summed over the answer's tokens (TRL's `beta`; for `ipo` the regularisation tau)."""
    loss_type: Literal[DPO_LOSS_TYPES] = "sigmoid"  # type: ignore[valid-type]
    """TRL's DPO loss: sigmoid (DPO, -log sigmoid of the implicit reward margin), hinge (SLiC), ipo (IPO,
    squared, per-token), nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down,
    discopop, sigmoid_norm (TRL's DPOConfig documents each)."""
    task_prompts: str | None = f"{TASK_DATA}/prompts_val.jsonl.zst"
    """Held-out prompts of the shipped task: greedy and sampled answers judged by data_prep/task.py's
    program before and after training (`task_accuracy`, `task_accuracy_sampled`), a measure DPO never
    optimises. Null for another task."""
    task_eval_size: int = 200
    """Task prompts answered at each evaluation."""
    task_samples: int = 4
    """Answers sampled per task prompt for `task_accuracy_sampled` (paired before / after: gained, lost)."""
    max_new_tokens: int = 16
    """Longest answer generated at an evaluation."""
    temperature: float = 1.0
    """Sampling temperature of `task_accuracy_sampled` (0 = greedy), and of `kl_sft`'s log-probabilities."""
    top_p: float = 1.0
    """Nucleus sampling of `task_accuracy_sampled` (and of the on_policy pairs' answers)."""
    pairs: Literal["offline", "on_policy"] = "offline"
    """Where the training pairs come from: `data` (offline), or the SFT policy (on_policy): `pair_samples`
    answers sampled for each of `prompts` at `temperature` / `top_p`, judged by the shipped task's
    checking program (data_prep/task.py), the first right one chosen over the first wrong one where
    there are both. The held-out pairs stay `eval_data`'s. On-policy, the checking program labels what
    DPO trains on: the task accuracy is then what it optimises, no longer an independent measure."""
    prompts: tuple[str, ...] = (f"{TASK_DATA}/prompts_train.jsonl.zst",)
    """on_policy: the prompts answered ({"prompt": str | messages} records, as ppo's); the shipped task's."""
    pair_samples: int = 2
    """on_policy: answers sampled per prompt (with 2: a pair where exactly one of the two is right)."""

    def check(self):
        yield from super().check()
        if self.pairs == "on_policy":
            if not self.prompts:
                yield "prompts: pairs=on_policy samples answers to prompts; give at least one path, glob or hf: dataset"
            if not self.eval_data:
                yield "eval_data: pairs=on_policy holds out no pairs of its own; give held-out preference pairs"
            if self.pair_samples < 2:
                yield "pair_samples: must be >= 2 (a pair is a right and a wrong answer to one prompt)"
        if not self.beta > 0:
            yield "beta: must be > 0 (the implicit reward's scale)"
        if not 0 < self.top_p <= 1 or self.temperature < 0:
            yield "top_p must be in (0, 1] and temperature >= 0"
        if min(self.max_new_tokens, self.task_eval_size, self.task_samples) < 1:
            yield "max_new_tokens, task_eval_size and task_samples: must be >= 1"


@frozen
class HardwareConfig:
    """The accelerator the training stages will run on, for the plan `run --dry-run` prints (step time,
    MFU, whether it fits). Read by no stage: changing it re-runs nothing."""

    name: str | None = None
    """What it is, for the plan's header (e.g. "H100 SXM 80GB"); null = not described: no time or MFU."""
    peak_tflops: float = 0.0
    """Dense bf16/fp16 TFLOP/s of one accelerator (H100 SXM: 989, A100: 312)."""
    memory_gib: float = 0.0
    """Memory of one accelerator in GiB; the plan warns when a rank needs more than 80 % of it."""
    gpus_per_node: int = 8
    """Accelerators per node: a worker group larger than this communicates across nodes."""
    intra_node_gbs: float = 0.0
    """Bus bandwidth of a collective inside one node, GB/s: what nccl-tests' all_reduce_perf reports as
    busbw on one node (bytes each rank moves per second). The plan's communication time is the
    bytes each rank moves (ring: 2(n-1)/n of an all-reduced tensor) over it."""
    inter_node_gbs: float = 0.0
    """The same across nodes: nccl-tests' busbw with the job's node count (used when the worker group
    is larger than `gpus_per_node`)."""

    def check(self):
        if min(self.peak_tflops, self.memory_gib, self.intra_node_gbs, self.inter_node_gbs) < 0:
            yield "peak_tflops, memory_gib, intra_node_gbs and inter_node_gbs: must be >= 0"
        if self.gpus_per_node < 1:
            yield "gpus_per_node: must be >= 1"
        if self.name is not None and not (self.peak_tflops > 0 and self.memory_gib > 0):
            yield f"peak_tflops and memory_gib: give both for {self.name!r} (or name: null)"


@frozen
class PipelineConfig:
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    """Run-wide settings."""
    ingest: IngestConfig = dataclasses.field(default_factory=IngestConfig)
    """Raw shards -> cleaned documents."""
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    """Documents -> byte-level BPE tokenizer."""
    tokenize: TokenizeConfig = dataclasses.field(default_factory=TokenizeConfig)
    """Documents + tokenizer -> packed token shards."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """The GPT (MoE) decoder trained by pretrain."""
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)
    """DeepSpeed ZeRO pretraining on Ray Train."""
    sft: SftConfig = dataclasses.field(default_factory=SftConfig)
    """Supervised fine-tuning of the pretrained model (TRL SFTTrainer on DeepSpeed)."""
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    """Reward model training on preference pairs (TRL RewardTrainer on DeepSpeed)."""
    ppo: PpoConfig = dataclasses.field(default_factory=PpoConfig)
    """RLHF: PPO with a KL penalty against the SFT model, scored by the reward model."""
    grpo: GrpoConfig = dataclasses.field(default_factory=GrpoConfig)
    """Critic-free RL beside ppo: GRPO, Dr. GRPO or RLOO (opt-in: `grpo.enabled`)."""
    rloo: RlooConfig = dataclasses.field(default_factory=RlooConfig)
    """RLOO beside grpo and ppo: grpo's stage with RLOO's baseline (opt-in: `rloo.enabled`)."""
    dpo: DpoConfig = dataclasses.field(default_factory=DpoConfig)
    """Direct Preference Optimization of the SFT policy beside ppo (TRL DPOTrainer; opt-in: `dpo.enabled`)."""
    hardware: HardwareConfig = dataclasses.field(default_factory=HardwareConfig)
    """The accelerator, for the plan before launch (`run --dry-run`): read by no stage."""

    def check(self):
        # Rules across sections (each section's own are its check()'s). With pretrain.init_from the model is
        # the checkpoint's: stages/pretrain.py checks its experts before the workers start.
        P, E = self.pretrain.expert_parallel, self.model.n_experts
        if P > 1 and not self.pretrain.init_from:
            if E == 0:
                yield (
                    f"pretrain.expert_parallel: {P} splits a MoE model's experts, and model.n_experts is 0 (a dense "
                    "model); set pretrain.expert_parallel=1"
                )
            elif E % P:
                yield (
                    f"pretrain.expert_parallel: {P} does not divide model.n_experts={E} (each worker of a group holds "
                    "as many experts); use a divisor of model.n_experts"
                )


def stage_seed(cfg, section) -> int:
    """The seed a training stage uses: its section's `seed`, else `run.seed`."""
    return cfg.run.seed if section.seed is None else section.seed


def load_config(path: str | Path | None = DEFAULT_CONFIG, overrides: list[str] = (), schema=PipelineConfig):
    """Load a preset with `--set` overrides; raises ConfigError listing every problem."""
    return load(schema, path, list(overrides))


def section_dict(cfg, sections: tuple[str, ...]) -> dict:
    """The config sections a stage reads, as plain data (unset keys left out: `drop_unset`)."""
    return {name: drop_unset(cfg, name, to_dict(getattr(cfg, name))) for name in sections}


def drop_unset(cfg, section: str, values: dict) -> dict:
    """A section's values without its `UNSET_KEYS` that are None."""
    unset = getattr(type(getattr(cfg, section)), "UNSET_KEYS", ())
    return {k: v for k, v in values.items() if not (k in unset and v is None)}


def placement_keys(cfg, section: str) -> tuple[str, ...]:
    return getattr(type(getattr(cfg, section)), "PLACEMENT_KEYS", ())


def checkpoint_layout_keys(cfg, section: str) -> tuple[str, ...]:
    return getattr(type(getattr(cfg, section)), "CHECKPOINT_LAYOUT", ())


def layout_problem(cfg, section: str, old: dict, new: dict) -> str | None:
    """Why a checkpoint written under placement `old` ({"section.key": value} of its CHECKPOINT_LAYOUT)
    cannot resume under `new`, or None: the section's own `layout_problem` where it has one (pretraining
    reshards), else any change is refused. The reason reads after "its checkpoint ... was written with"."""
    own = getattr(type(getattr(cfg, section)), "layout_problem", None)
    if own is not None:
        return own(
            {k.split(".", 1)[1]: v for k, v in old.items()}, {k.split(".", 1)[1]: v for k, v in new.items()}
        )
    changed = [k for k in old if new[k] != old[k]]
    tied = getattr(type(getattr(cfg, section)), "CHECKPOINT_TIED", "")
    return (
        ", ".join(f"{k}={old[k]}" for k in changed) + " and cannot be resumed with "
        + ", ".join(f"{k}={new[k]}" for k in changed) + (f" ({tied})" if tied else "") + ": keep the old placement ("
        + " ".join(f"--set {k}={old[k]}" for k in changed) + ") to resume from it"
    )  # fmt: skip


def budget_keys(cfg, section: str) -> tuple[str, ...]:
    return getattr(type(getattr(cfg, section)), "BUDGET_KEYS", ())


def drop_keys(d: dict, keys) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def without_budget(cfg, sections: dict) -> dict:
    """A stage's keyed config ({section: values}) without each section's budget keys: what names its
    work dir, so that a raised budget continues from the same checkpoints. `_extra` (a stage's own
    fingerprint data) is kept as it is."""
    return {s: d if s == "_extra" else drop_keys(d, budget_keys(cfg, s)) for s, d in sections.items()}
