"""Every numeric fast path beside its reference, behind one device-aware dispatcher.

| op | reference | other implementations | module |
| --- | --- | --- | --- |
| `scan` (RG-LRU recurrence) | `linear_scan_ref` | `chunked` | `ops/scan.py` |
| `conv1d` (Griffin Conv1D) | `conv1d_ref` | `shifted` | `ops/conv1d.py` |
| `attention` (local MQA) | `local_attention_ref` | `sdpa`, `fused`, `blocked` | `ops/attention.py` |
| `linear` | `linear_ref` (`F.linear`) | `mv`, `tuned` (measured: F.linear, mv, native) | `ops/linear.py` |
| `int8_matmul` (weight-only) | `int8_matmul_ref` | `kernel` (measured: torch's, native) | `ops/linear.py` |
| `int4_matmul` (weight-only) | `int4_matmul_ref` | `kernel` | `ops/quant.py` |
| `decode_attention` (one step) | `decode_attention_ref` | `split` | `ops/attention.py` |
| `rglru_gates` (RG-LRU gate math) | `rglru_gates_ref` | `fused` | `ops/rglru.py` |
| `linear_cross_entropy` (head + loss) | `linear_cross_entropy_ref` | `chunked` | `ops/loss.py` |
| `linear_epilogue` (linear + gelu / mul / add) | `linear_epilogue_ref` | `onednn` | `ops/epilogue.py` |

The model calls the dispatching functions below (`linear_scan`, `conv1d`,
`local_attention`, `linear`, `int8_matmul`); each runs the implementation that
`resolve` names, in this order of precedence:

1. the call's `impl=` argument;
2. `use(...)` from Python (a plain call, or a `with` block that restores on exit);
3. the environment variable `RGEMMA_OPS`: `ref` forces every reference,
   `scan=ref,attention=sdpa` chooses per op (read when the first op runs on a device
   type, and again after `use` or `reset`);
4. `auto`: the entry of `AUTO` for the tensor's device type (CPU: the measured fast
   paths; CUDA and other devices: the paths that are correct there today, plus any
   Triton kernel `rgemma.ops.triton` provides, imported on first use).

An unknown op or implementation name is an `InputError` that lists the choices;
`describe(device)` names what each op resolves to (`why=True` adds how each was
chosen and the machine-measured choices behind "tuned", e.g. which GEMV kernel one
row takes per weight shape); `reset()` drops the `use` choices. Every implementation is tested
against its reference in `tests/ops/` (outputs, final state, gradients).
The native kernels (`ops/native.py`, C in `ops/_native.c`, built at install) are
candidates of "tuned" linear and "kernel" int8, never chosen unless measured faster.
Pattern: mamba's `ops/selective_scan_interface.py`; the official JAX code's
`resolve_scan_type` picks its scan per device in the same way.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import InputError
from . import epilogue as _epilogue
from . import native
from .attention import (
    decode_attention_ref,
    decode_attention_split,
    local_attention_blocked,
    local_attention_fused,
    local_attention_ref,
    local_attention_sdpa,
)
from .conv1d import conv1d_ref, conv1d_shifted
from .epilogue import linear_epilogue_onednn, linear_epilogue_ref
from .linear import (
    int8_matmul_kernel,
    int8_matmul_ref,
    kernel_choices,
    linear_mv,
    linear_ref,
    linear_tuned,
)
from .loss import linear_cross_entropy_chunked, linear_cross_entropy_ref
from .quant import int4_matmul_kernel, int4_matmul_ref
from .rglru import rglru_gates_fused, rglru_gates_ref
from .scan import linear_scan_chunked, linear_scan_ref

ENV_VAR = "RGEMMA_OPS"

#: Each op's implementations by name; "ref" is the specification.
IMPLEMENTATIONS: dict[str, dict[str, Callable]] = {
    "scan": {"ref": linear_scan_ref, "chunked": linear_scan_chunked},
    "conv1d": {"ref": conv1d_ref, "shifted": conv1d_shifted},
    "attention": {
        "ref": local_attention_ref,
        "sdpa": local_attention_sdpa,
        "fused": local_attention_fused,
        "blocked": local_attention_blocked,
    },
    "linear": {"ref": linear_ref, "mv": linear_mv, "tuned": linear_tuned},
    "int8_matmul": {"ref": int8_matmul_ref, "kernel": int8_matmul_kernel},
    "int4_matmul": {"ref": int4_matmul_ref, "kernel": int4_matmul_kernel},
    "decode_attention": {"ref": decode_attention_ref, "split": decode_attention_split},
    "rglru_gates": {"ref": rglru_gates_ref, "fused": rglru_gates_fused},
    "linear_cross_entropy": {
        "ref": linear_cross_entropy_ref,
        "chunked": linear_cross_entropy_chunked,
    },
    "linear_epilogue": {"ref": linear_epilogue_ref, "onednn": linear_epilogue_onednn},
}

#: What "auto" runs per device type; a type not listed takes "cuda"'s entry.
#: attention is "blocked" on CPU: the reference per block of 128 queries over only
#: the keys the block's mask reaches; from 1,024 queries 1.5-2.8x the reference's
#: speed (a fresh prefill or training step, one document per row or packed; a prompt
#: continuing a full 2,048-key window 2x), within noise of it below (the
#: `train_vs_hf.py --ops` and ops/attention.py measurements). On CUDA attention is
#: "fused" (SDPA's memory-efficient kernel with the exact mask),
#: and scan and conv1d are "triton" wherever `rgemma.ops.triton` imports.
AUTO: dict[str, dict[str, str]] = {
    "cpu": {
        "scan": "chunked",
        "conv1d": "shifted",
        "attention": "blocked",
        "linear": "tuned",
        "int8_matmul": "kernel",
        "int4_matmul": "kernel",
        "decode_attention": "split",
        "rglru_gates": "fused",
        "linear_cross_entropy": "chunked",
        "linear_epilogue": "onednn",
    },
    "cuda": {
        "scan": "chunked",
        "conv1d": "shifted",
        "attention": "fused",
        "linear": "ref",
        "int8_matmul": "ref",
        "int4_matmul": "ref",
        "decode_attention": "split",
        # "fused" finds document starts with nonzero(): a host sync per layer on CUDA.
        "rglru_gates": "ref",
        "linear_cross_entropy": "chunked",
        "linear_epilogue": "ref",
    },
}


_triton: dict[str, Callable] | None = None
_triton_missing = ""  # why `rgemma.ops.triton` did not import, for the error message


def _triton_kernels() -> dict[str, Callable]:
    """{op: kernel} from `rgemma.ops.triton` (its `KERNELS`), imported on first use;
    {} when that module or Triton itself is absent. Its kernels (the RG-LRU scan and
    the Conv1D) become the "triton" implementation of their op, chosen by "auto" on
    CUDA; forcing "triton" without them is an InputError naming the missing package."""
    global _triton, _triton_missing
    if _triton is None:
        try:
            _triton = dict(importlib.import_module(".triton", __name__).KERNELS)
        except ImportError as err:
            _triton, _triton_missing = {}, f"{type(err).__name__}: {err}".splitlines()[0]
    return _triton


def _choices(op: str) -> dict[str, Callable]:
    """{name: function} for `op`, the Triton kernel included when there is one."""
    if op not in IMPLEMENTATIONS:
        raise InputError(f"unknown op {op!r}; choose from {', '.join(IMPLEMENTATIONS)}")
    kernel = _triton_kernels().get(op)
    return IMPLEMENTATIONS[op] if kernel is None else {**IMPLEMENTATIONS[op], "triton": kernel}


def _check(op: str, impl: str) -> str:
    """`impl` if it names an implementation of `op` (or is "auto"), else InputError."""
    names = _choices(op)
    if impl == "triton" and impl not in names and _triton_missing:
        raise InputError(
            f"{op} impl 'triton' needs the triton package (pip install triton), which "
            f"did not import ({_triton_missing}); choose from auto, {', '.join(names)}"
        )
    if impl != "auto" and impl not in names:
        raise InputError(f"unknown {op} impl {impl!r}; choose from auto, {', '.join(names)}")
    return impl


def _parse(spec: str | None, source: str) -> dict[str, str]:
    """Parse `ref` or `scan=ref,attention=sdpa` into {op: impl}; a bare name is every op's."""
    chosen: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in (spec or "").split(","))):
        op, sep, impl = item.rpartition("=")
        try:
            for name in [op.strip()] if sep else IMPLEMENTATIONS:
                chosen[name] = _check(name, impl.strip())
        except InputError as e:
            raise InputError(f"{source}: {e}") from None
    return chosen


_forced: dict[str, str] = {}  # {op: impl} set by use()
# Per device type, {op: (name, function)}: built on the first call on that device type
# (reading RGEMMA_OPS then), emptied by use() and reset(). The model's hot path is
# one lookup here.
_tables: dict[str, dict[str, tuple[str, Callable]]] = {}


def _table(kind: str) -> dict[str, tuple[str, Callable]]:
    table = _tables.get(kind)
    if table is None:
        env = _parse(os.environ.get(ENV_VAR), ENV_VAR)
        table = {}
        for op in IMPLEMENTATIONS:
            name = _forced.get(op) or env.get(op, "auto")
            if name == "auto":
                triton = kind == "cuda" and op in _triton_kernels()
                name = "triton" if triton else AUTO.get(kind, AUTO["cuda"])[op]
            fn = _triton_kernels()[op] if name == "triton" else IMPLEMENTATIONS[op][name]
            table[op] = (name, fn)
        _tables[kind] = table
    return table


def _device_type(device: torch.device | str) -> str:
    return device.type if isinstance(device, torch.device) else torch.device(device).type


def resolve(op: str, device: torch.device | str = "cpu", impl: str | None = None) -> str:
    """The name of the implementation `op` runs on `device`.

    Args:
        op: "scan", "conv1d", "attention", "linear" or "int8_matmul".
        device: a torch device or its type ("cpu", "cuda", ...).
        impl: a name that overrides every other choice; None or "auto" defers to
            `use`, then `RGEMMA_OPS`, then `AUTO`.

    Raises:
        InputError: an unknown op or implementation name (in `impl`, `use` or
            `RGEMMA_OPS`), listing the choices.
    """
    if impl and _check(op, impl) != "auto":
        return impl
    _choices(op)  # an unknown op raises
    return _table(_device_type(device))[op][0]


def _impl(op: str, x: Tensor, impl: str | None) -> Callable:
    if impl is None or impl == "auto":  # the hot path: one lookup
        return _table("cpu" if x.is_cpu else x.device.type)[op][1]
    return _choices(op)[_check(op, impl)]


def describe(device: torch.device | str = "cpu", why: bool = False) -> dict[str, str]:
    """{op: implementation name} that each op runs now on `device` (for logs).

    With `why`, each name is followed by what chose it ("(use)", "(RGEMMA_OPS)",
    "(auto)"), and the machine-measured choices made so far are added as entries of
    their own, e.g. {"linear, 1 row, bfloat16 (256000, 2560), 1 thread": "native
    (F.linear 120000 us, torch.mv 150000 us, native 70000 us)"}: "tuned" products
    measure per weight shape and row count at first use, so those appear once the
    model has run; with the native kernels' instruction set ("native kernels").
    """
    names = {op: name for op, (name, _) in _table(_device_type(device)).items()}
    if not why:
        return names
    env = _parse(os.environ.get(ENV_VAR), ENV_VAR)
    out = {}
    for op, name in names.items():
        source = "use" if op in _forced else ENV_VAR if op in env else "auto"
        out[op] = f"{name} ({source})"
    if _device_type(device) == "cpu":
        out["native kernels"] = (
            f"{native.isa()} (built at install)"
            if native.available()
            else native.unavailable_reason()
        )
    out.update(kernel_choices())
    return out


def reset() -> None:
    """Forget every `use` choice and read `RGEMMA_OPS` again at the next op."""
    _forced.clear()
    _tables.clear()


class use:
    """Force implementations from Python, before `RGEMMA_OPS` and `AUTO`.

    `use("ref")` forces every reference; `use(scan="ref", attention="sdpa")` or
    `use("scan=ref,attention=sdpa")` choose per op; "auto" undoes an earlier choice
    (back to `RGEMMA_OPS`, then `AUTO`). A plain call lasts until changed (or
    `reset()`); as a context manager (`with use("ref"): ...`) it restores the
    previous choices on exit. Process-wide, not per thread.

    Raises:
        InputError: an unknown op or implementation name, listing the choices (and
            nothing is changed).
    """

    def __init__(self, spec: str | None = None, **choices: str):
        chosen = _parse(spec, "use")
        for op, impl in choices.items():
            chosen[op] = _check(op, impl)
        self._previous = dict(_forced)
        for op, impl in chosen.items():
            if impl == "auto":
                _forced.pop(op, None)  # back to RGEMMA_OPS, then AUTO
            else:
                _forced[op] = impl
        _tables.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        _forced.clear()
        _forced.update(self._previous)
        _tables.clear()


# ----------------------------------------------------------------------------------
# The dispatching functions the model calls (arguments as in each reference)
# ----------------------------------------------------------------------------------
def linear_scan(
    a: Tensor, x: Tensor, h0: Tensor | None = None, *, impl: str | None = None
) -> tuple[Tensor, Tensor]:
    """`h_t = a_t * h_{t-1} + x_t`: a, x (b, t, e), h0 (b, e) float32 or None ->
    (y (b, t, e) in x's dtype, h_last (b, e) float32). See `ops.scan`."""
    return _impl("scan", x, impl)(a, x, h0)


def conv1d(
    x: Tensor,
    segment_pos: Tensor,
    conv_state: Tensor,
    w: Tensor,
    b: Tensor,
    *,
    impl: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Griffin's Conv1D: x (b, t, e), segment_pos (b, t), conv_state (b, k, e),
    w (k + 1, e), b (e,) -> (out (b, t, e), new conv_state). See `ops.conv1d`."""
    return _impl("conv1d", x, impl)(x, segment_pos, conv_state, w, b)


def local_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    q_doc: Tensor,
    k_doc: Tensor,
    window: int,
    self_offset: int,
    *,
    impl: str | None = None,
) -> Tensor:
    """Local multi-query attention: q (b, t, h, hd) pre-scaled, k, v (b, s, hd),
    positions and documents (b, t) / (b, s) -> (b, t, h, hd). See `ops.attention`."""
    fn = _impl("attention", q, impl)
    return fn(q, k, v, q_pos, k_pos, q_doc, k_doc, window, self_offset)


def linear(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, *, impl: str | None = None
) -> Tensor:
    """`F.linear(x, weight, bias)`: x (..., k), weight (n, k) -> (..., n). See `ops.linear`."""
    return _impl("linear", x, impl)(x, weight, bias)


def decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cache_k: Tensor,
    cache_v: Tensor,
    cache_pos: Tensor,
    q_pos: Tensor,
    window: int,
    *,
    impl: str | None = None,
) -> Tensor:
    """One decode step of local attention over the state's window plus the new key:
    q (b, h, hd) pre-scaled, k, v (b, hd), cache_k, cache_v (b, w, hd), cache_pos
    (b, w), q_pos (b,) -> (b, h, hd). See `ops.attention`."""
    fn = _impl("decode_attention", q, impl)
    return fn(q, k, v, cache_k, cache_v, cache_pos, q_pos, window)


def int8_matmul(
    x: Tensor,
    q: Tensor,
    scale: Tensor,
    scale_bf16: Tensor | None = None,
    *,
    impl: str | None = None,
) -> Tensor:
    """`x @ (q * scale[:, None]).T`: x (..., k), q (n, k) int8, scale (n,) float32
    -> (..., n) in x's dtype. See `ops.linear`."""
    return _impl("int8_matmul", x, impl)(x, q, scale, scale_bf16)


def int4_matmul(
    x: Tensor,
    w: Tensor,
    scale_zero: Tensor,
    group_size: int,
    packed: bool = False,
    *,
    impl: str | None = None,
) -> Tensor:
    """`x @ W.T` for a group-wise int4 weight W (n, k): x (..., k), w (n, k // 2) uint8
    codes, scale_zero (k // g, n, 2) bfloat16 -> (..., n) in x's dtype. See `ops.quant`."""
    return _impl("int4_matmul", x, impl)(x, w, scale_zero, group_size, packed)


def rglru_gates(
    x: Tensor,
    gate_x: Tensor,
    gate_a: Tensor,
    a_param: Tensor,
    segment_pos: Tensor,
    pad: Tensor | None = None,
    *,
    impl: str | None = None,
) -> tuple[Tensor, Tensor]:
    """The RG-LRU's gate math: x and the gates' pre-activations (b, t, e), a_param
    (e,), segment_pos (b, t), pad None or (b, t) bool -> (a, normed_x), both (b, t, e)
    float32, the scan's inputs. See `ops.rglru`."""
    return _impl("rglru_gates", x, impl)(x, gate_x, gate_a, a_param, segment_pos, pad)


def linear_cross_entropy(
    h: Tensor,
    weight: Tensor,
    targets: Tensor,
    loss_mask: Tensor,
    soft_cap: float | None = None,
    chunk_size: int | None = None,
    *,
    impl: str | None = None,
) -> Tensor:
    """The output head and the loss: h (n, d) or (b, t, d), weight (v, d) (the tied
    embedding), targets and loss_mask h's leading shape, soft_cap (None: none) -> the
    float32 sum of the masked NLLs of the soft-capped logits `h @ weight.T`; under
    autocast the matmul runs in its dtype. The "chunked" implementation never holds
    (tokens x vocab) logits (`chunk_size` rows at a time). See `ops.loss`."""
    fn = _impl("linear_cross_entropy", h, impl)
    return fn(h, weight, targets, loss_mask, soft_cap, chunk_size)


def linear_epilogue(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    epilogue: str,
    other: Tensor | None = None,
    *,
    impl: str | None = None,
) -> Tensor:
    """A linear with the next element-wise op fused: x (..., k), weight (n, k), bias
    (n,) or None, epilogue "gelu_tanh" | "mul" | "add", other (..., n) for "mul" /
    "add" -> (..., n) in x's dtype. See `ops.epilogue`."""
    return _impl("linear_epilogue", x, impl)(x, weight, bias, epilogue, other)


_epilogue.linear = linear  # the epilogue reference's linear is this dispatcher's

__all__ = [
    "AUTO",
    "ENV_VAR",
    "IMPLEMENTATIONS",
    "conv1d",
    "decode_attention",
    "describe",
    "int4_matmul",
    "int8_matmul",
    "linear",
    "linear_cross_entropy",
    "linear_epilogue",
    "linear_scan",
    "local_attention",
    "reset",
    "resolve",
    "rglru_gates",
    "use",
]
