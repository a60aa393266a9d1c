"""tokenize: documents + tokenizer -> packed, memory-mapped token windows with a train/validation split.

    python launch.py run --only tokenize --set tokenize.seq_len=512

Inputs: {"ingest", "tokenizer"}. Artifact:

    train-00000.npy, ...   (rows, seq_len + 1) uint16/uint32 windows of the training stream
    val-00000.npy, ...     the same for validation
    index.json             dtype, seq_len, the window convention, per split: tokens, documents,
                           sequences, tail_tokens_dropped, shards (file, sequences, first_sequence),
                           sources (per source: first_sequence, sequences, tokens, documents, ...)
    units.json             on Ray: the node that did each unit (partitions, shards)

Read it with `data_prep.packed.PackedTokens(artifact.path, "train")`: len(), [i] -> seq_len + 1 ids.
The convention (data_prep/packing.py): per split and source, every document's tokens then EOS, in
document order; window i = stream[i*(seq_len+1) : (i+1)*(seq_len+1)], no overlap; the short tail is
counted, not stored; the sources' windows one after another (no window spans two sources), so that
pretraining can blend them by weight when it draws batches (`pretrain.mixture`). A document is in validation when the low 32 bits of its content hash / 2^32 <
`tokenize.val_fraction`: stable across runs, seeds and worker counts, and a text repeated by ingest
set weights never lands on both sides.

Documents are cut into `tokenize.partitions` contiguous ranges, tokenized in parallel (`ctx.map`,
one task per range), each into a raw stream per split and source in the work dir; the driver lays the
streams in range order and cuts the windows, and each shard file is written by a task of its own from
the token ranges it holds, so 1 and N partitions, and any order of the tasks, give the same bytes.
Each range is a unit (pipeline/units.py), recorded as finished once its streams are in place:

    streams/<k>.train.<source>.bin, <k>.val.<source>.bin, <k>.done.json

A run that dies keeps them: the next one reuses every range whose record matches what it would make
now (its documents' shards, the tokenizer's digest, the settings), says in the log "N of M units
already done", tokenizes the rest and stitches them all again; the streams are removed once the
artifact is written. As for ingest, the tasks spread over a cluster's nodes whatever the root: on
an object-store root the streams and the shards go through the root (pipeline/units.py `Folder`),
each partition fetches only the document shards it reads, and the commit copies the shards into the
artifact there, with the sha256 their tasks computed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from data_prep.documents import doc_shards
from data_prep.packing import SPLITS, PackTask, pack_partition, plan_partitions, plan_shards, write_shard
from pipeline import units
from pipeline.files import sha256_file, write_json_atomic

VERSION = 2
"""2: windows packed per source (none spans two). What this stage produces, versioned: bump it when a change alters its output (README, "Changing a
stage"); its artifacts, and those downstream, are then rebuilt. Other code changes rebuild nothing."""

WINDOW_RULE = (
    "per split, each document's tokens followed by eos_id, in document order; "
    "sequence i = stream[i*(seq_len+1) : (i+1)*(seq_len+1)] (stride seq_len+1, no overlap); "
    "inputs = sequence[:-1], labels = sequence[1:]; the last len(stream) % (seq_len+1) tokens are dropped"
)


def run(cfg, inputs, out, ctx) -> dict:
    c = cfg.tokenize
    out = Path(out)
    ingest_dir = Path(inputs["ingest"].path)
    shards = [(p.relative_to(ingest_dir).as_posix(), n) for p, n in doc_shards(ingest_dir)]
    tok_dir = Path(inputs["tokenizer"].path)
    eos_id, vocab = _tokenizer_facts(tok_dir)
    dtype = "uint16" if vocab <= 1 << 16 else "uint32"
    n_docs = sum(n for _, n in shards)
    if n_docs == 0:
        raise RuntimeError(f"tokenize: the ingest artifact {inputs['ingest'].path} holds no documents")

    # 1. tokenize contiguous document ranges in parallel, a raw stream per split each; the ranges an
    # earlier attempt finished are reused
    work = units.Folder.of(ctx, "streams")
    work.clear_temporary()
    plans = plan_partitions(shards, c.partitions or max(len(shards), 4))
    settings = {"eos_id": eos_id, "dtype": dtype, "val_fraction": c.val_fraction}
    docs = units.Inputs.of(ctx, inputs["ingest"], [rel for rel, _ in shards])
    tokenizer = units.Inputs.of(ctx, inputs["tokenizer"], ["tokenizer.json"])
    described = inputs["ingest"].manifest.get("files", {})  # the manifest's digests: nothing hashed again
    facts = {rel: described.get(rel) or units.file_facts(str(ingest_dir / rel)) for rel, _ in shards}
    tokenizer_digest = inputs["tokenizer"].manifest.get("files", {}).get("tokenizer.json", {}).get(
        "sha256"
    ) or sha256_file(tok_dir / "tokenizer.json")
    tasks = [
        PackTask(
            index=k,
            ranges=ranges,
            docs=docs,
            tokenizer=tokenizer,
            **settings,
            folder=work,
            name=f"{k:05d}",
            identity={
                "ranges": [[facts[rel], lo, hi] for rel, lo, hi in ranges],
                "tokenizer": tokenizer_digest,
                **settings,
                "streams": "per split and source",  # what an earlier layout's record lacks
            },
        )
        for k, ranges in enumerate(plans)
    ]
    ctx.logger.info("tokenize: %d documents in %d partitions, %s ids", n_docs, len(tasks), dtype)
    listing = work.listing()  # an object-store root's: listed once
    counts = [(work.finished(t.name, t.identity, listing) or {}).get("result") for t in tasks]
    todo = [t for t, cnt in zip(tasks, counts, strict=True) if cnt is None]
    done = len(tasks) - len(todo)
    ctx.logger.info("tokenize: %d of %d units already done", done, len(tasks))
    t0 = time.perf_counter()
    if todo:
        got = ctx.map(pack_partition, todo, num_cpus=c.num_cpus, progress=(done, len(tasks)))
        for t, cnt in zip(todo, got, strict=True):
            counts[t.index] = cnt
    encode_s = time.perf_counter() - t0
    encoded = sum(counts[t.index][s]["tokens"] for t in todo for s in SPLITS)  # by this attempt

    # 2. lay each source's streams in partition order, cut them into windows, and write the shards, each
    # by a task of its own (in parallel, the bytes one writer would make), on an object-store root into
    # a work folder the commit copies them from
    shard_folder = units.Folder.of(ctx, "shards") if work.remote else None
    splits, shard_tasks = {}, []
    for split in SPLITS:
        sources: dict[str, list[tuple[str, int]]] = {}
        digests: dict[str, str] = {}
        for cnt in counts:  # partition order
            for source, stream in cnt[split]["sources"].items():
                sources.setdefault(source, []).append((stream["file"], stream["tokens"]))
                if "sha256" in stream:
                    digests[stream["file"]] = stream["sha256"]
        splits[split], shards = plan_shards(
            sources, out, split, c.seq_len, c.sequences_per_shard, dtype, work, digests, shard_folder
        )
        shard_tasks += shards
        splits[split]["documents"] = sum(cnt[split]["documents"] for cnt in counts)
        for source, facts in splits[split]["sources"].items():
            facts["documents"] = sum(
                cnt[split]["sources"].get(source, {}).get("documents", 0) for cnt in counts
            )
    if sum(s["documents"] for s in splits.values()) != n_docs:
        raise RuntimeError("tokenize: documents tokenized do not add up to the ingest artifact's count")
    t0 = time.perf_counter()
    written = ctx.map(
        write_shard, shard_tasks, num_cpus=c.num_cpus, progress=(len(tasks), len(tasks) + len(shard_tasks))
    )
    ctx.logger.info("tokenize: %d shards written in %.1f s", len(shard_tasks), time.perf_counter() - t0)
    for shard in written:  # with the size and sha256 their tasks computed: the commit reads none again
        source = shard_folder.root_rel(shard["file"]) if shard_folder else None
        ctx.place(shard["file"], shard, source=source)

    index = {
        "format": "kiln-packed-v1",
        "dtype": dtype,
        "seq_len": c.seq_len,
        "tokens_per_sequence": c.seq_len + 1,
        "window": WINDOW_RULE,
        "eos_id": eos_id,
        "vocab_size": vocab,
        "val_rule": f"document in val when (int(id[:16], 16) & 0xFFFFFFFF) / 2**32 < {c.val_fraction}",
        "val_fraction": c.val_fraction,
        "documents": n_docs,
        "partitions": len(tasks),
        "splits": splits,
    }
    write_json_atomic(out / "index.json", index)
    placement = {  # the Ray node of each unit (None outside Ray)
        "partitions": [{"index": k, "node_id": cnt.get("node_id")} for k, cnt in enumerate(counts)],
        "shards": [{"file": w["file"], "node_id": w["node_id"]} for w in written],
    }
    if any(u["node_id"] for u in placement["partitions"] + placement["shards"]):  # run on Ray
        write_json_atomic(out / "units.json", placement)
    ctx.discard(work)  # the artifact holds the result now
    if shard_folder is not None:
        ctx.discard_when_committed(shard_folder)  # the commit copies the shards from it
    tokens = sum(s["tokens"] for s in splits.values())
    ctx.logger.info(
        "tokenize: %d tokens (%.0f tokens/s encoding), train %d sequences, val %d",
        tokens,
        encoded / max(encode_s, 1e-9),
        splits["train"]["sequences"],
        splits["val"]["sequences"],
    )
    return {
        "train_tokens": splits["train"]["tokens"],
        "val_tokens": splits["val"]["tokens"],
        "train_sequences": splits["train"]["sequences"],
        "val_sequences": splits["val"]["sequences"],
        "tail_tokens_dropped": sum(s["tail_tokens_dropped"] for s in splits.values()),
        "tokens_per_second": round(encoded / max(encode_s, 1e-9)),  # the tokens encoded in this attempt
    }


def _tokenizer_facts(folder: Path) -> tuple[int, int]:
    """(EOS id, size of the id space) from a saved Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    eos = config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    eos_id = tok.token_to_id(eos) if eos else None
    if eos_id is None:
        raise ValueError(f"tokenize: the tokenizer in {folder} has no EOS token in its vocabulary ({eos!r})")
    return eos_id, max(tok.get_vocab(with_added_tokens=True).values()) + 1
