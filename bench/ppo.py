"""PPO rollouts: our KV-cache sampler against transformers' generate; the generation share of an iteration.

    python bench/ppo.py --model-dir runs/tiny/sft-*                # a Kiln policy folder (model + tokenizer)
    python bench/ppo.py                                            # a random model of configs/tiny.yaml
    python bench/ppo.py --batch 64 --max-new-tokens 16 --repeats 3 --rank-iterations 0  # ~20 s on 2 cores
    python bench/ppo.py --ppo-iterations 0 --rank-iterations 0    # part 1 alone: the samplers

1. Rollout speed, one process, the same weights, prompts and settings on every side: kiln/rl/rollout.py's
   `sample` on the Kiln policy (preallocated KV cache, counter-based noise drawn for all rows at once, no
   host read per step but the stop check), the sampler it replaced on the same policy (`sample_before`
   below, a copy: transformers' DynamicCache grown by concatenation, one torch.Generator and one
   torch.rand per row per step, a host read per step), and `transformers`' `generate(do_sample=True,
   top_k=0, use_cache=True)` on the same weights exported by kiln/hf_convert.py ("auto": Llama or
   Mixtral) and loaded with AutoModelForCausalLM (a logits check first). A greedy call of both Kiln
   samplers checks they decode the same tokens (the noise differs by design: another random stream).
   `--device cuda` runs this part on a GPU (the clock stops once the device is done). Prompts: the shipped task's (ppo.prompts of
   configs/tiny.yaml) through the tokenizer's chat template, left-padded, `--batch` of them; both stop at
   stop_ids(tok) or after `--max-new-tokens`; temperature and top_p default to the ppo section's. tokens/s
   counts the real response tokens (up to and including the stop token); ms/step is a call's time (prefill
   included) over its generated steps (the longest response), so a side whose rows happen to stop earlier
   is not favoured. Warm-up calls, then the median of `--repeats` interleaved calls. A random model rarely
   samples a stop token: both sides then generate every step (its tokenizer is a BPE trained on the prompts,
   so its vocabulary is smaller than the preset's 4096).
2. The PPO iteration, in this process on 1 rank (gloo, DeepSpeed ZeRO as ppo.zero_stage, the ppo section of
   configs/tiny.yaml, `--ppo-iterations`, the first a warm-up): kiln/rl/loop.py's sample_rollout, experience
   and ppo_update (stages/ppo.py), timed apart. The reward and value models are KilnForSequenceClassification of the
   policy's config with random weights (reward_mean 0, reward_std 1): they cost what trained ones do. The
   pipeline runs ppo on 2 workers of 1 thread with half the rollout batch each: the shares compare, the
   times do not.
3. ZeRO-3 rollouts on 2 ranks (2 spawned processes, gloo, `--threads` each; the ppo section of
   configs/tiny.yaml, `--rank-iterations` PPO iterations, the first a warm-up, the setups' iterations
   interleaved): ZeRO-2 against ZeRO-3 with `zero3_persistence_threshold: 0` (every parameter
   partitioned), with `ppo.gather_for_rollout` false (before: the sampler's forward passes gather the
   parameters through ZeRO-3's hooks) and true (after: the policy gathered once per rollout,
   kiln.training.gathered); with DeepSpeed's other gathering defaults, under which this small model
   stays gathered between forward passes once prefetched, and keeping nothing (ZERO3_SETUPS), as a
   model far larger than the prefetch bucket is gathered again at every token. Per setup: the rollout's
   seconds (the slowest rank's, mean over iterations), its ratio to ZeRO-2's, its all-gather calls
   (kiln.training.counted_allgathers, per rank), and the experience and update seconds; and whether the
   first iteration's rollouts (the same weights everywhere) are the same tokens in all setups.
`--threads` defaults to 1, as a ppo worker: on a busy 2-core machine 2 threads made every call ~100x slower.
Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from functools import partial
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


def timed_sample(
    sampler, model, ids: list[list[int]], a, stops, pad_id: int, rep: int
) -> tuple[float, int, int]:
    """(seconds, real response tokens, generated steps) of one call of `sampler` (kiln.rl.rollout.sample or
    `sample_before`, the sampler it replaced)."""
    seeds = [rep * len(ids) + i for i in range(len(ids))]
    t0 = time.perf_counter()
    roll = sampler(model, ids, seeds=seeds, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                   top_p=a.top_p, stop_ids=stops, pad_id=pad_id)  # fmt: skip
    dt = synced_clock(a) - t0
    return dt, int(roll.response_mask.sum()), roll.response.shape[1]


def synced_clock(a) -> float:
    """time.perf_counter() once the device's queued work is done (CUDA runs behind the host)."""
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def sample_before(model, prompt_ids, *, seeds, max_new_tokens, temperature, top_p, stop_ids, pad_id):
    """kiln/rl/rollout.py's `sample` before issue 23 item 3 (without `synced`), kept here to be measured
    against: transformers' DynamicCache (grown by concatenation at every layer and token), a
    torch.Generator per prompt drawing one torch.rand per row per step, a host read per step."""
    from kiln.rl.rollout import Rollout, nucleus

    device = next(model.parameters()).device
    gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    ids, mask = left_pad(prompt_ids, pad_id, device)  # (B, P)
    B, P = ids.shape
    stops = torch.tensor(stop_ids, device=device)

    def pick(logits):
        logits = logits.float()
        if temperature == 0:
            return logits.argmax(-1)
        logits = nucleus(logits / temperature, top_p)
        u = torch.stack([torch.rand(logits.shape[-1], generator=g, device=logits.device) for g in gens])
        gumbel = -torch.log(-torch.log(u.clamp_(min=1e-20)))  # (B, V)
        return (logits + gumbel).argmax(-1)

    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        cache, logits = out.cache, out.logits[:, -1]  # (B, V)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        tokens, keep = [], []
        for t in range(max_new_tokens):
            nxt = pick(logits)  # (B,)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            keep.append(~done)
            tokens.append(nxt)
            done = done | torch.isin(nxt, stops)
            if t == max_new_tokens - 1 or int((~done).sum()) == 0:
                break
            mask = torch.cat([mask, keep[-1].long()[:, None]], dim=1)  # (B, P + t + 1)
            out = model(input_ids=nxt[:, None], attention_mask=mask, cache=cache, use_cache=True)
            cache, logits = out.cache, out.logits[:, -1]
    finally:
        model.train(was_training)
    response = torch.stack(tokens, dim=1)  # (B, R)
    response_mask = torch.stack(keep, dim=1).long()  # (B, R)
    full_mask = torch.cat([mask[:, :P], response_mask], dim=1)
    return Rollout(torch.cat([ids, response], dim=1), full_mask, P, done)


@torch.no_grad()
def hf(model, ids: list[list[int]], a, stops, pad_id: int, rep: int) -> tuple[float, int, int]:
    """The same for transformers' generate (sampling, no top-k, the KV cache)."""
    x, mask = left_pad(ids, pad_id, a.device)
    torch.manual_seed(rep)
    t0 = time.perf_counter()
    out = model.generate(x, attention_mask=mask, do_sample=True, temperature=a.temperature, top_p=a.top_p,
                         top_k=0, max_new_tokens=a.max_new_tokens, eos_token_id=stops, pad_token_id=pad_id,
                         use_cache=True)  # fmt: skip
    dt = synced_clock(a) - t0
    response = out[:, x.shape[1] :].cpu()
    return dt, real_tokens(response, stops), response.shape[1]


@torch.no_grad()
def logits_gap(kiln, hf_model, ids: list[list[int]], pad_id: int) -> float:
    """Largest |logit difference| on the real tokens of the left-padded prompts (positions from the mask)."""
    x, mask = left_pad(ids, pad_id, next(kiln.parameters()).device)
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
    kiln = KilnForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval().to(a.device)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-ppo-hf-") as export:
        fmt = export_model(policy_dir, export, "auto")
        hf_model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval().to(a.device)
    gap = logits_gap(kiln, hf_model, ids[:8], pad_id)
    experts = getattr(hf_model.config, "_experts_implementation", None)
    note = (f"export: {fmt} -> {type(hf_model).__name__}" + (f" (experts: {experts})" if experts else "")
            + f", vocab {kiln.config.vocab_size}; max |logit diff| on 8 prompts {gap:.1e}")  # fmt: skip

    greedy = dict(seeds=list(range(len(ids))), max_new_tokens=a.max_new_tokens, temperature=0.0, top_p=1.0,
                  stop_ids=stops, pad_id=pad_id)  # fmt: skip
    same = torch.equal(sample(kiln, ids, **greedy).tokens, sample_before(kiln, ids, **greedy).tokens)
    note += f"; greedy: the new and the previous sampler decode the same tokens: {'yes' if same else 'NO'}"

    runs = {"ours": [], "before": [], "hf": []}
    sides = {"ours": (partial(timed_sample, sample), kiln), "before": (partial(timed_sample, sample_before), kiln),
             "hf": (hf, hf_model)}  # fmt: skip
    for rep in range(a.warmup + a.repeats):  # interleaved, so a noisy moment hits all
        for name, (call, model) in sides.items():
            result = call(model, ids, a, stops, pad_id, rep)
            if rep >= a.warmup:
                runs[name].append(result)
    rows = [summary("kiln.rl.rollout.sample", runs["ours"], a.batch)]
    rows.append(summary("sampler before (copy)", runs["before"], a.batch))
    return rows + [summary("transformers generate", runs["hf"], a.batch)], note


def summary(label: str, runs: list[tuple[float, int, int]], batch: int) -> tuple:
    """(label, tokens per row, steps, tokens/s, ms/step): medians over the calls (seconds, tokens, steps)."""
    cols = zip(*[(n / batch, k, n / s, 1000 * s / k) for s, n, k in runs], strict=True)
    return (label, *map(statistics.median, cols))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_group(rank: int, world: int, port: int) -> None:
    """This process as `rank` of a gloo group of `world` on loopback (DeepSpeed's, as the ppo workers')."""
    import logging

    import deepspeed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    deepspeed.init_distributed(dist_backend="gloo")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def ppo_iterations(policy_dir: Path, a) -> dict[str, list[float]]:
    """Seconds of generation, experience and update of each PPO iteration (stages/ppo.py's pieces)."""
    join_group(0, 1, free_port())
    run = PpoRank(policy_dir, CFG.ppo, 0, 1)
    for it in range(a.ppo_iterations):
        run.iteration(it)
    return run.times


class PpoRank:
    """One rank's PPO models (section `p`) and its iterations, as stages/ppo.py runs them: `iteration(it)`
    times the generation, experience and update of a rank's share of rollout batch `it` and counts the
    generation's all-gather calls into `times` (iteration 0 a warm-up, left out); `rollout_crc` is a
    checksum of iteration 0's rollout tokens."""

    def __init__(self, policy_dir: Path, p, rank: int, world: int):
        from transformers import AutoTokenizer

        from kiln import training as T
        from kiln.model import KilnConfig, KilnForCausalLM, KilnForSequenceClassification
        from kiln.rl.loop import Models
        from stages import ppo as S

        self.p, self.rank, self.world = p, rank, world
        self.tok = tok = AutoTokenizer.from_pretrained(policy_dir)
        self.stops = stop_ids(tok)
        self.prompts = task_prompts()
        self.ids = [prompt_ids(tok, q) for q in self.prompts]
        torch.manual_seed(0)
        policy = KilnForCausalLM.from_pretrained(policy_dir, dtype=torch.float32, dropout=0.0)
        ref = copy.deepcopy(policy)
        config = KilnConfig.from_pretrained(policy_dir, num_labels=1, dropout=0.0)
        config.pad_token_id = tok.pad_token_id
        critic, reward = KilnForSequenceClassification(config), KilnForSequenceClassification(config)
        for model in (policy, critic):  # as the stage: training mode, dropout 0
            T.trainable(model, p.activation_checkpointing)
        self.mini = p.mini_batch_size // world
        accum = self.mini // p.micro_batch_size
        self.models = Models(
            actor=T.engine(policy, p, p.lr, accum, world), critic=T.engine(critic, p, p.critic_lr, accum, world),
            ref=T.frozen(ref, p, torch.device("cpu")), reward=T.frozen(reward, p, torch.device("cpu")),
        )  # fmt: skip
        self.synced = p.zero_stage == 3 and world > 1 and not p.gather_for_rollout  # as the stage
        # experience() also checks the sampled answers with the task's program when there are task prompts
        self.job = S.PpoJob(
            section=p, seed=CFG.run.seed, export_dir=policy_dir, wandb_run_id=None, sft_dir=policy_dir,
            reward_dir=policy_dir, reward_mean=0.0, reward_std=1.0, value_norm=(0.0, 1.0), prompts=[],
            task_prompts=self.prompts if p.task_prompts else [],
        )  # fmt: skip
        self.times: dict[str, list] = {"gen": [], "experience": [], "update": [], "allgathers": []}
        self.rollout_crc = None

    def iteration(self, it: int) -> None:
        import zlib

        import numpy as np

        from kiln import training as T
        from kiln.rl.loop import sample_rollout
        from stages import ppo as S

        p, m, seed, n = self.p, self.models, CFG.run.seed, self.p.rollout_batch_size
        mine = range(self.rank * n // self.world, (self.rank + 1) * n // self.world)
        order = T.global_batch(it, n, len(self.prompts), seed)
        t0 = time.perf_counter()
        seeds = [rollout_seed(seed, it, j) for j in mine]
        with T.counted_allgathers() as gathers, T.gathered(m.actor, enabled=p.gather_for_rollout):
            roll = sample_rollout(m.actor.module, [self.ids[order[j]] for j in mine], seeds, p, self.stops,
                                    self.tok.pad_token_id, self.synced)  # fmt: skip
        t1 = time.perf_counter()
        convs = [self.prompts[order[j]] for j in mine]
        exp, _ = S.experience(roll, convs, m, self.tok, self.job, p.kl_coef, self.world)
        t2 = time.perf_counter()
        rng = np.random.default_rng([seed, it, self.rank])
        S.ppo_update(m.actor, m.critic, exp, p, self.mini, self.world, rng)
        t3 = time.perf_counter()
        if it == 0:  # a warm-up
            self.rollout_crc = zlib.crc32(roll.tokens.numpy().tobytes())
            return
        for k, v in zip(self.times, (t1 - t0, t2 - t1, t3 - t2, gathers.n), strict=True):
            self.times[k].append(v)


KEEP_NOTHING = {"zero3_prefetch_bucket_size": 0, "zero3_max_reuse_distance": 0}
"""ZeRO-3 keeping no parameter gathered between its uses, as for a model far larger than DeepSpeed's
prefetch bucket (5e7 elements) and reuse distance (1e9): each forward pass gathers every parameter."""
BEFORE = {"zero_stage": 3, "gather_for_rollout": False}
ZERO3_SETUPS = (
    ("ZeRO-2", {"zero_stage": 2}),
    ("ZeRO-3, per forward (before)", BEFORE),
    ("ZeRO-3, per rollout (after)", {"zero_stage": 3}),
    ("ZeRO-3 keep nothing, per forward (before)", BEFORE | KEEP_NOTHING),
    ("ZeRO-3 keep nothing, per rollout (after)", {"zero_stage": 3} | KEEP_NOTHING),
)
"""(label, ppo keys) of part 3, over the ppo section of configs/tiny.yaml with zero3_persistence_threshold 0:
ZeRO-2 first (the ratios' base), then ZeRO-3 with `gather_for_rollout` false (before) and true (after),
with DeepSpeed's other gathering defaults and with KEEP_NOTHING."""


def rank_worker(rank: int, world: int, port: int, policy_dir: Path, a, out: Path) -> None:
    """One rank of part 3: every setup's models, their iterations interleaved (so that a busy moment on the
    machine slows all of them); rank 0 writes what `zero3_rollouts` returns to `out`."""
    import torch.distributed as dist

    torch.set_num_threads(a.threads)
    join_group(rank, world, port)
    runs = [
        PpoRank(policy_dir, dataclasses.replace(CFG.ppo, num_workers=world, zero3_persistence_threshold=0, **keys),
                rank, world)
        for _, keys in ZERO3_SETUPS
    ]  # fmt: skip
    for it in range(a.rank_iterations):
        for run in runs:
            run.iteration(it)
    rows = []
    for (label, _), run in zip(ZERO3_SETUPS, runs, strict=True):
        t = run.times
        slowest = torch.tensor(t["gen"], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # a rollout ends when its slowest rank does
        rows.append({
            "setup": label, "rollout_s": slowest.mean().item(), "allgathers": statistics.mean(t["allgathers"]),
            "experience_s": statistics.mean(t["experience"]), "update_s": statistics.mean(t["update"]),
            "rollout_crc": run.rollout_crc,
        })  # fmt: skip
    if rank == 0:
        out.write_text(json.dumps(rows))


def zero3_rollouts(policy_dir: Path, a, world: int = 2) -> list[dict]:
    """Part 3 (module docstring) on `world` spawned ranks: a row per setup of ZERO3_SETUPS."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="kiln-bench-ppo-ranks-") as tmp:
        out = Path(tmp) / "rows.json"
        mp.start_processes(rank_worker, args=(world, free_port(), policy_dir, a, out), nprocs=world,
                           start_method="spawn")  # fmt: skip
        return json.loads(out.read_text())


def report(policy_dir: Path, a) -> None:
    """Measure and print the parts (module docstring)."""
    rows, note = compare_rollouts(policy_dir, a)
    policy = a.model_dir or "random (configs/tiny.yaml)"
    where = (
        torch.cuda.get_device_name() if a.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    )
    print(f"\ntorch {torch.__version__}, {a.device} ({where}), fp32; policy {policy}")
    print(f"{note}; temperature {a.temperature}, top_p {a.top_p}; "
          f"median of {a.repeats} after {a.warmup} warm-up calls")  # fmt: skip
    print(f"| {'rollout sampler':<22} | batch | new tokens | tokens/row | steps | tokens/s | ms/step "
          "| ratio vs HF generate: tokens/s, step | vs before: step |")  # fmt: skip
    print(
        f"|{'-' * 24}|-------|------------|------------|-------|----------|---------|{'-' * 37}|{'-' * 17}|"
    )
    hf_tps, hf_ms = rows[-1][3:]
    before_ms = rows[1][4]
    for label, per_row, steps, tps, ms in rows:
        print(f"| {label:<22} | {a.batch:>5} | {a.max_new_tokens:>10} | {per_row:>10.1f} | {steps:>5.0f} "
              f"| {tps:>8.0f} | {ms:>7.1f} | {tps / hf_tps:>26.2f}x, {hf_ms / ms:>4.2f}x "
              f"| {before_ms / ms:>14.2f}x |")  # fmt: skip
    if a.ppo_iterations >= 2:
        report_iteration(policy_dir, a)
    if a.rank_iterations >= 2:
        report_zero3(policy_dir, a)


def report_iteration(policy_dir: Path, a) -> None:
    """Measure and print part 2."""
    times = ppo_iterations(policy_dir, a)
    mean = {k: statistics.mean(times[k]) for k in ("gen", "experience", "update")}
    total, p = sum(mean.values()), CFG.ppo
    print(f"\nPPO iteration, 1 rank x {torch.get_num_threads()} threads, ZeRO-{p.zero_stage}: rollout batch "
          f"{p.rollout_batch_size}, {p.max_new_tokens} new tokens, {p.ppo_epochs} epochs of mini-batches "
          f"{p.mini_batch_size} (micro {p.micro_batch_size}); mean of {a.ppo_iterations - 1} "
          "after 1 warm-up")  # fmt: skip
    print("| generate s | experience s | update s | iteration s | gen share |")
    print("|------------|--------------|----------|-------------|-----------|")
    print(f"| {mean['gen']:>10.2f} | {mean['experience']:>12.2f} | {mean['update']:>8.2f} | {total:>11.2f} "
          f"| {mean['gen'] / total:>9.0%} |")  # fmt: skip


def report_zero3(policy_dir: Path, a) -> None:
    """Measure and print part 3."""
    rows, p = zero3_rollouts(policy_dir, a), CFG.ppo
    print(f"\nPPO rollouts on 2 ranks x {a.threads} thread(s) (gloo): rollout batch {p.rollout_batch_size} "
          f"({p.rollout_batch_size // 2} per rank), {p.max_new_tokens} new tokens, ZeRO-3 with "
          f"zero3_persistence_threshold 0; mean of {a.rank_iterations - 1} iterations after 1 warm-up")  # fmt: skip
    print(f"| {'engines':<41} | rollout s | vs ZeRO-2 | all-gathers per rollout | experience s | update s |")
    print(f"|{'-' * 43}|-----------|-----------|-------------------------|--------------|----------|")
    base = rows[0]["rollout_s"]
    for r in rows:
        print(f"| {r['setup']:<41} | {r['rollout_s']:>9.2f} | {r['rollout_s'] / base:>8.2f}x "
              f"| {r['allgathers']:>23.0f} | {r['experience_s']:>12.2f} | {r['update_s']:>8.2f} |")  # fmt: skip
    same = len({r["rollout_crc"] for r in rows}) == 1
    print(f"first iteration's rollouts, the same tokens in all {len(rows)}: {'yes' if same else 'NO'}")


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
    ap.add_argument("--device", default="cpu", help="where part 1's models run: cpu, cuda")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--ppo-iterations", type=int, default=3, help="PPO iterations, the first a warm-up; 0 = skip"
    )
    ap.add_argument(
        "--rank-iterations", type=int, default=4,
        help="PPO iterations per setup of the 2-rank ZeRO-3 comparison, the first a warm-up; 0 = skip",
    )  # fmt: skip
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-ppo-policy-") as tmp:
        if a.model_dir is None:
            random_policy(Path(tmp), [q[-1]["content"] for q in task_prompts()])
        report(a.model_dir or Path(tmp), a)


if __name__ == "__main__":
    main()
