"""ppo's four models built partitioned under ZeRO-3 (stages/ppo.py's `build_models`), and ppo's loop with
the frozen models offloaded to CPU memory (`ppo.offload_frozen`), on 2 CPU ranks (gloo).

    torchrun --nproc_per_node 2 tests/dist/ppo_build_cases.py OUT_DIR

Started once by tests/test_ppo.py. Rank 0 first writes a tiny SFT folder (a MoE policy and a BPE
tokenizer trained on the prompts) and a reward folder (a classifier of the same config). Then:
- build: `build_models` at ZeRO-2 (each model whole: the plain load) and at ZeRO-3 with offload_frozen,
  each after the same seed, with the critic started from the SFT backbone and a fresh value head
  (the one random draw of the build). Per model: which gathered weights differ from ZeRO-2's, whether
  every parameter is partitioned and released with this rank's 1/2 share, and the parameter offload
  DeepSpeed's engine was configured with (the ZeRO-3 config and the hooks' holder, kiln.training's
  `zero3_offload`); and of each load (kiln.sharded.from_pretrained, recorded around the real call),
  whether the model came out of it partitioned (before any engine) and the parameter offload of the
  DeepSpeed config it was built under (on CPU ranks the partitions' device cannot tell offloaded
  from not).
- train: the ppo worker itself (`train_worker`, torchrun's environment as its worker context) for 2
  iterations at ZeRO-3, offload_frozen off and on: rank 0's metric rows.
Each rank writes OUT_DIR/rank<r>.json.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.dist.common import MODEL, SEED, leave  # noqa: E402

WORDS = "the kiln fires clay slowly while glaze melts into glass over long nights of heat".split()
PROMPTS = [
    [{"role": "user", "content": f"Reverse the first 3 words: {' '.join(WORDS[i : i + 6])}"}]
    for i in range(8)
]
NAMES = ("actor", "critic", "ref", "reward")


def section(**keys):
    """The ppo section of these cases: 2 workers, 4 rollouts of up to 6 new tokens per iteration, every
    parameter partitioned under ZeRO-3 (persistence threshold 0), no task evaluation."""
    from pipeline.config import PpoConfig

    return PpoConfig(
        num_workers=2, micro_batch_size=2, mini_batch_size=4, rollout_batch_size=4, ppo_epochs=1,
        max_new_tokens=6, iterations=2, checkpoint_every=100, eval_every=100, task_prompts=None,
        zero3_persistence_threshold=0, warmup_steps=1, **keys,
    )  # fmt: skip


def write_models(out: Path) -> None:
    """The SFT folder (policy and tokenizer) and the reward folder (classifier and tokenizer)."""
    import torch

    from data_prep.bpe import train_bpe
    from kiln.model import KilnForCausalLM, KilnForSequenceClassification, build_config

    texts = [m["content"] for conv in PROMPTS for m in conv] * 4
    tok = train_bpe(texts, vocab_size=256, min_frequency=1)
    config = build_config(replace(MODEL, max_seq_len=64), len(tok), tok.pad_token_id, tok.eos_token_id)
    torch.manual_seed(1)
    KilnForCausalLM(config).save_pretrained(out / "sft")
    config.num_labels = 1
    KilnForSequenceClassification(config).save_pretrained(out / "reward")
    for folder in ("sft", "reward"):
        tok.save_pretrained(out / folder)


def job(out: Path, p, name: str):
    from transformers import AutoTokenizer

    from kiln.chat_eval import prompt_ids
    from stages.ppo import PpoJob

    tok = AutoTokenizer.from_pretrained(out / "sft")
    return PpoJob(
        section=p, seed=SEED, export_dir=out / name / "export", wandb_run_id=None, sft_dir=out / "sft",
        reward_dir=out / "reward", reward_mean=0.0, reward_std=1.0, value_norm=(0.0, 1.0),
        prompts=[{"messages": m, "ids": prompt_ids(tok, m)} for m in PROMPTS], task_prompts=[],
    )  # fmt: skip


def weights(model) -> dict:
    """Every parameter's full value (gathered under ZeRO-3), on every rank."""
    import deepspeed

    out = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            out[name] = p.data.detach().clone()
    return out


def offload_of(engine) -> dict:
    """The parameter offload a ZeRO-3 engine was configured with: its config's device, and the device
    its parameter hooks fetch the partitions from (None: the partitions stay on the accelerator)."""
    from kiln import training as T

    config, hooks = engine.zero_offload_param(), T.zero3_offload(engine).offload_device
    return {
        "config": None if config is None else getattr(config.device, "value", config.device),
        "hooks": None if hooks is None else getattr(hooks, "value", hooks),
    }


def build_case(out: Path, world: int) -> dict:
    import torch
    from transformers import AutoTokenizer

    from kiln import sharded as S
    from stages.ppo import build_models

    pad_id = AutoTokenizer.from_pretrained(out / "sft").pad_token_id
    built, loads = {}, []
    load = S.from_pretrained

    def recorded(model_class, path, ds_config, **kwargs):  # the load itself, noted
        model = load(model_class, path, ds_config, **kwargs)
        offload = ds_config["zero_optimization"].get("offload_param")
        loads.append({"partitioned": S.is_partitioned(model), "offload": offload})
        return model

    for stage, keys in ((2, {}), (3, {"offload_frozen": True})):
        p = section(zero_stage=stage, critic_init="sft", **keys)
        torch.manual_seed(SEED)  # the critic's fresh value head is drawn from it
        S.from_pretrained = recorded if stage == 3 else load
        try:
            built[stage] = build_models(job(out, p, f"build{stage}"), world, torch.device("cpu"), pad_id)
        finally:
            S.from_pretrained = load
    found = {"loads": loads}  # policy, critic, reference, reward: in build_models' order
    for n in NAMES:
        engine = getattr(built[3], n)
        full = getattr(built[2], n)  # at ZeRO-2 a frozen model is the model itself, not an engine
        want, got = weights(getattr(full, "module", full)), weights(engine.module)
        params = list(engine.module.parameters())
        found[n] = {
            "mismatched": sorted(k for k in want if k not in got or not torch.equal(got[k], want[k])),
            "partitioned": S.is_partitioned(engine.module),
            "released": all(q.numel() == 0 for q in params),
            "local_share": all(q.ds_tensor.numel() == math.ceil(q.ds_numel / world) for q in params),
            "offload": offload_of(engine),
        }
    return found


def train_case(out: Path, rank: int) -> dict:
    """Rank 0's metric rows of 2 ppo iterations at ZeRO-3 with offload_frozen off and on (every rank
    runs the worker; rank 0 writes the rows)."""
    from pipeline.context import EnvWorkerContext
    from stages.ppo import train_worker

    rows = {}
    for name, offload in (("offload_off", False), ("offload_on", True)):
        p = section(zero_stage=3, offload_frozen=offload)
        train_worker(job(out, p, name), EnvWorkerContext(out / name))
        if rank == 0:
            rows[name] = [
                json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()
            ]
    return rows


def main(out: Path) -> None:
    import logging

    import torch
    import torch.distributed as dist

    from kiln.training import extension_cache

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    extension_cache()
    dist.init_process_group("gloo")  # as Ray Train's workers: torch's group first
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        write_models(out)
    dist.barrier()
    results = {"build": build_case(out, world)}
    dist.barrier()
    results["train"] = train_case(out, rank)
    (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    leave()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
