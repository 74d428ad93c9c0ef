"""The RG-LRU's gate math (Griffin section 2.4): everything between the two gate
projections and the scan, as one function beside its reference.

    gate_x = sigmoid(gate_x_logits),  gate_a = sigmoid(gate_a_logits)
    log_a = -8 * gate_a * softplus(a_param)
    a = exp(log_a),  multiplier = sqrt(1 - exp(2 log_a))
    normed_x = x * gate_x * multiplier

At a document start (segment_pos == 0) a = 0 and the multiplier is 1 (the state
resets to the gated input); at padding (`pad`) a = 1 and the multiplier 0 (the state
passes through unchanged). Everything is float32 whatever the inputs' dtype; the
results (`a`, `normed_x`) are the scan's inputs (`h_t = a_t * h_{t-1} + normed_x_t`).

| implementation | what |
| --- | --- |
| `rglru_gates_ref` | the specification: one torch op per formula term (about 14 passes over (b, t, e) float32, each into a fresh tensor) |
| `rglru_gates_fused` | the same ops in the same order, written in place into two preallocated outputs, over blocks of rows small enough to stay in the core's cache (on CPU) |

The fused function computes every element with the same float32 operations in the
same order as the reference, so its results are bitwise equal; under autograd (an
input that requires grad) it runs the reference, whose `sqrt` has the bounded
derivative (`SqrtBoundDerivative`). Official counterpart: `layers.RGLRU.__call__`
(recurrentgemma.torch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["SqrtBoundDerivative", "rglru_gates_fused", "rglru_gates_ref"]

#: Rows (b * t positions) per block of `rglru_gates_fused` on CPU: 64 rows of the 2B
#: model's 2,560 channels are 640 KiB per float32 tensor, so the block's working set
#: stays in a core's L2 cache for all its passes (chosen with
#: benchmarks/cpu_kernels.py: 32-256 rows were within a few % on AMD Zen 4).
BLOCK_ELEMENTS = 64 * 2560

#: Fewer rows than this run `rglru_gates_ref`: at 1 row (a batch-1 decode step) the
#: fused path's fixed cost made it 0.8x the reference; from 8 rows it is faster
#: (1.1-1.2x at 8, 2.6-3.4x at 64, 2.5-6x at 1,024; benchmarks/cpu_kernels.py).
MIN_ROWS = 4


class SqrtBoundDerivative(torch.autograd.Function):
    """sqrt(x) whose derivative is clipped at 1000 (Griffin section 2.4: keeps the
    gradient of sqrt(1 - a^2) bounded as a -> 1). Official: `SqrtBoundDerivative`."""

    MAX_GRAD = 1000.0

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.sqrt(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        # d sqrt(x) / dx = 1 / sqrt(4x); clipping 4x below at 1/1000^2 caps it at 1000.
        return grad / torch.sqrt(torch.clamp(4.0 * x, min=SqrtBoundDerivative.MAX_GRAD**-2))


def _sigmoid_into(src: Tensor, out: Tensor) -> Tensor:
    """out = sigmoid(float32(src)) in the float32 `out` (src upcast first, as the
    reference does, so a bfloat16 input gives the same float32 values)."""
    if src.dtype == torch.float32:
        return torch.sigmoid(src, out=out)
    return out.copy_(src).sigmoid_()


def rglru_gates_ref(
    x: Tensor,
    gate_x: Tensor,
    gate_a: Tensor,
    a_param: Tensor,
    segment_pos: Tensor,
    pad: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The RG-LRU's decay and gated input, one op per term (the specification).

    Args:
        x: (b, t, e) the RG-LRU's input (the Conv1D's output), any float dtype.
        gate_x: (b, t, e) the input gate's pre-activation (`input_gate(x)`).
        gate_a: (b, t, e) the recurrence gate's pre-activation (`a_gate(x)`).
        a_param: (e,) the learnt decay parameter (`RGLRU.a_param`).
        segment_pos: (b, t) int, each token's position in its document (0 resets).
        pad: None, or (b, t) bool, True at padding (the state passes through).

    Returns:
        (a, normed_x): both (b, t, e) float32: the scan's decay and input.
    """
    gx = torch.sigmoid(gate_x.float())
    ga = torch.sigmoid(gate_a.float())
    log_a = -8.0 * ga * F.softplus(a_param.float())
    a = torch.exp(log_a)
    one_minus_a2 = 1.0 - torch.exp(2.0 * log_a)
    if torch.is_grad_enabled():
        multiplier = SqrtBoundDerivative.apply(one_minus_a2)
    else:  # same forward value, without the autograd.Function overhead
        multiplier = torch.sqrt(one_minus_a2)
    reset = (segment_pos == 0).unsqueeze(-1)  # (b, t, 1)
    a = a.masked_fill(reset, 0.0)
    multiplier = multiplier.masked_fill(reset, 1.0)
    if pad is not None:  # h_t = 1 * h_{t-1} + 0: padding leaves the state as it was
        a = a.masked_fill(pad[..., None], 1.0)
        multiplier = multiplier.masked_fill(pad[..., None], 0.0)
    normed_x = x.float() * gx * multiplier
    return a, normed_x


def rglru_gates_fused(
    x: Tensor,
    gate_x: Tensor,
    gate_a: Tensor,
    a_param: Tensor,
    segment_pos: Tensor,
    pad: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`rglru_gates_ref` in place, over cache-sized blocks of rows; bitwise equal.

    Arguments and results as `rglru_gates_ref`. Per block of rows: `a` is built in
    its output (copy, sigmoid, times -8 softplus(a_param), exp), the multiplier in a
    block-sized scratch (2 log_a, exp, 1 - ., sqrt), the masks are written in place,
    and `normed_x` is built in its output (copy, sigmoid, times x, times the
    multiplier): the same float32 operations in the reference's order, with 2 output
    allocations instead of about 14. Under autograd (any input requiring grad) it
    runs `rglru_gates_ref`.
    """
    b, t, e = x.shape
    n = b * t
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate_x, gate_a, a_param))
    # Under autograd the reference (its bounded sqrt derivative); under a compiler the
    # reference too (the compiler fuses it, and nonzero() below would break the
    # graph); below MIN_ROWS rows (a small decode step) the reference's fewer calls
    # cost less than this path's fixed overhead.
    if grad or n < MIN_ROWS or torch.compiler.is_compiling():
        return rglru_gates_ref(x, gate_x, gate_a, a_param, segment_pos, pad)
    f32 = torch.float32
    minus_8_softplus = F.softplus(a_param.float()).mul_(-8.0)  # (e,): -8 * softplus
    one = torch.ones((), dtype=f32, device=x.device)
    a = torch.empty(b, t, e, dtype=f32, device=x.device)
    normed_x = torch.empty(b, t, e, dtype=f32, device=x.device)
    a2, n2 = a.view(n, e), normed_x.view(n, e)  # (b * t, e)
    x2, gx2, ga2 = (v.reshape(n, e) for v in (x, gate_x, gate_a))
    rows = n if not x.is_cpu else max(1, BLOCK_ELEMENTS // max(e, 1))
    mult = torch.empty(min(rows, n), e, dtype=f32, device=x.device)
    for i in range(0, n, rows):
        j = min(i + rows, n)
        ab, nb, mb = a2[i:j], n2[i:j], mult[: j - i]
        _sigmoid_into(ga2[i:j], ab).mul_(minus_8_softplus)  # log_a
        torch.sub(one, torch.mul(ab, 2.0, out=mb).exp_(), out=mb).sqrt_()  # sqrt(1 - a^2)
        ab.exp_()  # a
        _sigmoid_into(gx2[i:j], nb).mul_(x2[i:j]).mul_(mb)
    # Document starts and padding are rare rows: set them apart instead of masking
    # every block. A start: a = 0, multiplier 1 (x * gate_x, as the reference's
    # (x * gate_x) * 1.0); padding (after, so it wins as in the reference): a = 1,
    # multiplier 0.
    starts = (segment_pos == 0).reshape(n).nonzero().squeeze(1)
    if starts.numel():
        a2[starts] = 0.0
        n2[starts] = x2[starts].float() * torch.sigmoid(gx2[starts].float())
    if pad is not None:
        padded = pad.reshape(n).nonzero().squeeze(1)
        if padded.numel():
            a2[padded] = 1.0
            n2[padded] = 0.0
    return a, normed_x
