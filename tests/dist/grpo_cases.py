"""grpo's worker loop (stages/grpo.py on kiln/rl/loop.py) as one plain process (rank 0 of 1, gloo), on
a tiny random policy and reward model: no Ray, no session pipeline.

    python tests/dist/grpo_cases.py OUT_DIR

Started once by tests/test_grpo.py. The SFT and reward folders are tests/dist/ppo_build_cases.py's
(a MoE policy and a classifier, a BPE tokenizer trained on the task prompts), the reward model's scores
the rewards (continuous: every group has signal). Cases, each in OUT_DIR/<case>/ (EnvWorkerContext):
- reference: 3 iterations, the held-out task evaluation before and at the end;
- resumed: the same, asked to stop at iteration 2 (as SIGTERM asks: that iteration's checkpoint saved),
  then run again from that checkpoint;
- lr0: learning rate 0;
- rloo_dr: leave-one-out baseline, no std scaling, constant weighting, the KL in the reward;
- select: `select: best_gold`, 8 samples per task prompt, evaluated at every iteration under a stand-in
  checking program (a hash of the answer: the task's own never passes this random policy); select_resumed:
  the same, stopped at 2 and resumed.
Writes OUT_DIR/cases.json: each case's metric rows and result, and which of its exported weights
differ from the SFT policy's (and, for resumed, from reference's).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.dist.common import SEED, free_port, leave  # noqa: E402
from tests.dist.ppo_build_cases import PROMPTS, write_models  # noqa: E402


def section(**keys):
    """4 prompts x 4 responses of up to 6 tokens per iteration, 2 optimizer steps of 8 (micro-batches of
    4), a learning rate that moves every parameter of the random model."""
    from pipeline.config import GrpoConfig

    base = dict(
        num_workers=1, rollout_batch_size=4, group_size=4, mini_batch_size=8, micro_batch_size=4, ppo_epochs=1,
        max_new_tokens=6, iterations=3, checkpoint_every=100, eval_every=100, task_prompts=None, task_samples=2,
        lr=1e-2, min_lr=1e-3, warmup_steps=1,
    )  # fmt: skip
    return GrpoConfig(**(base | keys))


def job(out: Path, p, name: str):
    from transformers import AutoTokenizer

    from kiln.chat_eval import prompt_ids
    from stages.grpo import GrpoJob

    tok = AutoTokenizer.from_pretrained(out / "sft")
    return GrpoJob(
        section=p, seed=SEED, export_dir=out / name / "export", wandb_run_id=None, sft_dir=out / "sft",
        reward_dir=out / "reward", reward_mean=0.0, reward_std=1.0,
        prompts=[{"messages": m, "ids": prompt_ids(tok, m)} for m in PROMPTS], task_prompts=PROMPTS[:4],
    )  # fmt: skip


def stop_at(iteration: int):
    """A worker context whose rank is asked to stop (as by SIGTERM) at `iteration`."""
    from pipeline.context import EnvWorkerContext

    class StopAt(EnvWorkerContext):
        asked = 0

        def stop_requested(self) -> bool:
            self.asked += 1  # once per iteration
            return self.asked == iteration

    return StopAt


def run(out: Path, name: str, p, context=None) -> dict:
    from pipeline.context import EnvWorkerContext
    from stages.grpo import train_worker

    result = train_worker(job(out, p, name), (context or EnvWorkerContext)(out / name))
    return {
        "result": result,
        "rows": [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()],
    }


def changed(a: Path, b: Path) -> list[str]:
    """Names of the tensors that differ between two model folders."""
    import torch
    from safetensors.torch import load_file

    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert x.keys() == y.keys()
    return sorted(k for k in x if not torch.equal(x[k], y[k]))


def main(out: Path) -> None:
    import logging

    import torch
    from safetensors.torch import load_file

    from pipeline.preemption import STOPPED

    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    )
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    write_models(out)
    found = {"reference": run(out, "reference", section())}
    stopped = run(out, "resumed", section(), stop_at(2))
    assert stopped["result"] == {STOPPED: 2}, stopped["result"]
    found["resumed"] = run(out, "resumed", section()) | {"stopped": stopped["rows"]}
    found["lr0"] = run(out, "lr0", section(lr=0.0, min_lr=0.0))
    rloo = dict(
        baseline="leave_one_out", scale_advantages=False, weighting="constant", kl_in="reward", kl_coef=0.1
    )
    found["rloo_dr"] = run(out, "rloo_dr", section(iterations=2, **rloo))
    # a stand-in checking program that this random policy's answers pass now and then (the task's never
    # does), so that the evaluations differ and the choice among them is a real one
    import zlib

    from kiln.rl import scoring

    scoring.is_right = lambda prompt, answer: zlib.crc32(answer.encode()) % 3 == 0
    sel = dict(select="best_gold", eval_every=1, task_samples=8)
    found["select"] = run(out, "select", section(**sel))
    stopped = run(out, "select_resumed", section(**sel), stop_at(2))
    assert stopped["result"] == {STOPPED: 2}, stopped["result"]
    found["select_resumed"] = run(out, "select_resumed", section(**sel)) | {"stopped": stopped["rows"]}
    sft = out / "sft"
    for name in found:
        found[name]["changed"] = changed(sft, out / name / "export")
    found["resumed"]["differs_from_reference"] = changed(
        out / "reference" / "export", out / "resumed" / "export"
    )
    found["select"]["differs_from_reference"] = changed(
        out / "reference" / "export", out / "select" / "export"
    )
    found["select_resumed"]["differs_from_select"] = changed(
        out / "select" / "export", out / "select_resumed" / "export"
    )
    found["parameters"] = sorted(load_file(sft / "model.safetensors"))
    (out / "cases.json").write_text(json.dumps(found, indent=1))
    leave()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
