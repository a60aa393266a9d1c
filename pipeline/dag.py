"""The pipeline as data: each stage names its function, its inputs and the config it reads.

A stage function is `run(cfg, inputs, out, ctx) -> dict` where `inputs` maps each input stage
name to its `Artifact`, `out` is an empty local folder that becomes the artifact, `ctx` is a
`pipeline.context.StageContext`, and the returned dict holds the headline metrics that go into
the manifest, the end-of-run table and the report. The runner knows nothing of any one stage.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from pipeline.context import Scaling
from pipeline.files import sha256_file
from pipeline.fingerprint import stage_version


@dataclass(frozen=True)
class Stage:
    name: str
    fn: str
    """`module:function` of the stage, imported only where it runs."""
    inputs: tuple[str, ...] | Callable = ()
    """Upstream stage names, or a function of the config returning them (an edge moved by config)."""
    sections: tuple[str, ...] = ()
    """Config sections the stage reads: they, minus placement keys, go into its fingerprint."""
    resources: Callable | None = None
    """cfg -> {"CPU": n, ...} for the stage's own driver task (default: 1 CPU)."""
    workers: Callable | None = None
    """cfg -> Scaling of the worker group the stage trains on (None for CPU stages)."""
    extra_fingerprint: Callable | None = None
    """cfg -> data that also decides reuse (e.g. the size and mtime of input files)."""
    headline: str | None = None
    """Metric shown in the end-of-run table."""
    enabled: Callable | None = None
    """cfg -> whether a run builds the stage (an opt-in stage, off unless its config turns it on); None:
    always. A stage that is off is not part of the config's DAG unless a selection names it."""
    driver_reads: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False, compare=False)
    """{input: its files} for inputs of which the stage's own driver reads only those files: on an
    object-store root only they are fetched to its node, and its tasks fetch the others they read
    (pipeline/units.py `Inputs`). Every other input is downloaded whole before the stage starts."""

    @property
    def module(self) -> str:
        return self.fn.partition(":")[0]

    @property
    def version(self) -> int:
        """The `VERSION` its module declares: part of its fingerprint (pipeline/fingerprint.py)."""
        return stage_version(self.module)

    def input_names(self, cfg) -> tuple[str, ...]:
        return tuple(self.inputs(cfg)) if callable(self.inputs) else self.inputs

    def driver_resources(self, cfg) -> dict[str, float]:
        return self.resources(cfg) if self.resources else {"CPU": 1}

    def scaling(self, cfg) -> Scaling | None:
        return self.workers(cfg) if self.workers else None

    def is_on(self, cfg) -> bool:
        return self.enabled(cfg) if self.enabled else True

    def load(self) -> Callable:
        import importlib

        module, _, func = self.fn.partition(":")
        return getattr(importlib.import_module(module), func)


@dataclass(frozen=True)
class DAG:
    stages: tuple[Stage, ...]
    order: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate stage names in {names}")
        object.__setattr__(self, "order", tuple(names))

    @cached_property
    def by_name(self) -> dict[str, Stage]:
        return {s.name: s for s in self.stages}

    def __getitem__(self, name: str) -> Stage:
        return self.by_name[name]

    def topological(self, cfg, named=()) -> list[str]:
        """The names of `cfg`'s stages, every stage after its inputs (declaration order breaks ties): the
        stages that are on (`Stage.enabled`), those in `named` (an opt-in stage a selection names) and
        what they read."""
        done: list[str] = []
        visiting: set[str] = set()

        def visit(name):
            if name in done:
                return
            if name in visiting:
                raise ValueError(f"the DAG has a cycle through {name}")
            visiting.add(name)
            for dep in self[name].input_names(cfg):
                if dep not in self.by_name:
                    raise ValueError(f"stage {name} reads {dep!r}, which is not a stage")
                visit(dep)
            visiting.discard(name)
            done.append(name)

        for name in self.order:
            if name in named or self[name].is_on(cfg):
                visit(name)
        return done

    def downstream(self, cfg, name: str) -> set[str]:
        """`name` and every stage of `cfg`'s DAG (and `name`) that (transitively) reads it."""
        found = {name}
        for s in self.topological(cfg, (name,)):
            if set(self[s].input_names(cfg)) & found:
                found.add(s)
        return found

    def upstream(self, cfg, name: str) -> set[str]:
        found, todo = set(), [name]
        while todo:
            for dep in self[todo.pop()].input_names(cfg):
                if dep not in found:
                    found.add(dep)
                    todo.append(dep)
        return found


def input_file_stats(patterns) -> list:
    """(path, size, mtime) of files matched by patterns: editing a source file re-runs its reader.
    A file shipped inside the project (the sample corpus) is known by its content instead of its
    mtime, which a copy of the project does not keep (a Ray job's working directory, a checkout on
    another machine): the same config then names the same artifacts wherever it is planned."""
    from pipeline.config import PROJECT_ROOT

    stats = []
    for pattern in patterns:
        for path in sorted(glob.glob(str(pattern))) or [str(pattern)]:
            try:
                st = os.stat(path)
            except OSError:
                stats.append([path, None, None])
                continue
            inside = Path(path).resolve().is_relative_to(PROJECT_ROOT)
            if inside and st.st_size <= PROJECT_FILE_HASH_LIMIT:
                stats.append([path, st.st_size, "sha256:" + sha256_file(path)])
            else:
                stats.append([path, st.st_size, int(st.st_mtime)])
    return stats


PROJECT_FILE_HASH_LIMIT = 256 << 20


# ---------------------------------------------------------------------------------------------
# The Kiln pipeline


def _workers(section: str) -> Callable:
    return lambda cfg: Scaling.of(getattr(cfg, section))


def _group_stage(name: str) -> Stage:
    """grpo, or rloo (grpo's code under its own section): an opt-in RL stage from the sft policy,
    reading the reward artifact only when its section's `reward_source` is the reward model."""

    def section(cfg):
        return getattr(cfg, name)

    return Stage(
        name,
        f"stages.{name}:run",
        inputs=lambda cfg: (
            ("sft", "reward", "tokenize") if section(cfg).reward_source == "model" else ("sft", "tokenize")
        ),
        sections=(name, "run"),
        workers=_workers(name),
        extra_fingerprint=lambda cfg: input_file_stats(
            [*section(cfg).prompts, *filter(None, [section(cfg).task_prompts])]
        ),
        headline="task_accuracy",
        enabled=lambda cfg: section(cfg).enabled,
    )


PIPELINE = DAG(
    (
        Stage(
            "ingest",
            "stages.ingest:run",
            sections=("ingest",),
            resources=lambda cfg: {"CPU": 0},  # its per-file tasks hold the CPUs
            # the held-out sets decide which documents are dropped: their files are read as its sources are
            extra_fingerprint=lambda cfg: input_file_stats([*cfg.ingest.sources, *cfg.ingest.decontaminate]),
            headline="docs_kept",
        ),
        Stage(
            "tokenizer",
            "stages.tokenizer:run",
            inputs=("ingest",),
            sections=("tokenizer", "run"),
            resources=lambda cfg: {"CPU": cfg.tokenizer.num_cpus},
            headline="vocab_size",
        ),
        Stage(
            "tokenize",
            "stages.tokenize:run",
            inputs=("ingest", "tokenizer"),
            sections=("tokenize",),
            resources=lambda cfg: {"CPU": 0},
            driver_reads={"ingest": ("stats.json",)},  # the document shards: each task fetches its own
            headline="train_tokens",
        ),
        Stage(
            "pretrain",
            "stages.pretrain:run",
            inputs=("tokenize", "tokenizer"),
            sections=("model", "pretrain", "run"),
            workers=_workers("pretrain"),
            headline="val_loss",
        ),
        # sft and reward read only pretrain (and sft the held-out windows it scores by source), so they train
        # at the same time when resources allow
        Stage(
            "sft",
            "stages.sft:run",
            inputs=("pretrain", "tokenize"),
            sections=("sft", "run"),
            workers=_workers("sft"),
            extra_fingerprint=lambda cfg: input_file_stats(
                [*cfg.sft.data, *cfg.sft.eval_data, *filter(None, [cfg.sft.task_prompts])]
            ),
            headline="task_accuracy",
        ),
        Stage(
            "reward",
            "stages.reward:run",
            inputs=lambda cfg: (cfg.reward.init_from,),  # reward.init_from: sft moves the edge
            sections=("reward", "run"),
            workers=_workers("reward"),
            extra_fingerprint=lambda cfg: input_file_stats(
                [*cfg.reward.data, *cfg.reward.eval_data, *filter(None, [cfg.reward.answer_eval])]
            ),
            headline="pairwise_accuracy",
        ),
        Stage(
            "ppo",
            "stages.ppo:run",
            inputs=("sft", "reward", "tokenize"),
            sections=("ppo", "run"),
            workers=_workers("ppo"),
            extra_fingerprint=lambda cfg: input_file_stats(
                [*cfg.ppo.prompts, *filter(None, [cfg.ppo.task_prompts])]
            ),
            headline="task_accuracy",
        ),
        # grpo is ppo's sibling: the same sft policy, scored by the reward model or the task's program
        # (then without the reward artifact); off unless grpo.enabled, or a selection names it
        _group_stage("grpo"),
        # rloo is grpo's stage under a section of its own with RLOO's defaults, so that a run compares them
        _group_stage("rloo"),
        # dpo is ppo's sibling too: the same sft policy, trained on preference pairs against itself frozen,
        # no reward model; off unless dpo.enabled, or a selection names it
        Stage(
            "dpo",
            "stages.dpo:run",
            inputs=("sft",),
            sections=("dpo", "run"),
            workers=_workers("dpo"),
            extra_fingerprint=lambda cfg: input_file_stats(
                [
                    *(cfg.dpo.prompts if cfg.dpo.pairs == "on_policy" else cfg.dpo.data),
                    *cfg.dpo.eval_data,
                    *filter(None, [cfg.dpo.task_prompts]),
                ]
            ),
            headline="task_accuracy",
            enabled=lambda cfg: cfg.dpo.enabled,
        ),
    )
)
