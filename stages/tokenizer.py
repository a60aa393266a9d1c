"""tokenizer: documents -> a Hugging Face tokenizer folder (byte-level BPE, or an existing one adopted).

    python launch.py run --only tokenizer --set tokenizer.vocab_size=8192

Inputs: {"ingest"}. Artifact (loadable with `AutoTokenizer.from_pretrained(artifact.path)`):

    tokenizer.json, tokenizer_config.json, chat_template.jinja    the tokenizer (PreTrainedTokenizerFast)
    tokenizer_stats.json                                          what it was trained on, special ids, held-out chars/token

Trained (tokenizer.path unset): a byte-level BPE of `tokenizer.vocab_size` tokens (specials
included: <|endoftext|> = EOS = BOS, <|pad|>, <|system|>, <|user|>, <|assistant|>, <|end|>, ids 0-5)
on a deterministic sample of about `tokenizer.sample_bytes` of the documents: those whose
hash(id, run.seed) falls below the fraction that gives the budget, in document order.
Held-out: documents from the opposite end of the same hash range (never trained on) measure
chars/token and check that decode(encode(text)) == text.

Existing (tokenizer.path set): the folder is loaded, missing special tokens and the chat template are
added (listed under `added_tokens` in the stats), or it is refused with what is missing
(data_prep/bpe.py `adopt_tokenizer`). Assistant turns end with `<|end|>`: generation for chat should
stop on it as well as on EOS (`tokenizer_stats.json` gives its id as `end_of_turn_id`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from data_prep.bpe import END, adopt_tokenizer, special_ids, train_bpe
from data_prep.documents import doc_shards, sample_texts
from pipeline.config import PROJECT_ROOT
from pipeline.files import write_json_atomic

VERSION = 1
"""What this stage produces, versioned: bump it when a change alters its output (README, "Changing a
stage"); its artifacts, and those downstream, are then rebuilt. Other code changes rebuild nothing."""

HELDOUT_BYTES = 1_000_000  # held-out text for chars/token and the round-trip check


def run(cfg, inputs, out, ctx) -> dict:
    c, seed = cfg.tokenizer, cfg.run.seed
    out = Path(out)
    ingest_dir = Path(inputs["ingest"].path)
    shards = doc_shards(ingest_dir)
    total_bytes = json.loads((ingest_dir / "stats.json").read_text())["text_bytes"]
    if not shards or total_bytes == 0:
        raise RuntimeError(
            f"tokenizer: the ingest artifact {ingest_dir} holds no documents; check ingest.sources"
        )

    # the sample: a hash-chosen fraction sized to the byte budget (+10% so the budget, not the
    # draw, decides where it stops); held-out documents come from the top of the same range
    frac = min(1.0, 1.1 * c.sample_bytes / total_bytes)
    held_frac = min(0.5, 1.1 * HELDOUT_BYTES / total_bytes, 1.0 - frac) if frac < 1.0 else 0.0
    t0 = time.perf_counter()
    if c.path is None:
        texts = list(sample_texts(shards, 0.0, frac, seed, c.sample_bytes))
        train_bytes = sum(len(t.encode("utf-8")) for t in texts)
        ctx.logger.info(
            "tokenizer: training BPE (vocab %d) on %d docs, %.1f MB",
            c.vocab_size,
            len(texts),
            train_bytes / 1e6,
        )
        ctx.progress(0, 1)
        tok = train_bpe(texts, c.vocab_size, c.min_frequency, length=len(texts))
        report = {"source": "trained", "added_tokens": [], "chat_template": "kiln"}
        train_docs = len(texts)
        del texts
    else:
        path = _resolve(c.path)
        tok, report = adopt_tokenizer(
            str(path), c.chat_template
        )  # or TokenizerRefused, naming what is missing
        train_bytes = train_docs = 0
        if report["added_tokens"]:
            ctx.logger.warning("tokenizer: added to %s: %s", path, ", ".join(report["added_tokens"]))
    train_s = time.perf_counter() - t0
    tok.save_pretrained(out)

    # held-out: chars per token, bytes per token, and the round trip, on documents not trained on
    held = list(sample_texts(shards, 1.0 - held_frac, 1.0, seed, HELDOUT_BYTES)) if held_frac else []
    if not held:  # the sample took every document: measure on (part of) the training text instead
        held = list(sample_texts(shards, 0.0, 1.0, seed, HELDOUT_BYTES))
    backend = tok.backend_tokenizer
    encodings = backend.encode_batch(held, add_special_tokens=False)
    n_tokens = sum(len(e.ids) for e in encodings)
    n_chars = sum(len(t) for t in held)
    bad = sum(
        backend.decode(e.ids, skip_special_tokens=False) != t for e, t in zip(encodings, held, strict=True)
    )
    if bad:
        ctx.logger.warning("tokenizer: %d held-out documents do not round-trip exactly", bad)

    ids = special_ids(tok)
    stats = {
        **report,
        "vocab_size": len(tok),
        "train_docs": train_docs,
        "train_bytes": train_bytes,
        "train_seconds": round(train_s, 2),
        "heldout_docs": len(held),
        "heldout_chars": n_chars,
        "heldout_tokens": n_tokens,
        "heldout_roundtrip_failures": bad,
        "chars_per_token": n_chars / max(1, n_tokens),
        "bytes_per_token": sum(len(t.encode("utf-8")) for t in held) / max(1, n_tokens),
        "special_ids": ids,
        "end_of_turn_id": ids[END],
        "sample_rule": f"documents with unit(hash(id), seed={seed}) < {frac:.6f}, in document order, "
        f"until {c.sample_bytes} bytes; held-out: unit >= {1.0 - held_frac:.6f}",
    }
    write_json_atomic(out / "tokenizer_stats.json", stats)
    ctx.progress(1, 1)
    ctx.logger.info(
        "tokenizer: vocab %d, %.2f chars/token on held-out text", len(tok), stats["chars_per_token"]
    )
    return {
        "vocab_size": len(tok),
        "train_bytes": train_bytes,
        "chars_per_token": round(stats["chars_per_token"], 4),
        "heldout_roundtrip_failures": bad,
        "added_tokens": len(report["added_tokens"]),
    }


def _resolve(path: str) -> Path:
    for base in (Path.cwd(), PROJECT_ROOT):
        p = Path(path) if Path(path).is_absolute() else base / path
        if p.is_dir():
            return p
    raise FileNotFoundError(
        f"tokenizer.path: {path!r} is not a folder (relative to {Path.cwd()} and {PROJECT_ROOT}); "
        "give a Hugging Face tokenizer folder, or unset tokenizer.path to train one"
    )
