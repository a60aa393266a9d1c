"""Kiln's GPT decoder: one readable file, a `transformers` model so TRL, `AutoModel…` and `generate()` work.

    from kiln.model import KilnForCausalLM, build_config
    model = KilnForCausalLM(build_config(cfg.model, vocab_size=16000, pad_token_id=0, eos_token_id=1))
    out = model(input_ids, labels=input_ids)          # out.loss, out.lm_loss, out.aux_loss, out.z_loss, out.moe_stats
    model.save_pretrained(d); AutoModelForCausalLM.from_pretrained(d)   # after `import kiln.model`

Architecture: pre-norm blocks (RMSNorm or LayerNorm); attention with `num_key_value_heads` (MHA / GQA / MQA)
through `F.scaled_dot_product_attention`; positions by RoPE (Su et al. 2021), ALiBi (Press et al. 2021) or a
learned table; feed-forward dense (SwiGLU or GELU) or a top-k mixture of experts on every `moe_every`-th layer.

Router losses, decided once here and nowhere else:
- Each MoE layer computes, only when router outputs are requested (`output_router_logits`, which `build_config`
  turns on for MoE models), the raw load-balancing loss (Switch Transformer, Fedus et al. 2021 eq. 4, counting all
  k choices as HF Mixtral does) and the raw router z-loss (ST-MoE, Zoph et al. 2022 eq. 5). The model averages
  them over the MoE layers and returns them UNWEIGHTED as `aux_loss` and `z_loss`.
- `KilnForCausalLM(..., labels=...)` returns `lm_loss` (cross-entropy only) and
  `loss = lm_loss + router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss`: each term exactly once, like
  `MixtralForCausalLM` (which adds its aux term to `loss` when labels are given). A training loop uses `out.loss`
  as is; one that wants other weights starts from `out.lm_loss`, never from `out.loss`.
- TRL's fused-LM-head path bypasses this forward: it calls the backbone (`model.model`), reads `router_logits`
  and adds `router_aux_loss_coef * load_balancing_loss_func(...)` itself (no z-loss there) - still once.
- `generate()` never asks for router outputs (`prepare_inputs_for_generation` forces `output_router_logits=False`).
Dense models have `router_aux_loss_coef = router_z_loss_coef = 0` and never return router outputs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import MergeModulelist, WeightConverter
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from kiln.grouped_mm import grouped_mm
from kiln.model_fields import HF_NAMES, hf_values, model_problems

if TYPE_CHECKING:
    from pipeline.config import ModelConfig

# ---------------------------------------------------------------------------------------------------- config


class KilnConfig(PreTrainedConfig):
    """Hyper-parameters of the decoder. Standard `transformers` names where one exists (so generation, TRL and
    DeepSpeed's auto-sizing read them); `build_config` maps the pipeline's `model:` section onto them."""

    model_type = "kiln"

    vocab_size: int = 16000
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4  # == heads: MHA; 1: MQA; in between: GQA (Ainslie et al. 2023)
    intermediate_size: int = 1024  # dense feed-forward hidden size
    activation: str = "swiglu"  # "swiglu" (Shazeer 2020) | "gelu"
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    norm_eps: float = 1e-5
    position: str = "rope"  # "rope" | "alibi" | "learned"
    rope_theta: float = 10000.0
    max_position_embeddings: int = 1024  # size of the learned table; RoPE and ALiBi extrapolate past it
    num_experts: int = 0  # 0: dense everywhere
    num_experts_per_tok: int = 2  # top-k; 1 = Switch Transformer
    moe_every: int = 1  # MoE on layers i with (i + 1) % moe_every == 0
    moe_intermediate_size: int | None = None  # expert hidden size, None = intermediate_size
    capacity_factor: float | None = None  # None: no limit; else capacity = ceil(cf * tokens * k / experts)
    router_aux_loss_coef: float = 0.0  # weight of aux_loss in `loss` (and TRL's name for it)
    router_z_loss_coef: float = 0.0  # weight of z_loss in `loss`
    output_router_logits: bool = (
        False  # MoE layers return router logits, raw losses and stats (training only)
    )
    tie_word_embeddings: bool = False  # LM head shares the token embedding matrix
    initializer_range: float = 0.02  # init std; residual-stream outputs get std / sqrt(2 * n_layers)
    dropout: float = 0.0  # on embeddings, attention probabilities and both residual branches
    bias: bool = False  # biases in attention and feed-forward linears and in LayerNorm
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self, **kwargs):
        errors = []
        for key, allowed in (("activation", ("swiglu", "gelu")), ("norm", ("rmsnorm", "layernorm")),
                             ("position", ("rope", "alibi", "learned"))):  # fmt: skip
            if getattr(self, key) not in allowed:
                errors.append(f"{key}: {getattr(self, key)!r} is not one of {allowed}")
        # The cross-field rules, the same ones the pipeline's ModelConfig.check() reports under its YAML keys.
        problems = model_problems({hf: getattr(self, hf) for hf in HF_NAMES.values()})
        errors += [f"{key}: {message}" for key, message in problems.items()]
        if errors:
            raise ValueError("invalid KilnConfig: " + "; ".join(errors))
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts > 0 and (i + 1) % self.moe_every == 0


def build_config(
    model: ModelConfig, vocab_size: int, pad_token_id: int, eos_token_id: int, bos_token_id: int | None = None
) -> KilnConfig:
    """The pipeline's `model:` section (pipeline/config.py's ModelConfig) -> KilnConfig, through the one table of
    names (kiln/model_fields.py); the tokenizer gives the vocabulary size and the special token ids."""
    values = hf_values(model)
    moe = values["num_experts"] > 0
    if not moe:
        # A dense model keeps both coefficients at 0 so TRL's aux-loss path stays off (TRL turns it on
        # for a config with output_router_logits and a non-zero router_aux_loss_coef).
        values.update(router_aux_loss_coef=0.0, router_z_loss_coef=0.0)
    return KilnConfig(
        **values,
        output_router_logits=moe,
        vocab_size=vocab_size,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )


# ---------------------------------------------------------------------------------------------------- positions


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float):
    """RoPE (Su et al. 2021) angles pos * theta^(-2i/d), laid out NeoX-style (two halves), as HF Llama does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # rotate pairs (i, i + D/2)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]  # cos, sin (B, 1, T, D) broadcast over heads


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Head slopes of ALiBi (Press et al. 2021): the geometric sequence 2^(-8/n), 2^(-16/n), ... for n a power of
    two; otherwise the slopes of the closest lower power of two m, then every other slope of 2m (their code)."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    m = 2 ** math.floor(math.log2(n_heads))
    slopes = power_of_two(m) + power_of_two(2 * m)[0::2][: n_heads - m]
    return torch.tensor(slopes)


def attention_mask_4d(attention_mask, q_len: int, past: int, slopes, dtype, device) -> torch.Tensor:
    """The SDPA mask for what `is_causal` cannot express (padding, a cache offset, ALiBi): a boolean "may attend"
    (B|1, 1, T, S), or with ALiBi slopes (H,) a float bias (B|1, H, T, S) with -inf where masked.
    attention_mask: (B, S) 1 = real token, or None."""
    kv_len = past + q_len
    q_idx = torch.arange(past, kv_len, device=device)[:, None]  # (T, 1) absolute index in the cache
    k_idx = torch.arange(kv_len, device=device)[None, :]  # (1, S)
    allowed = (k_idx <= q_idx)[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        # A padded query (left padding) would see no key at all and SDPA would return NaN: let it see itself.
        keys = attention_mask[:, None, None, -kv_len:].bool()  # (B, 1, 1, S)
        allowed = allowed & (keys | (k_idx == q_idx))  # (B, 1, T, S)
    if slopes is None:
        return allowed
    # ALiBi: score += -m * (i - j). Index distance == position distance for the real tokens, which are contiguous
    # under left or right padding, so a padded batch and the KV cache give the same biases as one plain sequence.
    bias = (slopes.to(device)[:, None, None] * (k_idx - q_idx)).to(dtype)  # (H, T, S), built in fp32
    return bias[None].masked_fill(~allowed, float("-inf"))  # (B|1, H, T, S)


# ---------------------------------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """x / rms(x) * g (Zhang & Sennrich 2019); in fp32 like HF Llama, so bf16 training stays stable."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(config: KilnConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.hidden_size, config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.bias)


class Attention(nn.Module):
    def __init__(self, config: KilnConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # the KV cache slot
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        # Separate q, k, v matmuls (Llama's layout): fusing them measured no faster on CPU, and splitting the
        # fused output costs strided views forward and a concatenation backward.
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=config.bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=config.bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv * self.head_dim, bias=config.bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=config.bias)
        self.o_proj.residual_output = True  # scaled init (KilnPreTrainedModel._init_weights)
        self.dropout = config.dropout

    def forward(self, x, rope, mask, cache):
        B, T, _ = x.shape  # (B, T, C)
        D = self.head_dim
        q = self.q_proj(x).view(B, T, self.n_heads, D).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv, D).transpose(1, 2)  # (B, KV, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv, D).transpose(1, 2)  # (B, KV, T, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, KV, S, D): every key so far
        rep = self.n_heads // self.n_kv  # GQA / MQA: each kv head serves `rep` query heads
        dropout = self.dropout if self.training else 0.0
        if T == 1:
            # Decoding one token: fold the query heads that share a kv head into the query axis, (B, KV, rep, D),
            # and attend with no causal mask. SDPA's CPU kernels are ~20x slower on a 1-row query with
            # enable_gqa or repeated kv (measured); HF does the same fold (`pack_gqa`).
            if mask is not None and mask.shape[1] > 1:  # ALiBi bias (B|1, H, 1, S) -> (B|1, KV, rep, S)
                mask = mask.reshape(mask.shape[0], self.n_kv, rep, -1)
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv, rep, D), k, v, mask, dropout)
            y = y.reshape(B, self.n_heads, 1, D)  # (B, H, 1, D)
        else:
            if rep > 1 and mask is not None:  # with a mask, not every SDPA backend takes enable_gqa
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, S, D)
            # mask None: plain causal attention, the case FlashAttention kernels take.
            gqa = rep > 1 and mask is None
            y = F.scaled_dot_product_attention(q, k, v, mask, dropout, is_causal=mask is None, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * D)  # (B, T, H*D)
        return F.dropout(self.o_proj(y), self.dropout, self.training)


class MLP(nn.Module):
    """Dense feed-forward, also the body of one expert: down(silu(gate(x)) * up(x)) for SwiGLU (Shazeer 2020),
    down(gelu(up(x))) for GELU. Llama's names and layout."""

    def __init__(self, config: KilnConfig, hidden: int):
        super().__init__()
        C, swiglu = config.hidden_size, config.activation == "swiglu"
        self.gate_proj = nn.Linear(C, hidden, bias=config.bias) if swiglu else None
        self.up_proj = nn.Linear(C, hidden, bias=config.bias)
        self.down_proj = nn.Linear(hidden, C, bias=config.bias)
        self.down_proj.residual_output = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C) or (B, T, C)
        if self.gate_proj is None:
            return self.down_proj(F.gelu(self.up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # hidden (.., F) -> (.., C)


def load_balancing_loss(probs, top_idx, token_mask=None):
    """Switch Transformer eq. 4 (Fedus et al. 2021): E * sum_e f_e * P_e, f_e = fraction of tokens whose top-k holds
    expert e, P_e = mean router probability of e. With k > 1, f sums to k (HF Mixtral's count), so a uniform router
    scores k and a collapsed one E*k. probs (N, E), top_idx (N, k), token_mask (N,) 1 = real token."""
    n_experts = probs.shape[-1]
    w = torch.ones(probs.shape[0], device=probs.device) if token_mask is None else token_mask.float()
    chosen = torch.zeros_like(probs).scatter_(1, top_idx, 1.0)  # (N, E) 1 where routed
    f = (chosen * w[:, None]).sum(0) / w.sum()  # (E,)
    p = (probs * w[:, None]).sum(0) / w.sum()  # (E,)
    return n_experts * (f * p).sum()


def router_z_loss(logits, token_mask=None):
    """ST-MoE eq. 5 (Zoph et al. 2022): mean over tokens of logsumexp(router logits)^2; keeps logits small."""
    z = torch.logsumexp(logits.float(), dim=-1).pow(2)  # (N,)
    if token_mask is None:
        return z.mean()
    return (z * token_mask).sum() / token_mask.sum()


def route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router logits (N, E) -> probs (N, E) in fp32 (Switch Transformer §2.4), top-k weights and experts (N, k).
    k > 1: the k weights renormalised to sum to 1 (Mixtral). k = 1: the raw probability, as Switch Transformer
    eq. 2 - renormalising would make it exactly 1 and the router would get no gradient through the output."""
    probs = logits.float().softmax(dim=-1)
    top_p, top_idx = probs.topk(k, dim=-1)
    if k > 1:
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)
    return probs, top_p, top_idx


def dispatch(top_idx: torch.Tensor, n_experts: int, capacity: int | None):
    """Group the (token, choice) assignments by expert, dropping those over `capacity`.

    Assignments are flattened choice-major (index a = choice * N + token) and sorted stably by expert, so each
    expert holds all first choices before any second choice, each in token order: a capacity limit drops the
    lowest-priority assignments first (GShard, Lepikhin et al. 2020). Returns `kept` (S,) flat assignment indices
    grouped by expert, `counts` (E,) kept per expert and `routed` (E,) the assignments per expert before the
    capacity limit, all on the device. Without a capacity nothing waits for the host and every shape is fixed
    (S = k * N). With one, the kept assignments are a data-dependent number: selecting them is the one host sync
    (and, under torch.compile, the one graph break) the capacity rule needs."""
    flat_expert = top_idx.t().reshape(-1)  # (k*N,)
    order = torch.argsort(flat_expert, stable=True)  # (k*N,)
    routed = torch.zeros(n_experts, dtype=torch.long, device=top_idx.device)
    routed.index_add_(0, flat_expert, torch.ones_like(flat_expert))  # (E,), a bincount of fixed size
    if capacity is None:
        return order, routed, routed
    first = torch.cumsum(routed, 0) - routed  # (E,) where each expert's group starts in `order`
    rank = torch.arange(order.numel(), device=order.device) - first[flat_expert[order]]  # place in its group
    kept = order[rank < capacity]  # (S,) overflow adds nothing: the token rides the residual stream
    return kept, routed.clamp(max=capacity), routed


class Experts(nn.Module):
    """Every expert's MLP at once, its weights stacked: `gate_proj`, `up_proj` (E, F, C) and `down_proj` (E, C, F),
    each expert's matrix in nn.Linear's (out, in) layout (as transformers 5 holds Mixtral's experts); biases
    `*_bias` (E, out). The rows, sorted by expert, go through one grouped matmul per projection
    (kiln/grouped_mm.py). Checkpoints keep the per-expert layout (`experts.{e}.up_proj.weight`, what Mixtral and
    Qwen-MoE files hold): `CHECKPOINT_CONVERSION` below stacks them on load and splits them on save."""

    def __init__(self, config: KilnConfig, hidden: int):
        super().__init__()
        E, C = config.num_experts, config.hidden_size
        shapes = {"up_proj": (hidden, C), "down_proj": (C, hidden)}
        if config.activation == "swiglu":
            shapes = {"gate_proj": (hidden, C), **shapes}
        for name in ("gate_proj", "up_proj", "down_proj"):
            n_out, n_in = shapes.get(name, (0, 0))
            self.register_parameter(
                name, nn.Parameter(torch.empty(E, n_out, n_in)) if name in shapes else None
            )
            bias = nn.Parameter(torch.empty(E, n_out)) if name in shapes and config.bias else None
            self.register_parameter(f"{name}_bias", bias)
        self._draw_as_linear_layers()

    @torch.no_grad()
    def _draw_as_linear_layers(self) -> None:
        """nn.Linear's own init (`reset_parameters`), expert by expert, gate, up then down: the numbers one layer
        per projection and expert drew when built. `_init_weights` overwrites them; drawing them keeps the
        generator where it was, so a seed still gives the model it gave before the experts were stacked."""
        for e in range(self.up_proj.shape[0]):
            for name in ("gate_proj", "up_proj", "down_proj"):
                if (w := getattr(self, name)) is None:
                    continue
                nn.init.kaiming_uniform_(w[e], a=math.sqrt(5))
                if (b := getattr(self, f"{name}_bias")) is not None:
                    bound = 1 / math.sqrt(w.shape[2])
                    nn.init.uniform_(b[e], -bound, bound)

    def _project(self, name: str, xs, offs, expert_of_row):
        w, b = getattr(self, name), getattr(self, f"{name}_bias")
        # a custom op is not autocast-aware: cast here as autocast casts F.linear's operands
        if torch.is_autocast_enabled(xs.device.type):
            dtype = torch.get_autocast_dtype(xs.device.type)
            xs, w, b = xs.to(dtype), w.to(dtype), None if b is None else b.to(dtype)
        h = grouped_mm(xs, w.transpose(1, 2), offs)  # (S, in) -> (S, out)
        return h if b is None else h + b[expert_of_row]

    def forward(self, xs: torch.Tensor, counts: torch.Tensor, expert_of_row: torch.Tensor) -> torch.Tensor:
        """xs (S, C) rows grouped by expert, counts (E,) rows per expert, expert_of_row (S,) -> (S, C)."""
        offs = torch.cumsum(counts, 0).to(torch.int32)  # (E,) where each expert's rows end
        h = self._project("up_proj", xs, offs, expert_of_row)  # (S, F)
        if self.gate_proj is not None:
            h = F.silu(self._project("gate_proj", xs, offs, expert_of_row)) * h
        else:
            h = F.gelu(h)
        return self._project("down_proj", h, offs, expert_of_row)  # (S, C)


class MoE(nn.Module):
    """Top-k mixture of experts: route, sort the assignments by expert, all experts in grouped matmuls, weighted
    scatter-add back to the tokens. Dropless (no `capacity_factor`), nothing in it waits for the host (but for
    the split sizes of the token exchange under expert parallelism, kiln/expert_parallel.py)."""

    def __init__(self, config: KilnConfig):
        super().__init__()
        self.k, self.n_experts = config.num_experts_per_tok, config.num_experts
        self.capacity_factor = config.capacity_factor
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = Experts(config, config.moe_intermediate_size or config.intermediate_size)
        # An expert-parallel process group and the exchange of rows with it, set by kiln/expert_parallel.py's
        # `shard_experts` (which also cuts `experts` to this rank's E/P): rows then go to the ranks holding their
        # experts. None: every expert here.
        self.expert_parallel = None
        self.exchange = None

    def capacity(self, n_tokens: int) -> int | None:
        """Switch Transformer eq. 3, with k slots per token: ceil(capacity_factor * tokens * k / experts)."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * n_tokens * self.k / self.n_experts)

    def forward(self, x, token_mask, router_outputs: bool):
        B, T, C = x.shape
        x = x.reshape(-1, C)  # (N, C)
        N = x.shape[0]
        logits = self.router(x)  # (N, E)
        probs, top_p, top_idx = route(logits, self.k)  # (N, E), (N, k), (N, k)
        kept, counts, routed = dispatch(top_idx, self.n_experts, self.capacity(N))  # (S,), (E,), (E,)
        token = kept % N  # (S,) the token of each kept assignment, grouped by expert
        weight = top_p.t().reshape(-1)[kept]  # (S,) its gate weight
        expert_of_row = top_idx.t().reshape(-1)[kept]  # (S,)
        if self.expert_parallel is None:
            y = self.experts(x[token], counts, expert_of_row)  # (S, C)
        else:
            y = self.exchange(self.experts, x[token], counts, self.expert_parallel)  # (S, C) by their ranks
        y = (y * weight[:, None]).to(x.dtype)  # under autocast y is bf16 while x stays fp32
        out = torch.zeros_like(x).index_add_(0, token, y)  # (N, C)
        out = out.view(B, T, C)
        if not router_outputs:
            return out, None, None, None, None, None

        aux = load_balancing_loss(probs, top_idx, token_mask)
        z = router_z_loss(logits, token_mask)
        load = routed.float() / routed.sum()  # (E,) share of assignments, before capacity
        dropped = 1.0 - kept.shape[0] / (N * self.k)  # share of (token, expert) assignments over capacity
        return out, logits, aux, z, load, logits.new_tensor(dropped, dtype=torch.float32)


CHECKPOINT_CONVERSION = [
    WeightConverter(
        f"ffn.experts.*.{name}.{kind}", f"ffn.experts.{name}{suffix}", operations=[MergeModulelist(dim=0)]
    )
    for name in ("gate_proj", "up_proj", "down_proj")
    for kind, suffix in (("weight", ""), ("bias", "_bias"))
]
"""Checkpoint files hold each expert's projections apart (`model.layers.1.ffn.experts.3.up_proj.weight`, as Kiln
wrote them before the experts were stacked, and as Mixtral and Qwen-MoE files do); transformers applies this on
`from_pretrained` (stacking them into `ffn.experts.up_proj`) and its reverse on `save_pretrained`."""

STACKED_EXPERTS = re.compile(r"^(.*\bffn\.experts)\.(gate_proj|up_proj|down_proj)(_bias)?$")


def checkpoint_names(name: str, shape: tuple[int, ...]) -> list[str]:
    """The names a parameter of this shape has in a checkpoint file: its own, or for a stacked expert parameter
    one per expert (`...ffn.experts.up_proj` (E, F, C) -> `...ffn.experts.{e}.up_proj.weight` for e < E)."""
    m = STACKED_EXPERTS.match(name)
    if m is None:
        return [name]
    return [f"{m[1]}.{e}.{m[2]}.{'bias' if m[3] else 'weight'}" for e in range(shape[0])]


class Block(GradientCheckpointingLayer):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x)). GradientCheckpointingLayer lets
    `gradient_checkpointing_enable()` recompute it in backward (x must be passed positionally)."""

    def __init__(self, config: KilnConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer_idx)
        self.ffn_norm = make_norm(config)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.ffn = MoE(config) if self.is_moe else MLP(config, config.intermediate_size)
        self.dropout = config.dropout

    def forward(self, x, rope=None, mask=None, cache=None, token_mask=None, router_outputs=False):
        x = x + self.attn(self.attn_norm(x), rope, mask, cache)  # (B, T, C)
        if not self.is_moe:
            return x + F.dropout(self.ffn(self.ffn_norm(x)), self.dropout, self.training), None
        h, *router = self.ffn(self.ffn_norm(x), token_mask, router_outputs)
        return x + F.dropout(h, self.dropout, self.training), router


# ---------------------------------------------------------------------------------------------------- models


@dataclass
class KilnModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None  # (B, T, C) after the final norm
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None  # one (B*T, E) per MoE layer
    aux_loss: torch.Tensor | None = None  # raw load-balancing loss, mean over MoE layers (no coefficient)
    z_loss: torch.Tensor | None = None  # raw router z-loss, mean over MoE layers (no coefficient)
    moe_stats: dict | None = None  # expert_load (L_moe, E) share of assignments; dropped_frac (L_moe,)


@dataclass
class KilnCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None  # lm_loss + aux_coef * aux_loss + z_coef * z_loss
    logits: torch.Tensor | None = None  # (B, T, V)
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    moe_stats: dict | None = None


@dataclass
class KilnSequenceClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (B, num_labels), read at the last real token
    hidden_states: tuple[torch.Tensor, ...] | None = None


class KilnPreTrainedModel(PreTrainedModel):
    config_class = KilnConfig
    config: KilnConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def _init_weights(self, module):
        """GPT-2 / NeoX init: N(0, std) everywhere, residual-stream outputs N(0, std / sqrt(2 * n_layers)) so the
        residual variance does not grow with depth. `init.*` skips tensors loaded from a checkpoint."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear | nn.Embedding):
            if getattr(module, "residual_output", False):  # set on o_proj and down_proj
                std = std / math.sqrt(2 * self.config.num_hidden_layers)
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm | nn.LayerNorm):
            init.ones_(module.weight)
        elif isinstance(module, Experts):
            self._init_experts(module, std)
        if getattr(module, "bias", None) is not None:
            init.zeros_(module.bias)

    def _init_experts(self, experts: Experts, std: float) -> None:
        """Expert by expert, gate, up then down (down as a residual-stream output): the draws, in order, of one
        nn.Linear per projection and expert, so a stacked model starts from the values a per-expert one did."""
        projections = [(n, getattr(experts, n)) for n in ("gate_proj", "up_proj", "down_proj")]
        projections = [(n, w) for n, w in projections if w is not None]
        residual = std / math.sqrt(2 * self.config.num_hidden_layers)
        for e in range(self.config.num_experts):
            for name, w in projections:
                if not getattr(w, "_is_hf_initialized", False):  # loaded: kept (a slice has no flag)
                    init.normal_(w[e], mean=0.0, std=residual if name == "down_proj" else std)
        for name, _ in projections:
            if (b := getattr(experts, f"{name}_bias")) is not None:
                init.zeros_(b)

    def num_parameters_total(self) -> int:
        """Every parameter once (a tied matrix is one). `ds_numel`: the full size under DeepSpeed ZeRO-3; a MoE
        layer's experts all of them, also where expert parallelism leaves a rank E/P (kiln/expert_parallel.py)."""
        held = {id(p): n for n, p in self._stacked_experts()}
        return sum(held.get(id(p), getattr(p, "ds_numel", p.numel())) for p in self.parameters())

    def _stacked_experts(self):
        """(its size with all the layer's experts, the parameter) of each stacked expert parameter."""
        for module in self.modules():
            if isinstance(module, MoE):
                for p in module.experts.parameters():
                    n = getattr(p, "ds_numel", p.numel())
                    yield (n if module.expert_parallel is None else n // p.shape[0] * module.n_experts), p

    def num_parameters_active(self) -> int:
        """Parameters one token passes through: all but the (E - k) experts it is not routed to in each MoE layer."""
        c, inactive = self.config, 0
        held = {id(p): n for n, p in self._stacked_experts()}
        for module in self.modules():
            if isinstance(module, MoE):
                stacked = sum(held[id(p)] for p in module.experts.parameters())
                per_expert = stacked // c.num_experts
                inactive += (c.num_experts - c.num_experts_per_tok) * per_expert
        return self.num_parameters_total() - inactive

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token for MFU (PaLM, Chowdhery et al. 2022, app. B):
        6 * N + 12 * n_layers * n_heads * head_dim * seq_len, N = active parameters in matmuls (embedding tables excluded,
        the LM head included even when tied); the second term is attention's QK^T and AV over the full T x T
        (not halved for causality, as PaLM counts it)."""
        c = self.config
        n = self.num_parameters_active()
        backbone = self.model if hasattr(self, "model") else self
        n -= c.vocab_size * c.hidden_size  # the token table is a lookup, not a matmul ...
        if backbone.embed_positions is not None:
            n -= c.max_position_embeddings * c.hidden_size
        if c.tie_word_embeddings and isinstance(self, KilnForCausalLM):
            n += c.vocab_size * c.hidden_size  # ... but the tied LM head is one
        return 6.0 * n + 12.0 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len


class KilnModel(KilnPreTrainedModel):
    """The backbone: embeddings -> blocks -> final norm. TRL calls it directly (`model.base_model`)."""

    def __init__(self, config: KilnConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        learned = config.position == "learned"
        self.embed_positions = (
            nn.Embedding(config.max_position_embeddings, config.hidden_size) if learned else None
        )
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,  # (B, past + T), 1 = real token
        position_ids: torch.LongTensor | None = None,  # (B|1, T)
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> KilnModelOutput:
        c = self.config
        use_cache = (c.use_cache and not self.training) if use_cache is None else use_cache
        router_outputs = c.output_router_logits if output_router_logits is None else output_router_logits
        router_outputs = router_outputs and c.num_experts > 0
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        if use_cache and cache is None:
            cache = DynamicCache(config=c)
        past = cache.get_seq_length() if cache is not None else 0
        # No padding: take the fast causal path. A one-token step keeps its mask, (B, 1, 1, S), which costs
        # nothing, where the test would wait on the device at every decoded token (kiln/rl/rollout.py).
        if attention_mask is not None and attention_mask.dim() == 2 and T > 1 and bool(attention_mask.all()):
            attention_mask = None
        if position_ids is None:
            if attention_mask is not None:  # count real tokens only, so left padding works without the caller
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=x.device)[None]  # (1, T)

        rope = rope_cos_sin(position_ids, c.head_dim, c.rope_theta) if c.position == "rope" else None
        if rope is not None:
            rope = (rope[0].to(x.dtype), rope[1].to(x.dtype))
        if self.embed_positions is not None:
            x = x + self.embed_positions(position_ids)
        slopes = alibi_slopes(c.num_attention_heads) if c.position == "alibi" else None
        mask = None  # None: SDPA's is_causal (training, prefill without padding) or one query over the cache
        if attention_mask is not None or slopes is not None or (past > 0 and T > 1):
            mask = attention_mask_4d(attention_mask, T, past, slopes, x.dtype, x.device)
        token_mask = attention_mask[:, -T:].reshape(-1).float() if attention_mask is not None else None
        x = F.dropout(x, c.dropout, self.training)

        hidden, routers = [], []
        for block in self.layers:
            if output_hidden_states:
                hidden.append(x)
            x, router = block(
                x, rope=rope, mask=mask, cache=cache, token_mask=token_mask, router_outputs=router_outputs
            )
            if router is not None and router[0] is not None:
                routers.append(router)
        x = self.norm(x)
        if output_hidden_states:
            hidden.append(x)

        out = KilnModelOutput(last_hidden_state=x, cache=cache, hidden_states=tuple(hidden) or None)
        if routers:  # each: (logits (N, E), aux, z, load (E,), dropped)
            logits, aux, z, load, dropped = zip(*routers, strict=True)
            out.router_logits = logits
            out.aux_loss = torch.stack(aux).mean()
            out.z_loss = torch.stack(z).mean()
            out.moe_stats = {"expert_load": torch.stack(load).detach(), "dropped_frac": torch.stack(dropped)}
        return out


def causal_lm_loss(logits, labels, num_items_in_batch=None, shift_labels=None):
    """Next-token cross-entropy in fp32; labels -100 are ignored. `num_items_in_batch` (HF Trainer, gradient
    accumulation) divides the summed loss by the token count of the whole accumulated batch instead."""
    # Shift the labels, not the logits: slicing (B, T, V) logits costs a copy forward and a zero-filled
    # full-size gradient backward. The last position has no target and gets -100.
    if shift_labels is None:
        shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)
    targets = shift_labels.reshape(-1).to(logits.device)  # (B*T,)
    logits = logits.float().reshape(-1, logits.shape[-1])  # (B*T, V)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, targets, ignore_index=-100)
    return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") / num_items_in_batch


class KilnForCausalLM(KilnPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: KilnConfig):
        super().__init__(config)
        self.model = KilnModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> KilnCausalLMOutput:
        out = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            output_hidden_states=output_hidden_states,
        )
        h = out.last_hidden_state
        if logits_to_keep:  # generate() only needs the last position's logits
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)  # (B, T, V)
        loss = lm_loss = None
        if labels is not None or shift_labels is not None:
            # `shift_labels` (HF's name) are targets already aligned with the positions: packed
            # pretraining windows give every position its next token, the last one included.
            lm_loss = loss = causal_lm_loss(logits, labels, num_items_in_batch, shift_labels)
            if out.aux_loss is not None:  # each router term added exactly once (module docstring)
                c = self.config
                loss = lm_loss + c.router_aux_loss_coef * out.aux_loss + c.router_z_loss_coef * out.z_loss
        return KilnCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=out.cache,
            hidden_states=out.hidden_states,
            router_logits=out.router_logits,
            lm_loss=lm_loss,
            aux_loss=out.aux_loss,
            z_loss=out.z_loss,
            moe_stats=out.moe_stats,
        )

    def prepare_inputs_for_generation(self, *args, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        # Router outputs are a training signal; with a KV cache they also broke HF Mixtral's generate().
        inputs["output_router_logits"] = False
        return inputs


class KilnForSequenceClassification(KilnPreTrainedModel):
    """Reward / value model: the backbone plus a `score` head read at each sequence's last real token (HF Llama's
    pooling; the attention mask decides when given, else the pad id, so left and right padding both work)."""

    def __init__(self, config: KilnConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = KilnModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        per_token: bool = False,
        **kwargs,
    ) -> KilnSequenceClassifierOutput:
        """`per_token=True` returns the head's output at every position, (B, T, num_labels): PPO's
        value model reads one value per response token."""
        out = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            output_router_logits=False,  # a score needs no router loss (and RewardTrainer ignores one)
            output_hidden_states=output_hidden_states,
        )
        scores = self.score(out.last_hidden_state)  # (B, T, num_labels)
        if per_token:
            return KilnSequenceClassifierOutput(logits=scores, hidden_states=out.hidden_states)
        B, T = scores.shape[:2]
        if attention_mask is not None:
            real = attention_mask[:, -T:].bool()
        elif input_ids is not None and self.config.pad_token_id is not None:
            real = input_ids != self.config.pad_token_id
        else:
            real = torch.ones(B, T, dtype=torch.bool, device=scores.device)
        last = (torch.arange(T, device=scores.device) * real).argmax(-1)  # (B,) rightmost real token
        logits = scores[torch.arange(B, device=scores.device), last]  # (B, num_labels)
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels.view(-1))
        return KilnSequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)


# Registration at import (idempotent): `AutoModelForCausalLM.from_pretrained(dir)` works after `import kiln.model`.
AutoConfig.register("kiln", KilnConfig, exist_ok=True)
register_checkpoint_conversion_mapping("kiln", CHECKPOINT_CONVERSION, overwrite=True)
AutoModel.register(KilnConfig, KilnModel, exist_ok=True)
AutoModelForCausalLM.register(KilnConfig, KilnForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(KilnConfig, KilnForSequenceClassification, exist_ok=True)
