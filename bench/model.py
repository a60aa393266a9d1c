"""Kiln's model against HF Llama / Mixtral of the same size, in training and in cached generation.

    /work/venv/bin/python bench/model.py                 # CPU: ~1-3 minutes on 2 cores
    python bench/model.py --device cuda                  # GPU: bf16, bigger sizes, ~1 minute on an H100

CPU (fp32, torch.set_num_threads(2)): d_model 256, 4 layers, 8 heads / 4 KV heads (GQA), vocab 8192, RoPE, RMSNorm,
SwiGLU; dense d_ff 768; MoE 8 experts, top-2, expert d_ff 384, on every layer, no capacity limit. Training: batch
8 x seq 256. Generation: 4 prompts of 16 tokens, 256 greedy new tokens each.
CUDA (bf16): d_model 1024, 8 layers, 16 / 4 heads, vocab 32000, dense d_ff 2816, experts d_ff 1408; training batch
8 x seq 1024; generation 8 prompts of 32 tokens, 256 new tokens. Training also runs once under
sdpa_kernel(FLASH_ATTENTION), which fails unless the FlashAttention kernel takes our attention.
Training: forward + backward, the same weights and batch for both models (HF gets Kiln's weights through
kiln/hf_convert.py), runs interleaved, best of N after a warm-up: the minimum, because a shared machine is noisy
and noise only ever adds time. Generation: greedy `generate`, ours and HF Llama's with the same weights, both with
their KV cache, best of 3; then ours without the cache (best of 2), to show what the cache buys.
Goals: training >= 1.0x HF; cached generation >= 1.0x HF's cached generate; the KV cache >= 5x no cache.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers.core_model_loading import revert_weight_conversion  # noqa: E402

from kiln.hf_convert import to_hf_config, to_hf_state_dict  # noqa: E402
from kiln.model import KilnConfig, KilnForCausalLM  # noqa: E402


@dataclass(frozen=True)
class Setup:
    device: str
    dtype: torch.dtype
    vocab: int
    d_model: int
    layers: int
    heads: int
    kv_heads: int
    d_ff: int
    expert_d_ff: int
    batch: int
    seq: int
    repeats: int
    gen_batch: int
    prompt: int
    new_tokens: int = 256


SETUPS = {
    "cpu": Setup(
        "cpu",
        torch.float32,
        8192,
        256,
        4,
        8,
        4,
        768,
        384,
        batch=8,
        seq=256,
        repeats=5,
        gen_batch=4,
        prompt=16,
    ),
    "cuda": Setup(
        "cuda", torch.bfloat16, 32000, 1024, 8, 16, 4, 2816, 1408, 8, 1024, 10, gen_batch=8, prompt=32
    ),
}


def make_config(s: Setup, moe: bool) -> KilnConfig:
    return KilnConfig(
        vocab_size=s.vocab,
        hidden_size=s.d_model,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        intermediate_size=s.d_ff,
        num_experts=8 if moe else 0,
        num_experts_per_tok=2,
        moe_intermediate_size=s.expert_d_ff,
        max_position_embeddings=2048,
        pad_token_id=0,
        eos_token_id=1,
    )


def hf_copy(model: KilnForCausalLM, fmt: str):
    """The HF model with Kiln's weights: the export's names, then transformers 5's fused in-memory expert layout."""
    from transformers import LlamaForCausalLM, MixtralForCausalLM

    hf_cls = LlamaForCausalLM if fmt == "llama" else MixtralForCausalLM
    hf = hf_cls(to_hf_config(model.config, fmt))
    sd = to_hf_state_dict(
        revert_weight_conversion(model, model.state_dict()), model.config, fmt
    )  # experts apart
    for i in range(model.config.num_hidden_layers if fmt == "mixtral" else 0):
        p, n = f"model.layers.{i}.block_sparse_moe.", model.config.num_experts
        sd[f"model.layers.{i}.mlp.gate.weight"] = sd.pop(p + "gate.weight")
        w = {name: [sd.pop(f"{p}experts.{j}.{name}.weight") for j in range(n)] for name in ("w1", "w2", "w3")}
        gate_up = [torch.cat([gate, up]) for gate, up in zip(w["w1"], w["w3"], strict=True)]  # (2I, H) each
        sd[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(gate_up)
        sd[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(w["w2"])
    hf.load_state_dict(sd, strict=True)
    return hf


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def train_step(model, batch) -> None:
    out = model(input_ids=batch, labels=batch, use_cache=False)
    out.loss.backward()
    model.zero_grad(set_to_none=True)


def compare_training(s: Setup, fmt: str) -> tuple[float, float, str]:
    torch.manual_seed(0)
    with torch.device(s.device):  # initialise in place: a GPU does it in a blink
        ours = KilnForCausalLM(make_config(s, moe=fmt == "mixtral"))
        hf = hf_copy(ours, fmt)
    ours, hf = ours.to(dtype=s.dtype).train(), hf.to(dtype=s.dtype).train()
    batch = torch.randint(2, s.vocab, (s.batch, s.seq), device=s.device)
    with torch.no_grad():  # same model, same batch: same loss (a sanity check on what is timed)
        a, b = ours(batch, labels=batch).loss.item(), hf(batch, labels=batch).loss.item()
        assert abs(a - b) < (1e-4 if s.dtype == torch.float32 else 2e-2), (a, b)
    if s.device == "cuda":  # raises "No available kernel" unless FlashAttention runs our attention
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            train_step(ours, batch)
    times = {"ours": [], "hf": []}
    for i in range(s.repeats + 1):  # interleaved, so a noisy moment hits both
        for name, model in (("ours", ours), ("hf", hf)):
            t = timed(lambda m=model: train_step(m, batch), s.device)
            if i:
                times[name].append(t)
    experts = getattr(hf.config, "_experts_implementation", None) if fmt == "mixtral" else None
    tokens = s.batch * s.seq
    return tokens / min(times["ours"]), tokens / min(times["hf"]), experts


def generation_speed(s: Setup, use_cache: bool, runs: int, hf: bool = False) -> float:
    """New tokens per second (all rows), best of `runs`; `hf`: HF Llama with the same weights."""
    torch.manual_seed(0)
    with torch.device(s.device):
        model = KilnForCausalLM(make_config(s, moe=False))
        if hf:
            model = hf_copy(model, "llama")
        model = model.to(dtype=s.dtype).eval()
    prompt = torch.randint(2, s.vocab, (s.gen_batch, s.prompt), device=s.device)
    kwargs = dict(
        max_new_tokens=s.new_tokens, min_new_tokens=s.new_tokens, do_sample=False, use_cache=use_cache
    )
    times = []
    with torch.no_grad():
        model.generate(prompt, **{**kwargs, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
        for _ in range(runs):
            times.append(timed(lambda: model.generate(prompt, **kwargs), s.device))
    return s.gen_batch * s.new_tokens / min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=sorted(SETUPS), default="cpu")
    s = SETUPS[parser.parse_args().device]
    if s.device == "cpu":
        torch.set_num_threads(2)
    rows = []
    for fmt, label in (("llama", "dense vs HF LlamaForCausalLM"), ("mixtral", "MoE 8x top-2 vs HF Mixtral")):
        ours, hf, experts = compare_training(s, fmt)
        rows.append((f"train fwd+bwd, {label}" + (f" ({experts})" if experts else ""), ours, hf, "HF"))
    cached, hf_cached = generation_speed(s, True, runs=3), generation_speed(s, True, runs=3, hf=True)
    rows.append(
        (f"generate {s.new_tokens} tokens, KV cache, vs HF Llama generate (cached)", cached, hf_cached, "HF")
    )
    uncached = generation_speed(s, False, runs=2)
    rows.append(
        (f"generate {s.new_tokens} tokens, KV cache vs our use_cache=False", cached, uncached, "no cache")
    )

    where = f"{torch.get_num_threads()} threads" if s.device == "cpu" else torch.cuda.get_device_name()
    print(f"torch {torch.__version__}, {where}, {str(s.dtype).removeprefix('torch.')}, d_model {s.d_model}, "
          f"{s.layers} layers, train batch {s.batch} x seq {s.seq}, generate {s.gen_batch} x {s.new_tokens}")  # fmt: skip
    print(f"| {'benchmark':<62} | {'ours tok/s':>10} | {'baseline tok/s':>14} | {'ratio':>6} | baseline |")
    print(f"|{'-' * 64}|{'-' * 12}|{'-' * 16}|{'-' * 8}|----------|")
    for name, ours, base, baseline in rows:
        print(f"| {name:<62} | {ours:>10.0f} | {base:>14.0f} | {ours / base:>5.2f}x | {baseline:<8} |")


if __name__ == "__main__":
    main()
