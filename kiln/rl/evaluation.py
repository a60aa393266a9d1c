"""The held-out gold measure of the post-training stages, with the proxy and the KL beside it, and the
choice of which evaluated iteration to export.

    scored, ev = evaluate(actor, ref, reward, tok, job, wctx, synced, "ppo", it)   # every rank joins
    ev.measures()          # task_accuracy, task_accuracy_sampled, kl_sft, proxy_score over all prompts
    ev.measures(REPORT)    # the same on the report half of the prompts
    flips(first, ev)       # paired gained / lost against the first evaluation

Gold: the shipped task's held-out prompts (`task_prompts`), answered greedily and sampled as the
rollouts are (`task_samples` answers per prompt, seeds fixed per prompt and sample, so every evaluation
draws the same noise and a change measures the policy), judged by the task's checking program, which no
training signal sees (unless `reward_source: task`). Beside it, on the same sampled answers, the proxy
the stage is trained to raise (`proxy_score`: the reward model's normalised score, or the checking
program's verdict with `reward_source: task`) and the KL to the SFT policy (`kl_sft`: per answer the
sum over its tokens of log pi(y_t) - log pi_sft(y_t) at the sampling temperature; on the policy's own
samples, the k1 estimate of KL(pi || pi_sft) per answer, in nats). Both are averaged over the first
sampled answer to each prompt: an unbiased estimate of their mean over all the answers at 1 /
`task_samples` of the cost (three forward passes per answer: policy, reference, reward model).

Over-optimisation (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization"): pushed along a
learned reward, the policy drifts from SFT, the proxy keeps rising while the gold measure peaks and
falls. Each evaluation row carries all three, and `overoptimized` (1) when the proxy is above the first
evaluation's while the paired change in sampled gold accuracy is below -NOISE_Z standard errors.

Selection (`select: best_gold`): the held-out prompts are cut in two halves by position (even: the
selection half, odd: the report half). The evaluated iteration (the SFT policy's, iteration 0,
included) with the best sampled accuracy on the selection half is the one exported; its figures, and
the SFT policy's, are given on the report half only, since the best of several noisy estimates,
reported on the prompts it was chosen on, overstates it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

SELECT, REPORT = "select", "report"
NOISE_Z = 2.0
"""A paired change in sampled accuracy is beyond noise at |z| >= 2 (McNemar's test, about p < 0.05)."""


@dataclass
class Evaluation:
    """One evaluation of a policy on the held-out task prompts: per prompt (`greedy`: "1" right, "0"
    wrong; `kl` and `proxy` of its first sampled answer) and per sampled answer (`sampled`, prompt-major,
    `samples` per prompt)."""

    iteration: int
    samples: int
    greedy: str = ""
    sampled: str = ""
    kl: list[float] = field(default_factory=list)
    proxy: list[float] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict | None) -> Evaluation | None:
        return None if d is None else cls(**d)

    def prompts(self, half: str | None) -> list[int]:
        """Positions of the prompts of `half` (None: all of them)."""
        n = len(self.greedy)
        return list(range(n)) if half is None else list(range(0 if half == SELECT else 1, n, 2))

    def answers(self, half: str | None) -> list[int]:
        """Positions of the sampled answers to the prompts of `half`."""
        return [i * self.samples + j for i in self.prompts(half) for j in range(self.samples)]

    def measures(self, half: str | None = None) -> dict:
        """The gold, proxy and KL means over `half` of the prompts (all with None)."""
        if not self.greedy:
            return {}
        ps, xs = self.prompts(half), self.answers(half)
        mean = lambda v: sum(v) / max(1, len(v))  # noqa: E731
        out = {
            "task_accuracy": mean([self.greedy[i] == "1" for i in ps]),
            "task_accuracy_sampled": mean([self.sampled[k] == "1" for k in xs]),
            "kl_sft": mean([self.kl[i] for i in ps]),
        }
        if self.proxy:  # a stage without a proxy score (dpo) has none
            out["proxy_score"] = mean([self.proxy[i] for i in ps])
        return out


def flips(before: Evaluation | None, after: Evaluation, half: str | None = None) -> dict:
    """The paired comparison of two evaluations' sampled answers (same prompts, same seeds): how many
    went wrong -> right (`task_sampled_gained`) and right -> wrong (`task_sampled_lost`). Under no change
    in the policy's accuracy the difference is ~N(0, gained + lost) (McNemar's test), which makes
    `z_score(gained, lost)` the z-score of the change."""
    if before is None or not before.sampled or len(before.sampled) != len(after.sampled):
        return {}
    pairs = [(before.sampled[k], after.sampled[k]) for k in after.answers(half)]
    return {
        "task_sampled_gained": sum(a == "0" and b == "1" for a, b in pairs),
        "task_sampled_lost": sum(a == "1" and b == "0" for a, b in pairs),
    }


def z_score(gained: int, lost: int) -> float:
    """(gained - lost) / sqrt(gained + lost): the paired change in standard errors (0 with no flips)."""
    return (gained - lost) / math.sqrt(gained + lost) if gained + lost else 0.0


def overoptimized(first: Evaluation | None, ev: Evaluation) -> bool:
    """The proxy above the first evaluation's while sampled gold fell beyond noise (module docstring)."""
    change = flips(first, ev)
    if not change or not ev.proxy:
        return False
    rose = ev.measures()["proxy_score"] > first.measures()["proxy_score"]
    return rose and z_score(change["task_sampled_gained"], change["task_sampled_lost"]) <= -NOISE_Z


def row_measures(first: Evaluation | None, ev: Evaluation, select: bool) -> dict:
    """An evaluation's metrics row: the measures over all prompts, the paired change since the first
    evaluation (None for the first itself), `overoptimized`, and with selection the selection half's
    sampled accuracy."""
    row = ev.measures()
    if first is not None:
        row |= flips(first, ev)
        row["overoptimized"] = float(overoptimized(first, ev))
    if select:
        row["task_accuracy_sampled_select"] = ev.measures(SELECT)["task_accuracy_sampled"]
    return row


def better(ev: Evaluation, best: Evaluation | None) -> bool:
    """Whether `ev` beats the best so far on the selection half's sampled accuracy (ties: the earlier)."""
    if best is None:
        return True
    return ev.measures(SELECT)["task_accuracy_sampled"] > best.measures(SELECT)["task_accuracy_sampled"]


def final_measures(first: Evaluation | None, chosen: Evaluation | None, last_it: int, select: bool) -> dict:
    """The manifest's gold figures: the chosen evaluation's (the last, or the best on the selection
    half) and the SFT policy's (`<key>_sft`), on the report half when selecting; the paired change
    between them with its z-score; `selected_iteration` and why."""
    if chosen is None:
        return {"selected_iteration": last_it, "selected_why": "no held-out task prompts: the last iteration"}
    half = REPORT if select else None
    out = chosen.measures(half) | flips(first, chosen, half)
    if first is not None:
        out |= {f"{k}_sft": v for k, v in first.measures(half).items() if k != "kl_sft"}
    if "task_sampled_gained" in out:
        out["task_sampled_z"] = z_score(out["task_sampled_gained"], out["task_sampled_lost"])
    out["selected_iteration"] = chosen.iteration
    out["gold_prompts"] = len(chosen.prompts(half))  # the prompts these figures are on
    if select:
        picked = chosen.measures(SELECT)["task_accuracy_sampled"]
        out["task_accuracy_sampled_select"] = picked
        out["selected_why"] = (
            f"select=best_gold: the best sampled task accuracy on the selection half ({picked:.4f} over "
            f"{len(chosen.answers(SELECT))} answers) of the evaluated iterations; figures on the report half"
        )
    else:
        out["selected_why"] = "select=last: the last iteration"
    return out


# ---------------------------------------------------------------------------------------------------- measuring


def evaluate(actor, ref, reward, tok, job, wctx, synced, stage: str, iteration: int):
    """(metrics, Evaluation) of the policy now: pretraining's held-out windows scored by source
    (`heldout_loss/<source>`, when the job has them) and the gold measure on the task prompts (None
    without them). Every rank joins and gets the same result. Under ZeRO-3 the policy and the reference
    are gathered once for all of it (`gather_for_rollout`)."""
    from kiln import training as T

    p = job.section
    with T.gathered(actor, ref, enabled=p.gather_for_rollout):
        scored = {}
        if job.heldout is not None:
            device = next(actor.module.parameters()).device
            scored = T.score_heldout(lambda x: actor.module(input_ids=x).logits, job.heldout, wctx.rank,
                                     wctx.world_size, p.micro_batch_size, device, "heldout_loss")  # fmt: skip
        if not job.task_prompts:
            return scored, None
        return scored, judge(actor, ref, reward, tok, job, wctx, synced, stage, iteration)


def judge(
    actor, ref, reward, tok, job, wctx, synced, stage: str, iteration: int, proxy: bool = True
) -> Evaluation:
    """The gold measure with its proxy and KL (module docstring), the models as they are (gathered or
    not). `actor`: a DeepSpeed engine (its `.module` runs) or a plain model; `ref` and `reward` score as
    kiln.rl.loop's `logprobs` and `score_answers` take them (reward None: the checking program scores).
    `proxy` False: no proxy score (a stage trained on no score, dpo)."""
    import logging

    import torch

    from data_prep.task import prompt_text
    from kiln.chat_eval import decode_responses, gather, greedy_answers, prompt_ids, rank_share, stop_ids
    from kiln.rl.rollout import rollout_seed, sample
    from kiln.rl.scoring import is_right, logprobs, score_answers

    p, prompts = job.section, job.task_prompts
    rank, world = wctx.rank, wctx.world_size
    policy = getattr(actor, "module", actor)
    device = next(policy.parameters()).device
    mine, n_mine = rank_share(list(range(len(prompts))), rank, world)  # padded: equal batch counts
    answers = greedy_answers(policy, tok, [prompts[i] for i in mine], p.max_new_tokens, synced=synced)
    greedy = {i: is_right(prompts[i], a) for i, a in zip(mine[:n_mine], answers, strict=False)}
    if rank == 0:
        shown = [(prompt_text(prompts[i]), a) for i, a in zip(mine[:3], answers, strict=False)]
        logging.getLogger(f"kiln.{stage}").info("%s: iteration %d; e.g. %s", stage, iteration, shown)

    real = n_mine * p.task_samples  # samples past this repeat a prompt: only for equal batch counts
    samples = [(i, j) for i in mine for j in range(p.task_samples)]
    ids_of = {i: prompt_ids(tok, prompts[i]) for i in mine}  # each prompt tokenised once, not per sample
    stops, found, micro = stop_ids(tok), {}, p.micro_batch_size
    for b in range(0, len(samples), 128):
        batch = samples[b : b + 128]
        seeds = [rollout_seed(job.seed, -1 - j, i) for i, j in batch]  # iteration -1 - j: never a rollout's
        roll = sample(policy, [ids_of[i] for i, _ in batch], seeds=seeds, max_new_tokens=p.max_new_tokens,
                      temperature=p.temperature, top_p=p.top_p, stop_ids=stops, pad_id=tok.pad_token_id,
                      synced=synced)  # fmt: skip
        texts = decode_responses(tok, roll, stops)
        # KL and proxy on the first answer to each prompt (the module docstring); as many on every
        # rank, whose batches hold the same positions: their forward passes pair up under ZeRO-3
        first = [k for k, (_, j) in enumerate(batch) if j == 0]
        x, m, R, P = roll.tokens[first], roll.mask[first], roll.response_mask[first], roll.prompt_len
        kl = []
        with torch.no_grad():
            for a in range(0, len(first), micro):
                xs, ms = x[a : a + micro], m[a : a + micro]
                diff = logprobs(policy, xs, ms, P, p.temperature) - logprobs(ref, xs, ms, P, p.temperature)
                kl += (diff * R[a : a + micro]).sum(1).tolist()
        scores = [0.0] * len(first)
        if proxy and first:
            prompts_of = [prompts[batch[k][0]] for k in first]
            scores = score_answers(prompts_of, [texts[k] for k in first], reward, tok, job, device)[
                1
            ].tolist()
        of_first = dict(zip(first, zip(kl, scores, strict=True), strict=True))
        for k, (key, a) in enumerate(zip(batch, texts, strict=True)):
            if b + k < real:
                found[key] = (is_right(prompts[key[0]], a), *of_first.get(k, (None, None)))
    merged_greedy = {i: ok for part in gather(greedy, world) for i, ok in part.items()}
    merged = {key: v for part in gather(found, world) for key, v in part.items()}
    order = sorted(merged)
    return Evaluation(
        iteration=iteration,
        samples=p.task_samples,
        greedy="".join("1" if merged_greedy[i] else "0" for i in range(len(prompts))),
        sampled="".join("1" if merged[s][0] else "0" for s in order),
        kl=[merged[i, 0][1] for i in range(len(prompts))],
        proxy=[merged[i, 0][2] for i in range(len(prompts))] if proxy else [],
    )
