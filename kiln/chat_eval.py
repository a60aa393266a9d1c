"""Held-out evaluation of chat models: the task's accuracy by greedy generation, a reward model's pairs.

    task_accuracy(policy, tok, prompts, max_new_tokens=16)   # {"task_accuracy": 0.41, "task_prompts": 200}
    score_pairs(reward_model, tok, pairs)                     # {"pairwise_accuracy": 0.93, "margin": ..., ...}

`prompts` and `pairs` are in the normalised conversational form of data_prep/chat_data.py. Text is
rendered with the tokenizer's chat template exactly as TRL renders it for training. Generation is
greedy and stops at `<|end|>` (end of an assistant turn) or EOS; answers are judged by
`data_prep.task.check`, which nothing in training sees.

On a data-parallel group each rank takes every world-th item and one `all_gather_object` combines
the results, so every rank returns the same dict. Under ZeRO-3 on several ranks, generation passes
`synced_gpus=True` and every rank runs the same number of batches (parameters are gathered by
collective calls, so a rank that stopped early would hang the others).
"""

from __future__ import annotations

import json
import math

import torch

from data_prep.bpe import END
from data_prep.task import KINDS, check, prompt_text


def stop_ids(tok) -> list[int]:
    """Token ids that end an answer: the end-of-turn token and EOS."""
    ids = [tok.convert_tokens_to_ids(END), tok.eos_token_id]
    return [i for i in dict.fromkeys(ids) if i is not None and i != tok.unk_token_id]


def prompt_ids(tok, messages: list[dict]) -> list[int]:
    """The token ids of a conversation rendered by the chat template up to the opening of the
    assistant's turn: what a sampler continues."""
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]  # fmt: skip


def conversation_ids(tok, messages: list[dict]) -> list[int]:
    """The token ids of a whole conversation rendered by the chat template: what a reward model scores."""
    return tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


def decode_responses(tok, roll, stops: list[int]) -> list[str]:
    """The text of each response of a kiln.rl.rollout.Rollout, without its stop token."""
    answers = []
    for row, mask in zip(roll.response, roll.response_mask, strict=True):
        tokens = row[mask.bool()].tolist()
        if tokens and tokens[-1] in stops:
            tokens = tokens[:-1]
        answers.append(tok.decode(tokens, skip_special_tokens=True))
    return answers


@torch.no_grad()
def greedy_answers(
    model, tok, prompts: list[list[dict]], max_new_tokens: int, batch_size: int = 64, synced=False
):
    """The model's greedy answer to each prompt (messages), decoded up to the first stop token."""
    stops = stop_ids(tok)
    device = next(model.parameters()).device
    was_training, side = model.training, tok.padding_side
    model.eval()
    tok.padding_side = "left"  # generation appends on the right: the prompts must end together
    answers = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts[i : i + batch_size]]  # fmt: skip
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                pad_token_id=tok.pad_token_id, use_cache=True, synced_gpus=synced,
            )  # fmt: skip
            for row in out[:, enc["input_ids"].shape[1] :].tolist():
                cut = next((j for j, t in enumerate(row) if t in stops), len(row))
                answers.append(tok.decode(row[:cut], skip_special_tokens=True))
    finally:
        tok.padding_side = side
        model.train(was_training)
    return answers


def read_task_prompts(source: str, n: int, key: str) -> list[list[dict]]:
    """The first `n` prompts (messages) of a prompt file, for `task_accuracy`; a malformed record
    fails with its file and line (config `key`), as a held-out set must be read whole."""
    from pathlib import Path

    from data_prep.chat_data import load_records
    from pipeline.config import PROJECT_ROOT

    records, stats = load_records([source], "prompt", (Path.cwd(), PROJECT_ROOT), key=key)
    if stats["errors"]:
        first = stats["errors"][0]
        raise ValueError(
            f"{key}: {first['file']}:{first['line']}: {first['reason']} (malformed {stats['malformed']})"
        )
    return [r["prompt"] for r in records[:n]]


def rank_share(items: list, rank: int, world: int) -> tuple[list, int]:
    """This rank's items (every `world`-th from `rank`) padded with the first item up to
    ceil(len / world), so that every rank runs the same number of batches (ZeRO-3 gathers parameters
    in every forward, collectively); and how many of them are real (the rest are to be dropped)."""
    mine = items[rank::world]
    return mine + items[:1] * (math.ceil(len(items) / world) - len(mine)), len(mine)


def task_accuracy(model, tok, prompts, max_new_tokens: int, rank=0, world=1, synced=False) -> dict:
    """Share of held-out prompts whose greedy answer `data_prep.task.check` accepts."""
    padded, n_mine = rank_share(prompts, rank, world)
    mine = padded[:n_mine]
    answers = greedy_answers(model, tok, padded, max_new_tokens, synced=synced)[:n_mine]
    right = sum(check(prompt_text(p), a) for p, a in zip(mine, answers, strict=True))
    sample = [(prompt_text(p), a) for p, a in zip(mine[:3], answers[:3], strict=True)]
    right, n, samples = _sum_over_ranks((right, len(mine), sample), world)
    return {"task_accuracy": right / max(1, n), "task_prompts": n, "task_samples": samples[:3]}


@torch.no_grad()
def score_pairs(model, tok, pairs: list[dict], batch_size: int = 64, rank=0, world=1) -> dict:
    """Held-out pairwise accuracy (overall, per kind of rejected answer, per class of kind), mean
    margin, Bradley-Terry loss, and the mean and std of the rewards of every held-out answer (chosen
    and rejected, each distinct sequence once): the normalisation statistics PPO uses. And two measures
    of whether the scores can be trusted as a reward: `calibration_ece`, how far the Bradley-Terry
    probability is from the frequency with which it is right (`expected_calibration_error`), and
    `length_correlation`, the Pearson correlation of an answer's score with its length in tokens (a
    reward model that prefers long answers invites a policy to ramble: Singhal et al. 2023)."""
    texts = {}
    for p in pairs:
        for side in ("chosen", "rejected"):
            texts.setdefault(_key(p["prompt"] + p[side]), p["prompt"] + p[side])
    keys, _ = rank_share(sorted(texts), rank, world)  # a padded key repeats one already scored
    scores = dict(
        zip(keys, score_conversations(model, tok, [texts[k] for k in keys], batch_size), strict=True)
    )
    scores = _merge_over_ranks(scores, world)

    chosen = torch.tensor([scores[_key(p["prompt"] + p["chosen"])] for p in pairs])
    rejected = torch.tensor([scores[_key(p["prompt"] + p["rejected"])] for p in pairs])
    margin = chosen - rejected  # (N,)
    right = (margin > 0).float()
    every = torch.tensor(list(scores.values()))
    answers = {}
    for p in pairs:
        for side in ("chosen", "rejected"):
            answers.setdefault(_key(p["prompt"] + p[side]), p[side])
    lengths = {k: sum(len(tok(m["content"], add_special_tokens=False)["input_ids"]) for m in a)
               for k, a in answers.items()}  # fmt: skip
    out = {
        "pairwise_accuracy": right.mean().item(),
        "margin": margin.mean().item(),
        "val_loss": torch.nn.functional.softplus(-margin).mean().item(),  # -log sigmoid(margin)
        "reward_mean": every.mean().item(),
        "reward_std": every.std(unbiased=False).item(),
        "eval_pairs": len(pairs),
        "calibration_ece": expected_calibration_error(torch.sigmoid(margin)),
        "length_correlation": pearson([scores[k] for k in lengths], list(lengths.values())),
    }
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(f"kind_{p['kind']}", []).append(i)
        if p["kind"] in KINDS:
            groups.setdefault(f"class_{KINDS[p['kind']]}", []).append(i)
    for name, idx in sorted(groups.items()):
        out[f"pairwise_accuracy_{name.partition('_')[2]}"] = right[idx].mean().item()
    return out


@torch.no_grad()
def rank_answers(model, tok, records: list[dict], batch_size: int = 64, rank=0, world=1) -> dict:
    """`answer_auc`: the in-prompt AUC (`in_prompt_auc`) of the reward model's scores of a policy's
    sampled answers, labelled right or wrong (records {prompt, answers, right}), and how many right/wrong
    pairs it is over (`answer_auc_pairs`). Each distinct conversation is scored once, the ranks sharing them."""
    convs = [[r["prompt"] + [{"role": "assistant", "content": a}] for a in r["answers"]] for r in records]
    texts = {_key(c): c for cs in convs for c in cs}
    keys, _ = rank_share(sorted(texts), rank, world)  # a padded key repeats one already scored
    scores = dict(
        zip(keys, score_conversations(model, tok, [texts[k] for k in keys], batch_size), strict=True)
    )
    scores = _merge_over_ranks(scores, world)
    auc, pairs = in_prompt_auc([[scores[_key(c)] for c in cs] for cs in convs], [r["right"] for r in records])
    return {"answer_auc": auc, "answer_auc_pairs": pairs}


def expected_calibration_error(p_chosen: torch.Tensor, bins: int = 10) -> float:
    """Expected calibration error (Guo et al. 2017, "On Calibration of Modern Neural Networks", eq. 3) of
    pairwise preferences: each pair's prediction is the answer it gives the higher probability, with
    confidence max(p, 1 - p) in [0.5, 1], right when that is the chosen answer. The pairs are put in `bins`
    equal-width bins of confidence; ECE = sum over bins of (pairs in it / pairs) * |accuracy - mean
    confidence|: 0 when a reward model that says 80 % is right 80 % of the time. p_chosen (N,)."""
    conf = torch.maximum(p_chosen, 1 - p_chosen)
    right = (p_chosen > 0.5).float()
    which = ((conf - 0.5) * 2 * bins).long().clamp(max=bins - 1)  # (N,) bin of each pair
    ece = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            ece += inside.float().mean().item() * abs(
                right[inside].mean().item() - conf[inside].mean().item()
            )
    return ece


def pairwise_wins(pos: torch.Tensor, neg: torch.Tensor) -> tuple[float, int]:
    """(wins, pairs) of scores `pos` over scores `neg`, every pair of one of each, a tie a half win:
    wins / pairs is the AUC (the Mann-Whitney statistic) of `pos` against `neg`."""
    if not len(pos) or not len(neg):
        return 0.0, 0
    d = pos[:, None] - neg[None, :]
    return ((d > 0).float().sum() + 0.5 * (d == 0).float().sum()).item(), d.numel()


def in_prompt_auc(scores: list[list[float]], right: list[list[bool]]) -> tuple[float | None, int]:
    """(AUC, pairs): P(score of a right answer > score of a wrong one) over pairs of answers to the same
    prompt (`scores[i]`, `right[i]`: prompt i's answers), ties a half; None without such a pair. Within a
    prompt its offset cancels (an easy prompt's answers all scoring high), so this is what a policy
    update can use from a reward model."""
    won, pairs = 0.0, 0
    for s, r in zip(scores, right, strict=True):
        s, r = torch.tensor(s, dtype=torch.float64), torch.tensor(r, dtype=torch.bool)
        w, n = pairwise_wins(s[r], s[~r])
        won, pairs = won + w, pairs + n
    return (won / pairs if pairs else None), pairs


def pearson(x: list[float], y: list[float]) -> float | None:
    """Pearson correlation of two equal-length series; None when either is constant (or under two points)."""
    if len(x) < 2:
        return None
    t = torch.tensor([x, y], dtype=torch.float64)
    if (t.std(dim=1) == 0).any():
        return None
    return torch.corrcoef(t)[0, 1].item()


@torch.no_grad()
def score_conversations(model, tok, conversations: list[list[dict]], batch_size: int = 64) -> list[float]:
    """A reward model's score of each conversation (messages), rendered by the chat template as in
    training and read at its last token."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores: list[float] = []
    try:
        for i in range(0, len(conversations), batch_size):
            ids = [conversation_ids(tok, c) for c in conversations[i : i + batch_size]]
            width = max(map(len, ids))
            input_ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids], device=device)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
            scores += model(input_ids=input_ids, attention_mask=mask).logits[:, 0].float().tolist()
    finally:
        model.train(was_training)
    return scores


def _key(messages) -> str:
    return json.dumps(messages, sort_keys=True)


def gather(obj, world: int) -> list:
    """`obj` from every rank, in rank order (one all_gather_object; no collective with one rank)."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    found = [None] * world
    dist.all_gather_object(found, obj)
    return found


def _sum_over_ranks(parts: tuple, world: int) -> tuple:
    right, n, samples = 0, 0, []
    for r, k, s in gather(parts, world):
        right, n, samples = right + r, n + k, samples + s
    return right, n, samples


def _merge_over_ranks(scores: dict, world: int) -> dict:
    merged = {}
    for part in gather(scores, world):
        merged.update(part)
    return merged
