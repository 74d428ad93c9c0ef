"""`rgemma eval`: perplexity over files (`perplexity`) and lm-evaluation-harness tasks
(`tasks`).

`rgemma eval perplexity FILES...` scores every document whole, in one pass over the
model's fixed-size state (`rgemma.scoring`): no sliding window and no recomputation,
which a recurrent model does not need. Inputs are what `rgemma train` reads:

- a plain-text file (any suffix but `.jsonl`) is one document, `<bos> text <eos>`;
  a file larger than `BLOCK_CHARS` characters is read and tokenized in blocks cut
  at line ends, and its tokens are fed through the state block by block, so memory
  holds one block, the state and one chunk of logits whatever the file's length;
- a `.jsonl` file holds one document a line: `{"text"}` (every token scored),
  `{"prompt", "completion"}` (the completion and EOS scored), `{"messages"}` (the
  model turns scored), tokenized as for training (`rgemma.data.tokenize_document`);
- a directory stands for its `*.txt` and `*.jsonl` files, recursively, sorted.

`--context N` scores as a model with an N-token context would: each document's
tokens are cut into windows of N - 1, each scored from an empty state after BOS.

`rgemma eval tasks --tasks NAMES` runs lm-evaluation-harness tasks with rgemma's
lm-eval model (`rgemma.lm_eval`, extra `.[eval]`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from . import options

#: A text file longer than this many characters is read and tokenized in blocks.
BLOCK_CHARS = 1 << 22

EPILOG = """\
examples:
  rgemma eval perplexity book.txt notes/ val.jsonl         # the bundled model
  rgemma eval perplexity data/ --model ./recurrentgemma-2b --dtype bfloat16 --json
  rgemma eval perplexity long.txt --context 2048           # as a 2048-token model would
  rgemma eval tasks --tasks arc_easy,hellaswag --model ./recurrentgemma-2b --limit 100
  rgemma eval tasks --tasks my_task --include-path tests/data/tasks --batch-size 8
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options, description and examples of `rgemma eval`."""
    p.description = (
        "Evaluate a model: perplexity, NLL per token and bits per byte over files "
        "(`perplexity FILES...`), or lm-evaluation-harness tasks (`tasks --tasks ...`)."
    )
    p.epilog = EPILOG
    p.add_argument("what", choices=("perplexity", "tasks"), help="what to evaluate")
    p.add_argument(
        "files",
        nargs="*",
        metavar="FILES",
        help="perplexity: text files, .jsonl files or directories of them",
    )
    options.add_model_options(p)
    p.add_argument(
        "--output",
        metavar="FILE",
        help="also write the results as JSON to FILE",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        metavar="N",
        help="documents (perplexity) or requests (tasks) per forward pass (default 1)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    ppl = p.add_argument_group("perplexity")
    ppl.add_argument(
        "--context",
        type=int,
        metavar="N",
        help="score with at most N tokens of context (windows of N - 1 tokens after BOS, "
        "each from an empty state); default: whole documents",
    )
    ppl.add_argument(
        "--chunk-size",
        type=int,
        default=1024,
        metavar="N",
        help="tokens per forward call (memory: N x vocab float32 logits; default 1024)",
    )
    ppl.add_argument(
        "--json", action="store_true", help="print the results as JSON instead of a table"
    )
    tasks = p.add_argument_group("tasks (lm-evaluation-harness, extra .[eval])")
    tasks.add_argument("--tasks", metavar="NAMES", help="comma-separated lm-eval task names")
    tasks.add_argument("--limit", type=float, metavar="N", help="at most N examples per task")
    tasks.add_argument("--num-fewshot", type=int, metavar="K", help="few-shot examples")
    tasks.add_argument(
        "--include-path",
        action="append",
        metavar="DIR",
        help="directory of task YAML files to add to lm-eval's (repeatable)",
    )
    tasks.add_argument("--seed", type=options.seed_type, default=0, metavar="S")


def run(args: argparse.Namespace) -> int:
    """Run `rgemma eval`; returns 0.

    Raises:
        InputError: no files, a missing file, a bad option value, an unknown task,
            lm-eval not installed. CheckpointError: see --model.
    """
    from ..errors import InputError

    options.configure_inference(args)  # before torch is imported: OpenMP wait policy
    options.positive("--batch-size", args.batch_size)
    if args.what == "perplexity":
        if args.tasks is not None:
            raise InputError("--tasks belongs to `rgemma eval tasks`, not `perplexity`")
        return run_perplexity(args)
    if args.files:
        raise InputError(
            f"`rgemma eval tasks` takes no files (got {args.files[0]!r}); name tasks with --tasks"
        )
    return run_tasks(args)


# ----------------------------------------------------------------------------------
# perplexity
# ----------------------------------------------------------------------------------
def data_files(paths: list[str]) -> list[Path]:
    """The files under `paths` (`rgemma.data.data_files`); an empty list is an error
    that names the command's FILES argument."""
    from ..data import data_files as find
    from ..errors import InputError

    if not paths:
        raise InputError("`rgemma eval perplexity` needs FILES: text, .jsonl or directories")
    return find(paths, what="FILES")


def text_blocks(path: Path, block_chars: int | None = None) -> Iterator[str]:
    """The text of a UTF-8 file in blocks of at most about `block_chars` characters,
    each cut after a line end (or a space, or anywhere in a line longer than a
    block); `\\r\\n` becomes `\\n` and a leading BOM is dropped, as in training.

    Raises:
        InputError: the file is not UTF-8 (names the file) or cannot be read.
    """
    from ..errors import InputError

    block_chars = block_chars or BLOCK_CHARS
    carry = ""
    first = True
    try:
        with open(path, encoding="utf-8", newline="") as f:
            while True:
                chunk = f.read(block_chars)
                text = carry + chunk
                if first:
                    text, first = text.removeprefix("\ufeff"), False
                if len(chunk) < block_chars:  # the end of the file: the rest in one block
                    if text:
                        yield text.replace("\r\n", "\n")
                    return
                cut = text.rfind("\n") + 1 or text.rfind(" ") + 1 or len(text)
                if text[cut - 1 : cut] == "\r":  # never split a \r\n pair
                    cut -= 1
                block, carry = text[:cut], text[cut:]
                if block:
                    yield block.replace("\r\n", "\n")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror or err}") from None


def _windows(pieces, size: int, with_mask: bool = False):
    """Re-cut a stream of (ids, mask) arrays into consecutive windows of `size`."""
    import numpy as np

    ids_buf = np.empty(0, np.int64)
    mask_buf = np.empty(0, bool)
    for ids, mask in pieces:
        ids_buf = np.concatenate([ids_buf, np.asarray(ids, np.int64)])
        mask_buf = np.concatenate([mask_buf, np.asarray(mask, bool)])
        while len(ids_buf) >= size:
            yield ids_buf[:size], mask_buf[:size]
            ids_buf, mask_buf = ids_buf[size:], mask_buf[size:]
    if len(ids_buf):
        yield ids_buf, mask_buf


class _Scorer:
    """Scores documents for `rgemma eval perplexity` (whole, or in `--context`
    windows), with a progress bar over the bytes of the input files."""

    def __init__(self, model, tokenizer, *, context, chunk_size, batch_size, bar):
        self.model, self.tok = model, tokenizer
        self.context, self.chunk_size, self.batch_size, self.bar = (
            context,
            chunk_size,
            batch_size,
            bar,
        )

    def _windowed(self, pieces) -> tuple[float, int]:
        """Sum of NLL and tokens over `--context` windows of a (ids, mask) stream
        (BOS excluded), each scored after BOS from an empty state."""
        from ..scoring import score_batch

        nll, tokens, group = 0.0, 0, []

        def flush():
            nonlocal nll, tokens, group
            rows = [[self.tok.bos_id, *w.tolist()] for w, _ in group]
            masks = [[False, *m.tolist()] for _, m in group]
            for s in score_batch(self.model, rows, masks=masks, chunk_size=self.chunk_size):
                nll, tokens = nll + s.nll, tokens + s.tokens
            group = []

        for w, m in _windows(pieces, self.context - 1):
            group.append((w, m))
            if len(group) == self.batch_size:
                flush()
        if group:
            flush()
        return nll, tokens

    def text_file(self, path: Path):
        """Score a plain-text file as one document `<bos> text <eos>` (the text is
        plain characters: `<bos>` written in it is not the control id)."""
        from ..errors import InputError
        from ..scoring import Score, score_stream

        nbytes = 0

        def pieces():  # <bos> block ids ... <eos>; a small file is one piece
            nonlocal nbytes
            ids = [self.tok.bos_id]
            for block in text_blocks(path):
                n = len(block.encode("utf-8"))
                nbytes += n
                if len(ids) > 1:
                    yield ids
                    ids = []
                ids = ids + self.tok.encode(block, add_bos=False, special=False)
                self.bar.update(n)
            if nbytes == 0:
                raise InputError(f"{path}: the file is empty: there is no text to score")
            yield [*ids, self.tok.eos_id]

        if self.context is None:
            score = score_stream(self.model, pieces(), chunk_size=self.chunk_size)
            return Score(score.nll, score.tokens, nbytes)
        stream = (ids for ids in pieces())
        first = next(stream)[1:]  # without the BOS: every window gets its own
        stream = itertools.chain([first], stream)
        nll, tokens = self._windowed((ids, [True] * len(ids)) for ids in stream)
        return Score(nll, tokens, nbytes)

    def jsonl_file(self, path: Path) -> tuple[object, int]:
        """Score the documents of a JSONL file; (summed score, number of documents)."""
        from ..data import _read_jsonl, tokenize_document
        from ..scoring import Score, score_documents

        docs = _read_jsonl(path)
        tokenized = [tokenize_document(d, self.tok) for d in docs]
        nbytes = [_scored_bytes(d) for d in docs]
        if self.context is None:
            scores = score_documents(
                self.model,
                [t.tokens for t in tokenized],
                masks=[t.trainable for t in tokenized],
                num_bytes=nbytes,
                chunk_size=self.chunk_size,
                batch_size=self.batch_size,
            )
            total = sum(scores, Score())
        else:
            total = Score()
            for t, n in zip(tokenized, nbytes):
                nll, tokens = self._windowed([(t.tokens[1:], t.trainable[1:])])
                total = total + Score(nll, tokens, n)
        self.bar.update(path.stat().st_size)
        return total, len(docs)


def _scored_bytes(doc) -> int:
    """UTF-8 bytes of the text a document's scored tokens spell (roughly, for chats:
    the model turns' contents)."""
    if doc.kind == "text":
        return len(doc.text.encode("utf-8"))
    if doc.kind == "completion":
        return len(doc.completion.encode("utf-8"))
    from ..tokenizer import chat_turns

    return sum(len(c.encode("utf-8")) for role, c in chat_turns(doc.messages) if role == "model")


def evaluate_perplexity(
    model,
    tokenizer,
    paths: list[str],
    *,
    context: int | None = None,
    chunk_size: int = 1024,
    batch_size: int = 1,
    progress: bool = False,
) -> dict:
    """Perplexity, NLL per token and bits per byte of every file under `paths`.

    Args:
        model: a `Griffin` in eval mode; tokenizer: its `Tokenizer`.
        paths: files and directories (see the module docstring).
        context: None scores each document whole; N scores windows of N - 1 tokens,
            each after BOS from an empty state.
        chunk_size: tokens per forward call; batch_size: documents (or windows) per
            forward pass.
        progress: a tqdm bar over the input bytes on stderr.

    Returns:
        `{"files": [{"path", "documents", **Score.to_dict()}], "total": {...}}` with
        NLL in nats, perplexity = exp(NLL per token), bits per UTF-8 byte.

    Raises:
        InputError: see `data_files`, `text_blocks` and `rgemma.data` (bad JSONL).
    """
    from tqdm import tqdm

    from ..errors import InputError
    from ..scoring import Score

    if context is not None and context < 2:
        raise InputError(f"--context must be >= 2 (BOS and one token), got {context}")
    options.positive("--chunk-size", chunk_size)
    files = data_files(paths)
    total_bytes = sum(f.stat().st_size for f in files)
    rows, total, ndocs = [], Score(), 0
    with tqdm(
        total=total_bytes, disable=not progress, desc="eval", unit="B", unit_scale=True
    ) as bar:
        scorer = _Scorer(
            model,
            tokenizer,
            context=context,
            chunk_size=chunk_size,
            batch_size=batch_size,
            bar=bar,
        )
        for f in files:
            if f.suffix == ".jsonl":
                score, n = scorer.jsonl_file(f)
            else:
                score, n = scorer.text_file(f), 1
            if score.tokens == 0:
                raise InputError(f"{f}: nothing to score")
            rows.append({"path": str(f), "documents": n, **score.to_dict()})
            total, ndocs = total + score, ndocs + n
    return {
        "context": context,
        "files": rows,
        "total": {"path": "total", "documents": ndocs, **total.to_dict()},
    }


def format_table(result: dict) -> str:
    """The results of `evaluate_perplexity` as a text table, one line per file."""
    rows = result["files"] + ([result["total"]] if len(result["files"]) > 1 else [])
    name_w = max(len("file"), *(len(r["path"]) for r in rows))
    head = (
        f"{'file':<{name_w}}  {'docs':>6}  {'tokens':>11}  {'bytes':>12}  {'nll/token':>9}  "
        f"{'perplexity':>11}  {'bits/byte':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['path']:<{name_w}}  {r['documents']:>6,}  {r['tokens']:>11,}  "
            f"{r['bytes']:>12,}  {r['nll_per_token']:>9.4f}  {r['perplexity']:>11.3f}  "
            f"{r['bits_per_byte']:>9.4f}"
        )
    return "\n".join(lines) + "\n"


def _write_json(path: str, data: dict) -> None:
    from ..io import atomic_path

    options.check_output_file(path, "--output")
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def run_perplexity(args: argparse.Namespace) -> int:
    """`rgemma eval perplexity`: the table (or JSON with --json) on stdout."""
    import torch

    options.setup_torch(args)
    data_files(args.files)  # fail on a missing file before loading the model
    if args.output:
        options.check_output_file(args.output, "--output")
    model, tokenizer = options.load_model_and_tokenizer(args)
    with torch.inference_mode():
        result = evaluate_perplexity(
            model,
            tokenizer,
            args.files,
            context=args.context,
            chunk_size=args.chunk_size,
            batch_size=args.batch_size,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    result["model"] = (getattr(model, "source", None) or {}).get("path")
    if args.output:
        _write_json(args.output, result)
    options.write(json.dumps(result, indent=2) + "\n" if args.json else format_table(result))
    return 0


# ----------------------------------------------------------------------------------
# tasks
# ----------------------------------------------------------------------------------
def run_tasks(args: argparse.Namespace) -> int:
    """`rgemma eval tasks`: lm-evaluation-harness on rgemma's lm-eval model; the
    results table on stdout, JSON with --output."""
    from ..errors import InputError

    if not args.tasks:
        raise InputError("`rgemma eval tasks` needs --tasks NAME[,NAME...]")
    for option in ("context", "json"):
        if getattr(args, option):
            raise InputError(f"--{option} belongs to `rgemma eval perplexity`, not `tasks`")
    if args.limit is not None and args.limit <= 0:
        raise InputError(f"--limit must be > 0, got {args.limit:g}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise InputError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    for d in args.include_path or ():
        if not os.path.isdir(d):
            raise InputError(f"--include-path {d}: not a directory")
    if args.output:
        options.check_output_file(args.output, "--output")
    options.setup_torch(args)
    from ..lm_eval import format_results
    from ..lm_eval import run_tasks as run_lm_eval

    results = run_lm_eval(
        [t.strip() for t in args.tasks.split(",") if t.strip()],
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        batch_size=args.batch_size,
        limit=int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit,
        num_fewshot=args.num_fewshot,
        include_path=args.include_path,
        seed=args.seed,
    )
    if args.output:
        _write_json(args.output, results)
    options.write(format_results(results))
    return 0
