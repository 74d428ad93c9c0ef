"""Each implementation behind one interface, for the benchmark worker: rgemma, the
official `recurrentgemma.torch`, HF RecurrentGemma and HF Gemma.

An `Adapter` prefills a prompt, prepares the state a P-token prompt leaves (really,
or synthetically: random contents with exactly the shapes, dtypes and positions
prefill would leave, since a decode step's cost depends on those only), and decodes
one greedy token per row. `build_adapter` builds any of them from a model spec, on
identical weights (`benchmarks.peers`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from benchmarks import peers
from benchmarks.machine import IMPLS
from rgemma.checkpoint import load_model
from rgemma.cli.bench import weight_nbytes
from rgemma.config import GriffinConfig
from rgemma.engine import decode_step, prefill
from rgemma.errors import RgemmaError
from rgemma.state import AttentionState, GriffinState, RecurrentState


def _tensor_bytes(tensors: Iterable[Any]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class Adapter:
    """One implementation behind a common interface (all calls under inference mode).

    `prefill(tokens)` runs a prompt (b, t) from an empty state and keeps the state;
    `start_decode(batch, position, fill)` prepares the state a `position`-token
    prompt leaves; `step()` decodes one token per row (greedy) and keeps the state.
    """

    impl = ""

    def __init__(self, model, vocab_size: int):
        self.model, self.vocab_size = model, vocab_size
        self.next = None

    def weight_bytes(self) -> int:
        return weight_nbytes(self.model)

    def state_bytes(self) -> int:
        return 0

    def reset(self) -> None:
        """Drop the decode state / cache (frees its memory)."""
        for name in ("state", "cache"):
            if hasattr(self, name):
                setattr(self, name, None)
        self.next = None

    def random_tokens(self, batch: int, length: int, seed: int = 1):
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(3, self.vocab_size, (batch, length), generator=gen)

    def start_decode(self, batch: int, position: int, fill: str = "synthetic") -> None:
        if fill == "prefill" or position < 8:
            self.prefill(self.random_tokens(batch, max(position, 1)))
        else:
            self.synthetic_state(batch, position)

    def prefill(self, tokens) -> None:
        raise NotImplementedError

    def synthetic_state(self, batch: int, position: int) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError


class RgemmaAdapter(Adapter):
    impl = "rgemma"

    def __init__(self, model):
        super().__init__(model, model.config.vocab_size)
        self.state = None

    def prefill(self, tokens) -> None:
        logits, self.state = prefill(self.model, tokens, progress=False)
        self.next = logits.argmax(-1, keepdim=True)

    def synthetic_state(self, batch: int, position: int) -> None:
        state = self.model.init_state(batch)
        blocks = []
        for s in state.blocks:
            if isinstance(s, AttentionState):
                w = s.keys.shape[1]
                pos = torch.arange(position - w, position).clamp(min=-1)
                blocks.append(
                    AttentionState(
                        torch.randn_like(s.keys),
                        torch.randn_like(s.values),
                        pos[None].expand(batch, -1).contiguous(),
                    )
                )
            else:
                blocks.append(
                    RecurrentState(torch.randn_like(s.rg_lru) * 0.1, torch.randn_like(s.conv))
                )
        self.state = GriffinState(tuple(blocks), torch.full((batch,), position))
        self.next = self.random_tokens(batch, 1)

    def step(self) -> None:
        # What generation calls per token (compiled after a "compile" task): the engine
        # owns its state and donates it, so the attention window is written in place.
        logits, self.state = decode_step(self.model, self.next[:, 0], self.state, donate=True)
        self.next = logits.argmax(-1, keepdim=True)

    def state_bytes(self) -> int:
        if self.state is None:
            return 0
        return self.state.nbytes()

    def logits(self, tokens):
        return self.model(tokens, validate=False)[0]


class OfficialAdapter(Adapter):
    """`recurrentgemma.torch.Griffin`, driven as its own sampler drives it: prompt
    without its last token (no logits), then the last token with the cache."""

    impl = "official"

    def __init__(self, model):
        super().__init__(model, model.config.vocab_size)
        self.cache, self.pos = None, None

    def prefill(self, tokens) -> None:
        b, t = tokens.shape
        pos = torch.arange(t)[None].expand(b, -1)
        cache = None
        if t > 1:
            _, cache = self.model(tokens[:, :-1], pos[:, :-1], None, return_logits=False)
        logits, self.cache = self.model(tokens[:, -1:], pos[:, -1:], cache)
        self.pos = torch.full((b, 1), t)
        self.next = logits[:, -1].argmax(-1, keepdim=True)

    def synthetic_state(self, batch: int, position: int) -> None:
        dtype = self.model.embedder.input_embedding.dtype
        cache = self.model.init_cache(batch, dtype)
        for c in cache.values():
            for t in c:
                if t.is_floating_point():
                    t.normal_()
            if hasattr(c, "num_tokens"):
                c.num_tokens.fill_(position)
        self.cache = cache
        self.pos = torch.full((batch, 1), position)
        self.next = self.random_tokens(batch, 1)

    def step(self) -> None:
        logits, self.cache = self.model(self.next, self.pos, self.cache)
        self.pos = self.pos + 1
        self.next = logits[:, -1].argmax(-1, keepdim=True)

    def state_bytes(self) -> int:
        if not self.cache:
            return 0
        return _tensor_bytes(t for c in self.cache.values() for t in c)


class HFAdapter(Adapter):
    """A HF causal LM (RecurrentGemma or Gemma) with its `DynamicCache`, called as
    `generate` calls it: explicit positions, `logits_to_keep=1`."""

    def __init__(self, model, impl: str):
        super().__init__(model, model.config.vocab_size)
        self.impl = impl
        self.cache, self.pos = None, 0

    def _new_cache(self, batch: int):
        from transformers import DynamicCache  # a peer: imported when used

        if hasattr(self.model, "_setup_cache") and self.impl == "hf":
            p = self.model.model.embed_tokens.weight
            self.model._setup_cache(self.model.config, batch, p.device, p.dtype)
        return DynamicCache(config=self.model.config)

    def _forward(self, tokens, start: int):
        b, t = tokens.shape
        pos = (torch.arange(t) + start)[None].expand(b, -1)
        out = self.model(
            input_ids=tokens, position_ids=pos, cache=self.cache, use_cache=True, logits_to_keep=1
        )
        return out.logits[:, -1]

    def prefill(self, tokens) -> None:
        self.cache = self._new_cache(tokens.shape[0])
        logits = self._forward(tokens, 0)
        self.pos = tokens.shape[1]
        self.next = logits.argmax(-1, keepdim=True)

    def synthetic_state(self, batch: int, position: int) -> None:
        # A short real prompt creates every cache layer and recurrent state; then the
        # attention layers get random keys / values of the length prefill would leave.
        self.prefill(self.random_tokens(batch, 4))
        for layer in self.cache.layers:
            keys = getattr(layer, "keys", None)
            if keys is None or not isinstance(keys, torch.Tensor) or keys.ndim != 4:
                continue
            if getattr(layer, "is_sliding", False):
                n = min(position, layer.sliding_window - 1)
                layer.cumulative_length = position
            else:
                n = position
            shape = (keys.shape[0], keys.shape[1], n, keys.shape[3])
            layer.keys = torch.randn(shape, dtype=keys.dtype)
            layer.values = torch.randn(shape, dtype=keys.dtype)
        self.pos = position
        self.next = self.random_tokens(batch, 1)

    def step(self) -> None:
        logits = self._forward(self.next, self.pos)
        self.pos += 1
        self.next = logits.argmax(-1, keepdim=True)

    def state_bytes(self) -> int:
        total = 0
        if self.cache is not None:
            for layer in self.cache.layers:
                for name in ("keys", "values"):
                    t = getattr(layer, name, None)
                    if t is not None and hasattr(t, "numel"):
                        total += t.numel() * t.element_size()
        if self.impl == "hf":
            for layer in self.model.model.layers:
                tb = layer.temporal_block
                for t in (
                    getattr(tb, "conv1d_state", None),
                    getattr(getattr(tb, "rg_lru", None), "recurrent_states", None),
                ):
                    if t is not None:
                        total += t.numel() * t.element_size()
        return total


def build_adapter(impl: str, model_spec: Mapping[str, Any], dtype: str) -> Adapter:
    """Build one implementation's model (worker side).

    model_spec: {"kind": "random", "config": GriffinConfig dict, "seed": int} (rgemma's
    initialisation, the same weights for every implementation), {"kind": "path",
    "path": str or None (bundled)}, or {"kind": "gemma", "shape": GemmaShape dict,
    "seed": int}.
    """
    kind = model_spec["kind"]
    if impl not in IMPLS:
        raise RgemmaError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")
    if impl == "gemma":
        if kind != "gemma":
            raise RgemmaError("the Gemma baseline needs a {'kind': 'gemma'} model spec")
        shape = peers.GemmaShape(**model_spec["shape"])
        return HFAdapter(peers.gemma_model(shape, dtype, model_spec["seed"]), "gemma")
    if kind == "random":
        cfg = GriffinConfig.from_dict(model_spec["config"])
        seed = model_spec.get("seed", 0)
        if impl == "rgemma":
            return RgemmaAdapter(peers.random_griffin(cfg, dtype, seed))
        sd = peers.random_state_dict(cfg, dtype, seed)
    elif kind == "path":
        loaded = load_model(model_spec.get("path"), dtype=dtype)
        cfg = loaded.config
        if impl == "rgemma":
            return RgemmaAdapter(loaded.eval())
        sd = loaded.state_dict()
        del loaded
        peers.contiguous(sd)
    else:
        raise RgemmaError(f"unknown model spec kind {kind!r}")
    if impl == "official":
        return OfficialAdapter(peers.official_model(cfg, sd))
    return HFAdapter(peers.hf_model(cfg, sd), "hf")
