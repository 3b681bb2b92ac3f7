"""Where documents come from: the Hugging Face Hub, local files, or Python's bundled docs.

Every source becomes a `Corpus`: a re-runnable stream of (split, Document) pairs, read one
record at a time so that memory stays bounded whatever the corpus size. Only the `text` field
is read; other fields (EurLex's labels differ between releases) are ignored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional

from ..errors import UserError

TEXT_FIELD = "text"
VAL_FRACTION_PERCENT = 5
SPLIT_WORDS = {  # in order of preference
    "train": ("train", "training"),
    "val": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing"),
}
HUB_DATASETS = {"eurlex": ("coastalcph/lex_glue", "eurlex")}
HUB_PROBE_TIMEOUT_S = 5.0
LOCAL_HINT = ("give local files instead: altgrad prepare-data eurlex --source PATH "
              "(JSON Lines, JSON, Parquet or .txt with a `text` field: one file, or a folder with "
              "train/validation files such as the Hub's eurlex/train-00000-of-00001.parquet)")


class Document(NamedTuple):
    """One record: its text (None when skipped) and what was wrong with it, if anything.

    issue: None (clean), "empty" (text missing, null or blank: skipped), "invalid" (not JSON,
    not an object, or text not a string: skipped) or "undecodable" (bytes that are not UTF-8,
    replaced by U+FFFD: kept).
    """

    text: Optional[str]
    issue: Optional[str] = None


@dataclass
class Corpus:
    """A source described for meta.json, and a function that streams its (split, Document) pairs."""

    source: str
    split_rule: str
    records: Callable[[], Iterator[tuple[str, Document]]]
    totals: dict[str, int] = field(default_factory=dict)  # records per split, where known up front
    notes: list[str] = field(default_factory=list)  # what was ignored and why, for the user


# --- records -----------------------------------------------------------------------------


def _decode(raw: bytes) -> tuple[str, bool]:
    """UTF-8 text, and whether bytes had to be replaced to get it."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def document_of(value: Any, undecodable: bool = False) -> Document:
    """Classify one `text` value (str, bytes, None or anything else)."""
    if isinstance(value, (bytes, bytearray)):
        value, bad = _decode(bytes(value))
        undecodable = undecodable or bad
    if value is None:
        return Document(None, "empty")
    if not isinstance(value, str):
        return Document(None, "invalid")
    if not value.strip():
        return Document(None, "empty")
    return Document(value, "undecodable" if undecodable else None)


def _document_of_record(record: Any, undecodable: bool = False) -> Document:
    if not isinstance(record, dict):
        return Document(None, "invalid")
    return document_of(record.get(TEXT_FIELD), undecodable)


# --- local files -------------------------------------------------------------------------


def read_jsonl(path: Path) -> Iterator[Document]:
    """One JSON object per line; blank lines are not records, broken lines are counted as invalid."""
    with open(path, "rb") as file:
        for line in file:
            if not line.strip():
                continue
            text, bad = _decode(line)
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                yield Document(None, "invalid")
                continue
            yield _document_of_record(record, bad)


def _is_json_lines(path: Path) -> bool:
    """A .json file holding JSON Lines: its first line is a whole object that is not {"data": [...]}."""
    with open(path, "rb") as file:
        for line in file:
            if line.strip():
                try:
                    first = json.loads(_decode(line)[0])
                except json.JSONDecodeError:
                    return False  # e.g. "[" or "{" opening a pretty-printed document
                return isinstance(first, dict) and not isinstance(first.get("data"), list)
    return False


def read_json(path: Path) -> Iterator[Document]:
    """A list of objects or {"data": [...]} (read whole), or JSON Lines saved as .json (streamed)."""
    if _is_json_lines(path):
        yield from read_jsonl(path)
        return
    text, bad = _decode(path.read_bytes())
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON ({error}); expected a list of objects with a "
                        f"`{TEXT_FIELD}` field, {{\"data\": [...]}}, or one object per line") from None
    if isinstance(payload, dict) and isinstance(payload.get("data"), list):
        payload = payload["data"]
    if not isinstance(payload, list):
        raise UserError(f"{path}: expected a list of objects with a `{TEXT_FIELD}` field or {{\"data\": [...]}}")
    for record in payload:
        # After a lossy decode, only the records that hold a replacement character were damaged.
        damaged = bad and isinstance(record, dict) and "\ufffd" in str(record.get(TEXT_FIELD))
        yield _document_of_record(record, damaged)


def read_parquet(path: Path) -> Iterator[Document]:
    """The `text` column only, in record batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"{path} is not a readable Parquet file ({error})") from None
    try:
        names = parquet.schema_arrow.names
        if TEXT_FIELD not in names:
            raise UserError(f"{path} has no `{TEXT_FIELD}` column (columns: {', '.join(names)})")
        for batch in parquet.iter_batches(batch_size=1024, columns=[TEXT_FIELD]):
            for value in batch.column(0).to_pylist():
                yield document_of(value)
    finally:
        parquet.close()


def read_txt(path: Path) -> Iterator[Document]:
    """A whole .txt file is one document."""
    yield document_of(path.read_bytes())


READERS: dict[str, Callable[[Path], Iterator[Document]]] = {
    ".jsonl": read_jsonl,
    ".ndjson": read_jsonl,
    ".json": read_json,
    ".parquet": read_parquet,
    ".txt": read_txt,
}


def split_of(relative: Path) -> Optional[str]:
    """The split a file belongs to by its name, else by its folders (innermost first), else None.

    Names are cut into words at anything that is not a letter, so train-00000-of-00001 is train
    and eurlex_dev is val, while "interval" or "devices" are nothing.
    """
    names = [relative.stem, *reversed(relative.parent.parts)]
    for name in names:
        words = set(re.split(r"[^a-z]+", name.lower()))
        for split, keys in SPLIT_WORDS.items():
            if words.intersection(keys):
                return split
    return None


def _files_in(folder: Path) -> list[Path]:
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue  # .git, .cache, our own temp files
        if path.is_file() and path.suffix.lower() in READERS:
            files.append(path)
    return files


def _read(files: Iterable[Path]) -> Iterator[Document]:
    for path in files:
        yield from READERS[path.suffix.lower()](path)


def _split_tail(files: list[Path], what: str) -> tuple[Callable[[], Iterator[tuple[str, Document]]], str]:
    """Split one stream by document: the last max(1, 5%) of usable documents go to val."""
    usable = sum(1 for document in _read(files) if document.text is not None)
    val = max(1, usable * VAL_FRACTION_PERCENT // 100)
    if usable - val < 1:
        raise UserError(f"{what} holds {usable} usable document(s) with a `{TEXT_FIELD}` field; "
                        "splitting it into train and val needs at least 2")

    def records() -> Iterator[tuple[str, Document]]:
        seen = 0
        for document in _read(files):
            yield ("train" if seen < usable - val else "val"), document
            seen += document.text is not None

    rule = (f"{what} has no train/validation split: the last {val} of {usable} documents "
            f"(max(1, {VAL_FRACTION_PERCENT}%)) go to val, in file order")
    return records, rule


def local_corpus(path: Path) -> Corpus:
    """Documents from a file, or from a folder whose file or folder names say the split."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"--source {path} does not exist; give a file or folder of JSON Lines, JSON, "
                        "Parquet or .txt files")
    kinds = ", ".join(sorted(READERS))
    if path.is_file():
        if path.suffix.lower() not in READERS:
            raise UserError(f"{path}: unsupported file type {path.suffix or '(none)'}; use one of {kinds}")
        records, rule = _split_tail([path], path.name)
        return Corpus(str(path.resolve()), rule, records)

    files = _files_in(path)
    if not files:
        raise UserError(f"{path} holds no {kinds} files (searched recursively)")
    by_split: dict[Optional[str], list[Path]] = {}
    for file in files:
        by_split.setdefault(split_of(file.relative_to(path)), []).append(file)
    notes = []
    if by_split.get("test"):
        notes.append(f"test split ignored ({len(by_split['test'])} file(s)): we prepare train and val only")
    named = by_split.get("train", []) + by_split.get("val", [])
    if named and by_split.get(None):
        notes.append(f"{len(by_split[None])} file(s) ignored: their names say no split "
                     "(train / validation|valid|val|dev / test)")
    source = str(path.resolve())
    if by_split.get("train") and by_split.get("val"):
        train, val = by_split["train"], by_split["val"]

        def records() -> Iterator[tuple[str, Document]]:
            for split, split_files in (("train", train), ("val", val)):
                for document in _read(split_files):
                    yield split, document

        rule = f"split by file name: {len(train)} train file(s), {len(val)} validation file(s)"
        return Corpus(source, rule, records, notes=notes)
    if by_split.get("val"):
        raise UserError(f"{path} has validation files but no train files (names containing `train`)")
    stream = by_split.get("train") or by_split.get(None)
    if not stream:
        raise UserError(f"{path} holds only test files; train and val files are needed")
    records, rule = _split_tail(stream, f"{path.name}/ ({len(stream)} file(s))")
    return Corpus(source, rule, records, notes=notes)


# --- the Hugging Face Hub ------------------------------------------------------------------


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What `datasets` raises when the Hub cannot be reached or the dataset cannot be built."""
    errors: list[type[BaseException]] = [OSError]  # ConnectionError, requests, HfHubHTTPError, not found
    for module, name in (("datasets.exceptions", "DatasetsError"), ("httpx", "HTTPError"),
                         ("httpx2", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _probe_hub(repo: str) -> None:
    """One request without retries, so that an offline machine fails in a second, not after
    huggingface_hub's ~25 s of back-off."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    url = f"{constants.ENDPOINT}/api/datasets/{repo}"
    try:
        get_session().head(url, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as error:  # any transport failure means: unreachable
        raise ConnectionError(f"cannot reach {constants.ENDPOINT} ({error})") from error


def load_hub_dataset(repo: str, config: str) -> Any:
    """`datasets.load_dataset(repo, config)`; offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)
    reads the local Hugging Face cache without touching the network."""
    import datasets

    if not datasets.config.HF_HUB_OFFLINE:
        _probe_hub(repo)
    return datasets.load_dataset(repo, config)


def hub_corpus(name: str) -> Corpus:
    """A dataset from the Hugging Face Hub (downloaded once to its cache, then read row by row)."""
    repo, config = HUB_DATASETS[name]
    try:
        import datasets
    except ImportError:
        raise UserError(f"loading {name} from the Hub needs `datasets` (pip install datasets); "
                        f"or {LOCAL_HINT}") from None
    try:
        dataset = load_hub_dataset(repo, config)
    except _hub_errors() as error:
        message = str(error).strip().splitlines()[0][:300] if str(error).strip() else "no message"
        if datasets.config.HF_HUB_OFFLINE:
            cache = "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and the Hugging Face cache has no copy"
        else:
            cache = "with a copy in the Hugging Face cache, set HF_HUB_OFFLINE=1"
        raise UserError(
            f"could not load {repo} ({config}) from the Hugging Face Hub: {type(error).__name__}: {message}. "
            f"If you are offline, {LOCAL_HINT}; or try `altgrad prepare-data builtin`, which needs no download "
            f"({cache})"
        ) from None
    keys = {"train": _pick(dataset, SPLIT_WORDS["train"]), "val": _pick(dataset, SPLIT_WORDS["val"])}
    for split, key in keys.items():
        if key is None:
            raise UserError(f"{repo} ({config}) has no {split} split (splits: {', '.join(dataset)})")
        if TEXT_FIELD not in dataset[key].column_names:
            raise UserError(f"{repo} ({config}) has no `{TEXT_FIELD}` field "
                            f"(fields: {', '.join(dataset[key].column_names)})")

    def records() -> Iterator[tuple[str, Document]]:
        for split, key in keys.items():
            for batch in dataset[key].select_columns([TEXT_FIELD]).iter(batch_size=1000):
                for value in batch[TEXT_FIELD]:
                    yield split, document_of(value)

    notes = ["test split ignored: we prepare train and val only"] if "test" in dataset else []
    return Corpus(f"hf:{repo}/{config}", f"the Hub's splits: train = {keys['train']}, val = {keys['val']}",
                  records, totals={split: len(dataset[key]) for split, key in keys.items()}, notes=notes)


def _pick(dataset: Any, names: tuple[str, ...]) -> Optional[str]:
    return next((name for name in names if name in dataset), None)


# --- built in ---------------------------------------------------------------------------------


def builtin_corpus() -> Corpus:
    """Python's bundled documentation (pydoc_data, ~79 help topics, ~465 KB): always there, offline.

    One topic is one document, in key order; every 10th topic goes to val.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise UserError("the builtin corpus is Python's bundled documentation (pydoc_data.topics), which "
                        "this Python installation lacks; " + LOCAL_HINT) from None
    keys = sorted(topics)

    def split(index: int) -> str:
        return "val" if index % 10 == 9 else "train"

    def records() -> Iterator[tuple[str, Document]]:
        for index, key in enumerate(keys):
            yield split(index), document_of(topics[key])

    totals = {"train": sum(split(i) == "train" for i in range(len(keys)))}
    totals["val"] = len(keys) - totals["train"]
    return Corpus("builtin:pydoc_data.topics", "topics sorted by name; every 10th (index % 10 == 9) goes to val",
                  records, totals=totals)
