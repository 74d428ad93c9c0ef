"""Training data: read documents, tokenize them, pack them into fixed-length batches.

Pipeline::

    docs = read_documents(["data/corpus"])              # list[Document]
    train_docs, val_docs = split_documents(docs, 0.01)  # by a hash of each document
    train = PackedDataset(tokenize_documents(train_docs, tok), seq_len=512, batch_size=8)
    for batch in train: ...                             # Batch of (b, t) tensors
    ckpt["data"] = train.state_dict()                   # {"step": ..., ...}
    train.load_state_dict(ckpt["data"])                 # resumes at the same batch

(`build_datasets` does all of it.)

Inputs:
    * plain-text files (any suffix but `.jsonl`) and directories searched
      recursively for `*.txt` and `*.jsonl`. A text file is cut into documents of
      at most `doc_chars` characters, at blank lines where possible, else at a
      sentence end, else at a space (`doc_chars=None`: one document per file).
      Books are far longer than a training sequence, and documents of a few
      thousand tokens give the validation split (made per document) enough pieces.
    * JSONL, one JSON object a line (blank lines skipped):
      `{"text": str}` pre-training text, loss on every token;
      `{"prompt": str, "completion": str}` raw text `prompt + completion`, loss on
      the completion and EOS only;
      `{"messages": [{"role", "content"}, ...]}` a chat in Gemma's IT format
      (`Tokenizer.encode_chat`, system folded into the first user turn),
      loss on each model turn's content and its `<end_of_turn>` only.

Every document is tokenized as `<bos> ... <eos>`. Training text is plain text
(`Tokenizer.encode(text, special=False)`): `<bos>`, `<eos>`, `<start_of_turn>` or
`<end_of_turn>` written in a document, a prompt, a completion or a message is
encoded as characters, never as a control id, whichever path tokenizes it; only
`<bos>`/`<eos>` around each document and the chat template's turn markers are
control ids. (So a training record cannot teach the model that text inside a turn
ends it, the same rule as `encode_chat` at inference.)

Two ways to batch the documents:

* `PackedDataset` (the default): documents are concatenated (in an order shuffled
  per epoch) and cut into sequences of `seq_len` tokens; every sequence is
  self-contained. Plain text runs on from one sequence to the next, and its
  continuation restarts at segment_pos 0 (trained without its earlier context).
  Chats and prompt/completion pairs are never cut: each lies whole in one sequence
  (packed together by best fit, the rest of the sequence padded). A chat longer than
  `seq_len` is shortened first by `fit_chats` (oldest turns dropped, with a warning
  giving the counts; see there); a prompt/completion longer than `seq_len` is cut
  like text, with a warning.
* `StreamDataset` (`TrainConfig.carry_state`): documents lie whole, end to end, in
  parallel streams; each step feeds the next `seq_len` tokens of every stream, with
  segment_pos continuing across segments and the model's state carried from one
  segment to the next (truncated backpropagation through time), so nothing is cut.

Each sequence (row of a batch):

    tokens      (t,) int64   the input ids
    segment_pos (t,) int64   position in the document, 0 at each `<bos>` (packed:
                             also where a text runs on from the previous sequence;
                             streams: continuing across segments). Padding has 0.
    targets     (t,) int64   the next token in the stream (pad_id past the end)
    loss_mask   (t,) float32 1 where targets[i] is a token to learn: 0 at the last
                             token of a document (its target is the next
                             document's <bos>), on padding, and where the target is
                             prompt text (fine-tuning).
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import heapq
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from rgemma.errors import InputError
from rgemma.state import AttentionState, GriffinState, RecurrentState
from rgemma.tokenizer import END_OF_TURN, START_OF_TURN, Tokenizer, chat_turns

__all__ = [
    "Batch",
    "Document",
    "PackedDataset",
    "StreamDataset",
    "TokenizedDocument",
    "build_datasets",
    "expand_paths",
    "fit_chat",
    "fit_chats",
    "is_validation",
    "read_documents",
    "split_documents",
    "split_text",
    "tokenize_document",
    "tokenize_documents",
]

DEFAULT_DOC_CHARS = 16_000  # about 4k tokens of English with a 4096-piece vocabulary

PathLike = str | os.PathLike[str]


# ---------------------------------------------------------------- documents
@dataclass(frozen=True)
class Document:
    """One document before tokenization: exactly one of the three kinds is set.

    Attributes:
        source: where it came from: `path`, `path#chunk` (text file) or
            `path:line` (JSONL), for error messages.
        text: pre-training text.
        prompt, completion: a prompt/completion pair (raw text, no template).
        messages: a chat, a tuple of `{"role", "content"}` dicts.
    """

    source: str
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[Mapping[str, str], ...] | None = None

    @property
    def kind(self) -> str:
        """'text', 'completion' or 'chat'."""
        if self.messages is not None:
            return "chat"
        return "completion" if self.prompt is not None else "text"

    def key(self) -> bytes:
        """The document's content as canonical JSON bytes (source excluded)."""
        content = {"text": self.text, "prompt": self.prompt, "completion": self.completion}
        if self.messages is not None:
            content["messages"] = [dict(m) for m in self.messages]
        return json.dumps(content, sort_keys=True, ensure_ascii=False).encode("utf-8")


_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s")


def split_text(text: str, doc_chars: int | None = DEFAULT_DOC_CHARS) -> list[str]:
    """Cut text into documents of at most `doc_chars` characters.

    Each cut is at the last blank line in the second half-or-so of the allowed
    span, else after the last sentence end, else at the last space, else (one
    huge word) at `doc_chars`. Whitespace around cuts is dropped; the text inside
    a document is kept exactly.

    Args:
        text: the whole file.
        doc_chars: longest document in characters; None for one document.

    Returns:
        the non-empty documents in order.
    """
    if doc_chars is None:
        return [text.strip()] if text.strip() else []
    if doc_chars < 1:
        raise InputError(f"doc_chars must be positive, got {doc_chars}")
    docs = []
    start, n = 0, len(text)
    while True:
        while start < n and text[start].isspace():
            start += 1
        if start >= n:
            return docs
        end = start + doc_chars
        if end >= n:
            docs.append(text[start:].rstrip())
            return docs
        lo = start + doc_chars // 4  # do not make tiny documents
        cut = -1
        for m in _BLANK_LINE.finditer(text, lo, end):
            cut = m.start()
        if cut < 0:
            for m in _SENTENCE_END.finditer(text, lo, end):
                cut = m.end() - 1
        if cut < 0:
            cut = max(text.rfind(" ", lo, end), text.rfind("\n", lo, end))
        if cut <= start:
            cut = end
        docs.append(text[start:cut].rstrip())
        start = cut


def _read_utf8(path: Path) -> str:
    """Contents of a UTF-8 file with `\\r\\n` made `\\n` and any BOM dropped.

    Raises:
        InputError: the file cannot be read, is not UTF-8 (names the byte offset
            and line), or is empty / whitespace only.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read training data file {path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(
            f"{path}: not UTF-8 at byte offset {e.start} (line {line}): "
            f"byte 0x{data[e.start]:02x}, {e.reason}"
        ) from None
    if not text.strip():
        raise InputError(f"{path}: file is empty" + (" (whitespace only)" if text else ""))
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


def _read_jsonl(path: Path) -> list[Document]:
    """Documents of a JSONL file (see the module docstring for the formats).

    Raises:
        InputError: invalid JSON, a line that is not an object, a missing or
            non-str field, or a bad chat (names the file and line number).
    """
    docs = []
    for lineno, line in enumerate(_read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: invalid JSON at column {e.colno}: {e.msg}") from None
        if not isinstance(obj, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        if "messages" in obj:
            messages = obj["messages"]
            try:
                turns = chat_turns(messages)
            except InputError as e:
                raise InputError(f"{where}: {e}") from None
            if not any(role == "model" for role, _ in turns):
                raise InputError(f"{where}: 'messages' has no 'model'/'assistant' turn to train on")
            docs.append(Document(where, messages=tuple(dict(m) for m in messages)))
        elif "prompt" in obj or "completion" in obj:
            for field in ("prompt", "completion"):
                if not isinstance(obj.get(field), str):
                    got = "missing" if field not in obj else type(obj[field]).__name__
                    raise InputError(f"{where}: field {field!r} must be a str, got {got}")
            docs.append(Document(where, prompt=obj["prompt"], completion=obj["completion"]))
        elif "text" in obj:
            if not isinstance(obj["text"], str) or not obj["text"]:
                raise InputError(
                    f"{where}: field 'text' must be a non-empty str, got {obj['text']!r:.40}"
                )
            docs.append(Document(where, text=obj["text"]))
        else:
            raise InputError(
                f"{where}: expected a 'text', 'prompt'+'completion' or 'messages' field, "
                f"got keys {sorted(obj)}"
            )
    if not docs:
        raise InputError(f"{path}: no JSON lines in file")
    return docs


def data_files(paths: PathLike | Sequence[PathLike], what: str = "data") -> list[Path]:
    """The files under `paths`: files as given, directories as their `*.txt` and
    `*.jsonl` files (recursive, sorted by path).

    Raises:
        InputError: no paths, a path that does not exist, or a directory without
            data files (the message names the path and `what` the data is for).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl") and f.is_file()
            )
            if not found:
                raise InputError(f"no *.txt or *.jsonl files under directory {p}")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise InputError(f"{what} path not found: {p}")
    if not files:
        raise InputError(f"no {what} paths given")
    return files


def read_documents(
    paths: PathLike | Sequence[PathLike],
    doc_chars: int | None = DEFAULT_DOC_CHARS,
    what: str = "training data",
) -> list[Document]:
    """Read every document under `paths`, in a deterministic order.

    Args:
        paths: files and/or directories (searched recursively for `*.txt` and
            `*.jsonl`, sorted by path). `.jsonl` files are JSONL; any other file
            is UTF-8 plain text.
        doc_chars: longest plain-text document in characters (`split_text`);
            None for one document per text file. JSONL records are never cut.
        what: what the paths are, for error messages ("validation data").

    Returns:
        the documents, file by file.

    Raises:
        InputError: a path does not exist, a directory holds no data files, or a
            file is empty, not UTF-8 or bad JSONL (the message names the file,
            and the line or byte offset).
    """
    files = data_files(paths, what=what)
    docs: list[Document] = []
    for f in files:
        if f.suffix == ".jsonl":
            docs += _read_jsonl(f)
        else:
            chunks = split_text(_read_utf8(f), doc_chars)
            docs += [
                Document(f"{f}#{i}" if len(chunks) > 1 else str(f), text=c)
                for i, c in enumerate(chunks)
            ]
    return docs


def is_validation(doc: Document, val_fraction: float) -> bool:
    """Whether `doc` belongs to the validation split.

    Decided by the SHA-256 of the document's content, so it does not depend on
    file names, file order or the other documents, and duplicates land together.
    """
    h = int.from_bytes(hashlib.sha256(doc.key()).digest()[:8], "big")
    return h < val_fraction * 2**64


def split_documents(
    docs: Sequence[Document], val_fraction: float = 0.01
) -> tuple[list[Document], list[Document]]:
    """Split documents into (train, validation) with `is_validation`.

    Args:
        docs: the documents.
        val_fraction: expected share of validation documents, in [0, 1).

    Raises:
        InputError: `val_fraction` out of range, or > 0 while the validation
            split came out empty (too few documents: lower `doc_chars`).
    """
    if not 0 <= val_fraction < 1:
        raise InputError(f"val_fraction must be in [0, 1), got {val_fraction}")
    train, val = [], []
    for d in docs:
        (val if is_validation(d, val_fraction) else train).append(d)
    if val_fraction > 0 and not val:
        raise InputError(
            f"the validation split of {len(docs)} documents at val_fraction={val_fraction} "
            "is empty; use more or smaller documents, or a larger val_fraction"
        )
    if not train:
        raise InputError(f"the training split of {len(docs)} documents is empty")
    return train, val


# ------------------------------------------------------------- tokenization
class TokenizedDocument(NamedTuple):
    """A document's ids and which of them are trained on.

    Attributes:
        tokens: (n,) int32, `<bos>` first and `<eos>` last.
        trainable: (n,) bool, whether token i is a target to learn (it is then
            predicted from position i - 1). False for `<bos>` and prompt tokens.
        kind: the `Document.kind` it came from: 'text', 'completion' or 'chat'
            (packing keeps completions and chats whole).
        turn_starts: chats only: (k,) int64, the index of each turn's
            `<start_of_turn>` (turn i runs to the next one, the last to the `<eos>`);
            None otherwise.
    """

    tokens: np.ndarray
    trainable: np.ndarray
    kind: str = "text"
    turn_starts: np.ndarray | None = None


def _text_document(tokenizer: Tokenizer, text: str) -> TokenizedDocument:
    """`<bos> text <eos>` with `text` plain, every token but `<bos>` trainable."""
    tokens = np.asarray(tokenizer.encode(text, add_bos=True, add_eos=True, special=False), np.int32)
    trainable = np.ones(len(tokens), dtype=bool)
    trainable[0] = False
    return TokenizedDocument(tokens, trainable)


def _plain_from(tokenizer: Tokenizer, text: str, first: int) -> tuple[list[int], np.ndarray]:
    """Plain-text ids of `text` and, for each, whether it starts at or after
    character `first` (the start of the part to learn)."""
    ids, starts = tokenizer.encode_with_offsets(text)
    from_byte = len(text[:first].encode("utf-8"))
    return ids, np.asarray(starts, dtype=np.int64) >= from_byte


def tokenize_document(doc: Document, tokenizer: Tokenizer) -> TokenizedDocument:
    """Tokens and trainable flags of one document (see the module docstring).

    Text is `<bos>` + `encode(text, special=False)` + `<eos>`; a prompt/completion
    pair is the single plain string `prompt + completion` between `<bos>` and
    `<eos>`; a chat is `tokenizer.encode_chat(messages, add_generation_prompt=False)`
    followed by `<eos>`, so the ids are exactly those a chat gets at inference.
    Control text inside any of them is characters (module docstring). A token is
    trainable when its first byte lies in the completion (resp. a model turn's
    content), plus the completion's `<eos>` (resp. each model turn's
    `<end_of_turn>`).

    Returns:
        `TokenizedDocument`: tokens (n,) int32 and trainable (n,) bool.

    Raises:
        InputError: a bad chat (names the source), a chat with a tokenizer that
            lacks `<start_of_turn>`/`<end_of_turn>`, or text that is not valid
            Unicode.
    """
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    if doc.kind == "text":
        return _text_document(tokenizer, doc.text)
    if doc.kind == "completion":
        ids, learn = _plain_from(tokenizer, doc.prompt + doc.completion, len(doc.prompt))
        tokens = np.asarray([bos, *ids, eos], dtype=np.int32)
        return TokenizedDocument(tokens, np.concatenate([[False], learn, [True]]), "completion")
    sot, eot = tokenizer.start_of_turn_id, tokenizer.end_of_turn_id
    if sot is None or eot is None:
        raise InputError(
            f"{doc.source}: tokenizer {tokenizer.path} has no {START_OF_TURN}/{END_OF_TURN} "
            "pieces, so it cannot encode a chat"
        )
    try:
        turns = chat_turns(doc.messages)
    except InputError as e:
        raise InputError(f"{doc.source}: {e}") from None
    # The ids of `encode_chat(messages, add_generation_prompt=False)`: per turn
    # `<start_of_turn>`, plain "{role}\n{content}", `<end_of_turn>`, plain "\n".
    newline = tokenizer.encode("\n", add_bos=False, special=False)
    tokens, trainable, starts = [bos], [False], []
    for role, content in turns:
        ids, learn = _plain_from(tokenizer, f"{role}\n{content}", len(role) + 1)
        model = role == "model"
        starts.append(len(tokens))
        tokens += [sot, *ids, eot, *newline]
        trainable += [False, *(learn & model), model, *[False] * len(newline)]
    tokens.append(eos)
    trainable.append(False)
    return TokenizedDocument(
        np.asarray(tokens, np.int32), np.asarray(trainable, bool), "chat", np.asarray(starts)
    )


def tokenize_documents(docs: Sequence[Document], tokenizer: Tokenizer) -> list[TokenizedDocument]:
    """`tokenize_document` for each document, in order (the same ids and flags)."""
    return [tokenize_document(d, tokenizer) for d in docs]


# ------------------------------------------------------- chats that must fit
def _turns_of(doc: TokenizedDocument) -> list[tuple[int, int, bool]]:
    """(start, end, is_model) of each turn of a tokenized chat; tokens[start:end] is the
    turn from its `<start_of_turn>` to its trailing newline. A model turn is one with
    a trained token (its `<end_of_turn>` always is)."""
    bounds = [*doc.turn_starts.tolist(), len(doc.tokens) - 1]  # the last turn ends at <eos>
    return [(a, b, bool(doc.trainable[a:b].any())) for a, b in pairwise(bounds)]


def fit_chat(doc: TokenizedDocument, max_len: int) -> tuple[TokenizedDocument | None, int]:
    """A tokenized chat shortened to at most `max_len` tokens by dropping its oldest
    turns, or None when no reply fits with the user turn before it.

    The policy (a reply is never trained without the turn it answers):

    1. turns after the last model turn are dropped (nothing trained depends on them);
    2. then the chat keeps `<bos>`, its first turn when that is a user turn (the
       conversation's start: the system prompt is folded into it), and the latest
       whole turns that fit, starting at a user turn;
    3. when the first turn does not fit beside the last exchange, the latest whole
       turns that fit, starting at a user turn;
    4. when not even the last user turn and the reply after it fit: None (dropped).

    The kept turns' tokens and trained flags are those of the original chat (the same
    ids `encode_chat` gives the kept messages).

    Args:
        doc: a `TokenizedDocument` of kind 'chat' (with `turn_starts`).
        max_len: the longest allowed length in tokens, `<bos>` and `<eos>` included.

    Returns:
        (the chat, itself when it already fits, or None; the number of model turns
        (replies) it lost).

    Raises:
        InputError: `doc` is not a tokenized chat.
    """
    if doc.kind != "chat" or doc.turn_starts is None:
        raise InputError(f"fit_chat needs a tokenized chat, got a {doc.kind!r} document")
    if len(doc.tokens) <= max_len:
        return doc, 0
    turns = _turns_of(doc)
    replies = sum(m for _, _, m in turns)
    last = max((i for i, (_, _, m) in enumerate(turns) if m), default=-1)
    budget = max_len - 2  # <bos> and <eos>
    size = [b - a for a, b, _ in turns]
    head = [0] if not turns[0][2] else []  # the first turn, when it is a user turn

    def tail_from(lo: int, room: int) -> int | None:
        """The earliest user turn s >= lo before `last` with turns s..last in `room`."""
        for s in range(lo, last):
            if not turns[s][2] and sum(size[s : last + 1]) <= room:
                return s
        return None

    keep = None
    if head and (s := tail_from(1, budget - size[0])) is not None:
        keep = [0, *range(s, last + 1)]
    elif (s := tail_from(0, budget)) is not None:
        keep = list(range(s, last + 1))
    if keep is None:
        return None, replies
    idx = np.concatenate([[0], *(np.arange(*turns[i][:2]) for i in keep), [len(doc.tokens) - 1]])
    starts = np.cumsum([1] + [size[i] for i in keep[:-1]])
    fitted = TokenizedDocument(doc.tokens[idx], doc.trainable[idx], "chat", starts)
    return fitted, replies - sum(turns[i][2] for i in keep)


def fit_chats(
    docs: Sequence[TokenizedDocument],
    max_len: int,
    warn: Callable[[str], None] | None = None,
) -> list[TokenizedDocument]:
    """Make every chat fit in `max_len` tokens (`fit_chat`), saying what was lost.

    Chats longer than `max_len` are shortened or dropped by `fit_chat`; one warning
    line gives the counts (chats shortened, dropped, replies no longer trained).
    Prompt/completion pairs longer than `max_len` are kept (packing cuts them like
    text, so their continuation trains without the prompt): counted in the warning
    too. Other documents pass as they are.

    Args:
        docs: tokenized documents.
        max_len: the longest allowed chat in tokens (the packed sequence length).
        warn: called with the warning line (default: `warnings.warn`).

    Returns:
        the documents in order, shortened chats in place, dropped ones left out.

    Raises:
        InputError: every document was a chat that had to be dropped.
    """
    out: list[TokenizedDocument] = []
    shortened = dropped = lost = long_completions = 0
    for d in docs:
        if d.kind == "chat" and len(d.tokens) > max_len:
            fitted, n = fit_chat(d, max_len)
            lost += n
            if fitted is None:
                dropped += 1
                continue
            shortened += 1
            d = fitted
        elif d.kind == "completion" and len(d.tokens) > max_len:
            long_completions += 1
        out.append(d)
    notes = []
    if shortened or dropped:
        chats = sum(d.kind == "chat" for d in docs)
        notes.append(
            f"{shortened + dropped} of {chats} chats are longer than {max_len} tokens: "
            f"{shortened} shortened (oldest turns dropped, the first user turn kept where "
            f"it fits), {dropped} dropped (their last exchange alone is longer), {lost} "
            "replies not trained"
        )
    if long_completions:
        notes.append(
            f"{long_completions} prompt/completion documents are longer than {max_len} "
            "tokens: cut across sequences, their continuation trains without the prompt"
        )
    if notes:
        message = "; ".join(notes) + (
            f"; raise seq_len above {max_len}, or set carry_state=true to train them whole"
        )
        (warn or (lambda m: warnings.warn(m, stacklevel=3)))(message)
    if not out:
        raise InputError(
            f"all {len(docs)} documents are chats whose last exchange is longer than "
            f"{max_len} tokens: raise seq_len, or set carry_state=true"
        )
    return out


# ------------------------------------------------------------------ packing
class Batch(NamedTuple):
    """A batch of packed sequences; every field is (b, t) on the CPU."""

    tokens: torch.Tensor  # (b, t) int64
    segment_pos: torch.Tensor  # (b, t) int64
    targets: torch.Tensor  # (b, t) int64
    loss_mask: torch.Tensor  # (b, t) float32


class _Stream(NamedTuple):
    """One epoch's sequences laid end to end, plus one token of padding."""

    tokens: np.ndarray  # (n,) int64
    pos: np.ndarray  # (n,) int64, position in the document
    doc: np.ndarray  # (n,) int64, document number in this epoch, -1 for padding
    trainable: np.ndarray  # (n,) bool
    order: np.ndarray  # (num_sequences,) sequence index for each slot of the epoch


def _best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of at most `capacity` for items of the given lengths (each <= capacity):
    best fit, longest first (ties by index). Returns the item indices of each bin."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, bin index)
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))  # the fullest bin with room for n
        if k < len(free):
            room, j = free.pop(k)
        else:
            room, j = capacity, len(bins)
            bins.append([])
        bins[j].append(i)
        bisect.insort(free, (room - n, j))
    return bins


def _lay_out(
    docs: Sequence[TokenizedDocument], total: int, pad_id: int, first_doc: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`docs` end to end then padding to `total` tokens: (tokens int64, pos int64, doc
    int64 numbered from `first_doc` (-1 on padding), trainable bool), each (total,).
    Padding has position 0: each padding token is a document of its own (the model's
    state restarts there, cheaply) and no target."""
    lengths = np.array([len(d.tokens) for d in docs], dtype=np.int64)
    n = int(lengths.sum())
    pad = total - n
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return (
        np.concatenate([d.tokens for d in docs] + [np.full(pad, pad_id)]).astype(np.int64),
        np.concatenate([np.arange(n) - starts, np.zeros(pad, np.int64)]),
        np.concatenate([np.repeat(np.arange(len(docs)) + first_doc, lengths), np.full(pad, -1)]),
        np.concatenate([d.trainable for d in docs] + [np.zeros(pad, bool)]),
    )


class PackedDataset:
    """Deterministic, resumable batches of packed sequences.

    Plain-text documents run on from one sequence to the next; chats and
    prompt/completion pairs (`TokenizedDocument.kind`) of at most `seq_len` tokens
    lie whole in one sequence each: they are packed into whole-document sequences
    once (best fit, longest first), the rest of each padded (longer ones are cut like
    text: `fit_chats` shortens chats first). The text sequences come first, then the
    whole-document ones.

    Batch `step` (counted from 0 across epochs) is a pure function of the
    documents, `seed` and `step`: epoch `e = step // steps_per_epoch` orders the
    text documents and then all the packed sequences with
    `numpy.random.default_rng([seed, e])` (when `shuffle`), and the batch is slots
    `i*b ... i*b + b - 1` of that order, `i = step % steps_per_epoch`. So
    `batch(step)` can be called directly, and iteration resumes exactly from
    `state_dict()` / `load_state_dict()`.

    Args:
        docs: tokenized documents.
        seq_len: t, tokens per sequence.
        batch_size: b, sequences per batch.
        pad_id: id used to pad the epoch's last sequence.
        seed: shuffling seed.
        shuffle: shuffle documents and sequences each epoch (False for
            validation: the order is then fixed).
        drop_last: drop an epoch's last, smaller batch (keeps shapes fixed).
        num_epochs: iteration stops after this many epochs; None: never.

    Raises:
        InputError: no documents, a bad size, or too few tokens for one batch.
    """

    def __init__(
        self,
        docs: Sequence[TokenizedDocument],
        seq_len: int,
        batch_size: int,
        *,
        pad_id: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        num_epochs: int | None = None,
    ) -> None:
        if seq_len < 1 or batch_size < 1:
            raise InputError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        if not docs:
            raise InputError("PackedDataset needs at least one document")
        self.docs = list(docs)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.pad_id, self.seed, self.shuffle = pad_id, seed, shuffle
        self.drop_last, self.num_epochs = drop_last, num_epochs
        self.num_tokens = sum(len(d.tokens) for d in self.docs)
        whole = [d.kind != "text" and len(d.tokens) <= seq_len for d in self.docs]
        self._text = [d for d, w in zip(self.docs, whole) if not w]
        self._text_rows = math.ceil(sum(len(d.tokens) for d in self._text) / seq_len)
        # The whole-document sequences are the same every epoch (only their order in
        # the epoch changes): laid out once, documents numbered after the text ones.
        kept = [d for d, w in zip(self.docs, whole) if w]
        rows = _best_fit([len(d.tokens) for d in kept], seq_len)
        first, parts = len(self._text), []
        for row in rows:
            parts.append(_lay_out([kept[i] for i in row], seq_len, pad_id, first_doc=first))
            first += len(row)
        self._whole = [np.concatenate(f) for f in zip(*parts)] if parts else None
        self.num_sequences = self._text_rows + len(rows)
        div = self.num_sequences / batch_size
        self.steps_per_epoch = math.floor(div) if drop_last else math.ceil(div)
        if self.steps_per_epoch == 0:
            raise InputError(
                f"{self.num_tokens} tokens make {self.num_sequences} sequences of {seq_len}, "
                f"fewer than one batch of {batch_size}"
            )
        self.step = 0
        self._cache: tuple[int, _Stream] | None = None

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.steps_per_epoch

    def _stream(self, epoch: int) -> _Stream:
        """The packed token stream of `epoch` (the latest one is cached)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        n = len(self._text)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            doc_order = rng.permutation(n)
            seq_order = rng.permutation(self.num_sequences)
        else:
            doc_order, seq_order = np.arange(n), np.arange(self.num_sequences)
        total = self._text_rows * self.seq_len
        parts = [_lay_out([self._text[i] for i in doc_order], total, self.pad_id)]
        if self._whole is not None:
            parts.append(self._whole)
        parts.append(_lay_out([], 1, self.pad_id))  # the last sequence's last target
        tokens, pos, doc, trainable = (np.concatenate(f) for f in zip(*parts))
        stream = _Stream(tokens, pos, doc, trainable, seq_order)
        self._cache = (epoch, stream)
        return stream

    def sequence(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        """Packed sequence `index` of `epoch` (before the shuffle of sequences).

        Returns:
            dict with `tokens`, `segment_pos`, `targets` (t,) int64 and
            `loss_mask` (t,) float32.
        """
        if not 0 <= index < self.num_sequences:
            raise InputError(f"sequence index {index} out of range [0, {self.num_sequences})")
        st = self._stream(epoch)
        s, t = index * self.seq_len, self.seq_len
        doc = st.doc[s : s + t]
        # The document in progress at the start restarts at 0 (see module docstring).
        segment_pos = st.pos[s : s + t] - np.where(doc == doc[0], st.pos[s], 0)
        same_doc = st.doc[s + 1 : s + t + 1] == doc
        return {
            "tokens": st.tokens[s : s + t],
            "segment_pos": segment_pos,
            "targets": st.tokens[s + 1 : s + t + 1],
            "loss_mask": (same_doc & st.trainable[s + 1 : s + t + 1]).astype(np.float32),
        }

    def batch(self, step: int) -> Batch:
        """Batch number `step` (from 0, across epochs), a pure function of step.

        Raises:
            InputError: `step` is negative.
        """
        if step < 0:
            raise InputError(f"batch step must be >= 0, got {step}")
        epoch, i = divmod(step, self.steps_per_epoch)
        order = self._stream(epoch).order[i * self.batch_size : (i + 1) * self.batch_size]
        rows = [self.sequence(epoch, int(j)) for j in order]
        return Batch(*(torch.from_numpy(np.stack([r[k] for r in rows])) for k in Batch._fields))

    def __iter__(self) -> Iterator[Batch]:
        """Yield batches from `self.step` on, advancing it (until `num_epochs`)."""
        while self.num_epochs is None or self.step < self.num_epochs * self.steps_per_epoch:
            batch = self.batch(self.step)
            self.step += 1
            yield batch

    @property
    def epoch(self) -> float:
        """Epochs completed, fractional."""
        return self.step / self.steps_per_epoch

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "num_documents": len(self.docs),
            "num_tokens": self.num_tokens,
        }

    def state_dict(self) -> dict[str, Any]:
        """The position (`step`, the next batch to yield) and what it depends on."""
        return {"step": self.step, **self._fingerprint()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at `state["step"]`.

        Raises:
            InputError: `state` was made with other data or settings (names the
                key and both values), or lacks `step`.
        """
        if not isinstance(state.get("step"), int) or state["step"] < 0:
            raise InputError(f"data state has no valid 'step': {state.get('step')!r}")
        if "num_streams" in state:
            raise InputError(
                "data state was saved by a run with carry_state=true (streams of documents "
                "with carried state); resume it with carry_state=true"
            )
        for key, value in self._fingerprint().items():
            if key in state and state[key] != value:
                raise InputError(
                    f"data state was saved with {key}={state[key]!r}, but this dataset "
                    f"has {key}={value!r}; resuming would not reproduce the batches"
                )
        self.step = state["step"]


# ---------------------------------------------------------- carried streams
def _state_tensors(state: GriffinState) -> dict[str, torch.Tensor]:
    """A model state as named CPU tensors (`save_state`'s names), detached."""
    out = {"next_pos": state.next_pos.detach().cpu()}
    for i, block in enumerate(state.blocks):
        for name, t in zip(block._fields, block):
            out[f"blocks.{i}.{name}"] = t.detach().cpu()
    return out


def _state_from_tensors(tensors: Mapping[str, torch.Tensor], rows: torch.Tensor) -> GriffinState:
    """The `rows` of a state saved by `_state_tensors`.

    Raises:
        InputError: a missing or unknown tensor name (named).
    """
    blocks: list[RecurrentState | AttentionState] = []
    while f"blocks.{len(blocks)}.rg_lru" in tensors or f"blocks.{len(blocks)}.keys" in tensors:
        i = len(blocks)
        cls = RecurrentState if f"blocks.{i}.rg_lru" in tensors else AttentionState
        names = [f"blocks.{i}.{f}" for f in cls._fields]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise InputError(f"carried state in the data state lacks {missing[0]!r}")
        blocks.append(cls(*(tensors[n].index_select(0, rows) for n in names)))
    expected = {"next_pos"} | {f"blocks.{i}.{f}" for i, b in enumerate(blocks) for f in b._fields}
    unknown = sorted(set(tensors) - expected)
    if unknown or "next_pos" not in tensors:
        what = f"an unknown tensor {unknown[0]!r}" if unknown else "no 'next_pos'"
        raise InputError(f"carried state in the data state has {what}")
    return GriffinState(tuple(blocks), tensors["next_pos"].index_select(0, rows))


def _detached(state: GriffinState) -> GriffinState:
    return GriffinState(
        tuple(type(b)(*(t.detach() for t in b)) for b in state.blocks), state.next_pos.detach()
    )


def _all_gather(obj: Any, world_size: int) -> list[Any]:
    """`obj` of every rank, in rank order (`torch.distributed.all_gather_object`)."""
    if world_size == 1:
        return [obj]
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise InputError(
            f"StreamDataset has world_size={world_size} but no torch.distributed process "
            "group is initialised to gather the carried state"
        )
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


class StreamDataset:
    """Documents laid whole, end to end, in parallel streams fed `seq_len` tokens at a
    time, for training with the model's state carried from one segment to the next
    (truncated backpropagation through time, `TrainConfig.carry_state`).

    Layout. There are `num_streams = batch_size * world_size * grad_accum` streams
    (global: the same for one process with `batch_size * world_size`). Documents are
    assigned to streams once, longest first, each to the stream with the fewest
    tokens so far (so the streams end within one document's length of each other);
    each epoch orders every stream's documents anew
    (`numpy.random.default_rng([seed, epoch, stream])` when `shuffle`) and lays them
    end to end, padding every stream to `segments_per_epoch * seq_len` tokens (padding
    has segment_pos 0 and no target). Every token of every document appears exactly
    once per epoch, in order, and segment_pos runs on across segments (0 only at a
    document's `<bos>`, where the model's state resets).

    Batches. Optimiser step k of an epoch feeds segment k (tokens `[k*t, (k+1)*t)`)
    of every stream, in `grad_accum` micro-batches: micro-batch j holds streams
    `[j*R, (j+1)*R)`, `R = batch_size * world_size`, and rank r takes rows
    `[r*b, (r+1)*b)` of those. `step` counts micro-batches (as `PackedDataset`'s),
    and `batch(step)` is a pure function of the documents, `seed` and `step`.

    Carried state. The training loop asks `carried_state(j)` for the state of
    micro-batch j's streams (None at the start: empty), runs the model from it, and
    hands the new state to `set_carried_state(j, state)`, which keeps it detached
    (no gradient crosses segments). `state_dict()` holds the data position and the
    carried state of every stream as CPU tensors (gathered from all ranks: a
    collective call under torch.distributed), so that `load_state_dict` resumes
    exactly, also with another number of ranks that gives the same `num_streams`.

    Args:
        docs: tokenized documents (chats and completions whole: nothing is cut).
        seq_len: t, tokens per segment.
        batch_size: b, rows per micro-batch on this rank.
        grad_accum: micro-batches per optimiser step.
        world_size, rank: this process's place among the data-parallel ranks.
        pad_id: the id of padding tokens.
        seed: shuffling seed.
        shuffle: reorder each stream's documents every epoch.
        num_epochs: iteration stops after this many epochs; None: never.

    Raises:
        InputError: a bad size or rank, no documents, or fewer documents than streams.
    """

    def __init__(
        self,
        docs: Sequence[TokenizedDocument],
        seq_len: int,
        batch_size: int,
        *,
        grad_accum: int = 1,
        world_size: int = 1,
        rank: int = 0,
        pad_id: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
    ) -> None:
        if min(seq_len, batch_size, grad_accum, world_size) < 1:
            raise InputError(
                "seq_len, batch_size, grad_accum and world_size must be >= 1, got "
                f"{seq_len}, {batch_size}, {grad_accum}, {world_size}"
            )
        if not 0 <= rank < world_size:
            raise InputError(f"rank {rank} is not in [0, world_size={world_size})")
        self.docs = list(docs)
        self.seq_len, self.batch_size, self.grad_accum = seq_len, batch_size, grad_accum
        self.world_size, self.rank = world_size, rank
        self.pad_id, self.seed, self.shuffle, self.num_epochs = pad_id, seed, shuffle, num_epochs
        self.num_streams = batch_size * world_size * grad_accum
        if len(self.docs) < self.num_streams:
            raise InputError(
                f"carry_state lays the documents in {self.num_streams} streams (batch_size "
                f"{batch_size} x ranks {world_size} x grad_accum {grad_accum}) but there are "
                f"only {len(self.docs)} documents: lower batch_size or grad_accum, or add data"
            )
        lengths = [len(d.tokens) for d in self.docs]
        self.num_tokens = sum(lengths)
        heap = [(0, g) for g in range(self.num_streams)]  # (tokens so far, stream)
        members: list[list[int]] = [[] for _ in range(self.num_streams)]
        for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
            total, g = heapq.heappop(heap)
            members[g].append(i)
            heapq.heappush(heap, (total + lengths[i], g))
        self._members = [np.sort(m) for m in members]  # unshuffled: corpus order
        longest = max(total for total, _ in heap)
        self.segments_per_epoch = math.ceil(longest / seq_len)
        self.steps_per_epoch = self.segments_per_epoch * grad_accum  # micro-batches
        # Share of the fed tokens that are document tokens (the rest is padding).
        self.fill = self.num_tokens / (self.num_streams * self.segments_per_epoch * seq_len)
        self.step = 0
        self._cache: tuple[int, tuple[np.ndarray, ...]] | None = None
        self._carried: list[GriffinState | None] = [None] * grad_accum

    def __len__(self) -> int:
        """Micro-batches per epoch."""
        return self.steps_per_epoch

    def streams(self, group: int) -> list[int]:
        """The global stream indices of this rank's rows in micro-batch `group`."""
        first = group * self.batch_size * self.world_size + self.rank * self.batch_size
        return list(range(first, first + self.batch_size))

    def _epoch(self, epoch: int) -> tuple[np.ndarray, ...]:
        """(tokens, pos, doc, trainable), each (grad_accum * b, L + 1) for this rank's
        streams (micro-batch by micro-batch), L = segments_per_epoch * t."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        total = self.segments_per_epoch * self.seq_len + 1
        rows = []
        for g in (g for j in range(self.grad_accum) for g in self.streams(j)):
            order = self._members[g]
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch, g]).permutation(order)
            rows.append(_lay_out([self.docs[i] for i in order], total, self.pad_id))
        arrays = tuple(np.stack(f) for f in zip(*rows))
        self._cache = (epoch, arrays)
        return arrays

    def batch(self, step: int) -> Batch:
        """Micro-batch number `step` (from 0, across epochs): a pure function of step.

        Raises:
            InputError: `step` is negative.
        """
        if step < 0:
            raise InputError(f"batch step must be >= 0, got {step}")
        epoch, i = divmod(step, self.steps_per_epoch)
        segment, group = divmod(i, self.grad_accum)
        tokens, pos, doc, trainable = self._epoch(epoch)
        rows = slice(group * self.batch_size, (group + 1) * self.batch_size)
        s, t = segment * self.seq_len, self.seq_len
        now, nxt = slice(s, s + t), slice(s + 1, s + t + 1)
        mask = (doc[rows, nxt] == doc[rows, now]) & trainable[rows, nxt]
        return Batch(
            tokens=torch.from_numpy(tokens[rows, now].copy()),
            segment_pos=torch.from_numpy(pos[rows, now].copy()),
            targets=torch.from_numpy(tokens[rows, nxt].copy()),
            loss_mask=torch.from_numpy(mask.astype(np.float32)),
        )

    def __iter__(self) -> Iterator[Batch]:
        """Yield micro-batches from `self.step` on, advancing it (until `num_epochs`)."""
        while self.num_epochs is None or self.step < self.num_epochs * self.steps_per_epoch:
            batch = self.batch(self.step)
            self.step += 1
            yield batch

    @property
    def epoch(self) -> float:
        """Epochs completed, fractional."""
        return self.step / self.steps_per_epoch

    # -- carried state ---------------------------------------------------------------
    def carried_state(
        self, group: int, device: torch.device | str | None = None
    ) -> GriffinState | None:
        """The state micro-batch `group` of the current step continues from: the state
        its streams reached at the end of the previous segment (None: empty, at the
        start), moved to `device` when given (it is on the CPU after
        `load_state_dict`)."""
        state = self._carried[group]
        if state is not None and device is not None:
            state = self._carried[group] = state.to(device)
        return state

    def set_carried_state(self, group: int, state: GriffinState) -> None:
        """Keep `state`, detached, as the state micro-batch `group` continues from in
        the next step (the state the model returned for this step's micro-batch)."""
        if state.batch_size != self.batch_size:
            raise InputError(
                f"carried state has {state.batch_size} rows, micro-batches have {self.batch_size}"
            )
        self._carried[group] = _detached(state)

    # -- position ----------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "seq_len": self.seq_len,
            "num_streams": self.num_streams,
            "grad_accum": self.grad_accum,
            "shuffle": self.shuffle,
            "num_documents": len(self.docs),
            "num_tokens": self.num_tokens,
        }

    def state_dict(self) -> dict[str, Any]:
        """The position (`step`, the next micro-batch), what it depends on, and
        `carried`: the carried state of all `num_streams` streams as CPU tensors,
        `{"next_pos": (S,), "blocks.{i}.{field}": (S, ...)}` in stream order (None
        before the first step). A collective call under several ranks.

        Raises:
            InputError: called in the middle of an optimiser step (some micro-batches
                of it fetched but their state not handed back).
        """
        have = [s is not None for s in self._carried]
        carried = None
        if any(have):
            if not all(have) or self.step % self.grad_accum:
                raise InputError(
                    f"StreamDataset.state_dict at micro-batch {self.step}, inside an "
                    f"optimiser step of {self.grad_accum}: save at a step boundary"
                )
            local = [_state_tensors(s) for s in self._carried]
            ranks = _all_gather(local, self.world_size)
            carried = {
                name: torch.cat([r[j][name] for j in range(self.grad_accum) for r in ranks])
                for name in local[0]
            }
        return {"step": self.step, **self._fingerprint(), "carried": carried}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at `state["step"]` with the carried state of `state["carried"]`.

        Raises:
            InputError: `state` was made with other data or settings (names the key
                and both values), by a packed run (`carry_state=false`), lacks
                `step`, or holds a carried state of another number of streams.
        """
        if not isinstance(state.get("step"), int) or state["step"] < 0:
            raise InputError(f"data state has no valid 'step': {state.get('step')!r}")
        if "num_streams" not in state:
            raise InputError(
                "data state was saved by a run with carry_state=false (packed sequences); "
                "resume it with carry_state=false"
            )
        for key, value in self._fingerprint().items():
            if key in state and state[key] != value:
                raise InputError(
                    f"data state was saved with {key}={state[key]!r}, but this dataset "
                    f"has {key}={value!r}; resuming would not reproduce the batches"
                )
        carried = state.get("carried")
        groups: list[GriffinState | None] = [None] * self.grad_accum
        if carried is not None:
            rows = {tuple(t.shape[:1]) for t in carried.values()}
            if rows != {(self.num_streams,)}:
                raise InputError(
                    f"carried state in the data state has rows {sorted(rows)}, expected "
                    f"{self.num_streams} (one per stream)"
                )
            for j in range(self.grad_accum):
                groups[j] = _state_from_tensors(carried, torch.tensor(self.streams(j)))
        elif state["step"] > 0:
            raise InputError(
                f"data state at step {state['step']} has no carried state: it cannot "
                "continue the streams' documents"
            )
        self.step, self._carried = state["step"], groups


def expand_paths(patterns: PathLike | Sequence[PathLike], what: str = "data") -> list[str]:
    """Expand glob patterns (`data/*.txt`, `**` recursive) in a list of paths, sorted
    per pattern; plain paths pass as they are (`read_documents` checks them).

    Raises:
        InputError: a pattern that matches nothing (named, with `what`).
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    out: list[str] = []
    for p in patterns:
        p = os.path.expanduser(os.fspath(p))
        if glob.has_magic(p) and not os.path.exists(p):  # a literal name wins
            matches = sorted(glob.glob(p, recursive=True))
            if not matches:
                raise InputError(f"{what} pattern {p!r} matches no file")
            out += matches
        else:
            out.append(p)
    return out


def build_datasets(
    paths: PathLike | Sequence[PathLike],
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    *,
    val_paths: PathLike | Sequence[PathLike] | None = None,
    val_fraction: float = 0.01,
    doc_chars: int | None = DEFAULT_DOC_CHARS,
    seed: int = 0,
    carry_state: bool = False,
    grad_accum: int = 1,
    world_size: int = 1,
    rank: int = 0,
    warn: Callable[[str], None] | None = None,
) -> tuple[PackedDataset | StreamDataset, PackedDataset | None]:
    """Read, split, tokenize and pack: (train, validation or None).

    The one builder of training and validation data (`rgemma train`, the
    benchmarks). Training batches are shuffled and endless: a `PackedDataset`, with
    chats shortened to `seq_len` first (`fit_chats`, which warns), or with
    `carry_state` a `StreamDataset` (documents whole, state carried). Validation
    batches are packed, in a fixed order, one epoch, last batch kept. Validation is
    scored whole, one document at a time, from `validation.docs`
    (`training.evaluate`), so its chats are never shortened.

    Args:
        paths: training files, directories and glob patterns (`expand_paths`).
        tokenizer: the model's tokenizer.
        seq_len, batch_size: t and b of the packed batches (b per rank).
        val_paths: held-out files; when given, every document under `paths` trains.
        val_fraction: without `val_paths`, the share of documents held out by
            `split_documents` (0: no validation).
        doc_chars: longest plain-text document in characters (`split_text`).
        seed: the training order's shuffling seed.
        carry_state: stream the training documents (`StreamDataset`).
        grad_accum, world_size, rank: the `StreamDataset`'s (carry_state only).
        warn: where `fit_chats` sends its warning line (default `warnings.warn`).

    Raises:
        InputError: a glob that matches nothing; as `read_documents`,
            `split_documents`, `fit_chats`, `PackedDataset` and `StreamDataset`.
    """
    train_docs = read_documents(expand_paths(paths, "train_data"), doc_chars)
    if val_paths:
        val_docs = read_documents(
            expand_paths(val_paths, "val_data"), doc_chars, what="validation data"
        )
    else:
        train_docs, val_docs = split_documents(train_docs, val_fraction)
    tokenized = tokenize_documents(train_docs, tokenizer)
    train: PackedDataset | StreamDataset
    if carry_state:
        train = StreamDataset(
            tokenized,
            seq_len,
            batch_size,
            grad_accum=grad_accum,
            world_size=world_size,
            rank=rank,
            pad_id=tokenizer.pad_id,
            seed=seed,
        )
    else:
        train = PackedDataset(
            fit_chats(tokenized, seq_len, warn),
            seq_len,
            batch_size,
            pad_id=tokenizer.pad_id,
            seed=seed,
        )
    val = None
    if val_docs:
        val = PackedDataset(
            tokenize_documents(val_docs, tokenizer),
            seq_len,
            batch_size,
            pad_id=tokenizer.pad_id,
            shuffle=False,
            drop_last=False,
            num_epochs=1,
        )
    return train, val
