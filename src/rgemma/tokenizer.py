"""SentencePiece tokenizer: encode/decode, Gemma chat template, streaming decode, training.

`Tokenizer` wraps a `tokenizer.model` file, either Gemma's own (vocab 256000, the
one the official RecurrentGemma checkpoints use) or one made by `train_tokenizer`
(the bundled demo model's, vocab 4096). Both share Gemma's conventions: byte
fallback, split digits, no dummy prefix, identity normalisation (so
`decode(encode(text, special=False)) == text` for any text), and the special ids `<pad>`=0,
`<eos>`=1, `<bos>`=2, `<unk>`=3 plus the user-defined `<start_of_turn>` and
`<end_of_turn>` pieces of the instruction-tuned (IT) chat format.

Control pieces and text (the one rule, applied here and nowhere else):

- Control pieces are `<pad>`, `<eos>`, `<bos>`, `<unk>` (SentencePiece's control and
  unknown pieces), the chat markers `<start_of_turn>`/`<end_of_turn>`, and Gemma's
  reserved pieces `<mask>`, `<2mass>`, `[@BOS@]`, `<unusedN>` (`Tokenizer.control_pieces`).
  Other user-defined pieces (newline runs, Gemma's `<table>`, `<b>`...) are text.
- Chat message content is always plain text: `encode_chat` (and so `ChatSession`,
  `rgemma chat`, `/v1/chat/completions`) encodes `<end_of_turn>`
  written in a message as the characters `<`, `end`, `_of`... , never as the
  control id, so a user cannot close their turn and write one for the model. Only
  the template inserts control ids.
- A raw prompt (`encode(text)`: `generate`/`stream` on a str, `/v1/completions`) is
  parsed: the text of a control piece becomes its id, so a prompt already rendered
  with the template (`<bos><start_of_turn>user\\n...`, as HF's `apply_chat_template`
  writes it) gives exactly the ids `encode_chat` gives. A leading BOS is never
  doubled: `add_bos` adds none when the text starts with `<bos>`.
  `encode(text, special=False)` encodes such text as plain characters instead.
- Text must be valid Unicode: a lone surrogate (e.g. from bytes decoded with
  `surrogateescape`) raises `InputError` naming its position.

Official counterparts: `recurrentgemma/torch/sampler.py` (encode with BOS, decode)
and the Gemma IT prompt format documented at ai.google.dev/gemma/docs/formatting.
"""

from __future__ import annotations

import functools
import io
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import sentencepiece as spm

from rgemma.errors import CheckpointError, InputError
from rgemma.io import atomic_path

__all__ = [
    "BUNDLED_TOKENIZER_PATH",
    "CHAT_ROLES",
    "StreamDecoder",
    "Tokenizer",
    "chat_turns",
    "check_text",
    "train_tokenizer",
]

#: The bundled model's tokenizer (vocab 4096, trained by scripts/train_tokenizer.sh),
#: shipped beside its weights in `rgemma/assets/bundled/`.
BUNDLED_TOKENIZER_PATH = Path(__file__).parent / "assets" / "bundled" / "tokenizer.model"

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"

#: User-defined pieces that are control tokens rather than text: the chat markers
#: and Gemma's reserved pieces (ids 4-107 and 255999 of Gemma's vocabulary).
_CONTROL_USER_PIECE = re.compile(
    r"<start_of_turn>|<end_of_turn>|<mask>|<2mass>|\[@BOS@\]|<unused[0-9]+>"
)

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

    # ------------------------------------------------------- control pieces
    @functools.cached_property
    def control_pieces(self) -> dict[str, int]:
        """The control pieces of the vocabulary, text -> id (module docstring).

        SentencePiece's control and unknown pieces (`<pad>`, `<eos>`, `<bos>`,
        `<unk>`), the chat markers, and Gemma's reserved pieces (`<mask>`,
        `<2mass>`, `[@BOS@]`, `<unusedN>`). `encode` parses their text in a raw
        prompt; `encode_chat` never does in message content. Computed once per
        tokenizer (about 0.15 s for Gemma's 256000 pieces).
        """
        sp, n = self.sp, self.vocab_size
        ids = {i for i in (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) if 0 <= i < n}
        for i, piece in enumerate(sp.id_to_piece(list(range(n)))):
            if piece[:1] in ("<", "[") and (
                sp.is_control(i) or sp.is_unknown(i) or _CONTROL_USER_PIECE.fullmatch(piece)
            ):
                ids.add(i)
        return {sp.id_to_piece(i): i for i in sorted(ids)}

    @functools.cached_property
    def _control_re(self) -> tuple[re.Pattern[str] | None, re.Pattern[str] | None]:
        """(every control piece's text, those SentencePiece itself matches in text:
        the user-defined ones), as regexes trying longer texts first."""

        def alternation(texts: Iterable[str]) -> re.Pattern[str] | None:
            texts = sorted(texts, key=len, reverse=True)
            return re.compile("|".join(map(re.escape, texts))) if texts else None

        sp = self.sp
        native = [
            t for t, i in self.control_pieces.items() if not (sp.is_control(i) or sp.is_unknown(i))
        ]
        return alternation(self.control_pieces), alternation(native)

    def _encode_plain(self, text: str) -> list[int]:
        """Ids of `text` with every control piece's text as plain characters.

        SentencePiece matches user-defined pieces (`<end_of_turn>`) wherever they are
        spelled; cutting the text just after the `<` of each such spelling and
        encoding the parts separately keeps them text (`<`, `end`, `_of`, ...).
        Control text SentencePiece does not match (`<bos>`) needs no cut.
        """
        native = self._control_re[1]
        if native is None or native.search(text) is None:
            return self.sp.encode(text)
        ids: list[int] = []
        start = 0
        while (m := native.search(text, start)) is not None:
            cut = m.start() + 1
            ids += self.sp.encode(text[start:cut])
            start = cut
        return ids + self.sp.encode(text[start:])

    def _encode_parsed(self, text: str) -> list[int]:
        """Ids of `text` with each control piece's text (`<bos>`, `<end_of_turn>`)
        as its id."""
        every = self._control_re[0]
        if every is None:
            return self.sp.encode(text)
        ids: list[int] = []
        start = 0
        for m in every.finditer(text):
            ids += self.sp.encode(text[start : m.start()])
            ids.append(self.control_pieces[m.group()])
            start = m.end()
        return ids + self.sp.encode(text[start:])

    # ------------------------------------------------------- encode/decode
    def encode(
        self, text: str, add_bos: bool = True, add_eos: bool = False, *, special: bool = True
    ) -> list[int]:
        """Token ids of `text`, a raw prompt (not a chat message: see `encode_chat`).

        With `special` (the default), the text of a control piece (`<bos>`,
        `<eos>`, `<start_of_turn>`, `<end_of_turn>`, ...: `control_pieces`) becomes
        its id, so a prompt rendered with the chat template
        (`<bos><start_of_turn>user\\nHi<end_of_turn>\\n<start_of_turn>model\\n`) gives
        the ids `encode_chat` gives; `add_bos` adds no second BOS when the text
        starts with `<bos>`. With `special=False` such text is plain characters.

        Args:
            text: any valid Unicode string; encoding is lossless (byte fallback)
                except that parsed `<bos>`/`<eos>`/`<pad>` decode to nothing.
            add_bos: put `bos_id` first (unless the text already starts with it).
            add_eos: put `eos_id` last.
            special: parse control pieces' text (see above).

        Returns:
            list of ids in `[0, vocab_size)`.

        Raises:
            InputError: `text` is not a str, or holds a lone surrogate such as
                "\\ud800" (not valid Unicode; the message names its position).
        """
        check_text(text, "text")
        ids = self._encode_parsed(text) if special else self._encode_plain(text)
        if add_bos and not (ids and ids[0] == self.bos_id):
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids of `text` (no BOS/EOS) and the UTF-8 byte offset where each starts.

        Plain text: the ids are `encode(text, add_bos=False, special=False)`, so
        control text (`<bos>`, `<end_of_turn>`) stays characters (the training data's
        rule, `rgemma.data`).

        Returns:
            (ids, starts): two lists of equal length; `starts[i]` is the byte offset
            in `text.encode()` of the first byte token i covers.

        Raises:
            InputError: as `encode`.
        """
        check_text(text, "text")
        native = self._control_re[1]
        cuts = []  # the cuts of `_encode_plain`, just after the `<` of each spelling
        while native is not None and (m := native.search(text, cuts[-1] if cuts else 0)):
            cuts.append(m.start() + 1)
        ids: list[int] = []
        starts: list[int] = []
        offset = 0  # bytes of text before the part
        for a, b in zip([0, *cuts], [*cuts, len(text)]):
            for p in self.sp.encode(text[a:b], return_type="proto").pieces:
                ids.append(p.id)
                starts.append(offset + p.begin)
            offset += len(text[a:b].encode("utf-8"))
        return ids, starts

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

        The string is for reading, or for another tokenizer: to get ids use
        `encode_chat`, which keeps the content plain text. (`encode` of this
        string would parse control text written inside a message.)

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
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = True,
        *,
        add_bos: bool = True,
    ) -> list[int]:
        """Token ids of the chat `apply_chat_template(messages, add_generation_prompt)`
        renders, BOS first (unless `add_bos=False`, for a turn that continues a state).

        Only the template inserts control ids (BOS, `<start_of_turn>`,
        `<end_of_turn>`): message content is always plain text, so a message that
        spells `<end_of_turn>` or `<bos>` cannot forge a turn. For content without
        control text the ids equal `encode` of the rendered string.

        Raises:
            InputError: as `apply_chat_template`; a lone surrogate in a message (names
                the message and position); or the vocabulary lacks
                `<start_of_turn>`/`<end_of_turn>`.
        """
        sot, eot = self.start_of_turn_id, self.end_of_turn_id
        if sot is None or eot is None:
            raise InputError(
                f"tokenizer {self.path} has no {START_OF_TURN}/{END_OF_TURN} pieces, "
                "so it cannot encode a chat"
            )
        newline = self._encode_plain("\n")
        ids = [self.bos_id] if add_bos else []
        for role, content in chat_turns(messages):
            ids += [sot, *self._encode_plain(f"{role}\n{content}"), eot, *newline]
        if add_generation_prompt:
            ids += [sot, *self._encode_plain("model\n")]
        return ids


def check_text(text: object, what: str) -> str:
    """Return `text` if it is a str of valid Unicode (encodable as UTF-8).

    Raises:
        InputError: `text` is not a str, or holds a lone surrogate ("\\udc80", as
            bytes decoded with `surrogateescape` give); names `what` and the
            character position.
    """
    if not isinstance(text, str):
        raise InputError(f"{what} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(
            f"{what} is not valid Unicode: lone surrogate U+{ord(text[err.start]):04X} at "
            f"character {err.start} (decode bytes with errors='replace' first)"
        ) from None
    return text


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
        check_text(content, f"messages[{i}].content")
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
    with atomic_path(out) as tmp:
        Path(tmp).write_bytes(model.getvalue())
    return out
