"""Tokenize a corpus into nanoGPT-style token files: train.bin, val.bin and meta.json.

Each .bin is a flat array of little-endian uint16 token ids, every document followed by the
end-of-text id. Files are written to temporary names and renamed at the end, and meta.json is
written last: a directory with a meta.json is complete, and a failed or killed run leaves the
previous dataset as it was. One process at a time prepares a directory (a lock beside it): a
`prepare-data` or a run needing the built-in corpus that arrives while another prepares the same
directory (side-by-side `altgrad train`, SLURM array tasks in one folder) waits, then uses what the
first prepared if it is the same dataset; a `prepare-data` run after the first has finished
prepares it again.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from .. import __version__
from ..errors import UserError
from ..io import TEMP_SUFFIX, file_lock, make_publishable, write_json
from .sources import Corpus, builtin_corpus, hub_corpus, local_corpus
from .tokenizers import Tokenizer, get_tokenizer

DATASETS = {"eurlex": "gpt2", "builtin": "byte"}  # name -> default tokenizer
SPLITS = ("train", "val")
DEFAULT_DATA_ROOT = Path("data")
META_FILE = "meta.json"
META_FORMAT = "altgrad-tokens/1"
FLUSH_TOKENS = 1 << 20  # 2 MiB of uint16 per write
PROGRESS_EVERY = 64

Progress = Callable[[str, int, Optional[int]], None]
"""progress(split, records read so far in that split, records in the split or None if unknown)."""


@dataclass
class SplitStats:
    """Counts for one split, as meta.json reports them."""

    documents: int = 0  # written, each followed by end-of-text
    tokens: int = 0  # including the end-of-text tokens
    skipped: int = 0  # empty + invalid: records not written
    empty: int = 0  # text missing, null or whitespace only
    invalid: int = 0  # a line that is not JSON, a record that is not an object, a text that is not a string
    undecodable: int = 0  # written, with bytes that are not UTF-8 replaced by U+FFFD

    def count(self, issue: Optional[str]) -> None:
        if issue in ("empty", "invalid"):
            setattr(self, issue, getattr(self, issue) + 1)
            self.skipped += 1
        elif issue == "undecodable":
            self.undecodable += 1


class _TokenFile:
    """A .bin being written under a temporary name in its final directory, hashed as it goes."""

    def __init__(self, directory: Path, name: str):
        self.path = directory / name
        handle, temp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=TEMP_SUFFIX)
        self.temp = Path(temp)
        self.file = os.fdopen(handle, "wb")
        self.sha256 = hashlib.sha256()
        self.buffer = array.array("H")
        self.tokens = 0

    def add(self, ids: list[int], eot: int) -> int:
        self.buffer.extend(ids)
        self.buffer.append(eot)
        if len(self.buffer) >= FLUSH_TOKENS:
            self._flush()
        return len(ids) + 1

    def _flush(self) -> None:
        if sys.byteorder == "big":
            self.buffer.byteswap()
        data = self.buffer.tobytes()
        self.file.write(data)
        self.sha256.update(data)
        self.tokens += len(self.buffer)
        self.buffer = array.array("H")

    def finish(self) -> None:
        self._flush()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        make_publishable(self.temp)

    def discard(self) -> None:
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            self.temp.unlink()


def _remove_leftovers(directory: Path) -> None:
    """Temporary files of an earlier run that was killed (never complete, safe to delete)."""
    for name in (*(f"{split}.bin" for split in SPLITS), META_FILE):
        for leftover in directory.glob(f".{name}.*{TEMP_SUFFIX}"):
            with contextlib.suppress(OSError):
                leftover.unlink()


def write_tokens(corpus: Corpus, tokenizer: Tokenizer, out: Path, *, name: str,
                 progress: Optional[Progress] = None) -> dict[str, Any]:
    """Tokenize `corpus` into `out`/{train,val}.bin and `out`/meta.json; return the meta."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the output folder {out} ({error}); choose another with --out") from None
    _remove_leftovers(out)
    stats = {split: SplitStats() for split in SPLITS}
    read = dict.fromkeys(SPLITS, 0)
    files: dict[str, _TokenFile] = {}
    try:
        for split in SPLITS:
            files[split] = _TokenFile(out, f"{split}.bin")
        current = None
        for split, document in corpus.records():
            if progress is not None and split != current and current is not None:
                progress(current, read[current], corpus.totals.get(current))  # that split is done
            current = split
            counts = stats[split]
            counts.count(document.issue)
            if document.text is not None:
                counts.tokens += files[split].add(tokenizer.encode(document.text), tokenizer.eot_token)
                counts.documents += 1
            read[split] += 1
            if progress is not None and read[split] % PROGRESS_EVERY == 0:
                progress(split, read[split], corpus.totals.get(split))
        for split in SPLITS:
            if progress is not None:
                progress(split, read[split], corpus.totals.get(split))
            _check_usable(split, stats[split], corpus)
            files[split].finish()
            assert files[split].tokens == stats[split].tokens
    except BaseException:
        for file in files.values():
            file.discard()
        raise

    meta = {
        "format": META_FORMAT,
        "name": name,
        "source": corpus.source,
        "split_rule": corpus.split_rule,
        "notes": corpus.notes,
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "eot_token": tokenizer.eot_token,
        "dtype": "uint16",
        "byte_order": "little",
        "layout": "token ids of each document, then eot_token, concatenated",
        "splits": {
            split: {"file": files[split].path.name, **asdict(stats[split]),
                    "bytes": stats[split].tokens * 2, "sha256": files[split].sha256.hexdigest()}
            for split in SPLITS
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "altgrad_version": __version__,
    }
    # No meta.json while the .bin files are swapped: its presence means they are complete.
    with contextlib.suppress(FileNotFoundError):
        (out / META_FILE).unlink()
    for file in files.values():
        os.replace(file.temp, file.path)
    write_json(out / META_FILE, meta)
    return meta


def _check_usable(split: str, stats: SplitStats, corpus: Corpus) -> None:
    if stats.documents == 0:
        raise UserError(
            f"no usable documents for {split} in {corpus.source}: {stats.empty} empty or without a "
            f"`text` field, {stats.invalid} invalid; every record needs a non-empty `text` string"
        )


def corpus_for(name: str, source: Optional[Path] = None) -> Corpus:
    """The corpus that `altgrad prepare-data NAME [--source PATH]` reads."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)} "
                        "(for EurLex files on disk: altgrad prepare-data eurlex --source PATH)")
    if name == "builtin":
        if source is not None:
            raise UserError("builtin is made from Python's bundled documentation and takes no --source; "
                            "for your own files use: altgrad prepare-data eurlex --source PATH --out DIR")
        return builtin_corpus()
    return local_corpus(source) if source is not None else hub_corpus(name)


def prepare_dataset(name: str, *, source: Optional[Path] = None, tokenizer: Optional[str] = None,
                    out: Optional[Path] = None, data_root: Path = DEFAULT_DATA_ROOT,
                    progress: Optional[Progress] = None) -> tuple[Path, dict[str, Any]]:
    """Prepare dataset `name` into `out` (default `data_root/name`); return the directory and its meta."""
    if name in DATASETS and name != "builtin" and source is None:
        # From the Hub: the tokenizer first, as it is quick to fail and the download is not.
        chosen = get_tokenizer(tokenizer or DATASETS[name])
        corpus = corpus_for(name, source)
    else:
        corpus = corpus_for(name, source)  # local: a bad name or path is the first thing to say
        chosen = get_tokenizer(tokenizer or DATASETS[name])
    directory = Path(out) if out is not None else Path(data_root) / name
    arrived = _meta_written(directory)
    with preparing(directory):
        if _meta_written(directory) != arrived:  # another process prepared it while this one waited
            with contextlib.suppress(UserError):
                meta = load_meta(directory)
                if (meta.get("name"), meta.get("source"), meta["tokenizer"]) == (name, corpus.source, chosen.name):
                    return directory, meta
        return directory, write_tokens(corpus, chosen, directory, name=name, progress=progress)


def preparing(directory: Path):
    """The lock of one prepared directory (a file beside it): held while anything writes it."""
    directory = Path(directory)
    return file_lock(directory.parent / f".{directory.name}.lock")


def _meta_written(directory: Path) -> Optional[tuple[int, int]]:
    """Which meta.json `directory` has (inode and modification time; None if none): each write
    replaces the file, so a change says that a preparation finished in between."""
    with contextlib.suppress(FileNotFoundError):
        stat = (directory / META_FILE).stat()
        return stat.st_ino, stat.st_mtime_ns
    return None


def load_meta(data_dir: Path) -> dict[str, Any]:
    """meta.json of a prepared directory, checked against its .bin files (present, of the right size)."""
    data_dir = Path(data_dir)
    name = data_dir.name if data_dir.name in DATASETS else "eurlex"
    hint = (f"prepare it with `altgrad prepare-data {name} --out {data_dir}`"
            + ("" if name == "builtin" else " (add --source PATH for local files)"))
    path = data_dir / META_FILE
    if not path.is_file():
        raise UserError(f"{data_dir} is not a prepared dataset (no {META_FILE}); {hint}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        splits = meta["splits"]
        missing = [key for key in ("tokenizer", "vocab_size", "eot_token") if key not in meta]
        if missing:
            raise KeyError(", ".join(missing))
        expected = {split: (data_dir / splits[split]["file"], int(splits[split]["tokens"])) for split in SPLITS}
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path} is corrupt ({type(error).__name__}: {error}); {hint}") from None
    for split, (file, tokens) in expected.items():
        if not file.is_file():
            raise UserError(f"{file} is missing although {META_FILE} lists it; {hint}")
        if file.stat().st_size != tokens * 2:
            raise UserError(f"{file} has {file.stat().st_size} bytes but {META_FILE} says {tokens} tokens "
                            f"({tokens * 2} bytes): the file is truncated or from another run; {hint}")
    return meta


def ensure_builtin_data(data_root: Path, tokenizer: str = "byte") -> Path:
    """`data_root`/builtin, prepared now if it is missing, broken or made with another tokenizer."""
    directory = Path(data_root) / "builtin"
    with contextlib.suppress(UserError):
        if load_meta(directory)["tokenizer"] == tokenizer:
            return directory
    with preparing(directory):  # another process may be preparing it: wait, then look again
        with contextlib.suppress(UserError):
            if load_meta(directory)["tokenizer"] == tokenizer:
                return directory
        write_tokens(builtin_corpus(), get_tokenizer(tokenizer), directory, name="builtin")
    return directory
