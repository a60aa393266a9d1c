"""Blending sources when batches are drawn (kiln/mixture.py, `pretrain.mixture`).

    pytest tests/test_mixture.py

The draw is checked on its own (weights honoured, each source's windows once per its epoch, a pure
function of the step), then in the pipeline: a changed weight plans pretraining again and not the data
stages, and a pretraining run with a mixture reports the tokens each source gave and the held-out loss
of each source.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from kiln import training as T
from kiln.mixture import Mixture, allocation, integer_weights, mixture_problems
from pipeline.config import ConfigError, load_config

SOURCES = {"Github": (0, 30), "Pile-CC": (30, 200), "Wikipedia (en)": (230, 7)}
N = 237


def sequential_dhondt(weights: dict[str, int], n: int) -> dict[str, int]:
    """D'Hondt seat by seat: each draw to the largest weight / (draws so far + 1), ties to the first listed."""
    got = dict.fromkeys(weights, 0)
    for _ in range(n):
        best = max(weights, key=lambda k: (weights[k] / (got[k] + 1), -list(weights).index(k)))
        got[best] += 1
    return got


def test_allocation_is_dhondt_seat_by_seat_and_never_falls():
    rng = random.Random(0)
    for _ in range(200):
        weights = {f"s{i}": rng.choice([0, 1, 2, 3, 7, 10, 250]) for i in range(rng.randint(1, 6))}
        weights["s0"] = weights["s0"] or 1
        before = dict.fromkeys(weights, 0)
        for n in range(120):
            got = allocation(weights, n)
            assert got == sequential_dhondt(weights, n), (weights, n)
            assert sum(got.values()) == n and all(got[k] >= before[k] for k in got)
            quota = {k: weights[k] * n / sum(weights.values()) for k in got}
            assert all(got[k] >= int(quota[k]) for k in got)  # the lower quota
            assert all(abs(got[k] - quota[k]) < len(weights) for k in got)  # within fewer than S windows
            before = got
    assert integer_weights({"a": 0.3, "b": 1.0, "c": 2.5}) == {"a": 3, "b": 10, "c": 25}


def test_weighted_draw_honours_the_weights_and_each_sources_epochs():
    mix = Mixture(SOURCES, N, {"Github": 1.0, "Pile-CC": 1.0, "Wikipedia (en)": 0.5}, seed=7)
    steps, size = 40, 16
    batches = [mix.batch(s, size) for s in range(steps)]
    assert all(len(b) == size and b.dtype == np.int64 for b in batches)
    drawn = np.concatenate(batches)
    of = {k: drawn[(drawn >= first) & (drawn < first + n)] for k, (first, n) in SOURCES.items()}
    counts = {k: len(v) for k, v in of.items()}
    assert (
        counts
        == mix.windows_per_source(steps, size)
        == {"Github": 256, "Pile-CC": 256, "Wikipedia (en)": 128}
    )
    # Github's 30 windows are drawn 256 times, over 8 whole epochs of it and 16 draws of the ninth
    times = np.bincount(of["Github"], minlength=30)
    assert sorted(times.tolist()) == [8] * 14 + [9] * 16
    # Pile-CC's 200 windows are drawn 256 times: one whole epoch and 56 draws of the next
    assert sorted(np.bincount(of["Pile-CC"] - 30, minlength=200).tolist()) == [1] * 144 + [2] * 56
    # a pure function of the step: a resumed run draws what an uninterrupted one did
    again = Mixture(SOURCES, N, {"Github": 1.0, "Pile-CC": 1.0, "Wikipedia (en)": 0.5}, seed=7)
    assert all(np.array_equal(again.batch(s, size), batches[s]) for s in (39, 3, 0))
    assert not np.array_equal(
        Mixture(SOURCES, N, {"Github": 1.0, "Pile-CC": 1.0}, seed=8).batch(3, size), batches[3]
    )
    # a source not listed is not drawn
    only = np.concatenate([Mixture(SOURCES, N, {"Pile-CC": 1.0}, seed=7).batch(s, size) for s in range(20)])
    assert ((only >= 30) & (only < 230)).all()


def test_natural_proportions_are_the_plain_draw_and_count_what_it_drew():
    mix = Mixture(SOURCES, N, None, seed=3)
    steps, size = 31, 16  # two epochs of 237 windows and a part of the third
    drawn = np.concatenate([mix.batch(s, size) for s in range(steps)])
    assert np.array_equal(drawn, np.concatenate([T.global_batch(s, size, N, 3) for s in range(steps)]))
    counts = {k: int(((drawn >= first) & (drawn < first + n)).sum()) for k, (first, n) in SOURCES.items()}
    assert mix.windows_per_source(steps, size) == counts and sum(counts.values()) == steps * size


def test_a_mixture_that_cannot_be_drawn_is_refused_naming_the_key():
    problems = mixture_problems({"Github": 1.0, "Arxiv": 2.0}, SOURCES)
    assert problems == [
        "pretrain.mixture.Arxiv: no such source in the token shards; they hold "
        "['Github', 'Pile-CC', 'Wikipedia (en)']"
    ]
    assert "no training window" in mixture_problems({"Empty": 1.0}, {"Empty": (0, 0), "Other": (0, 5)})[0]
    assert mixture_problems({"Github": 0.0}, SOURCES) == [
        "pretrain.mixture: no source has a weight > 0; give one a weight > 0"
    ]
    with pytest.raises(ValueError, match="no such source"):
        Mixture(SOURCES, N, {"Arxiv": 1.0}, seed=0)
    with pytest.raises(ConfigError, match=r"pretrain.mixture.Github: -1.0 is not a weight"):
        load_config(overrides=["pretrain.mixture={Github: -1}"])


# ---------------------------------------------------------------------------------------------------- pipeline


def test_a_changed_weight_plans_pretraining_again_and_not_the_data_stages(tiny_run):
    from tests.pipeline_helpers import plan_of

    _, cfg, _ = tiny_run
    sources = train_sources(cfg)
    weights = ", ".join(f"'{k}': {1 + i}" for i, k in enumerate(sources))
    changed = load_config(
        overrides=[f"run.root={cfg.run.root}", "run.wandb=offline", f"pretrain.mixture={{{weights}}}"]
    )
    plan = plan_of(changed)
    assert {n: p.action for n, p in plan.items()} == {
        "ingest": "skip", "tokenizer": "skip", "tokenize": "skip",
        "pretrain": "run", "sft": "run", "reward": "run", "ppo": "run",
    }  # fmt: skip
    assert "pretrain.mixture" in plan["pretrain"].reason


def train_sources(cfg) -> dict:
    from data_prep.packed import PackedTokens
    from tests.pipeline_helpers import artifact

    return PackedTokens(artifact(cfg, "tokenize"), "train").sources


@pytest.mark.timeout(300)
def test_pretraining_with_a_mixture_reports_tokens_and_heldout_loss_per_source(tiny_run, tmp_path):
    from pipeline.dag import PIPELINE
    from pipeline.plan import Selection
    from pipeline.runner import run_pipeline
    from tests.pipeline_helpers import artifact, copy_upstream, manifest

    _, ref_cfg, _ = tiny_run
    sources = train_sources(ref_cfg)
    big = max(sources, key=lambda k: sources[k][1])  # the largest source, drawn as much as all the others
    weights = {k: (1.0 if k == big else 1.0 / (len(sources) - 1)) for k in sources}
    text = ", ".join(f"'{k}': {w}" for k, w in weights.items())
    cfg = load_config(overrides=[
        f"run.root={tmp_path}", "run.wandb=disabled", "pretrain.steps=4", "pretrain.eval_every=4",
        f"pretrain.mixture={{{text}}}",
    ])  # fmt: skip
    copy_upstream(ref_cfg, cfg, ("ingest", "tokenizer", "tokenize"))
    outcome = run_pipeline(cfg, PIPELINE, Selection(only=("pretrain",)))
    assert outcome.ok, outcome.errors
    metrics = manifest(artifact(cfg, "pretrain"))["metrics"]
    seq_len, size = cfg.tokenize.seq_len, cfg.pretrain.global_batch_size
    seen = {k: metrics[f"tokens_seen/{k}"] for k in sources}
    assert sum(seen.values()) == 4 * size * seq_len
    # half the draws, as the weights say, within fewer than one window per source (`allocation`)
    assert abs(seen[big] / seq_len - 4 * size / 2) < len(sources)
    # the session run (natural proportions) and this one score the same held-out windows by source
    natural = manifest(artifact(ref_cfg, "pretrain"))["metrics"]
    scored = {k for k in natural if k.startswith("val_loss/")}
    assert scored and scored == {k for k in metrics if k.startswith("val_loss/")}
    assert scored <= {f"val_loss/{k}" for k in sources}


def test_sft_and_ppo_score_the_windows_pretraining_held_out_before_and_after_training(tiny_run):
    """The loss on pretraining's held-out windows, by source, after each model stage: before sft it is
    pretraining's own `val_loss/<source>` (the same windows, the same model), before ppo sft's; after each,
    what that stage cost each source."""
    from tests.pipeline_helpers import artifact, manifest

    _, cfg, _ = tiny_run
    pretrain, sft, ppo = (manifest(artifact(cfg, s))["metrics"] for s in ("pretrain", "sft", "ppo"))
    sources = [k.removeprefix("val_loss/") for k in pretrain if k.startswith("val_loss/")]
    assert len(sources) > 3
    for source in sources:
        assert sft[f"heldout_loss_pretrained/{source}"] == pytest.approx(
            pretrain[f"val_loss/{source}"], abs=1e-4
        )
        assert ppo[f"heldout_loss_sft/{source}"] == pytest.approx(sft[f"heldout_loss/{source}"], abs=1e-4)
        assert sft[f"heldout_loss/{source}"] != sft[f"heldout_loss_pretrained/{source}"]
        assert ppo[f"heldout_loss/{source}"] != ppo[f"heldout_loss_sft/{source}"]
