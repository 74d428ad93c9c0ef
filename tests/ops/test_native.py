"""The native CPU kernels (rgemma/ops/_native.c) against their references, on every
instruction set this CPU runs (AVX-512 BF16, AVX-512F, AVX2, portable C), and the
per-machine choice that puts them under `ops.linear` / `ops.int8_matmul`."""

from __future__ import annotations

import importlib
import platform
import shutil
import sysconfig

import pytest
import torch
import torch.nn.functional as F

from rgemma import ops
from rgemma.ops import native

lin = importlib.import_module("rgemma.ops.linear")  # the module (ops.linear is the op)

needs_native = pytest.mark.skipif(not native.available(), reason=native.unavailable_reason())


def test_the_extension_is_built_where_a_compiler_is():
    """pip install builds _native.c wherever a C compiler exists (CI included): a
    compile error must fail here, not fall back to torch in silence."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None and shutil.which("cc") is None:
        pytest.skip("no C compiler on this machine: the pure-torch kernels are used")
    if platform.machine().lower() not in ("x86_64", "amd64") or platform.system() != "Linux":
        pytest.skip("the native kernels are built on x86-64 Linux only (setup.py)")
    assert native.available(), native.unavailable_reason()
    assert native.isa() in native.isas() and native.isas()[0] == "c"


@pytest.fixture(params=native.isas() or ["missing"])
def isa(request):
    if request.param == "missing":
        pytest.skip(native.unavailable_reason())
    native.set_isa(request.param)
    yield request.param
    native.set_isa(None)


def _bf16_reference(x, w, bias):
    """float64 sums of the bfloat16 values, rounded once to bfloat16."""
    y = x.double() @ w.double().T
    if bias is not None:
        y = y + bias.double()
    return y


def _assert_bf16_close(got, exact):
    """Within two bfloat16 steps of the exact result (float32 sums in another order
    may round the other way), relative to the output's scale."""
    scale = exact.abs().amax().item() or 1.0
    err = (got.double() - exact).abs()
    assert (err <= 2 * 2**-8 * exact.abs() + 1e-5 * scale).all(), err.max().item()


@pytest.mark.parametrize(
    "rows,n,k",
    [(1, 37, 70), (1, 64, 2560), (3, 9, 31), (4, 16, 32), (5, 33, 33), (8, 100, 1024),
     (9, 7, 1100), (17, 20, 64), (64, 24, 96), (1, 1, 1)],
)  # fmt: skip
@pytest.mark.parametrize("bias", [None, torch.bfloat16, torch.float32])
def test_linear_bf16_equals_f_linear_to_rounding(isa, rows, n, k, bias):
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    b = None if bias is None else torch.randn(n, generator=g).to(bias)
    y = native.linear_bf16(x, w, b)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
    _assert_bf16_close(y, _bf16_reference(x, w, b))


@pytest.mark.parametrize("rows,n,k", [(1, 37, 70), (1, 64, 2560), (5, 33, 33), (8, 100, 1100)])
def test_linear_f32_equals_f_linear(isa, rows, n, k):
    g = torch.Generator().manual_seed(rows * 7 + n + k)
    x, w, b = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n)
    y = native.linear_f32(x, w, b)
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    exact = x.double() @ w.double().T + b.double()
    torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max())
    assert torch.equal(y[-1:], native.linear_f32(x[-1:], w, b))  # rows alone, bit for bit


@pytest.mark.parametrize("rows", [2, 8, 13, 64])
def test_a_rows_result_does_not_depend_on_the_other_rows_or_threads(isa, rows):
    """The same arithmetic per output element whatever the number of rows in the call
    and the thread count: batch == rows alone, bit for bit."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 1100, generator=g).bfloat16()
    w = torch.randn(70, 1100, generator=g).bfloat16()
    q = torch.randint(-127, 128, (70, 1100), dtype=torch.int8, generator=g)
    scale = torch.rand(70, generator=g) / 100
    whole = native.linear_bf16(x, w)
    whole8 = native.linear_int8(x.float(), q, scale)
    for r in (0, rows // 2, rows - 1):
        assert torch.equal(whole[r : r + 1], native.linear_bf16(x[r : r + 1], w))
        assert torch.equal(whole8[r : r + 1], native.linear_int8(x[r : r + 1].float(), q, scale))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(whole, native.linear_bf16(x, w))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("rows,n,k", [(1, 37, 70), (1, 48, 2560), (5, 9, 33), (8, 40, 1100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_int8_equals_the_dequantized_reference(isa, rows, n, k, dtype):
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(2, (rows + 1) // 2, k, generator=g).to(dtype)[:, : rows // 2 + 1]
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = torch.rand(n, generator=g) / 100
    bias = torch.randn(n, generator=g)
    y = native.linear_int8(x, q, scale, bias)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], n)
    exact = x.double() @ (q.double() * scale.double()[:, None]).T + bias.double()
    if dtype == torch.bfloat16:
        _assert_bf16_close(y, exact)
    else:
        torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max())


@needs_native
def test_bad_inputs_are_named():
    w = torch.randn(8, 16).bfloat16()
    with pytest.raises(ValueError, match="at most 64 rows"):
        native.linear_bf16(torch.randn(65, 16).bfloat16(), w)
    with pytest.raises(ValueError, match="bfloat16 weight"):
        native.linear_bf16(torch.randn(1, 16).bfloat16(), w.float())
    with pytest.raises(ValueError, match="contiguous weight"):
        native.linear_bf16(torch.randn(1, 8).bfloat16(), w.T)
    with pytest.raises(ValueError, match=r"bias must be \(n,\)"):
        native.linear_bf16(torch.randn(1, 16).bfloat16(), w, torch.zeros(7))
    with pytest.raises(ValueError, match="float32 x and a float32 weight"):
        native.linear_f32(torch.randn(1, 16), w)
    with pytest.raises(ValueError, match="int8 q"):
        native.linear_int8(torch.randn(1, 16), w, torch.ones(8))
    with pytest.raises(ValueError, match="unknown instruction set avx1024"):
        native.set_isa("avx1024")


@needs_native
def test_compiled_graphs_call_the_kernels_as_custom_ops():
    x, w = torch.randn(2, 64).bfloat16(), torch.randn(24, 64).bfloat16()
    q, scale = torch.randint(-127, 128, (24, 64), dtype=torch.int8), torch.rand(24) / 50

    def f(x):
        return native.linear_bf16(x, w) + native.linear_int8(x, q, scale)

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), f(x))


# ---------------------------------------------------------------------------------
# The per-machine choice (ops.linear "tuned", ops.int8_matmul "kernel")
# ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cost_b,chosen", [(0.5, "b"), (0.97, "a"), (1.5, "a")])
def test_measure_chooses_another_kernel_only_when_it_beats_the_baseline_by_the_margin(
    cost_b, chosen
):
    """On a virtual clock (each call of "a" costs 1 ms, of "b" `cost_b` ms) the
    per-call times are exact and "b" wins only below `GEMV_MARGIN` (0.95) of "a"."""
    now = [0.0]
    calls = {"a": 0, "b": 0}

    def kernel(name, cost):
        def run():
            calls[name] += 1
            now[0] += cost * 1e-3

        return run

    choice = lin.measure_kernels(
        {"a": kernel("a", 1.0), "b": kernel("b", cost_b)},
        "a",
        samples=2,
        min_seconds=4e-3,
        clock=lambda: now[0],
    )
    calls_per_sample = int(4e-3 / ((1.0 + cost_b) / 2 * 1e-3))
    assert calls == {"a": 1 + 2 * calls_per_sample, "b": 1 + 2 * calls_per_sample}
    assert choice.seconds == pytest.approx({"a": 1e-3, "b": cost_b * 1e-3})
    assert choice.kernel == chosen == lin.choose(choice.seconds, "a")


def test_tuned_linear_runs_the_measured_kernel_per_row_bucket(monkeypatch):
    """Each (shape, row bucket) is measured once; the kernel it names runs; products
    with gradients or more than 64 rows are F.linear itself, never measured."""
    monkeypatch.setattr(lin, "_CHOICES", {})
    measured = []
    pick = {1: "mv", 2: "linear", 8: "native" if native.available() else "linear"}

    def fake_measure(weight, rows):
        measured.append((tuple(weight.shape), rows))
        return lin.KernelChoice(pick[rows], {"linear": 2e-6, pick[rows]: 1e-6})

    monkeypatch.setattr(lin, "measure_linear", fake_measure)
    w, b = torch.randn(48, 32).bfloat16(), torch.randn(48).bfloat16()
    for rows in (1, 2, 5, 7, 8, 1):
        x = torch.randn(rows, 1, 32).bfloat16()
        with torch.no_grad():
            got = ops.linear(x, w, b)
        _assert_bf16_close(got, _bf16_reference(x, w, b))
    assert measured == [((48, 32), 1), ((48, 32), 2), ((48, 32), 8)]  # 5 and 7 -> 8
    why = ops.describe(why=True)
    (mv,) = [v for k, v in why.items() if k.startswith("linear, 1 row, bfloat16 (48, 32), ")]
    assert mv.startswith("torch.mv (F.linear 2 us")
    x = torch.randn(1, 32, dtype=torch.bfloat16, requires_grad=True)
    y = ops.linear(x, w.requires_grad_(), b)  # under autograd: F.linear, gradients flow
    y.float().sum().backward()
    assert torch.equal(x.grad, F.linear(torch.ones(1, 48).bfloat16(), w.detach().T))
    with torch.no_grad():
        big = torch.randn(65, 32).bfloat16()
        assert torch.equal(ops.linear(big, w, b), F.linear(big, w, b))
    assert len(measured) == 3


def test_without_the_extension_the_choice_is_among_torch_kernels(monkeypatch):
    monkeypatch.setattr(native, "_native", None)
    assert not native.available()
    w = torch.randn(40, 64).bfloat16()
    assert set(lin._linear_candidates(w, 1)) == {"linear", "mv"}
    assert set(lin._linear_candidates(w, 8)) == {"linear"}
    assert set(lin._linear_candidates(w.float(), 8)) == {"linear"}
    q = torch.randint(-127, 128, (40, 64), dtype=torch.int8)
    assert set(lin._int8_candidates(q, torch.ones(40), None, 1, torch.bfloat16)) == {"torch"}
    with pytest.raises(RuntimeError, match="not built"):
        native.linear_bf16(torch.randn(1, 64).bfloat16(), w)


@needs_native
def test_int8_matmul_takes_the_measured_kernel(monkeypatch):
    monkeypatch.setattr(lin, "_CHOICES", {})
    monkeypatch.setattr(
        lin, "measure_kernels", lambda cands, base: lin.KernelChoice("native", {"native": 1.0})
    )
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-127, 128, (40, 64), dtype=torch.int8, generator=g)
    scale = torch.rand(40, generator=g) / 100
    x = torch.randn(3, 64, generator=g).bfloat16()
    got = ops.int8_matmul(x, q, scale)
    assert torch.equal(got, native.linear_int8(x, q, scale))
    _assert_bf16_close(got, x.double() @ (q.double() * scale.double()[:, None]).T)
    assert any(k.startswith("int8_matmul, 4 rows") for k in lin.kernel_choices())


@needs_native
def test_review_findings_stay_fixed():
    """Non-contiguous scale and bias (freed or strided memory), float32 x for the
    bfloat16 kernel, gradients through a trainable bias or activations."""
    g = torch.Generator().manual_seed(11)
    q = torch.randint(-127, 128, (40, 64), dtype=torch.int8, generator=g)
    scale = torch.rand(40, 2, generator=g)[:, 0] / 100  # a strided view
    x = torch.randn(2, 64, generator=g)
    exact = x.double() @ (q.double() * scale.double()[:, None]).T
    torch.testing.assert_close(
        native.linear_int8(x, q, scale).double(), exact, rtol=1e-5, atol=1e-5
    )
    w = torch.randn(32, 64, generator=g).bfloat16()
    bias = torch.randn(32, 2, generator=g).bfloat16()[:, 0]  # a strided view
    xb = x.bfloat16()
    _assert_bf16_close(native.linear_bf16(xb, w, bias), _bf16_reference(xb, w, bias))
    with pytest.raises(ValueError, match="bfloat16 x"):
        native.linear_bf16(x, w)
    b = torch.zeros(32, dtype=torch.bfloat16, requires_grad=True)
    ops.linear(xb[:1], w, b).float().sum().backward()  # frozen weight, trainable bias
    assert torch.equal(b.grad, torch.ones(32, dtype=torch.bfloat16))
    xg = x[:1].clone().requires_grad_()
    ops.int8_matmul(xg, q, scale).sum().backward()
    assert xg.grad is not None and xg.grad.shape == (1, 64)
