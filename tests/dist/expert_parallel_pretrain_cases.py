"""The pretraining stage with expert parallelism under torchrun (2 ranks, gloo), beside the same runs without it.

    torchrun --nproc_per_node 2 tests/dist/expert_parallel_pretrain_cases.py OUT_DIR

Started once by tests/test_expert_parallel_pretrain.py. Every case is the stage's own worker loop
(stages/pretrain.py `train_worker`) on the tiny MoE model of tests/dist/common.py (4 experts, top-2), fp32,
STEPS steps of 8 sequences (2 ranks x 2 micro-steps). Each writes OUT_DIR/<case>/metrics.jsonl and its
exported model OUT_DIR/<case>/export/; rank 0 writes OUT_DIR/<case>/grads.pt: every parameter's gradient
(averaged over the ranks, before clipping) at optimizer steps 1 and 2, the experts' whole (E, ...) tensors,
gathered from the ranks that hold them. A resumed case is asked to stop (as on a preemption) at step
STEPS // 2, where it saves a checkpoint and returns, then is started again in the same folder (its second
section: another ZeRO stage in `ep2-zero2to1-resumed`) and resumes from that checkpoint.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.dist.common import MODEL, PRETRAIN, SEED, VOCAB, leave  # noqa: E402

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


def run_case(out: Path, name: str) -> None:
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
        for i, sec in enumerate(runs):
            job = PretrainJob(
                section=sec, model=MODEL, seed=SEED, tokens_dir=out / "tokens", tokenizer_dir=out / "tokens",
                vocab=Vocab(size=VOCAB, pad=0, eos=1, bos=None), export_dir=out / name / "export", wandb_run_id=None,
            )  # fmt: skip
            stops = i < len(runs) - 1
            got = train_worker(job, (StopsHalfway if stops else EnvWorkerContext)(out / name))
            assert not stops or got == {STOPPED: STEPS // 2}, got
            dist.barrier()  # every rank's checkpoint copied into place before one looks for it (Ray: a new group)
    finally:
        deepspeed.initialize = initialize
    if int(os.environ["RANK"]) == 0:
        torch.save(grads, out / name / "grads.pt")


def main(out: Path) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    only = os.environ.get("KILN_EP_CASES")  # a comma-separated subset, for a quicker look
    for name in CASES if not only else only.split(","):
        run_case(out, name)
        dist.barrier()
    leave()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
