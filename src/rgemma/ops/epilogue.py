"""A linear layer with its next element-wise op fused into the matmul (an epilogue).

    "gelu_tanh": gelu_tanh(x W^T + b)        the MLP's gate, the recurrent block's y
    "mul":       (x W^T + b) * other         the MLP's up projection times the gate
    "add":       other + (x W^T + b)         the MLP's output plus the residual

Griffin (arXiv 2402.19427) section 2 / figure 2: the gated MLP block
`ffw_down(gelu_tanh(gate_proj(x)) * up_proj(x))`, the recurrent block's
`gelu_tanh(linear_y(x))` and the MLP's residual add in `ResidualBlock`. Official
counterparts: `recurrentgemma.torch.modules.MLPBlock`, `RecurrentBlock`,
`ResidualBlock` (each computes the linear, then the element-wise op).

* `linear_epilogue_ref`: the specification: `ops.linear` (whatever it dispatches
  to), then the element-wise op on its rounded output, each into a fresh tensor.
* `linear_epilogue_onednn`: one oneDNN matmul with the op as its post-op
  (`torch.ops.mkldnn._linear_pointwise`, the kernel `torch.compile`'s CPU freezing
  path uses): the op is applied to the float32 accumulator before the single
  rounding to the output dtype, and no intermediate (rows, n) tensor is written or
  read again. On a bfloat16 prefill of 2,048 tokens (reduced-2B shape, 3 blocks, AMD
  EPYC Zen 4, 1 thread, `benchmarks/prefill_epilogue.py`) the model's MLP,
  recurrent-block GELU and MLP residual add through it measured 1.02x (idle machine)
  to 1.04x (shared machine) the whole prefill's CPU time; the gain is the element-wise
  passes and their memory traffic, the matmuls are unchanged (a prepacked oneDNN
  weight added about 1% more for a second copy of every weight: not used).
  It runs only where it applies: a CPU bfloat16 input of more than `MIN_ROWS` rows
  (fewer rows are decode, where `ops.linear` picks its GEMV kernels), plain dense
  weights, no autograd, not under `torch.compile`; anything else, or a torch build
  without oneDNN, runs the reference. Results differ from the reference by one
  bfloat16 rounding of the intermediate (tested: within bfloat16 tolerance, and no
  farther from the float32 result than the reference).

All take x (..., k), weight (n, k), bias (n,) or None, epilogue (a name above) and
other (..., n) (for "mul" and "add", else None); they return (..., n) in x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError

__all__ = ["EPILOGUES", "MIN_ROWS", "linear_epilogue_onednn", "linear_epilogue_ref"]

#: The linear the reference runs: `ops.linear` (whatever it dispatches to), set by
#: `rgemma.ops` when it imports this module (so that this module need not import it).
linear = F.linear

#: The fused ops, by name.
EPILOGUES = ("gelu_tanh", "mul", "add")

#: At or below this many rows the reference runs: up to 64 rows `ops.linear` chooses
#: among GEMV kernels measured on the machine (decode), which a post-op cannot use.
MIN_ROWS = 64


def _check(epilogue: str, other: Tensor | None) -> None:
    if epilogue not in EPILOGUES:
        raise InputError(
            f"unknown linear epilogue {epilogue!r}; choose from {', '.join(EPILOGUES)}"
        )
    if (other is None) != (epilogue == "gelu_tanh"):
        need = "no other tensor" if epilogue == "gelu_tanh" else "an other tensor (..., n)"
        raise InputError(f"linear epilogue {epilogue!r} takes {need}")


def linear_epilogue_ref(
    x: Tensor, weight: Tensor, bias: Tensor | None, epilogue: str, other: Tensor | None = None
) -> Tensor:
    """The linear (`ops.linear`), then `epilogue` on its output (the specification).

    Args:
        x: (..., k) input, any float dtype.
        weight: (n, k); bias: (n,) or None.
        epilogue: "gelu_tanh", "mul" or "add" (see the module docstring).
        other: (..., n) for "mul" and "add" (the gate, the residual), else None.

    Returns:
        (..., n) in x's dtype.

    Raises:
        InputError: an unknown epilogue, or `other` given or missing against it.
    """

    _check(epilogue, other)
    y = linear(x, weight, bias)  # `ops.linear` (set by the dispatcher)
    if epilogue == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if epilogue == "mul":
        return y * other
    return other + y


_DENSE = (torch.Tensor, torch.nn.Parameter)  # not a quantized or other tensor subclass
_ATTR = {"gelu_tanh": ("gelu", "tanh"), "mul": ("mul", None), "add": ("add", None)}
_onednn_ok: bool | None = None  # None: not yet tried; False: failed once, never again


def _onednn_available() -> bool:
    global _onednn_ok
    if _onednn_ok is None:
        _onednn_ok = bool(
            torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        )
    return _onednn_ok


def _applies(x: Tensor, weight: Tensor, bias: Tensor | None, other: Tensor | None) -> bool:
    """Whether the oneDNN path takes these tensors (else the reference runs)."""
    bf16 = torch.bfloat16
    tensors = [t for t in (x, weight, bias, other) if t is not None]
    return (
        x.is_cpu
        and x.dtype == bf16
        and all(type(t) in _DENSE and t.dtype == bf16 for t in tensors)
        and weight.dim() == 2
        and weight.is_contiguous()
        and x.numel() // max(x.shape[-1], 1) > MIN_ROWS
        and (other is None or other.shape == (*x.shape[:-1], weight.shape[0]))
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and not torch.compiler.is_compiling()
        and _onednn_available()
    )


def linear_epilogue_onednn(
    x: Tensor, weight: Tensor, bias: Tensor | None, epilogue: str, other: Tensor | None = None
) -> Tensor:
    """`linear_epilogue_ref` as one oneDNN matmul with a post-op (same arguments and
    returns), where it applies (see the module docstring); else the reference."""
    global _onednn_ok
    _check(epilogue, other)
    if not _applies(x, weight, bias, other):
        return linear_epilogue_ref(x, weight, bias, epilogue, other)
    attr, algorithm = _ATTR[epilogue]
    x = x.contiguous()
    try:
        if other is None:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, [], algorithm)
        return torch.ops.mkldnn._linear_pointwise.binary(x, other.contiguous(), weight, bias, attr)
    except RuntimeError:  # a build whose oneDNN lacks the op or the dtype: never again
        _onednn_ok = False
        return linear_epilogue_ref(x, weight, bias, epilogue, other)
