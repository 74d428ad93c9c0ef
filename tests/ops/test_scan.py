"""The fast scans equal the reference scan: outputs, final state and gradients, with
resets, odd lengths, a given initial state, float32 and bfloat16 inputs."""

import pytest
import torch

from rgemma.ops import linear_scan
from rgemma.ops.scan import linear_scan_chunked, linear_scan_ref


def _inputs(b, t, e, dtype, seed=0, with_resets=True):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(b, t, e, generator=g) * 0.5 + 0.5  # decays in [0.5, 1)
    if with_resets:
        reset = torch.rand(b, t, 1, generator=g) < 0.1
        a = a.masked_fill(reset, 0.0)
    x = torch.randn(b, t, e, generator=g)
    return a.to(dtype), x.to(dtype)


@pytest.mark.parametrize("t", [1, 2, 7, 16, 33, 100, 257])
@pytest.mark.parametrize("with_h0", [False, True])
def test_chunked_equals_reference_float32(t, with_h0):
    a, x = _inputs(2, t, 5, torch.float32, seed=t)
    h0 = torch.randn(2, 5) if with_h0 else None
    y_ref, h_ref = linear_scan_ref(a, x, h0)
    y, h = linear_scan_chunked(a, x, h0)
    assert y.dtype == torch.float32 and h.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, y_ref[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 64])
def test_chunked_any_chunk_size(chunk_size):
    a, x = _inputs(3, 50, 4, torch.float32)
    y_ref, h_ref = linear_scan_ref(a, x)
    y, h = linear_scan_chunked(a, x, chunk_size=chunk_size)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_accumulate_in_float32():
    a, x = _inputs(2, 64, 8, torch.bfloat16)
    h0 = torch.randn(2, 8)
    y_ref, h_ref = linear_scan_ref(a, x, h0)
    y, h = linear_scan_chunked(a, x, h0)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    # Same float32 arithmetic on the same upcast inputs: only the order of the
    # float32 products differs, far below bfloat16 output resolution.
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=1e-2, atol=1e-2)
    # And the float32 state really is more precise than a bfloat16 accumulation.
    assert (h - h.bfloat16().float()).abs().max() > 0


def test_reset_forgets_the_past():
    a, x = _inputs(1, 20, 3, torch.float32, with_resets=False)
    a[:, 10] = 0.0
    y1, _ = linear_scan_chunked(a, x, torch.randn(1, 3) * 100)
    y2, _ = linear_scan_chunked(a[:, 10:], x[:, 10:])
    torch.testing.assert_close(y1[:, 10:], y2)


@pytest.mark.parametrize("t", [5, 37])
def test_gradients_match_reference(t):
    a, x = _inputs(2, t, 4, torch.float32, seed=1)
    h0 = torch.randn(2, 4)
    grads = []
    for fn in (linear_scan_ref, linear_scan_chunked):
        aa, xx, hh = (v.clone().requires_grad_(True) for v in (a, x, h0))
        y, h = fn(aa, xx, hh)
        w = torch.linspace(-1, 1, y.numel()).view_as(y)
        ((y * w).sum() + (h * h).sum()).backward()
        grads.append((aa.grad, xx.grad, hh.grad))
    for g_ref, g in zip(*grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


def test_dispatcher():
    a, x = _inputs(2, 30, 4, torch.float32)
    h0 = torch.randn(2, 4)
    y_ref, _h_ref = linear_scan_ref(a, x, h0)
    for impl in ("auto", "ref", "chunked"):
        y, _h = linear_scan(a, x, h0, impl=impl)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    # A single step (decode) through the dispatcher's fast path.
    _y1, h1 = linear_scan(a[:, :1], x[:, :1], h0)
    torch.testing.assert_close(h1, a[:, 0] * h0 + x[:, 0])
    with pytest.raises(ValueError, match="unknown scan impl 'nope'"):
        linear_scan(a, x, h0, impl="nope")


# ----------------------------------------------------------------------------------
# The chunked scan's own backward (LinearScanFn): one reverse scan, equal to autograd
# through the reference.
# ----------------------------------------------------------------------------------
def _grads(fn, a, x, h0, use=("y", "h"), seed=7):
    """(y, h_last, grad a, grad x, grad h0) of a fixed random projection of the used
    outputs, on fresh leaves (h0 None: no initial state)."""
    aa, xx = (v.detach().clone().requires_grad_(True) for v in (a, x))
    hh = None if h0 is None else h0.detach().clone().requires_grad_(True)
    y, h = fn(aa, xx, hh)
    g = torch.Generator().manual_seed(seed)
    loss = 0.0
    if "y" in use:
        loss = loss + (y.float() * torch.randn(y.shape, generator=g)).sum()
    if "h" in use:
        loss = loss + (h * torch.randn(h.shape, generator=g)).sum()
    leaves = [aa, xx] + ([hh] if hh is not None else [])
    return (y, h, *torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("t", [2, 7, 33, 100, 257])
@pytest.mark.parametrize("with_h0", [False, True])
def test_backward_equals_reference(dtype, t, with_h0, assert_close):
    """Outputs, final state and the gradients of a, x and h0: resets (a = 0 at random
    document starts), lengths that are not a multiple of the chunk, bf16 inputs."""
    a, x = _inputs(2, t, 6, dtype, seed=t)
    h0 = torch.randn(2, 6, generator=torch.Generator().manual_seed(t)) if with_h0 else None
    ref = _grads(linear_scan_ref, a, x, h0)
    out = _grads(linear_scan_chunked, a, x, h0)
    names = ["y", "h_last", "grad a", "grad x", "grad h0"]
    for name, got, want in zip(names, out, ref):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert_close(got, want, dtype, "out" if name in ("y", "h_last") else "grad", name)
    assert ref[2].abs().sum() > 0 and ref[3].abs().sum() > 0


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 64])
@pytest.mark.parametrize("use", [("y",), ("h",)], ids=["outputs-only", "final-state-only"])
def test_backward_any_chunk_size_and_output(chunk_size, use):
    """Any chunk length, and a loss that reads only y or only the final state (the
    other output's gradient is None inside the backward)."""
    a, x = _inputs(3, 50, 4, torch.float32, seed=2)
    h0 = torch.randn(3, 4)
    ref = _grads(linear_scan_ref, a, x, h0, use)
    out = _grads(lambda *v: linear_scan_chunked(*v, chunk_size=chunk_size), a, x, h0, use)
    for got, want in zip(out[2:], ref[2:]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_backward_is_one_node_and_skips_inputs_without_grad():
    """Under autograd the chunked scan is one graph node (not ~170 recorded ops per
    chunk); inputs that need no gradient get none."""
    a, x = _inputs(2, 40, 4, torch.float32, seed=3)
    xx = x.clone().requires_grad_(True)
    y, h = linear_scan_chunked(a, xx, torch.randn(2, 4))
    assert type(y.grad_fn).__name__ == "LinearScanFnBackward"
    (gx,) = torch.autograd.grad(y.sum() + h.sum(), [xx])
    # dL/dx_t for L = sum(y) + sum(h_last): the reverse scan of ones (plus 1 at the end).
    want = torch.ones(2, 40, 4)
    want[:, -1] += 1.0
    for i in range(38, -1, -1):
        want[:, i] += a[:, i + 1] * want[:, i + 1]
    torch.testing.assert_close(gx, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        y, _ = linear_scan_chunked(a, xx)
    assert y.grad_fn is None
