"""Rollouts for PPO: sampling responses with a preallocated KV cache, reproducible per prompt.

    roll = sample(policy, prompt_ids, seeds=[...], max_new_tokens=16, temperature=1.0, top_p=1.0,
                  stop_ids=[end_id, eos_id], pad_id=pad)
    roll.tokens      (B, P + R)  left-padded prompts, then the responses (pad after each one's stop)
    roll.mask        (B, P + R)  1 on real prompt and response tokens (the stop token included)
    roll.ended       (B,)        whether the response emitted a stop token within max_new_tokens

Decoding. One prefill over the left-padded prompts fills the cache, with the LM head on the last position
only (`logits_to_keep`); each further step feeds one token per row (positions follow the attention mask,
so padding changes nothing). The cache (`KVCache`) is allocated once per layer, (B, KV heads, P + R - 1,
head dim), written in place at a position the host counts, and `update` returns the view of the positions
written so far: Kiln's attention (kiln/model.py) sees exactly the keys and mask shapes it sees with
transformers' DynamicCache, which instead concatenates (a copy of the whole cache per layer and token).
transformers' StaticCache does not fit Kiln's model as it is: it hands attention the whole buffer, unwritten
slots included (the model would have to mask them), and counts its length in a device tensor that the
model would read on the host. Nothing in a step waits on the device but the stop check, every
`check_every` steps (every step on CPU, where a check costs nothing; else every 8: a batch runs at most 7
steps past its last stop, and the response is cut back to the steps some row used, so the result does not
depend on it). The model reads nothing on the host in a one-token step either (kiln/model.py keeps such a
step's attention mask rather than test it), MoE layers aside when they have a capacity or run
grouped_mm's fallback loop.

Randomness. Each prompt draws from its own stream, a pure function of the seed the caller gives it (the
pipeline's seed, the iteration and the prompt's index): a response depends only on its prompt, its seed
and the weights, never on the batch it shares or the number of workers, and a resumed run samples exactly
what an uninterrupted one did. The streams are counter-based, so one vectorised call draws a step's noise
for every row: token v's uniform at step t of the prompt with seed s comes from the top 23 bits of output
v (counting from 0) of SplitMix64 (Steele, Lea & Flood 2014) seeded with output t of SplitMix64 seeded with
s, computed in int64 arithmetic on the model's device: integer operations, so no batch, order or device
changes a bit (tests/test_rollout.py checks them against SplitMix64 in Python ints). Until this sampler
each prompt had a torch.Generator and drew one torch.rand per step: the same contracts, another stream, so
a seed's sampled tokens changed with it (greedy decoding did not). A token is drawn by the Gumbel-max
trick, argmax(logits / temperature + Gumbel noise), over the nucleus (the smallest set of tokens whose
probability reaches `top_p`, Holtzman et al. 2020), which is an exact sample from the renormalised
distribution (up to the 23-bit uniforms, kept within [2^-24, 1 - 2^-24]: a token more than ~19 nats below
the most likely one is never drawn). temperature 0 is greedy.

With `synced=True` (ZeRO-3 on several ranks, where every forward gathers parameters with collective
calls) a rank keeps stepping until every rank's rows have stopped, and every rank returns the same
number of response columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


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


# ---------------------------------------------------------------------------------------------- KV cache


class PreallocatedLayer(CacheLayerMixin):
    """One layer's keys and values in (B, KV, capacity, D) buffers, allocated at the first update (with its
    batch, heads, dtype and device) and written in place at `length`, a host int."""

    is_sliding = False

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        self.device = key_states.device
        self.keys = key_states.new_empty(B, H, self.capacity, D)
        self.values = value_states.new_empty(B, H, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, KV, T, D) at the next T positions; every position written so far, (B, KV, S, D) views."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} positions for a capacity of {self.capacity}")
        self.keys[:, :, start:end] = key_states
        self.values[:, :, start:end] = value_states
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0  # (kv length, kv offset), as DynamicLayer

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def reset(self) -> None:
        self.length = 0


class KVCache(Cache):
    """transformers' Cache of PreallocatedLayer, one per model layer as they come: `capacity` positions
    each (prompt width + new tokens - 1 for a decode: the last sampled token is never fed)."""

    def __init__(self, capacity: int):
        super().__init__(layer_class_to_replicate=partial(PreallocatedLayer, capacity))


# ---------------------------------------------------------------------------------------------- randomness

_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment: 2^64 / golden ratio, odd
_MIX = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)  # its output function's multipliers (Stafford's Mix13)
_WORD = (1 << 64) - 1


def _int64(x: int) -> int:
    """The int64 with the bits of x mod 2^64."""
    x &= _WORD
    return x - (1 << 64) if x >> 63 else x


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 tensors read as unsigned words (torch's `>>` is arithmetic)."""
    return torch.bitwise_right_shift(z, s).bitwise_and_((1 << (64 - s)) - 1)


def _mix(z: torch.Tensor, top_bits: int = 64) -> torch.Tensor:
    """SplitMix64's output function of int64 states (products wrap mod 2^64, as unsigned ones do), in place;
    with `top_bits` < 33 only its top bits, as non-negative ints (the last xor-shift, by 31, leaves them)."""
    z.bitwise_xor_(_shr(z, 30)).mul_(_int64(_MIX[0]))
    z.bitwise_xor_(_shr(z, 27)).mul_(_int64(_MIX[1]))
    if top_bits < 33:
        return _shr(z, 64 - top_bits)
    return z.bitwise_xor_(_shr(z, 31))


def stream_keys(seeds: list[int], steps: int, device) -> torch.Tensor:
    """(B, steps) int64: the first `steps` outputs of SplitMix64 seeded with each row's seed (mod 2^64),
    the keys of its steps' noise (`uniforms`)."""
    state = torch.tensor([_int64(int(s)) for s in seeds], device=device)[:, None]
    counter = torch.arange(1, steps + 1, device=device) * _int64(_GAMMA)  # (steps,), wrapping
    return _mix(state + counter)


def uniforms(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B,) step keys -> (B, vocab) float32 uniforms in [2^-24, 1 - 2^-24], token v's from the top 23 bits
    of output v (from 0) of SplitMix64 seeded with its row's key: row i's depend on keys[i] alone."""
    counter = torch.arange(1, vocab + 1, device=keys.device) * _int64(_GAMMA)  # (V,), wrapping
    bits = _mix(keys[:, None] + counter, top_bits=23)  # (B, V) in [0, 2^23)
    return bits.mul_(2).add_(1).float().mul_(2.0**-24)  # odd multiples of 2^-24: exact in float32


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


def pick(logits: torch.Tensor, keys: torch.Tensor | None, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row, (B, V) -> (B,): greedy at temperature 0 (no noise drawn, `keys` unused), else
    Gumbel-max over the nucleus with row i's noise from its step key keys[i] (`stream_keys`)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = nucleus(logits / temperature, top_p)
    exp = uniforms(keys, logits.shape[-1]).log_().neg_()  # (B, V) Exp(1) draws; Gumbel noise = -log(exp)
    return (logits - exp.log_()).argmax(-1)


# ---------------------------------------------------------------------------------------------- sampling


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
    check_every: int | None = None,
) -> Rollout:
    """Sample one response per prompt (module docstring). `model` is a causal LM taking
    (input_ids, attention_mask, cache, use_cache, logits_to_keep) and returning logits, as Kiln's.
    `check_every`: steps between stop checks (None: 1 on CPU, 8 elsewhere); it changes no token."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if len(seeds) != len(prompt_ids):
        raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts: one seed per prompt")
    device = next(model.parameters()).device
    every = check_every or (1 if device.type == "cpu" else 8)
    ids, prompt_mask = left_pad(prompt_ids, pad_id, device)  # (B, P)
    (B, P), R = ids.shape, max_new_tokens
    keys = stream_keys(seeds, R, device) if temperature > 0 else None  # (B, R)
    stops = torch.tensor(stop_ids, device=device)
    mask = torch.zeros(B, P + R, dtype=prompt_mask.dtype, device=device)  # filled in as the rows grow
    mask[:, :P] = prompt_mask
    tokens = torch.full((B, R), pad_id, dtype=ids.dtype, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cache = KVCache(P + R - 1)
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=ids, attention_mask=prompt_mask, cache=cache, use_cache=True, logits_to_keep=1)
        for t in range(R):
            nxt = pick(out.logits[:, -1], None if keys is None else keys[:, t], temperature, top_p)  # (B,)
            nxt = nxt.masked_fill_(done, pad_id)
            tokens[:, t] = nxt
            mask[:, P + t] = ~done  # the stop token itself is real
            done |= torch.isin(nxt, stops)
            if t == R - 1 or ((t + 1) % every == 0 and _all_done(done, synced)):
                break
            out = model(input_ids=nxt[:, None], attention_mask=mask[:, : P + t + 1], cache=cache,
                        use_cache=True, logits_to_keep=1)  # fmt: skip
    finally:
        model.train(was_training)
    n = _used_steps(mask[:, P:], synced)
    return Rollout(torch.cat([ids, tokens[:, :n]], dim=1), mask[:, : P + n].contiguous(), P, done)


def _all_done(done: torch.Tensor, synced: bool) -> bool:
    """Whether every row has stopped, on every rank when synced (one all-reduce per check)."""
    left = (~done).sum()
    if synced:
        import torch.distributed as dist

        dist.all_reduce(left)
    return int(left) == 0


def _used_steps(response_mask: torch.Tensor, synced: bool) -> int:
    """The steps some row used (on some rank, when synced): a row stops for good, so they come first."""
    used = response_mask.any(0).sum()
    if synced:
        import torch.distributed as dist

        dist.all_reduce(used, op=dist.ReduceOp.MAX)
    return int(used)


def response_logits(model, tokens: torch.Tensor, mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits predicting the response tokens tokens[:, P:], (B, R, V), from one forward over a rollout:
    the LM head on the R positions before them only (`logits_to_keep`), not on the prompt's."""
    R = tokens.shape[1] - prompt_len
    return model(input_ids=tokens, attention_mask=mask, logits_to_keep=R + 1).logits[:, :-1]


def rollout_seed(seed: int, it: int, position: int) -> int:
    """The stream seed of the prompt at `position` of iteration `it`'s rollout batch."""
    return (seed * 1_000_003 + it) * 100_003 + position
