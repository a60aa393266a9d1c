"""Execute a planned DAG on Ray: stages as tasks, independent ones at the same time.

    outcome = run_pipeline(cfg, PIPELINE, Selection(), address=None, wandb_mode="offline")

Each stage that must run becomes one Ray task once its inputs are complete (Ray reuses warm worker
processes, which keeps the overhead per stage near 35 ms: bench/orchestration.py). A training stage's own task asks for no CPU: its Ray Train workers hold the
resources. Before a stage starts, its resources are checked against the cluster's, and a request
no node can meet fails after `run.resource_wait_s` with what is missing. A failed stage blocks only
its downstream; independent branches still finish. Ctrl-C cancels the running tasks; staging
folders of cancelled stages are never complete and are cleaned up on the next run.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import preemption
from pipeline.artifacts import ArtifactStore
from pipeline.config import PROJECT_ROOT
from pipeline.context import thread_env
from pipeline.dag import DAG
from pipeline.diskspace import DiskFullError
from pipeline.display import Display
from pipeline.execute import StageJob, execute_stage
from pipeline.files import is_remote
from pipeline.plan import PlannedStage, Selection, adopt_legacy, check_runnable, checkpoint_layout, make_plan
from pipeline.preemption import Preempted


@dataclass
class Outcome:
    plan: list[PlannedStage]
    results: dict[str, dict] = field(default_factory=dict)  # stage -> {metrics, path, seconds}
    errors: dict[str, str] = field(default_factory=dict)
    blocked: dict[str, str] = field(default_factory=dict)
    interrupted: bool = False
    stopped: dict[str, int] = field(default_factory=dict)  # stage -> the step its SIGTERM checkpoint is at
    terminated: bool = False  # the run received SIGTERM (pipeline/preemption.py)

    @property
    def ok(self) -> bool:
        return not (self.errors or self.blocked or self.interrupted or self.stopped or self.terminated)


def run_pipeline(
    cfg, dag: DAG, sel: Selection | None = None, *, address: str | None = None, wandb_mode: str | None = None,
    display: Display | None = None,
) -> Outcome:  # fmt: skip
    store = ArtifactStore(cfg.run.root, cfg.run.name)
    plan = make_plan(cfg, dag, store, sel or Selection())
    check_runnable(plan)
    outcome = Outcome(plan)
    display = display or Display(quiet=True)
    adopt_legacy(store, plan, log=display.note)
    if store.remote:
        _finish_commits(store, plan, display)
    todo = [p for p in plan if p.action == "run"]
    if not todo:
        return outcome  # nothing to do: Ray is not even started
    store.run_dir.mkdir(parents=True, exist_ok=True)
    store.clean_stale()
    ray = _init_ray(address)
    task = ray.remote(max_retries=0)(_stage_task)
    jobs = {p.name: _job(cfg, dag, p, wandb_mode) for p in todo}
    waiting = [p.name for p in todo]
    running: dict = {}  # ref -> stage
    started: dict[str, float] = {}
    watch: dict[str, object] = {"next": 0.0}  # running worker groups short of resources -> why
    display.start(todo)
    ctrl_c, sigterm = _CtrlC.install(), contextlib.ExitStack()
    sigterm.enter_context(preemption.handling())  # noted by the handler, acted on below
    stop_flag = _stop_flag(ray)
    try:
        while waiting or running:
            ctrl_c.check()
            if preemption.asked() and _stop_on_sigterm(
                ray, stop_flag, cfg, outcome, waiting, running, display
            ):
                break
            for name in list(waiting):
                deps = jobs[name].inputs
                bad = [d for d in deps if d in outcome.errors or d in outcome.blocked]
                if bad:
                    waiting.remove(name)
                    outcome.blocked[name] = f"not run: {', '.join(bad)} failed"
                    display.finish(name, "blocked", outcome.blocked[name])
                    continue
                if any(d in waiting or d in running.values() for d in deps):
                    continue
                missing = _unmet(ray, dag[name], cfg, started.get(name))
                if missing is None:  # fits: submit
                    waiting.remove(name)
                    res = dag[name].driver_resources(cfg) if not dag[name].scaling(cfg) else {"CPU": 0}
                    # a stage driver that holds no resources (its tasks or workers do) stays on this
                    # node: losing a worker node must not take the stage's driver along
                    opts = {} if any(res.values()) else {"scheduling_strategy": _this_node(ray)}
                    if res.get("CPU", 0) > 0:  # a driver that computes (the tokenizer's training): its cores
                        opts["runtime_env"] = {"env_vars": thread_env(res["CPU"])}
                    ref = task.options(
                        num_cpus=res.get("CPU", 0), num_gpus=res.get("GPU", 0),
                        resources={k: v for k, v in res.items() if k not in ("CPU", "GPU")} or None,
                        name=f"kiln:{name}", **opts,
                    ).remote(jobs[name])  # fmt: skip
                    running[ref] = name
                    started[name] = time.time()
                    display.begin(name)
                elif missing.give_up:
                    waiting.remove(name)
                    outcome.errors[name] = missing.message
                    display.finish(name, "failed", outcome.errors[name])
                else:
                    started.setdefault(name, time.time())
                    display.waiting(name, missing.message)
            if not running:
                time.sleep(0.5) if waiting else None
                continue
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            for name in running.values():
                display.update(name, store.progress(name, jobs[name].work_key))
            _watch_resources(ray, dag, cfg, store, jobs, running, display, watch)
            for ref in ready:
                name = running.pop(ref)
                try:
                    outcome.results[name] = ray.get(ref)
                    display.finish(name, "complete", outcome.results[name])
                except Exception as e:  # the stage raised, or its process died
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, Preempted):  # SIGTERM: it saved a checkpoint and stopped
                        outcome.stopped[name] = cause.step
                        display.finish(name, "stopped", str(cause))
                        continue
                    outcome.errors[name] = _describe_failure(e, store.log_path(name))
                    display.finish(name, "failed", outcome.errors[name])
    except KeyboardInterrupt:
        outcome.interrupted = True
        for ref in running:
            ray.cancel(ref, force=True)
        display.interrupted()
    finally:
        ctrl_c.restore()
        sigterm.close()  # the SIGTERM handler before the run is back
        display.stop()
        if stop_flag is not None:
            ray.kill(stop_flag)
    return outcome


def _stop_flag(ray):
    """The run's StopFlag (pipeline/ray_context.py), which the worker groups of its stages read."""
    from pipeline.ray_context import StopFlag, stop_flag_name

    return StopFlag.options(name=stop_flag_name(), scheduling_strategy=_this_node(ray)).remote()


def _stop_on_sigterm(ray, stop_flag, cfg, outcome, waiting, running, display) -> bool:
    """After SIGTERM (a spot reclaim, a pod eviction, `scancel`; pipeline/preemption.py notes it): ask
    the running stages to save and stop (once), start no other; past `run.preempt_grace_s`, cancel
    those still running. True when the run loop should end."""
    if not outcome.terminated:
        outcome.terminated = True
        ray.get(stop_flag.set.remote())
        display.note(
            f"SIGTERM: the running stages save a checkpoint at their current step and stop "
            f"(within run.preempt_grace_s={cfg.run.preempt_grace_s:g}s)"
        )
        for name in waiting:
            outcome.blocked[name] = "not started: the run was stopped (SIGTERM)"
            display.finish(name, "blocked", outcome.blocked[name])
        waiting.clear()
    if time.monotonic() - preemption.asked_at() < cfg.run.preempt_grace_s:
        return False
    for ref, name in running.items():
        ray.cancel(ref, force=True)
        outcome.errors[name] = (
            f"did not stop within run.preempt_grace_s={cfg.run.preempt_grace_s:g}s of SIGTERM and was "
            "cancelled: the next run resumes it from its last periodic checkpoint"
        )
        display.finish(name, "failed", outcome.errors[name])
    return True


class _CtrlC:
    """Ctrl-C during a run. The handler raises KeyboardInterrupt, as Python's does, and also notes the
    press: one that lands in code that swallows exceptions (a `__del__` the garbage collector runs
    in the main thread) still stops the run at the loop's next turn. Only the main thread, where
    signals are handled, installs it; the handler before it is put back when the run ends."""

    def __init__(self, installed: bool):
        self.pressed, self.installed = False, installed
        self.previous = signal.getsignal(signal.SIGINT) if installed else None

    @classmethod
    def install(cls) -> _CtrlC:
        me = cls(installed=threading.current_thread() is threading.main_thread())
        if me.installed:
            signal.signal(signal.SIGINT, me._handle)
        return me

    def _handle(self, signum, frame):
        self.pressed = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.pressed:
            raise KeyboardInterrupt

    def restore(self) -> None:
        if self.installed:  # a handler not set from Python reads as None: put Python's default back
            previous = signal.default_int_handler if self.previous is None else self.previous
            signal.signal(signal.SIGINT, previous)


WATCH_EVERY_S = 2.0


def _watch_resources(ray, dag, cfg, store, jobs, running, display, watch) -> None:
    """A running worker group whose nodes went away waits (Ray Train restarts it from its last
    checkpoint once the cluster has room again): say what it waits for, in the display and in the
    stage's progress.json, where `status` on any machine reads it; clear it when resolved."""
    now = time.time()
    if now < watch["next"]:
        return
    watch["next"] = now + WATCH_EVERY_S
    for name in running.values():
        if dag[name].scaling(cfg) is None:
            continue
        unmet = _unmet(ray, dag[name], cfg, None, fail=False)
        short = unmet.message if unmet else None
        if short == watch.get(name):
            continue
        watch[name] = short
        try:
            store.note_waiting(name, jobs[name].work_key, f"{name}: {short}" if short else None)
        except OSError:
            pass
        if short:
            display.waiting(name, short)
        else:
            display.update(name, store.progress(name, jobs[name].work_key))


def _this_node(ray):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def _stage_task(job: StageJob) -> dict:
    """Body of a stage's Ray task: the stage runs with the Ray context."""
    from pipeline.ray_context import RayStageContext

    return execute_stage(job, make_context=RayStageContext)


def _job(cfg, dag, p: PlannedStage, wandb_mode) -> StageJob:
    return StageJob(
        stage=dag[p.name], fingerprint=p.fingerprint, work_key=p.work_key, cfg=cfg, config=p.config, inputs=p.inputs,
        root=_absolute(cfg.run.root), run_name=cfg.run.name, wandb_mode=wandb_mode or cfg.run.wandb,
        wandb_project=cfg.run.wandb_project, version=p.version, code_version=p.code, code_files=p.code_files,
        layout=checkpoint_layout(cfg, p.config), fresh=p.fresh, inputs_verified=True,
    )  # fmt: skip


def _finish_commits(store: ArtifactStore, plan, display: Display) -> None:
    """Folders of units that complete stages noted for removal after their commit and did not remove
    (their driver died in between: pipeline/units.py `note_after_commit`), removed now."""
    from pipeline import units

    for p in plan:
        if p.state != "complete":
            continue
        try:
            left = units.discard_after_commit(store, p.name, p.work_key)
        except (OSError, ValueError) as e:  # unreachable, or a damaged note: the next run tries again
            display.note(f"{p.name}: could not remove the work files left after its commit: {e}")
            continue
        if left:
            display.note(
                f"{p.name}: removed {', '.join(left)}, left after its commit by a run that stopped there"
            )


def _absolute(root: str) -> str:
    """A local root as an absolute path: stage tasks on a cluster do not share the driver's cwd."""
    if is_remote(root):
        return root
    return str(Path(root.removeprefix("file://")).resolve())


LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def _init_ray(address):
    # Stage tasks import the project: make it importable in every worker this driver starts.
    paths = [str(PROJECT_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if address == "auto" and os.environ.get("RAY_ADDRESS"):  # e.g. a job's driver on its cluster
        address = os.environ["RAY_ADDRESS"]
    if not address or _host(address) in LOOPBACK:
        _stay_on_loopback()
    import ray

    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:  # local: dashboard off, everything on loopback
            ray.init(include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    return ray


def _host(address: str) -> str:
    rest = address.split("://", 1)[-1]
    return rest.rsplit(":", 1)[0] if rest.count(":") == 1 or rest.startswith("[") else rest


def _stay_on_loopback() -> None:
    """Ray replaces a node address of 127.0.0.1 by the machine's interface address (and then binds
    its GCS, raylet, agents and workers on all interfaces) unless multi-node clusters are off for
    the process. A local run, or a driver of a cluster on this machine's loopback, turns them off,
    so that every port it opens listens on 127.0.0.1 only (tests/test_cluster_security.py)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if "ray._private.ray_constants" in sys.modules:  # read at import: correct an early import
        sys.modules["ray._private.ray_constants"].ENABLE_RAY_CLUSTER = (
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] != "0"
        )


@dataclass(frozen=True)
class Unmet:
    """What a stage waits for from the cluster; `give_up` once it waited `run.resource_wait_s`."""

    message: str
    give_up: bool = False


def _unmet(ray, stage, cfg, since: float | None, fail: bool = True) -> Unmet | None:
    """None if the cluster has the resources; else what is missing."""
    scaling = stage.scaling(cfg)
    need = dict(stage.driver_resources(cfg)) if scaling is None else {}
    if scaling is not None:
        for k, v in scaling.total().items():
            need[k] = need.get(k, 0) + v
    have = ray.cluster_resources()
    short = [
        f"{v:g} {k} (the cluster has {have.get(k, 0):g})"
        for k, v in need.items()
        if have.get(k, 0) + 1e-9 < v
    ]
    # each worker (or the stage's own task) must also fit on one node
    bundle = dict(stage.driver_resources(cfg)) if scaling is None else _worker_bundle(scaling)
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if not short and not any(all(n.get(k, 0) + 1e-9 >= v for k, v in bundle.items()) for n in nodes):
        short = [f"one node with {bundle} (no node has that much)"]
    if not short:
        return None
    what = ", ".join(short)
    hint = ""
    if scaling is not None and fail:
        s = next((s for s in stage.sections if hasattr(getattr(cfg, s), "num_workers")), stage.sections[0])
        hint = f"; lower {s}.num_workers / {s}.cpus_per_worker / {s}.gpus_per_worker, or add nodes"
    msg = f"{stage.name} needs {what}{hint}"
    waited = time.time() - (since or time.time())
    if fail and waited >= cfg.run.resource_wait_s:
        return Unmet(
            f"{msg} (waited {waited:.0f}s, run.resource_wait_s={cfg.run.resource_wait_s:g})", give_up=True
        )
    return Unmet(f"waiting for resources: {msg}")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _worker_bundle(scaling) -> dict[str, float]:
    bundle = {"CPU": scaling.cpus_per_worker, "GPU": scaling.gpus_per_worker, **scaling.resources_per_worker}
    return {k: v for k, v in bundle.items() if v}


def _describe_failure(e: Exception, log_path) -> str:
    """One stage's failure for the run's outcome: the training workers' own exceptions first (Ray
    Train's `worker_failures`: each distinct one with its ranks, as a rank that raised can take the
    others down with another error), then their tracebacks; a process that died; or the stage's
    error with its traceback as Ray gives it. A full disk's message says all (its traceback is in the log)."""
    cause = getattr(e, "cause", None)  # a RayTaskError's: the exception the stage raised
    if isinstance(cause, DiskFullError):
        return f"{cause}\n(log: {log_path})"
    failures = getattr(cause, "worker_failures", None)
    if failures:
        ranks: dict[str, list[int]] = {}
        for rank, err in sorted(failures.items()):
            ranks.setdefault(f"{type(err).__name__}: {err}", []).append(rank)
        heads = [f"{what} (worker rank {', '.join(map(str, r))})" for what, r in ranks.items()]
        return _ANSI.sub("", "\n".join([*heads, str(cause), f"(log: {log_path})"]))
    text = _ANSI.sub("", str(e))
    name = type(e).__name__
    if "WorkerCrashedError" in name or "died" in text.lower() and "worker" in text.lower():
        text = f"the stage's process died ({name}): {text.splitlines()[0] if text else ''}"
        try:
            with open(log_path, "a") as f:
                f.write(f"\n{time.strftime('%F %T')} ERROR stage process died: {e}\n")
        except OSError:
            pass
    return f"{text}\n(log: {log_path})"


def status_rows(plan: list[PlannedStage]) -> list[dict]:
    """`status --json`: one row per stage (`damaged` names the file and the reason)."""
    return [
        {
            "stage": p.name,
            "state": p.state,
            "fingerprint": p.fingerprint,
            "path": p.path,
            "metrics": (p.manifest or {}).get("metrics", {}),
            "progress": p.progress if p.state == "partial" else None,
            "damaged": p.damage,
            "notes": p.notes,
            "seconds": (p.manifest or {}).get("seconds"),
        }
        for p in plan
    ]
