"""An OpenAI-compatible server with continuous batching over the fixed-size state.

Layers, each usable alone:

    scheduler.Scheduler      a thread that owns the model: admits queued requests,
                             plans their prompts' prefill chunks, and has the row
                             engine (`rgemma.engine`, the one `generate` runs on)
                             prefill, decode every active row and free finished rows
    prefix_cache.PrefixCache LRU of model states after shared prompt prefixes,
                             bounded in bytes (exact: same output as without it)
    metrics.Metrics          counters and histograms in Prometheus text format
    app.create_app           the FastAPI app: /v1/completions, /v1/chat/completions,
                             /v1/models, /health, /metrics
    rgemma serve             the command (`rgemma.cli.serve`), uvicorn on 127.0.0.1

Only `scheduler`, `prefix_cache` and `metrics` import torch; only `app` imports
FastAPI (the `serve` extra). Importing this package imports neither.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "create_app": "app",
    "ServeConfig": "app",
    "Scheduler": "scheduler",
    "GenerationRequest": "scheduler",
    "SamplingParams": "scheduler",  # rgemma.sampling.SamplingParams, re-exported
    "QueueFull": "scheduler",
    "PrefixCache": "prefix_cache",
    "Metrics": "metrics",
}

__all__ = [
    "GenerationRequest",
    "Metrics",
    "PrefixCache",
    "QueueFull",
    "SamplingParams",
    "Scheduler",
    "ServeConfig",
    "create_app",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rgemma.serve' has no attribute {name!r}")
