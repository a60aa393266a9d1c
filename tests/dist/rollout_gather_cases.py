"""ZeRO-3 rollouts with the parameters gathered once (kiln.training.gathered) on 2 CPU ranks (gloo),
against the same rollouts gathered per forward pass.

    torchrun --nproc_per_node 2 tests/dist/rollout_gather_cases.py OUT_DIR

Started once by tests/test_ppo.py. A tiny Kiln policy twice in ZeRO-3 training engines (one sampled
per forward pass, one gathered; a training step before each rollout, as in PPO) and once in a ZeRO-3
inference engine (kiln.training.frozen). Every parameter is partitioned and none is kept between its
uses (persistence threshold, prefetch bucket and reuse distance 0, as for a model far larger than
DeepSpeed's defaults keep), so a forward pass through ZeRO-3's hooks gathers each one again. Each rank
writes OUT_DIR/rank<r>.json: per rollout, the all-gather calls counted
(kiln.training.counted_allgathers) and the tokens; the training losses; the hooks and partitions after.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

PROMPTS = {0: [[5, 17, 42, 8], [12, 70, 3]], 1: [[44, 2, 19], [65]]}  # each rank its own
STOP = 96  # rarely sampled by the tiny model: rows run to max_new_tokens


def main(out: Path) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from kiln import training as T
    from kiln.model import KilnForCausalLM
    from kiln.rl.rollout import sample
    from pipeline.config import load_config
    from tests.tiny_models import V, tiny

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    p = load_config(
        None,
        [
            "ppo.num_workers=2",
            "ppo.micro_batch_size=8",
            "ppo.zero_stage=3",
            "ppo.zero3_persistence_threshold=0",
            "ppo.zero3_prefetch_bucket_size=0",
            "ppo.zero3_max_reuse_distance=0",
        ],
    ).ppo
    torch.manual_seed(0)
    models = [KilnForCausalLM(tiny(eos_token_id=1)) for _ in range(3)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    # the same policy twice, one sampled per forward pass and one gathered, and a frozen copy
    actors = {
        "per_forward": T.engine(models[0], p, 1e-3, 1, 2),
        "gathered": T.engine(models[1], p, 1e-3, 1, 2),
    }
    frozen = T.frozen(models[2], p, torch.device("cpu"))
    x = torch.randint(2, V, (2, 8), generator=torch.Generator().manual_seed(rank))

    def step(actor) -> float:  # a training step between rollouts, as in PPO (hooks and trace in use)
        loss = actor(input_ids=x, labels=x).loss
        actor.backward(loss)
        actor.step()
        return float(loss.detach())

    def roll(engine, n: int, gather: bool, stops=(STOP,)) -> dict:
        with T.counted_allgathers() as count, T.gathered(engine, enabled=gather) as whole:
            r = sample(engine.module, PROMPTS[rank], seeds=[rank, 10 + rank], max_new_tokens=n, temperature=1.0,
                       top_p=1.0, stop_ids=list(stops), pad_id=0, synced=not whole)  # fmt: skip
        return {"allgathers": count.n, "tokens": r.tokens.tolist(), "gathered": whole}

    engines = (*actors.values(), frozen)
    hooks = lambda: [len(T.zero3_offload(e).forward_hooks) for e in engines]  # noqa: E731
    found: dict = {"hooks_before": hooks(), "parameters": len(list(frozen.module.parameters()))}
    for name, actor in actors.items():  # a training step before each rollout, as in PPO
        found[name] = [{"loss": step(actor), **roll(actor, n, gather=name == "gathered")} for n in (8, 16)]
    found["frozen_per_forward"] = [roll(frozen, n, gather=False) for n in (8, 16)]
    found["frozen_gathered"] = [roll(frozen, n, gather=True) for n in (8, 16)]
    # rank 0's rows stop at their first token, rank 1's run 16 steps: ranks step apart, no collective
    found["apart"] = roll(actors["gathered"], 16, gather=True, stops=range(V) if rank == 0 else (STOP,))
    found["hooks_after"] = hooks()
    found["partitioned_after"] = all(
        q.ds_status.name == "NOT_AVAILABLE" and q.ds_tensor.numel() < q.ds_numel
        for e in engines
        for q in e.module.parameters()
    )
    found["loss_after"] = [step(a) for a in actors.values()]  # the hooks gather again in training
    (out / f"rank{rank}.json").write_text(json.dumps(found))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]))
