"""Export Kiln checkpoints as plain Llama / Mixtral / Qwen2-MoE checkpoints, import Llama and Mixtral, generate text.

    python launch.py export pretrain out/ --format auto      # -> export_model(src, out, "auto")
    python launch.py generate sft --prompt "Once upon"       # -> generate_text(dir, [...], ...)
    model = import_model("path/to/llama-or-mixtral")         # pretrain.init_from

A Kiln model is exactly Llama when it is dense with RoPE, RMSNorm, SwiGLU and no biases; exactly Mixtral when, in
addition, every layer is a top-k (k >= 2) MoE; exactly Qwen2-MoE when its MoE layers are every `moe_every`-th
(Qwen2-MoE's `decoder_sparse_step`, which Mixtral lacks), any k (`norm_topk_prob` renormalises the k weights as
Kiln does for k >= 2, and leaves Switch's k = 1 alone), its shared expert given no width
(`shared_expert_intermediate_size` 0: transformers' adds zeros, vLLM builds none) and a zero gate. The exported
folder then loads with plain `transformers` (no `import kiln.model`), vLLM or llama.cpp's converters. Anything
else is refused with the pipeline key that prevents it. HF and vLLM MoE layers are dropless: a model trained with
`capacity_factor` is exported (with a warning) as the function Kiln computes with it unset. Names, layer i:

    Kiln                                   Llama                              Mixtral (on disk)
    model.layers.i.attn_norm               model.layers.i.input_layernorm     (same as Llama)
    model.layers.i.attn.{q,k,v,o}_proj     ...self_attn.{q,k,v,o}_proj        (same as Llama)
    model.layers.i.ffn_norm                ...post_attention_layernorm        (same as Llama)
    model.layers.i.ffn.{gate,up,down}_proj ...mlp.{gate,up,down}_proj         -
    model.layers.i.ffn.router              -                                  ...block_sparse_moe.gate
    ...ffn.experts.j.{gate,down,up}_proj   -                                  ...block_sparse_moe.experts.j.{w1,w2,w3}

Qwen2-MoE: Llama's names, the router `...mlp.gate`, the experts `...mlp.experts.j.{gate,up,down}_proj`, and
`...mlp.shared_expert_gate` (zeros).

Mixtral layout: transformers 5 holds the experts fused in memory (`mlp.experts.gate_up_proj` (E, 2I, H),
`mlp.experts.down_proj` (E, H, I)), but its `save_pretrained` writes, and `from_pretrained` converts from, the
original per-expert layout `block_sparse_moe.experts.j.w1/w2/w3` (conversion_mapping.py, "mixtral"). We write that
original layout: it is also the one vLLM's Mixtral loader and transformers 4.x read. Kiln files keep their
experts apart the same way (`ffn.experts.j.up_proj.weight`), while Kiln models stack them in memory.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers.core_model_loading import revert_weight_conversion

from kiln.model import KilnConfig, KilnForCausalLM, KilnForSequenceClassification
from kiln.model_fields import pipeline_key

log = logging.getLogger(__name__)

FORMATS = ("auto", "kiln", "llama", "mixtral", "qwen2_moe")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)


def export_model(src_dir: str | Path, out_dir: str | Path, fmt: str = "auto") -> str:
    """Write the Kiln model in `src_dir` to `out_dir` as `fmt`; returns the format written. "auto" picks llama,
    mixtral (experts on every layer) or qwen2_moe (on every moe_every-th) when the architecture allows, else kiln
    (with a warning naming why)."""
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r} is not one of {FORMATS}")
    src, out = Path(src_dir), Path(out_dir)
    config = KilnConfig.from_pretrained(src)
    if fmt == "auto":
        target = "llama" if not config.num_experts else "mixtral" if config.moe_every == 1 else "qwen2_moe"
        reasons = standard_format_blockers(config, target)
        fmt = "kiln" if reasons else target
        if reasons:
            log.warning("exporting as kiln, not %s: %s", target, "; ".join(reasons))
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "kiln":  # every file but the manifest, which describes the artifact, not the export
        for f in src.iterdir():
            if f.is_file() and f.name != "manifest.json":
                shutil.copy2(f, out / f.name)
        return fmt

    if reasons := standard_format_blockers(config, fmt):
        raise ValueError(f"cannot export as {fmt}: " + "; ".join(reasons) + "; use --format kiln")
    if config.num_experts and config.capacity_factor is not None:
        log.warning(
            "%s=%s: the model was trained dropping the tokens over each expert's capacity; %s MoE layers (as "
            "vLLM's) are dropless, so the export routes every token: Kiln's function with the capacity unset",
            pipeline_key("capacity_factor"), config.capacity_factor, fmt,
        )  # fmt: skip
    classifier = "KilnForSequenceClassification" in (config.architectures or [])
    model_cls = KilnForSequenceClassification if classifier else KilnForCausalLM
    model = model_cls.from_pretrained(src)
    hf_config = to_hf_config(config, fmt, classifier)
    hf_config.save_pretrained(out)
    on_disk = revert_weight_conversion(
        model, model.state_dict()
    )  # experts apart, as save_pretrained writes them
    tensors = to_hf_state_dict(on_disk, config, fmt)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"}
    )
    for name in TOKENIZER_FILES + ("generation_config.json",):
        if (src / name).exists():
            shutil.copy2(src / name, out / name)
    return fmt


def standard_format_blockers(config: KilnConfig, fmt: str) -> list[str]:
    """Every setting that keeps this config from being exactly `fmt` ("llama" | "mixtral"), named by its key in the
    pipeline's `model:` section. Empty when the export is exact."""
    c, name = config, fmt.capitalize()
    reasons = []

    def blocks(field: str, why: str) -> None:  # field: KilnConfig's name; shown as the YAML key and value
        value = getattr(c, field)
        shown = str(value).lower() if isinstance(value, bool) else value  # YAML spells booleans true / false
        reasons.append(f"{pipeline_key(field)}={shown}: {why}")

    if c.position != "rope":
        blocks("position", f"{name} uses RoPE")
    if c.norm != "rmsnorm":
        blocks("norm", f"{name} uses RMSNorm")
    if c.activation != "swiglu":
        blocks("activation", f"{name} uses SwiGLU")
    if c.bias:
        blocks("bias", f"{name} has no biases")
    if fmt == "llama" and c.num_experts:
        blocks("num_experts", "Llama is dense (use mixtral or qwen2_moe)")
    if fmt in ("mixtral", "qwen2_moe") and not c.num_experts:
        blocks("num_experts", f"{name} is a mixture of experts (use llama)")
    if fmt == "mixtral" and c.num_experts:
        if c.moe_every != 1:
            blocks("moe_every", "Mixtral has experts on every layer (use qwen2_moe)")
        if c.num_experts_per_tok == 1:
            blocks("num_experts_per_tok", "Switch routing scales by the router probability, Mixtral by 1")
    return reasons


def to_hf_config(config: KilnConfig, fmt: str, classifier: bool = False):
    from transformers import LlamaConfig, MixtralConfig, Qwen2MoeConfig

    c = config
    common = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        hidden_act="silu",
        max_position_embeddings=c.max_position_embeddings,
        initializer_range=c.initializer_range,
        rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=c.tie_word_embeddings,
        pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        dtype=c.dtype,
    )
    if classifier:
        common.update(num_labels=c.num_labels, id2label=c.id2label, label2id=c.label2id)
    head = "ForSequenceClassification" if classifier else "ForCausalLM"
    if fmt == "llama":
        return LlamaConfig(**common, intermediate_size=c.intermediate_size, architectures=[f"Llama{head}"])
    if fmt == "qwen2_moe":
        return Qwen2MoeConfig(
            **common,
            intermediate_size=c.intermediate_size,  # the dense layers'
            moe_intermediate_size=c.moe_intermediate_size or c.intermediate_size,
            num_experts=c.num_experts,
            num_experts_per_tok=c.num_experts_per_tok,
            decoder_sparse_step=c.moe_every,
            mlp_only_layers=[],
            norm_topk_prob=c.num_experts_per_tok > 1,  # as route(): k weights renormalised, Switch's not
            shared_expert_intermediate_size=0,  # Kiln has no shared expert
            qkv_bias=False,
            use_sliding_window=False,
            router_aux_loss_coef=c.router_aux_loss_coef,
            output_router_logits=False,
            architectures=[f"Qwen2Moe{head}"],
        )
    return MixtralConfig(
        **common,
        intermediate_size=c.moe_intermediate_size or c.intermediate_size,
        num_local_experts=c.num_experts,
        num_experts_per_tok=c.num_experts_per_tok,
        router_aux_loss_coef=c.router_aux_loss_coef,
        output_router_logits=False,  # router outputs are for training; they broke HF Mixtral's cached generate
        architectures=[f"Mixtral{head}"],
    )


def to_hf_state_dict(sd: dict, config: KilnConfig, fmt: str) -> dict:
    """Kiln state dict -> the on-disk Llama / Mixtral names (module docstring)."""
    out = {}
    for name, tensor in sd.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: the checkpoint holds only the embedding
        for kiln, hf in RENAMES[fmt]:
            name = name.replace(kiln, hf)
        out[name] = tensor
        if fmt == "qwen2_moe" and name.endswith(".mlp.gate.weight"):  # the shared expert's gate, unused
            out[name.replace(".mlp.gate.", ".mlp.shared_expert_gate.")] = tensor.new_zeros(1, tensor.shape[1])
    return out


# Substring renames, applied in order. Attention and dense-MLP projections already carry Llama's names.
RENAMES = {
    "llama": [(".attn_norm.", ".input_layernorm."), (".attn.", ".self_attn."),
              (".ffn_norm.", ".post_attention_layernorm."), (".ffn.", ".mlp.")],
    "mixtral": [(".attn_norm.", ".input_layernorm."), (".attn.", ".self_attn."),
                (".ffn_norm.", ".post_attention_layernorm."), (".ffn.router.", ".block_sparse_moe.gate."),
                (".ffn.experts.", ".block_sparse_moe.experts."), (".gate_proj.", ".w1."), (".down_proj.", ".w2."),
                (".up_proj.", ".w3.")],
    "qwen2_moe": [(".attn_norm.", ".input_layernorm."), (".attn.", ".self_attn."),
                  (".ffn_norm.", ".post_attention_layernorm."), (".ffn.router.", ".mlp.gate."), (".ffn.", ".mlp.")],
}  # fmt: skip


def import_model(src_dir: str | Path) -> KilnForCausalLM:
    """A Llama or Mixtral checkpoint folder -> KilnForCausalLM (fp32) with the same weights and the same logits."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.float32)
    hc = hf.config
    fmt = hc.model_type
    if fmt not in ("llama", "mixtral"):
        raise ValueError(f"import_model reads llama or mixtral checkpoints, not model_type={fmt!r}")
    errors = []
    rope = hc.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        errors.append(f"rope_type={rope.get('rope_type')} (only plain RoPE)")
    if hc.hidden_act != "silu":
        errors.append(f"hidden_act={hc.hidden_act} (only SwiGLU with SiLU)")
    if getattr(hc, "attention_bias", False) or getattr(hc, "mlp_bias", False):
        errors.append("biases in attention or MLP")
    if getattr(hc, "sliding_window", None) is not None:
        errors.append(f"sliding_window={hc.sliding_window}")
    head_dim = getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads
    if head_dim * hc.num_attention_heads != hc.hidden_size:
        errors.append(f"head_dim={head_dim} * heads != hidden_size={hc.hidden_size}")
    if errors:
        raise ValueError(f"cannot import {src_dir} into Kiln: " + "; ".join(errors))

    moe = fmt == "mixtral"
    config = KilnConfig(
        vocab_size=hc.vocab_size,
        hidden_size=hc.hidden_size,
        num_hidden_layers=hc.num_hidden_layers,
        num_attention_heads=hc.num_attention_heads,
        num_key_value_heads=hc.num_key_value_heads,
        intermediate_size=hc.intermediate_size,
        norm_eps=hc.rms_norm_eps,
        rope_theta=rope.get("rope_theta", 10000.0),
        max_position_embeddings=hc.max_position_embeddings,
        num_experts=hc.num_local_experts if moe else 0,
        num_experts_per_tok=hc.num_experts_per_tok if moe else 2,
        router_aux_loss_coef=hc.router_aux_loss_coef if moe else 0.0,
        output_router_logits=moe,
        tie_word_embeddings=hc.tie_word_embeddings,
        initializer_range=hc.initializer_range,
        pad_token_id=hc.pad_token_id,
        bos_token_id=hc.bos_token_id,
        eos_token_id=hc.eos_token_id if not isinstance(hc.eos_token_id, list) else hc.eos_token_id[0],
    )
    model = KilnForCausalLM(config)
    model.load_state_dict(from_hf_state_dict(hf.state_dict(), config), strict=True)
    return model


def from_hf_state_dict(hf: dict, config: KilnConfig) -> dict:
    """In-memory transformers 5 Llama / Mixtral names (Mixtral's experts fused) -> Kiln's in-memory names (its
    experts stacked)."""
    sd = {}
    for name, tensor in hf.items():
        if name.endswith("mlp.experts.gate_up_proj"):  # (E, 2I, H) = [gate; up] per expert
            prefix = name.removesuffix("mlp.experts.gate_up_proj")
            sd[f"{prefix}ffn.experts.gate_proj"], sd[f"{prefix}ffn.experts.up_proj"] = tensor.chunk(2, dim=1)
            continue
        if name.endswith("mlp.experts.down_proj"):  # (E, H, I), Kiln's stacked layout too
            sd[name.removesuffix("mlp.experts.down_proj") + "ffn.experts.down_proj"] = tensor
            continue
        for hf_name, kiln in ((".input_layernorm.", ".attn_norm."), (".self_attn.", ".attn."),
                              (".post_attention_layernorm.", ".ffn_norm."), (".mlp.gate.", ".ffn.router."),
                              (".mlp.", ".ffn.")):  # fmt: skip
            name = name.replace(hf_name, kiln)
        sd[name] = tensor
    if config.tie_word_embeddings:  # one matrix: the embedding's values fill the (shared) LM head too
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    return {name: t.clone() for name, t in sd.items()}


def generate_text(
    model_dir: str | Path,
    prompts: list[str],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    chat: bool = False,
) -> list[str]:
    """Continue each prompt with the model in `model_dir` (Kiln, Llama or Mixtral + tokenizer); temperature 0 is
    greedy. Prompts are left-padded into one batch; returns only the new text of each. With `chat`, each prompt
    is a user turn in the tokenizer's chat template and generation also stops at the end-of-turn token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"  # decoder-only batches grow on the right
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    stop = [tokenizer.eos_token_id]
    if chat:
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
            )
            for p in prompts
        ]
        end = tokenizer.convert_tokens_to_ids("<|end|>")
        if end is not None and end != tokenizer.unk_token_id:
            stop.append(end)
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=not chat)
    torch.manual_seed(seed)
    sampling = temperature > 0
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=sampling,
            temperature=temperature if sampling else None,
            top_p=top_p if sampling else None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stop,
        )
    new = out[:, batch["input_ids"].shape[1] :]
    return tokenizer.batch_decode(new, skip_special_tokens=True)
