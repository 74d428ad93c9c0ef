#!/usr/bin/env python3
"""Build the bundled chat model's dialogue set from the corpus (data/corpus).

Dialogues are taken from the text as it is, nothing is written by hand:

* the plays (shakespeare.txt): a scene is a run of speeches, each a paragraph
  whose first line names the speaker (`HAMLET.`, `Ham.`, `LYSANDER`); stage
  directions (`[Exit.]`) are dropped, a scene ends at an ACT/SCENE heading or any
  other paragraph that is not a speech;
* the novels (austen.txt, mobydick.txt): a run of consecutive paragraphs that are
  mostly quoted speech (`"..." said Emma. "..."`), each paragraph a speech made of
  its quoted parts (novels start a new paragraph for a new speaker).

Every two consecutive speeches by different speakers make one dialogue,
`{"messages": [{"role": "user", "content": A}, {"role": "model", "content": B}]}`,
so each speech answers the one before it (and, as the next pair's user turn, is
answered in turn). Line breaks inside a speech become spaces. Pairs whose reply is
longer than `--max-reply-chars` (or prompt longer than `--max-user-chars`) are left
out, so the model learns to answer in a sentence or a few.

The held-out split is made per run (scene or quoted run), by the SHA-256 of its
first speech, so no held-out speech appears in training in either role.

Writes `OUT/train.jsonl`, `OUT/valid.jsonl` and `OUT/manifest.json` (counts, the
SHA-256 of each input and output file, the settings). Deterministic: the same corpus
and settings give byte-identical files. Takes a few seconds.

    python scripts/build_chat_data.py [--corpus data/corpus] [--out runs/chat_data]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
PLAYS = ("shakespeare.txt",)
NOVELS = ("austen.txt", "mobydick.txt")


class Speech(NamedTuple):
    """One speech: who said it ("" when unknown, in the novels) and what."""

    speaker: str
    text: str


# ---------------------------------------------------------------------- plays
# A speaker heading: a short name, capitalised, ending in "." or in capitals only
# ("HAMLET.", "Ham.", "First Lord.", "LYSANDER", "KING HENRY.").
_HEADING = re.compile(r"[A-Z][A-Za-z' &-]{0,30}[A-Za-z]\.?|[A-Z]\.")
_NOT_A_SPEAKER = re.compile(
    r"(ACT|SCENE|PROLOGUE|EPILOGUE|THE END|PERSONS|DRAMATIS)\b", re.IGNORECASE
)
_DIRECTION = re.compile(r"\[[^\]]*\]?|\{[^}]*\}?")  # [Exit.] and a few {…}; unclosed to the end


def _paragraphs(text: str) -> list[list[str]]:
    """The paragraphs of `text` (separated by blank lines) as lists of lines."""
    out, cur = [], []
    for line in text.split("\n"):
        if line.strip():
            cur.append(line.rstrip())
        elif cur:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def _clean(text: str) -> str:
    """One line: whitespace runs made single spaces, stray underscores dropped."""
    return re.sub(r"\s+", " ", text.replace("_", "")).strip()


def _speaker(line: str) -> str | None:
    """The speaker a heading line names, normalised, or None if it is not one."""
    line = line.strip()
    if not _HEADING.fullmatch(line) or _NOT_A_SPEAKER.match(line):
        return None
    if not (line.endswith(".") or line.isupper()):
        return None
    return line.rstrip(".").upper()


def play_runs(text: str) -> Iterator[list[Speech]]:
    """The scenes of the plays as runs of speeches (stage directions removed)."""
    run: list[Speech] = []
    for para in _paragraphs(text):
        first = para[0].strip()
        if first.startswith(("[", "{")):  # a stage direction: the scene goes on
            continue
        who = _speaker(first) if len(para) > 1 else None
        if who is None:  # a heading, a title, a song's second stanza: the run ends
            if len(run) > 1:
                yield run
            run = []
            continue
        speech = _clean(_DIRECTION.sub(" ", " ".join(para[1:])))
        if speech:
            run.append(Speech(who, speech))
    if len(run) > 1:
        yield run


# --------------------------------------------------------------------- novels
_QUOTED = re.compile(r'"([^"]*)"')


def _quoted_speech(para: list[str], min_share: float = 0.5) -> str | None:
    """The quoted parts of a paragraph that is mostly speech, joined, else None.

    A paragraph counts when it starts with a quote, its quotes are balanced (an odd
    count is a speech that runs on into the next paragraph: skipped) and at least
    `min_share` of its characters are inside quotes.
    """
    text = " ".join(line.strip() for line in para)
    if not text.startswith('"') or text.count('"') % 2:
        return None
    parts = [p.strip() for p in _QUOTED.findall(text)]
    if sum(len(p) for p in parts) < min_share * len(text):
        return None
    return _clean(" ".join(p for p in parts if p)) or None


def novel_runs(text: str) -> Iterator[list[Speech]]:
    """Runs of consecutive quoted paragraphs (each one speech, speaker unknown)."""
    run: list[Speech] = []
    for para in _paragraphs(text):
        speech = _quoted_speech(para)
        if speech is None:
            if len(run) > 1:
                yield run
            run = []
        else:
            run.append(Speech("", speech))
    if len(run) > 1:
        yield run


# ------------------------------------------------------------------ dialogues
def dialogues(
    run: list[Speech], max_user_chars: int, max_reply_chars: int
) -> Iterator[dict[str, list[dict[str, str]]]]:
    """Each pair of consecutive speeches of `run` as a user/model dialogue, when the
    speakers differ (or are unknown) and both fit their length limits."""
    for a, b in itertools.pairwise(run):
        if a.speaker and a.speaker == b.speaker:
            continue
        if len(a.text) > max_user_chars or len(b.text) > max_reply_chars:
            continue
        yield {
            "messages": [
                {"role": "user", "content": a.text},
                {"role": "model", "content": b.text},
            ]
        }


def is_held_out(run: list[Speech], fraction: float) -> bool:
    """Whether a run goes to the held-out split (by the SHA-256 of its first speech)."""
    digest = hashlib.sha256(f"{run[0].speaker}\n{run[0].text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_jsonl(path: Path, records: Iterable[dict]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def build(
    corpus: Path, out: Path, held_out: float, max_user_chars: int, max_reply_chars: int
) -> dict:
    """Read the corpus, write train/valid JSONL and the manifest; returns the manifest.

    Raises:
        FileNotFoundError: a corpus file is missing (named).
    """
    splits: dict[str, list[dict]] = {"train": [], "valid": []}
    sources: dict[str, dict] = {}
    for name in PLAYS + NOVELS:
        path = corpus / name
        if not path.is_file():
            raise FileNotFoundError(f"corpus file {path} not found (see scripts/build_corpus.py)")
        text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
        runs = list(play_runs(text) if name in PLAYS else novel_runs(text))
        counts = {"runs": len(runs), "speeches": sum(len(r) for r in runs), "train": 0, "valid": 0}
        for run in runs:
            split = "valid" if is_held_out(run, held_out) else "train"
            found = list(dialogues(run, max_user_chars, max_reply_chars))
            splits[split] += found
            counts[split] += len(found)
        sources[name] = {"sha256": _sha256(path), **counts}
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, records in splits.items():
        path = out / f"{split}.jsonl"
        files[path.name] = {"dialogues": _write_jsonl(path, records), "sha256": _sha256(path)}
    manifest = {
        "script": "scripts/build_chat_data.py",
        "settings": {
            "held_out_fraction": held_out,
            "max_user_chars": max_user_chars,
            "max_reply_chars": max_reply_chars,
        },
        "sources": sources,
        "files": files,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--corpus", type=Path, default=ROOT / "data" / "corpus")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "chat_data")
    ap.add_argument("--held-out", type=float, default=0.03, help="share of runs held out")
    ap.add_argument("--max-user-chars", type=int, default=400)
    ap.add_argument("--max-reply-chars", type=int, default=240)
    args = ap.parse_args(argv)
    if not 0 < args.held_out < 1:
        ap.error(f"--held-out must be in (0, 1), got {args.held_out}")
    try:
        manifest = build(
            args.corpus, args.out, args.held_out, args.max_user_chars, args.max_reply_chars
        )
    except FileNotFoundError as err:
        print(f"build_chat_data: {err}", file=sys.stderr)
        return 2
    for name, info in manifest["files"].items():
        print(f"{args.out / name}: {info['dialogues']} dialogues")
    return 0


if __name__ == "__main__":
    sys.exit(main())
