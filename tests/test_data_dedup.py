"""Near-duplicate removal and decontamination in ingest: `pytest tests/test_data_dedup.py` (~10 s).

Corpora are made here: documents of words drawn at random from a fixed vocabulary (seeded), copies
of them with a share of their words replaced, and held-out sets in the post-training stages' formats.
"""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest

import stages.ingest as ingest
from data_prep.near_dup import NearDupSpec, Signer, cluster_members, distinct_pairs, near_duplicates
from data_prep.ngrams import word_hashes
from data_prep.readers import read_lines
from data_prep.task import make_prompt
from pipeline.config import ConfigError, PipelineConfig, load_config
from pipeline.dag import PIPELINE
from tests.test_data_ingest import (
    CrashContext,
    Killed,
    PickleContext,
    assert_reconciles,
    doc,
    ingest_with,
    read_docs,
    run_ingest,
    same_files,
    write,
)

VOCAB = [f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "pe", "ro", "su", "ti", "va", "ze") for b in range(300)]


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def edited(rng: random.Random, text: str, share: float) -> str:
    """`text` with round(share x its words) words, at random places, replaced by random words."""
    ws = text.split()
    for at in rng.sample(range(len(ws)), max(1, round(share * len(ws)))):
        ws[at] = rng.choice(VOCAB)
    return " ".join(ws)


def jaccard(a: str, b: str, n: int = 5) -> float:
    """Exact Jaccard similarity of two texts' sets of n-word shingles."""
    sa, sb = ({tuple(w[i : i + n]) for i in range(len(w) - n + 1)} for w in (a.split(), b.split()))
    return len(sa & sb) / len(sa | sb)


# -- near-duplicates ----------------------------------------------------------------------------


def test_copies_with_1_5_percent_of_words_edited_are_dropped_and_one_text_of_each_pair_kept(tmp_path):
    rng = random.Random(0)
    n = 200
    originals = [words(rng, 400) for _ in range(n)]
    copies = [edited(rng, t, 0.015) for t in originals]  # 6 words of 400
    assert 0.84 < np.mean([jaccard(o, c) for o, c in zip(originals, copies, strict=True)]) < 0.88
    unrelated = [words(rng, 400) for _ in range(100)]
    texts = originals + copies + unrelated
    rng.shuffle(texts)  # dealt over two files: a copy may come before its original
    half = len(texts) // 2
    files = [
        write(tmp_path / "a.jsonl", map(doc, texts[:half])),
        write(tmp_path / "b.jsonl.zst", map(doc, texts[half:])),
    ]
    _, stats, out = run_ingest(tmp_path, files)

    kept = {d["text"] for d in read_docs(out)}
    position = {t: i for i, t in enumerate(texts)}
    assert set(stats["dropped"]) == {"near_duplicate"} and stats["dropped"]["near_duplicate"] >= 0.9 * n
    for o, c in zip(originals, copies, strict=True):
        assert o in kept or c in kept  # never both dropped ...
        if not (o in kept and c in kept):
            assert min(o, c, key=position.get) in kept  # ... and the one kept is the first in input order
    assert all(t in kept for t in unrelated)
    assert stats["kept"] == len(kept) == len(texts) - stats["dropped"]["near_duplicate"]
    assert stats["near_dedup"]["bands"] == 14 and stats["near_dedup"]["found_at_jaccard"]["0.84"] > 0.9
    assert_reconciles(stats)

    _, stats, _ = run_ingest(tmp_path, files, near_dedup=False)
    assert stats["dropped"] == {} and stats["kept"] == len(texts) and "near_dedup" not in stats


def test_recall_is_at_least_90_percent_on_pairs_of_jaccard_084_and_follows_the_s_curve():
    """Pairs of every similarity: the share found (sharing a band) is what 1 - (1 - s^8)^14 says."""
    spec = NearDupSpec()
    signer = Signer(spec)
    rng = random.Random(1)
    sims, found = [], []
    for k in range(800):  # half the pairs near 0.84 and above, half below
        text = words(rng, rng.choice([40, 150, 400]))
        copy = edited(rng, text, rng.uniform(0.002, 0.02) if k % 2 else rng.uniform(0.02, 0.15))
        sims.append(jaccard(text, copy))
        found.append(
            bool(np.any(signer.band_hashes(word_hashes(text)) == signer.band_hashes(word_hashes(copy))))
        )
    sims, found = np.array(sims), np.array(found)
    high = sims >= 0.84
    assert high.sum() >= 100 and found[high].mean() >= 0.9
    for lo, hi in ((0.3, 0.6), (0.6, 0.75), (0.75, 0.84), (0.84, 1.0)):
        inside = (sims >= lo) & (sims < hi)
        expected = np.mean([spec.found(s) for s in sims[inside]])
        spread = 3 * np.sqrt(expected * (1 - expected) / inside.sum()) + 0.02
        assert inside.sum() >= 30 and abs(found[inside].mean() - expected) <= spread, (lo, hi)
    assert spec.found(0.84) > 0.98 and spec.found(0.8) > 0.92 and spec.found(0.5) < 0.06


def test_clusters_keep_their_first_document_and_exact_repeats_follow_their_first_occurrence():
    pairs = np.array([[5, 9], [3, 5], [1, 9], [2, 4]])  # {1, 3, 5, 9} through a chain, {2, 4}
    assert cluster_members(pairs).tolist() == [3, 4, 5, 9]
    assert cluster_members(np.zeros((0, 2), np.int64)).tolist() == []
    bands = [np.array([[1, 3], [0, 4]]), np.array([[0, 4], [2, 5]]), np.zeros((0, 2), np.int64)]
    assert distinct_pairs(bands).tolist() == [[0, 4], [1, 3], [2, 5]]  # each pair once, in order
    # two files; row 2 of the second is an exact repeat of row 0 of the first (occurrence 1)
    hashes = [np.array([10, 11, 12], np.uint64), np.array([13, 14, 10], np.uint64)]
    occurrences = [np.array([0, 0, 0]), np.array([0, 0, 1])]
    pairs = np.array([[1, 3], [0, 4], [0, 5]])  # 3 is near 1; 4 near 0 (and so is 5, its repeat)
    with_dedup = near_duplicates(pairs, hashes, occurrences, dedup=True)
    assert [f.tolist() for f in with_dedup] == [[False, False, False], [True, True, False]]
    pairs = np.array([[0, 1], [0, 5]])  # 1 is near 0; the repeat of 0 is kept with exact dedup off
    without = near_duplicates(pairs, hashes, occurrences, dedup=False)
    assert [f.tolist() for f in without] == [[False, True, False], [False, False, False]]


def near_copies_corpus(folder, files: int = 8, rng_seed: int = 2) -> list:
    """Files of 10 documents; each file after the first holds copies (2% edited) of 3 of the one before."""
    rng = random.Random(rng_seed)
    folder.mkdir(exist_ok=True)
    texts = [[words(rng, 120) for _ in range(10)] for _ in range(files)]
    for k in range(1, files):
        texts[k][:3] = [edited(rng, t, 0.02) for t in texts[k - 1][4:7]]
    kinds = (".jsonl", ".jsonl.gz", ".jsonl.zst")
    return [write(folder / f"s{k}{kinds[k % 3]}", map(doc, ts)) for k, ts in enumerate(texts)]


def test_the_output_is_the_same_whatever_task_runs_first_or_where_bands_are_searched(tmp_path, monkeypatch):
    files = near_copies_corpus(tmp_path / "src")
    _, stats, out1 = run_ingest(tmp_path, files, docs_per_shard=7)
    assert stats["dropped"]["near_duplicate"] >= 0.9 * 3 * (len(files) - 1)
    monkeypatch.setattr(ingest, "BAND_TASK_MIN_DOCS", 0)  # a task per band (ctx.map), run last-first
    _, _, out2 = run_ingest(tmp_path, files, docs_per_shard=7, reverse=True)
    assert len(same_files(out1, out2)) > 5
    assert not (tmp_path / "work" / "bands").exists()  # the band tasks' pairs, removed with the units


def test_resume_after_a_kill_is_byte_identical_and_never_reuses_shards_whose_near_duplicates_changed(
    tmp_path,
):
    files = near_copies_corpus(tmp_path / "src")
    ref = ingest_with(PickleContext("ingest", tmp_path / "w-ref"), files, tmp_path / "ref")
    work = tmp_path / "work"
    with pytest.raises(Killed):
        ingest_with(CrashContext("ingest", work, crash_after=5), files, tmp_path / "killed")
    again = CrashContext("ingest", work)
    same_files(ingest_with(again, files, tmp_path / "out"), ref)
    assert [i for fn, i in again.ran if fn == "clean_file"] == list(range(5, 8))

    # all cleaned, 7 of 8 written; then file 1 is edited to hold copies of file 5's documents, which
    # come later: file 5's shards, written before, must be written again without them
    with pytest.raises(Killed):
        ingest_with(CrashContext("ingest", work, crash_after=15), files, tmp_path / "killed-2")
    rng = random.Random(3)
    own, fifth = _texts(files[1]), _texts(files[5])[-4:]
    write(files[1], map(doc, own + [edited(rng, t, 0.01) for t in fifth]))
    again = CrashContext("ingest", work)
    out = ingest_with(again, files, tmp_path / "out-2")
    assert [i for fn, i in again.ran if fn == "clean_file"] == [1]
    assert [i for fn, i in again.ran if fn == "write_docs"] == [1, 5, 7]
    fresh = ingest_with(PickleContext("ingest", tmp_path / "w-ref-2"), files, tmp_path / "ref-2")
    same_files(out, fresh)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["files"][5]["dropped"]["near_duplicate"] >= 4
    assert_reconciles(stats)


def _texts(path) -> list[str]:
    """The texts of a shard written here, in order."""
    return [json.loads(raw)["text"] for _, raw in read_lines(str(path), max_line_bytes=1 << 24)]


# -- decontamination ----------------------------------------------------------------------------


def test_a_document_quoting_a_held_out_text_is_dropped_one_sharing_short_runs_is_kept(tmp_path):
    rng = random.Random(4)
    sentence = "Every potter knows the kiln keeps its own slow time."  # 10 words: checked whole
    answer = words(rng, 30)  # 13-word windows of it are checked
    held = write(
        tmp_path / "held.jsonl.zst",
        [
            json.dumps({"prompt": [{"role": "user", "content": make_prompt(sentence)}]}),
            json.dumps({"prompt": "Tell me a story.", "completion": answer}),  # a 4-word prompt: too short
        ],
    )
    a = answer.split()
    body = [
        f"{words(rng, 60)} {sentence.upper()} {words(rng, 60)}",  # the whole sentence (case aside)
        f"{words(rng, 60)} {' '.join(a[3:16])} {words(rng, 60)}",  # 13 words of the answer
        f"{words(rng, 60)} {' '.join(a[3:15])} {words(rng, 60)}",  # 12: kept
        f"{words(rng, 60)} {' '.join(sentence.split()[:9])} {words(rng, 60)}",  # 9 of 10 words: kept
        f"{words(rng, 60)} Reverse the first 3 words: {words(rng, 60)}",  # the instruction: kept
    ]
    src = write(tmp_path / "c.jsonl", map(doc, body))
    _, stats, out = run_ingest(tmp_path, [src], decontaminate=(str(held),))
    assert stats["dropped"] == {"contaminated": 2}
    assert [d["text"] for d in read_docs(out)] == body[2:]
    assert stats["decontamination"] == {"files": [str(held.resolve())], "ngram_words": 13, "heldout_texts": 2}
    assert_reconciles(stats)

    _, stats, _ = run_ingest(tmp_path, [src], decontaminate=())
    assert stats["dropped"] == {} and "decontamination" not in stats
    _, stats, _ = run_ingest(tmp_path, [src], decontaminate=(str(held),), decontaminate_ngram=12)
    assert stats["dropped"] == {"contaminated": 3}
    with pytest.raises(ingest.IngestError, match=r"ingest\.decontaminate: no file matches 'nowhere\.jsonl'"):
        run_ingest(tmp_path, [src], decontaminate=("nowhere.jsonl",))


def test_the_held_out_sets_are_part_of_ingests_identity_and_its_units(tmp_path):
    held = write(tmp_path / "held.jsonl", [json.dumps({"prompt": make_prompt(words(random.Random(5), 20))})])
    cfg = PipelineConfig()
    cfg = dataclasses.replace(cfg, ingest=dataclasses.replace(cfg.ingest, decontaminate=(str(held),)))
    before = PIPELINE["ingest"].extra_fingerprint(cfg)
    assert [str(held), held.stat().st_size] in [f[:2] for f in before]
    write(held, [json.dumps({"prompt": make_prompt(words(random.Random(6), 25))})])
    assert PIPELINE["ingest"].extra_fingerprint(cfg) != before

    # a unit cleaned against other held-out texts is not reused
    files = near_copies_corpus(tmp_path / "src", files=3)
    work = tmp_path / "work"
    with pytest.raises(Killed):
        ingest_with(
            CrashContext("ingest", work, crash_after=3), files, tmp_path / "k", decontaminate=(str(held),)
        )
    write(held, [json.dumps({"prompt": make_prompt(words(random.Random(7), 25))})])
    again = CrashContext("ingest", work)
    ingest_with(again, files, tmp_path / "out", decontaminate=(str(held),))
    assert [i for fn, i in again.ran if fn == "clean_file"] == [0, 1, 2]


def test_the_shipped_held_out_sets_are_the_default_and_bad_settings_are_named():
    cfg = load_config()
    assert [p.rsplit("/", 1)[-1] for p in cfg.ingest.decontaminate] == [
        "sft_val.jsonl.zst", "pref_val.jsonl.zst", "prompts_val.jsonl.zst",
    ]  # fmt: skip
    assert cfg.ingest.near_dedup and cfg.ingest.decontaminate_ngram == 13
    with pytest.raises(ConfigError) as err:
        load_config(
            overrides=[
                "ingest.near_dedup_bands=0",
                "ingest.near_dedup_rows=0",
                "ingest.decontaminate_ngram=0",
            ]
        )
    for key in ("ingest.near_dedup_bands", "ingest.near_dedup_rows", "ingest.decontaminate_ngram"):
        assert key in str(err.value)
