"""Artifacts built before stage versions: recognised and taken over, never recomputed.

Until stage versions, a fingerprint hashed the stage's code (every project module it imports) and
its config minus a shorter list of unkeyed keys. Such an artifact's manifest holds what built it:
its config, its inputs' fingerprints and that code hash. Planning recomputes the old fingerprint
from that record (with today's input files), which proves the record is the artifact's; where the
recorded config is the current one but for placement keys, the artifact is what this config would
build, and `run` moves it (and its work dir, so a raised budget still continues from its
checkpoints) to its new fingerprint, saying so.

    adoption = find(cfg, stage, store, planned, plan)   # planning: read-only
    adopt(store, planned)                               # `run`: the rename, manifest last
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline.config import budget_keys, drop_keys, placement_keys, section_dict, to_dict, without_budget
from pipeline.fingerprint import digest

UNKEYED = {
    "run": ("name", "root", "wandb", "wandb_project", "resource_wait_s"),
    "pretrain": ("checkpoint_every", "keep_last", "max_failures"),
    "sft": ("checkpoint_every", "keep_last", "max_failures", "max_errors"),
    "reward": ("checkpoint_every", "keep_last", "max_failures", "max_errors"),
    "ppo": ("checkpoint_every", "keep_last", "max_failures", "max_errors"),
}
"""The keys the old fingerprints left out, by section (every other key was in)."""

AS_BUILT = {"ingest": {"near_dedup": False, "decontaminate": ()}, "reward": {"answer_eval": None}}
"""Keys added since whose default changed what the stage makes: an artifact built before stage
versions was made as with these values, not the defaults (a key added with a default that keeps the
old behaviour needs no entry). Ingest 2 drops near-duplicates and contaminated documents (ingest 3 finds
them with another MinHash): both make the old output with these keys. Reward 2 measures `answer_auc` on
`answer_eval`: without it, what reward 1 made."""

MADE_AS_BEFORE = {"ingest": 3, "tokenizer": 1, "tokenize": 1, "pretrain": 1, "sft": 1, "reward": 2, "ppo": 1}
"""The last version of each stage that makes what it made before stage versions (with AS_BUILT's keys):
an artifact of that time is taken over only by these. Tokenize 2 packs each source apart, so an old
tokenize artifact, and all that reads it, is built again."""


@dataclass(frozen=True)
class Adoption:
    old_fingerprint: str
    old_work_key: str
    manifest: dict | None  # as it will read once adopted; None: only its work dir is taken over


def find(cfg, stage, store, planned, plan: dict) -> Adoption | None:
    """The artifact built before stage versions that this config would build now, if any; or, for a
    config that differs from one only in budget keys (a raised `pretrain.steps`), that artifact's
    work dir, so the longer run continues from its checkpoints. `plan` holds the upstream stages
    already planned: each input must be such an artifact too, adopted in this plan or in an
    earlier run (its manifest says `adopted_from`)."""
    if planned.version > MADE_AS_BEFORE.get(stage.name, 0):
        return None  # the stage makes something else now
    adopted_inputs = {}
    for dep in planned.inputs:
        q = plan[dep]
        old = (
            q.adopt.old_fingerprint
            if q.adopt and q.adopt.manifest
            else (q.manifest or {}).get("adopted_from")
        )
        if old is None:
            return None
        adopted_inputs[dep] = old
    extra = stage.extra_fingerprint(cfg) if stage.extra_fingerprint is not None else None
    now = section_dict(cfg, stage.sections)
    budgets = {s: budget_keys(cfg, s) for s in now}
    work_only = None
    for m in store.previous(stage.name):
        if "version" in m or "code_version" not in m:
            continue  # built with stage versions already, or not by Kiln
        # the inputs it was built from: an input added since (sft's and ppo's tokenize: the held-out
        # windows they score) is not in its old fingerprint
        recorded = m.get("inputs", adopted_inputs)
        if not set(recorded) <= set(adopted_inputs):
            continue  # read an input it no longer reads
        old_inputs = {dep: adopted_inputs[dep] for dep in recorded}
        built = m.get("config", {})
        keyed = {s: {k: v for k, v in d.items() if k not in UNKEYED.get(s, ())} for s, d in built.items()}
        if extra is not None:
            keyed["_extra"] = extra  # today's input files: the old fingerprint holds only if unchanged
        if old_fingerprint(stage.name, keyed, old_inputs, m["code_version"]) != m.get("fingerprint"):
            continue  # another config, other inputs, or input files changed since
        if not _same_identity(cfg, now, built, ignore=budgets):
            continue
        work_key = old_fingerprint(stage.name, without_budget(cfg, keyed), old_inputs, m["code_version"])
        if not _same_identity(cfg, now, built):
            work_only = work_only or Adoption(m["fingerprint"], work_key, None)
            continue
        adopted = {
            **m,
            "fingerprint": planned.fingerprint,
            "inputs": planned.inputs,
            "version": planned.version,
            "adopted_from": m["fingerprint"],
        }
        return Adoption(m["fingerprint"], work_key, adopted)
    return work_only


def _same_identity(cfg, now: dict, built: dict, ignore: dict | None = None) -> bool:
    """The config the artifact was built with (`built`, authenticated by its old fingerprint) is the
    current one but for placement keys (and `ignore`: section -> keys). A key added since counts as
    the same while it holds its default (the behaviour the artifact was built with); a key removed
    since is ignored. (AS_BUILT: the keys whose defaults are not the old behaviour.)"""
    for section, values in now.items():
        then = built.get(section)
        if then is None:
            return False
        defaults = {f.name: f for f in dataclasses.fields(getattr(cfg, section))}
        skip = (*placement_keys(cfg, section), *(ignore or {}).get(section, ()))
        for key, value in drop_keys(values, skip).items():
            if key in then:
                if then[key] != value:
                    return False
            elif value != to_dict(AS_BUILT.get(section, {}).get(key, _default(defaults[key]))):
                return False
    return True


def _default(f):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def adopt(store, planned) -> None:
    """Move the work dir, then the artifact (each crash-safe: pipeline/artifacts.py) to the new identity."""
    a = planned.adopt
    store.adopt_work(planned.name, a.old_work_key, planned.work_key)
    if a.manifest is not None:
        store.adopt_artifact(planned.name, a.old_fingerprint, planned.fingerprint, a.manifest)


def old_fingerprint_of(q) -> str | None:
    """The fingerprint a planned stage's artifact had before stage versions, if it was built then
    (being adopted in this plan, or adopted in an earlier run)."""
    if q.adopt is not None and q.adopt.manifest is not None:
        return q.adopt.old_fingerprint
    return (q.manifest or {}).get("adopted_from")


def old_fingerprint(stage: str, config: dict, inputs: dict, code: str) -> str:
    return digest({"stage": stage, "config": config, "inputs": inputs, "code": code})[:16]
