"""Planning a run: each stage's fingerprint, its state, and why it will (or will not) run.

    plan = make_plan(cfg, dag, store, Selection(until="pretrain"))
    for p in plan: print(p.name, p.state, p.action, p.reason)

Planning reads configs, source files and manifests only: no Ray, no torch, so a run with nothing
to do and `status` answer in well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.artifacts import ArtifactStore
from pipeline.config import budget_keys, section_dict, unfingerprinted_keys
from pipeline.dag import DAG
from pipeline.fingerprint import code_version, stage_fingerprint


class PlanError(ValueError):
    pass


@dataclass(frozen=True)
class Selection:
    only: tuple[str, ...] = ()
    start: str | None = None  # --from: re-run this stage and everything downstream
    until: str | None = None


@dataclass
class PlannedStage:
    name: str
    fingerprint: str  # names the artifact: config (budget included), inputs, code
    work_key: str  # names the work dir: the same without budget keys, so a longer run continues
    config: dict  # the sections the stage reads, budget keys included
    code: str
    inputs: dict[str, str]
    state: str  # complete | partial | missing
    action: str = "skip"  # run | skip | unselected
    reason: str = ""
    manifest: dict | None = None
    progress: dict | None = None
    path: str = ""
    problems: list[str] = field(default_factory=list)  # why it cannot run as configured (see check_runnable)


def fingerprinted_config(cfg, stage) -> tuple[dict, dict]:
    """(config the stage reads, the part of it that decides reuse: budget keys removed)."""
    full = section_dict(cfg, stage.sections)
    keyed = {s: _drop(d, unfingerprinted_keys(cfg, s)) for s, d in full.items()}
    if stage.extra_fingerprint is not None:
        keyed["_extra"] = stage.extra_fingerprint(cfg)
    return full, keyed


def _drop(d: dict, keys) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def make_plan(cfg, dag: DAG, store: ArtifactStore, sel: Selection = Selection(), deep: bool = False):
    order = dag.topological(cfg)
    for name in (*sel.only, sel.start, sel.until):
        if name is not None and name not in dag.by_name:
            raise PlanError(f"unknown stage {name!r}; stages are: {', '.join(order)}")
    selected = set(sel.only) if sel.only else set(order)
    forced: set[str] = set()
    if sel.start:
        forced = dag.downstream(cfg, sel.start)
        selected &= forced
    if sel.until:
        selected &= dag.upstream(cfg, sel.until) | {sel.until}

    plan: dict[str, PlannedStage] = {}
    for name in order:
        stage = dag[name]
        full, keyed = fingerprinted_config(cfg, stage)
        inputs = {dep: plan[dep].fingerprint for dep in stage.input_names(cfg)}
        code = code_version(stage.module)
        fp = stage_fingerprint(name, keyed, inputs, code)
        unbudgeted = {s: _drop(d, budget_keys(cfg, s)) if s != "_extra" else d for s, d in keyed.items()}
        work_key = stage_fingerprint(name, unbudgeted, inputs, code)
        manifest, problem = store.check(name, fp, deep=deep)
        state = "complete" if manifest else "missing"
        p = PlannedStage(name, fp, work_key, full, code, inputs, state, manifest=manifest)
        p.path = store.artifact_uri(name, fp)
        if manifest is None:
            p.progress = store.progress(name, work_key)
            if p.progress:
                p.state = "partial"
        will_run = {d for d, q in plan.items() if q.action == "run"}
        if name not in selected:
            p.action = "unselected"
        elif name in forced:
            p.action, p.reason = "run", f"--from {sel.start}"
        elif manifest is not None:
            p.action, p.reason = "skip", "complete"
        else:
            p.action = "run"
            p.reason = _why(store, p, problem, will_run & set(inputs), keyed)
        if p.action == "run":
            _verify_inputs(store, plan, p)
            p.problems += _below_checkpoint(cfg, store, p)
            if p.problems:
                p.reason = "cannot run: " + "; ".join(p.problems)
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


def check_runnable(plan: list[PlannedStage]) -> None:
    """Raise PlanError, naming the config keys, if a stage to run cannot be run as configured."""
    problems = [msg for p in plan if p.action == "run" for msg in p.problems]
    if problems:
        raise PlanError("\n".join(problems))


def _below_checkpoint(cfg, store, p: PlannedStage) -> list[str]:
    """A stage resumes from its last checkpoint and its budget keys may be raised, not lowered
    below it: the checkpoint cannot give a model of fewer steps (stages/training.py check_resumed
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


def _verify_inputs(store, plan: dict[str, PlannedStage], p: PlannedStage) -> None:
    """sha256 of the complete inputs a running stage will consume; a damaged one is rebuilt first
    (same fingerprint, so what was built from it before stays valid)."""
    for dep in p.inputs:
        q = plan[dep]
        if q.state != "complete" or q.action == "run":
            continue
        manifest, problem = store.check(dep, q.fingerprint, deep=True)
        if manifest is not None:
            continue
        if q.action == "unselected":
            raise PlanError(
                f"{p.name} needs the {dep} artifact, which is damaged ({problem}): run `--from {dep}`"
            )
        q.state, q.manifest, q.action, q.reason = "missing", None, "run", f"damaged artifact: {problem}"


def _why(store, p: PlannedStage, problem: str | None, rerun_inputs: set[str], keyed: dict) -> str:
    if problem and problem != "no artifact":  # a damaged artifact, whatever its work dir holds
        return f"incomplete artifact: {problem}"
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
    changed_inputs = [d for d, fp in p.inputs.items() if last.get("inputs", {}).get(d) != fp]
    if changed_inputs:
        reasons.append("inputs changed: " + ", ".join(changed_inputs))
    old_cfg = last.get("config", {})
    diffs = [
        f"{s}.{k}: {old_cfg.get(s, {}).get(k)!r} -> {v!r}"
        for s, d in keyed.items()
        if s != "_extra"
        for k, v in d.items()
        if old_cfg.get(s, {}).get(k) != v
    ]
    if diffs and p.state == "partial":
        diffs[-1] += f" (continues from step {prog.get('step')})"
    if diffs:
        reasons.append("config changed: " + "; ".join(diffs))
    if last.get("code_version") != p.code:
        reasons.append("code changed")
    if "_extra" in keyed and not diffs and not changed_inputs and last.get("code_version") == p.code:
        reasons.append("input files changed")
    return ", ".join(reasons) or "settings changed"
