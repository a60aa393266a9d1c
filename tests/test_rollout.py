"""The PPO sampler of kiln/rl/rollout.py on tiny random models: greedy rollouts equal a hand-written
no-cache decode and `generate`, a response depends only on its prompt, seed and weights, stop tokens
end a row (padding and masks after it), `nucleus` keeps the smallest top-p set, `pick` draws from the
tempered nucleus distribution, and `synced=False` needs no torch.distributed.

/work/venv/bin/pytest tests/test_rollout.py -q        # a few seconds on 2 cores
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from kiln.model import KilnForCausalLM
from kiln.rl.rollout import left_pad, nucleus, pick, sample
from tests.tiny_models import V, tiny

PAD = 0
torch.set_num_threads(2)

PROMPTS = [[5, 17, 42, 8, 91, 33, 60], [12, 70, 3], [44, 2, 19, 88, 27], [65]]  # lengths 7, 3, 5, 1


def make(seed: int = 0, **overrides) -> KilnForCausalLM:
    torch.manual_seed(seed)
    return KilnForCausalLM(tiny(pad_token_id=PAD, **overrides)).eval()


def roll(model, prompts=PROMPTS, **kw):
    args = dict(seeds=list(range(len(prompts))), max_new_tokens=8, temperature=1.0, top_p=1.0, stop_ids=[1])
    return sample(model, prompts, pad_id=PAD, **{**args, **kw})


@torch.no_grad()
def greedy_by_hand(model, prompt: list[int], max_new: int, stops=()) -> list[int]:
    """Full forward over the unpadded sequence at every step (no cache), argmax of the last position."""
    ids = list(prompt)
    out = []
    for _ in range(max_new):
        logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1]
        nxt = int(logits.argmax())
        out.append(nxt)
        ids.append(nxt)
        if nxt in stops:
            break
    return out


def real_response(r, b: int) -> list[int]:
    """Row b's response tokens under its response mask."""
    return r.response[b][r.response_mask[b].bool()].tolist()


def unused_token(seqs: list[list[int]]) -> int:
    """A token id (not pad) that none of the sequences contains: a stop id that never fires."""
    used = {t for s in seqs for t in s}
    return next(t for t in range(2, V) if t not in used)


# --------------------------------------------------------------------------------------------- left_pad


def test_left_pad_pads_on_the_left_and_masks_the_padding():
    ids, mask = left_pad([[7, 8, 9], [4]], pad_id=PAD, device="cpu")
    assert ids.tolist() == [[7, 8, 9], [PAD, PAD, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


# --------------------------------------------------------------------------------------------- greedy


def test_greedy_rollout_equals_a_no_cache_decode_of_each_prompt_alone():
    model = make()
    new = 10
    by_hand = [greedy_by_hand(model, p, new) for p in PROMPTS]
    never = unused_token(by_hand)
    r = roll(model, temperature=0.0, max_new_tokens=new, stop_ids=[never])

    P = max(map(len, PROMPTS))
    assert r.prompt_len == P and r.tokens.shape == (len(PROMPTS), P + new)
    ids, mask = left_pad(PROMPTS, PAD, "cpu")
    assert torch.equal(r.tokens[:, :P], ids) and torch.equal(r.mask[:, :P], mask)
    assert r.response.tolist() == by_hand  # cache, left padding and positions change nothing
    assert r.response_mask.eq(1).all() and not r.ended.any()
    assert len({tuple(s) for s in by_hand}) == len(PROMPTS)  # the prompts do lead to different responses


def test_greedy_rollout_with_stops_equals_generate():
    model = make()
    new = 10
    free = [greedy_by_hand(model, p, new) for p in PROMPTS]
    # A stop id that row 0 emits and row 1 never does, so the batch holds an ended and an open row.
    stop = next(t for t in free[0] if t not in free[1])
    stops = [stop, unused_token(free)]
    r = roll(model, temperature=0.0, max_new_tokens=new, stop_ids=stops)
    ids, mask = left_pad(PROMPTS, PAD, "cpu")
    with torch.no_grad():
        hf = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=PAD,
        )
    assert torch.equal(r.tokens, hf)
    for b, p in enumerate(PROMPTS):
        assert real_response(r, b) == greedy_by_hand(model, p, new, stops)
    assert r.ended[0] and not r.ended[1]


# --------------------------------------------------------------------------------------------- seeds


def test_a_response_depends_only_on_its_prompt_seed_and_weights():
    model = make()
    seeds = [11, 22, 33, 44]
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.9, stop_ids=[1])
    torch.manual_seed(0)
    batch = roll(model, seeds=seeds, **kw)
    torch.manual_seed(1)  # the global RNG plays no part
    again = roll(model, seeds=seeds, **kw)
    for field in ("tokens", "mask", "ended"):
        assert torch.equal(getattr(batch, field), getattr(again, field))

    for b, (p, s) in enumerate(zip(PROMPTS, seeds, strict=True)):
        alone = roll(model, prompts=[p], seeds=[s], **kw)
        assert real_response(alone, 0) == real_response(batch, b)
        assert bool(alone.ended[0]) == bool(batch.ended[b])
    # Another batch around prompt 2 (other neighbours, other order, other padding width): same response.
    other = roll(model, prompts=[PROMPTS[3], PROMPTS[2], [9] * 12], seeds=[5, seeds[2], 6], **kw)
    assert real_response(other, 1) == real_response(batch, 2)

    # Other seeds give other responses.
    responses = {
        tuple(real_response(roll(model, prompts=[PROMPTS[0]], seeds=[s], **kw), 0)) for s in range(6)
    }
    assert len(responses) > 1


def test_sampling_runs_in_eval_mode_and_restores_training_mode():
    model = make(dropout=0.5).train()  # dropout would make every call differ
    a = roll(model, seeds=[3, 4, 5, 6])
    b = roll(model, seeds=[3, 4, 5, 6])
    assert torch.equal(a.tokens, b.tokens)
    assert model.training


# --------------------------------------------------------------------------------------------- stops


def check_stop_layout(r, stops: list[int]) -> None:
    """After a row's first stop token: pad with mask 0; the stop token itself has mask 1;
    `ended` exactly for rows with a stop token; open rows are masked 1 throughout."""
    R = r.response.shape[1]
    for b in range(r.response.shape[0]):
        row, m = r.response[b].tolist(), r.response_mask[b].tolist()
        at = next((i for i, t in enumerate(row) if t in stops), None)
        assert bool(r.ended[b]) == (at is not None)
        if at is None:
            assert m == [1] * R
        else:
            assert m == [1] * (at + 1) + [0] * (R - at - 1)
            assert row[at + 1 :] == [PAD] * (R - at - 1)


def test_a_stop_token_ends_its_row_and_later_tokens_are_masked_pad():
    model = make()
    new = 8
    free = [greedy_by_hand(model, p, new) for p in PROMPTS]
    stop = free[0][1]  # row 0 stops at its second token (or earlier, if the first is the same)
    stops = [stop]
    r = roll(model, temperature=0.0, max_new_tokens=new, stop_ids=stops)
    check_stop_layout(r, stops)
    for b in range(len(PROMPTS)):  # each row is its free greedy decode cut after its first stop
        at = next((i for i, t in enumerate(free[b]) if t in stops), None)
        assert real_response(r, b) == (free[b] if at is None else free[b][: at + 1])
        assert bool(r.ended[b]) == (at is not None)
    assert r.ended[0] and r.response_mask[0, -1] == 0
    open_rows = [b for b in range(len(PROMPTS)) if not r.ended[b]]
    assert open_rows, "pick a stop id some row never emits"
    assert r.response.shape[1] == new  # an open row keeps all max_new_tokens tokens
    for b in open_rows:
        assert r.response_mask[b].tolist() == [1] * new


def test_a_batch_where_every_row_stops_ends_early():
    model = make()
    firsts = [greedy_by_hand(model, p, 1)[0] for p in PROMPTS]
    r = roll(model, temperature=0.0, max_new_tokens=8, stop_ids=firsts)
    assert r.response.shape[1] == 1 and r.ended.all() and r.response[:, 0].tolist() == firsts
    assert r.response_mask.eq(1).all()


def test_stop_layout_holds_for_sampled_rows():
    model = make(initializer_range=0.02)  # flat distributions: many different tokens get drawn
    stops = [1, 2, 3, 4, 5, 6]
    r = roll(model, prompts=PROMPTS * 4, seeds=list(range(16)), max_new_tokens=12, stop_ids=stops)
    check_stop_layout(r, stops)
    assert r.ended.any() and not r.ended.all()  # both kinds of rows were checked


# --------------------------------------------------------------------------------------------- nucleus


def kept(logits: torch.Tensor, top_p: float) -> list[bool]:
    return torch.isfinite(nucleus(logits, top_p))[0].tolist()


def test_nucleus_keeps_the_smallest_set_that_reaches_top_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert kept(logits, 0.7) == [True, True, False, False]
    assert kept(logits, 0.8) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    assert kept(logits, 0.81) == [True, True, True, False]
    assert kept(logits, 0.96) == [True, True, True, True]
    assert kept(logits, 1e-6) == [True, False, False, False]  # the argmax always stays
    exact = torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625]]).log()  # binary fractions: exact sums
    assert kept(exact, 0.5) == [True, False, False, False, False]
    assert kept(exact, 0.75) == [True, True, False, False, False]
    assert kept(exact, 0.875) == [True, True, True, False, False]


def test_nucleus_keeps_the_argmax_even_at_top_p_zero():
    """The docstring's promise "the most likely token always stays" at top_p=0 (the config rejects 0,
    but callers of `nucleus` / `pick` do not go through it): the argmax must stay, and `pick` must not
    answer token 0 whatever the logits."""
    logits = torch.tensor([[0.1, 3.0, 0.2]])
    assert kept(logits, 0.0) == [False, True, False]
    assert pick(logits, [torch.Generator().manual_seed(0)], 1.0, 0.0).tolist() == [1]


def test_nucleus_works_per_row_in_any_token_order_and_keeps_kept_logits():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.3, 0.15, 0.05, 0.5]])
    logits = probs.log() + torch.tensor([[3.0], [-2.0]])  # a per-row shift changes no probability
    out = nucleus(logits, 0.7)
    assert torch.isfinite(out).tolist() == [[False, True, False, True], [True, False, False, True]]
    assert torch.equal(out[torch.isfinite(out)], logits[torch.isfinite(out)])
    assert torch.isneginf(out[~torch.isfinite(out)]).all()


def test_nucleus_at_top_p_one_returns_the_logits_unchanged():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    assert torch.equal(nucleus(logits, 1.0), logits)


# --------------------------------------------------------------------------------------------- pick


@pytest.mark.parametrize(
    ("temperature", "top_p"), [(1.0, 1.0), (1.0, 0.75), (2.0, 0.75), (0.5, 1.0), (2.0, 1.0), (0.5, 0.9)]
)
def test_pick_draws_from_the_tempered_nucleus_distribution(temperature, top_p):
    n = 20000
    base = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = base.log().expand(n, 4)
    gen = torch.Generator().manual_seed(1234)
    drawn = pick(logits, [gen] * n, temperature, top_p)  # one generator: n independent draws
    freq = torch.bincount(drawn, minlength=4).double() / n

    # The nucleus is taken after the temperature: at top_p 0.75, two tokens at T=1 and three at T=2.
    # (top_p away from any cumulative sum, so float rounding cannot move the boundary.)
    p = (base.double().log() / temperature).softmax(-1)
    order = p.argsort(descending=True)
    before = p[order].cumsum(0) - p[order]
    inside = torch.zeros(4, dtype=torch.bool)
    inside[order[before < top_p]] = True
    expected = torch.where(inside, p, 0.0)
    expected = expected / expected.sum()

    assert (freq[~inside] == 0).all()  # tokens outside the nucleus are never drawn
    bound = 5 * (expected * (1 - expected) / n).sqrt()  # 5 standard errors of a frequency
    assert ((freq - expected).abs() <= bound).all(), (freq, expected, bound)


def test_pick_at_temperature_zero_is_argmax_and_draws_no_noise():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    states = [g.get_state() for g in gens]
    assert pick(logits, gens, 0.0, 0.5).tolist() == [1, 0]
    assert all(torch.equal(g.get_state(), s) for g, s in zip(gens, states, strict=True))


def test_pick_row_i_uses_generator_i():
    logits = torch.zeros(2, V)  # uniform: the draw is the noise's argmax
    a = pick(logits, [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)], 1.0, 1.0)
    b = pick(logits[:1], [torch.Generator().manual_seed(2)], 1.0, 1.0)
    c = pick(logits[:1], [torch.Generator().manual_seed(1)], 1.0, 1.0)
    assert a.tolist() == [int(c), int(b)]


# --------------------------------------------------------------------------------------------- synced


def test_unsynced_sampling_needs_no_process_group(monkeypatch):
    assert not dist.is_initialized()

    def no_collective(*args, **kwargs):
        raise AssertionError("a collective call with synced=False")

    monkeypatch.setattr(dist, "all_reduce", no_collective)
    r = roll(make(), synced=False)
    assert r.response.shape[0] == len(PROMPTS)


def test_synced_sampling_keeps_stepping_while_another_rank_has_rows(monkeypatch):
    """Every local row stops at once; a (faked) other rank stays open for 3 more steps, so this rank
    keeps feeding pad tokens through the model (ZeRO-3 needs the same number of forwards on every rank)."""
    model = make()
    firsts = [greedy_by_hand(model, p, 1)[0] for p in PROMPTS]
    calls = []

    def all_reduce(t, *args, **kwargs):
        calls.append(int(t))
        t += 1 if len(calls) <= 3 else 0  # the other rank's open rows

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    forwards = []
    model.register_forward_hook(lambda *a: forwards.append(1))
    r = roll(model, temperature=0.0, max_new_tokens=8, stop_ids=firsts, synced=True)
    assert calls == [0, 0, 0, 0]  # this rank reports no open rows from the first step on
    assert len(forwards) == 1 + 3  # the prefill, then one step per call that still found open rows
    assert r.response.shape[1] == 4 and r.ended.all()
    assert r.response[:, 1:].eq(PAD).all() and r.response_mask.tolist() == [[1, 0, 0, 0]] * len(PROMPTS)
