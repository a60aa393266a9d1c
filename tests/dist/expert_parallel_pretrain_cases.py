"""The pretraining stage with expert parallelism under torchrun (2 ranks, gloo), beside the same runs without it.

    torchrun --nproc_per_node 2 tests/dist/expert_parallel_pretrain_cases.py OUT_DIR

Started once by tests/test_expert_parallel_pretrain.py. Every case is the stage's own worker loop
(stages/pretrain.py `train_worker`) on the tiny MoE model of tests/dist/common.py (4 experts, top-2), fp32,
STEPS steps of 8 sequences (2 ranks x 2 micro-steps). Each writes OUT_DIR/<case>/metrics.jsonl and its
exported model OUT_DIR/<case>/export/; rank 0 writes OUT_DIR/<case>/grads.pt: every parameter's gradient
(averaged over the ranks, before clipping) at optimizer steps 1 and 2, the experts' whole (E, ...) tensors,
gathered from the ranks that hold them. A resumed case is asked to stop (as on a preemption) at step
STEPS // 2, where it saves a checkpoint and returns, then is started again in the same folder (its second
section: another ZeRO stage in `ep2-zero2to1-resumed`, another expert parallelism in `ep2to1-...` and
`ep1to2-...`, and one worker in `ep2to1-zero2-one-rank-resumed`) and resumes from that checkpoint.

Each start is a new start of the stage (on Ray, new worker processes): what DeepSpeed keeps per process of
expert-parallel groups is forgotten first (`forget_expert_groups`). First every 2-rank start, in the one
process group torchrun set up; then that group is closed, and rank 0 runs the 1-worker starts alone, in a
group of its own, while rank 1 converts the expert-parallel checkpoint of `ep2to1-zero2-resumed` at step
STEPS // 2 (kiln/reshard.py `to_universal`) into OUT_DIR/ep2-universal, for the test to read.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.dist.common import MODEL, PRETRAIN, SEED, VOCAB, free_port, leave  # noqa: E402

STEPS = 20
CASES: dict[str, list[dict]] = {  # the section of each start (of two for a resumed case)
    f"ep{ep}-zero{z}": [{"zero_stage": z, "expert_parallel": ep}] for z in (1, 2) for ep in (1, 2)
}
CASES |= {
    f"ep{ep}-zero2-bf16": [{"zero_stage": 2, "expert_parallel": ep, "precision": "bf16"}] for ep in (1, 2)
}
CASES["ep2-zero2-offload"] = [{"zero_stage": 2, "expert_parallel": 2, "offload_optimizer": True}]
CASES["ep2-zero2-resumed"] = [{"zero_stage": 2, "expert_parallel": 2}] * 2
CASES["ep2-zero2to1-resumed"] = [{"zero_stage": 2, "expert_parallel": 2}, {"zero_stage": 1, "expert_parallel": 2}]  # fmt: skip
# resumed under another expert parallelism: the checkpoint converted, its experts re-laid (kiln/reshard.py)
EP1, EP2 = {"zero_stage": 2, "expert_parallel": 1}, {"zero_stage": 2, "expert_parallel": 2}
CASES["ep2to1-zero2-resumed"] = [EP2, EP1]
CASES["ep1to2-zero2-resumed"] = [EP1, EP2]
CASES["ep2to1-zero2-one-rank-resumed"] = [EP2, EP1 | {"num_workers": 1}]
# the case whose checkpoint at step STEPS // 2 rank 1 converts into OUT_DIR/ep2-universal (`convert`)
CONVERTED = "ep2to1-zero2-resumed"


def sections(case: str):
    return [replace(PRETRAIN, steps=STEPS, checkpoint_every=1000, **changes) for changes in CASES[case]]


def full_grads(engine) -> dict:
    """name -> the whole gradient the optimizer steps with (every rank calls it: collectives)."""
    import torch
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    from kiln.expert_parallel import expert_parameters

    experts = {id(p) for p in expert_parameters(engine.module).values()}
    group = _group(engine.module)
    out = {}
    for name, p in engine.module.named_parameters():
        g = safe_get_full_grad(p).detach().clone().float()
        if id(p) in experts:  # this rank's experts: the others' from the ranks holding them
            parts = [torch.empty_like(g) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, g, group=group)
            g = torch.cat(parts)
        out[name] = g
    return out


def _group(model):
    """The expert-parallel group of `model`'s MoE layers, or None."""
    from kiln.model import MoE

    groups = [
        m.expert_parallel for m in model.modules() if isinstance(m, MoE) and m.expert_parallel is not None
    ]
    return groups[0] if groups else None


def recording(grads: dict):
    """deepspeed.initialize, its engine's `step` recording `full_grads` before optimizer steps 1 and 2; and what
    the engine's model counts (parameters, FLOPs per token), and the ranks of its expert(-data)-parallel groups."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import groups

    from tests.dist.common import SEQ

    initialize = deepspeed.initialize

    def wrapped(*args, **kwargs):
        engine, *rest = initialize(*args, **kwargs)
        m = engine.module
        grads["counts"] = [m.num_parameters_total(), m.num_parameters_active(), m.flops_per_token(SEQ)]
        if (group := _group(m)) is not None:
            edp = groups._get_expert_data_parallel_group(f"ep_size_{dist.get_world_size(group)}")
            grads["groups"] = [dist.get_process_group_ranks(group), dist.get_process_group_ranks(edp)]
        step = engine.step

        def recording_step(*a, **k):
            if engine.is_gradient_accumulation_boundary() and engine.global_steps < 2:
                grads[engine.global_steps + 1] = full_grads(engine)
            return step(*a, **k)

        engine.step = recording_step
        return (engine, *rest)

    return wrapped


def forget_expert_groups() -> None:
    """Forget the expert-parallel groups DeepSpeed keeps per process (`deepspeed.utils.groups`), as a new
    process would: its universal loader gives expert parameters the slice of the largest of them, which a start
    without expert parallelism must not find from an earlier one. The next expert-parallel start makes its own
    (kiln/expert_parallel.py `deepspeed_groups`)."""
    from deepspeed.utils import groups

    groups._EXPERT_PARALLEL_GROUP.clear()
    groups._EXPERT_PARALLEL_GROUP_RANKS.clear()
    groups._EXPERT_DATA_PARALLEL_GROUP.clear()
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS.clear()


def run_case(out: Path, name: str, starts: list[int]) -> None:
    """The starts `starts` of case `name` (indices into its `sections`), on the ranks of the process group."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from pipeline.context import EnvWorkerContext
    from pipeline.preemption import STOPPED
    from stages.pretrain import PretrainJob, Vocab, train_worker

    class StopsHalfway(EnvWorkerContext):
        """Asks the loop to stop (`stop_requested`, as a preemption does) at step STEPS // 2."""

        done = 0

        def progress(self, step, total, **extra):
            self.done = step

        def stop_requested(self):
            return self.done + 1 >= STEPS // 2  # read before the step's `progress`

    grads: dict = {}
    runs = sections(name)
    initialize = deepspeed.initialize
    deepspeed.initialize = recording(grads)
    try:
        for i in starts:
            forget_expert_groups()
            job = PretrainJob(
                section=runs[i], model=MODEL, seed=SEED, tokens_dir=out / "tokens", tokenizer_dir=out / "tokens",
                vocab=Vocab(size=VOCAB, pad=0, eos=1, bos=None), export_dir=out / name / "export", wandb_run_id=None,
            )  # fmt: skip
            stops = i < len(runs) - 1
            got = train_worker(job, (StopsHalfway if stops else EnvWorkerContext)(out / name))
            assert not stops or got == {STOPPED: STEPS // 2}, got
            dist.barrier()  # every rank's checkpoint copied into place before one looks for it (Ray: a new group)
    finally:
        deepspeed.initialize = initialize
    if int(os.environ["RANK"]) == 0 and 0 in starts:  # the first start records optimizer steps 1 and 2
        torch.save(grads, out / name / "grads.pt")


def convert(out: Path) -> None:
    """`CONVERTED`'s checkpoint at step STEPS // 2, written with expert_parallel 2 on 2 ranks, in its universal
    form in OUT_DIR/ep2-universal."""
    from kiln.reshard import to_universal

    layout = {"world_size": 2, "zero_stage": 2, "expert_parallel": 2}
    to_universal(
        out / CONVERTED / "checkpoint", f"step{STEPS // 2:08d}", out / "ep2-universal", layout=layout
    )


def alone() -> None:
    """Leave torchrun's process group for a group of this process alone, on a store of its own."""
    import deepspeed.utils.groups
    import torch.distributed as dist

    dist.destroy_process_group()
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    )
    deepspeed.utils.groups._WORLD_GROUP = None  # DeepSpeed's clone of the closed group
    dist.init_process_group("gloo")


def main(out: Path) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    only = os.environ.get("KILN_EP_CASES")  # a comma-separated subset, for a quicker look
    names = list(CASES) if not only else only.split(",")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

    def starts(name: str, workers: int) -> list[int]:
        return [i for i, sec in enumerate(sections(name)) if sec.num_workers == workers]

    for name in names:
        run_case(out, name, starts(name, world))
        dist.barrier()
    alone()
    if rank == 0:
        for name in [n for n in names if starts(n, 1)]:
            run_case(out, name, starts(name, 1))
    elif CONVERTED in names:
        convert(out)
    leave()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
