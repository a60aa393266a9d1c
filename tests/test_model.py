"""Numerics of kiln/model.py: parity with HF Llama / Mixtral, KV cache, positions, MoE routing and losses.

/work/venv/bin/pytest tests/test_model.py -x -q        # ~30 s on 2 cores
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import kiln.model as kiln
from kiln.model import (
    KilnConfig,
    KilnForCausalLM,
    KilnForSequenceClassification,
    alibi_slopes,
    attention_mask_4d,
    build_config,
    dispatch,
    load_balancing_loss,
    route,
    router_z_loss,
)
from kiln.model_fields import HF_NAMES, NOT_MAPPED, PIPELINE_NAMES, hf_values, model_problems, pipeline_key
from pipeline.config import ModelConfig
from tests.tiny_models import V, tiny

torch.set_num_threads(2)


def make(seed: int = 0, **overrides) -> KilnForCausalLM:
    torch.manual_seed(seed)
    return KilnForCausalLM(tiny(**overrides)).eval()


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padded(seed: int = 1):
    """3 prompts of lengths 7, 4 and 6, left-padded with 0; and their attention mask."""
    x = tokens(3, 7, seed)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    mask[2, :1] = 0
    return x.masked_fill(mask == 0, 0), mask


# ------------------------------------------------------------------------------------------- HF parity


def hf_twin(model: KilnForCausalLM):
    """An HF Llama (dense) or Mixtral (MoE) model with the Kiln model's weights, mapped here by hand (independent
    of kiln/hf_convert.py) into transformers 5's in-memory layout (Mixtral experts fused)."""
    c = model.config
    common = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings,
    )
    if c.num_experts:
        cfg = MixtralConfig(
            **common,
            intermediate_size=c.moe_intermediate_size or c.intermediate_size,
            num_local_experts=c.num_experts,
            num_experts_per_tok=c.num_experts_per_tok,
        )
        hf = MixtralForCausalLM(cfg)
    else:
        hf = LlamaForCausalLM(LlamaConfig(**common, intermediate_size=c.intermediate_size))
    sd = {}
    for name, t in model.state_dict().items():
        for a, b in ((".attn_norm.", ".input_layernorm."), (".attn.", ".self_attn."),
                     (".ffn_norm.", ".post_attention_layernorm."), (".ffn.router.", ".mlp.gate."), (".ffn.", ".mlp.")):  # fmt: skip
            name = name.replace(a, b)
        sd[name] = t
    for i in range(c.num_hidden_layers if c.num_experts else 0):  # Kiln stacks gate and up apart: fuse them
        e = f"model.layers.{i}.mlp.experts."
        sd[e + "gate_up_proj"] = torch.cat([sd.pop(e + "gate_proj"), sd.pop(e + "up_proj")], dim=1)
    hf.load_state_dict(sd, strict=True)
    return hf.eval()


@pytest.mark.parametrize("experts", [0, 4], ids=["llama", "mixtral"])
def test_logits_match_hf_llama_and_mixtral(experts):
    model = make(num_experts=experts, tie_word_embeddings=experts == 0)
    hf = hf_twin(model)
    x = tokens(2, 12)
    x_pad, mask = left_padded()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        assert (model(x).logits - hf(x).logits).abs().max() <= 1e-5
        ours = model(x_pad, attention_mask=mask, position_ids=pos).logits
        theirs = hf(x_pad, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()  # padded positions hold arbitrary values in both
    assert (ours[real] - theirs[real]).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("position", ["rope", "alibi", "learned"])
@pytest.mark.parametrize("experts", [0, 4], ids=["dense", "moe"])
def test_cached_generation_equals_full_forward_with_left_padding(position, experts):
    model = make(
        position=position,
        num_experts=experts,
        num_attention_heads=6,
        hidden_size=48,
        output_router_logits=True,
    )
    x, mask = left_padded()
    new = 8
    gen = dict(
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad():
        cached = model.generate(x, attention_mask=mask, **gen)
        uncached = model.generate(x, attention_mask=mask, use_cache=False, **gen)
        seq = cached.sequences
        full_mask = torch.cat([mask, torch.ones(3, new, dtype=mask.dtype)], dim=1)
        full = model(seq, attention_mask=full_mask).logits  # positions from the mask
        alone = [
            model.generate(x[b : b + 1, mask[b].bool()], max_new_tokens=new, do_sample=False)
            for b in range(3)
        ]
    assert torch.equal(seq, uncached.sequences)
    step_logits = torch.stack(cached.logits, dim=1)  # (B, new, V) from the cached steps
    assert (step_logits - full[:, x.shape[1] - 1 : -1]).abs().max() <= 1e-5
    for b in range(3):  # padding changes nothing: each prompt alone continues the same way
        assert torch.equal(alone[b][0, -new:], seq[b, -new:])


def test_sampling_with_and_without_cache_draws_the_same_tokens():
    model = make(num_experts=4)
    x, mask = left_padded()
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(123)
        runs.append(
            model.generate(
                x, attention_mask=mask, max_new_tokens=6, do_sample=True, top_p=0.9, use_cache=use_cache
            )
        )
    assert torch.equal(runs[0], runs[1])


# ------------------------------------------------------------------------------------------- positions


@pytest.mark.parametrize("position", ["rope", "alibi", "learned"])
@pytest.mark.parametrize("experts", [0, 4], ids=["dense", "moe"])
def test_changing_future_tokens_never_changes_earlier_logits(position, experts):
    model = make(position=position, num_experts=experts)
    x = tokens(2, 16)
    y = x.clone()
    y[:, 9:] = tokens(2, 7, seed=5)
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    assert (a[:, :9] - b[:, :9]).abs().max() <= 1e-6
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-3  # the test can see a change where one is due


def test_alibi_slopes_follow_press_et_al_including_non_power_of_two():
    # n a power of two: 2^(-8/n), its powers. n = 6: the 4-head slopes, then every other 8-head slope.
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert torch.allclose(alibi_slopes(4), torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]))
    expected_6 = [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
    assert torch.allclose(alibi_slopes(6), torch.tensor(expected_6))


def test_alibi_bias_is_minus_slope_times_distance_and_masks_the_future():
    slopes = alibi_slopes(6)
    bias = attention_mask_4d(None, q_len=5, past=0, slopes=slopes, dtype=torch.float32, device="cpu")
    assert bias.shape == (1, 6, 5, 5)
    for h in range(6):
        for i in range(5):
            for j in range(5):
                want = -slopes[h] * (i - j) if j <= i else float("-inf")
                assert bias[0, h, i, j] == pytest.approx(want)


def test_gqa_and_mqa_equal_multi_head_with_repeated_kv_weights():
    """n_kv_heads < n_heads must equal MHA whose kv heads are copies: query head h reads kv head h // (H / KV)."""
    for n_kv in (2, 1):
        gqa = make(num_key_value_heads=n_kv)
        mha = make(num_key_value_heads=4)
        state = gqa.state_dict()
        for name, t in state.items():
            if name.endswith(("k_proj.weight", "v_proj.weight")):
                D = 32 // 4
                state[name] = t.view(n_kv, D, 32).repeat_interleave(4 // n_kv, dim=0).reshape(4 * D, 32)
        mha.load_state_dict(state)
        x, mask = left_padded()
        with torch.no_grad():
            assert (gqa(x).logits - mha(x).logits).abs().max() <= 1e-5  # causal path (enable_gqa)
            a = gqa(x, attention_mask=mask).logits[mask.bool()]
            assert (a - mha(x, attention_mask=mask).logits[mask.bool()]).abs().max() <= 1e-5  # masked path
            gen = dict(attention_mask=mask, max_new_tokens=5, do_sample=False)
            assert torch.equal(gqa.generate(x, **gen), mha.generate(x, **gen))  # one-token decode path


# ------------------------------------------------------------------------------------------- MoE


def test_route_topk_weights_sum_to_one_and_switch_keeps_the_raw_probability():
    logits = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    probs, top_p, top_idx = route(logits, k=2)
    assert torch.allclose(top_p.sum(-1), torch.ones(10))
    assert torch.equal(top_idx, logits.topk(2).indices)
    probs, top_p, top_idx = route(logits, k=1)
    assert torch.allclose(top_p[:, 0], probs.max(-1).values)  # Switch: p_i(x), not 1


def test_dispatch_without_capacity_sends_each_token_to_exactly_k_distinct_experts():
    N, E, k = 50, 4, 2
    _, _, top_idx = route(torch.randn(N, E, generator=torch.Generator().manual_seed(1)), k)
    kept, counts, routed = dispatch(top_idx, E, capacity=None)
    token, expert = kept % N, top_idx.t().reshape(-1)[kept]
    assert torch.equal(torch.bincount(token, minlength=N), torch.full((N,), k))
    for n in range(N):
        assert len(set(expert[token == n].tolist())) == k
    assert torch.equal(counts, routed) and counts.sum() == N * k
    assert torch.equal(expert, torch.sort(expert).values)  # grouped by expert, as the expert loop reads it


def test_dispatch_capacity_drops_second_choices_before_first_choices():
    top_idx = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 2]])  # N=4 tokens, k=2; expert 0 gets 4 assignments
    kept, counts, routed = dispatch(top_idx, n_experts=3, capacity=2)
    assert routed.tolist() == [4, 3, 1] and counts.tolist() == [2, 2, 1]
    pairs = {(int(a) % 4, int(a) // 4) for a in kept}  # (token, choice)
    # expert 0: first choices of tokens 0, 1 (token 3's first choice and token 2's second choice dropped);
    # expert 1: token 2's first choice, then token 0's second (token 1's second dropped); expert 2: token 3.
    assert pairs == {(0, 0), (1, 0), (2, 0), (0, 1), (3, 1)}


def one_expert(experts, e, x):
    """Expert e's MLP on x (n, C) with plain F.linear on its slices of the stacked weights."""

    def linear(name, h):
        b = experts.get_parameter(f"{name}_bias")[e] if getattr(experts, f"{name}_bias") is not None else None
        return F.linear(h, getattr(experts, name)[e], b)

    if experts.gate_proj is None:
        return linear("down_proj", F.gelu(linear("up_proj", x)))
    return linear("down_proj", F.silu(linear("gate_proj", x)) * linear("up_proj", x))


def reference_moe(moe, x, capacity):
    """Token-by-token MoE with GShard priority (all first choices, then second choices, each in token order)."""
    probs, top_p, top_idx = route(moe.router(x), moe.k)
    out, used = torch.zeros_like(x), [0] * moe.n_experts
    for choice in range(moe.k):
        for n in range(x.shape[0]):
            e = int(top_idx[n, choice])
            if capacity is None or used[e] < capacity:
                used[e] += 1
                out[n] += top_p[n, choice] * one_expert(moe.experts, e, x[n : n + 1])[0]
    return out


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
@pytest.mark.parametrize("k", [1, 2])
def test_moe_layer_equals_a_token_by_token_reference(capacity_factor, k):
    model = make(num_experts=4, num_experts_per_tok=k, capacity_factor=capacity_factor, activation="gelu")
    moe = model.model.layers[0].ffn
    x = torch.randn(1, 24, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out, *_ = moe(x, None, router_outputs=False)
        want = reference_moe(moe, x[0], moe.capacity(24))
    assert (out[0] - want).abs().max() <= 1e-5


def test_tiny_capacity_drops_and_counts_overflow_tokens():
    model = make(num_experts=4, num_experts_per_tok=1, capacity_factor=1.0)
    moe = model.model.layers[0].ffn
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 1.0  # expert 0 wins for every token with x[..., 0] > 0
    x = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(3))
    x[..., 0] = 10.0
    with torch.no_grad():
        out, logits, aux, z, load, dropped = moe(x, None, router_outputs=True)
    # capacity = ceil(1.0 * 8 tokens * 1 / 4 experts) = 2: tokens 0 and 1 are served, 6 of 8 ride the residual
    assert dropped.item() == pytest.approx(6 / 8)
    assert load.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert (out[0, 2:] == 0).all() and (out[0, :2] != 0).any()


def test_load_balancing_loss_equals_hand_computed_value():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    top_idx = probs.topk(1).indices  # experts 0, 0, 1, 0
    # f = (3/4, 1/4), P = (0.65, 0.35): 2 * (0.75 * 0.65 + 0.25 * 0.35) = 1.15
    assert load_balancing_loss(probs, top_idx).item() == pytest.approx(1.15)
    # token 3 masked out: f = (2/3, 1/3), P = (2/3, 1/3): 2 * (4/9 + 1/9) = 10/9
    assert load_balancing_loss(probs, top_idx, torch.tensor([1.0, 1, 1, 0])).item() == pytest.approx(10 / 9)
    # TRL recomputes the aux loss with HF's function from router_logits: same value for one MoE layer.
    logits = torch.randn(12, 4, generator=torch.Generator().manual_seed(4))
    probs, _, top_idx = route(logits, k=2)
    hf = load_balancing_loss_func((logits,), num_experts=4, top_k=2)
    assert load_balancing_loss(probs, top_idx).item() == pytest.approx(hf.item(), rel=1e-6)


def test_router_z_loss_equals_hand_computed_value():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # logsumexp = log 2, log 4
    assert router_z_loss(logits).item() == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2)


def test_switch_router_learns_from_the_lm_loss_alone():
    model = make(num_experts=4, num_experts_per_tok=1).train()
    x = tokens(2, 16)
    model(x, labels=x).loss.backward()  # aux and z coefficients are 0 here
    assert model.model.layers[0].ffn.router.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- losses, outputs


def test_router_losses_are_added_once_to_the_loss():
    model = make(
        num_experts=4,
        moe_every=2,
        router_aux_loss_coef=0.01,
        router_z_loss_coef=0.001,
        output_router_logits=True,
    )
    x = tokens(2, 16)
    labels = x.clone()
    labels[:, :3] = -100
    out = model(x, labels=labels)
    lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert out.lm_loss.item() == pytest.approx(lm.item(), rel=1e-6)
    assert out.loss.item() == pytest.approx((lm + 0.01 * out.aux_loss + 0.001 * out.z_loss).item(), rel=1e-6)
    assert len(out.router_logits) == 1 and out.router_logits[0].shape == (32, 4)  # one MoE layer of two
    assert out.moe_stats["expert_load"].shape == (1, 4) and out.moe_stats["dropped_frac"].tolist() == [0.0]
    summed = model(x, labels=labels, num_items_in_batch=100)  # HF Trainer's gradient-accumulation normaliser
    assert summed.lm_loss.item() == pytest.approx(
        lm.item() * (labels[:, 1:] != -100).sum().item() / 100, rel=1e-6
    )
    plain = model(x, labels=labels, output_router_logits=False)
    assert (
        plain.aux_loss is None
        and plain.router_logits is None
        and plain.loss.item() == pytest.approx(lm.item())
    )


def test_generate_never_computes_router_outputs(monkeypatch):
    model = make(num_experts=4, output_router_logits=True, router_aux_loss_coef=0.01)
    calls = []
    monkeypatch.setattr(kiln, "load_balancing_loss", lambda *a: calls.append(1))
    outputs = []
    model.register_forward_hook(lambda module, args, out: outputs.append(out))
    x, mask = left_padded()
    for use_cache in (True, False):
        model.generate(x, attention_mask=mask, max_new_tokens=4, do_sample=False, use_cache=use_cache)
    assert len(outputs) == 8 and not calls
    assert all(o.router_logits is None and o.aux_loss is None for o in outputs)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_gradient_checkpointing_gives_the_same_gradients():
    model = make(
        num_experts=4,
        moe_every=2,
        router_aux_loss_coef=0.01,
        router_z_loss_coef=0.001,
        output_router_logits=True,
    )
    model.train()
    x = tokens(2, 16)

    def grads():
        model.zero_grad()
        loss = model(x, labels=x).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, plain = grads()
    model.gradient_checkpointing_enable()
    assert all(block.gradient_checkpointing for block in model.model.layers)
    calls = []
    model.model.layers[1].attn.register_forward_hook(lambda *a: calls.append(1))
    loss_ckpt, ckpt = grads()
    assert len(calls) == 2  # the block ran again in backward: checkpointing is really on
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    for name, g in plain.items():
        assert torch.allclose(ckpt[name], g, atol=1e-6), name


def test_one_optimizer_step_lowers_the_loss_and_changes_every_parameter():
    model = make(
        num_experts=4, moe_every=2, bias=True, norm="layernorm", position="learned", router_aux_loss_coef=0.01,
        router_z_loss_coef=0.001, output_router_logits=True,
    ).train()  # fmt: skip
    x = tokens(4, 16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = model(x, labels=x)
    assert (out.moe_stats["expert_load"] > 0).all()  # every expert got tokens, so every expert can learn
    out.loss.backward()
    optimizer.step()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged
    with torch.no_grad():
        assert model(x, labels=x).loss < out.loss


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_bf16_autocast_and_bf16_weights_train_and_generate(position):
    model = make(
        num_experts=4, moe_every=2, position=position, output_router_logits=True, router_aux_loss_coef=0.01
    )
    x, mask = left_padded()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # how TRL / accelerate run bf16 on CPU
        out = model.train()(x, attention_mask=mask, labels=x)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.logits.dtype == torch.bfloat16
    model = model.eval().to(torch.bfloat16)  # how DeepSpeed bf16 runs
    with torch.no_grad():
        assert torch.isfinite(model(x, attention_mask=mask, labels=x).loss)
        assert model.generate(x, attention_mask=mask, max_new_tokens=3, do_sample=False).shape == (3, 10)


# ------------------------------------------------------------------------------------------- sizes


def test_init_scales_residual_projections_by_depth():
    torch.manual_seed(0)
    c = KilnConfig(vocab_size=512, hidden_size=128, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=4,
                   intermediate_size=256, num_experts=2, moe_every=2, initializer_range=0.02, bias=True, norm="layernorm")  # fmt: skip
    model = KilnForCausalLM(c)
    residual = 0.02 / math.sqrt(2 * 8)  # GPT-2 / NeoX: outputs into the residual stream shrink with depth
    for name, p in model.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
            assert p.std().item() == pytest.approx(residual, rel=0.1), name
        elif name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith(("bias", "_bias")):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            assert p.std().item() == pytest.approx(0.02, rel=0.1), name


def closed_form_parameters(c: KilnConfig) -> tuple[int, int]:
    C, H, KV, D, L, E = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                         c.num_hidden_layers, c.num_experts)  # fmt: skip
    b = int(c.bias)
    norm = C * (2 if c.norm == "layernorm" and c.bias else 1)
    attn = C * H * D + 2 * C * KV * D + H * D * C + b * (H * D + 2 * KV * D + C)

    def mlp(F_):
        n_in = 2 if c.activation == "swiglu" else 1
        return n_in * (C * F_ + b * F_) + F_ * C + b * C

    expert = mlp(c.moe_intermediate_size or c.intermediate_size)
    moe_layers = sum(c.is_moe_layer(i) for i in range(L))
    total = c.vocab_size * C + (c.max_position_embeddings * C if c.position == "learned" else 0) + norm
    total += L * (2 * norm + attn) + (L - moe_layers) * mlp(c.intermediate_size)
    total += moe_layers * (C * E + E * expert) + (0 if c.tie_word_embeddings else c.vocab_size * C)
    active = total - moe_layers * (E - c.num_experts_per_tok) * expert
    return total, active


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(
            num_experts=4,
            moe_every=2,
            moe_intermediate_size=24,
            tie_word_embeddings=True,
            position="learned",
            norm="layernorm",
            bias=True,
            activation="gelu",
        ),
        dict(num_experts=8, num_experts_per_tok=1, num_hidden_layers=3),
    ],  # fmt: skip
    ids=["dense", "moe-every-2-tied", "switch"],
)
def test_parameter_counts_and_flops_follow_closed_forms(overrides):
    model = make(**overrides)
    c = model.config
    total, active = closed_form_parameters(c)
    assert model.num_parameters_total() == total
    assert model.num_parameters_active() == active
    # 6N + 12 L H D T, N = active matmul parameters: embedding tables out, the LM head in (even when tied)
    n = active - c.vocab_size * c.hidden_size
    n -= c.max_position_embeddings * c.hidden_size if c.position == "learned" else 0
    n += c.vocab_size * c.hidden_size if c.tie_word_embeddings else 0
    want = 6 * n + 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * 128
    assert model.flops_per_token(128) == pytest.approx(want)


# ------------------------------------------------------------------------------------------- transformers glue


def test_auto_classes_round_trip_through_safetensors(tmp_path):
    model = make(num_experts=4, tie_word_embeddings=True, position="alibi")
    model.save_pretrained(tmp_path / "lm")
    assert (tmp_path / "lm" / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    assert type(loaded) is KilnForCausalLM
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    x = tokens(2, 10)
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)

    # A reward model starts from the pretrained backbone: the causal-LM folder loads as a classifier.
    reward = AutoModelForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=1).eval()
    assert type(reward) is KilnForSequenceClassification
    assert torch.equal(reward.model.layers[0].attn.q_proj.weight, model.model.layers[0].attn.q_proj.weight)
    reward.save_pretrained(tmp_path / "rm")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        assert torch.equal(reward(x).logits, again(x).logits)


def test_classifier_reads_the_last_real_token_under_left_and_right_padding():
    torch.manual_seed(0)
    model = KilnForSequenceClassification(tiny(num_labels=1)).eval()
    x = tokens(1, 5)
    pad = torch.zeros(1, 3, dtype=torch.long)
    ones, zeros = torch.ones(1, 5, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)
    with torch.no_grad():
        want = model(x).logits
        right = model(torch.cat([x, pad], 1), attention_mask=torch.cat([ones, zeros], 1)).logits
        left = model(torch.cat([pad, x], 1), attention_mask=torch.cat([zeros, ones], 1)).logits
        by_pad_id = model(torch.cat([x, pad], 1)).logits  # no mask: the pad id decides
    assert want.shape == (1, 1)
    for got in (right, left, by_pad_id):
        assert (got - want).abs().max() <= 1e-5


def test_build_config_maps_the_pipeline_model_section():
    section = ModelConfig(
        n_layers=3, d_model=64, n_heads=8, n_kv_heads=2, d_ff=128, norm="layernorm", norm_eps=1e-6,
        activation="gelu", position="alibi", rope_theta=1e4, max_seq_len=256, n_experts=4, top_k=1, moe_every=2,
        moe_d_ff=96, capacity_factor=1.25, aux_loss_coef=0.01, z_loss_coef=0.001, tie_embeddings=True,
        init_std=0.01, dropout=0.1, bias=True,
    )  # fmt: skip
    c = build_config(section, vocab_size=500, pad_token_id=3, eos_token_id=2, bos_token_id=1)
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (3, 64, 8, 2)
    assert (c.intermediate_size, c.norm, c.norm_eps, c.activation, c.position) == (
        128,
        "layernorm",
        1e-6,
        "gelu",
        "alibi",
    )
    assert (c.max_position_embeddings, c.num_experts, c.num_experts_per_tok, c.moe_every) == (256, 4, 1, 2)
    assert (c.moe_intermediate_size, c.capacity_factor, c.router_aux_loss_coef, c.router_z_loss_coef) == (
        96,
        1.25,
        0.01,
        0.001,
    )
    assert (c.tie_word_embeddings, c.initializer_range, c.dropout, c.bias, c.output_router_logits) == (
        True,
        0.01,
        0.1,
        True,
        True,
    )
    assert (c.vocab_size, c.pad_token_id, c.eos_token_id, c.bos_token_id) == (500, 3, 2, 1)
    assert [c.is_moe_layer(i) for i in range(3)] == [False, True, False]
    dense = build_config(
        dataclasses.replace(section, n_experts=0), vocab_size=500, pad_token_id=3, eos_token_id=2
    )
    # TRL turns its aux-loss path on from these: a dense model keeps them off.
    assert (dense.router_aux_loss_coef, dense.router_z_loss_coef, dense.output_router_logits) == (
        0.0,
        0.0,
        False,
    )


def test_config_reports_every_error_at_once():
    with pytest.raises(ValueError) as err:
        tiny(hidden_size=30, position="sinusoidal", num_experts=4, num_experts_per_tok=5)
    message = str(err.value)
    assert (
        "hidden_size: 30 is not divisible by num_attention_heads=4" in message
        and "position: 'sinusoidal' is not one of" in message
        and "num_experts_per_tok: 5 must be between 1 and num_experts=4" in message
    )


def test_one_rule_reports_under_the_yaml_key_and_under_the_hf_name():
    """model_problems is the only place the rules live: the pipeline's check and KilnConfig both report from it,
    each in its own names (messages included)."""
    section = ModelConfig(d_model=130, n_heads=4, n_experts=4, top_k=5)
    assert model_problems(hf_values(section), names=PIPELINE_NAMES) == {
        "d_model": "130 is not divisible by n_heads=4",
        "top_k": "5 must be between 1 and n_experts=4",
    }
    assert list(section.check()) == ["d_model: 130 is not divisible by n_heads=4",
                                     "top_k: 5 must be between 1 and n_experts=4"]  # fmt: skip
    with pytest.raises(ValueError) as err:
        build_config(section, vocab_size=500, pad_token_id=0, eos_token_id=1)
    assert str(err.value) == (
        "invalid KilnConfig: hidden_size: 130 is not divisible by num_attention_heads=4; "
        "num_experts_per_tok: 5 must be between 1 and num_experts=4"
    )
    # a rule other than those two, to show the same message text in both namings
    rope = dict(d_model=36, n_heads=4, n_kv_heads=2)  # head dimension 9
    assert list(ModelConfig(**rope).check()) == [
        "position: rope needs an even head dimension, d_model / n_heads = 9 (change either, or use alibi or "
        "learned positions)"
    ]
    with pytest.raises(ValueError, match=r"position: rope needs an even head dimension, "
                                         r"hidden_size / num_attention_heads = 9"):  # fmt: skip
        build_config(ModelConfig(**rope), vocab_size=500, pad_token_id=0, eos_token_id=1)


def test_every_model_field_is_mapped_or_deliberately_not():
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    forgotten = fields - set(HF_NAMES) - set(NOT_MAPPED)
    assert not forgotten, f"kiln/model_fields.py: put {forgotten} in HF_NAMES or NOT_MAPPED"
    assert set(HF_NAMES) | set(NOT_MAPPED) == fields  # nothing stale either
    assert not set(HF_NAMES) & set(NOT_MAPPED)
    assert len(PIPELINE_NAMES) == len(HF_NAMES)  # one-to-one, so the inverse names every field
    defaults = KilnConfig()
    assert all(hasattr(defaults, hf) for hf in HF_NAMES.values())
    assert pipeline_key("num_experts_per_tok") == "model.top_k"


# ------------------------------------------------------------------------------------------- GPU (skipped on CPU)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("position", ["rope", "alibi", "learned"])
def test_cuda_cached_generation_and_hf_parity(position):
    model = make(position=position, num_experts=4, hidden_size=64, num_attention_heads=8).cuda()
    x, mask = (t.cuda() for t in left_padded())
    with torch.no_grad():
        if position == "rope":
            hf = hf_twin(model.cpu()).cuda()
            model.cuda()
            assert (model(x).logits - hf(x).logits).abs().max() <= 1e-4
        gen = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
        cached = model.generate(x, attention_mask=mask, **gen)
        uncached = model.generate(x, attention_mask=mask, use_cache=False, **gen)
        full_mask = torch.cat([mask, torch.ones(3, 8, dtype=mask.dtype, device="cuda")], dim=1)
        full = model(cached.sequences, attention_mask=full_mask).logits
    assert torch.equal(cached.sequences, uncached.sequences)
    assert (torch.stack(cached.logits, 1) - full[:, 6:-1]).abs().max() <= 1e-4


@cuda
@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_cuda_bf16_training_attention_uses_fused_kernels(position):
    """No padding: FlashAttention must take the causal path. ALiBi needs a bias: the memory-efficient kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = (
        make(position=position, num_experts=4, hidden_size=128, num_attention_heads=8)
        .cuda()
        .bfloat16()
        .train()
    )
    x = tokens(4, 64).cuda()
    backend = SDPBackend.FLASH_ATTENTION if position == "rope" else SDPBackend.EFFICIENT_ATTENTION
    with sdpa_kernel(backend):  # raises "No available kernel" if our call needs the math fallback
        loss = model(x, labels=x).loss
        loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
