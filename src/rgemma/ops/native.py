"""The native CPU kernels (`rgemma/ops/_native.c`), built from the package's sources
at install, and their pure-torch fallback.

`pip install rgemma` compiles `_native.c` on x86-64 when a C compiler with OpenMP is
present (setup.py; the build is optional, so an install without one still succeeds;
after editing the C file, reinstall to rebuild it). The kernels stream
a weight once per call for up to `MAX_ROWS` rows of activations (decode):

* `linear_bf16(x, weight, bias)`: bfloat16 x and weight, float32 accumulation
  (AVX-512 BF16's VDPBF16PS where the CPU has it, else the weight widened to float32
  under AVX-512F or AVX2), bfloat16 output: `F.linear` to rounding.
* `linear_f32(x, weight, bias)`: float32 x and weight (AVX-512F, AVX2 or C).
* `linear_int8(x, q, scale, bias)`: int8 weight with one float32 scale per output,
  float32 activations and accumulation: `x @ (q * scale[:, None]).T (+ bias)`.

None is used unless `ops.linear` ("tuned") or `ops.int8_matmul` ("kernel") measured
it faster than the torch kernel on this machine for that shape (`ops.linear`); where
the extension is missing (`available()` is False, `unavailable_reason()` says why)
those choices are torch's. No autograd: callers use them only without gradients.
Inside `torch.compile` they are custom ops (`torch.ops.rgemma.native_linear_bf16`,
`native_linear_f32`, `native_linear_int8`), opaque to the compiler. Tested against
`F.linear` on every instruction set the CPU runs (`isas()`, `set_isa`) in tests/ops/test_native.py.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

try:
    _native = importlib.import_module("rgemma.ops._native")
except ModuleNotFoundError as err:  # not built: no compiler at install, or another platform
    if err.name != "rgemma.ops._native":
        raise
    _native = None
    _REASON = (
        "the native kernels were not built at install (no working C compiler with "
        "OpenMP, or not x86-64; `pip install -v -e .` shows why); rgemma uses torch's kernels"
    )
except ImportError as err:  # built, but does not load here
    _native = None
    _REASON = f"the native kernels do not load ({err}); rgemma uses torch's kernels"
else:
    _REASON = ""

#: Rows of activations one call takes at most (the C side's limit).
MAX_ROWS = 64


def available() -> bool:
    """Whether the native kernels were built and import on this machine."""
    return _native is not None


def unavailable_reason() -> str:
    """Why `available()` is False ("" when it is True)."""
    if _native is not None:
        return ""
    return _REASON or "the native kernels were not built; rgemma uses torch's kernels"


def isa() -> str | None:
    """The instruction set the kernels use: "avx512bf16", "avx512", "avx2" or "c"."""
    return _native.isa() if _native is not None else None


def isas() -> list[str]:
    """Every instruction set this CPU can run the kernels with (for tests)."""
    return list(_native.isas()) if _native is not None else []


def set_isa(name: str | None) -> None:
    """Force the kernels onto one of `isas()` (None: back to the best), for tests."""
    if _native is None:
        raise RuntimeError(unavailable_reason())
    _native.set_isa(name)


def _bias(bias: Tensor | None, n: int) -> tuple[Tensor | None, int, int]:
    """(the bias to keep alive during the call, its address, 1 if bfloat16)."""
    if bias is None:
        return None, 0, 0
    if (
        bias.shape != (n,)
        or bias.dtype not in (torch.bfloat16, torch.float32)
        or bias.device.type != "cpu"
    ):
        raise ValueError(
            f"native kernels: bias must be (n,) = ({n},) bfloat16 or float32 on the CPU, "
            f"got {tuple(bias.shape)} {bias.dtype} on {bias.device}"
        )
    bias = bias.resolve_neg().contiguous()
    return bias, bias.data_ptr(), int(bias.dtype == torch.bfloat16)


def _check(x: Tensor, weight: Tensor, dtype: torch.dtype, what: str) -> Tensor:
    if _native is None:
        raise RuntimeError(unavailable_reason())
    if x.device.type != "cpu" or weight.device.type != "cpu":
        raise ValueError(f"native {what}: CPU tensors only")
    if (
        x.ndim == 0
        or weight.ndim != 2
        or not weight.is_contiguous()
        or weight.is_neg()
        or x.shape[-1] != weight.shape[1]
    ):
        raise ValueError(
            f"native {what}: x (..., k) and a contiguous weight (n, k), got "
            f"{tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if weight.shape[1] == 0:
        raise ValueError(f"native {what}: k = 0 (F.linear gives zeros + bias)")
    x2 = x.reshape(-1, weight.shape[1]).to(dtype).resolve_neg().contiguous()
    if x2.shape[0] > MAX_ROWS:
        raise ValueError(f"native {what}: at most {MAX_ROWS} rows, got {x2.shape[0]}")
    return x2


def _linear_float(x: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """`linear_bf16` (dtype bfloat16) or `linear_f32` (float32): x and weight in dtype."""
    name = "linear_bf16" if dtype == torch.bfloat16 else "linear_f32"
    if weight.dtype != dtype or x.dtype != dtype:
        dt = str(dtype).removeprefix("torch.")
        raise ValueError(f"native {name}: {dt} x and a {dt} weight, got {x.dtype}, {weight.dtype}")
    x2 = _check(x, weight, dtype, name)
    (rows, k), n = x2.shape, weight.shape[0]
    y = torch.empty(rows, n, dtype=dtype)
    bias, b, b16 = _bias(bias, n)
    getattr(_native, name)(
        y.data_ptr(), x2.data_ptr(), weight.data_ptr(), 0, b, rows, n, k,
        int(dtype == torch.bfloat16), b16, torch.get_num_threads(),
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], n)


def _linear_bf16(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return _linear_float(x, weight, bias, torch.bfloat16)


def _linear_f32(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return _linear_float(x, weight, bias, torch.float32)


def _linear_int8(x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    if (
        q.dtype != torch.int8
        or scale.dtype != torch.float32
        or scale.shape != q.shape[:1]
        or scale.device.type != "cpu"
    ):
        raise ValueError("native linear_int8: int8 q (n, k) and float32 CPU scale (n,)")
    scale = scale.resolve_neg().contiguous()  # a local: alive until the kernel returns
    x2 = _check(x, q, torch.float32, "linear_int8")
    (rows, k), n = x2.shape, q.shape[0]
    out_bf16 = x.dtype == torch.bfloat16
    y = torch.empty(rows, n, dtype=torch.bfloat16 if out_bf16 else torch.float32)
    bias, b, b16 = _bias(bias, n)
    _native.linear_int8(
        y.data_ptr(), x2.data_ptr(), q.data_ptr(), scale.data_ptr(), b, rows, n,
        k, int(out_bf16), b16, torch.get_num_threads(),
    )  # fmt: skip
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


# The same kernels as custom ops, for graphs traced by torch.compile (torch >= 2.4;
# older versions call them directly, a graph break).
if hasattr(torch.library, "custom_op"):

    @torch.library.custom_op("rgemma::native_linear_bf16", mutates_args=())
    def _linear_bf16_op(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return _linear_bf16(x, weight, bias)

    @_linear_bf16_op.register_fake
    def _(x, weight, bias):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @torch.library.custom_op("rgemma::native_linear_f32", mutates_args=())
    def _linear_f32_op(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return _linear_f32(x, weight, bias)

    @_linear_f32_op.register_fake
    def _(x, weight, bias):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @torch.library.custom_op("rgemma::native_linear_int8", mutates_args=())
    def _linear_int8_op(x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
        return _linear_int8(x, q, scale, bias)

    @_linear_int8_op.register_fake
    def _(x, q, scale, bias):
        return x.new_empty(*x.shape[:-1], q.shape[0])

else:  # pragma: no cover
    _linear_bf16_op, _linear_f32_op, _linear_int8_op = _linear_bf16, _linear_f32, _linear_int8


def linear_bf16(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)` for bfloat16 CPU tensors through the native kernel.

    Args:
        x: (..., k) bfloat16, at most `MAX_ROWS` rows in all.
        weight: (n, k) bfloat16, contiguous.
        bias: (n,) bfloat16 or float32, or None.
    Returns:
        (..., n) bfloat16: float32 sums of bfloat16 products (+ bias), rounded once.
    Raises:
        RuntimeError if the extension is missing; ValueError for other inputs.
    """
    if torch.compiler.is_compiling():
        return _linear_bf16_op(x, weight, bias)
    return _linear_bf16(x, weight, bias)


def linear_f32(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)` for float32 CPU tensors through the native kernel
    (same shapes as `linear_bf16`; float32 in and out, float32 accumulation).

    Raises:
        RuntimeError if the extension is missing; ValueError for other inputs.
    """
    if torch.compiler.is_compiling():
        return _linear_f32_op(x, weight, bias)
    return _linear_f32(x, weight, bias)


def linear_int8(x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """`x @ (q * scale[:, None]).T (+ bias)` through the native kernel.

    Args:
        x: (..., k) float32 or bfloat16 (computed in float32), at most `MAX_ROWS` rows.
        q: (n, k) int8, contiguous; scale: (n,) float32; bias: (n,) or None.
    Returns:
        (..., n) in x's dtype.
    Raises:
        RuntimeError if the extension is missing; ValueError for other inputs.
    """
    if torch.compiler.is_compiling():
        return _linear_int8_op(x, q, scale, bias)
    return _linear_int8(x, q, scale, bias)
