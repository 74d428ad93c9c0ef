"""Weight-only int8 and int4 quantization for fast few-row decode on CPU.

Linear and embedding weights become integers; what the official maintainers warn
needs care stays in float32: the RG-LRU parameters and its recurrence, the Conv1D,
the norms, biases, and the state.

* "int8": one float scale per output channel (symmetric, absmax / 127). The
  products are `rgemma.ops.int8_matmul`: on CPU, decode (few rows) runs
  `torch._weight_int8pack_mm` (int8 weights, bfloat16 activations), which reads
  half the bytes of bfloat16 weights; many rows (prefill) dequantize the weight to
  the activation dtype once per call and use a dense matmul.
* "int4": 4-bit codes with a bfloat16 scale and zero per group of `group_size`
  input columns (asymmetric, min/max over the group; `rgemma.ops.quant` describes
  the format). The products are `rgemma.ops.int4_matmul`: on CPU, few rows run
  torch's `_weight_int4pack_mm_for_cpu` on codes packed for it once at
  quantization; many rows dequantize in row blocks. The default group size,
  `INT4_DEFAULT_GROUP_SIZE`, is the one whose perplexity on the bundled model's
  validation text stayed within 3% of float32 at the best speed (measured; see
  benchmarks/RESULTS.md).

Batch-1 decode reads every weight once per token, so fewer weight bytes is the
speed-up; activations are never quantized (a batch equals its rows alone).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import InputError
from .model import Embedder, Griffin, MLPBlock
from .ops import int4_matmul, int8_matmul, resolve
from .ops.quant import INT4_GROUP_SIZES, can_use_kernel, int4_codes, pack_int4, to_cpu_packed


def quantize_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per output channel.

    Args:
        weight: (n, k) float, n output channels.
    Returns:
        (int8 (n, k), float32 scales (n,)) with `weight ~= q * scale[:, None]`.
    """
    n = weight.shape[0]
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(n, dtype=torch.float32, device=weight.device)
    step = max(1, (1 << 24) // max(1, weight.shape[1]))  # rows per chunk: ~64 MB of float32
    for i in range(0, n, step):  # chunked, so a 256k-row embedding needs no full copy
        w = weight[i : i + step].detach().float()
        s = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q[i : i + step] = torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8)
        scale[i : i + step] = s
    return q, scale


class Int8Linear(nn.Module):
    """Drop-in for `nn.Linear` with an int8 weight (n, k), float32 scales and bias."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        q, scale = quantize_per_channel(weight)
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale)
        self.register_buffer("scale_bf16", scale.to(torch.bfloat16))
        self.register_buffer("bias", bias.detach().float() if bias is not None else None)
        self.out_features, self.in_features = weight.shape

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        y = int8_matmul(x, self.weight_int8, self.scale, self.scale_bf16)
        return y + self.bias.to(y.dtype) if self.bias is not None else y


#: Group size of `quantize(model, "int4")` when none is given: measured on the bundled
#: model's validation text (benchmarks/RESULTS.md, "int4 group size").
INT4_DEFAULT_GROUP_SIZE = 32


def quantize_int4_groupwise(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Asymmetric 4-bit codes per group of `group_size` input columns.

    Args:
        weight: (n, k) float; k must be a multiple of `group_size`.
        group_size: input columns per scale and zero.
    Returns:
        (codes (n, k // 2) uint8 in the "plain" layout of `rgemma.ops.quant`,
        scale_zero (k // g, n, 2) bfloat16) with
        `weight[i, c] ~= (q[i, c] - 8) * scale[c // g, i] + zero[c // g, i]`: the scale is
        (max - min) / 15 over the group and the zero min + 8 steps, both rounded to
        bfloat16 first and the codes computed against the rounded values, so the error
        is at most half a step (plus the bfloat16 rounding of the zero).
    """
    n, k = weight.shape
    codes = torch.empty(n, k // 2, dtype=torch.uint8, device=weight.device)
    scale_zero = torch.empty(k // group_size, n, 2, dtype=torch.bfloat16, device=weight.device)
    step = max(1, (1 << 24) // max(1, k))  # rows per chunk: ~64 MB of float32
    for i in range(0, n, step):
        w = weight[i : i + step].detach().float().reshape(-1, k // group_size, group_size)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # (r, k // g)
        scale = ((hi - lo).clamp(min=1e-8) / 15).to(torch.bfloat16)
        zero = (lo + 8 * scale.float()).to(torch.bfloat16)
        q = torch.round((w - zero.float()[..., None]) / scale.float()[..., None] + 8)
        codes[i : i + step] = pack_int4(q.clamp(0, 15).reshape(-1, k))
        scale_zero[:, i : i + step] = torch.stack([scale, zero], dim=-1).transpose(0, 1)
    return codes, scale_zero


def _int4_group_size(k: int, group_size: int, where: str) -> int:
    """The largest of `INT4_GROUP_SIZES` up to `group_size` that divides k."""
    for g in sorted(INT4_GROUP_SIZES, reverse=True):
        if g <= group_size and k % g == 0:
            return g
    raise InputError(
        f"int4 quantization needs input widths that are multiples of 32; {where} has {k}"
    )


class Int4Linear(nn.Module):
    """Drop-in for `nn.Linear` with an int4 weight (n, k) in groups along k.

    Buffers: `weight_int4` (n, k // 2) uint8 codes (torch's CPU-packed layout when
    `packed`, else "plain"), `scale_zero` (k // g, n, 2) bfloat16, `bias` (n,) float32.
    The codes are packed for the CPU kernel when it applies to this shape on this
    machine (`rgemma.ops.quant.can_use_kernel`) and the int4 op resolves to it.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, group_size: int, where: str = ""):
        super().__init__()
        n, k = weight.shape
        self.out_features, self.in_features = n, k
        self.group_size = _int4_group_size(k, group_size, where or f"a ({n}, {k}) weight")
        codes, scale_zero = quantize_int4_groupwise(weight, self.group_size)
        self.packed = (
            weight.device.type == "cpu"
            and can_use_kernel(n, k, self.group_size)
            and resolve("int4_matmul", "cpu") == "kernel"
        )
        self.register_buffer("weight_int4", to_cpu_packed(codes) if self.packed else codes)
        self.register_buffer("scale_zero", scale_zero)
        self.register_buffer("bias", bias.detach().float() if bias is not None else None)

    def forward(self, x: Tensor) -> Tensor:
        y = int4_matmul(x, self.weight_int4, self.scale_zero, self.group_size, self.packed)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        layout = "cpu-packed" if self.packed else "plain"
        return f"{self.in_features}, {self.out_features}, group_size={self.group_size}, {layout}"


class QuantizedMLPBlock(nn.Module):
    """`MLPBlock` with quantized projections; both up projections (`ffw_up.gate_proj`
    and `ffw_up.up_proj`, (m, d) each) are concatenated once into one (2m, d) matrix,
    one product per call. `make(weight, bias, where)` builds each quantized linear."""

    def __init__(self, mlp: MLPBlock, make):
        super().__init__()
        gate, up = mlp.ffw_up.gate_proj, mlp.ffw_up.up_proj
        self.expanded_width = gate.weight.shape[0]
        w = torch.cat([gate.weight.detach(), up.weight.detach()])  # (2m, d)
        b = torch.cat([gate.bias.detach(), up.bias.detach()])  # (2m,)
        self.up = make(w, b, "ffw_up")
        self.ffw_down = make(mlp.ffw_down.weight, mlp.ffw_down.bias, "ffw_down")

    def forward(self, x: Tensor) -> Tensor:
        up = self.up(x)
        m = self.expanded_width
        return self.ffw_down(F.gelu(up[..., :m], approximate="tanh") * up[..., m:])


Int8MLPBlock = QuantizedMLPBlock  # the name before int4


class Int8Embedder(nn.Module):
    """`Embedder` with an int8 table (v, d) and one scale per token row; the tied
    output head uses the same int8 table."""

    def __init__(self, embedder: Embedder):
        super().__init__()
        q, scale = quantize_per_channel(embedder.input_embedding)
        self.register_buffer("table_int8", q)
        self.register_buffer("row_scale", scale)
        self.register_buffer("row_scale_bf16", scale.to(torch.bfloat16))
        self.scale = embedder.scale

    def encode(self, tokens: Tensor) -> Tensor:
        x = F.embedding(tokens, self.table_int8).float() * self.row_scale[tokens][..., None]
        return x * self.scale if self.scale != 1.0 else x

    def decode(self, x: Tensor) -> Tensor:
        return int8_matmul(x, self.table_int8, self.row_scale, self.row_scale_bf16)

    @property
    def input_embedding(self) -> Tensor:  # for dtype/device queries (init_state)
        return self.row_scale


class Int4Embedder(nn.Module):
    """`Embedder` with an int4 table (v, d) in groups along d (an `Int4Linear` without
    bias); the tied output head is that linear, and `encode` reads the codes of the
    tokens' rows only (from either layout) and dequantizes them in float32."""

    def __init__(self, embedder: Embedder, group_size: int):
        super().__init__()
        self.table = Int4Linear(embedder.input_embedding, None, group_size, "the embedding")
        self.scale = embedder.scale
        device = embedder.input_embedding.device
        self.register_buffer("dtype_probe", torch.empty(0, device=device), persistent=False)

    def encode(self, tokens: Tensor) -> Tensor:
        t = self.table
        q = int4_codes(t.weight_int4, t.in_features, t.packed, tokens).float()  # (b, t, d)
        sz = t.scale_zero[:, tokens].float().movedim(0, -2)  # (b, t, d // g, 2)
        scale = sz[..., 0].repeat_interleave(t.group_size, dim=-1)  # (b, t, d)
        zero = sz[..., 1].repeat_interleave(t.group_size, dim=-1)
        x = (q - 8.0) * scale + zero
        return x * self.scale if self.scale != 1.0 else x

    def decode(self, x: Tensor) -> Tensor:
        return self.table(x)

    @property
    def input_embedding(self) -> Tensor:  # for dtype/device queries (init_state)
        return self.dtype_probe


QUANTIZATION_MODES = ("int8", "int4")


def quantize(model: Griffin, mode: str = "int8", *, group_size: int | None = None) -> Griffin:
    """Quantize a model's weights in place and return it.

    Args:
        model: a `Griffin`; it is converted to float32 first (integer weights, float32
            everything else: RG-LRU, conv, norms, biases, state).
        mode: "int8" (weight-only, per output channel) or "int4" (weight-only, an
            asymmetric scale and zero per group of input columns).
        group_size: "int4" only: input columns per group, one of 32, 64, 128, 256
            (default `INT4_DEFAULT_GROUP_SIZE`); a weight whose width it does not
            divide takes the largest of them that does.

    Raises:
        InputError: an unknown mode or group size, not a `Griffin`, a model already
            quantized or with unmerged LoRA adapters, or (int4) an input width that is
            not a multiple of 32.
    """
    if mode not in QUANTIZATION_MODES:
        raise InputError(
            f"unknown quantization mode {mode!r}; supported: {', '.join(map(repr, QUANTIZATION_MODES))}"
        )
    if not isinstance(model, Griffin):
        raise InputError(f"quantize expects a rgemma Griffin model, got {type(model).__name__}")
    if getattr(model, "quantization", None):
        raise InputError(f"the model is already quantized ({model.quantization})")
    if any(".lora_A" in name for name, _ in model.named_parameters()):
        raise InputError(
            "the model has unmerged LoRA adapters: merge them first (rgemma.lora.merge_lora)"
        )
    if group_size is not None and (mode != "int4" or group_size not in INT4_GROUP_SIZES):
        raise InputError(
            f"group_size {group_size} is for int4 only, one of "
            f"{', '.join(map(str, INT4_GROUP_SIZES))}"
        )
    if mode == "int4":
        g = group_size or INT4_DEFAULT_GROUP_SIZE

        def make(weight, bias, where):
            return Int4Linear(weight, bias, g, where)

        embedder = Int4Embedder(model.embedder, g)
    else:

        def make(weight, bias, where):
            return Int8Linear(weight, bias)

        embedder = Int8Embedder(model.embedder)
    # Module by module, so peak memory stays near the model's own size.
    model.embedder = embedder
    for i, block in enumerate(model.blocks):
        tb = block.temporal_block
        for name, child in list(tb.named_children()):
            if isinstance(child, nn.Linear):
                setattr(tb, name, make(child.weight, child.bias, f"blocks.{i}.{name}"))
        block.mlp_block = QuantizedMLPBlock(block.mlp_block, make)
    model.float()  # what is left: RG-LRU, conv, norms (integer buffers are not touched)
    for module in model.modules():  # .float() also converted the bfloat16 scales
        if isinstance(module, Int8Linear):
            module.scale_bf16 = module.scale.to(torch.bfloat16)
        elif isinstance(module, Int8Embedder):
            module.row_scale_bf16 = module.row_scale.to(torch.bfloat16)
        elif isinstance(module, Int4Linear):
            module.scale_zero = module.scale_zero.to(torch.bfloat16)
    model.quantization = mode
    return model
