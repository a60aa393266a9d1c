"""The sft and reward stages on the tiny preset (the session's `tiny_run`): what they learned, what they
export, their other data paths, and exact resume after a kill.

Figures on the shipped task (2 cores, fp32, 1 worker each) are asserted with margins and printed
(`pytest -s`): the reward model's held-out pairwise accuracy overall and on the well-formed-but-wrong
pairs; the SFT model's held-out task accuracy against the pretrained model's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.artifacts import ArtifactStore
from pipeline.config import PROJECT_ROOT, TASK_DATA, load_config
from pipeline.dag import PIPELINE
from pipeline.plan import Selection
from tests.pipeline_helpers import (
    artifact,
    copy_upstream,
    manifest,
    plan_of,
    reached,
    registered_step,
    rows,
    start_run,
    stopped_on_sigterm,
    tensors,
    wait_for,
)  # fmt: skip

pytestmark = pytest.mark.timeout(1800)


def changed(before, after) -> list[str]:
    """Names of tensors in `after` that are NOT different from `before`."""
    import torch

    return [k for k, v in after.items() if torch.equal(v, before[k])]


# ---------------------------------------------------------------------------------------------------- sft


def test_sft_learns_the_task_and_changes_every_parameter(tiny_run):
    _, cfg, _ = tiny_run
    sft, pre = artifact(cfg, "sft"), artifact(cfg, "pretrain")
    m = manifest(sft)["metrics"]
    print(
        f"\nSFT held-out task accuracy {m['task_accuracy']:.3f} (pretrained {m['task_accuracy_pretrained']:.3f}); "
        f"val loss {m['val_loss']:.3f} (pretrained {m['val_loss_pretrained']:.3f}); {manifest(sft)['seconds']:.0f} s"
    )
    assert m["task_accuracy_pretrained"] <= 0.02  # the pretrained model cannot do it ...
    assert m["task_accuracy"] >= 0.15  # ... the fine-tuned one often can, with room left for PPO
    assert m["task_accuracy"] <= 0.9
    assert m["val_loss"] < m["val_loss_pretrained"] - 2.0
    assert m["malformed_records"] == 0 and m["steps"] == cfg.sft.steps

    before, after = tensors(pre), tensors(sft)
    assert set(after) == set(before)
    assert changed(before, after) == []  # every trainable parameter moved (full fine-tuning)

    log = rows(sft)
    train = [r for r in log if "loss" in r]
    evals = [r for r in log if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(1, cfg.sft.steps + 1))  # every step once
    assert all({"lr", "grad_norm", "batch_crc"} <= set(r) for r in train)
    every = cfg.sft.eval_every
    assert [r["step"] for r in evals] == list(range(0, cfg.sft.steps + 1, every))
    assert all("task_accuracy" in r for r in evals)
    stats = json.loads((sft / "data_stats.json").read_text())
    assert stats["data"]["kept"] == stats["data"]["read"] > 0


def test_sft_model_answers_and_stops_at_end_of_turn(tiny_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import kiln.model  # noqa: F401
    from data_prep.bpe import END
    from data_prep.task import make_prompt

    _, cfg, _ = tiny_run
    path = artifact(cfg, "sft")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    end = tok.convert_tokens_to_ids(END)
    assert end in model.generation_config.eos_token_id  # generate() stops at <|end|> by default
    msgs = [{"role": "user", "content": make_prompt("It is the oven of the kiln.")}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    new = out[0, ids["input_ids"].shape[1] :].tolist()
    assert end in new and len(new) < 24, tok.decode(new)  # a short answer, then the end of the turn


# ---------------------------------------------------------------------------------------------------- reward


def test_reward_model_judges_correctness_and_is_ready_for_ppo(tiny_run):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import kiln.model  # noqa: F401
    from data_prep.chat_data import load_records
    from kiln.chat_eval import score_pairs

    _, cfg, _ = tiny_run
    rm, pre = artifact(cfg, "reward"), artifact(cfg, "pretrain")
    m = manifest(rm)["metrics"]
    kinds = {
        k.removeprefix("pairwise_accuracy_"): round(v, 3)
        for k, v in m.items()
        if k.startswith("pairwise_accuracy_")
    }
    print(
        f"\nreward model held-out pairwise accuracy {m['pairwise_accuracy']:.3f}, "
        f"well-formed-but-wrong {m['pairwise_accuracy_well_formed']:.3f}, damaged {m['pairwise_accuracy_damaged']:.3f}; "
        f"per kind {kinds}; margin {m['margin']:.3f}; reward mean {m['reward_mean']:.3f} std {m['reward_std']:.3f}; "
        f"{manifest(rm)['seconds']:.0f} s"
    )
    assert m["pairwise_accuracy"] >= 0.8
    assert m["pairwise_accuracy_well_formed"] >= 0.6  # chance is 0.5; ~460 pairs: 0.6 is > 4 sigma above it
    assert m["initial_pairwise_accuracy"] < 0.65
    assert m["reward_std"] > 0 and "reward_mean" in m and m["margin"] > 0

    # a sequence-classification folder with a `score` head, loaded as PPO will load it
    model, info = AutoModelForSequenceClassification.from_pretrained(rm, output_loading_info=True)
    assert model.config.num_labels == 1 and not info["missing_keys"] and hasattr(model, "score")
    tok = AutoTokenizer.from_pretrained(rm)
    pairs, _ = load_records([PROJECT_ROOT / cfg.reward.eval_data[0]], "preference")
    again = score_pairs(model, tok, pairs)
    assert (
        abs(again["pairwise_accuracy"] - m["pairwise_accuracy"]) < 1e-6
    )  # the exported weights are the trained ones
    assert abs(again["reward_mean"] - m["reward_mean"]) < 1e-4
    # the quality measures a PPO run reads, in the manifest and as the exported model gives them
    assert 0 <= m["calibration_ece"] <= 0.5 and -1 <= m["length_correlation"] <= 1
    assert again["calibration_ece"] == pytest.approx(m["calibration_ece"], abs=1e-5)

    before, after = tensors(pre), tensors(rm)
    backbone = {k: v for k, v in after.items() if k.startswith("model.")}
    assert set(backbone) == {k for k in before if k.startswith("model.")}
    assert changed(before, backbone) == []
    torch.manual_seed(cfg.run.seed)  # the score head as the stage initialised it
    init = AutoModelForSequenceClassification.from_pretrained(pre, num_labels=1).score.weight
    assert not torch.equal(init, after["score.weight"])


def test_shipped_policy_pairs_regenerate_from_the_session_sft_model(tiny_run):
    """pref_policy_* are built by data_prep/build_policy_pairs.py from a tiny-preset SFT model. The
    shipped files came from one machine's weights (their sha256 is in policy_pairs.json); another
    machine's SFT run differs in float rounding, so its answers are not those. What holds everywhere:
    the same code, with the shipped sampling settings, run on this session's SFT model for the first
    24 held-out prompts gives the same answers and pairs twice over (each answer has its own seeded
    generator: the global RNG, reseeded differently, and a fresh load change nothing); the pairs keep
    the shipped file's rules (the checker's right answer chosen, one of the model's own wrong answers
    rejected, at most `pairs_per_prompt` per prompt, the counts reconciling) and its format (the same
    lines, and the same prompt and chosen answer as the shipped pairs of those prompts). When the
    session's weights are the shipped ones, the pairs are also the shipped pairs, exactly."""
    import torch
    import zstandard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import kiln.model  # noqa: F401
    from data_prep import build_policy_pairs as bp
    from data_prep.build_task_data import CORPUS, compress, select_sentences, split_sentences
    from data_prep.task import check, make_prompt, reference_answer

    _, cfg, _ = tiny_run
    sft, stats = (
        artifact(cfg, "sft"),
        json.loads((PROJECT_ROOT / TASK_DATA / "policy_pairs.json").read_text()),
    )
    sentences = split_sentences(select_sentences(CORPUS))["heldout"][:24]
    k, per_prompt = stats["samples_per_prompt"], stats["pairs_per_prompt"]

    def regenerate(global_seed: int):
        torch.manual_seed(global_seed)  # no draw may come from it
        model, tok = AutoModelForCausalLM.from_pretrained(sft).eval(), AutoTokenizer.from_pretrained(sft)
        answers = bp.sample_answers(model, tok, sentences, k, stats["temperature"], stats["max_new_tokens"])
        return answers, *bp.pairs(sentences, answers, per_prompt)

    answers, got, counts = regenerate(0)
    again = regenerate(1)
    assert again == (answers, got, counts)  # deterministic: the same answers, pairs and counts
    assert compress(again[1]) == compress(got)  # ... and the same file, byte for byte

    # the shipped file's rules, on the regenerated pairs
    assert [len(a) for a in answers] == [k] * len(sentences)
    assert counts["prompts"] == len(sentences) and counts["answers"] == counts["right"] + counts["wrong"]
    assert counts["answers"] == len(sentences) * k and counts["pairs"] == len(got) > 24  # the model errs
    by_prompt: dict[str, list[str]] = {}
    own = {make_prompt(s): set(a) for s, a in zip(sentences, answers, strict=True)}
    for p in got:
        prompt, chosen, rejected = (p["prompt"][-1]["content"], p["chosen"][0]["content"],
                                    p["rejected"][0]["content"])  # fmt: skip
        assert p["kind"] == bp.KIND and chosen == reference_answer(prompt) and check(prompt, chosen)
        assert rejected and not check(prompt, rejected) and rejected in own[prompt]  # its own mistake
        by_prompt.setdefault(prompt, []).append(rejected)
    assert all(len(r) == len(set(r)) <= per_prompt for r in by_prompt.values())
    assert len(by_prompt) == counts["prompts"] - counts["prompts_all_right"]

    # ... and its format: lines as the shipped file's, which has the same prompt and chosen answer
    unzip = zstandard.ZstdDecompressor().decompress
    shipped_lines = unzip((PROJECT_ROOT / TASK_DATA / bp.FILES["heldout"]).read_bytes()).decode().splitlines()
    shipped = [json.loads(x) for x in shipped_lines]
    want = [(x, p) for x, p in zip(shipped_lines, shipped, strict=True) if p["prompt"][-1]["content"] in own]
    assert all(x == json.dumps(p, ensure_ascii=False) for x, p in want)  # written as compress() writes
    ref = {p["prompt"][-1]["content"]: p for _, p in want}
    ours = [json.loads(x) for x in unzip(compress(got)).decode().splitlines()]
    assert ours == got
    compared = [r for r in ours if r["prompt"][-1]["content"] in ref]
    assert len({r["prompt"][-1]["content"] for r in compared}) >= 12  # most of the 24 prompts
    for r in compared:
        assert list({**ref[r["prompt"][-1]["content"]], "rejected": r["rejected"]}.items()) == list(r.items())

    pairs_of = [(p["prompt"][-1]["content"], p["rejected"][0]["content"]) for p in got]
    shipped_pairs = [(p["prompt"][-1]["content"], p["rejected"][0]["content"]) for _, p in want]
    same_weights = bp.weights_sha256(sft) == stats["policy_weights_sha256"]
    print(
        f"\npolicy pairs from this session's SFT model, first 24 held-out prompts: {len(got)} pairs, "
        f"{counts['wrong']}/{counts['answers']} answers wrong, regenerated identically; "
        f"{len(set(pairs_of) & set(shipped_pairs))}/{len(shipped_pairs)} of the shipped pairs reproduced "
        f"({'the shipped weights: compared exactly' if same_weights else 'other weights than the shipped ones'})"
    )
    if same_weights:  # the machine the files were built on: they are this model's answers
        assert pairs_of == shipped_pairs


def test_held_out_pairs_over_max_length_are_left_out_and_counted(tiny_run):
    """TRL drops training pairs over reward.max_length; the held-out figures (and the reward mean and
    std PPO normalises with) leave out the held-out pairs over it too, and count them."""
    from transformers import AutoTokenizer

    from data_prep.build_task_data import assistant, user
    from kiln.chat_eval import conversation_ids
    from stages.reward import within_length

    _, cfg, _ = tiny_run
    tok = AutoTokenizer.from_pretrained(artifact(cfg, "pretrain"))
    short = {"prompt": user("Q"), "chosen": assistant("a"), "rejected": assistant("b")}
    long = {**short, "rejected": assistant("b " * 300)}
    sides = [short["prompt"] + short[side] for side in ("chosen", "rejected")]
    n = max(len(conversation_ids(tok, c)) for c in sides)
    assert within_length(tok, [short, long], 256) == ([short], 1)
    assert within_length(tok, [short], n) == ([short], 0) and within_length(tok, [short], n - 1) == ([], 1)
    assert manifest(artifact(cfg, "reward"))["metrics"]["eval_too_long_pairs"] == 0  # the shipped pairs fit


def test_sft_and_reward_train_at_the_same_time(tiny_run):
    """sft and reward read only pretrain (pipeline/dag.py), and the runner starts every stage whose
    inputs are complete as its own Ray task; a training stage's task holds no CPU, its worker group
    does. The tiny preset gives each 1 worker of 1 CPU, and the session's Ray has 2 CPUs, so both
    groups are placed at once and train side by side. Measured from the stages' own step rows: each
    training step's metrics row carries the wall-clock `time` it was logged at (MetricsLog.write),
    and the two stages' training intervals [first step, last step] must overlap by more than a
    quarter of the shorter one. Serial training gives disjoint intervals (an overlap <= 0)."""
    _, cfg, _ = tiny_run
    spans = {}
    for stage in ("sft", "reward"):
        times = [r["time"] for r in rows(artifact(cfg, stage)) if "loss" in r]  # one per training step
        assert len(times) == getattr(cfg, stage).steps and times == sorted(times), stage
        spans[stage] = (times[0], times[-1])
    (a0, a1), (b0, b1) = spans["sft"], spans["reward"]
    overlap, shorter = min(a1, b1) - max(a0, b0), min(a1 - a0, b1 - b0)
    print(
        f"\nsft trained {a1 - a0:.1f} s, reward {b1 - b0:.1f} s (reward's first step {b0 - a0:+.1f} s after "
        f"sft's); overlap {overlap:.1f} s = {overlap / shorter:.0%} of the shorter"
    )
    assert shorter > 0 and overlap > 0.25 * shorter, spans


def test_a_silent_ddp_fallback_fails_the_stage():
    from accelerate.utils import DistributedType

    from kiln.trl_bridge import check_deepspeed

    def trainer(kind, stage):
        plugin = SimpleNamespace(zero_stage=stage) if stage is not None else None
        return SimpleNamespace(
            accelerator=SimpleNamespace(distributed_type=kind, state=SimpleNamespace(deepspeed_plugin=plugin))
        )

    check_deepspeed(trainer(DistributedType.DEEPSPEED, 2), 2)
    with pytest.raises(RuntimeError, match="not DeepSpeed ZeRO-2"):
        check_deepspeed(trainer(DistributedType.MULTI_CPU, None), 2)
    with pytest.raises(RuntimeError, match="ZeRO stage 3"):
        check_deepspeed(trainer(DistributedType.DEEPSPEED, 3), 2)


# ---------------------------------------------------------------------------------------------------- other data


HH = [
    (
        "\n\nHuman: Name a hot place.\n\nAssistant: A kiln.",
        "\n\nHuman: Name a hot place.\n\nAssistant: A fridge.",
    ),
    (
        "\n\nHuman: What does a potter fire?\n\nAssistant: Clay.\n\nHuman: In what?\n\nAssistant: In a kiln.",
        "\n\nHuman: What does a potter fire?\n\nAssistant: Clay.\n\nHuman: In what?\n\nAssistant: In a pond.",
    ),
]


def test_hh_preferences_and_conversational_sft_run_through_the_stages(tiny_run, tmp_path):
    """Anthropic HH strings for reward and `messages` records for SFT, each with a malformed line:
    both stages train on them (a few steps, with LoRA) and count the bad record in their manifest.
    The exported weights are merged: the LoRA targets moved, nothing else of the backbone did."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import kiln.model  # noqa: F401
    from data_prep.chat_data import load_records, split_eval
    from kiln.chat_eval import score_pairs
    from pipeline.runner import run_pipeline

    ref_root, ref_cfg, _ = tiny_run
    hh = tmp_path / "hh.jsonl"
    lines = [
        json.dumps(
            {
                "chosen": c.replace("Human: ", f"Human: ({i}) ", 1),
                "rejected": r.replace("Human: ", f"Human: ({i}) ", 1),
            }
        )
        for i, (c, r) in enumerate(HH * 20)
    ] + ['{"chosen": "no dialogue"']  # 40 distinct dialogues (the eval split is by content), one broken
    hh.write_text("\n".join(lines) + "\n")
    chat = tmp_path / "chat.jsonl"
    msgs = [
        {"messages": [{"role": "user", "content": f"Say {w} ({i})."}, {"role": "assistant", "content": w}]}
        for i, w in enumerate(("kiln", "clay", "glaze", "fire") * 10)
    ]
    chat.write_text("\n".join(json.dumps(m) for m in msgs) + '\n{"messages": [{"role": "user"}]}\n')
    short = ["steps=4", "eval_every=2", "checkpoint_every=2", "eval_data=[]", "eval_fraction=0.2", "lora_r=4"]
    cfg = load_config(
        overrides=[
            f"run.root={tmp_path / 'runs'}", "run.wandb=disabled",
            f"reward.data=[{hh}]", f"sft.data=[{chat}]", "sft.task_prompts=null",
            *(f"{s}.{o}" for s in ("sft", "reward") for o in short),
        ]
    )  # fmt: skip
    copy_upstream(ref_cfg, cfg)
    outcome = run_pipeline(cfg, PIPELINE, Selection(only=("sft", "reward")))
    assert outcome.ok, (outcome.errors, outcome.blocked)
    for stage, n_good in (("sft", 40), ("reward", 40)):
        path = artifact(cfg, stage)
        m = manifest(path)["metrics"]
        assert m["malformed_records"] == 1 and m["steps"] == 4, m
        stats = json.loads((path / "data_stats.json").read_text())
        assert stats["data"]["read"] == n_good + 1 and stats["data"]["kept"] == n_good
        assert m["train_records"] + m["eval_records"] == n_good and m["eval_records"] > 0  # eval_fraction 0.2
        (err,) = stats["data"]["errors"]
        assert err["line"] == n_good + 1 and err["file"].endswith((".jsonl",))
    assert "task_accuracy" not in rows(artifact(cfg, "sft"))[-1]  # no task prompts: no task accuracy
    m = manifest(artifact(cfg, "reward"))["metrics"]
    assert "pairwise_accuracy_unspecified" in m and m["lora_r"] == 4

    pre = tensors(artifact(cfg, "pretrain"))
    targets = cfg.sft.lora_targets
    for stage in ("sft", "reward"):
        after = tensors(artifact(cfg, stage))
        backbone = [k for k in after if k in pre]
        moved = {k for k in backbone if not torch.equal(pre[k], after[k])}
        assert moved <= {k for k in backbone if k.split(".")[-2] in targets}, stage  # only LoRA targets
        attention = {k for k in backbone if k.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj")}
        assert attention <= moved, stage  # merged (an expert no token reached in 4 steps may not move)
    # the merged reward model scores the held-out pairs as the stage's last evaluation did
    path = artifact(cfg, "reward")
    pairs = split_eval(load_records([hh], "preference")[0], cfg.reward.eval_fraction, cfg.run.seed)[1]
    again = score_pairs(
        AutoModelForSequenceClassification.from_pretrained(path), AutoTokenizer.from_pretrained(path), pairs
    )
    assert abs(again["reward_mean"] - m["reward_mean"]) < 1e-4 and again["eval_pairs"] == m["eval_pairs"]


# ---------------------------------------------------------------------------------------------------- resume


@pytest.mark.heavy  # ~6-9 min on 2 cores: sft and reward trained again, killed and resumed
def test_sft_and_reward_resume_after_kills_equal_the_uninterrupted_run(tiny_run, tmp_path):
    """sft and reward side by side, as the preset runs them. reward's worker is killed after its first
    checkpoint (Ray Train restarts the group); once it has resumed, the driver gets SIGTERM: both
    stages save their current step and the run exits; a re-run resumes both there. Each finished stage
    logs the session run's losses (fp32, within 1e-5), the same sample ids at every step, and one W&B run."""
    _, ref_cfg, _ = tiny_run
    root, ray_tmp, log = tmp_path / "runs", Path(f"/tmp/kiln-sft-resume-{os.getpid()}"), tmp_path / "run.log"
    cfg = load_config(overrides=[f"run.root={root}"])
    copy_upstream(ref_cfg, cfg)
    plan, ref = plan_of(cfg), plan_of(ref_cfg)
    assert [n for n, p in plan.items() if p.action == "run"] == ["sft", "reward", "ppo"]
    assert all(plan[s].fingerprint == ref[s].fingerprint for s in ("sft", "reward"))
    store = ArtifactStore(str(root), cfg.run.name)
    every = cfg.reward.checkpoint_every

    def resumed_reward() -> bool:  # the restarted group trained a few steps past its checkpoint
        said = store.log_path("reward").read_text() if store.log_path("reward").exists() else ""
        return f"reward: resumed from its checkpoint at step {every}" in said and reached(
            store, plan["reward"], every + 3
        )

    proc = None
    try:
        proc = start_run(root, ray_tmp, log, "--only", "sft,reward")
        wait_for(
            lambda: reached(store, plan["reward"], every + 10, every), 900, "reward's first checkpoint", proc
        )
        pids = store.work_dir("reward", plan["reward"].work_key) / "worker_pids"
        assert registered_step(pids.parent) == every  # not yet the next one
        os.kill(int((pids / "rank0").read_text().split()[0]), signal.SIGKILL)  # Ray Train restarts it
        wait_for(resumed_reward, 900, "reward's resume", proc)
        since = log.stat().st_size
        proc.send_signal(signal.SIGTERM)  # both stages save where they are, and the run exits
        stopped = stopped_on_sigterm(proc, log, since, cfg.run.preempt_grace_s)
        assert set(stopped) == {"sft", "reward"}, stopped
        assert stopped["reward"] > every and 0 < stopped["sft"] < cfg.sft.steps, stopped
        assert store.check("sft", plan["sft"].fingerprint)[0] is None  # no artifact yet
        proc = start_run(root, ray_tmp, log, "--only", "sft,reward")
        assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", str(ray_tmp)], check=False)  # Ray processes left over
        shutil.rmtree(ray_tmp, ignore_errors=True)

    resumes = {"reward": [every, stopped["reward"]], "sft": [stopped["sft"]]}
    for stage in ("reward", "sft"):
        said = store.log_path(stage).read_text()
        found = [int(n) for n in re.findall(rf"{stage}: resumed from its checkpoint at step (\d+)", said)]
        assert found == resumes[stage], (stage, found)  # the kill and SIGTERM took effect
        section, got = getattr(cfg, stage), rows(store.find(stage, plan[stage].fingerprint).path)
        want = rows(Path(ref[stage].path))
        got_train, want_train = [r for r in got if "loss" in r], [r for r in want if "loss" in r]
        assert [r["step"] for r in got_train] == list(range(1, section.steps + 1))  # no step twice, none lost
        assert [r["batch_crc"] for r in got_train] == [r["batch_crc"] for r in want_train]  # same samples
        worst = max(abs(a["loss"] - b["loss"]) for a, b in zip(got_train, want_train, strict=True))
        print(f"\n{stage} resumed after the kills: largest per-step loss difference {worst:.2e}")
        assert worst <= 1e-5, (stage, worst)
        got_eval = [(r["step"], r["val_loss"]) for r in got if "val_loss" in r]
        want_eval = [(r["step"], r["val_loss"]) for r in want if "val_loss" in r]
        assert [s for s, _ in got_eval] == [s for s, _ in want_eval]
        assert max(abs(a - b) for (_, a), (_, b) in zip(got_eval, want_eval, strict=True)) <= 1e-5
    run_ids = {manifest(store.find(s, plan[s].fingerprint).path)["wandb_run_id"] for s in ("sft", "reward")}
    runs = {d.name.rsplit("-", 1)[1] for d in (store.run_dir / "wandb").glob("offline-run-*")}
    assert runs == run_ids and len(run_ids) == 2  # one W&B run per stage, continued after the kills
