"""Weight-only int8 quantization for fast batch-1 decode on CPU.

Linear and embedding weights become int8 with one float scale per output channel
(symmetric, absmax / 127). What the official maintainers warn needs care stays in
float32: the RG-LRU parameters and its recurrence, the Conv1D, the norms, biases.

The products are `rgemma.ops.int8_matmul`: on CPU, decode (few rows) runs
`torch._weight_int8pack_mm` (int8 weights, bfloat16 activations), which reads a
quarter of the bytes of float32 weights: batch-1 decode is memory-bound, so that is
the speed-up. Many rows (prefill) dequantize the weight to the activation dtype once
per call and use a dense matmul, which is faster on CPUs without native bfloat16
matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import InputError
from .model import Embedder, Griffin, MLPBlock
from .ops import int8_matmul


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


class Int8MLPBlock(nn.Module):
    """`MLPBlock` with int8 projections; both up projections are one (2m, d) matrix."""

    def __init__(self, mlp: MLPBlock):
        super().__init__()
        w, b = mlp.ffw_up.w.detach(), mlp.ffw_up.b.detach()  # (2, m, d), (2, 1, 1, m)
        self.expanded_width = w.shape[1]
        self.up = Int8Linear(w.reshape(2 * w.shape[1], w.shape[2]), b.reshape(-1))
        self.ffw_down = Int8Linear.from_linear(mlp.ffw_down)

    def forward(self, x: Tensor) -> Tensor:
        up = self.up(x)
        m = self.expanded_width
        return self.ffw_down(F.gelu(up[..., :m], approximate="tanh") * up[..., m:])


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


def quantize(model: Griffin, mode: str = "int8") -> Griffin:
    """Quantize a model's weights in place and return it.

    Args:
        model: a `Griffin`; it is converted to float32 first (int8 weights, float32
            everything else: RG-LRU, conv, norms, biases, state).
        mode: only "int8" (weight-only, per-channel) is supported.

    Raises:
        InputError: an unknown mode, not a `Griffin`, or a model already quantized.
    """
    if mode != "int8":
        raise InputError(f"unknown quantization mode {mode!r}; supported: 'int8'")
    if not isinstance(model, Griffin):
        raise InputError(f"quantize expects a rgemma Griffin model, got {type(model).__name__}")
    if getattr(model, "quantization", None):
        raise InputError(f"the model is already quantized ({model.quantization})")
    # Module by module, so peak memory stays near the model's own size.
    model.embedder = Int8Embedder(model.embedder)
    for block in model.blocks:
        tb = block.temporal_block
        for name, child in list(tb.named_children()):
            if isinstance(child, nn.Linear):
                setattr(tb, name, Int8Linear.from_linear(child))
        block.mlp_block = Int8MLPBlock(block.mlp_block)
    model.float()  # what is left: RG-LRU, conv, norms (int8 buffers are not touched)
    for module in model.modules():  # .float() also converted the kernel's bf16 scales
        if isinstance(module, Int8Linear):
            module.scale_bf16 = module.scale.to(torch.bfloat16)
        elif isinstance(module, Int8Embedder):
            module.row_scale_bf16 = module.row_scale.to(torch.bfloat16)
    model.quantization = mode
    return model
