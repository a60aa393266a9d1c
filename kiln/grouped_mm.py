"""One grouped matmul for every expert of a MoE layer, in every precision, on every device, compilable.

    y = grouped_mm(xs, w.transpose(1, 2), offs)   # xs (S, K) rows sorted by group, w (E, N, K), offs (E,) -> (S, N)

Rows offs[g-1]:offs[g] of `xs` are multiplied by the g-th matrix (offs: int32 running ends, offs[-1] = S;
an empty group is allowed). The second form, grouped over the shared dimension, is the weight gradient:

    dw = grouped_mm(xs.t(), dy, offs)             # (K, S) x (S, N) -> (E, K, N), group g summing its rows

Why an op of our own around `torch.nn.functional.grouped_mm`:
- The kernel exists for fp32 and bf16 on CPU and bf16 on CUDA from Hopper (sm90) on; fp16, older GPUs and
  strides that are not 16-byte multiples have none. There the op loops over the groups with one host read
  of `offs`: correct everywhere, fast where the kernel is.
- torch.compile's shape function for `aten._grouped_mm` accepts bf16 only, so an fp32 model could not be
  compiled with it. Behind this op the compiler sees one opaque call with a known output shape, whatever
  the dtype, and no graph break.
- The kernel's backward rejects an expanded (stride 0) gradient; ours makes it contiguous first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def has_kernel(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `F.grouped_mm` runs these operands (else the op loops over the groups)."""
    if not hasattr(F, "grouped_mm") or a.dtype != b.dtype:
        return False
    if a.device.type == "cpu":
        ok = a.dtype in (torch.float32, torch.bfloat16)
    elif a.device.type == "cuda":
        ok = a.dtype == torch.bfloat16 and torch.cuda.get_device_capability(a.device) >= (9, 0)
    else:
        ok = False
    size = a.element_size()
    return ok and all(
        t.data_ptr() % 16 == 0 and all(s == 1 or (s * size) % 16 == 0 for s in t.stride()) for t in (a, b)
    )


def _loop(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    ends = offs.tolist()  # the one host read of the fallback
    spans = list(zip([0, *ends[:-1]], ends, strict=True))
    if b.dim() == 3:  # (S, K) x (E, K, N) -> (S, N)
        return torch.cat([a[s:e] @ b[g] for g, (s, e) in enumerate(spans)])
    return torch.stack([a[:, s:e] @ b[s:e] for s, e in spans])  # (K, S) x (S, N) -> (E, K, N)


@torch.library.custom_op("kiln::grouped_mm", mutates_args=())
def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """(S, K) x (E, K, N) -> (S, N), or (K, S) x (S, N) -> (E, K, N); groups given by `offs` (module doc)."""
    if has_kernel(a, b):
        return F.grouped_mm(a, b, offs=offs)
    return _loop(a, b, offs)


@grouped_mm.register_fake
def _(a, b, offs):
    if b.dim() == 3:
        return a.new_empty(a.shape[0], b.shape[2])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[1])


def _setup(ctx, inputs, output):
    a, b, offs = inputs
    ctx.save_for_backward(a, b, offs)


def _backward(ctx, grad):
    a, b, offs = ctx.saved_tensors
    if b.dim() != 3:
        raise NotImplementedError("kiln::grouped_mm: no gradient for the grouped-over-rows form")
    grad = grad.contiguous()
    da = grouped_mm(grad, b.transpose(1, 2), offs) if ctx.needs_input_grad[0] else None  # (S, K)
    db = grouped_mm(a.t(), grad, offs) if ctx.needs_input_grad[1] else None  # (E, K, N)
    return da, db, None


grouped_mm.register_autograd(_backward, setup_context=_setup)
