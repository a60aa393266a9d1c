"""The PPO sampler of kiln/rl/rollout.py on tiny random models: greedy rollouts equal a hand-written
no-cache decode and `generate`, every step samples from the logits a no-cache forward gives (the
preallocated cache, ragged prompts, any position scheme, dense or MoE), a response depends only on its
prompt, seed and weights (alone, in other batches, in any order), stop tokens end a row (padding and masks
after it), the stop check's schedule changes no token and is the only host read per step, `nucleus`
keeps the smallest top-p set, the counter-based noise is SplitMix64's bits and `pick` draws from the
tempered nucleus distribution with it, and `synced` keeps stepping for other ranks (and needs no
torch.distributed without it).

/work/venv/bin/pytest tests/test_rollout.py -q        # ~20 s on 2 cores
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from kiln.model import KilnForCausalLM
from kiln.rl import rollout
from kiln.rl.rollout import KVCache, left_pad, nucleus, pick, response_logits, sample, stream_keys, uniforms
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


def same_rollout(a, b) -> bool:
    return a.prompt_len == b.prompt_len and all(
        torch.equal(getattr(a, f), getattr(b, f)) for f in ("tokens", "mask", "ended")
    )


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


# --------------------------------------------------------------------------------------------- cache


@pytest.mark.parametrize("position", ["rope", "alibi", "learned"])
@pytest.mark.parametrize("experts", [0, 4], ids=["dense", "moe"])
def test_each_step_samples_from_the_logits_of_a_no_cache_forward(monkeypatch, position, experts):
    """Sampling over ragged prompts, rows stopping at different steps: the logits each step drew from,
    through the preallocated cache, are one no-cache forward's over the finished rollout, at every
    position whose token was real."""
    model = make(position=position, num_experts=experts)
    seen = []

    def recording_pick(logits, keys, temperature, top_p):
        seen.append(logits.clone())
        return pick(logits, keys, temperature, top_p)

    monkeypatch.setattr(rollout, "pick", recording_pick)
    stops = [1, 2, 3, 4, 5, 6, 7, 8]
    r = roll(model, prompts=PROMPTS * 2, seeds=list(range(8)), max_new_tokens=10, stop_ids=stops)
    assert r.ended.any() and not r.ended.all() and len(seen) == r.response.shape[1]
    with torch.no_grad():
        full = model(input_ids=r.tokens, attention_mask=r.mask, use_cache=False).logits  # (B, P + R, V)
    P = r.prompt_len
    for t, logits in enumerate(seen):
        real = r.mask[:, P - 1 + t].bool()  # rows whose step-t logits came from a real token
        assert (logits[real] - full[real, P - 1 + t]).abs().max() <= 1e-5


def test_the_cache_is_written_in_place_and_returns_the_positions_written():
    cache = KVCache(5)
    k = torch.randn(2, 3, 4, 8)
    keys, values = cache.update(k, k + 1, 0)
    assert cache.get_seq_length() == 4 and torch.equal(keys, k) and torch.equal(values, k + 1)
    buffer = cache.layers[0].keys
    assert buffer.shape == (2, 3, 5, 8)  # allocated once, at the first update
    step = torch.randn(2, 3, 1, 8)
    keys, _ = cache.update(step, step, 0)
    assert keys.shape == (2, 3, 5, 8) and keys.data_ptr() == buffer.data_ptr() and cache.get_seq_length() == 5
    assert torch.equal(keys[:, :, :4], k) and torch.equal(keys[:, :, 4:], step)
    with pytest.raises(ValueError, match="KV cache full"):
        cache.update(step, step, 0)


def test_response_logits_are_the_full_forwards_at_the_response_positions():
    model = make()
    r = roll(model, max_new_tokens=6)
    P = r.prompt_len
    with torch.no_grad():
        full = model(input_ids=r.tokens, attention_mask=r.mask).logits[:, P - 1 : -1]
        ours = response_logits(model, r.tokens, r.mask, P)
    assert ours.shape == full.shape == (len(PROMPTS), r.response.shape[1], V)
    assert (ours - full).abs().max() <= 1e-5


# --------------------------------------------------------------------------------------------- seeds


def test_a_response_depends_only_on_its_prompt_seed_and_weights():
    model = make()
    seeds = [11, 22, 33, 44]
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.9, stop_ids=[1])
    torch.manual_seed(0)
    batch = roll(model, seeds=seeds, **kw)
    torch.manual_seed(1)  # the global RNG plays no part
    again = roll(model, seeds=seeds, **kw)
    assert same_rollout(batch, again)

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


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_any_order_of_a_batch_gives_each_prompt_the_same_response(top_p):
    """Each prompt alone, then the batch in several orders (reversed, rotated, interleaved) and twice over:
    every row gets its own response, token for token."""
    model = make(initializer_range=0.05)  # flatter distributions: the noise decides more tokens
    seeds = [rollout.rollout_seed(1234, 3, j) for j in range(len(PROMPTS))]
    kw = dict(max_new_tokens=8, top_p=top_p, stop_ids=[1])
    want = [
        real_response(roll(model, prompts=[p], seeds=[s], **kw), 0)
        for p, s in zip(PROMPTS, seeds, strict=True)
    ]
    assert len({tuple(w) for w in want}) == len(PROMPTS)
    for order in ([3, 2, 1, 0], [1, 2, 3, 0], [2, 0, 3, 1], [0, 1, 2, 3, 3, 2, 1, 0]):
        r = roll(model, prompts=[PROMPTS[i] for i in order], seeds=[seeds[i] for i in order], **kw)
        assert [real_response(r, b) for b in range(len(order))] == [want[i] for i in order]


def test_one_seed_per_prompt_and_at_least_one_new_token():
    model = make()
    with pytest.raises(ValueError, match="one seed per prompt"):
        roll(model, seeds=[0])  # would otherwise broadcast one stream over every row
    with pytest.raises(ValueError, match="max_new_tokens"):
        roll(model, max_new_tokens=0)


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


@pytest.mark.parametrize("every", [2, 3, 5, 100])
def test_checking_for_stops_less_often_changes_no_token(every):
    """The rows of PROMPTS * 4 stop at different steps, all before the 12th: checking every `every`
    steps runs past the last stop, and the rollout is cut back to the same one."""
    model = make(initializer_range=0.02)
    stops = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    kw = dict(prompts=PROMPTS * 4, seeds=list(range(16)), max_new_tokens=40, stop_ids=stops)
    each = roll(model, check_every=1, **kw)
    assert each.ended.all() and each.response.shape[1] < 40  # the batch ended early
    assert same_rollout(roll(model, check_every=every, **kw), each)


def test_no_host_read_per_step_beyond_the_stop_check(monkeypatch):
    """Host reads of device values (`bool`, `int`, `float`, `item`, `tolist`) in one rollout of a batch
    that runs to max_new_tokens: the same number at 3 steps as at 12 with no check in between (the
    prefill's padding test and the final cut), and one per check with `check_every=1`."""
    model = make()
    reads = []
    for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            reads.append(1)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def reads_of(new: int, every: int) -> int:
        reads.clear()
        r = roll(model, max_new_tokens=new, check_every=every, stop_ids=[V])  # outside the vocabulary
        assert r.response.shape[1] == new
        return len(reads)

    few, many = reads_of(3, 100), reads_of(12, 100)
    assert few == many <= 2
    assert reads_of(12, 1) == many + 11  # a check after each step but the last


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
    assert pick(logits, stream_keys([0], 1, "cpu")[:, 0], 1.0, 0.0).tolist() == [1]


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


# --------------------------------------------------------------------------------------------- noise

WORD = (1 << 64) - 1


def splitmix64(state: int) -> tuple[int, int]:
    """SplitMix64 (Steele, Lea & Flood 2014) in Python ints: (next state, output)."""
    state = (state + 0x9E3779B97F4A7C15) & WORD
    z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & WORD
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & WORD
    return state, z ^ (z >> 31)


def test_the_noise_is_splitmix64s_bits():
    """The step keys are SplitMix64's outputs from each seed (the published first output from seed 0
    included), and token v's uniform the top 23 bits of the v-th output from the step's key."""
    assert splitmix64(0)[1] == 0xE220A8397B1DCDAF
    seeds, steps, vocab = [0, 12345, -7, 2**64 + 5, rollout.rollout_seed(1234, -3, 17)], 3, 40
    keys = stream_keys(seeds, steps, "cpu")
    for b, seed in enumerate(seeds):
        state = seed & WORD
        for t in range(steps):
            state, out = splitmix64(state)
            assert keys[b, t].item() & WORD == out
    u = uniforms(keys[:, 1], vocab)
    assert u.dtype == torch.float32 and u.shape == (len(seeds), vocab)
    for b in range(len(seeds)):
        state = keys[b, 1].item() & WORD
        for v in range(vocab):
            state, out = splitmix64(state)
            assert u[b, v].item() == ((out >> 41) * 2 + 1) * 2.0**-24


def test_uniforms_of_a_row_depend_on_its_key_alone_and_look_uniform():
    keys = stream_keys(range(64), 2, "cpu")[:, 1]
    u = uniforms(keys, 5000)  # (64, 5000)
    assert torch.equal(uniforms(keys[[7]], 5000)[0], u[7])
    assert torch.equal(uniforms(keys.flip(0), 5000), u.flip(0))
    assert 2.0**-24 <= u.min() and u.max() <= 1 - 2.0**-24
    assert abs(u.mean().item() - 0.5) < 3e-3 and abs(u.var().item() - 1 / 12) < 1e-3
    counts = torch.histc(u, bins=16, min=0, max=1)  # chi-square, 15 degrees of freedom: 50 is far out
    expected = u.numel() / 16
    assert ((counts - expected) ** 2 / expected).sum() < 50
    for a, b in ((u[:, :-1], u[:, 1:]), (u[:-1], u[1:])):  # neighbouring tokens, neighbouring seeds
        assert torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1].abs() < 0.01


# --------------------------------------------------------------------------------------------- pick


@pytest.mark.parametrize(
    ("temperature", "top_p"), [(1.0, 1.0), (1.0, 0.75), (2.0, 0.75), (0.5, 1.0), (2.0, 1.0), (0.5, 0.9)]
)
def test_pick_draws_from_the_tempered_nucleus_distribution(temperature, top_p):
    n = 20000
    base = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = base.log().expand(n, 4)
    keys = stream_keys(range(n), 1, "cpu")[:, 0]  # n seeds: n independent draws
    drawn = pick(logits, keys, temperature, top_p)
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


def test_pick_at_temperature_zero_is_argmax_and_draws_no_noise(monkeypatch):
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    monkeypatch.setattr(rollout, "uniforms", None)  # any draw would fail
    assert pick(logits, None, 0.0, 0.5).tolist() == [1, 0]


def test_pick_row_i_uses_key_i():
    logits = torch.zeros(2, V)  # uniform: the draw is the noise's argmax
    keys = stream_keys([1, 2], 1, "cpu")[:, 0]
    a = pick(logits, keys, 1.0, 1.0)
    b = pick(logits[:1], keys[1:], 1.0, 1.0)
    c = pick(logits[:1], keys[:1], 1.0, 1.0)
    assert a.tolist() == [int(c), int(b)]


# --------------------------------------------------------------------------------------------- synced


def test_unsynced_sampling_needs_no_process_group(monkeypatch):
    assert not dist.is_initialized()

    def no_collective(*args, **kwargs):
        raise AssertionError("a collective call with synced=False")

    monkeypatch.setattr(dist, "all_reduce", no_collective)
    r = roll(make(), synced=False)
    assert r.response.shape[0] == len(PROMPTS)


def fake_other_rank(monkeypatch, every: int, steps: int):
    """A (faked) other rank whose rows stay open for `steps` steps: each stop check (a sum of open rows
    after step `every` * its number) adds its open row; the final cut (a max) its `steps` columns.
    Returns the values this rank contributed: (checks, cuts)."""
    checks, cuts = [], []

    def all_reduce(t, op=dist.ReduceOp.SUM, **kwargs):
        if op == dist.ReduceOp.MAX:
            cuts.append(int(t))
            t.clamp_(min=steps)
        else:
            checks.append(int(t))
            t += 1 if every * len(checks) < steps else 0

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    return checks, cuts


@pytest.mark.parametrize("every", [1, 2])
def test_synced_sampling_keeps_stepping_while_another_rank_has_rows(monkeypatch, every):
    """Every local row stops at once; another rank stays open for 4 steps, so this rank keeps feeding
    pad tokens through the model (ZeRO-3 needs the same number of forwards on every rank) until a
    check finds all done, and returns the other rank's 4 columns."""
    model = make()
    firsts = [greedy_by_hand(model, p, 1)[0] for p in PROMPTS]
    checks, cuts = fake_other_rank(monkeypatch, every, steps=4)
    forwards = []
    model.register_forward_hook(lambda *a: forwards.append(1))
    r = roll(model, temperature=0.0, max_new_tokens=8, stop_ids=firsts, synced=True, check_every=every)
    assert checks == [0] * (4 // every)  # this rank reports no open rows from the first step on
    assert cuts == [1]  # its rows used 1 step
    assert len(forwards) == 1 + 3  # the prefill, then a step after each of the first 3 samples
    assert r.response.shape[1] == 4 and r.ended.all()
    assert r.response[:, 1:].eq(PAD).all() and r.response_mask.tolist() == [[1, 0, 0, 0]] * len(PROMPTS)
