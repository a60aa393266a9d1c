"""What scores a response, for the RL stages' experience (kiln/rl/loop.py) and their held-out
evaluation (kiln/rl/evaluation.py): its tokens' logprobs under a model at the sampling temperature,
the reward model's score, or the shipped task's checking program."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


def tempered_logits(model, x, m, P, temperature: float) -> Tensor:
    """Logits predicting the response tokens x[:, P:], (B, R, V), at the sampling temperature: the
    logprobs are then those of the distribution the rollouts were drawn from. The LM head runs on
    the response's positions only, not the prompt's."""
    from kiln.rl.rollout import response_logits

    logits = response_logits(model, x, m, P)
    return logits / temperature if temperature > 0 else logits


def logprobs(model, x, m, P, temperature: float) -> Tensor:
    """(B, R) the logprob of each response token under `model` at the sampling temperature."""
    from kiln.rl.ppo_math import logprobs_from_logits

    return logprobs_from_logits(tempered_logits(model, x, m, P, temperature), x[:, P:])


def score_answers(prompts, answers: list[str], reward_model, tok, job, device) -> tuple[Tensor, Tensor]:
    """(raw, score) of each answer to its prompt (conversations), (B,) each: with `reward_source: task`
    the checking program's verdict, 1 right, 0 wrong, used as it is (raw on the host, score on
    `device`); else the reward model's score (gathered once under ZeRO-3) and that score normalised
    with its held-out statistics, both on `device`."""
    import torch

    from kiln import training as T
    from kiln.chat_eval import score_conversations

    p = job.section
    if p.reward_source == "task":
        raw = torch.tensor([float(is_right(q, a)) for q, a in zip(prompts, answers, strict=True)])
        return raw, raw.to(device)
    convs = [q + [{"role": "assistant", "content": a}] for q, a in zip(prompts, answers, strict=True)]
    with T.gathered(reward_model, enabled=p.gather_for_rollout):
        found = score_conversations(reward_model, tok, convs, batch_size=p.micro_batch_size)
    raw = torch.tensor(found, device=device)  # (B,)
    return raw, (raw - job.reward_mean) / job.reward_std


def checked(prompts: list[list[dict]], answers: list[str]) -> float:
    """Share of sampled answers the shipped task's program accepts (a measure training never sees)."""
    return sum(map(is_right, prompts, answers)) / len(answers)


def is_right(prompt: list[dict], answer: str) -> bool:
    from data_prep.task import check, prompt_text

    return check(prompt_text(prompt), answer)
