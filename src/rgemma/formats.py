"""Checkpoint formats as data: file names and the official <-> HF key maps.

Pure data, imported by `rgemma.checkpoint` (loading and saving), `rgemma.lora` (PEFT
adapter names) and `rgemma.training.checkpoint` (training checkpoint layout), so none
of them needs another's code for a name.
"""

from __future__ import annotations

RGEMMA_CONFIG_NAME = "rgemma_config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.model"
HF_CONFIG_NAME = "config.json"
HF_INDEX_NAME = "model.safetensors.index.json"
HF_BIN_NAME = "pytorch_model.bin"
TORCH_SUFFIXES = (".pt", ".ckpt", ".pth")
RGEMMA_FORMAT_VERSION = 1

EMBED_OFFICIAL = "embedder.input_embedding"
EMBED_HF = "model.embed_tokens.weight"
LM_HEAD_HF = "lm_head.weight"

#: Official top-level keys -> HF keys (identity on the tensor).
GLOBAL_KEY_MAP: dict[str, str] = {
    EMBED_OFFICIAL: EMBED_HF,
    "final_norm.scale": "model.final_norm.weight",
}

#: Official per-block suffix (after `blocks.{i}.`) -> HF suffix (after
#: `model.layers.{i}.`), one tensor each. Only `conv_1d.w` changes its layout.
LAYER_KEY_MAP: dict[str, str] = {
    "temporal_pre_norm.scale": "temporal_pre_norm.weight",
    "channel_pre_norm.scale": "channel_pre_norm.weight",
    "recurrent_block.linear_x.weight": "temporal_block.linear_x.weight",
    "recurrent_block.linear_x.bias": "temporal_block.linear_x.bias",
    "recurrent_block.linear_y.weight": "temporal_block.linear_y.weight",
    "recurrent_block.linear_y.bias": "temporal_block.linear_y.bias",
    "recurrent_block.linear_out.weight": "temporal_block.linear_out.weight",
    "recurrent_block.linear_out.bias": "temporal_block.linear_out.bias",
    "recurrent_block.conv_1d.w": "temporal_block.conv_1d.weight",
    "recurrent_block.conv_1d.b": "temporal_block.conv_1d.bias",
    "recurrent_block.rg_lru.a_param": "temporal_block.rg_lru.recurrent_param",
    "recurrent_block.rg_lru.input_gate.w": "temporal_block.rg_lru.input_gate_weight",
    "recurrent_block.rg_lru.input_gate.b": "temporal_block.rg_lru.input_gate_bias",
    "recurrent_block.rg_lru.a_gate.w": "temporal_block.rg_lru.recurrent_gate_weight",
    "recurrent_block.rg_lru.a_gate.b": "temporal_block.rg_lru.recurrent_gate_bias",
    "attention_block.proj_q.weight": "temporal_block.q_proj.weight",
    "attention_block.proj_k.weight": "temporal_block.k_proj.weight",
    "attention_block.proj_v.weight": "temporal_block.v_proj.weight",
    "attention_block.proj_final.weight": "temporal_block.o_proj.weight",
    "attention_block.proj_final.bias": "temporal_block.o_proj.bias",
    "mlp_block.ffw_down.weight": "mlp_block.down_proj.weight",
    "mlp_block.ffw_down.bias": "mlp_block.down_proj.bias",
}

#: Official per-block suffix -> the two HF suffixes it is split into (index 0, 1).
LAYER_SPLIT_MAP: dict[str, tuple[str, str]] = {
    "mlp_block.ffw_up.w": ("mlp_block.gate_proj.weight", "mlp_block.up_proj.weight"),
    "mlp_block.ffw_up.b": ("mlp_block.gate_proj.bias", "mlp_block.up_proj.bias"),
}
