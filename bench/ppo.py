"""PPO rollouts: our KV-cache sampler against transformers' generate; the generation share of an iteration.

    /work/venv/bin/python bench/ppo.py --model-dir runs/tiny/sft-*  # a Kiln policy folder (model + tokenizer)
    /work/venv/bin/python bench/ppo.py                             # a random model of configs/tiny.yaml
    python bench/ppo.py --batch 64 --max-new-tokens 16 --repeats 3 # ~20 s on 2 cores (1 thread)

1. Rollout speed, one process, the same weights, prompts and settings on both sides: kiln/rl/rollout.py's
   `sample` on the Kiln policy against `transformers`' `generate(do_sample=True, top_k=0, use_cache=True)`
   on the same weights exported by kiln/hf_convert.py ("auto": Llama or Mixtral) and loaded with
   AutoModelForCausalLM (a logits check first). Prompts: the shipped task's (ppo.prompts of
   configs/tiny.yaml) through the tokenizer's chat template, left-padded, `--batch` of them; both stop at
   stop_ids(tok) or after `--max-new-tokens`; temperature and top_p default to the ppo section's. tokens/s
   counts the real response tokens (up to and including the stop token); ms/step is a call's time (prefill
   included) over its generated steps (the longest response), so a side whose rows happen to stop earlier
   is not favoured. Warm-up calls, then the median of `--repeats` interleaved calls. A random model rarely
   samples a stop token: both sides then generate every step (its tokenizer is a BPE trained on the prompts,
   so its vocabulary is smaller than the preset's 4096).
2. The PPO iteration, in this process on 1 rank (gloo, DeepSpeed ZeRO as ppo.zero_stage, the ppo section of
   configs/tiny.yaml, `--ppo-iterations`, the first a warm-up): stages/ppo.py's sample_rollout, experience
   and ppo_update, timed apart. The reward and value models are KilnForSequenceClassification of the
   policy's config with random weights (reward_mean 0, reward_std 1): they cost what trained ones do. The
   pipeline runs ppo on 2 workers of 1 thread with half the rollout batch each: the shares compare, the
   times do not.
`--threads` defaults to 1, as a ppo worker: on a busy 2-core machine 2 threads made every call ~100x slower.
Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep.chat_data import load_records  # noqa: E402
from kiln.chat_eval import prompt_ids, stop_ids  # noqa: E402
from kiln.rl.rollout import left_pad, rollout_seed, sample  # noqa: E402
from pipeline.config import load_config  # noqa: E402

CFG = load_config(ROOT / "configs/tiny.yaml")


def random_policy(out: Path, texts: list[str]) -> None:
    """A random Kiln model of configs/tiny.yaml and a BPE trained on `texts`, saved to `out`."""
    from data_prep.bpe import train_bpe
    from kiln.model import KilnForCausalLM, build_config

    tok = train_bpe(texts, vocab_size=CFG.tokenizer.vocab_size, min_frequency=2)
    torch.manual_seed(0)
    config = build_config(CFG.model, len(tok), tok.pad_token_id, tok.eos_token_id, tok.bos_token_id)
    KilnForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)


def task_prompts() -> list[list[dict]]:
    records, _ = load_records(CFG.ppo.prompts, "prompt", (ROOT,), key="ppo.prompts")
    return [r["prompt"] for r in records]


def real_tokens(response: torch.Tensor, stops: list[int]) -> int:
    """Tokens of each row up to and including its first stop token (all of them if none), summed. (B, R)."""
    hit = torch.isin(response, torch.tensor(stops))
    first = torch.where(hit.any(1), hit.int().argmax(1) + 1, response.shape[1])
    return int(first.sum())


def ours(model, ids: list[list[int]], a, stops, pad_id: int, rep: int) -> tuple[float, int, int]:
    """(seconds, real response tokens, generated steps) of one call of kiln.rl.rollout.sample."""
    seeds = [rep * len(ids) + i for i in range(len(ids))]
    t0 = time.perf_counter()
    roll = sample(model, ids, seeds=seeds, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                  top_p=a.top_p, stop_ids=stops, pad_id=pad_id)  # fmt: skip
    dt = time.perf_counter() - t0
    return dt, int(roll.response_mask.sum()), roll.response.shape[1]


@torch.no_grad()
def hf(model, ids: list[list[int]], a, stops, pad_id: int, rep: int) -> tuple[float, int, int]:
    """The same for transformers' generate (sampling, no top-k, the KV cache)."""
    x, mask = left_pad(ids, pad_id, "cpu")
    torch.manual_seed(rep)
    t0 = time.perf_counter()
    out = model.generate(x, attention_mask=mask, do_sample=True, temperature=a.temperature, top_p=a.top_p,
                         top_k=0, max_new_tokens=a.max_new_tokens, eos_token_id=stops, pad_token_id=pad_id,
                         use_cache=True)  # fmt: skip
    dt = time.perf_counter() - t0
    response = out[:, x.shape[1] :]
    return dt, real_tokens(response, stops), response.shape[1]


@torch.no_grad()
def logits_gap(kiln, hf_model, ids: list[list[int]], pad_id: int) -> float:
    """Largest |logit difference| on the real tokens of the left-padded prompts (positions from the mask)."""
    x, mask = left_pad(ids, pad_id, "cpu")
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    a = kiln(input_ids=x, attention_mask=mask).logits
    b = hf_model(input_ids=x, attention_mask=mask, position_ids=pos).logits
    return (a - b).abs()[mask.bool()].max().item()


def compare_rollouts(policy_dir: Path, a) -> tuple[list[tuple], str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kiln.hf_convert import export_model
    from kiln.model import KilnForCausalLM

    tok = AutoTokenizer.from_pretrained(policy_dir)
    stops, pad_id = stop_ids(tok), tok.pad_token_id
    prompts = task_prompts()
    ids = [prompt_ids(tok, prompts[i % len(prompts)]) for i in range(a.batch)]
    kiln = KilnForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-ppo-hf-") as export:
        fmt = export_model(policy_dir, export, "auto")
        hf_model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    gap = logits_gap(kiln, hf_model, ids[:8], pad_id)
    experts = getattr(hf_model.config, "_experts_implementation", None)
    note = (f"export: {fmt} -> {type(hf_model).__name__}" + (f" (experts: {experts})" if experts else "")
            + f", vocab {kiln.config.vocab_size}; max |logit diff| on 8 prompts {gap:.1e}")  # fmt: skip

    runs = {"ours": [], "hf": []}
    sides = {"ours": (ours, kiln), "hf": (hf, hf_model)}
    for rep in range(a.warmup + a.repeats):  # interleaved, so a noisy moment hits both
        for name, (call, model) in sides.items():
            result = call(model, ids, a, stops, pad_id, rep)
            if rep >= a.warmup:
                runs[name].append(result)
    rows = [summary("kiln.rl.rollout.sample", runs["ours"], a.batch)]
    return rows + [summary("transformers generate", runs["hf"], a.batch)], note


def summary(label: str, runs: list[tuple[float, int, int]], batch: int) -> tuple:
    """(label, tokens per row, steps, tokens/s, ms/step): medians over the calls (seconds, tokens, steps)."""
    cols = zip(*[(n / batch, k, n / s, 1000 * s / k) for s, n, k in runs], strict=True)
    return (label, *map(statistics.median, cols))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ppo_iterations(policy_dir: Path, a) -> dict[str, list[float]]:
    """Seconds of generation, experience and update of each PPO iteration (stages/ppo.py's pieces)."""
    import logging

    import deepspeed
    import numpy as np
    from transformers import AutoTokenizer

    from kiln import training as T
    from kiln.model import KilnConfig, KilnForCausalLM, KilnForSequenceClassification
    from stages import ppo as S

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    os.environ["LOCAL_RANK"] = "0"
    deepspeed.init_distributed(dist_backend="gloo")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    p = CFG.ppo
    tok = AutoTokenizer.from_pretrained(policy_dir)
    stops = stop_ids(tok)
    prompts = task_prompts()
    ids = [prompt_ids(tok, q) for q in prompts]
    torch.manual_seed(0)
    policy = KilnForCausalLM.from_pretrained(policy_dir, dtype=torch.float32, dropout=0.0)
    ref = copy.deepcopy(policy)
    config = KilnConfig.from_pretrained(policy_dir, num_labels=1, dropout=0.0)
    config.pad_token_id = tok.pad_token_id
    critic, reward = KilnForSequenceClassification(config), KilnForSequenceClassification(config)
    for model in (policy, critic):  # as the stage: training mode, dropout 0
        T.trainable(model, p.activation_checkpointing)
    mini = p.mini_batch_size
    accum = mini // p.micro_batch_size
    actor, critic = T.engine(policy, p, p.lr, accum, 1), T.engine(critic, p, p.critic_lr, accum, 1)
    ref, reward = T.frozen(ref, p, torch.device("cpu")), T.frozen(reward, p, torch.device("cpu"))
    # experience() also checks the sampled answers with the task's program when there are task prompts
    job = S.PpoJob(
        section=p, seed=CFG.run.seed, export_dir=policy_dir, wandb_run_id=None, sft_dir=policy_dir,
        reward_dir=policy_dir, reward_mean=0.0, reward_std=1.0, value_norm=(0.0, 1.0), prompts=[],
        task_prompts=prompts if p.task_prompts else [],
    )  # fmt: skip
    times: dict[str, list[float]] = {"gen": [], "experience": [], "update": []}
    seed, n = CFG.run.seed, p.rollout_batch_size
    for it in range(a.ppo_iterations):
        order = T.global_batch(it, n, len(prompts), seed)
        t0 = time.perf_counter()
        seeds = [rollout_seed(seed, it, j) for j in range(n)]
        roll = S.sample_rollout(
            actor.module, [ids[j] for j in order], seeds, p, stops, tok.pad_token_id, False
        )
        t1 = time.perf_counter()
        convs = [prompts[j] for j in order]
        models = S.Models(actor=actor, critic=critic, ref=ref, reward=reward)
        exp, _ = S.experience(roll, convs, models, tok, job, p.kl_coef, 1)
        t2 = time.perf_counter()
        S.ppo_update(actor, critic, exp, p, mini, 1, np.random.default_rng([seed, it, 0]))
        t3 = time.perf_counter()
        if it:  # the first iteration is a warm-up
            for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                times[k].append(v)
    return times


def report(policy_dir: Path, a) -> None:
    """Measure and print both parts (module docstring)."""
    rows, note = compare_rollouts(policy_dir, a)
    policy = a.model_dir or "random (configs/tiny.yaml)"
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, fp32; policy {policy}")
    print(f"{note}; temperature {a.temperature}, top_p {a.top_p}; "
          f"median of {a.repeats} after {a.warmup} warm-up calls")  # fmt: skip
    print(f"| {'rollout sampler':<22} | batch | new tokens | tokens/row | steps | tokens/s | ms/step "
          "| ratio vs HF generate: tokens/s, step |")  # fmt: skip
    print(f"|{'-' * 24}|-------|------------|------------|-------|----------|---------|{'-' * 37}|")
    hf_tps, hf_ms = rows[-1][3:]
    for label, per_row, steps, tps, ms in rows:
        print(f"| {label:<22} | {a.batch:>5} | {a.max_new_tokens:>10} | {per_row:>10.1f} | {steps:>5.0f} "
              f"| {tps:>8.0f} | {ms:>7.1f} | {tps / hf_tps:>26.2f}x, {hf_ms / ms:>4.2f}x |")  # fmt: skip
    if a.ppo_iterations < 2:
        return
    mean = {k: statistics.mean(v) for k, v in ppo_iterations(policy_dir, a).items()}
    total, p = sum(mean.values()), CFG.ppo
    print(f"\nPPO iteration, 1 rank x {torch.get_num_threads()} threads, ZeRO-{p.zero_stage}: rollout batch "
          f"{p.rollout_batch_size}, {p.max_new_tokens} new tokens, {p.ppo_epochs} epochs of mini-batches "
          f"{p.mini_batch_size} (micro {p.micro_batch_size}); mean of {a.ppo_iterations - 1} "
          "after 1 warm-up")  # fmt: skip
    print("| generate s | experience s | update s | iteration s | gen share |")
    print("|------------|--------------|----------|-------------|-----------|")
    print(f"| {mean['gen']:>10.2f} | {mean['experience']:>12.2f} | {mean['update']:>8.2f} | {total:>11.2f} "
          f"| {mean['gen'] / total:>9.0%} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model-dir", type=Path, help="a Kiln policy folder; default: a random configs/tiny.yaml model"
    )
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=CFG.ppo.temperature)
    ap.add_argument("--top-p", type=float, default=CFG.ppo.top_p)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads; 1 as a ppo worker of configs/tiny.yaml"
    )
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--ppo-iterations", type=int, default=3, help="PPO iterations, the first a warm-up; 0 = skip"
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-ppo-policy-") as tmp:
        if a.model_dir is None:
            random_policy(Path(tmp), [q[-1]["content"] for q in task_prompts()])
        report(a.model_dir or Path(tmp), a)


if __name__ == "__main__":
    main()
