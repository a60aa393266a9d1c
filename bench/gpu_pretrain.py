"""GPU checks of pretraining: the stage's inner loop (DeepSpeed, no Ray) against HF models, with MFU.

    torchrun --nproc_per_node 1 bench/gpu_pretrain.py [--steps 30] [--quick]

For a ~125M dense model and a MoE model, in bf16 and fp16 (dynamic loss scaling), and a ~350M dense
model in bf16 (not launch-bound; the goal is MFU >= 35 %), on synthetic
packed tokens: the pretraining stage's `train_worker` (DeepSpeed ZeRO-2, the same code the stage
runs on Ray Train) and, in the same run, a plain PyTorch loop (AdamW fused, autocast) over our model
and over HF Llama / Mixtral of the same size. Checks that SDPA runs the flash kernel. Prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_prep.synthetic import synthetic_tokens  # noqa: E402
from pipeline.config import ModelConfig, PretrainConfig  # noqa: E402
from pipeline.context import EnvWorkerContext  # noqa: E402

VOCAB, SEQ = 32000, 1024
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


DENSE = ModelConfig(
    n_layers=12,
    d_model=768,
    n_heads=12,
    n_kv_heads=4,
    d_ff=2048,
    n_experts=0,
    max_seq_len=SEQ,
    tie_embeddings=False,
)
MOE = ModelConfig(
    n_layers=12, d_model=768, n_heads=12, n_kv_heads=4, d_ff=2048, n_experts=8, top_k=2, moe_d_ff=1024,
    max_seq_len=SEQ,
)  # fmt: skip
DENSE_LARGE = ModelConfig(  # ~350M: kernels long enough that launches do not set the pace (goal: MFU >= 35 %)
    n_layers=24, d_model=1024, n_heads=16, n_kv_heads=4, d_ff=2816, n_experts=0, max_seq_len=SEQ,
)  # fmt: skip


def stage_run(model_cfg: ModelConfig, precision: str, tokens: Path, steps: int, micro: int) -> dict:
    """The pretraining stage's worker loop under torchrun; median tokens/s and MFU after warm-up."""
    from stages.pretrain import PretrainJob, Vocab, train_worker

    pcfg = PretrainConfig(
        steps=steps, num_workers=1, gpus_per_worker=1, zero_stage=2, precision=precision, micro_batch_size=micro,
        global_batch_size=micro, lr=3e-4, warmup_steps=5, checkpoint_every=10**6, eval_every=10**6,
        eval_batches=1,
    )  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="kiln-gpu-"))
    job = PretrainJob(
        section=pcfg, model=model_cfg, seed=0, tokens_dir=tokens, tokenizer_dir=tokens,
        vocab=Vocab(size=VOCAB, pad=0, eos=1, bos=None), export_dir=work / "export", wandb_run_id=None,
    )  # fmt: skip
    wctx = EnvWorkerContext(work)
    train_worker(job, wctx)
    rows = wctx.metrics.rows()[5:]  # skip warm-up steps
    out = {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
        "mfu": statistics.median(r.get("mfu", float("nan")) for r in rows),
        "loss_first": wctx.metrics.rows()[0]["loss"],
        "loss_last": rows[-1]["loss"],
    }
    if precision == "fp16":
        out["loss_scale"] = rows[-1].get("loss_scale")
    return out


def plain_loop(model, precision: str, steps: int, micro: int) -> float:
    """tokens/s of forward + backward + fused AdamW under autocast, the same batch shape."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    model = model.to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=DEVICE == "cuda")
    scaler = torch.amp.GradScaler(enabled=precision == "fp16")
    x = torch.randint(2, VOCAB, (micro, SEQ), device=DEVICE)
    times = []
    for i in range(steps):
        sync()
        t0 = time.perf_counter()
        with torch.autocast(DEVICE, dtype=dtype):
            loss = model(input_ids=x, labels=x).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    model.cpu()
    return micro * SEQ / statistics.median(times)


def hf_twin(model_cfg: ModelConfig):
    """HF Llama (dense) or Mixtral (MoE) of the same architecture, through the export path's config mapping."""
    from transformers import AutoModelForCausalLM

    from kiln.hf_convert import to_hf_config
    from kiln.model import build_config

    fmt = "mixtral" if model_cfg.n_experts else "llama"
    hf_config = to_hf_config(build_config(model_cfg, VOCAB, 0, 1), fmt)
    return fmt.capitalize(), AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")


def flash_in_use(model_cfg: ModelConfig) -> bool:
    """True if our attention runs with only the flash SDPA backend allowed (it raises otherwise)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kiln.model import KilnForCausalLM, build_config

    model = KilnForCausalLM(build_config(model_cfg, VOCAB, 0, 1)).to(DEVICE).to(torch.bfloat16)
    x = torch.randint(2, VOCAB, (2, SEQ), device=DEVICE)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.no_grad():
            model(input_ids=x)
        return True
    except RuntimeError as e:
        print(f"flash kernel not used: {e}", file=sys.stderr)
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: check the script itself")
    args = ap.parse_args()
    global VOCAB, SEQ, DENSE, MOE, DENSE_LARGE
    precisions = ("bf16", "fp16") if DEVICE == "cuda" else ("bf16",)
    if args.smoke:
        VOCAB, SEQ = 512, 64
        small = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=SEQ)
        DENSE, MOE = (
            ModelConfig(**small, n_experts=0),
            ModelConfig(**small, n_experts=4, top_k=2, moe_d_ff=64),
        )
        DENSE_LARGE = ModelConfig(**{**small, "n_layers": 3}, n_experts=0)
    from kiln.model import KilnForCausalLM, build_config

    tokens = synthetic_tokens(
        Path(tempfile.mkdtemp(prefix="kiln-tokens-")),
        sequences=args.steps * args.micro + 64,
        seq_len=SEQ,
        vocab=VOCAB,
    )
    rows, failed = [], []
    cases = (("dense", DENSE, precisions), ("moe", MOE, precisions), ("dense-L", DENSE_LARGE, ("bf16",)))
    for name, mcfg, case_precisions in cases:
        ours = KilnForCausalLM(build_config(mcfg, VOCAB, 0, 1))
        total, active = ours.num_parameters_total(), ours.num_parameters_active()
        hf_name, hf = hf_twin(mcfg)
        for precision in case_precisions:
            try:  # one failing case must not hide the others' numbers
                stage = stage_run(mcfg, precision, tokens, args.steps, args.micro)
                ours_plain = plain_loop(ours, precision, 12, args.micro)
                hf_plain = plain_loop(hf, precision, 12, args.micro)
            except Exception as e:  # noqa: BLE001
                print(f"FAILED {name} {precision}: {type(e).__name__}: {e}", flush=True)
                failed.append(f"{name} {precision}")
                continue
            params = f"{total / 1e6:.0f}M/{active / 1e6:.0f}M"
            rows.append((name, params, precision, stage, ours_plain, hf_name, hf_plain))
            print(f"done {name} {precision}: stage {stage['tokens_per_s']:,.0f} tok/s", flush=True)
        del ours, hf
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    flash = flash_in_use(DENSE)

    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (smoke run)"
    print(f"\nDevice: {device}  torch {torch.__version__}  seq {SEQ}  micro-batch {args.micro}")
    print(f"SDPA flash kernel in use: {flash}")
    head = (
        "model",
        "params tot/act",
        "prec",
        "stage tok/s",
        "MFU",
        "ours plain",
        "HF",
        "HF plain",
        "ours/HF",
        "stage/HF",
    )
    print("{:<8}{:>15}{:>6}{:>13}{:>7}{:>12}{:>9}{:>10}{:>9}{:>10}".format(*head))
    for name, params, prec, stage, ours_plain, hf_name, hf_plain in rows:
        print(
            f"{name:<8}{params:>15}{prec:>6}{stage['tokens_per_s']:>13,.0f}{stage['mfu']:>7.1%}{ours_plain:>12,.0f}"
            f"{hf_name:>9}{hf_plain:>10,.0f}{ours_plain / hf_plain:>9.2f}{stage['tokens_per_s'] / hf_plain:>10.2f}"
        )
        extra = f"  loss {stage['loss_first']:.3f} -> {stage['loss_last']:.3f}"
        if prec == "fp16":
            extra += f", final loss scale {stage.get('loss_scale')}"
        print(extra)
    if failed:
        sys.exit(f"FAILED cases: {', '.join(failed)}")


if __name__ == "__main__":
    main()
