"""Matrix products with weights: the float linear and the weight-only int8 matmul.

* `linear_ref`: `F.linear`.
* `linear_mv`: a single bfloat16 row on CPU (batch-1 decode) goes through `torch.mv`,
  whose kernel streams a bfloat16 matrix about 20% faster than `F.linear`'s on the
  machine it was measured on (`benchmarks/gemv_kernels.py`: 25-30 vs 22-24 GB/s on
  an Intel Xeon with AMX); batch-1 decode is bound by that rate. Anything else is
  `F.linear`.
* `int8_matmul_ref`: dequantize the int8 weight to the activation dtype, then a
  dense matmul (also the faster choice for many rows on CPUs without a native
  bfloat16 matmul).
* `int8_matmul_kernel`: `torch._weight_int8pack_mm` (int8 weights, bfloat16
  activations) for up to `INT8_KERNEL_MAX_ROWS` rows on CPU: it reads a quarter of
  the bytes of float32 weights, and few-row decode is memory-bound. Other inputs take
  `int8_matmul_ref`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: Up to this many rows per call the int8 kernel is used; above, the weight is
#: dequantized once per call.
INT8_KERNEL_MAX_ROWS = 16


def linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)`: x (..., k), weight (n, k), bias (n,) -> (..., n)."""
    return F.linear(x, weight, bias)


def linear_mv(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`linear_ref` with one bfloat16 CPU row through `torch.mv` (same arguments)."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() == x.shape[-1]:
        y = torch.mv(weight, x.reshape(-1))  # (n,)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def int8_matmul_ref(
    x: Tensor, q: Tensor, scale: Tensor, scale_bf16: Tensor | None = None
) -> Tensor:
    """`x @ (q * scale[:, None]).T`: x (..., k) float, q (n, k) int8, scale (n,) float32
    -> (..., n) in x's dtype. `scale_bf16` is unused (see `int8_matmul_kernel`)."""
    lead, k = x.shape[:-1], x.shape[-1]
    w = q.to(x.dtype) * scale.to(x.dtype)[:, None]  # (n, k)
    return (x.reshape(-1, k) @ w.T).reshape(*lead, -1)


def int8_matmul_kernel(
    x: Tensor, q: Tensor, scale: Tensor, scale_bf16: Tensor | None = None
) -> Tensor:
    """`int8_matmul_ref` through torch's int8 kernel where it applies (same arguments).

    `scale_bf16`: the scales already in bfloat16 for the kernel (a dtype cast of a
    constant inside the kernel's arguments does not compile with torch.compile).
    """
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)  # (rows, k)
    # The kernel reads out of bounds unless k is a multiple of 16 (torch 2.13: inf/NaN
    # or a segfault for k = 24, 40, 72), so other widths take the dense path.
    if (
        x2.shape[0] <= INT8_KERNEL_MAX_ROWS
        and k % 16 == 0
        and hasattr(torch, "_weight_int8pack_mm")
        and x.device.type == "cpu"
    ):
        if scale_bf16 is None or scale_bf16.dtype != torch.bfloat16:  # e.g. after .float()
            scale_bf16 = scale.to(torch.bfloat16)
        y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), q, scale_bf16)  # (rows, n)
        return y.to(x.dtype).reshape(*lead, -1)
    return int8_matmul_ref(x, q, scale)
