"""Weight-only int4 matmul: 4-bit codes in groups along the input dimension.

Format (what `rgemma.quantize(model, "int4")` stores per linear, weight (n, k)):

* codes `q` (n, k) in [0, 15], two per byte (uint8 (n, k // 2)), in one of two
  layouts: "plain" (row-major; byte j of row i holds column 2j in its low nibble and
  column 2j + 1 in its high nibble), or "cpu-packed" (the layout of torch's CPU int4
  kernel, `torch._convert_weight_to_int4pack_for_cpu`: blocks of rows, ISA-dependent;
  `cpu_packed_layout` finds which on this machine);
* `scale_zero` (k // g, n, 2) bfloat16: for group j of g input columns of row i,
  `w[i, c] = (q[i, c] - 8) * scale_zero[j, i, 0] + scale_zero[j, i, 1]`
  (asymmetric: the zero is the group's minimum + 8 steps; torch's and gpt-fast's
  convention).

* `int4_matmul_ref`: unpacks the codes (either layout, pure torch), dequantizes
  to float32 in row blocks (bounded memory, even for a 256,000-row head) and
  multiplies; the output is in x's dtype. The specification.
* `int4_matmul_kernel`: `torch._weight_int4pack_mm_for_cpu` (bfloat16 activations,
  float32 accumulation) on "cpu-packed" codes for up to `INT4_KERNEL_MAX_ROWS` rows;
  anything else takes the reference. Measured on an AMD EPYC (Zen 4, AVX-512 BF16,
  1 thread) on the reduced-2B matrices: 4.0-5.1x a bfloat16 `F.linear` at one
  row, 1.4x at 8 rows, 0.4-0.5x at 64 rows (compute-bound: dequantizing the
  whole weight once and one dense matmul is faster there).

Official counterpart: none (the official code has no quantization).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..errors import InputError

#: Group sizes (input columns per scale and zero) the CPU kernel accepts.
INT4_GROUP_SIZES = (32, 64, 128, 256)
#: Up to this many rows per call the int4 kernel is used (see the module docstring).
INT4_KERNEL_MAX_ROWS = 16
#: Rows of a "cpu-packed" block the kernel requires: n must be a multiple of it.
INT4_PACK_ROWS = 64
# torch's CPU packing, by ISA: (rows per block, nibbles interleaved). AVX-512: blocks
# of 64 rows, byte (k, d) = row d low | row d + 32 high; AVX2: the same with 32 rows;
# the scalar build: 32 rows, byte (k, d) = row 2d low | row 2d + 1 high.
_LAYOUTS = {"blocked64": (64, False), "blocked32": (32, False), "interleaved32": (32, True)}


def int4_kernel_available() -> bool:
    """Whether this torch has the CPU int4 kernel and its packing function."""
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch, "_convert_weight_to_int4pack_for_cpu"
    )


def pack_int4(codes: Tensor) -> Tensor:
    """(n, k) integer codes in [0, 15] -> (n, k // 2) uint8, "plain" layout."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_int4(w: Tensor) -> Tensor:
    """(..., k // 2) uint8, "plain" layout -> (..., k) uint8 codes in [0, 15] (any
    leading dimensions: a weight's rows, or an embedding's rows gathered per token)."""
    return torch.stack([w & 0xF, w >> 4], dim=-1).reshape(*w.shape[:-1], -1)


def _from_cpu_packed(w: Tensor, n: int, k: int, layout: str) -> Tensor:
    """Codes (n, k) uint8 from torch's CPU-packed (n, k // 2) uint8."""
    block, interleaved = _LAYOUTS[layout]
    b = w.reshape(n // block, k, block // 2)  # (blocks, k, bytes)
    lo, hi = b & 0xF, b >> 4
    rows = torch.stack([lo, hi], -1) if interleaved else torch.stack([lo, hi], -2)
    return rows.reshape(n // block, k, block).transpose(1, 2).reshape(n, k)


@functools.cache
def cpu_packed_layout() -> str | None:
    """Which layout torch's CPU int4 packing writes on this machine, found once by
    packing random codes and reading them back; None if no kernel or none matches
    (the int4 kernel is then not used: codes stay "plain", on the reference)."""
    if not int4_kernel_available():
        return None
    codes = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0))
    packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
    for name in _LAYOUTS:
        try:
            if torch.equal(_from_cpu_packed(packed, 128, 64, name).long(), codes):
                return name
        except RuntimeError:  # the bytes do not reshape to this layout
            continue
    return None


def can_use_kernel(n: int, k: int, group_size: int) -> bool:
    """Whether an (n, k) weight in groups of `group_size` can be "cpu-packed" here."""
    return (
        cpu_packed_layout() is not None
        and n % INT4_PACK_ROWS == 0
        and k % group_size == 0
        and group_size in INT4_GROUP_SIZES
    )


def to_cpu_packed(w: Tensor) -> Tensor:
    """ "plain" (n, k // 2) uint8 -> torch's CPU-packed layout (see `can_use_kernel`)."""
    codes = unpack_int4(w).to(torch.int32)
    return torch._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 2)


def int4_codes(w: Tensor, k: int, packed: bool, rows: Tensor | slice | None = None) -> Tensor:
    """Codes (r, k) uint8 of the rows `rows` (an index tensor or a slice; None: all)
    of an int4 weight in either layout. For "cpu-packed" codes a slice must start and
    end on multiples of the layout's block."""
    if not packed:
        return unpack_int4(w if rows is None else w[rows])
    layout = cpu_packed_layout()
    if layout is None:
        raise InputError("cpu-packed int4 weights need torch's CPU int4 kernel (torch >= 2.5)")
    block, interleaved = _LAYOUTS[layout]
    n = w.shape[0]
    if rows is None or isinstance(rows, slice):
        start, stop, _ = (rows or slice(None)).indices(n)
        if start % block or (stop % block and stop != n):
            raise InputError(f"cpu-packed int4 rows {start}:{stop} are not on {block}-row blocks")
        return _from_cpu_packed(w[start:stop], stop - start, k, layout)
    half = block // 2
    j = rows % block
    d, nibble = (j // 2, j % 2) if interleaved else (j % half, j // half)
    b = w.reshape(n // block, k, half)[rows // block, :, d]  # (r, k) bytes
    return (b >> (4 * nibble)[..., None]) & 0xF


def int4_dequantize(
    w: Tensor, scale_zero: Tensor, group_size: int, packed: bool, rows: slice | None = None
) -> Tensor:
    """The float32 weight (r, k) of rows `rows` (None: all n) of an int4 weight."""
    k = scale_zero.shape[0] * group_size
    q = int4_codes(w, k, packed, rows).float()  # (r, k)
    sz = scale_zero if rows is None else scale_zero[:, rows]  # (k // g, r, 2)
    scale = sz[..., 0].float().T.repeat_interleave(group_size, dim=1)  # (r, k)
    zero = sz[..., 1].float().T.repeat_interleave(group_size, dim=1)
    return (q - 8.0) * scale + zero


def int4_matmul_ref(
    x: Tensor, w: Tensor, scale_zero: Tensor, group_size: int, packed: bool = False
) -> Tensor:
    """`x @ W.T` for an int4 weight W (n, k): the specification.

    Args:
        x: (..., k) float activations.
        w: (n, k // 2) uint8 codes, "plain" or (`packed`) "cpu-packed" layout.
        scale_zero: (k // g, n, 2) bfloat16 scales and zeros (module docstring).
        group_size: g, input columns per scale and zero.
        packed: whether `w` is in torch's CPU-packed layout.
    Returns:
        (..., n) in x's dtype, computed in float32 from the dequantized weight (in
        blocks of rows, so a 256,000-row head never exists in float32 whole).
    """
    lead, k = x.shape[:-1], x.shape[-1]
    n = scale_zero.shape[1]
    x2 = x.reshape(-1, k).float()  # (r, k)
    block = max(INT4_PACK_ROWS, (1 << 22) // max(1, k) // INT4_PACK_ROWS * INT4_PACK_ROWS)
    out = torch.empty(x2.shape[0], n, dtype=torch.float32, device=x.device)
    for i in range(0, n, block):
        rows = slice(i, min(n, i + block))
        out[:, rows] = x2 @ int4_dequantize(w, scale_zero, group_size, packed, rows).T
    return out.to(x.dtype).reshape(*lead, n)


def int4_matmul_kernel(
    x: Tensor, w: Tensor, scale_zero: Tensor, group_size: int, packed: bool = False
) -> Tensor:
    """`int4_matmul_ref` through torch's CPU int4 kernel where it applies (same
    arguments): "cpu-packed" codes, a CPU tensor, at most `INT4_KERNEL_MAX_ROWS` rows.
    The kernel takes bfloat16 activations and returns bfloat16 (float32 accumulation);
    the result is cast to x's dtype."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if packed and x.device.type == "cpu" and x2.shape[0] <= INT4_KERNEL_MAX_ROWS:
        y = torch._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), w, group_size, scale_zero)
        return y.to(x.dtype).reshape(*lead, -1)
    return int4_matmul_ref(x, w, scale_zero, group_size, packed)
