"""Artifacts built before stage versions: recognised and taken over, never recomputed.

Until stage versions, a fingerprint hashed the stage's code (every project module it imports) and
its config minus a shorter list of unkeyed keys. Such an artifact's manifest holds what built it:
its config, its inputs' fingerprints and that code hash. Planning recomputes the old fingerprint
from the current config (placement keys as the manifest has them) and that record; where it
matches, the artifact is what this config would build, and `run` renames it (and its work dir, so
a raised budget still continues from its checkpoints) to its new fingerprint, saying so.

    adoption = find(cfg, stage, store, planned, plan)   # planning: read-only
    adopt(store, planned)                               # `run`: the rename, manifest last
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import budget_keys, placement_keys, section_dict
from pipeline.fingerprint import digest

UNKEYED = {
    "run": ("name", "root", "wandb", "wandb_project", "resource_wait_s"),
    "pretrain": ("checkpoint_every", "keep_last", "max_failures"),
    "sft": ("checkpoint_every", "keep_last", "max_failures", "max_errors"),
    "reward": ("checkpoint_every", "keep_last", "max_failures", "max_errors"),
    "ppo": ("checkpoint_every", "keep_last", "max_failures", "max_errors"),
}
"""The keys the old fingerprints left out, by section (every other key was in)."""


@dataclass(frozen=True)
class Adoption:
    old_fingerprint: str
    old_work_key: str
    manifest: dict  # as it will read once adopted


def find(cfg, stage, store, planned, plan: dict) -> Adoption | None:
    """The artifact built before stage versions that this config would build now, if any.
    `plan` holds the upstream stages already planned (an input must have been adopted too)."""
    old_inputs = {}
    for dep in planned.inputs:
        q = plan[dep]
        if q.adopt is None:
            return None
        old_inputs[dep] = q.adopt.old_fingerprint
    extra = stage.extra_fingerprint(cfg) if stage.extra_fingerprint is not None else None
    for m in store.previous(stage.name):
        if "version" in m or "code_version" not in m:
            continue  # built with stage versions already, or not by Kiln
        full = section_dict(cfg, stage.sections)
        for s, d in full.items():  # placement is not identity: take it as it was
            built = m.get("config", {}).get(s, {})
            d.update({k: built[k] for k in placement_keys(cfg, s) if k in built})
        keyed = {s: {k: v for k, v in d.items() if k not in UNKEYED.get(s, ())} for s, d in full.items()}
        if extra is not None:
            keyed["_extra"] = extra
        if old_fingerprint(stage.name, keyed, old_inputs, m["code_version"]) != m.get("fingerprint"):
            continue
        unbudgeted = {
            s: {k: v for k, v in d.items() if k not in budget_keys(cfg, s)} if s != "_extra" else d
            for s, d in keyed.items()
        }
        work_key = old_fingerprint(stage.name, unbudgeted, old_inputs, m["code_version"])
        adopted = {
            **m,
            "fingerprint": planned.fingerprint,
            "inputs": planned.inputs,
            "version": planned.version,
            "adopted_from": m["fingerprint"],
        }
        return Adoption(m["fingerprint"], work_key, adopted)
    return None


def adopt(store, planned) -> None:
    """Rename the artifact (manifest rewritten last) and its work dir to the new identity."""
    a = planned.adopt
    store.rename_work(planned.name, a.old_work_key, planned.work_key)
    store.rename_artifact(planned.name, a.old_fingerprint, planned.fingerprint, a.manifest)


def old_fingerprint(stage: str, config: dict, inputs: dict, code: str) -> str:
    return digest({"stage": stage, "config": config, "inputs": inputs, "code": code})[:16]
