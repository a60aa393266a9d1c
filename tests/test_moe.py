"""The MoE layer's experts: one grouped matmul in every precision, a compilable dropless block, and checkpoints
that keep each expert apart on disk while the model stacks them."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open

from kiln.grouped_mm import grouped_mm, has_kernel
from kiln.model import KilnForCausalLM, KilnModel
from tests.tiny_models import V, tiny

torch.set_num_threads(2)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def expert_loop(xs, w, counts):
    """What the grouped matmul means: each expert's rows times its own matrix, in a Python loop."""
    return torch.cat([rows @ w[e].t() for e, rows in enumerate(xs.split(counts))])


def check_grouped_mm(dtype, device, kernel: bool, K: int = 32):
    """Forward and both gradients of `grouped_mm` against the loop over experts (an empty expert included)."""
    g = torch.Generator().manual_seed(0)
    counts = [10, 0, 30, 24]
    w = (
        torch.randn(4, 48, K, generator=g).to(device, dtype).requires_grad_()
    )  # (E, out, in), nn.Linear's layout
    xs = torch.randn(sum(counts), K, generator=g).to(device, dtype).requires_grad_()
    offs = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
    assert has_kernel(xs, w.transpose(1, 2)) == kernel
    y = grouped_mm(xs, w.transpose(1, 2), offs)
    want = expert_loop(xs, w, counts)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    scale = want.float().abs().max()
    assert (y.float() - want.float()).abs().max() <= tol * scale
    got = torch.autograd.grad(y.float().square().sum(), (xs, w))
    ref = torch.autograd.grad(want.float().square().sum(), (xs, w))
    for a, b in zip(got, ref, strict=True):
        assert (a.float() - b.float()).abs().max() <= tol * b.float().abs().max()
    assert got[1][1].abs().max() == 0  # the expert that got no rows gets no gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grouped_matmul_equals_the_expert_loop_on_cpu(dtype):
    check_grouped_mm(dtype, "cpu", kernel=True)


@pytest.mark.parametrize(
    "dtype,K", [(torch.float16, 32), (torch.bfloat16, 12)], ids=["fp16-no-kernel", "bf16-unaligned"]
)
def test_grouped_matmul_falls_back_to_the_loop_where_the_kernel_is_missing(dtype, K):
    """fp16 has no grouped kernel; 12 bf16 columns are 24-byte rows, not the 16-byte multiple it needs."""
    check_grouped_mm(dtype, "cpu", kernel=False, K=K)


@cuda
def test_cuda_grouped_matmul_equals_the_expert_loop():
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the grouped bf16 kernel needs sm90")
    check_grouped_mm(torch.bfloat16, "cuda", kernel=True)


def moe_block(capacity_factor=None):
    torch.manual_seed(0)
    model = KilnModel(
        tiny(num_experts=4, num_experts_per_tok=2, moe_every=1, capacity_factor=capacity_factor)
    )
    return model.layers[0]


def test_compiled_dropless_block_has_no_graph_break_and_equals_eager():
    """fullgraph=True fails on any graph break, and a host read (`.tolist()`, `.item()`, a data-dependent
    shape) is one: compiling proves the dropless block never waits for the host."""
    torch._dynamo.reset()
    block = moe_block()
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    mask = torch.ones(32)

    def run(fn):
        out, (logits, aux, z, load, dropped) = fn(x, None, None, None, mask, True)
        loss = out.square().mean() + aux + z
        return out, aux, load, dropped, torch.autograd.grad(loss, (x, *block.parameters()))

    eager = run(block)
    compiled = run(torch.compile(block, fullgraph=True))
    for a, b in zip(eager[:4], compiled[:4], strict=True):
        assert (a - b).abs().max() <= 1e-5
    for a, b in zip(eager[4], compiled[4], strict=True):
        assert (a - b).abs().max() <= 1e-5
    assert compiled[3].item() == 0.0  # dropless


def test_a_capacity_limit_breaks_the_graph_at_one_place_only():
    """With a capacity the kept assignments are a data-dependent number: `dispatch`'s selection of them is the
    one place the graph breaks (dynamo reports it once per enclosing frame: block, layer, dispatch)."""
    torch._dynamo.reset()
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))
    dropless = torch._dynamo.explain(moe_block())(x, None, None, None, None, True)
    capped = torch._dynamo.explain(moe_block(capacity_factor=1.0))(x, None, None, None, None, True)
    assert dropless.graph_break_count == 0
    places = {(f.name, f.line) for b in capped.break_reasons for f in b.user_stack[-1:]}
    assert len(places) == 1, places
    ((function, line),) = places
    assert function == "dispatch" and line.startswith("kept = order[rank < capacity]")


def test_checkpoints_keep_each_expert_apart_and_load_stacked(tmp_path):
    """On disk, `experts.{e}.up_proj.weight` per expert (what Kiln wrote before it stacked them, and what
    Mixtral and Qwen-MoE files hold); in memory, `experts.up_proj` (E, F, C); a save/load keeps every value."""
    torch.manual_seed(0)
    model = KilnForCausalLM(tiny(num_experts=3, moe_every=2, bias=True))
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.1.ffn.experts.2.up_proj.weight").shape == (48, 32)
    layer = "model.layers.1.ffn.experts"
    per_expert = {f"{layer}.{e}.{p}.{k}" for e in range(3) for p in ("gate_proj", "up_proj", "down_proj")
                  for k in ("weight", "bias")}  # fmt: skip
    assert per_expert <= keys and not any(k.startswith(f"{layer}.up_proj") for k in keys)
    loaded = KilnForCausalLM.from_pretrained(tmp_path)
    assert loaded.model.layers[1].ffn.experts.up_proj.shape == (3, 48, 32)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    x = torch.randint(2, V, (2, 9), generator=torch.Generator().manual_seed(2))
    assert torch.equal(model.eval()(x).logits, loaded(x).logits)
    index = json.loads((tmp_path / "config.json").read_text())
    assert index["num_experts"] == 3


@pytest.mark.parametrize(
    "overrides,digest",
    [
        (dict(num_experts=3, moe_every=1, bias=True), "1dcefb8be1865e65"),
        (dict(num_experts=4, moe_every=2, activation="gelu"), "14d41a7a617146cb"),
    ],
)
def test_a_seed_gives_the_weights_it_gave_when_each_expert_was_its_own_layers(tmp_path, overrides, digest):
    """Digests of every saved tensor (name and bytes, in name order) of the model seed 7 built when each expert
    was an MLP of nn.Linear layers: stacking the experts changed no draw, so no run's results moved."""
    torch.manual_seed(7)
    KilnForCausalLM(tiny(**overrides)).save_pretrained(tmp_path)
    h = hashlib.sha256()
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        for k in sorted(f.keys()):
            h.update(k.encode())
            h.update(f.get_tensor(k).numpy().tobytes())
    assert h.hexdigest()[:16] == digest


def test_stacked_expert_biases_get_no_weight_decay():
    """AdamW decays matrices, not biases or norms: a stacked expert bias (experts, out) is 2-d yet a bias."""
    from kiln.training import adamw

    model = KilnForCausalLM(tiny(num_experts=3, moe_every=1, bias=True))
    opt = adamw(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert "model.layers.0.ffn.experts.up_proj" in names and "model.layers.0.attn.q_proj.weight" in names
    assert not {n for n in names if "bias" in n or "norm" in n}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
