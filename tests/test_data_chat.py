"""The task and its data: the checking program, the shipped sets, and reading SFT / preference records
in every accepted format (prompt/completion, conversational messages, Anthropic HH) with bad records
counted by file:line. Pure functions: no Ray, no training."""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.chat_data import (
    BadRecord,
    load_records,
    normalise_preference,
    normalise_prompt,
    normalise_sft,
    parse_hh,
    split_eval,
)
from data_prep.task import KINDS, check, make_prompt, reference_answer, sentence_of, wrong_answer
from pipeline.config import PROJECT_ROOT, TASK_DATA

TASK = PROJECT_ROOT / TASK_DATA


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


# ---------------------------------------------------------------------------------------------------- the task


def test_check_accepts_exactly_the_reversed_first_words():
    p = make_prompt("The kiln  fires the clay slowly.")
    assert p == "Reverse the first 3 words: The kiln fires the clay slowly."
    assert sentence_of(p) == "The kiln fires the clay slowly."
    assert reference_answer(p) == "fires kiln The"
    assert check(p, "fires kiln The") and check(p, "  fires   kiln The\n")
    for wrong in (
        "The kiln fires",
        "fires kiln",
        "fires kiln the",
        "fires kiln The clay",
        "",
        "kiln fires The",
    ):
        assert not check(p, wrong), wrong
    assert not check("Translate: The kiln fires", "fires kiln The")  # not this task's prompt
    assert reference_answer("Reverse the first 3 words: too short") is None


def test_wrong_answers_are_wrong_and_well_formed_ones_have_three_words():
    rng = random.Random(0)
    sentences = ["The kiln fires the clay slowly.", "It is the default value here.", "It is the end of it."]
    for s in sentences:
        for kind, cls in KINDS.items():
            other = sentences[(sentences.index(s) + 1) % len(sentences)]
            answer = wrong_answer(s, kind, rng, other)
            assert not check(make_prompt(s), answer), (s, kind, answer)
            if cls == "well_formed":
                assert len(answer.split()) == 3 and all(w.isalpha() for w in answer.split()), (kind, answer)
    # the other sentence starts with the same words: still wrong
    assert wrong_answer("It is the end.", "other_sentence", rng, "It is the start.") != "the is It"


# ---------------------------------------------------------------------------------------------------- shipped sets


def test_shipped_sets_are_clean_balanced_and_disjoint():
    sft, st = load_records([TASK / "sft_train.jsonl.zst"], "sft")
    assert st["kept"] == st["read"] == len(sft) >= 2000 and not st["malformed"]
    pref_val, st = load_records([TASK / "pref_val.jsonl.zst"], "preference")
    assert st["kept"] == st["read"] and not st["malformed"]
    kinds = {k: sum(p["kind"] == k for p in pref_val) for k in KINDS}
    assert min(kinds.values()) >= 100, kinds  # every kind of rejected answer, ~1/7 each
    for p in pref_val:
        prompt = p["prompt"][-1]["content"]
        assert check(prompt, p["chosen"][0]["content"]) and not check(prompt, p["rejected"][0]["content"])
    held = {p["prompt"][-1]["content"] for p in pref_val}
    trained = {r["prompt"][-1]["content"] for r in sft}
    pref_train, _ = load_records([TASK / "pref_train.jsonl.zst"], "preference")
    trained |= {p["prompt"][-1]["content"] for p in pref_train}
    assert not held & trained  # held-out sentences are never trained on
    prompts = [json.loads(x) for x in _zstd_lines(TASK / "prompts_val.jsonl.zst")]
    assert {p["prompt"][-1]["content"] for p in prompts} == held


def test_shipped_policy_pairs_are_the_policys_wrong_answers_on_the_right_splits():
    """pref_policy_*: the SFT policy's own wrong answers against the right one (build_policy_pairs.py),
    from the preference split (train) and the held-out split (val) only; the counts reconcile."""
    stats = json.loads((TASK / "policy_pairs.json").read_text())
    splits = {
        "pref_policy_train.jsonl.zst": "pref_train.jsonl.zst",
        "pref_policy_val.jsonl.zst": "pref_val.jsonl.zst",
    }
    for name, synthetic in splits.items():
        pairs, st = load_records([TASK / name], "preference")
        c = stats["files"][name]
        assert st["kept"] == st["read"] == len(pairs) == c["pairs"] and not st["malformed"]
        assert c["answers"] == c["right"] + c["wrong"] == c["prompts"] * stats["samples_per_prompt"]
        per_prompt: dict[str, set] = {}
        for p in pairs:
            prompt, rejected = p["prompt"][-1]["content"], p["rejected"][0]["content"]
            assert (
                p["kind"] == "policy"
                and check(prompt, p["chosen"][0]["content"])
                and not check(prompt, rejected)
            )
            per_prompt.setdefault(prompt, set()).add(rejected)
        assert max(map(len, per_prompt.values())) <= stats["pairs_per_prompt"]
        same_split = {p["prompt"][-1]["content"] for p in load_records([TASK / synthetic], "preference")[0]}
        assert set(per_prompt) <= same_split  # the same sentences as the split's synthetic pairs


def test_policy_pairs_take_the_most_frequent_distinct_wrong_answers():
    from data_prep.build_policy_pairs import pairs

    s = "The kiln fires the clay slowly."
    got = [
        "fires kiln The",
        "kiln The fires",
        "the kiln The",
        "kiln The fires",
        "",
        "fires kiln The",
        "a b c",
        "a b c",
    ]
    records, counts = pairs([s, "It is what it is."], [got, ["is It", "what is It"]], per_prompt=2)
    assert [r["rejected"][0]["content"] for r in records] == [
        "a b c",
        "kiln The fires",
        "is It",
    ]  # ties: by text
    assert all(r["chosen"][0]["content"] == reference_answer(r["prompt"][0]["content"]) for r in records)
    assert counts == {"answers": 10, "wrong": 7, "right": 3, "empty": 1, "prompts": 2, "prompts_all_right": 0,
                      "pairs": 3}  # fmt: skip


@pytest.mark.timeout(120)
def test_shipped_sets_rebuild_byte_for_byte():
    proc = subprocess.run(
        [sys.executable, "data_prep/build_task_data.py", "--check"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _zstd_lines(path: Path) -> list[str]:
    import zstandard

    data = zstandard.ZstdDecompressor().decompress(path.read_bytes(), max_output_size=1 << 28)
    return data.decode().splitlines()


# ---------------------------------------------------------------------------------------------------- formats


def test_sft_formats_normalise_to_conversational_prompt_completion():
    want = {"prompt": user("Q"), "completion": assistant("A")}
    assert normalise_sft({"prompt": "Q", "completion": "A"}) == want
    assert normalise_sft({"prompt": user("Q"), "completion": assistant("A")}) == want
    assert normalise_sft({"messages": user("Q") + assistant("A")}) == want
    multi = [{"role": "system", "content": "S"}, *user("Q1"), *assistant("A1"), *user("Q2"), *assistant("A2")]
    got = normalise_sft({"messages": multi})
    assert got["prompt"] == multi[:4] and got["completion"] == assistant("A2")  # earlier turns are context


HH_CHOSEN = (
    "\n\nHuman: What is a kiln?\n\nAssistant: An oven for pottery.\n\nHuman: Hot?\n\nAssistant: Very hot."
)
HH_REJECTED = (
    "\n\nHuman: What is a kiln?\n\nAssistant: An oven for pottery.\n\nHuman: Hot?\n\nAssistant: No idea."
)


def test_hh_dialogues_become_a_shared_prompt_and_two_answers():
    assert parse_hh(HH_CHOSEN)[:2] == [*user("What is a kiln?"), *assistant("An oven for pottery.")]
    pair = normalise_preference({"chosen": HH_CHOSEN, "rejected": HH_REJECTED})
    assert pair["prompt"] == [*user("What is a kiln?"), *assistant("An oven for pottery."), *user("Hot?")]
    assert pair["chosen"] == assistant("Very hot.") and pair["rejected"] == assistant("No idea.")
    assert pair["kind"] == "unspecified"
    # conversational with an implicit prompt, and explicit prompt + string answers
    implicit = {"chosen": user("Q") + assistant("yes"), "rejected": user("Q") + assistant("no"), "kind": "k"}
    assert normalise_preference(implicit) == {
        "prompt": user("Q"), "chosen": assistant("yes"), "rejected": assistant("no"), "kind": "k",
    }  # fmt: skip
    assert normalise_preference({"prompt": "Q", "chosen": "yes", "rejected": "no"})["prompt"] == user("Q")


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"prompt": "Q"}, "missing_fields"),
        ({"text": "raw language modelling"}, "missing_fields"),
        ({"prompt": "Q", "completion": ""}, "empty"),
        ({"prompt": "Q", "completion": [{"role": "robot", "content": "A"}]}, "bad_role"),
        ({"prompt": "Q", "completion": user("A")}, "bad_role"),
        ({"prompt": "Q", "completion": [{"role": "assistant"}]}, "bad_type"),
        ({"messages": user("Q")}, "no_assistant_turn"),
        ({"messages": "Q"}, "bad_type"),
    ],
)
def test_bad_sft_records_name_their_reason(record, reason):
    with pytest.raises(BadRecord) as e:
        normalise_sft(record)
    assert e.value.reason == reason


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"chosen": "A"}, "missing_fields"),
        ({"chosen": "plain", "rejected": "text"}, "not_hh_format"),
        ({"chosen": HH_CHOSEN, "rejected": HH_CHOSEN}, "chosen_equals_rejected"),
        ({"prompt": "Q", "chosen": "A", "rejected": "A"}, "chosen_equals_rejected"),
        ({"chosen": assistant("A"), "rejected": assistant("B")}, "no_shared_prompt"),
        ({"prompt": "Q", "chosen": "A", "rejected": "B", "kind": 3}, "bad_type"),
        ({"chosen": "\n\nHuman: Q\n\nAssistant:", "rejected": "\n\nHuman: Q\n\nAssistant: B"}, "empty"),
    ],
)
def test_bad_preference_records_name_their_reason(record, reason):
    with pytest.raises(BadRecord) as e:
        normalise_preference(record)
    assert e.value.reason == reason


def test_prompts_normalise_to_messages_ending_with_a_user_turn():
    assert normalise_prompt({"prompt": "Q"}) == {"prompt": user("Q")}
    hh = normalise_prompt({"prompt": "\n\nHuman: A\n\nAssistant: B\n\nHuman: C\n\nAssistant:"})
    assert hh == {"prompt": user("A") + assistant("B") + user("C")}
    assert normalise_prompt({"messages": user("Q")}) == {"prompt": user("Q")}


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"text": "Q"}, "missing_fields"),
        ({"prompt": ""}, "empty"),
        ({"prompt": "\n\nAssistant:"}, "empty"),  # an HH string with nothing but an empty answer
        ({"prompt": user("Q") + assistant("A")}, "bad_role"),
        ({"prompt": 3}, "bad_type"),
    ],
)
def test_bad_prompt_records_name_their_reason(record, reason):
    with pytest.raises(BadRecord) as e:
        normalise_prompt(record)
    assert e.value.reason == reason


def test_malformed_records_are_counted_and_listed_with_file_and_line(tmp_path):
    good = {"prompt": "Q", "chosen": "yes", "rejected": "no"}
    lines = [
        json.dumps(good).encode(),  # 1
        b"{not json",  # 2 malformed_json
        b"",  # 3 blank: not a record
        b"\xff\xfe{}",  # 4 invalid_utf8
        b"[1, 2]",  # 5 not_an_object
        json.dumps({"chosen": "x"}).encode(),  # 6 missing_fields
        json.dumps({"chosen": HH_CHOSEN, "rejected": HH_REJECTED}).encode(),  # 7 good (HH)
        json.dumps({**good, "rejected": "yes"}).encode(),  # 8 chosen_equals_rejected
    ]
    plain = tmp_path / "pairs.jsonl"
    plain.write_bytes(b"\n".join(lines) + b"\n")
    gz = tmp_path / "more.jsonl.gz"
    gz.write_bytes(gzip.compress(json.dumps(good).encode() + b"\n" + b"{oops\n"))
    records, stats = load_records([str(tmp_path / "*.jsonl*")], "preference", max_errors=3)
    assert len(records) == stats["kept"] == 3
    assert stats["read"] == 9 and stats["blank_lines"] == 1
    assert stats["read"] == stats["kept"] + sum(stats["malformed"].values())  # every record accounted for
    assert stats["malformed"] == {
        "malformed_json": 2, "invalid_utf8": 1, "not_an_object": 1, "missing_fields": 1,
        "chosen_equals_rejected": 1,
    }  # fmt: skip
    by_file = {Path(f["path"]).name: f for f in stats["files"]}
    assert by_file["more.jsonl.gz"]["malformed"] == {"malformed_json": 1}
    assert len(stats["errors"]) == 3  # listed up to max_errors, all counted
    first = stats["errors"][0]
    assert (
        first["file"].endswith("more.jsonl.gz") and first["line"] == 2 and "malformed_json" in first["reason"]
    )


def test_sources_that_match_nothing_are_all_reported(tmp_path):
    with pytest.raises(ValueError) as e:
        load_records([str(tmp_path / "a.jsonl"), str(tmp_path / "b/*.jsonl.zst")], "sft", key="sft.data")
    msg = str(e.value)
    assert msg.count("sft.data: no file matches") == 2


def test_stage_data_problems_are_reported_before_training(tmp_path):
    import logging

    from kiln.trl_bridge import load_data
    from pipeline.config import ConfigError, load_config

    cfg = load_config(
        overrides=[f"sft.data=[{tmp_path}/missing.jsonl]", f"sft.eval_data=[{tmp_path}/gone.jsonl]"]
    )
    with pytest.raises(ConfigError) as e:
        load_data("sft", cfg.sft, "sft", 0, logging.getLogger("test"))
    assert "sft.data: no file matches" in str(e.value) and "sft.eval_data: no file matches" in str(e.value)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q"}\n{"nope": 1}\n')
    cfg = load_config(overrides=[f"sft.data=[{bad}]", "sft.eval_data=[]"])
    with pytest.raises(ValueError, match="no usable sft records"):
        load_data("sft", cfg.sft, "sft", 0, logging.getLogger("test"))


def test_eval_split_by_hash_is_stable_and_disjoint():
    records = [{"prompt": user(f"Q{i}"), "completion": assistant("A")} for i in range(400)]
    train, held = split_eval(records, 0.1, seed=7)
    assert len(train) + len(held) == 400 and 20 < len(held) < 60
    assert split_eval(list(reversed(records)), 0.1, seed=7)[1] == list(reversed(held))  # order-independent
    assert split_eval(records, 0.1, seed=8)[1] != held


def test_hub_datasets_are_read_through_datasets(tmp_path):
    """`hf:NAME[:SPLIT]` goes through `datasets.load_dataset` (streaming); a local dataset folder stands
    in for the hub here. Bad rows are counted by row number, as lines are for files."""
    folder = tmp_path / "hh_like"
    folder.mkdir()
    rows = [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, {"chosen": HH_CHOSEN, "rejected": HH_CHOSEN}]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records, stats = load_records([f"hf:{folder}:train"], "preference")
    assert len(records) == 1 and records[0]["chosen"] == assistant("Very hot.")
    assert stats["malformed"] == {"chosen_equals_rejected": 1} and stats["errors"][0]["line"] == 2


def test_trainer_arguments_follow_the_typed_config():

    from kiln.trl_bridge import trainer_args
    from pipeline.config import load_config

    cfg = load_config(overrides=["sft.precision=bf16", "sft.zero_stage=3", "sft.micro_batch_size=4"])
    args = trainer_args(cfg.sft, 7, world=2, output_dir="/tmp/x", fresh=True)
    ds = args["deepspeed"]
    assert args["bf16"] and not args["fp16"] and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert (
        ds["zero_optimization"]["stage"] == 3
        and ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    )
    assert args["gradient_accumulation_steps"] == ds["gradient_accumulation_steps"] == 16 // (2 * 4)
    assert (
        ds["train_batch_size"] == cfg.sft.global_batch_size
        and ds["gradient_clipping"] == args["max_grad_norm"]
    )
    assert args["lr_scheduler_kwargs"]["min_lr_rate"] == cfg.sft.min_lr / cfg.sft.lr
    assert args["eval_on_start"] and args["use_cpu"] and args["seed"] == args["data_seed"] == 7
    gpu = load_config(overrides=["reward.precision=fp16", "reward.gpus_per_worker=1"])
    args = trainer_args(gpu.reward, 7, world=1, output_dir="/tmp/x", fresh=False)
    assert (
        args["fp16"] and args["deepspeed"]["fp16"]["enabled"] and args["deepspeed"]["fp16"]["loss_scale"] == 0
    )
    assert not args["use_cpu"] and not args["eval_on_start"]  # a resumed run does not re-evaluate step 0
    with pytest.raises(Exception, match="fp16"):
        load_config(overrides=["reward.precision=fp16"])  # no loss-scaled fp16 on CPU
