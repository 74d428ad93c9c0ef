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
ends it, the same rule as `encode_chat` at inference.) Documents are concatenated (in
an order shuffled per epoch) and cut into sequences of `seq_len` tokens; the last
sequence is padded with `pad_id`. For each sequence:

    tokens      (t,) int64   the input ids
    segment_pos (t,) int64   position in the document, 0 at each `<bos>`. When a
                             document runs on from the previous sequence, its
                             continuation restarts at 0 too: every sequence is
                             self-contained (the model's state resets where
                             segment_pos == 0), at the price of the continuation
                             being trained without its earlier context.
    targets     (t,) int64   the next token in the stream (pad_id past the end)
    loss_mask   (t,) float32 1 where targets[i] is a token to learn: 0 at the last
                             token of a document (its target is the next
                             document's <bos>), on padding, and where the target is
                             prompt text (fine-tuning).
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from rgemma.errors import InputError
from rgemma.tokenizer import END_OF_TURN, START_OF_TURN, Tokenizer, chat_turns

__all__ = [
    "Batch",
    "Document",
    "PackedDataset",
    "TokenizedDocument",
    "build_datasets",
    "expand_paths",
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
    paths: PathLike | Sequence[PathLike], doc_chars: int | None = DEFAULT_DOC_CHARS
) -> list[Document]:
    """Read every document under `paths`, in a deterministic order.

    Args:
        paths: files and/or directories (searched recursively for `*.txt` and
            `*.jsonl`, sorted by path). `.jsonl` files are JSONL; any other file
            is UTF-8 plain text.
        doc_chars: longest plain-text document in characters (`split_text`);
            None for one document per text file. JSONL records are never cut.

    Returns:
        the documents, file by file.

    Raises:
        InputError: a path does not exist, a directory holds no data files, or a
            file is empty, not UTF-8 or bad JSONL (the message names the file,
            and the line or byte offset).
    """
    files = data_files(paths, what="training data")
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
    """

    tokens: np.ndarray
    trainable: np.ndarray


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
        return TokenizedDocument(tokens, np.concatenate([[False], learn, [True]]))
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
    tokens, trainable = [bos], [False]
    for role, content in turns:
        ids, learn = _plain_from(tokenizer, f"{role}\n{content}", len(role) + 1)
        model = role == "model"
        tokens += [sot, *ids, eot, *newline]
        trainable += [False, *(learn & model), model, *[False] * len(newline)]
    tokens.append(eos)
    trainable.append(False)
    return TokenizedDocument(np.asarray(tokens, np.int32), np.asarray(trainable, bool))


def tokenize_documents(docs: Sequence[Document], tokenizer: Tokenizer) -> list[TokenizedDocument]:
    """`tokenize_document` for each document, in order (the same ids and flags)."""
    return [tokenize_document(d, tokenizer) for d in docs]


# ------------------------------------------------------------------ packing
class Batch(NamedTuple):
    """A batch of packed sequences; every field is (b, t) on the CPU."""

    tokens: torch.Tensor  # (b, t) int64
    segment_pos: torch.Tensor  # (b, t) int64
    targets: torch.Tensor  # (b, t) int64
    loss_mask: torch.Tensor  # (b, t) float32


class _Stream(NamedTuple):
    """One epoch's documents laid end to end, plus seq_len + 1 of padding."""

    tokens: np.ndarray  # (n,) int64
    pos: np.ndarray  # (n,) int64, position in the document
    doc: np.ndarray  # (n,) int64, document number in this epoch, -1 for padding
    trainable: np.ndarray  # (n,) bool
    order: np.ndarray  # (num_sequences,) sequence index for each slot of the epoch


class PackedDataset:
    """Deterministic, resumable batches of packed sequences.

    Batch `step` (counted from 0 across epochs) is a pure function of the
    documents, `seed` and `step`: epoch `e = step // steps_per_epoch` orders the
    documents and then the packed sequences with `numpy.random.default_rng([seed,
    e])` (when `shuffle`), and the batch is slots `i*b ... i*b + b - 1` of that
    order, `i = step % steps_per_epoch`. So `batch(step)` can be called directly,
    and iteration resumes exactly from `state_dict()` / `load_state_dict()`.

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
        self.num_sequences = math.ceil(self.num_tokens / seq_len)
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
        n = len(self.docs)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            doc_order = rng.permutation(n)
            seq_order = rng.permutation(self.num_sequences)
        else:
            doc_order, seq_order = np.arange(n), np.arange(self.num_sequences)
        docs = [self.docs[i] for i in doc_order]
        lengths = np.array([len(d.tokens) for d in docs])
        pad = self.num_sequences * self.seq_len + 1 - self.num_tokens
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        stream = _Stream(
            tokens=np.concatenate([d.tokens for d in docs] + [np.full(pad, self.pad_id)]).astype(
                np.int64
            ),
            pos=np.concatenate([np.arange(self.num_tokens) - starts, np.zeros(pad, np.int64)]),
            doc=np.concatenate([np.repeat(np.arange(n), lengths), np.full(pad, -1)]),
            trainable=np.concatenate([d.trainable for d in docs] + [np.zeros(pad, bool)]),
            order=seq_order,
        )
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
        for key, value in self._fingerprint().items():
            if key in state and state[key] != value:
                raise InputError(
                    f"data state was saved with {key}={state[key]!r}, but this dataset "
                    f"has {key}={value!r}; resuming would not reproduce the batches"
                )
        self.step = state["step"]


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
) -> tuple[PackedDataset, PackedDataset | None]:
    """Read, split, tokenize and pack: (train, validation or None).

    The one builder of training and validation data (`rgemma train`, the
    benchmarks). Training batches are shuffled and endless; validation batches are
    in a fixed order, one epoch, last batch kept. Validation is scored whole, one
    document at a time, from `validation.docs` (`training.evaluate`).

    Args:
        paths: training files, directories and glob patterns (`expand_paths`).
        tokenizer: the model's tokenizer.
        seq_len, batch_size: t and b of the packed batches.
        val_paths: held-out files; when given, every document under `paths` trains.
        val_fraction: without `val_paths`, the share of documents held out by
            `split_documents` (0: no validation).
        doc_chars: longest plain-text document in characters (`split_text`).
        seed: the training order's shuffling seed.

    Raises:
        InputError: a glob that matches nothing; as `read_documents`,
            `split_documents` and `PackedDataset`.
    """
    train_docs = read_documents(expand_paths(paths, "train_data"), doc_chars)
    if val_paths:
        val_docs = read_documents(expand_paths(val_paths, "val_data"), doc_chars)
    else:
        train_docs, val_docs = split_documents(train_docs, val_fraction)
    train = PackedDataset(
        tokenize_documents(train_docs, tokenizer),
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
