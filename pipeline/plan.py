"""Planning a run: each stage's fingerprint, its state, and why it will (or will not) run.

    plan = make_plan(cfg, dag, store, Selection(until="pretrain"))
    for p in plan: print(p.name, p.state, p.action, p.reason, p.notes)

A stage's identity is its name, its config minus placement keys, its inputs' fingerprints and its
declared VERSION (pipeline/fingerprint.py). Its code is recorded, not keyed: a complete artifact
whose code changed since it was built is kept and noted, and rebuilt only on request
(`Selection(rebuild_changed=True)`, `--from`). Planning reads configs, source files and manifests
only: no Ray, no torch, so a run with nothing to do and `status` answer in well under a second.
The plan covers the config's DAG: an opt-in stage that is off (`grpo.enabled: false`) is in it only
when the selection names it (`--only grpo`, `--from grpo`, `--until grpo`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache, partial

from pipeline import legacy
from pipeline.artifacts import ArtifactStore
from pipeline.config import (
    budget_keys,
    checkpoint_layout_keys,
    drop_keys,
    layout_problem,
    placement_keys,
    section_dict,
    without_budget,
)
from pipeline.dag import DAG
from pipeline.fingerprint import changed_files, code_record, stage_fingerprint


class PlanError(ValueError):
    pass


@dataclass(frozen=True)
class Selection:
    only: tuple[str, ...] = ()
    start: str | None = None  # --from: rebuild this stage and everything downstream
    until: str | None = None
    rebuild_changed: bool = False  # --rebuild-changed: rebuild complete stages whose code changed


@dataclass
class PlannedStage:
    name: str
    fingerprint: str  # names the artifact: config (budget included, placement not), inputs, version
    work_key: str  # names the work dir: the same without budget keys, so a longer run continues
    config: dict  # the sections the stage reads, budget and placement keys included
    version: int  # the VERSION its module declares
    code: str  # one hash of its code (the stage module and the project modules it imports)
    code_files: dict[str, str]  # that code, file by file (path -> sha256[:16])
    inputs: dict[str, str]
    state: str  # complete | partial | damaged | missing
    action: str = "skip"  # run | skip | unselected
    reason: str = ""
    notes: list[str] = field(default_factory=list)  # worth knowing, changes nothing (code edited since)
    manifest: dict | None = None
    progress: dict | None = None
    path: str = ""
    damage: dict | None = None  # state damaged: {"file", "reason"}
    problems: list[str] = field(default_factory=list)  # why it cannot run as configured (see check_runnable)
    fresh: bool = False  # a rebuild: the stage starts over (its checkpoints are removed first)
    adopt: legacy.Adoption | None = None  # built before stage versions: taken over under this identity
    code_changed: bool = False  # complete, but its code changed since it was built (a note says which)


def fingerprinted_config(cfg, stage) -> tuple[dict, dict]:
    """(config the stage reads, the part of it that decides reuse: placement keys removed)."""
    full = section_dict(cfg, stage.sections)
    keyed = {s: drop_keys(d, placement_keys(cfg, s)) for s, d in full.items()}
    if stage.extra_fingerprint is not None:
        keyed["_extra"] = stage.extra_fingerprint(cfg)
    return full, keyed


def make_plan(cfg, dag: DAG, store: ArtifactStore, sel: Selection = Selection(), deep: bool = False):
    named = [name for name in (*sel.only, sel.start, sel.until) if name is not None]
    for name in named:
        if name not in dag.by_name:
            raise PlanError(f"unknown stage {name!r}; stages are: {', '.join(dag.order)}")
    order = dag.topological(cfg, named)  # an opt-in stage that is off is planned only when named
    selected = set(sel.only) if sel.only else set(order)
    forced: dict[str, str] = {}  # stage -> why it is rebuilt
    if sel.start:
        forced = dict.fromkeys(dag.downstream(cfg, sel.start), f"--from {sel.start}")
        selected &= set(forced)
    if sel.until:
        selected &= dag.upstream(cfg, sel.until) | {sel.until}

    plan: dict[str, PlannedStage] = {}
    for name in order:
        stage = dag[name]
        full, keyed = fingerprinted_config(cfg, stage)
        inputs = {dep: plan[dep].fingerprint for dep in stage.input_names(cfg)}
        try:
            version = stage.version
        except ValueError as e:
            raise PlanError(str(e)) from None
        fp = stage_fingerprint(name, keyed, inputs, version)
        work_key = stage_fingerprint(name, without_budget(cfg, keyed), inputs, version)
        code, files = code_record(stage.module)
        p = PlannedStage(name, fp, work_key, full, version, code, files, inputs, "missing")
        _set_state(store, p, deep, partial(legacy.find, cfg, stage, store, p, plan))
        if p.state == "complete":
            changed = _code_notes(p)
            p.notes, p.code_changed = p.notes + changed, bool(changed)
        if sel.rebuild_changed and p.code_changed and name in selected:
            for s in dag.downstream(cfg, name):
                forced.setdefault(s, f"code changed, rebuilt (--rebuild-changed): {name}")
        _decide(cfg, store, selected, forced, plan, p, keyed)
        plan[name] = p

    # a selected stage needs its inputs either complete or produced in this run
    for p in plan.values():
        if p.action != "run":
            continue
        for dep in p.inputs:
            q = plan[dep]
            if q.action != "run" and q.state != "complete":
                raise PlanError(
                    f"{p.name} needs the {dep} artifact, which is {q.state}: "
                    f"run `--until {dep}` first, or drop --only/--from"
                )
    return [plan[n] for n in order]


def _set_state(store, p: PlannedStage, deep: bool, find_legacy) -> None:
    """complete (or adoptable, which counts as complete) / damaged / partial / missing."""
    manifest, problem = store.check(p.name, p.fingerprint, deep=deep)
    p.path = store.artifact_uri(p.name, p.fingerprint)
    if manifest is not None:
        p.state, p.manifest = "complete", manifest
        return
    if problem.damaged:
        p.state, p.damage = "damaged", {"file": problem.file, "reason": problem.reason}
        return
    adoption = find_legacy()
    if adoption is not None and adoption.manifest is None:  # only its work dir: it continues from it
        p.adopt = adoption
        p.progress = store.progress(p.name, adoption.old_work_key)
        p.state = "partial" if p.progress else "missing"
        p.notes.append(
            f"continues from the work dir of {p.name}-{adoption.old_fingerprint}, built before stage versions"
        )
        return
    if adoption is not None:
        _, problem = store.check(p.name, adoption.old_fingerprint, deep=deep)
        if problem is not None:  # damaged: not adopted, rebuilt under its new identity
            p.state, p.damage = "damaged", {"file": problem.file, "reason": problem.reason}
            return
        p.state, p.manifest, p.adopt = "complete", adoption.manifest, adoption
        p.path = store.artifact_uri(p.name, adoption.old_fingerprint)
        p.notes.append(
            f"built before stage versions as {p.name}-{adoption.old_fingerprint}: "
            f"`run` adopts it as {p.name}-{p.fingerprint} without recomputing"
        )
        return
    p.progress = store.progress(p.name, p.work_key)
    if p.progress:
        p.state = "partial"


def _decide(cfg, store, selected, forced, plan, p: PlannedStage, keyed) -> None:
    """The stage's action and the reason for it."""
    will_run = {d for d, q in plan.items() if q.action == "run"}
    if p.name not in selected:
        p.action = "unselected"
    elif p.name in forced:  # a rebuild: whatever checkpoints it has were trained on what it replaces
        p.action, p.reason, p.fresh = (
            "run",
            forced[p.name] + " (starts over: its checkpoints are removed)",
            True,
        )
    elif p.state == "complete":
        p.action, p.reason = "skip", "complete"
    else:
        p.action = "run"
        p.reason = _why(store, p, will_run & set(p.inputs), keyed, plan)
    if p.action == "run":
        _verify_inputs(store, plan, p)
        if not p.fresh:
            p.problems += _below_checkpoint(cfg, store, p) + _other_layout(cfg, store, p)
        if p.problems:
            p.reason = "cannot run: " + "; ".join(p.problems)


def check_runnable(plan: list[PlannedStage]) -> None:
    """Raise PlanError, naming the config keys, if a stage to run cannot be run as configured."""
    problems = [msg for p in plan if p.action == "run" for msg in p.problems]
    if problems:
        raise PlanError("\n".join(problems))


def adopt_legacy(store: ArtifactStore, plan: list[PlannedStage], log=print) -> list[str]:
    """Take over what was built before stage versions (`run` only: planning itself writes nothing):
    the artifacts this plan reuses, and the work dirs of the stages it continues. Returns the stages."""
    done = []
    for p in plan:
        a = p.adopt
        if a is None or (a.manifest is not None and p.action == "run") or (a.manifest is None and p.fresh):
            continue
        legacy.adopt(store, p)
        if a.manifest is None:
            log(
                f"{p.name}: continues from the work dir of {p.name}-{a.old_fingerprint}, built before stage versions"
            )
        else:
            log(
                f"{p.name}: adopted {p.name}-{a.old_fingerprint}, built before stage versions, as {p.name}-{p.fingerprint}"
            )
            p.path, p.manifest = store.artifact_uri(p.name, p.fingerprint), a.manifest
        p.notes = [n for n in p.notes if "before stage versions" not in n]
        p.adopt = None
        done.append(p.name)
    return done


def checkpoint_layout(cfg, sections) -> dict:
    """{section.key: value} of the placement keys an in-stage checkpoint is tied to."""
    return {f"{s}.{k}": getattr(getattr(cfg, s), k) for s in sections for k in checkpoint_layout_keys(cfg, s)}


def _code_notes(p: PlannedStage) -> list[str]:
    built = (p.manifest or {}).get("code_files")
    if built is not None:
        changed = changed_files(built, p.code_files)
        return [f"code changed since it was built: {', '.join(changed)}"] if changed else []
    if (p.manifest or {}).get("code_version") not in (None, p.code):
        return ["code changed since it was built (this manifest predates per-file code records)"]
    return []


def _below_checkpoint(cfg, store, p: PlannedStage) -> list[str]:
    """A stage resumes from its last checkpoint and its budget keys may be raised, not lowered
    below it: the checkpoint cannot give a model of fewer steps (kiln/training.py check_resumed
    says the same from inside the workers, for work dirs that predate this record)."""
    saved = (p.progress or {}).get("checkpoint")
    if saved is None or p.name not in p.config:
        return []
    where = store.work_uri(p.name, p.work_key)
    return [
        f"{p.name}.{key}={value}, but this stage's last checkpoint ({where}) is at step {saved}: "
        f"set {p.name}.{key} to {saved} or more to finish from it, or delete that folder to start over"
        for key in budget_keys(cfg, p.name)
        if (value := p.config[p.name].get(key)) is not None and value < saved
    ]


def _other_layout(cfg, store, p: PlannedStage) -> list[str]:
    """A checkpoint loads only under a placement its section accepts (`layout_problem`; by default the
    world size and ZeRO stage it was written with): placement keys are not in the work dir's key, so
    say so before anything starts."""
    prog = p.progress or {}
    saved, written = prog.get("checkpoint"), prog.get("layout")
    if saved is None or not written:
        return []
    now = checkpoint_layout(cfg, p.config)
    where = store.work_uri(p.name, p.work_key)
    problems = []
    for section in p.config:
        keys = [f"{section}.{k}" for k in checkpoint_layout_keys(cfg, section)]
        old = {k: written[k] for k in keys if k in written}
        new = {k: now[k] for k in old}
        if old == new:
            continue
        why = layout_problem(cfg, section, old, new)
        if why:
            problems.append(
                f"{p.name}: its checkpoint at step {saved} ({where}) was written with {why}, or start the "
                f"stage over: delete that folder, or run with `--from {p.name}` (which re-runs what follows too)"
            )
    return problems


def _verify_inputs(store, plan: dict[str, PlannedStage], p: PlannedStage) -> None:
    """sha256 of the complete inputs a running stage will consume; a damaged one is rebuilt first
    (same fingerprint, so what was built from it before stays valid)."""
    for dep in p.inputs:
        q = plan[dep]
        if q.state != "complete" or q.action == "run":
            continue
        stored = legacy.old_fingerprint_of(q) if q.adopt else q.fingerprint
        manifest, problem = store.check(dep, stored, deep=True)
        if manifest is not None:
            continue
        if q.action == "unselected":
            raise PlanError(
                f"{p.name} needs the {dep} artifact, which is damaged ({problem}): run `--from {dep}`"
            )
        q.state, q.manifest, q.action, q.reason = "damaged", None, "run", f"damaged artifact: {problem}"
        q.damage, q.adopt = {"file": problem.file, "reason": problem.reason}, None


@cache
def _defaults(section: str) -> dict:
    from pipeline.config import PipelineConfig, to_dict

    return to_dict(getattr(PipelineConfig(), section))


def _default(section: str, key: str):
    """A key's default: one an artifact's recorded config lacks (added since) is no change at it."""
    return _defaults(section).get(key, _MISSING) if section != "_extra" else _MISSING


_MISSING = object()


def _why(store, p: PlannedStage, rerun_inputs: set[str], keyed: dict, plan: dict) -> str:
    if p.state == "damaged":
        return f"damaged artifact: {p.damage['file']} {p.damage['reason']}"
    prog = p.progress or {}
    if p.state == "partial" and prog.get("step", 0) < prog.get("total", 0):
        return f"partial: resumes at step {prog.get('step')} of {prog.get('total')}"
    if rerun_inputs:
        return "input re-runs: " + ", ".join(sorted(rerun_inputs))
    previous = store.previous(p.name)
    if not previous:
        return "never run"
    last = previous[0]
    reasons = []
    changed_inputs = [
        d
        for d, fp in p.inputs.items()
        if last.get("inputs", {}).get(d) not in (fp, legacy.old_fingerprint_of(plan[d]))
    ]
    if changed_inputs:
        reasons.append("inputs changed: " + ", ".join(changed_inputs))
    old_cfg = last.get("config", {})
    diffs = [
        f"{s}.{k}: {old_cfg.get(s, {}).get(k)!r} -> {v!r}"
        for s, d in keyed.items()
        if s != "_extra"
        for k, v in d.items()
        if old_cfg.get(s, {}).get(k) != v and not (k not in old_cfg.get(s, {}) and v == _default(s, k))
    ]
    if diffs and p.state == "partial":
        diffs[-1] += f" (continues from step {prog.get('step')})"
    if diffs:
        reasons.append("config changed: " + "; ".join(diffs))
    if last.get("version", p.version) != p.version:
        reasons.append(f"stage version {last.get('version')} -> {p.version}")
    if "_extra" in keyed and not (diffs or changed_inputs) and last.get("version", p.version) == p.version:
        reasons.append("input files changed")
    return ", ".join(reasons) or "settings changed"
