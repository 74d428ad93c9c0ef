"""`ops.rglru_gates`: the fused gate math equals its reference without autograd (the
path prefill runs), over several cache blocks with ragged tails, document starts,
padding, float32 and bfloat16 inputs; under autograd it is the reference (its
gradients are checked with every op in test_ops.py); and the RG-LRU layer gives the
same output whichever implementation runs."""

import pytest
import torch

from rgemma import ops
from rgemma.model import RGLRU
from rgemma.ops import rglru

DTYPES = [torch.float32, torch.bfloat16]


def inputs(b, t, e, dtype, seed=0, starts=(), padded=()):
    """(x, gate_x, gate_a, a_param, segment_pos, pad) with documents starting at the
    (row, time) pairs `starts` and padding at `padded`; pad is None without padding."""
    g = torch.Generator().manual_seed(seed)
    x, gate_x, gate_a = (torch.randn(b, t, e, generator=g).to(dtype) for _ in range(3))
    gate_a = gate_a * 4  # decays from near 0 to near 1: sqrt(1 - a^2) over its range
    a_param = torch.randn(e, generator=g).to(dtype)
    pos = torch.arange(t).repeat(b, 1) + 100
    for row, time in starts:
        pos[row, time:] = torch.arange(t - time)
    for row, time in padded:
        pos[row, time] = -1
    pad = (pos < 0) if padded else None
    return x, gate_x, gate_a, a_param, pos, pad


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize(
    "b, t, block_rows",
    [(1, 37, 8), (3, 29, 5), (2, 64, 64), (4, 1, 3), (2, 3, 1), (2, 200, 1024)],
)
def test_fused_equals_reference(b, t, block_rows, dtype, monkeypatch):
    """Every block size (one block, several with a ragged last block, one row per
    block) and both input dtypes: the same float32 values as the reference (to float32
    rounding; both compute in float32 whatever the inputs' dtype)."""
    e = 24
    monkeypatch.setattr(rglru, "BLOCK_ELEMENTS", block_rows * e)
    starts = [(0, t // 2)] + ([(b - 1, 0)] if b > 1 else [])  # t // 2 is 0 when t == 1
    padded = [(b - 1, t - 1)] if b > 1 else []
    args = inputs(b, t, e, dtype, seed=t, starts=starts, padded=padded)
    with torch.no_grad():
        ref_a, ref_x = rglru.rglru_gates_ref(*args)
        a, normed_x = rglru.rglru_gates_fused(*args)
    for got, want, name in ((a, ref_a, "a"), (normed_x, ref_x, "normed_x")):
        assert got.dtype == torch.float32 and got.shape == (b, t, e), name
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=name)
    # A document start: no decay, the gated input unscaled; padding: the state passes.
    assert (a[0, starts[0][1]] == 0).all()
    x, gate_x = args[0].float(), args[1].float()
    row, time = starts[0]
    torch.testing.assert_close(normed_x[row, time], x[row, time] * torch.sigmoid(gate_x[row, time]))
    for row, time in padded:
        assert (a[row, time] == 1).all() and (normed_x[row, time] == 0).all()
    assert ((a >= 0) & (a <= 1)).all() and torch.isfinite(normed_x).all()


def test_fused_under_autograd_or_few_rows_is_the_reference(monkeypatch):
    """With an input that requires grad, or fewer than MIN_ROWS rows, the fused
    function returns the reference's tensors (its bounded-derivative sqrt included)."""
    calls = []
    ref = rglru.rglru_gates_ref
    monkeypatch.setattr(rglru, "rglru_gates_ref", lambda *a: calls.append(1) or ref(*a))
    x, gate_x, gate_a, a_param, pos, pad = inputs(2, 9, 16, torch.float32)
    rglru.rglru_gates_fused(x.requires_grad_(), gate_x, gate_a, a_param, pos, pad)
    assert calls == [1]
    with torch.no_grad():
        rglru.rglru_gates_fused(x[:1, :1], gate_x[:1, :1], gate_a[:1, :1], a_param, pos[:1, :1])
        assert calls == [1, 1]
        rglru.rglru_gates_fused(x, gate_x, gate_a, a_param, pos, pad)
        assert calls == [1, 1]  # 18 rows, no grad: the fused path


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
def test_rglru_layer_same_with_either_implementation(dtype):
    """The layer (gates, gate math, scan) with the reference gate math and with auto
    (fused on CPU): the same output and final state, starts and padding included."""
    torch.manual_seed(0)
    layer = RGLRU(32, 4, dtype=dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    x, _, _, _, pos, pad = inputs(3, 21, 32, dtype, starts=[(1, 7)], padded=[(2, 0), (2, 1)])
    h0 = torch.randn(3, 32)
    assert ops.resolve("rglru_gates", "cpu") == "fused"
    with torch.no_grad():
        y, h = layer(x, pos, h0, pad)
        with ops.use(rglru_gates="ref"):
            y_ref, h_ref = layer(x, pos, h0, pad)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(h, h_ref, rtol=1e-6, atol=1e-6)
