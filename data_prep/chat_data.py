"""SFT and preference records in TRL's standard formats, read with every bad record counted by file:line.

    records, stats = load_records(["data_prep/sample/task/sft_train.jsonl.zst"], "sft")
    pairs, stats = load_records(["hf:Anthropic/hh-rlhf:train"], "preference")

Sources are paths or globs (.jsonl / .jsonl.zst / .jsonl.gz, relative to the working directory, then
the project) or `hf:NAME[:SPLIT]` hub datasets, read by the same streaming readers as ingest.
Each record is normalised to one conversational shape, so the trainers see one format:

    sft         {"prompt": [messages], "completion": [messages]}
    preference  {"prompt": [messages], "chosen": [messages], "rejected": [messages], "kind": str}
    prompt      {"prompt": [messages]}                      (PPO's prompts: the last turn is the user's)

Accepted as SFT:
    {"prompt": str | messages, "completion": str | messages}   a string prompt becomes a user turn,
                                                               a string completion an assistant turn
    {"messages": messages}                                     split before the last assistant turn:
                                                               earlier turns are context, not trained on
Accepted as preferences:
    {"prompt"?: str | messages, "chosen": str | messages, "rejected": str | messages, "kind"?: str}
    Anthropic HH: chosen / rejected strings "\\n\\nHuman: ... \\n\\nAssistant: ..." are parsed into turns
    Without a prompt (HH, or message lists): the turns chosen and rejected share become the prompt.
Accepted as prompts:
    {"prompt": str | messages} or {"messages": messages}, ending with a user turn; an HH string
    "\n\nHuman: ...\n\nAssistant:" is parsed into its turns
"messages" are lists of {"role": system | user | assistant, "content": str}; a completion (or chosen /
rejected after the prompt) must be assistant turns. `kind` (optional) names the kind of rejected
answer, for per-kind accuracy; missing, it is "unspecified".

Bad records are never dropped silently: each is counted under one reason, per file and in total, and
the first `max_errors` are listed with file and line (the contract of ingest's stats.json):
too_long, invalid_utf8, malformed_json, not_an_object, missing_fields, bad_type, bad_role, empty,
no_assistant_turn, not_hh_format, no_shared_prompt, chosen_equals_rejected. Blank lines are counted
apart (`blank_lines`), not as records.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

from data_prep.readers import read_hf, read_lines, resolve_sources

ROLES = ("system", "user", "assistant")
HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


class BadRecord(ValueError):
    """A record that cannot be used; `reason` is its counter name."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


# ---------------------------------------------------------------------------------------------------- loading


def load_records(
    sources, kind: str, roots: tuple[Path, ...] | None = None, max_errors: int = 200, key: str = "data"
) -> tuple[list[dict], dict]:
    """All good records of `sources`, normalised as `kind` ("sft" | "preference" | "prompt" | "answers"), and their stats.
    Raises ValueError listing every source that matches no file (prefixed with the config `key`)."""
    normalise = {"sft": normalise_sft, "preference": normalise_preference, "prompt": normalise_prompt,
                 "answers": normalise_answers}[kind]  # fmt: skip
    paths = resolve_sources([str(s) for s in sources], roots or (Path.cwd(),), key)
    records: list[dict] = []
    stats = {"read": 0, "kept": 0, "malformed": Counter(), "blank_lines": 0, "files": [], "errors": []}
    for path in paths:
        entry = {"path": path, "read": 0, "kept": 0, "malformed": Counter()}
        for line, raw in _raw_records(path):
            if isinstance(raw, bytes) and not raw.strip():
                stats["blank_lines"] += 1
                continue
            entry["read"] += 1
            try:
                records.append(normalise(_decode(raw)))
                entry["kept"] += 1
            except BadRecord as e:
                entry["malformed"][e.reason] += 1
                if len(stats["errors"]) < max_errors:
                    stats["errors"].append({"file": path, "line": line, "reason": str(e)})
        for k in ("read", "kept"):
            stats[k] += entry[k]
        stats["malformed"].update(entry["malformed"])
        stats["files"].append({**entry, "malformed": dict(entry["malformed"])})
    stats["malformed"] = dict(stats["malformed"])
    return records, stats


def warn_malformed(logger, key: str, stats: dict) -> None:
    """One warning when `load_records` found malformed records: how many of how many, by reason, and
    the first few with file:line (all of them are in the stage's data stats)."""
    if bad := sum(stats["malformed"].values()):
        first = "; ".join(f"{e['file']}:{e['line']}: {e['reason']}" for e in stats["errors"][:5])
        logger.warning("%s: %d of %d records malformed %s, e.g. %s", key, bad, stats["read"], stats["malformed"], first)  # fmt: skip


MAX_LINE_BYTES = 1 << 24


def _raw_records(path: str):
    """(line number, the line's bytes, None for an over-long line, or a dict from a hub dataset)."""
    if path.startswith("hf:"):
        return read_hf(path)
    return read_lines(path, max_line_bytes=MAX_LINE_BYTES)


def _decode(raw) -> dict:
    if isinstance(raw, dict):
        return raw
    if raw is None:
        raise BadRecord("too_long", f"line longer than {MAX_LINE_BYTES >> 20} MiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord("invalid_utf8", str(e)) from None
    try:
        record = json.loads(text)
    except ValueError as e:
        raise BadRecord("malformed_json", str(e)) from None
    if not isinstance(record, dict):
        raise BadRecord("not_an_object", f"a JSON {type(record).__name__}")
    return record


def split_eval(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval): a record goes to eval when the hash of its content and the seed falls below
    `fraction`, so the split does not depend on file order and is the same on every run."""
    train, held = [], []
    for r in records:
        h = hashlib.blake2b(f"{seed}|{json.dumps(r, sort_keys=True)}".encode(), digest_size=8).digest()
        (held if int.from_bytes(h, "little") / 2**64 < fraction else train).append(r)
    return train, held


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------------- formats


def normalise_sft(record: dict) -> dict:
    if "messages" in record and "prompt" not in record:
        messages = _messages(record["messages"], "messages")
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise BadRecord("no_assistant_turn", "messages has no assistant turn to train on")
        prompt, completion = messages[:last], messages[last:]
    elif "prompt" in record and "completion" in record:
        prompt = _turns(record["prompt"], "prompt", "user")
        completion = _turns(record["completion"], "completion", "assistant")
    else:
        raise BadRecord("missing_fields", f"has {sorted(record)}; needs prompt + completion, or messages")
    _assistant_only(completion, "completion")
    return {"prompt": prompt, "completion": completion}


def normalise_preference(record: dict) -> dict:
    missing = [k for k in ("chosen", "rejected") if k not in record]
    if missing:
        raise BadRecord("missing_fields", f"no {' or '.join(missing)}; has {sorted(record)}")
    kind = record.get("kind", "unspecified")
    if not isinstance(kind, str):
        raise BadRecord("bad_type", f"kind is a {type(kind).__name__}, not a string")
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    if prompt is None and isinstance(chosen, str) and isinstance(rejected, str):
        if not (_is_hh(chosen) and _is_hh(rejected)):
            raise BadRecord("not_hh_format", "chosen/rejected strings without a prompt must be HH dialogues")
        chosen, rejected = parse_hh(chosen), parse_hh(rejected)
    if prompt is None:  # implicit prompt: the turns both sides share
        chosen = _messages(chosen, "chosen")
        rejected = _messages(rejected, "rejected")
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        while shared > 0 and chosen[shared - 1]["role"] == "assistant":
            shared -= 1  # both answers start with an assistant turn, not in the middle of one's
        if shared == 0:
            raise BadRecord("no_shared_prompt", "chosen and rejected share no leading turns")
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    else:
        prompt = _turns(prompt, "prompt", "user")
        chosen = _turns(chosen, "chosen", "assistant")
        rejected = _turns(rejected, "rejected", "assistant")
    _assistant_only(chosen, "chosen")
    _assistant_only(rejected, "rejected")
    if chosen == rejected:
        raise BadRecord("chosen_equals_rejected", "the pair carries no preference")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "kind": kind}


def normalise_prompt(record: dict) -> dict:
    value = record.get("prompt", record.get("messages"))
    if value is None:
        raise BadRecord("missing_fields", f"has {sorted(record)}; needs prompt (or messages)")
    if isinstance(value, str) and _is_hh(value):
        turns = [m for m in parse_hh(value) if m["role"] != "assistant" or m["content"]]
    else:
        turns = _turns(value, "prompt", "user")
    if not turns:  # an HH string with only an empty assistant turn
        raise BadRecord("empty", "the prompt has no turns")
    if turns[-1]["role"] != "user":
        raise BadRecord("bad_role", f"a prompt must end with a user turn, ends with {turns[-1]['role']!r}")
    if not turns[-1]["content"].strip():
        raise BadRecord("empty", "the prompt's last user turn is empty")
    return {"prompt": turns}


def normalise_answers(record: dict) -> dict:
    """A prompt with sampled answers, each labelled right or wrong: {prompt, answers: [str], right: [bool]}
    (data_prep/build_policy_pairs.py writes them), for ranking a reward model on a policy's own answers."""
    prompt = normalise_prompt(record)["prompt"]
    answers, right = record.get("answers"), record.get("right")
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise BadRecord("bad_type", "answers is not a list of strings")
    if not isinstance(right, list) or not all(isinstance(r, bool) for r in right):
        raise BadRecord("bad_type", "right is not a list of true/false labels")
    if len(answers) != len(right) or not answers:
        raise BadRecord(
            "bad_length", f"{len(answers)} answers and {len(right)} labels; give one label per answer"
        )
    return {"prompt": prompt, "answers": answers, "right": right}


def parse_hh(text: str) -> list[dict]:
    """Anthropic HH "\\n\\nHuman: ...\\n\\nAssistant: ..." -> messages (contents stripped)."""
    if text.startswith(("Human:", "Assistant:")):
        text = "\n\n" + text
    parts = HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise BadRecord("not_hh_format", "does not start with '\\n\\nHuman:' or '\\n\\nAssistant:'")
    return [
        {"role": HH_ROLES[who], "content": content.strip()}
        for who, content in zip(parts[1::2], parts[2::2], strict=True)
    ]


def _is_hh(text: str) -> bool:
    return bool(HH_TURN.search(text)) or text.startswith(("Human:", "Assistant:"))


def _turns(value, field: str, role: str) -> list[dict]:
    """A string as one turn of `role`, or a list of messages."""
    if isinstance(value, str):
        if not value.strip():
            raise BadRecord("empty", f"{field} is empty")
        return [{"role": role, "content": value}]
    return _messages(value, field)


def _messages(value, field: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        what = "empty" if isinstance(value, list) else type(value).__name__
        raise BadRecord(
            "empty" if what == "empty" else "bad_type", f"{field} is {what}, not a list of messages"
        )
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise BadRecord("bad_type", f"{field}[{i}] is not a {{role, content: str}} message")
        if m["role"] not in ROLES:
            raise BadRecord("bad_role", f"{field}[{i}] has role {m['role']!r}; roles are {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _assistant_only(turns: list[dict], field: str) -> None:
    if not turns:
        raise BadRecord("no_assistant_turn", f"{field} has no turns")
    if any(m["role"] != "assistant" for m in turns):
        raise BadRecord("bad_role", f"{field} must be assistant turns, has {[m['role'] for m in turns]}")
    if not any(m["content"].strip() for m in turns):
        raise BadRecord("empty", f"{field} is empty")
