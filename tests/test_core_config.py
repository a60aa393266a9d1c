"""The typed config: presets load, `--set` is converted and checked, every problem reported at once."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing

import pytest

from pipeline.config import PROJECT_ROOT, ConfigError, PipelineConfig, load_config
from pipeline.configlib import all_keys, field_docs

PRESETS = sorted((PROJECT_ROOT / "configs").glob("*.yaml"))


def problems(*overrides, path=None) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_config(path or PROJECT_ROOT / "configs" / "tiny.yaml", list(overrides))
    return exc.value.errors


def one(errors: list[str], key: str) -> str:
    """The one error reported for `key` (errors start with their key path)."""
    found = [e for e in errors if e.startswith(key + ":")]
    assert len(found) == 1, f"expected one error for {key}, got {errors}"
    return found[0]


def test_presets_exist():
    assert PROJECT_ROOT / "configs" / "tiny.yaml" in PRESETS


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.run.name


def test_defaults_load_without_a_file():
    assert load_config(None) == PipelineConfig()


def test_bad_overrides_are_reported_together_with_key_paths():
    errors = problems(
        "pretrain.lrr=1",  # typo
        "pretrain.steps=abc",  # bad value
        "pretrian.lr=1",  # unknown section
        "pretrain.seq_len=128",  # a key from another section
        "tokenize.vocab_size=512",  # ... and another
        "run.wandb=offlin",  # not one of the choices
        "noequals",
    )
    assert len(errors) == 7, errors
    assert "did you mean 'pretrain.lr'?" in one(errors, "pretrain.lrr")
    assert "expected an integer, got 'abc'" in one(errors, "pretrain.steps")
    assert "did you mean 'pretrain'?" in one(errors, "pretrian")
    assert "did you mean 'tokenize.seq_len'?" in one(errors, "pretrain.seq_len")
    assert "did you mean 'tokenizer.vocab_size'?" in one(errors, "tokenize.vocab_size")
    wandb = one(errors, "run.wandb")
    assert "'offlin' is not one of" in wandb and "did you mean 'offline'?" in wandb
    assert any("'noequals'" in e and "KEY=VALUE" in e for e in errors)


def test_unknown_key_lists_the_valid_keys_of_its_section():
    msg = one(problems("tokenize.zzzz=1"), "tokenize.zzzz")
    valid = sorted(f.name for f in dataclasses.fields(PipelineConfig().tokenize))
    assert "seq_len" in valid and f"(valid keys here: {', '.join(valid)})" in msg


def test_error_message_names_the_source_and_every_problem():
    with pytest.raises(ConfigError) as exc:
        load_config(PROJECT_ROOT / "configs" / "tiny.yaml", ["pretrain.lrr=1", "tokenize.seq_len=x"])
    text = str(exc.value)
    assert text.startswith("2 problem(s) in ")
    assert "tiny.yaml" in text and "pretrain.lrr=1" in text
    assert "  - pretrain.lrr: unknown key" in text
    assert "  - tokenize.seq_len: expected an integer, got 'x'" in text


def test_override_values_are_converted_to_the_field_types():
    cfg = load_config(
        None,
        [
            "pretrain.lr=3e-4",
            "pretrain.min_lr=1e-5",
            "pretrain.steps=12",
            "pretrain.warmup_steps=1e2",
            "pretrain.gpus_per_worker=1",
            "pretrain.zero_stage=3",
            "pretrain.offload_params=true",
            "ingest.dedup=false",
            "ingest.sources=[a.jsonl.zst,b.jsonl.zst]",
            "ingest.include_sets=Pile-CC",
            "ingest.set_weights={Wikipedia (en): 2, Pile-CC: 0.5}",
            "tokenizer.path=null",
            "model.moe_d_ff=64",
            "run.name=exp 1",
        ],
    )
    assert cfg.pretrain.lr == pytest.approx(3e-4) and isinstance(cfg.pretrain.lr, float)
    assert cfg.pretrain.min_lr == pytest.approx(1e-5)
    assert cfg.pretrain.steps == 12 and isinstance(cfg.pretrain.steps, int)
    assert cfg.pretrain.warmup_steps == 100 and isinstance(cfg.pretrain.warmup_steps, int)
    assert cfg.pretrain.gpus_per_worker == 1.0 and isinstance(cfg.pretrain.gpus_per_worker, float)
    assert cfg.pretrain.zero_stage == 3 and cfg.pretrain.offload_params is True
    assert cfg.ingest.dedup is False
    assert cfg.ingest.sources == ("a.jsonl.zst", "b.jsonl.zst")
    assert cfg.ingest.include_sets == ("Pile-CC",)  # a single value is a list of one
    assert cfg.ingest.set_weights == {"Wikipedia (en)": 2.0, "Pile-CC": 0.5}
    assert cfg.tokenizer.path is None
    assert cfg.model.moe_d_ff == 64
    assert cfg.run.name == "exp 1"


def test_wrongly_typed_values_are_rejected():
    errors = problems(
        "ingest.dedup=maybe",
        "pretrain.lr=fast",
        "pretrain.steps=2.5",
        "pretrain.zero_stage=4",
        "ingest.set_weights=3",
        "model=3",
    )
    assert "expected true or false, got 'maybe'" in one(errors, "ingest.dedup")
    assert "expected a number, got 'fast'" in one(errors, "pretrain.lr")
    assert "expected an integer, got 2.5" in one(errors, "pretrain.steps")
    assert "4 is not one of 0, 1, 2, 3" in one(errors, "pretrain.zero_stage")
    assert "expected a mapping" in one(errors, "ingest.set_weights")
    assert "expected a section (mapping), got 3" in one(errors, "model")


def test_cross_field_checks_report_every_rule_broken():
    errors = problems(
        "model.d_model=130",
        "pretrain.global_batch_size=10",
        "pretrain.offload_params=true",
        "tokenize.val_fraction=0.7",
        "ingest.min_chars=100",
        "ingest.max_chars=50",
        "ingest.split_mb=0",
        "run.name=a/b",
    )
    assert "130 is not divisible by n_heads=4" in one(errors, "model.d_model")
    batch = one(errors, "pretrain.global_batch_size")
    assert "not divisible by num_workers x micro_batch_size = 16" in batch and "multiple of 16" in batch
    assert "needs zero_stage=3" in one(errors, "pretrain.offload_params")
    assert "[0, 0.5)" in one(errors, "tokenize.val_fraction")
    assert "greater than min_chars" in one(errors, "ingest.max_chars")
    assert "must be positive" in one(errors, "ingest.split_mb")
    assert "without '/'" in one(errors, "run.name")


def test_communication_keys_are_checked_in_every_training_section():
    errors = problems(
        "pretrain.grad_reduce_dtype=bf16",  # the preset trains in fp32
        "pretrain.zero3_shard_within=2",  # and with ZeRO-2
        "sft.zero_stage=3",
        "sft.zero3_shard_within=3",  # one worker
        "reward.zero3_prefetch_bucket_size=-1",
        "ppo.collective_timeout_min=0",
    )
    assert len(errors) == 5, errors
    dtype = one(errors, "pretrain.grad_reduce_dtype")
    assert "precision is fp32" in dtype and "set grad_reduce_dtype=fp32 or precision=bf16" in dtype
    assert "set zero_stage=3 or zero3_shard_within=0" in one(errors, "pretrain.zero3_shard_within")
    assert "divisor >= 2 of num_workers=1" in one(errors, "sft.zero3_shard_within")
    assert "DeepSpeed's default is 50_000_000" in one(errors, "reward.zero3_prefetch_bucket_size")
    assert "must be > 0" in one(errors, "ppo.collective_timeout_min")
    cfg = load_config(
        None,
        ["pretrain.precision=bf16", "pretrain.grad_reduce_dtype=bf16", "pretrain.zero_stage=3",
         "pretrain.num_workers=4", "pretrain.micro_batch_size=4", "pretrain.zero3_shard_within=2"],
    )  # fmt: skip
    assert (cfg.pretrain.grad_reduce_dtype, cfg.pretrain.zero3_shard_within) == ("bf16", 2)


def test_communication_settings_are_placement_not_identity():
    """How collectives gather, how long they wait and what dtype gradients are summed in are how a
    group communicates: changing them rebuilds nothing (under bf16 the reduction dtype moves losses
    about as much as the ZeRO stage does, bench/comm_settings.py --ranks 4; under fp32 not at all)."""
    from pipeline.config import WorkerGroupConfig

    for cls in (type(getattr(PipelineConfig(), s)) for s in ("pretrain", "sft", "reward", "ppo")):
        assert issubclass(cls, WorkerGroupConfig)
        for key in ("grad_reduce_dtype", "zero3_persistence_threshold", "zero3_max_reuse_distance",
                    "zero3_prefetch_bucket_size", "zero3_shard_within", "collective_timeout_min"):  # fmt: skip
            assert key in cls.PLACEMENT_KEYS, (cls.__name__, key)


def test_adaptive_kl_settings_that_would_stop_or_flip_beta_are_rejected():
    """The adaptive controller multiplies beta by 1 + e x rollout_batch_size / kl_horizon, e in
    [-0.2, 0.2]: from beta 0 it never moves, and a horizon under 0.2 x the batch can make it <= 0
    (a KL then rewarded, not penalised)."""
    errors = problems("ppo.kl_target=6", "ppo.kl_coef=0", "ppo.kl_horizon=25")
    assert "from 0 it stays 0" in one(errors, "ppo.kl_coef")
    assert "0.2 x rollout_batch_size = 25.6" in one(errors, "ppo.kl_horizon")  # the tiny preset's 128
    cfg = load_config(PROJECT_ROOT / "configs" / "tiny.yaml", ["ppo.kl_target=6", "ppo.kl_horizon=26"])
    assert cfg.ppo.kl_horizon == 26 and cfg.ppo.kl_coef > 0


def test_preset_file_problems_are_reported_with_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain:\n  lr: fast\n  stepz: 3\ntokenize:\n  seq_len: 4\n")
    errors = problems(path=bad)
    assert "expected a number" in one(errors, "pretrain.lr")
    assert "did you mean 'pretrain.steps'?" in one(errors, "pretrain.stepz")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(tmp_path / "list.yaml")


def _sections(schema) -> list[type]:
    found = [schema]
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            found.extend(_sections(hints[f.name]))
    return found


def test_every_config_field_has_a_docstring():
    missing = [
        f"{cls.__name__}.{f.name}"
        for cls in _sections(PipelineConfig)
        for f in dataclasses.fields(cls)
        if not field_docs(cls).get(f.name)
    ]
    assert not missing, f"fields without a docstring: {missing}"
    assert len(all_keys(PipelineConfig)) > 50


def cli(cwd, *args) -> tuple[int, str]:
    """`launch.py ARGS` in `cwd`: (exit code, stdout and stderr as one line, however the console wraps)."""
    proc = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "launch.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=110,
    )
    return proc.returncode, " ".join((proc.stdout + proc.stderr).split())


@pytest.mark.timeout(120)
def test_cli_rejects_bad_set_before_running(tmp_path):
    rc, out = cli(tmp_path, "run", "--set", "pretrain.lrr=1", "--set", "tokenize.seq_len=x", "--root", "tmp")
    assert rc == 2, out
    assert "2 problem(s)" in out
    assert "pretrain.lrr: unknown key; did you mean 'pretrain.lr'?" in out
    assert "tokenize.seq_len: expected an integer, got 'x'" in out
    assert not (tmp_path / "tmp").exists()
    assert not (tmp_path / "runs").exists()
    assert "Traceback" not in out


def test_unknown_keys_type_errors_and_range_errors_are_reported_in_one_pass():
    errors = problems("pretrain.lr=abc", "ppo.kl_coef=-1", "sft.nope=3")
    assert len(errors) == 3, errors
    assert "expected a number, got 'abc'" in one(errors, "pretrain.lr")
    assert "must be >= 0" in one(errors, "ppo.kl_coef")
    assert "unknown key" in one(errors, "sft.nope")


def test_a_section_with_a_bad_value_of_its_own_gets_no_range_error_judged_on_a_default():
    """min_chars=x falls back to its default 64, which max_chars=10 breaks: that is not the user's
    mistake, so only the type error is reported; other sections are still checked."""
    errors = problems("ingest.min_chars=x", "ingest.max_chars=10", "tokenize.seq_len=4")
    assert len(errors) == 2, errors
    assert "expected an integer, got 'x'" in one(errors, "ingest.min_chars")
    assert "must be >= 8" in one(errors, "tokenize.seq_len")
    errors = problems("ingest.min_chrs=100", "ingest.max_chars=80")  # a typo is a problem of its own too
    assert len(errors) == 1 and "did you mean 'ingest.min_chars'?" in one(errors, "ingest.min_chrs")


@pytest.mark.timeout(120)
def test_cli_dry_run_reports_every_kind_of_config_problem_at_once(tmp_path):
    rc, out = cli(
        tmp_path,
        "run",
        "--dry-run",
        "--set",
        "pretrain.lr=abc",
        "--set",
        "ppo.kl_coef=-1",
        "--set",
        "sft.nope=3",
    )
    assert rc == 2, out
    assert "3 problem(s)" in out
    assert "pretrain.lr: expected a number, got 'abc'" in out
    assert "ppo.kl_coef: must be >= 0" in out
    assert "sft.nope: unknown key" in out
    assert "Traceback" not in out


def test_a_stage_seed_trains_that_stage_anew_and_leaves_every_identity_alone_while_unset(tmp_path):
    from types import SimpleNamespace

    from kiln.workers import WorkerJob
    from pipeline.config import stage_seed
    from pipeline.dag import PIPELINE
    from pipeline.plan import fingerprinted_config

    base, seeded = load_config(), load_config(overrides=["grpo.seed=7", "dpo.seed=1234"])
    for (
        stage
    ) in PIPELINE.stages:  # unset: in neither the identity nor the record (older artifacts keep theirs)
        full, keyed = fingerprinted_config(base, stage)
        assert all("seed" not in d for s, d in full.items() if s != "run"), stage.name
        assert all("seed" not in d for s, d in keyed.items() if s != "run"), stage.name
        assert (keyed == fingerprinted_config(seeded, stage)[1]) == (stage.name not in ("grpo", "dpo")), (
            stage.name
        )
    assert fingerprinted_config(seeded, PIPELINE["grpo"])[1]["grpo"]["seed"] == 7
    assert [stage_seed(seeded, getattr(seeded, s)) for s in ("grpo", "dpo", "rloo", "ppo")] == [
        7,
        1234,
        1234,
        1234,
    ]
    ctx = SimpleNamespace(work_dir=tmp_path, tracker=None)  # what a stage's workers receive
    assert WorkerJob.new(ctx, seeded, seeded.grpo).seed == 7
    assert WorkerJob.new(ctx, seeded, seeded.rloo).seed == seeded.run.seed
