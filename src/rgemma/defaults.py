"""The defaults a user meets first, in one place, importing nothing heavy (the CLI
reads them before torch is imported).

Sampling (`SAMPLING`): what `rgemma generate` / `rgemma chat` and the server use
for the fields a user or a request does not set (`rgemma.sampling.default_sampling`
builds the `SamplingParams`). Chosen with `scripts/sampling_defaults.py` on the
bundled model: greedy decoding loops (", and the most unpleasant, and the most
..."); temperature 0.8 with top-p 0.95 reads well, and a mild repetition penalty
(1.1) cuts the repeated n-grams further without making the text erratic. The
repetition penalty applies only when sampling: `temperature 0` stays the model's
plain greedy output.

Inference threads (`configure_inference`, `inference_threads`): OpenMP threads
that spin while they wait for work make decode many times slower when the cores
are shared with other jobs. `scripts/inference_defaults.py` on 2 busy cores (AMD
EPYC, load average 7-8), bundled model, greedy decode, median of 3 alternated runs:
spin-wait (unset or ACTIVE) 1.9 tok/s at 2 threads (200 CPU ms per token),
PASSIVE 20.9 tok/s at 2 threads, 34-36 tok/s at 1 thread (either policy; 14-15 CPU
ms per token). So the inference commands set `OMP_WAIT_POLICY=PASSIVE` unless the
user set it, before torch loads OpenMP (which reads it once), and run models below
`SMALL_MODEL_PARAMETERS` on one thread unless `--threads` says otherwise: their
per-operator work is too small to share between cores.

Models (`CHAT_MODEL`): `rgemma chat` and `rgemma serve` without `--model` load the
bundled chat model (`rgemma/assets/bundled-chat/`: the bundled base fine-tuned with
LoRA on dialogue from its own corpus by `scripts/build_chat_model.sh`; it ends its
turn with `<end_of_turn>`, the base never does). `rgemma generate`, `info`, `eval`,
`bench` and `rgemma.load()` keep the base (`rgemma/assets/bundled/`), a plain
language model.
"""

from __future__ import annotations

import os
import sys

__all__ = [
    "CHAT_MODEL",
    "MAX_TOKENS_DEFAULT",
    "SAMPLING",
    "SMALL_MODEL_PARAMETERS",
    "configure_inference",
    "inference_threads",
]

#: The CLI's and the server's sampling defaults (see the module docstring).
SAMPLING: dict[str, float] = {"temperature": 0.8, "top_p": 0.95, "repetition_penalty": 1.1}

#: The asset directory (under `rgemma/assets/`) of the model that `rgemma chat` and
#: `rgemma serve` load without `--model` (see the module docstring).
CHAT_MODEL = "bundled-chat"

#: `max_tokens` of a server request that gives none (`rgemma serve
#: --max-tokens-default`).
MAX_TOKENS_DEFAULT = 512


#: Models with fewer parameters run on one thread by default (see the docstring).
SMALL_MODEL_PARAMETERS = 100_000_000


def inference_threads(num_parameters: int) -> int | None:
    """The default torch thread count for inference on a model of `num_parameters`:
    1 for a small model, None (torch's default) otherwise."""
    return 1 if num_parameters < SMALL_MODEL_PARAMETERS else None


def configure_inference() -> str:
    """Set the OpenMP wait policy for inference unless the user chose one; call it
    before torch is imported. Returns what was done, for `--verbose`.

    The policy only takes effect if torch (and with it OpenMP) is not loaded yet;
    otherwise the environment is left as it is and the message says so.
    """
    given = os.environ.get("OMP_WAIT_POLICY")
    if given is not None:
        return f"OMP_WAIT_POLICY={given} (set by the user)"
    if "torch" in sys.modules:
        return "OMP_WAIT_POLICY unset (torch was already loaded)"
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return "OMP_WAIT_POLICY=PASSIVE (rgemma's default: fast on shared cores)"
