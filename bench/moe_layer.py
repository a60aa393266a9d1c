"""The MoE layer's experts, forward + backward, tokens/s: one grouped matmul per projection against the loop over
experts it replaced (the fallback where no grouped kernel exists), eager and compiled.

    python bench/moe_layer.py            # CPU, 2 threads: ~1 minute
    python bench/moe_layer.py --device cuda

CPU (fp32 and bf16): the bench/model.py MoE layer (d_model 256, 8 experts top-2, expert d_ff 384, SwiGLU), 8 x 256
tokens. CUDA (bf16): d_model 1024, 8 experts top-2, expert d_ff 1408, 8 x 1024 tokens. The loop is the same layer
with the grouped kernel switched off (`kiln.grouped_mm.has_kernel` False): what the layer ran before, a slice and a
matmul per expert after one host read of the counts. Best of N after a warm-up; ratios are grouped / loop.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kiln.grouped_mm  # noqa: E402
from kiln.model import KilnConfig, KilnModel  # noqa: E402

SIZES = {"cpu": (256, 384, 8 * 256), "cuda": (1024, 1408, 8 * 1024)}  # d_model, expert d_ff, tokens


def block(device, dtype, d_model, d_ff):
    torch.manual_seed(0)
    config = KilnConfig(
        vocab_size=128, hidden_size=d_model, num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=4,
        intermediate_size=d_ff, num_experts=8, num_experts_per_tok=2, moe_every=1, output_router_logits=True,
    )  # fmt: skip
    return KilnModel(config).layers[0].ffn.to(device, dtype)


def tokens_per_s(moe, x, reps: int) -> float:
    def step():
        out, _, aux, z, _, _ = moe(x, None, True)
        (out.float().square().mean() + aux + z).backward()

    step()  # warm-up (and compile)
    best = float("inf")
    for _ in range(reps):
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if x.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return x.shape[0] * x.shape[1] / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(2)
    d_model, d_ff, n = SIZES[args.device]
    dtypes = [torch.float32, torch.bfloat16] if args.device == "cpu" else [torch.bfloat16]
    print(
        f"MoE layer forward+backward, {n} tokens, d_model {d_model}, 8 experts top-2, d_ff {d_ff} ({args.device})"
    )
    print(f"{'dtype':<6} {'mode':<9} {'loop tok/s':>11} {'grouped tok/s':>14} {'ratio':>6}")
    for dtype in dtypes:
        x = torch.randn(1, n, d_model, device=args.device, dtype=dtype, generator=None, requires_grad=True)
        for mode in ("eager", "compiled"):
            speeds = {}
            for name, kernel in (("loop", False), ("grouped", True)):
                moe = block(args.device, dtype, d_model, d_ff)
                fn = torch.compile(moe) if mode == "compiled" else moe
                torch._dynamo.reset()
                patch = mock.patch.object(kiln.grouped_mm, "has_kernel", lambda a, b, k=kernel: k)
                with patch:
                    speeds[name] = tokens_per_s(fn, x, args.reps)
            ratio = speeds["grouped"] / speeds["loop"]
            dt = str(dtype).removeprefix("torch.")
            print(f"{dt:<6} {mode:<9} {speeds['loop']:>11.0f} {speeds['grouped']:>14.0f} {ratio:>6.2f}")


if __name__ == "__main__":
    main()
