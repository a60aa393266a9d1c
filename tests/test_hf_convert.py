"""kiln/hf_convert.py: Kiln -> plain Llama / Mixtral checkpoints and back, refusals, generate_text.

/work/venv/bin/pytest tests/test_hf_convert.py -x -q        # ~15 s on 2 cores
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2MoeForCausalLM,
)

from kiln.hf_convert import export_model, generate_text, import_model
from kiln.model import KilnForCausalLM, KilnForSequenceClassification
from tests.tiny_models import tiny

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer trained in a blink on a few lines, with EOS and PAD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|pad|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(
        ["the kiln fires the clay", "a model of the kiln", "once upon a time"] * 20, trainer
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|pad|>")


def kiln_dir(path, tokenizer=None, classifier=False, **overrides):
    """Save a tiny Kiln model (and tokenizer) to `path`; return the model."""
    torch.manual_seed(0)
    config = tiny(**{"vocab_size": 300, "max_position_embeddings": 1024, **overrides})
    model = (KilnForSequenceClassification if classifier else KilnForCausalLM)(config).eval()
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return model


def tokens(batch=2, length=12):
    return torch.randint(2, 300, (batch, length), generator=torch.Generator().manual_seed(1))


def max_diff(a, b, x):
    with torch.no_grad():
        return (a(x).logits - b(x).logits).abs().max().item()


@pytest.mark.parametrize(
    "fmt, overrides, hf_class",
    [
        ("llama", {}, LlamaForCausalLM),
        ("llama", dict(tie_word_embeddings=True, num_key_value_heads=1), LlamaForCausalLM),
        ("mixtral", dict(num_experts=4, moe_intermediate_size=24), MixtralForCausalLM),
    ],
    ids=["llama", "llama-tied-mqa", "mixtral"],
)
def test_export_loads_in_plain_transformers_with_the_same_logits(
    tmp_path, tokenizer, fmt, overrides, hf_class
):
    model = kiln_dir(tmp_path / "kiln", tokenizer, **overrides)
    assert export_model(tmp_path / "kiln", tmp_path / "out", fmt="auto") == fmt
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == fmt and config["architectures"] == [hf_class.__name__]
    # model_type llama / mixtral resolves to transformers' own classes: nothing of Kiln is involved.
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf) is hf_class
    assert max_diff(model, hf, tokens()) <= 1e-5
    assert (
        AutoTokenizer.from_pretrained(tmp_path / "out")("the kiln")["input_ids"]
        == tokenizer("the kiln")["input_ids"]
    )
    # ... and the import path gives back the same model
    assert max_diff(model, import_model(tmp_path / "out").eval(), tokens()) <= 1e-5


@pytest.mark.parametrize("k", [2, 1], ids=["top2", "switch-top1"])
def test_experts_on_every_other_layer_export_to_qwen2_moe_that_plain_transformers_runs(
    tmp_path, tokenizer, k
):
    """Mixtral has no dense layers between MoE ones; Qwen2-MoE does (`decoder_sparse_step`). Its shared expert gets
    no width and a zero gate, so the function is Kiln's, for top-2 (renormalised) and Switch's top-1 (not)."""
    model = kiln_dir(tmp_path / "kiln", tokenizer, num_hidden_layers=4, num_experts=4, moe_every=2,
                     moe_intermediate_size=24, num_experts_per_tok=k)  # fmt: skip
    assert export_model(tmp_path / "kiln", tmp_path / "out", fmt="auto") == "qwen2_moe"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe" and config["architectures"] == ["Qwen2MoeForCausalLM"]
    assert config["decoder_sparse_step"] == 2 and config["shared_expert_intermediate_size"] == 0
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert not f.get_tensor("model.layers.3.mlp.shared_expert_gate.weight").any()
    assert {f"model.layers.1.mlp.experts.3.{w}_proj.weight" for w in ("gate", "up", "down")} <= keys
    assert "model.layers.0.mlp.gate_proj.weight" in keys and "model.layers.0.mlp.gate.weight" not in keys
    hf = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out"
    ).eval()  # transformers' own class, no Kiln code
    assert type(hf) is Qwen2MoeForCausalLM
    assert max_diff(model, hf, tokens()) <= 1e-5


def test_a_capacity_trained_model_exports_dropless_with_a_warning(tmp_path, caplog):
    """HF and vLLM MoE layers drop nothing: the export is the function with the capacity unset, and says so."""
    kiln_dir(tmp_path / "kiln", num_experts=4, capacity_factor=1.25)
    with caplog.at_level("WARNING", logger="kiln.hf_convert"):
        assert export_model(tmp_path / "kiln", tmp_path / "out", fmt="auto") == "mixtral"
    assert "model.capacity_factor=1.25" in caplog.text and "dropless" in caplog.text
    dropless = KilnForCausalLM(tiny(vocab_size=300, max_position_embeddings=1024, num_experts=4)).eval()
    dropless.load_state_dict(KilnForCausalLM.from_pretrained(tmp_path / "kiln").state_dict())
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert max_diff(dropless, hf, tokens()) <= 1e-5


def test_mixtral_export_writes_the_per_expert_layout(tmp_path):
    kiln_dir(tmp_path / "kiln", num_experts=3)
    export_model(tmp_path / "kiln", tmp_path / "out", fmt="mixtral")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.block_sparse_moe.gate.weight" in keys
    assert {f"model.layers.0.block_sparse_moe.experts.2.{w}.weight" for w in ("w1", "w2", "w3")} <= keys
    assert not any("gate_up_proj" in k or ".ffn." in k or "attn_norm" in k for k in keys)


@pytest.mark.parametrize("moe", [False, True], ids=["llama", "mixtral"])
def test_import_reads_checkpoints_that_transformers_wrote(tmp_path, moe):
    common = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=40, initializer_range=0.2, rope_parameters={"rope_type": "default", "rope_theta": 1e4})  # fmt: skip
    torch.manual_seed(0)
    hf = (
        MixtralForCausalLM(MixtralConfig(**common, num_local_experts=4))
        if moe
        else LlamaForCausalLM(LlamaConfig(**common))
    )
    hf.save_pretrained(tmp_path)
    model = import_model(tmp_path).eval()
    assert model.config.num_experts == (4 if moe else 0) and model.config.rope_theta == 1e4
    assert max_diff(model, hf.eval(), tokens()) <= 1e-5


def test_import_refuses_what_kiln_cannot_represent(tmp_path):
    LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, attention_bias=True)).save_pretrained(tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match="biases"):
        import_model(tmp_path)


@pytest.mark.parametrize(
    "fmt, overrides, key",
    [
        ("llama", dict(position="alibi"), "model.position=alibi"),
        ("llama", dict(position="learned", norm="layernorm"), "model.norm=layernorm"),
        ("llama", dict(activation="gelu"), "model.activation=gelu"),
        ("llama", dict(bias=True), "model.bias=true"),
        ("llama", dict(num_experts=4), "model.n_experts=4"),
        ("mixtral", dict(num_experts=4, moe_every=2), "model.moe_every=2"),
        ("qwen2_moe", dict(num_experts=0), "model.n_experts=0"),
        ("qwen2_moe", dict(num_experts=4, moe_every=2, bias=True), "model.bias=true"),
        ("mixtral", dict(num_experts=4, num_experts_per_tok=1), "model.top_k=1"),
    ],
)
def test_export_refuses_non_standard_models_naming_the_key(tmp_path, fmt, overrides, key):
    kiln_dir(tmp_path / "kiln", **overrides)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as err:
        export_model(tmp_path / "kiln", tmp_path / "out", fmt=fmt)
    assert "--format kiln" in str(err.value)


def test_auto_falls_back_to_kiln_and_kiln_copies_as_is(tmp_path, tokenizer):
    model = kiln_dir(tmp_path / "kiln", tokenizer, position="alibi")
    (tmp_path / "kiln" / "manifest.json").write_text("{}")
    assert export_model(tmp_path / "kiln", tmp_path / "out", fmt="auto") == "kiln"
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert (tmp_path / "out" / "tokenizer.json").exists()
    assert max_diff(model, AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval(), tokens()) == 0.0


def test_reward_model_exports_as_llama_sequence_classifier(tmp_path):
    model = kiln_dir(tmp_path / "kiln", classifier=True, num_labels=1)
    assert export_model(tmp_path / "kiln", tmp_path / "out") == "llama"
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    x = tokens()
    with torch.no_grad():
        assert (model(x).logits - hf(x).logits).abs().max() <= 1e-5


def test_generate_text_continues_prompts_greedily_and_reproducibly(tmp_path, tokenizer):
    model = kiln_dir(tmp_path / "kiln", tokenizer, num_experts=4, output_router_logits=True)
    prompts = ["the kiln", "once upon a time the clay"]
    out = generate_text(tmp_path / "kiln", prompts, max_new_tokens=6, temperature=0.0, top_p=1.0, seed=0)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)
    for prompt, text in zip(prompts, out, strict=True):  # each prompt alone, unpadded, gives the same text
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        alone = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert text == tokenizer.decode(alone[0, ids.shape[1] :], skip_special_tokens=True)
    sample = dict(max_new_tokens=6, temperature=1.0, top_p=0.9)
    first = generate_text(tmp_path / "kiln", prompts, seed=7, **sample)
    assert generate_text(tmp_path / "kiln", prompts, seed=7, **sample) == first
