"""Build the tiny preset's SFT, preference and prompt sets from the bundled corpus (data_prep/task.py's task).

    python data_prep/build_task_data.py              # writes data_prep/sample/task/*.jsonl.zst + stats.json
    python data_prep/build_task_data.py --check      # rebuild in memory, fail if the shipped files differ

Deterministic: the same corpus gives the same files byte for byte (no clock, no global RNG; every
random choice is seeded by the sentence's hash). The files are shipped (~300 KB) rather than made
at run time, so the sft and reward stages read them exactly as they read a user's files, and their
only upstream is pretrain.

Sentences: each corpus document, whitespace normalised, split after . ! or ?; kept when it has 5-14
words, at most 90 characters, is printable ASCII, and its first three words are letters only and
among the 200 words most frequent in those positions. That last rule is what makes the task
learnable in a few hundred CPU steps by the tiny pretrained model: copying a word needs the model
to have seen it as an answer, and common words are seen often (tried: with any words, 800 SFT steps
reached 4% held-out accuracy; with common ones, 400 steps reached ~40%). Duplicates are dropped.

Split by the sentence's hash, so a sentence is in one split only:
    heldout  10%   sft_val (loss), prompts_val (task accuracy), pref_val (reward accuracy: 2 pairs each)
    sft      45%   sft_train: prompt/completion, conversational
    pref     35%   pref_train: {prompt, chosen, rejected, kind}, one pair per sentence
    ppo      10%   prompts_train: {prompt} for PPO
The rejected answer's kind cycles through data_prep.task.KINDS (4 well-formed-but-wrong kinds,
3 damaged ones), so each kind is about 1/7 of the pairs.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run as a script from anywhere

from data_prep.readers import read_lines  # noqa: E402
from data_prep.task import KINDS, N_WORDS, make_prompt, reference_answer, wrong_answer  # noqa: E402

CORPUS = HERE / "sample" / "pile_sample.jsonl.zst"
OUT = HERE / "sample" / "task"
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
LETTERS = re.compile(r"[A-Za-z]+")
MIN_WORDS, MAX_WORDS, MAX_CHARS, TOP_WORDS = 5, 14, 90, 200
SPLITS = (("heldout", 0.10), ("sft", 0.55), ("pref", 0.90), ("ppo", 1.0))  # cumulative hash fractions
CAPS = {"heldout": 400, "sft": 3000, "pref": 3000, "ppo": 800}  # sentences per split (file size)
VAL_PAIRS_PER_SENTENCE = 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--check", action="store_true", help="compare with the files in --out; write nothing")
    args = ap.parse_args()
    write_or_check(build(args.corpus), args.out, args.check, "python data_prep/build_task_data.py")


def write_or_check(files: dict[str, bytes], out: Path, check: bool, command: str) -> None:
    """Write `files` into `out` (each atomically: a reader sees the old file or the new one), or with
    `check` write nothing and exit naming the files that differ from what `command` would write."""
    if check:
        stale = [n for n, data in files.items() if not (out / n).is_file() or (out / n).read_bytes() != data]
        if stale:
            sys.exit(f"out of date: {', '.join(stale)}; run {command}")
        print("up to date")
        return
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        tmp = out / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(out / name)
        print(f"{out / name}: {len(data):,} bytes")


def build(corpus: Path) -> dict[str, bytes]:
    """File name -> contents (zstd-compressed JSON lines, and stats.json)."""
    sentences = select_sentences(corpus)
    by_split = split_sentences(sentences)
    held, sft, pref, ppo = (by_split[k] for k in ("heldout", "sft", "pref", "ppo"))
    kinds = list(KINDS)
    sets = {
        "sft_train.jsonl.zst": [sft_record(s) for s in sft],
        "sft_val.jsonl.zst": [sft_record(s) for s in held],
        "pref_train.jsonl.zst": [
            pref_record(s, kinds[i % len(kinds)], pref[(i + 1) % len(pref)]) for i, s in enumerate(pref)
        ],
        "pref_val.jsonl.zst": [
            pref_record(s, kinds[(VAL_PAIRS_PER_SENTENCE * i + j) % len(kinds)], held[(i + 1) % len(held)])
            for i, s in enumerate(held)
            for j in range(VAL_PAIRS_PER_SENTENCE)
        ],
        "prompts_train.jsonl.zst": [prompt_record(s) for s in ppo],
        "prompts_val.jsonl.zst": [prompt_record(s) for s in held],
    }
    files = {name: compress(records) for name, records in sets.items()}
    stats = {
        "corpus": corpus.name,
        "candidate_sentences": len(sentences),
        "sentences": {k: len(v) for k, v in by_split.items()},
        "records": {name: len(records) for name, records in sets.items()},
        "rejected_kinds": {
            name: dict(collections.Counter(r["kind"] for r in sets[name]))
            for name in ("pref_train.jsonl.zst", "pref_val.jsonl.zst")
        },
        "rules": {
            "min_words": MIN_WORDS,
            "max_words": MAX_WORDS,
            "max_chars": MAX_CHARS,
            "top_words": TOP_WORDS,
        },
    }
    files["stats.json"] = (json.dumps(stats, indent=2) + "\n").encode()
    return files


def select_sentences(corpus: Path) -> list[str]:
    """Candidate sentences in corpus order, first occurrence of each, first words among the most common."""
    found: dict[str, None] = {}
    for _, raw in read_lines(str(corpus), max_line_bytes=1 << 24):
        try:
            text = json.loads(raw)["text"]
        except (TypeError, ValueError, KeyError):
            continue  # the corpus is ingest's to vet; a bad line just gives no sentences
        for s in SENTENCE_END.split(" ".join(str(text).split())):
            words = s.split()
            if not (MIN_WORDS <= len(words) <= MAX_WORDS and len(s) <= MAX_CHARS):
                continue
            if s.isascii() and s.isprintable() and all(LETTERS.fullmatch(w) for w in words[:N_WORDS]):
                found.setdefault(s)
    counts = collections.Counter(w for s in found for w in s.split()[:N_WORDS])
    common = {w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_WORDS]}
    return [s for s in found if all(w in common for w in s.split()[:N_WORDS])]


def split_sentences(sentences: list[str]) -> dict[str, list[str]]:
    """Split name -> its sentences (in hash order, up to the split's cap)."""
    by_split: dict[str, list[str]] = {name: [] for name, _ in SPLITS}
    for s in sorted(sentences, key=unit_hash):
        split = next(name for name, upto in SPLITS if unit_hash(s) < upto)
        if len(by_split[split]) < CAPS[split]:
            by_split[split].append(s)
    return by_split


def unit_hash(s: str) -> float:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") / 2**64


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def sft_record(s: str) -> dict:
    prompt = make_prompt(s)
    return {"prompt": user(prompt), "completion": assistant(reference_answer(prompt))}


def pref_record(s: str, kind: str, other: str) -> dict:
    prompt = make_prompt(s)
    rng = random.Random(f"{s}|{kind}")  # str seeds hash with sha512: stable across runs and machines
    rejected = wrong_answer(s, kind, rng, other)
    return {
        "prompt": user(prompt),
        "chosen": assistant(reference_answer(prompt)),
        "rejected": assistant(rejected),
        "kind": kind,
    }


def prompt_record(s: str) -> dict:
    return {"prompt": user(make_prompt(s))}


def compress(records: list[dict]) -> bytes:
    import zstandard

    raw = io.BytesIO()
    for r in records:
        raw.write(json.dumps(r, ensure_ascii=False, sort_keys=False).encode() + b"\n")
    return zstandard.ZstdCompressor(level=19).compress(raw.getvalue())


if __name__ == "__main__":
    main()
