"""Kiln's command line: run the pipeline, see its state, look at what it trained.

    python launch.py                                   # run configs/tiny.yaml on a local Ray instance
    python launch.py run configs/tiny.yaml --set pretrain.steps=400 --until pretrain
    python launch.py run --dry-run [--json]            # resolved config, DAG, why each stage runs
    python launch.py run --rebuild-changed             # also rebuild stages whose code changed since
    python launch.py status [--json | --wide]          # complete / partial (step k of n) / damaged / missing
    python launch.py submit --address http://HEAD:8265 --root s3://bucket/kiln   # as a Ray job
    python launch.py export pretrain out/ --format llama
    python launch.py generate sft --prompt "Hello"

Plans, tables and JSON go to stdout; progress, logs and warnings to stderr. Exit codes: 0 when every
selected stage is complete (for `--dry-run`: a valid plan), 1 when one is not (failed, partial,
damaged, missing), 2 for usage and config errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    args = _parser().parse_args(argv)
    from rich.console import Console

    from pipeline.config import ConfigError
    from pipeline.plan import PlanError

    console = Console(stderr=True)
    try:
        return args.func(args, console)
    except (ConfigError, PlanError) as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        return 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("config", nargs="?", default=None, help="YAML preset (default configs/tiny.yaml)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override")
        sp.add_argument("--root", help="artifact root (run.root): a path or s3://bucket/prefix")
        sp.add_argument("--name", help="pipeline run name (run.name)")

    run = sub.add_parser("run", help="run the pipeline (stages whose artifact is complete are skipped)")
    common(run)
    run.add_argument("--only", help="run only these stages (comma-separated); their inputs must exist")
    run.add_argument("--from", dest="start", help="re-run this stage and everything downstream")
    run.add_argument("--until", help="stop after this stage")
    run.add_argument("--address", help="Ray cluster address (default: start Ray locally)")
    run.add_argument("--wandb", choices=["online", "offline", "disabled"], help="W&B mode (run.wandb)")
    run.add_argument("--dry-run", action="store_true", help="print config, DAG and what would run; exit")
    run.add_argument("--json", action="store_true", help="with --dry-run: the plan as a JSON list on stdout")
    run.add_argument(
        "--rebuild-changed", action="store_true",
        help="rebuild complete stages whose code changed since they were built (and their downstream)",
    )  # fmt: skip
    run.set_defaults(func=cmd_run)

    status = sub.add_parser("status", help="state of each stage: complete / partial / damaged / missing")
    common(status)
    status.add_argument("--json", action="store_true", help="machine-readable list of stages")
    status.add_argument("--wide", action="store_true", help="every metric and the full artifact path")
    status.add_argument("--verify", action="store_true", help="also check every file's sha256")
    status.set_defaults(func=cmd_status)

    submit = sub.add_parser("submit", help="run the pipeline as a job on a Ray cluster (Jobs API)")
    common(submit)
    submit.add_argument("--address", required=True, help="the cluster's Jobs API, e.g. http://HEAD:8265")
    submit.add_argument("--only", help="run only these stages (comma-separated); their inputs must exist")
    submit.add_argument("--from", dest="start", help="re-run this stage and everything downstream")
    submit.add_argument("--until", help="stop after this stage")
    submit.add_argument("--wandb", choices=["online", "offline", "disabled"], help="W&B mode (run.wandb)")
    submit.add_argument(
        "--rebuild-changed",
        action="store_true",
        help="rebuild complete stages whose code changed since they were built",
    )
    submit.add_argument("--python", default="python", help="interpreter on the head (default: python)")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return")
    submit.set_defaults(func=cmd_submit)

    export = sub.add_parser("export", help="write a stage's model as a folder plain transformers/vLLM load")
    export.add_argument("stage", help="a stage whose artifact is a model (pretrain, sft, ppo, grpo, reward)")
    export.add_argument("out_dir", help="folder to write (must not exist or be empty)")
    common(export)
    export.add_argument("--format", default="auto", choices=["auto", "kiln", "llama", "mixtral", "qwen2_moe"])
    export.set_defaults(func=cmd_export)

    gen = sub.add_parser("generate", help="sample from a stage's model")
    gen.add_argument("stage", help="a stage whose artifact is a causal LM (pretrain, sft, ppo, grpo)")
    common(gen)
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn (chat template)")
    gen.set_defaults(func=cmd_generate)
    return p


def _load(args):
    from pipeline.config import DEFAULT_CONFIG, load_config

    overrides = list(args.set)
    if args.root:
        overrides.append(f"run.root={args.root}")
    if args.name:
        overrides.append(f"run.name={args.name}")
    if getattr(args, "wandb", None):
        overrides.append(f"run.wandb={args.wandb}")
    return load_config(args.config or DEFAULT_CONFIG, overrides)


def _selection(args):
    from pipeline.plan import Selection

    only = tuple(s.strip() for s in args.only.split(",") if s.strip()) if args.only else ()
    rebuild = getattr(args, "rebuild_changed", False)
    return Selection(only=only, start=args.start, until=args.until, rebuild_changed=rebuild)


def cmd_run(args, console) -> int:
    from pipeline import preemption
    from pipeline.artifacts import ArtifactStore
    from pipeline.compare import comparison, table
    from pipeline.dag import PIPELINE
    from pipeline.display import Display, summary_table
    from pipeline.plan import make_plan
    from pipeline.preemption import Preempted
    from pipeline.runner import run_pipeline

    cfg = _load(args)
    sel = _selection(args)
    if args.json and not args.dry_run:
        console.print("[red]error:[/red] --json goes with --dry-run (or use `status --json`)")
        return 2
    if args.dry_run:
        return _dry_run(cfg, sel, args.json)
    outcome = run_pipeline(cfg, PIPELINE, sel, address=args.address, display=Display(console))
    store = ArtifactStore(cfg.run.root, cfg.run.name)
    plan = make_plan(cfg, PIPELINE, store, sel) if outcome.results else outcome.plan
    headline = {s.name: s.headline for s in PIPELINE.stages}
    _stdout().print(
        summary_table(outcome.plan, outcome, headline, f"{cfg.run.root.rstrip('/')}/{cfg.run.name}")
    )
    compared = comparison(plan)
    if compared:  # the post-training stages side by side, on the same held-out gold measure
        _stdout().print(table(compared))
    _print_notes(console, {p.name: p.notes for p in plan})
    if any(p.code_changed for p in plan):
        console.print("kept as built; `run --rebuild-changed` rebuilds them, `--from STAGE` one on purpose")
    if (outcome.results or outcome.errors) and store.run_dir.is_dir():  # nothing ran: nothing to redraw
        from pipeline.report import write_report

        report = write_report(store.run_dir, plan, f"kiln run {cfg.run.name}")
        console.print(f"report: {report}")
    for name, err in outcome.errors.items():
        console.print(f"[red]{name} failed:[/red] {err}", highlight=False)
    for name, step in outcome.stopped.items():
        console.print(f"[yellow]{name} stopped:[/yellow] {Preempted(name, step)}", highlight=False)
    if outcome.stopped or outcome.terminated:
        return preemption.EXIT_CODE
    selected = [p for p in plan if p.action != "unselected"]
    return 0 if outcome.ok and all(p.state == "complete" for p in selected) else 1


def _print_notes(console, notes: dict[str, list[str]]) -> None:
    """One line per note, naming the stages it applies to."""
    by_note: dict[str, list[str]] = {}
    for name, texts in notes.items():
        for text in texts:
            by_note.setdefault(text, []).append(name)
    for text, names in by_note.items():
        console.print(f"[yellow]note:[/yellow] {', '.join(names)}: {text}", highlight=False)


def _stdout():
    from rich.console import Console

    return Console()


def _dry_run(cfg, sel, as_json: bool) -> int:
    from pipeline.artifacts import ArtifactStore
    from pipeline.dag import PIPELINE
    from pipeline.plan import make_plan
    from pipeline.sizing import stage_plans

    plan = make_plan(cfg, PIPELINE, ArtifactStore(cfg.run.root, cfg.run.name), sel)
    ok = not any(p.problems for p in plan if p.action == "run")
    planned = {p.name for p in plan}
    # not an opt-in stage left off (grpo)
    costs = {name: c for name, c in stage_plans(cfg).items() if name in planned}
    if as_json:
        rows = [
            {"stage": p.name, "state": p.state, "action": p.action, "reason": p.reason, "notes": p.notes,
             "fingerprint": p.fingerprint, "problems": p.problems, **({"plan": costs[p.name]} if p.name in costs else {})}
            for p in plan
        ]  # fmt: skip
        print(json.dumps(rows, indent=2))
        return 0 if ok else 2
    import yaml
    from rich.table import Table

    from pipeline.config import to_dict

    out = _stdout()
    out.print("[bold]resolved config[/bold]")
    out.print(yaml.safe_dump(to_dict(cfg), sort_keys=False), highlight=False)
    table = Table(title="DAG")
    for col in ("stage", "inputs", "state", "action", "why", "resources"):
        table.add_column(col, overflow="fold")
    for p in plan:
        stage = PIPELINE[p.name]
        scaling = stage.scaling(cfg)
        res = scaling.total() if scaling else stage.driver_resources(cfg)
        if scaling:
            res = f"{scaling.num_workers} workers: {res}"
        why = "\n".join([p.reason, *(f"note: {n}" for n in p.notes)]).strip()
        table.add_row(p.name, ", ".join(p.inputs), p.state, p.action, why, str(res))
    out.print(table)
    _print_costs(out, cfg, costs)
    return 0 if ok else 2


def _print_costs(out, cfg, costs: dict) -> None:
    """The plan of each training stage per rank and optimizer step (pipeline/sizing.py)."""
    if not costs:
        return
    from rich import box
    from rich.table import Table

    hw = cfg.hardware
    where = f"on {hw.name}" if hw.name else "(describe `hardware:` for step time and MFU)"
    table = Table(title=f"plan per rank and optimizer step {where}", caption="step time a lower bound, MFU an upper one; --json: every figure",
                  box=box.SIMPLE_HEAD, pad_edge=False)  # fmt: skip
    cols = ("stage", "params/active", "ZeRO x N", "memory", "comm", "tokens")
    for col in (*cols, *(("step", "MFU") if hw.name else ())):
        table.add_column(col, no_wrap=True)
    for name, c in costs.items():
        if "unknown" in c:
            table.add_row(name, c["unknown"])
            continue
        row = [
            name, f"{_si(c['params_total'])}/{_si(c['params_active'])}", f"{c['zero_stage']} x {c['world_size']}",
            f"{c['memory_per_rank_bytes'] / 1024**3:.3g}GiB", f"{_si(c['comm_bytes_per_step'])}B",
            _si(c["tokens_per_step"]),
        ]  # fmt: skip
        if hw.name:
            row += [f"{c['step_time_s']:.3g}s", f"{c['mfu']:.0%}"]
        table.add_row(*row)
    out.print(table)
    for c in costs.values():
        for w in c.get("warnings", []):
            out.print(f"[yellow]warning:[/yellow] {w}", highlight=False)


def _si(n: float) -> str:
    """4120152064 -> '4.12G'; 262144 -> '262k'."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def cmd_submit(args, console) -> int:
    from pipeline.dag import PIPELINE
    from pipeline.submit import SubmitError, submit

    cfg = _load(args)  # every config error here, before anything is uploaded
    for name in [*(args.only or "").split(","), args.start, args.until]:
        if name and name.strip() not in PIPELINE.by_name:
            console.print(
                f"[red]error:[/red] unknown stage {name!r}; stages are: {', '.join(PIPELINE.order)}"
            )
            return 2
    try:
        return submit(args, cfg)
    except SubmitError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        return 2


def cmd_status(args, console) -> int:
    from pipeline.artifacts import ArtifactStore
    from pipeline.dag import PIPELINE
    from pipeline.plan import make_plan
    from pipeline.runner import status_rows

    cfg = _load(args)
    plan = make_plan(cfg, PIPELINE, ArtifactStore(cfg.run.root, cfg.run.name), deep=args.verify)
    rows = status_rows(plan)
    selected = [p for p in plan if p.action != "unselected"]
    code = 0 if all(p.state == "complete" for p in selected) else 1
    if args.json:
        print(json.dumps(rows, indent=2))
        return code
    from rich import box
    from rich.table import Table

    headline = {s.name: s.headline for s in PIPELINE.stages}
    table = Table(title=f"kiln status: {cfg.run.root.rstrip('/')}/{cfg.run.name}", box=box.SIMPLE_HEAD)
    for col in ("stage", "state", "time", "metrics" if args.wide else "headline", "artifact"):
        table.add_column(col, overflow="fold")
    for r in rows:
        state, prog = r["state"], r["progress"] or {}
        if "step" in prog:
            state += f" (step {prog['step']} of {prog.get('total')})"
        if prog.get("waiting"):  # e.g. a worker group that lost a node, until it has room again
            state += f"; {prog['waiting']}"
        shown = (
            r["metrics"]
            if args.wide
            else {k: r["metrics"][k] for k in [headline[r["stage"]]] if k in r["metrics"]}
        )
        metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
        seconds = f"{r['seconds']:.0f}s" if r["seconds"] is not None else ""
        where = r["path"] if args.wide else r["fingerprint"]
        table.add_row(r["stage"], state, seconds, metrics, where)
    out = _stdout()
    out.print(table)
    for r in rows:
        if r["damaged"]:
            out.print(
                f"{r['stage']}: damaged: {r['damaged']['file']} {r['damaged']['reason']}", highlight=False
            )
        for note in r["notes"]:
            out.print(f"{r['stage']}: note: {note}", highlight=False)
    return code


def _model_artifact(args, console):
    """The complete artifact of `args.stage` for the current config, or None (with a message)."""
    from pipeline.artifacts import ArtifactStore
    from pipeline.dag import PIPELINE
    from pipeline.plan import PlanError, Selection, make_plan

    cfg = _load(args)
    if args.stage not in PIPELINE.by_name:
        raise PlanError(f"unknown stage {args.stage!r}; stages are: {', '.join(PIPELINE.order)}")
    store = ArtifactStore(cfg.run.root, cfg.run.name)
    # named, so that an opt-in stage that is off (grpo) is planned too
    planned = {p.name: p for p in make_plan(cfg, PIPELINE, store, Selection(until=args.stage))}[args.stage]
    stored = planned.adopt.old_fingerprint if planned.adopt else planned.fingerprint  # not yet adopted
    art = store.find(args.stage, stored)
    if art is None:  # the config or code changed since: the newest complete one, said out loud
        for manifest in store.previous(args.stage):
            art = store.find(args.stage, manifest["fingerprint"])
            if art is not None:
                console.print(
                    f"[yellow]note:[/yellow] no {args.stage} artifact for this config ({planned.reason or 'changed'}); "
                    f"using the newest complete one, {art.path}"
                )
                break
    if art is None or not (art.path / "config.json").exists():
        why = "holds no model" if art is not None else f"is {planned.state} for this config"
        console.print(
            f"[red]error:[/red] the {args.stage} artifact {why}; run "
            f"`python launch.py run --until {args.stage}` (with the same config and --set) first"
        )
        return None
    return art


def cmd_export(args, console) -> int:
    art = _model_artifact(args, console)
    if art is None:
        return 1
    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()):
        console.print(f"[red]error:[/red] {out} exists and is not empty; choose a new folder")
        return 2
    from kiln.hf_convert import export_model

    try:
        fmt = export_model(art.path, out, args.format)
    except ValueError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        return 2
    console.print(f"wrote {args.stage} ({art.fingerprint}) as {fmt} to {out}")
    return 0


def cmd_generate(args, console) -> int:
    art = _model_artifact(args, console)
    if art is None:
        return 1
    from kiln.hf_convert import generate_text

    texts = generate_text(
        art.path, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, seed=args.seed, chat=args.chat,
    )  # fmt: skip
    for prompt, text in zip(args.prompt, texts, strict=True):
        print(f"{prompt}{text}" if not args.chat else f"{prompt}\n→ {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
