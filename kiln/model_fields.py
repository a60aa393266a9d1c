"""The model's hyper-parameters, named once: the pipeline's `model:` keys, their KilnConfig names, and the rules.

    HF_NAMES["d_model"]                      # 'hidden_size': pipeline key -> KilnConfig (transformers) name
    PIPELINE_NAMES["hidden_size"]            # 'd_model': the inverse
    pipeline_key("num_experts")              # 'model.n_experts': what a user writes in the YAML
    model_problems(hf_values(section), names=PIPELINE_NAMES)   # {'d_model': '130 is not divisible by ...'}

`model_problems` is the one place the cross-field rules live: `ModelConfig.check()` (pipeline/config.py) reports
them under the YAML keys, `KilnConfig.__post_init__` (kiln/model.py) under the transformers names. `build_config`
(kiln/model.py) maps a `model:` section through `HF_NAMES`.

Imports nothing heavy: pipeline/config.py imports this module whenever a config is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Pipeline `model:` key -> KilnConfig field, for every ModelConfig field that reaches the model. KilnConfig's other
# fields come from elsewhere: vocab_size and the special token ids from the tokenizer, output_router_logits from
# n_experts (build_config), the rest (use_cache, ...) keep their defaults.
HF_NAMES: dict[str, str] = {
    "n_layers": "num_hidden_layers",
    "d_model": "hidden_size",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "d_ff": "intermediate_size",
    "norm": "norm",
    "norm_eps": "norm_eps",
    "activation": "activation",
    "position": "position",
    "rope_theta": "rope_theta",
    "max_seq_len": "max_position_embeddings",
    "n_experts": "num_experts",
    "top_k": "num_experts_per_tok",
    "moe_every": "moe_every",
    "moe_d_ff": "moe_intermediate_size",
    "capacity_factor": "capacity_factor",
    "aux_loss_coef": "router_aux_loss_coef",
    "z_loss_coef": "router_z_loss_coef",
    "tie_embeddings": "tie_word_embeddings",
    "init_std": "initializer_range",
    "dropout": "dropout",
    "bias": "bias",
}
PIPELINE_NAMES: dict[str, str] = {hf: key for key, hf in HF_NAMES.items()}

# ModelConfig fields deliberately kept out of the model's config, each with the reason. None today: a new
# ModelConfig field goes into HF_NAMES or here (tests/test_model.py checks that every field is in one of them).
NOT_MAPPED: dict[str, str] = {}


def pipeline_key(hf_name: str) -> str:
    """A KilnConfig field -> the key a user writes for it in the pipeline's YAML ('num_experts' -> 'model.n_experts')."""
    return f"model.{PIPELINE_NAMES[hf_name]}"


def hf_values(section: Any) -> dict[str, Any]:
    """A `model:` section (pipeline/config.py's ModelConfig, read by attribute) -> its values under KilnConfig names."""
    return {hf: getattr(section, key) for key, hf in HF_NAMES.items()}


def model_problems(values: Mapping[str, Any], names: Mapping[str, str] | None = None) -> dict[str, str]:
    """The cross-field rules that `values` (KilnConfig names) break: {field: message}, every broken rule at once.

    Fields, in the keys and in the messages, are shown by `names` (KilnConfig name -> shown name; KilnConfig's
    own names when None). Each message starts with the field's value and says what it must be."""

    def n(hf: str) -> str:
        return names[hf] if names is not None else hf

    found: dict[str, list[str]] = {}

    def problem(hf: str, message: str) -> None:
        found.setdefault(n(hf), []).append(message)

    hidden, heads, kv = values["hidden_size"], values["num_attention_heads"], values["num_key_value_heads"]
    experts, k = values["num_experts"], values["num_experts_per_tok"]
    if heads < 1:
        problem("num_attention_heads", f"{heads} must be >= 1")
    else:
        if hidden % heads:
            problem("hidden_size", f"{hidden} is not divisible by {n('num_attention_heads')}={heads}")
        if kv < 1 or heads % kv:
            problem("num_key_value_heads", f"{kv} must divide {n('num_attention_heads')}={heads}")
        if values["position"] == "rope" and (hidden // heads) % 2:
            problem(
                "position",
                f"rope needs an even head dimension, {n('hidden_size')} / {n('num_attention_heads')} = "
                f"{hidden // heads} (change either, or use alibi or learned positions)",
            )
    if experts and not 1 <= k <= experts:
        problem("num_experts_per_tok", f"{k} must be between 1 and {n('num_experts')}={experts}")
    if values["moe_every"] < 1:
        problem("moe_every", f"{values['moe_every']} must be >= 1 (1 = every layer)")
    return {field: "; ".join(messages) for field, messages in found.items()}
