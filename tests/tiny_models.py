"""The tests' tiny Kiln decoder config, shared by the model, rollout and conversion tests."""

from __future__ import annotations

from kiln.model import KilnConfig

V = 97  # vocabulary of the tiny models


def tiny(**overrides) -> KilnConfig:
    """2 layers, 32 wide, GQA 4/2 heads, RoPE; `overrides` replace any field."""
    base = dict(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
        rope_theta=500.0,
        initializer_range=0.2,  # large weights: peaky attention, so positions and masks visibly matter
        pad_token_id=0,
        eos_token_id=1,
    )
    return KilnConfig(**{**base, **overrides})
