"""SentencePiece tokenizer: encode/decode, Gemma chat template, streaming decode, training.

`Tokenizer` wraps a `tokenizer.model` file, either Gemma's own (vocab 256000, the
one the official RecurrentGemma checkpoints use) or one made by `train_tokenizer`
(the bundled demo model's, vocab 4096). Both share Gemma's conventions: byte
fallback, split digits, no dummy prefix, identity normalisation (so
`decode(encode(text)) == text` for any text), and the special ids `<pad>`=0,
`<eos>`=1, `<bos>`=2, `<unk>`=3 plus the user-defined `<start_of_turn>` and
`<end_of_turn>` pieces of the instruction-tuned (IT) chat format.

Official counterparts: `recurrentgemma/torch/sampler.py` (encode with BOS, decode)
and the Gemma IT prompt format documented at ai.google.dev/gemma/docs/formatting.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import sentencepiece as spm

from rgemma.errors import CheckpointError, InputError

__all__ = [
    "BUNDLED_TOKENIZER_PATH",
    "CHAT_ROLES",
    "StreamDecoder",
    "Tokenizer",
    "chat_turns",
    "train_tokenizer",
]

#: The bundled model's tokenizer (vocab 4096, trained by scripts/train_tokenizer.sh),
#: shipped beside its weights in `rgemma/assets/bundled/`.
BUNDLED_TOKENIZER_PATH = Path(__file__).parent / "assets" / "bundled" / "tokenizer.model"

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"

#: Accepted chat roles and the role name each one is written as in the prompt.
CHAT_ROLES: Mapping[str, str] = {
    "user": "user",
    "model": "model",
    "assistant": "model",  # alias used by OpenAI-style message lists
    "system": "system",  # folded into the first user turn, see `apply_chat_template`
}


class Tokenizer:
    """A SentencePiece model with Gemma's special tokens and chat template.

    Args:
        path: a SentencePiece `tokenizer.model` file.

    Raises:
        CheckpointError: the file does not exist, is a directory, or is not a
            SentencePiece model (the message names the path).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"tokenizer file not found: {self.path}")
        if not self.path.is_file():
            raise CheckpointError(f"tokenizer path is not a file: {self.path}")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"not a SentencePiece model file: {self.path} ({e})") from None
        self._start_of_turn_id = self._optional_piece_id(START_OF_TURN)
        self._end_of_turn_id = self._optional_piece_id(END_OF_TURN)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    def _optional_piece_id(self, piece: str) -> int | None:
        """Id of `piece`, or None when the vocabulary lacks it."""
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i

    # ------------------------------------------------------------------ ids
    @property
    def vocab_size(self) -> int:
        """Number of token ids (256000 for Gemma)."""
        return self.sp.vocab_size()

    @property
    def bos_id(self) -> int:
        """Beginning-of-sequence id (2 for Gemma)."""
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        """End-of-sequence id (1 for Gemma)."""
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        """Padding id (0 for Gemma)."""
        return self.sp.pad_id()

    @property
    def start_of_turn_id(self) -> int | None:
        """Id of the `<start_of_turn>` piece (106 for Gemma), None if absent."""
        return self._start_of_turn_id

    @property
    def end_of_turn_id(self) -> int | None:
        """Id of the `<end_of_turn>` piece (107 for Gemma), None if absent."""
        return self._end_of_turn_id

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary piece of `token_id` (e.g. `'▁world'`, `'<0xE2>'`).

        Raises:
            InputError: `token_id` is outside `[0, vocab_size)`.
        """
        return self.sp.id_to_piece(self._check_ids([token_id])[0])

    def piece_to_id(self, piece: str) -> int:
        """The id of `piece`; `unk_id` if the vocabulary lacks it."""
        return self.sp.piece_to_id(piece)

    def is_byte(self, token_id: int) -> bool:
        """Whether `token_id` is a byte-fallback piece such as `<0xE2>`."""
        return self.sp.is_byte(token_id)

    # ------------------------------------------------------- encode/decode
    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Token ids of `text`.

        Text that spells a user-defined piece (`<start_of_turn>`, and in Gemma's
        vocabulary also runs of newlines and `<unusedN>`) becomes that piece, as in
        the official tokenizer.

        Args:
            text: any string; encoding is lossless (byte fallback).
            add_bos: put `bos_id` first.
            add_eos: put `eos_id` last.

        Returns:
            list of ids in `[0, vocab_size)`.

        Raises:
            InputError: `text` is not a str.
        """
        if not isinstance(text, str):
            raise InputError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
        ids = self.sp.encode(text)
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids of `text` (no BOS/EOS) and the UTF-8 byte offset where each starts.

        Returns:
            (ids, starts): two lists of equal length; `starts[i]` is the byte offset
            in `text.encode()` of the first byte token i covers.
        """
        proto = self.sp.encode(text, return_type="proto")
        return [p.id for p in proto.pieces], [p.begin for p in proto.pieces]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, exactly as SentencePiece decodes it.

        Control tokens (`<pad>`, `<eos>`, `<bos>`) decode to nothing, user-defined
        ones (`<start_of_turn>`) to their text, `<unk>` to " ⁇ ", and an invalid or
        incomplete byte-fallback sequence to U+FFFD.

        Args:
            ids: a sequence of ints, or a 1-D int tensor/array.

        Raises:
            InputError: an id is outside `[0, vocab_size)`.
        """
        return self.sp.decode(self._check_ids(ids))

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        """`ids` as a list of Python ints, each checked to be in range."""
        if hasattr(ids, "tolist"):  # torch.Tensor, numpy array
            ids = ids.tolist()
        out = [int(i) for i in ids]
        n = self.vocab_size
        for pos, i in enumerate(out):
            if not 0 <= i < n:
                raise InputError(
                    f"token id {i} at position {pos} is outside the vocabulary "
                    f"[0, {n}) of {self.path}"
                )
        return out

    def stream_decoder(self) -> StreamDecoder:
        """A new `StreamDecoder` over this tokenizer."""
        return StreamDecoder(self)

    # ---------------------------------------------------------------- chat
    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Format a conversation in Gemma's instruction-tuned (IT) prompt format.

        Each message becomes `<start_of_turn>{role}\\n{content}<end_of_turn>\\n`, with
        role `user` or `model` (`assistant` is an alias of `model`). The official IT
        models have no system role, so a `system` message, which must come first, is
        folded into the first user turn as `system + "\\n\\n" + user` (or becomes a
        user turn of its own when no user message follows it). The BOS token is
        not part of the string: `encode_chat` adds it as an id.

        Args:
            messages: a non-empty list of `{"role": str, "content": str}` dicts.
            add_generation_prompt: end with `<start_of_turn>model\\n` so that the
                model writes the next turn.

        Returns:
            the prompt string.

        Raises:
            InputError: a message is not a dict, has an unknown role, lacks a str
                `content`, or a `system` message is not the first one (the message
                names the index).
        """
        turns = chat_turns(messages)
        text = "".join(
            f"{START_OF_TURN}{role}\n{content}{END_OF_TURN}\n" for role, content in turns
        )
        if add_generation_prompt:
            text += f"{START_OF_TURN}model\n"
        return text

    def encode_chat(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of `apply_chat_template(messages, add_generation_prompt)`, BOS first.

        As in the official tokenizer, content that spells `<start_of_turn>` or
        `<end_of_turn>` is encoded as those tokens.

        Raises:
            InputError: as `apply_chat_template`; or the vocabulary lacks
                `<start_of_turn>`/`<end_of_turn>`.
        """
        if self.start_of_turn_id is None or self.end_of_turn_id is None:
            raise InputError(
                f"tokenizer {self.path} has no {START_OF_TURN}/{END_OF_TURN} pieces, "
                "so it cannot encode a chat"
            )
        return [self.bos_id] + self.sp.encode(
            self.apply_chat_template(messages, add_generation_prompt)
        )


def chat_turns(messages: Sequence[Mapping[str, str]]) -> list[tuple[str, str]]:
    """Validate a chat and return its turns as (role, content), role 'user'/'model'.

    `assistant` is mapped to `model` and a leading `system` message is folded into
    the first user turn (see `Tokenizer.apply_chat_template`).

    Raises:
        InputError: the chat is empty or not a list, a message is not a dict, has
            an unknown role or a non-str content, or a `system` message is not
            first (the message names the index and value).
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InputError(
            f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}"
        )
    if not messages:
        raise InputError("messages is empty: a chat needs at least one message")
    turns: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InputError(f"messages[{i}] must be a dict, got {type(m).__name__}")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise InputError(
                f"messages[{i}] has role {role!r}; expected one of {sorted(CHAT_ROLES)}"
            )
        content = m.get("content")
        if not isinstance(content, str):
            raise InputError(
                f"messages[{i}] (role {role!r}) needs a str 'content', got {type(content).__name__}"
            )
        if role == "system" and i != 0:
            raise InputError(
                f"messages[{i}] has role 'system'; only the first message may be a system message"
            )
        turns.append((CHAT_ROLES[role], content))
    if turns[0][0] == "system":
        system = turns.pop(0)[1]
        if turns and turns[0][0] == "user":
            turns[0] = ("user", system + "\n\n" + turns[0][1])
        else:
            turns.insert(0, ("user", system))
    return turns


def _incomplete_utf8_tail(data: bytes) -> int:
    """Length of the trailing, not yet complete UTF-8 sequence at the end of `data`.

    0 when `data` ends with a complete character or with bytes that can never
    become valid (those decode to U+FFFD whatever follows).
    """
    for k in range(1, min(4, len(data)) + 1):
        b = data[-k]
        if b & 0xC0 == 0x80:  # continuation byte: look further back for the lead
            continue
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return k if k < need else 0
    return 0


class StreamDecoder:
    """Turns token ids, given one at a time, into text pieces that are safe to print.

    A piece never ends inside a character: while the last ids are byte-fallback
    pieces (`<0xE2>`...) that start a UTF-8 sequence not yet complete, they are
    held back. The concatenation of all pieces plus `flush()` equals
    `tokenizer.decode(all_ids)` exactly.

    It decodes a short window (the ids since the previous emitted boundary, as
    context, plus the new ones) and emits the text the new ids add, so
    SentencePiece's leading-space handling is the same as in a full decode and
    each step costs O(window), not O(all ids).

    Example:
        >>> dec = tok.stream_decoder()
        >>> for i in ids: print(dec.push(i), end="")
        >>> print(dec.flush())
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._ids: list[int] = []  # ids from the context start on
        self._read = 0  # index in _ids of the first id whose text is not emitted yet
        self._byte_value: dict[int, int] = {}

    def _byte(self, token_id: int) -> int | None:
        """The byte a byte-fallback id stands for, or None for other ids."""
        if token_id not in self._byte_value:
            sp = self.tokenizer.sp
            self._byte_value[token_id] = (
                int(sp.id_to_piece(token_id)[3:5], 16) if sp.is_byte(token_id) else -1
            )
        value = self._byte_value[token_id]
        return None if value < 0 else value

    def _held(self) -> int:
        """How many trailing ids form an incomplete UTF-8 character."""
        tail = bytearray()
        for token_id in reversed(self._ids[self._read :][-4:]):
            b = self._byte(token_id)
            if b is None:
                break
            tail.insert(0, b)
        return _incomplete_utf8_tail(bytes(tail))

    def _emit(self, end: int) -> str:
        """Text added by `_ids[_read:end]`, using `_ids[:_read]` as context."""
        if end <= self._read:
            return ""
        decode = self.tokenizer.sp.decode
        before = decode(self._ids[: self._read])
        piece = decode(self._ids[:end])[len(before) :]
        if piece:
            # The ids emitted now become the next context; older ones are dropped.
            # (Ids that add no text, e.g. <bos>, are kept until some do, so that the
            # context never decodes to "" after text was emitted.)
            self._ids = self._ids[self._read :]
            end -= self._read
        self._read = end
        return piece

    def push(self, token_id: int) -> str:
        """Add one id; return the text now safe to print (often "").

        Raises:
            InputError: `token_id` is outside the vocabulary.
        """
        self._ids.extend(self.tokenizer._check_ids([token_id]))
        return self._emit(len(self._ids) - self._held())

    def flush(self) -> str:
        """Return whatever is held back (an incomplete character decodes to U+FFFD)."""
        return self._emit(len(self._ids))


# ------------------------------------------------------------------ training
def _training_chunks(text: str, max_bytes: int) -> Iterator[str]:
    """Split `text` into pieces of at most ~`max_bytes` UTF-8 bytes at line ends.

    SentencePiece's trainer skips sentences longer than `max_sentence_length`;
    newlines are kept inside pieces so that the model learns them.
    """
    limit = max_bytes // 4  # chars; worst case 4 bytes per char
    start = 0
    while start < len(text):
        end = min(len(text), start + limit)
        if end < len(text):
            cut = text.rfind("\n", start, end)
            if cut <= start:
                cut = text.rfind(" ", start, end)
            end = cut + 1 if cut > start else end
        yield text[start:end]
        start = end


def _read_training_file(path: Path) -> str:
    """Text of a UTF-8 file, `\\r\\n` made `\\n`.

    Raises:
        InputError: the file cannot be read or is not UTF-8 (names the byte offset).
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read tokenizer training file {path}: {e.strerror}") from None
    try:
        return data.decode("utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 at byte offset {e.start} ({e.reason})") from None


def train_tokenizer(
    input_files: Iterable[str | os.PathLike[str]],
    output_path: str | os.PathLike[str],
    vocab_size: int,
    *,
    texts: Iterable[str] = (),
    input_sentence_size: int = 200_000,
    max_sentence_length: int = 8192,
    character_coverage: float = 0.9999,
    newline_pieces: int = 8,
    num_threads: int | None = None,
    seed: int = 0,
) -> Path:
    """Train a Gemma-style SentencePiece BPE model.

    Settings as in Gemma's tokenizer: BPE, byte fallback, split digits, identity
    normalisation, no dummy prefix, whitespace kept as is (so round trips are
    exact), whitespace-only pieces allowed, ids `<pad>`=0, `<eos>`=1, `<bos>`=2,
    `<unk>`=3, then user-defined `<start_of_turn>`=4, `<end_of_turn>`=5 and runs of
    1..`newline_pieces` newlines (Gemma also has newline-run pieces; they keep
    tokens from spanning lines). Texts are cut at line ends into chunks of at most
    `max_sentence_length` bytes; the trainer samples `input_sentence_size` of them
    (shuffled, seeded). About 10 s for 14 MB of text and vocab 4096.

    The model is written to a temporary file beside the output and renamed into
    place, so a failed or interrupted run leaves no partial file. The same inputs,
    settings and seed give a byte-identical file.

    Args:
        input_files: UTF-8 text files.
        output_path: where to write the model; `.model` is appended when it has
            another suffix (so a SentencePiece-style prefix works too).
        vocab_size: number of pieces, including the 256 byte pieces and specials.
        texts: more training text, e.g. documents already in memory.
        input_sentence_size: how many chunks the trainer samples (0: all).
        max_sentence_length: longest chunk in bytes.
        character_coverage: share of characters given their own piece; the rest
            are spelled with byte pieces.
        newline_pieces: longest run of newlines that is one piece (0: none).
        num_threads: trainer threads (default: CPU count).
        seed: seed of the trainer's sentence sampling (`spm.set_random_generator_seed`).

    Returns:
        the path of the written `.model` file.

    Raises:
        InputError: an input file is missing or not UTF-8, there is no text, the
            vocabulary is too small for the byte and special pieces, or
            `output_path` is a directory.
    """
    text_path = os.fspath(output_path)
    out = Path(output_path)
    if out.is_dir() or text_path.endswith(("/", os.sep)):
        raise InputError(
            f"tokenizer output {text_path} is a directory: give a file path, "
            f"e.g. {out / 'tokenizer.model'}"
        )
    if out.suffix != ".model":
        out = out.with_name(out.name + ".model")
    specials = [START_OF_TURN, END_OF_TURN] + ["\n" * n for n in range(1, newline_pieces + 1)]
    if vocab_size < 256 + 4 + len(specials) + 1:
        raise InputError(
            f"vocab_size {vocab_size} is too small: the byte pieces and special tokens "
            f"alone take {256 + 4 + len(specials)}"
        )

    all_texts = [_read_training_file(Path(f)) for f in input_files] + list(texts)
    chunks = [c for t in all_texts for c in _training_chunks(t, max_sentence_length) if c.strip()]
    if not chunks:
        raise InputError(f"no text to train the tokenizer {out} on")

    model = io.BytesIO()
    spm.set_random_generator_seed(seed)  # the trainer's sentence sampling
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(chunks),
            model_writer=model,  # no model_prefix: the file does not record a temp path
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            split_digits=True,
            character_coverage=character_coverage,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            pad_id=0,
            eos_id=1,
            bos_id=2,
            unk_id=3,
            pad_piece="<pad>",
            eos_piece="<eos>",
            bos_piece="<bos>",
            unk_piece="<unk>",
            user_defined_symbols=specials,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            max_sentence_length=max_sentence_length,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise InputError(f"SentencePiece training for {out} failed: {e}") from None
    # Write beside the target and rename, so that no partial file is ever seen.
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", delete=False) as f:
        f.write(model.getvalue())
    os.chmod(f.name, 0o644)  # NamedTemporaryFile makes it 0600
    os.replace(f.name, out)
    return out
