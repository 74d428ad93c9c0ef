"""rgemma as an lm-evaluation-harness model: `RgemmaLM`, registered as `rgemma`.

Needs the `eval` extra (`pip install "rgemma[eval]"`, which brings `lm-eval`).
Importing this module registers the model with lm-eval's registry, so:

    rgemma eval tasks --tasks arc_easy,hellaswag --model ./recurrentgemma-2b
    python -m rgemma.lm_eval run --model rgemma --model_args pretrained=./rg-2b \\
        --tasks arc_easy                     # lm-eval's own command line, rgemma added

    import rgemma.lm_eval, lm_eval
    lm_eval.simple_evaluate(model="rgemma", model_args="pretrained=./rg-2b", tasks=[...])

(lm-eval 0.4 finds models only in its registry and has no plugin entry points:
`python -m lm_eval --model rgemma` itself cannot see a model that nothing imported;
`python -m rgemma.lm_eval` is that same command line with rgemma registered.)

The three request kinds, each through rgemma's one scorer or its generation:

- `loglikelihood(context, continuation)`: `context + continuation` is tokenized
  with BOS first, as lm-eval does for Gemma models (an empty context becomes BOS
  alone), and the continuation's tokens are scored with `rgemma.scoring.score_batch`
  in batches of `batch_size` rows (longest first; shorter rows are padded after their
  end, which a causal model never reads, so each row's score equals its score
  alone), with `is_greedy` from the same logits;
- `loglikelihood_rolling(text)`: `<bos> text` scored whole in one pass over the
  fixed-size state: no windows or re-computation, whatever the length;
- `generate_until(context, {until, max_gen_toks, do_sample, temperature})`:
  `rgemma.generate` (greedy unless `do_sample`), stopping at EOS, `<end_of_turn>`
  or any `until` string; the text is cut before the first stop string.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

from .errors import InputError

try:  # the optional extra: without it, importing this module explains what to install
    # lm-eval fills its registry with its own models only when the registry is empty
    # at the first lookup: register them first, or adding `rgemma` would hide them.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as _err:  # pragma: no cover - exercised only without the extra
    raise InputError(
        'lm-eval is not installed: `pip install "rgemma[eval]"` (or `pip install lm-eval`) '
        f"to evaluate on lm-evaluation-harness tasks ({_err})"
    ) from None

__all__ = ["RgemmaLM", "format_results", "main", "run_tasks"]


def _as_int(value: Any, name: str, minimum: int = 1) -> int:
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be an int, got {value!r}") from None
    if out < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {out}")
    return out


@register_model("rgemma")
class RgemmaLM(TemplateLM):
    """lm-eval's model interface over an rgemma model and tokenizer.

    Args:
        pretrained: a checkpoint path or Hub id (anything `rgemma.load` takes); None
            or "bundled": the bundled model. Ignored when `model` is given.
        model, tokenizer: an already loaded `Griffin` and `Tokenizer` (Python API).
        dtype, device: passed to `rgemma.load` ("bfloat16", "cuda", ...).
        batch_size: loglikelihood rows / generation prompts per forward pass (an int;
            lm-eval's "auto" means 8).
        max_gen_toks: default most new tokens of `generate_until` (default 256).
        chunk_size: tokens per forward call (memory: batch x chunk x vocab logits).

    Raises:
        InputError: a bad batch size or length; CheckpointError: see `rgemma.load`.
    """

    backend = "causal"

    def __init__(
        self,
        pretrained: str | None = None,
        *,
        model: Any = None,
        tokenizer: Any = None,
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        max_gen_toks: int = 256,
        chunk_size: int = 1024,
        **unused: Any,
    ) -> None:
        super().__init__()
        if model is None:
            from .generation import load

            name = None if pretrained in (None, "", "bundled") else pretrained
            model, tokenizer = load(name, dtype=dtype, device=device)
        elif tokenizer is None:
            raise InputError("RgemmaLM(model=...) needs its tokenizer= too")
        self.model, self.tok = model.eval(), tokenizer
        self._device = next(model.parameters()).device
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            batch_size = max_batch_size or 8
        self.batch_size = _as_int(batch_size, "batch_size")
        self.max_gen_toks = _as_int(max_gen_toks, "max_gen_toks")
        self.chunk_size = _as_int(chunk_size, "chunk_size")
        source = getattr(model, "source", None) or {}
        self._name = str(source.get("path") or pretrained or "rgemma")

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        """EOS: what ends a document."""
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        """BOS: the context of an empty-context request and of rolling scores."""
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        """No context limit: the state is fixed-size (reported as a large number)."""
        return 2**31 - 1

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tok, "path", "rgemma")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list[int]:
        """Token ids of `string`, BOS first unless `add_special_tokens=False`."""
        return self.tok.encode(string, add_bos=add_special_tokens is not False)

    def tok_decode(self, tokens: Sequence[int], **kw) -> str:
        return self.tok.decode(tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt=True):
        """The Gemma chat format (`Tokenizer.apply_chat_template`; BOS comes from
        `tok_encode`)."""
        return self.tok.apply_chat_template(chat_history, add_generation_prompt)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        from .checkpoint import GEMMA_CHAT_TEMPLATE

        return GEMMA_CHAT_TEMPLATE if chat_template else None

    # ---------------------------------------------------------------- requests
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw):
        """(log-probability in nats, is_greedy) of each continuation given its context.

        `requests`: ((context, continuation), context ids, continuation ids) triples.
        """
        from tqdm import tqdm

        from .scoring import score_batch

        results: list[tuple[float, bool] | None] = [None] * len(requests)
        rows, masks, where = [], [], []
        for i, (_, ctx, cont) in enumerate(requests):
            if not cont:  # nothing to score
                results[i] = (0.0, True)
                continue
            rows.append([*ctx, *cont])
            masks.append([False] * len(ctx) + [True] * len(cont))
            where.append(i)
        order = sorted(range(len(rows)), key=lambda j: -len(rows[j]))
        bar = tqdm(total=len(rows), disable=disable_tqdm, desc="rgemma loglikelihood")
        for lo in range(0, len(order), self.batch_size):
            group = order[lo : lo + self.batch_size]
            scores = score_batch(
                self.model,
                [rows[j] for j in group],
                masks=[masks[j] for j in group],
                chunk_size=self.chunk_size,
                greedy=True,
            )
            for j, s in zip(group, scores):
                answer = (-s.nll, bool(s.greedy))
                results[where[j]] = answer
                req = requests[where[j]][0]
                if req is not None:
                    self.cache_hook.add_partial("loglikelihood", req, answer)
            bar.update(len(group))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-probability in nats of each whole text after BOS, one pass over the
        state per text (no windows)."""
        from tqdm import tqdm

        from .scoring import score_documents

        texts = [req.args[0] for req in requests]
        docs = [
            [self.prefix_token_id, *self.tok_encode(t, add_special_tokens=False)] for t in texts
        ]
        out: list[float] = [0.0] * len(docs)
        scorable = [i for i, d in enumerate(docs) if len(d) >= 2]
        scores = score_documents(
            self.model,
            [docs[i] for i in scorable],
            chunk_size=self.chunk_size,
            batch_size=self.batch_size,
            progress=not disable_tqdm,
        )
        for i, s in tqdm(zip(scorable, scores), disable=True):
            out[i] = -s.nll
        for text, value in zip(texts, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), value)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with `do_sample`) continuations, cut before the first
        `until` string; batched by identical generation settings."""
        from tqdm import tqdm

        from .generation import generate
        from .sampling import SamplingParams

        groups: dict[str, list[int]] = {}
        settings = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = _as_int(kw.pop("max_gen_toks", self.max_gen_toks), "max_gen_toks", 0)
            do_sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 0.0)) if do_sample else 0.0
            params = SamplingParams(
                max_new_tokens=max_new,
                temperature=temperature,
                top_p=float(kw.pop("top_p", 1.0)) if do_sample else 1.0,
                seed=kw.pop("seed", 0) if do_sample else None,
                stop=tuple(u for u in until if u),
            )
            settings.append((context, params))
            groups.setdefault(repr(params), []).append(i)
        out: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="rgemma generate_until")
        for members in groups.values():
            params = settings[members[0]][1]
            for lo in range(0, len(members), self.batch_size):
                batch = members[lo : lo + self.batch_size]
                prompts = [self.tok_encode(settings[i][0]) for i in batch]
                results = generate(self.model, self.tok, prompts, sampling=params)
                for i, r in zip(batch, results):
                    text = r.text
                    for stop in params.stop:
                        text = text.split(stop, 1)[0]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return out


# ----------------------------------------------------------------------------------
# Running tasks
# ----------------------------------------------------------------------------------
_TASK_MANAGERS: dict[tuple, Any] = {}


def run_tasks(
    tasks: Sequence[str],
    *,
    model: Any = None,
    tokenizer: Any = None,
    dtype: str | None = None,
    device: str | None = None,
    batch_size: int = 1,
    limit: float | None = None,
    num_fewshot: int | None = None,
    include_path: Sequence[str] | None = None,
    seed: int = 0,
    log_samples: bool = False,
    include_defaults: bool = True,
) -> dict[str, Any]:
    """Run lm-evaluation-harness tasks on an rgemma model.

    Args:
        tasks: task (or group / tag) names lm-eval knows, including those under
            `include_path`.
        model: a checkpoint path or Hub id (None: the bundled model), or a loaded
            `Griffin` (then give `tokenizer`).
        dtype, device, batch_size: see `RgemmaLM`.
        limit: at most this many examples per task (a fraction < 1: that share).
        num_fewshot: few-shot examples (default: each task's own).
        include_path: directories of extra task YAML files.
        include_defaults: also know lm-eval's built-in tasks (indexing them takes
            seconds; False: only those under `include_path`).
        seed: lm-eval's seeds (few-shot sampling, Python, numpy, torch).
        log_samples: keep lm-eval's per-example records under "samples".

    Returns:
        `{"results": {task: {metric: value}}, "n-shot", "versions", "model",
        "samples"?}`, JSON-serializable.

    Raises:
        InputError: an unknown task (named), no tasks.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise InputError("no tasks given")
    paths = [os.path.abspath(p) for p in include_path or ()]
    key = (include_defaults, *paths)
    if key not in _TASK_MANAGERS:  # indexing lm-eval's thousands of YAML files takes seconds
        _TASK_MANAGERS[key] = TaskManager(
            include_path=paths or None, include_defaults=include_defaults
        )
    manager = _TASK_MANAGERS[key]
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise InputError(
            f"lm-eval does not know task(s) {', '.join(unknown)}; `lm-eval ls tasks` lists "
            "them (add task YAML directories with --include-path)"
        )
    if isinstance(model, str) or model is None:
        lm = RgemmaLM(model, dtype=dtype, device=device, batch_size=batch_size)
    else:
        lm = RgemmaLM(model=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=log_samples,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        verbosity="WARNING",
    )
    result = {
        "model": lm._name,
        "results": out["results"],
        "n-shot": out.get("n-shot", {}),
        "versions": out.get("versions", {}),
        "limit": limit,
        "batch_size": lm.batch_size,
    }
    if log_samples:
        result["samples"] = out.get("samples", {})
    # JSON-safe: numpy numbers and NaN become plain floats / null
    return json.loads(json.dumps(result, default=_json_default).replace("NaN", "null"))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def format_results(results: dict[str, Any]) -> str:
    """A `run_tasks` result as a text table: task, metric, value, stderr."""
    lines = [f"{'task':<24} {'metric':<24} {'value':>12} {'stderr':>10}"]
    lines.append("-" * len(lines[0]))
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            skip = key in ("alias", "sample_len") or "_stderr" in key
            if skip or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            err = metrics.get(f"{metric}_stderr,{filt}")
            err_s = f"{err:.4f}" if isinstance(err, (int, float)) and math.isfinite(err) else ""
            name = metric if filt in ("", "none") else f"{metric} ({filt})"
            lines.append(f"{task:<24} {name:<24} {value:>12.4f} {err_s:>10}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's own command line (`lm-eval run ...`) with the `rgemma` model
    registered: `python -m rgemma.lm_eval run --model rgemma --tasks ...`."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli_evaluate()


if __name__ == "__main__":
    main()
