"""What training a model costs per rank before anything runs: parameters, memory, communication,
and, for an accelerator described in the config (`hardware:`), the step time and MFU they imply.

    tensors = parameter_tensors(hf_values(cfg.model), vocab_size=32000)   # exactly KilnForCausalLM's
    cost = training_cost(tensors, Setup(world=32, zero_stage=1, precision="bf16", ...))
    cost.memory, cost.comm                                                # bytes per rank, per step

The model is DeepSpeed's ZeRO as kiln/training.py configures it (Rajbhandari et al. 2020), per
data-parallel rank, Ψ parameters over N ranks, b bytes per weight (2 in bf16/fp16, 4 in fp32):
- weights b·Ψ (ZeRO-3: b·Ψ/N), gradients b·Ψ (ZeRO-2 and 3, and ZeRO-1 without accumulation:
  b·Ψ/N), optimizer state 12·Ψ/N (an fp32 master partition and Adam's two moments; ZeRO-0 keeps
  8·Ψ in fp32, 12·Ψ otherwise);
- communication, as tensor bytes entering collectives: ZeRO-0 all-reduces the gradients once per
  optimizer step; ZeRO-1 all-reduces them once and all-gathers the updated weights; ZeRO-2 reduces
  them at every micro-step (and all-gathers the weights once); ZeRO-3 gathers the weights at every
  micro-step, and again in backward those it released after forward (further from their reuse
  than `stage3_max_reuse_distance` and the prefetch bucket), and reduce-scatters the gradients at
  every micro-step; parameters of at most `stage3_param_persistence_threshold` elements stay whole
  once gathered and are gathered once per step.
- expert parallelism over P ranks (ZeRO-1/2; kiln/expert_parallel.py, GShard): a rank holds E/P of
  each MoE layer's experts, whose gradients are reduced and weights gathered over the N/P ranks
  holding the same experts (`*_expert_data`); each MoE layer exchanges its rows in an all-to-all
  within the P ranks, twice forward (to the experts, back) and twice backward (activation
  checkpointing: twice more), micro_batch_size x seq_len x top_k rows of the hidden size each (what
  enters from one rank is its own rows, whatever the routing: summed over the ranks the rows sent
  and received are equal), and before each forward the (E,) int64 counts. A rank sends
  (P - 1) / P of its rows to the others under an even routing.
bench/comm_volume.py measures these bytes with DeepSpeed's comms logger, bench/expert_parallel.py the
all-to-all's, and bench/pretrain_memory.py the memory, and print the ratios to this plan. Activations are an estimate (tensors saved for
backward, SDPA attention: no T x T scores), as are the time and MFU: a lower bound on time, an upper
bound on MFU, from peak FLOP/s and link bandwidth alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
GiB = 1024**3


@dataclass(frozen=True)
class Tensor:
    name: str
    numel: int
    layer: int | None = None  # the block it belongs to; None for embeddings, final norm, heads
    expert: bool = False
    shape: tuple[int, ...] = ()  # (out, in) of a linear layer's weight, (E, out, in) of stacked experts; ()


def parameter_tensors(m: dict, vocab_size: int, value_head: bool = False) -> list[Tensor]:
    """Every parameter of KilnForCausalLM (or, with `value_head`, KilnForSequenceClassification with
    one label) for the KilnConfig-named values `m` (kiln/model_fields.py `hf_values`), in the
    model's order, with the model's names (tests check both against the built model)."""
    h, L, bias = m["hidden_size"], m["num_hidden_layers"], m["bias"]
    head_dim = h // m["num_attention_heads"]
    q, kv = m["num_attention_heads"] * head_dim, m["num_key_value_heads"] * head_dim
    swiglu = m["activation"] == "swiglu"
    out = [Tensor("model.embed_tokens.weight", vocab_size * h)]
    if m["position"] == "learned":
        out.append(Tensor("model.embed_positions.weight", m["max_position_embeddings"] * h))

    def norm(name: str, layer: int | None) -> list[Tensor]:
        with_bias = m["norm"] == "layernorm" and bias
        return [Tensor(f"{name}.weight", h, layer)] + (
            [Tensor(f"{name}.bias", h, layer)] if with_bias else []
        )

    def linear(name: str, n_in: int, n_out: int, layer, expert=False, has_bias=bias) -> list[Tensor]:
        ts = [Tensor(f"{name}.weight", n_in * n_out, layer, expert, (n_out, n_in))]
        return ts + ([Tensor(f"{name}.bias", n_out, layer, expert)] if has_bias else [])

    def ffn(name: str, hidden: int, layer: int, expert: bool) -> list[Tensor]:
        gate = linear(f"{name}.gate_proj", h, hidden, layer, expert) if swiglu else []
        up = linear(f"{name}.up_proj", h, hidden, layer, expert)
        return gate + up + linear(f"{name}.down_proj", hidden, h, layer, expert)

    def experts(name: str, hidden: int, layer: int, n: int) -> list[Tensor]:  # stacked (E, out, in)
        out = []
        for proj, n_out, n_in in (("gate_proj", hidden, h), ("up_proj", hidden, h), ("down_proj", h, hidden)):
            if proj != "gate_proj" or swiglu:
                out.append(Tensor(f"{name}.{proj}", n * n_in * n_out, layer, True, (n, n_out, n_in)))
                out += [Tensor(f"{name}.{proj}_bias", n * n_out, layer, True)] if bias else []
        return out

    for i in range(L):
        p = f"model.layers.{i}"
        out += norm(f"{p}.attn_norm", i)
        for proj, n_out in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            out += linear(f"{p}.attn.{proj}", h, n_out, i)
        out += linear(f"{p}.attn.o_proj", q, h, i)
        out += norm(f"{p}.ffn_norm", i)
        if m["num_experts"] > 0 and (i + 1) % m["moe_every"] == 0:
            out += linear(f"{p}.ffn.router", h, m["num_experts"], i, has_bias=False)
            hidden = m["moe_intermediate_size"] or m["intermediate_size"]
            out += experts(f"{p}.ffn.experts", hidden, i, m["num_experts"])
        else:
            out += ffn(f"{p}.ffn", m["intermediate_size"], i, expert=False)
    out += norm("model.norm", None)
    if value_head:
        out.append(Tensor("score.weight", h))
    elif not m["tie_word_embeddings"]:
        out.append(Tensor("lm_head.weight", vocab_size * h))
    return out


def lora_parameters(tensors: list[Tensor], rank: int, targets: tuple[str, ...]) -> int:
    """Parameters LoRA (peft) adds: rank x (in + out) for every linear weight named by `targets` (a MoE
    layer's stacked experts are parameters of one module, not linear layers: LoRA leaves them out)."""
    return sum(
        rank * sum(t.shape)
        for t in tensors
        if len(t.shape) == 2 and t.name.removesuffix(".weight").rsplit(".", 1)[-1] in targets
    )


def active_parameters(tensors: list[Tensor], m: dict) -> int:
    """Parameters one token passes through: all but the (E - k) experts it is not routed to."""
    total = sum(t.numel for t in tensors)
    experts = sum(t.numel for t in tensors if t.expert)
    if not experts:
        return total
    return total - experts * (m["num_experts"] - m["num_experts_per_tok"]) // m["num_experts"]


def flops_per_token(tensors: list[Tensor], m: dict, seq_len: int) -> float:
    """Training FLOPs per token (PaLM, Chowdhery et al. 2022, app. B), as KilnForCausalLM's
    `flops_per_token`: 6 x the active matmul parameters (embedding tables excluded, a tied LM head
    counted) + 12 x layers x heads x head_dim x seq_len for attention."""
    n = active_parameters(tensors, m)
    n -= sum(t.numel for t in tensors if t.name.startswith(("model.embed_tokens", "model.embed_positions")))
    if m["tie_word_embeddings"] and not any(t.name == "score.weight" for t in tensors):
        n += next(t.numel for t in tensors if t.name == "model.embed_tokens.weight")
    h, heads = m["hidden_size"], m["num_attention_heads"]
    return 6.0 * n + 12.0 * m["num_hidden_layers"] * heads * (h // heads) * seq_len


@dataclass(frozen=True)
class Setup:
    """How a model is trained: the placement keys of a training stage's section, and its batch."""

    world: int
    zero_stage: int
    precision: str
    micro_batch_size: int
    grad_accum: int
    seq_len: int
    grad_reduce_dtype: str = "fp32"  # what the gradients are reduced in (bf16/fp16 training)
    overlap_comm: bool = True  # DeepSpeed's overlap_comm (kiln/training.py: on for every backend)
    activation_checkpointing: bool = False
    offload_optimizer: bool = False
    offload_params: bool = False
    persistence_threshold: int = 100_000  # DeepSpeed's stage3_param_persistence_threshold default
    max_reuse_distance: int = 1_000_000_000  # stage3_max_reuse_distance default
    prefetch_bucket_size: int = 50_000_000  # stage3_prefetch_bucket_size default
    shard_within: int = 0  # ZeRO++ hpZ: a second copy of the weights sharded within groups of this many ranks
    expert_parallel: int = 1  # ranks that split each MoE layer's experts (pretrain.expert_parallel)
    top_k: int = 0  # experts per token: the rows of expert parallelism's all-to-all


@dataclass
class Cost:
    """Per rank, per optimizer step (bytes)."""

    memory: dict[str, int] = field(default_factory=dict)  # on the accelerator, by kind
    host_memory: dict[str, int] = field(default_factory=dict)  # offloaded to CPU memory
    comm: dict[str, int] = field(default_factory=dict)  # tensor bytes, by collective
    wire: int = 0  # bytes each rank sends (ring algorithms)

    def add(self, other: Cost) -> Cost:
        for mine, theirs in ((self.memory, other.memory), (self.host_memory, other.host_memory), (self.comm, other.comm)):  # fmt: skip
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        self.wire += other.wire
        return self


def training_cost(tensors: list[Tensor], s: Setup, trainable: int | None = None) -> Cost:
    """Memory and communication of one model trained by a DeepSpeed engine (module docstring).
    `trainable`: parameters with gradients and optimizer state (LoRA: the adapters); default all."""
    psi = sum(t.numel for t in tensors)
    train = psi if trainable is None else trainable
    n, z, b = s.world, s.zero_stage, BYTES[s.precision]
    bg = BYTES[s.grad_reduce_dtype] if s.precision != "fp32" else 4
    P = s.expert_parallel
    if P > 1 and (trainable is not None or z not in (1, 2) or n % P):
        raise ValueError("expert parallelism: every parameter trained, ZeRO-1/2, P dividing the world size")
    experts = sum(t.numel for t in tensors if t.expert) if P > 1 else 0
    held = psi - experts + experts // P  # what a rank holds: E/P of the experts
    cost = Cost()
    where = cost.host_memory if s.offload_params else cost.memory
    where["weights"] = b * (psi // n if z == 3 else held)
    # ZeRO-1 reduces once per step: under accumulation it holds every gradient until then; without,
    # DeepSpeed (one optimizer for stages 1 and 2) keeps only this rank's partition, as ZeRO-2 does
    # (an expert's partition is 1 / (N/P) of the E/P experts held: 1/N of them, as without P)
    partitioned = z >= 2 or (z == 1 and s.grad_accum == 1)
    cost.memory["gradients"] = b * train // n if partitioned else b * (held if trainable is None else train)
    opt = cost.host_memory if s.offload_optimizer else cost.memory
    opt["optimizer"] = (8 if s.precision == "fp32" else 12) * held if z == 0 else 12 * train // n
    a = s.grad_accum
    if n == 1:
        return cost
    if P > 1:
        _expert_parallel_comm(cost, tensors, s, train - experts, experts // P)
        cost.wire = int(sum(_wire(k, v, s) for k, v in cost.comm.items()))
        return cost
    if z <= 1:
        cost.comm["all_reduce"] = bg * train
        if z == 1:
            cost.comm["all_gather"] = b * train
    elif z == 2:
        cost.comm["all_reduce"] = a * bg * train
        cost.comm["all_gather"] = b * train
    else:
        persistent = sum(t.numel for t in tensors if t.numel <= s.persistence_threshold)
        gathered = psi - persistent
        # persistent parameters are gathered once per step (after the update), the others at every
        # micro-step, and again in backward when they were released after forward
        cost.comm["all_gather"] = b * persistent + a * b * gathered
        if regathered := a * b * _regathered(tensors, s):  # with hpZ from the copy inside the group
            key = "all_gather_within_group" if s.shard_within else "all_gather"
            cost.comm[key] = cost.comm.get(key, 0) + regathered
        if s.shard_within:
            cost.memory["hpz_copy"] = b * psi // s.shard_within
        cost.comm["reduce_scatter"] = a * bg * train
        cost.memory["zero3_gathered"] = b * min(
            gathered, 2 * _largest_layer(tensors) + s.prefetch_bucket_size
        )
    cost.wire = int(sum(_wire(k, v, s) for k, v in cost.comm.items()))
    return cost


def _expert_parallel_comm(cost: Cost, tensors: list[Tensor], s: Setup, shared: int, held: int) -> None:
    """ZeRO-1/2's reductions and gathers under expert parallelism: the shared parameters' over the N ranks, a
    rank's E/P experts' over the N/P holding them (none in a group of one); and the MoE layers' all-to-alls."""
    a, b = s.grad_accum, BYTES[s.precision]
    bg = BYTES[s.grad_reduce_dtype] if s.precision != "fp32" else 4
    reductions = a if s.zero_stage == 2 else 1
    cost.comm["all_reduce"] = reductions * bg * shared
    cost.comm["all_gather"] = b * shared
    if s.world // s.expert_parallel > 1:
        cost.comm["all_reduce_expert_data"] = reductions * bg * held
        cost.comm["all_gather_expert_data"] = b * held
    cost.comm["all_to_all"] = a * all_to_all_bytes(tensors, s)


def all_to_all_bytes(tensors: list[Tensor], s: Setup) -> int:
    """Tensor bytes one rank's MoE layers put into expert parallelism's all-to-alls per micro-step (module
    docstring): per MoE layer 4 exchanges of its micro_batch_size x seq_len x top_k rows (6 with activation
    checkpointing, whose recomputed forward exchanges again) and 1 (2) of the (E,) int64 counts."""
    layers = {t.layer: t.shape for t in tensors if t.expert and t.name.endswith(".up_proj")}  # (E, F, C)
    if s.expert_parallel == 1 or not layers:
        return 0
    forwards = 2 if s.activation_checkpointing else 1
    rows = s.micro_batch_size * s.seq_len * s.top_k
    b = BYTES[s.precision]
    return sum(2 * (forwards + 1) * rows * C * b + forwards * E * 8 for E, _, C in layers.values())


def _wire(collective: str, size: int, s: Setup) -> float:
    """Bytes a rank sends for a collective over `size` tensor bytes (ring algorithms; an all-to-all: the share
    of its rows bound for the other ranks of its group under an even routing)."""
    n = {
        "all_gather_within_group": s.shard_within,
        "all_to_all": s.expert_parallel,
        "all_reduce_expert_data": s.world // s.expert_parallel,
        "all_gather_expert_data": s.world // s.expert_parallel,
    }.get(collective, s.world)
    return size * (n - 1) / n * (2 if collective.startswith("all_reduce") else 1)


def _largest_layer(tensors: list[Tensor]) -> int:
    per: dict = {}
    for t in tensors:
        per[t.layer] = per.get(t.layer, 0) + t.numel
    return max(per.values())


def _regathered(tensors: list[Tensor], s: Setup) -> int:
    """ZeRO-3 parameters gathered again in backward: those released after forward because their
    next use (after every later parameter's forward and backward fetch) is further away than both
    `max_reuse_distance` and the prefetch bucket keep parameters (in elements)."""
    keep = max(s.max_reuse_distance, s.prefetch_bucket_size)
    big = [t for t in tensors if t.numel > s.persistence_threshold]
    out, after = 0, 0
    for t in reversed(big):  # backward visits the model in reverse
        if 2 * after >= keep:
            out += t.numel
        after += t.numel
    return out


def activation_bytes(m: dict, s: Setup, vocab_size: int) -> int:
    """An estimate of the activations one micro-batch keeps for backward: per token and layer the
    norms' inputs (2h), attention's q/k/v/output (2h + 2·kv + h), the feed-forward's input and hidden
    tensors (4f for SwiGLU, 2f for GELU; x top-k per MoE layer); with activation checkpointing only
    each layer's input (h) plus one layer recomputed; and the logits with their fp32 loss copy."""
    h, L = m["hidden_size"], m["num_hidden_layers"]
    kv = m["num_key_value_heads"] * (h // m["num_attention_heads"])
    f_dense = m["intermediate_size"]
    f_expert = m["moe_intermediate_size"] or f_dense
    per_hidden = 4 if m["activation"] == "swiglu" else 2
    layers = []
    for i in range(L):
        moe = m["num_experts"] > 0 and (i + 1) % m["moe_every"] == 0
        ffn = (
            (m["num_experts_per_tok"] * (per_hidden * f_expert + 2 * h) + m["num_experts"])
            if moe
            else per_hidden * f_dense
        )
        layers.append(2 * h + 3 * h + 2 * kv + h + ffn)
    tokens, b = s.micro_batch_size * s.seq_len, BYTES[s.precision]
    kept = L * h + max(layers) if s.activation_checkpointing else sum(layers)
    return tokens * (kept * b + vocab_size * (b + 4))


@dataclass(frozen=True)
class Hardware:
    """An accelerator, as `hardware:` in the config describes it."""

    name: str
    peak_tflops: float  # dense bf16/fp16 per accelerator
    memory_gib: float
    gpus_per_node: int
    intra_node_gbs: float  # collective bus bandwidth inside a node, GB/s (nccl-tests busbw)
    inter_node_gbs: float  # the same across nodes


def step_time(flops: float, cost: Cost, s: Setup, hw: Hardware) -> dict:
    """Lower bounds on a step's compute and communication time, and the MFU they allow.

    Communication hides behind the compute it can overlap (with `overlap_comm`): a gradient
    reduction behind backward (ZeRO-0 and 1 reduce in the last micro-step's backward only, ZeRO-2
    and 3 in every one), ZeRO-3's gathers behind forward and backward (prefetching); the weights'
    all-gather after a ZeRO-1/2 step has nothing to hide behind. What is not hidden adds to the step."""
    compute = flops * (4 / 3 if s.activation_checkpointing else 1) / (s.world * hw.peak_tflops * 1e12)
    backward = compute * (3 / 4 if s.activation_checkpointing else 2 / 3)  # its share of the step
    across = s.world > hw.gpus_per_node

    def bandwidth(collective: str) -> float:
        inside = not across or (
            (collective == "all_gather_within_group" and s.shard_within <= hw.gpus_per_node)
            or (collective == "all_to_all" and s.expert_parallel <= hw.gpus_per_node)  # consecutive ranks
        )
        return (hw.intra_node_gbs if inside else hw.inter_node_gbs) * 1e9

    secs = {k: _wire(k, v, s) / bandwidth(k) for k, v in cost.comm.items()}
    comm = sum(secs.values())
    if not s.overlap_comm:
        exposed = comm
    elif s.zero_stage == 3:
        exposed = max(0.0, comm - compute)
    else:
        # the all-to-alls sit between a MoE layer's router and its experts: nothing overlaps them
        reduce_window = backward / s.grad_accum if s.zero_stage <= 1 else backward
        reduce = secs.get("all_reduce", 0.0) + secs.get("all_reduce_expert_data", 0.0)
        gather = secs.get("all_gather", 0.0) + secs.get("all_gather_expert_data", 0.0)
        exposed = max(0.0, reduce - reduce_window) + gather + secs.get("all_to_all", 0.0)
    step = compute + exposed
    mfu = flops / (step * s.world * hw.peak_tflops * 1e12) if step > 0 else 0.0
    return {"compute_s": compute, "comm_s": comm, "exposed_comm_s": exposed, "step_time_s": step, "mfu": mfu}
