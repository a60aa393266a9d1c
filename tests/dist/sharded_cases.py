"""Models built and loaded partitioned under ZeRO-3 (kiln/sharded.py) on 2 CPU ranks (gloo), each
against the full build of the same seed.

    torchrun --nproc_per_node 2 tests/dist/sharded_cases.py OUT_DIR

Started once by tests/test_sharded_build.py. Each rank writes OUT_DIR/rank<r>.json: per case, what
the test checks (which parameters differ from the full build, whether the parameters are
partitioned, whether the RNG ends where the full build leaves it, the optimizer's groups).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.dist.common import MODEL, SEED, VOCAB, leave  # noqa: E402

# every init branch of the model: learned positions, LayerNorm with biases, biased linears, GELU,
# an LM head tied to the embedding (the MoE one has RMSNorm, experts, routers, RoPE)
DENSE = replace(
    MODEL,
    n_experts=0,
    position="learned",
    norm="layernorm",
    bias=True,
    activation="gelu",
    tie_embeddings=True,
)
MODELS = {"moe": MODEL, "dense": DENSE}


def ds_config(precision: str, zero_stage: int = 3) -> dict:
    from kiln.training import deepspeed_config

    return deepspeed_config(
        zero_stage=zero_stage, precision=precision, micro_batch_size=1, grad_accum=1, world_size=2, grad_clip=1.0
    )  # fmt: skip


def gathered(model, as_saved: bool = False) -> dict:
    """Every parameter's full value (a tied one once), on every rank; `as_saved`: named as a checkpoint file
    names them (a MoE layer's stacked experts one by one, as save_pretrained splits them)."""
    import deepspeed
    from transformers.core_model_loading import revert_weight_conversion

    out = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[name] = p.data.detach().clone()
    return revert_weight_conversion(model, out) if as_saved else out


def mismatched(got: dict, want: dict, dtype) -> list[str]:
    """Names whose values (in `dtype`) are not exactly equal, or that only one side has."""
    import torch

    names = sorted(set(got) | set(want))
    return [
        n for n in names
        if n not in got or n not in want or got[n].dtype != dtype or not torch.equal(got[n], want[n].to(dtype))
    ]  # fmt: skip


def partitioning(model, world: int) -> dict:
    """Whether every parameter is a ZeRO-3 parameter, released (NOT_AVAILABLE, an empty placeholder),
    holding 1/world of its elements locally."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from kiln.sharded import is_partitioned

    params = list(model.parameters())
    return {
        "partitioned": is_partitioned(model),
        "released": all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE and p.numel() == 0 for p in params),
        "local_share": all(p.ds_tensor.numel() == math.ceil(p.ds_numel / world) for p in params),
        "full_elements": sum(p.ds_numel for p in params),
        "local_elements": sum(p.ds_tensor.numel() for p in params),
    }


def groups(optimizer, model) -> list:
    names = {id(p): n for n, p in model.named_parameters()}
    return [[g["weight_decay"], sorted(names[id(p)] for p in g["params"])] for g in optimizer.param_groups]


def build_cases(world: int) -> dict:
    import torch

    from kiln import sharded as S
    from kiln.model import KilnForCausalLM, build_config
    from kiln.training import adamw

    out = {}
    for kind, model_cfg in MODELS.items():
        config = build_config(model_cfg, VOCAB, 0, 1)
        torch.manual_seed(SEED)
        full = KilnForCausalLM(config)
        rng_full = torch.get_rng_state()
        want = dict(full.named_parameters())
        want_groups = groups(adamw(full, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1), full)
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            torch.manual_seed(SEED)
            with S.sharded_build(ds_config(precision)):
                model = KilnForCausalLM(config)
            rng_equal = torch.equal(torch.get_rng_state(), rng_full)
            got_groups = groups(adamw(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1), model)
            out[f"build-{kind}-{precision}"] = {
                **partitioning(model, world),
                "mismatched": mismatched(gathered(model), want, dtype),
                "rng_equal": rng_equal,
                "groups_equal": got_groups == want_groups,
                "groups": [[wd, len(ns)] for wd, ns in got_groups],
                "tied": model.lm_head.weight is model.model.embed_tokens.weight,
            }
        # below ZeRO-3 the scope builds the plain model
        torch.manual_seed(SEED)
        with S.sharded_build(ds_config("fp32", zero_stage=2)):
            plain = KilnForCausalLM(config)
        out[f"build-{kind}-zero2"] = {
            "partitioned": any(hasattr(p, "ds_id") for p in plain.parameters()),
            "mismatched": mismatched(dict(plain.named_parameters()), want, torch.float32),
        }
    return out


def load_cases(out_dir: Path, rank: int, world: int) -> dict:
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from kiln import sharded as S
    from kiln.model import KilnForCausalLM, build_config

    ckpt, bad = out_dir / "ckpt", out_dir / "bad"
    if rank == 0:
        torch.manual_seed(123)
        tied = replace(MODEL, tie_embeddings=True)  # the checkpoint has no lm_head.weight: tied on load
        KilnForCausalLM(build_config(tied, VOCAB, 0, 1)).save_pretrained(ckpt, max_shard_size="100KB")
        shutil.copytree(ckpt, bad)  # weights that config.json does not describe
        config = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps(config | {"vocab_size": VOCAB + 8}))
    dist.barrier()
    saved = {k: v for f in sorted(ckpt.glob("*.safetensors")) for k, v in load_file(f).items()}
    load = dict(dtype=torch.float32, dropout=0.0)  # as ppo loads
    torch.manual_seed(SEED)  # a new `score` head (reward, ppo's critic from sft): drawn after the seed
    full_head = dict(
        AutoModelForSequenceClassification.from_pretrained(ckpt, num_labels=1, **load).named_parameters()
    )
    rng_full = torch.get_rng_state()

    out = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ds = ds_config(precision)
        # ppo's four: policy and reference, value model and reward model
        lms = [S.from_pretrained(AutoModelForCausalLM, ckpt, ds, **load) for _ in range(2)]
        torch.manual_seed(SEED)
        heads = [S.from_pretrained(AutoModelForSequenceClassification, ckpt, ds, num_labels=1, **load)]
        rng_equal = torch.equal(torch.get_rng_state(), rng_full)
        heads.append(S.from_pretrained(AutoModelForSequenceClassification, ckpt, ds, num_labels=1, **load))
        parts = [partitioning(m, world) for m in lms + heads]
        out[f"load-{precision}"] = {
            "shards": len(list(ckpt.glob("*.safetensors"))),
            **{k: all(p[k] for p in parts) for k in ("partitioned", "released", "local_share")},
            "local_elements": sum(p["local_elements"] for p in parts),
            "full_elements": sum(p["full_elements"] for p in parts),
            "mismatched_lm": sorted(
                {n for m in lms for n in mismatched(gathered(m, as_saved=True), saved, dtype)}
            ),
            # the backbone from the checkpoint, the new head as the full load draws it
            "mismatched_head": mismatched(gathered(heads[0]), full_head, dtype),
            "rng_equal": rng_equal,
            "tied": lms[0].lm_head.weight is lms[0].model.embed_tokens.weight,
            "eval": not any(m.training for m in lms + heads),
        }
    try:
        S.from_pretrained(AutoModelForCausalLM, bad, ds_config("fp32"), **load)
        out["load-bad"] = "loaded"
    except ValueError as e:  # on every rank, before any gather: no rank is left waiting in one
        out["load-bad"] = str(e)
    return out


def trl_case(out_dir: Path, world: int) -> dict:
    """The sft / reward path: the trainer's arguments first (their DeepSpeed config, alive with them,
    is the one the model is partitioned by), then the model."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.integrations import is_deepspeed_zero3_enabled
    from trl import RewardConfig

    from kiln import sharded as S
    from kiln.trl_bridge import trainer_args
    from pipeline.config import RewardConfig as RewardSection

    ckpt = out_dir / "ckpt"
    torch.manual_seed(SEED)  # the full load first: with the arguments alive, transformers would shard it
    full = dict(AutoModelForSequenceClassification.from_pretrained(ckpt, num_labels=1).named_parameters())
    section = RewardSection(num_workers=world, zero_stage=3, micro_batch_size=1, global_batch_size=world)
    args = RewardConfig(**trainer_args(section, SEED, world, str(out_dir / "trl"), fresh=True))
    torch.manual_seed(SEED)
    model = S.from_pretrained(
        AutoModelForSequenceClassification, ckpt, args.deepspeed, num_labels=1, dtype=torch.float32
    )
    return {
        "trl": {
            **partitioning(model, world),
            "mismatched": mismatched(gathered(model), full, torch.float32),
            "zero3_after": is_deepspeed_zero3_enabled(),  # the arguments' config, still alive
        }
    }


def import_case(out_dir: Path, rank: int, world: int) -> dict:
    """pretrain.init_from: a Llama folder imported partitioned, against hf_convert's full import."""
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from kiln import sharded as S
    from kiln.hf_convert import import_model

    src = out_dir / "llama"
    if rank == 0:
        torch.manual_seed(5)
        LlamaForCausalLM(
            LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        ).save_pretrained(src)  # fmt: skip
    dist.barrier()
    torch.manual_seed(SEED)
    full = dict(import_model(src).named_parameters())
    rng_full = torch.get_rng_state()
    torch.manual_seed(SEED)
    model = S.import_model(src, ds_config("fp32"))
    return {
        "import": {
            **partitioning(model, world),
            "mismatched": mismatched(gathered(model), full, torch.float32),
            "rng_equal": torch.equal(torch.get_rng_state(), rng_full),
        }
    }


def main(out_dir: Path) -> None:
    import logging

    import torch.distributed as dist

    from kiln.training import extension_cache

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # the process group as Ray Train's workers have it: torch's, joined before any DeepSpeed code runs
    # (DeepSpeed's own communication layer is then set up by whoever needs it first)
    extension_cache()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = build_cases(world)
    results |= load_cases(out_dir, rank, world)
    results |= import_case(out_dir, rank, world)
    results |= trl_case(out_dir, world)  # last: its arguments leave accelerate's state set up
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    leave()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
