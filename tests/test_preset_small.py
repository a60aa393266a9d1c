"""The multi-node preset's code paths on 2 CPU cores: configs/multinode-moe-small.yaml has the
preset's structure (checked against it here, so the two cannot drift apart) and runs end to end —
pretraining under ZeRO-1 in bf16 on 2 workers with MoE on every other layer and an expert capacity;
sft, reward (from sft) and ppo under ZeRO-3 in bf16 on 2 workers, ppo sampling in lockstep over real
gloo collectives. (The preset itself is planned by `--dry-run` in tests/test_core_sizing.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import PROJECT_ROOT, load_config
from tests.pipeline_helpers import artifact, copy_upstream, manifest, rows, tensors

PRESET = PROJECT_ROOT / "configs" / "multinode-moe.yaml"
SMALL = PROJECT_ROOT / "configs" / "multinode-moe-small.yaml"
TRAINING = ("pretrain", "sft", "reward", "ppo")


def test_the_small_preset_has_the_presets_structure():
    big, small = load_config(PRESET), load_config(SMALL)
    for stage in TRAINING:
        b, s = getattr(big, stage), getattr(small, stage)
        assert (s.zero_stage, s.precision, s.activation_checkpointing) == (
            b.zero_stage,
            b.precision,
            b.activation_checkpointing,
        ), stage
        assert s.num_workers > 1 and s.num_workers < b.num_workers, stage  # several ranks, scaled down
    assert small.reward.init_from == big.reward.init_from == "sft"
    m, n = small.model, big.model
    assert (m.moe_every, m.top_k, m.capacity_factor is not None) == (n.moe_every, n.top_k, True)
    assert m.n_kv_heads < m.n_heads and n.n_kv_heads < n.n_heads  # grouped-query attention in both
    assert small.pretrain.global_batch_size > small.pretrain.num_workers * small.pretrain.micro_batch_size


@pytest.fixture(scope="module")
def small_run(tiny_run, tmp_path_factory):
    """The small preset, run once, on the session run's data, tokenizer and token artifacts."""
    from pipeline.dag import PIPELINE
    from pipeline.runner import run_pipeline

    root = tmp_path_factory.mktemp("moe-small")
    cfg = load_config(SMALL, [f"run.root={root}", "run.wandb=disabled"])
    copy_upstream(tiny_run[1], cfg, ("ingest", "tokenizer", "tokenize"))
    outcome = run_pipeline(cfg, PIPELINE)
    assert outcome.ok, f"the small preset failed: {outcome.errors} {outcome.blocked}"
    assert [p.name for p in outcome.plan if p.action == "run"] == list(TRAINING)
    return cfg


def test_the_small_preset_trains_every_stage_under_zero3_bf16_and_exports_usable_models(small_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    import kiln.model  # noqa: F401  (registers the Kiln classes with the Auto classes)

    cfg = small_run
    paths = {s: artifact(cfg, s) for s in TRAINING}
    weights = {s: tensors(p) for s, p in paths.items()}
    for stage, w in weights.items():
        assert all(torch.isfinite(t).all() for t in w.values()), stage
    # each stage changed what it started from: sft the pretrained model, ppo the sft policy, and the
    # reward model's backbone moved away from the sft model it started from
    for before, after in (("pretrain", "sft"), ("sft", "ppo"), ("sft", "reward")):
        shared = [k for k in weights[before] if k.startswith("model.") and k in weights[after]]
        assert shared and any(not torch.equal(weights[before][k], weights[after][k]) for k in shared), after

    tok = AutoTokenizer.from_pretrained(paths["sft"])
    ids = tok("Reverse the first 3 words: a b c d", return_tensors="pt").input_ids
    for stage in ("pretrain", "sft", "ppo"):
        model = AutoModelForCausalLM.from_pretrained(paths[stage]).eval()
        c = model.config
        assert (c.moe_every, c.capacity_factor, c.num_key_value_heads) == (2, 1.25, 1), stage
        assert torch.isfinite(model(ids).logits).all(), stage
    reward = AutoModelForSequenceClassification.from_pretrained(paths["reward"]).eval()
    assert torch.isfinite(reward(ids).logits).all()
    # experts on every other layer export as Qwen2-MoE, which plain transformers runs: dropless, as Kiln's
    # function with the capacity unset
    from kiln.hf_convert import export_model

    assert export_model(paths["pretrain"], tmp_path / "hf", "auto") == "qwen2_moe"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"
    ours = AutoModelForCausalLM.from_pretrained(paths["pretrain"], dtype=torch.float32, capacity_factor=None)
    with torch.no_grad():
        assert (hf(ids).logits - ours.eval()(ids).logits).abs().max() <= 1e-4

    pre = rows(paths["pretrain"])
    assert any("dropped_frac" in r for r in pre)  # the expert capacity is in force
    assert all(math.isfinite(r["loss"]) for r in pre if "loss" in r)
    assert manifest(paths["ppo"])["metrics"]["iterations"] == cfg.ppo.iterations
    for stage in ("sft", "reward"):
        assert manifest(paths[stage])["metrics"]["steps"] == getattr(cfg, stage).steps
