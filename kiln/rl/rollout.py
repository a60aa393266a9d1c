"""Rollouts for PPO: sampling responses with the KV cache, reproducible per prompt.

    roll = sample(policy, prompt_ids, seeds=[...], max_new_tokens=16, temperature=1.0, top_p=1.0,
                  stop_ids=[end_id, eos_id], pad_id=pad)
    roll.tokens      (B, P + R)  left-padded prompts, then the responses (pad after each one's stop)
    roll.mask        (B, P + R)  1 on real prompt and response tokens (the stop token included)
    roll.ended       (B,)        whether the response emitted a stop token within max_new_tokens

One prefill over the left-padded prompts fills the cache; each further step feeds one token per row
(positions follow the attention mask, so padding changes nothing). Each prompt draws its tokens from
its own generator, seeded by the caller (the pipeline's seed, the iteration and the prompt's index):
a response depends only on its prompt, its seed and the weights, never on the batch it shares or
the number of workers, and a resumed run samples exactly what an uninterrupted one did. A token is
drawn by the Gumbel-max trick, argmax(logits / temperature + Gumbel noise), over the nucleus (the
smallest set of tokens whose probability reaches `top_p`, Holtzman et al. 2020), which is an exact
sample from the renormalised distribution (up to float32 uniform noise: a token more than ~19 nats
below the most likely one is never drawn). temperature 0 is greedy.

With `synced=True` (ZeRO-3 on several ranks, where every forward gathers parameters with collective
calls) a rank keeps stepping until every rank's rows have stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    tokens: torch.Tensor  # (B, P + R) long
    mask: torch.Tensor  # (B, P + R) long: 1 on real tokens
    prompt_len: int  # P, the padded prompt width
    ended: torch.Tensor  # (B,) bool

    @property
    def response(self) -> torch.Tensor:  # (B, R)
        return self.tokens[:, self.prompt_len :]

    @property
    def response_mask(self) -> torch.Tensor:  # (B, R)
        return self.mask[:, self.prompt_len :]


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, attention mask), each (B, max len), padded on the left."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits with every token outside the top-p nucleus set to -inf (the most likely token always stays).
    (B, V) -> (B, V)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = before >= top_p  # (B, V): the nucleus is reached without this token
    drop_sorted[..., 0] = False  # the most likely token always stays (even at top_p <= 0)
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def pick(logits: torch.Tensor, gens: list[torch.Generator], temperature: float, top_p: float) -> torch.Tensor:
    """One token per row, (B, V) -> (B,): greedy at temperature 0, else Gumbel-max over the nucleus
    with row i's noise from generator i."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = nucleus(logits / temperature, top_p)
    u = torch.stack([torch.rand(logits.shape[-1], generator=g, device=logits.device) for g in gens])
    gumbel = -torch.log(-torch.log(u.clamp_(min=1e-20)))  # (B, V)
    return (logits + gumbel).argmax(-1)


@torch.no_grad()
def sample(
    model,
    prompt_ids: list[list[int]],
    *,
    seeds: list[int],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    stop_ids: list[int],
    pad_id: int,
    synced: bool = False,
) -> Rollout:
    """Sample one response per prompt (module docstring). `model` is a causal LM taking
    (input_ids, attention_mask, cache, use_cache, logits_to_keep) and returning logits and its cache."""
    device = next(model.parameters()).device
    gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    ids, mask = left_pad(prompt_ids, pad_id, device)  # (B, P)
    B, P = ids.shape
    stops = torch.tensor(stop_ids, device=device)
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        cache, logits = out.cache, out.logits[:, -1]  # (B, V)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        tokens, keep = [], []
        for t in range(max_new_tokens):
            nxt = pick(logits, gens, temperature, top_p)  # (B,)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            keep.append(~done)
            tokens.append(nxt)
            done = done | torch.isin(nxt, stops)
            if t == max_new_tokens - 1 or _all_done(done, synced):
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


def _all_done(done: torch.Tensor, synced: bool) -> bool:
    """Whether every row has stopped, on every rank when synced (one all-reduce per step)."""
    left = (~done).sum()
    if synced:
        import torch.distributed as dist

        dist.all_reduce(left)
    return int(left) == 0


def rollout_seed(seed: int, it: int, position: int) -> int:
    """The generator seed of the prompt at `position` of iteration `it`'s rollout batch."""
    return (seed * 1_000_003 + it) * 100_003 + position
