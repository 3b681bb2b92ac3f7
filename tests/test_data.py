"""`altgrad prepare-data` and the data library: sources, tokenizers, token files, meta.json.

Every fixture is written here, in tmp_path; nothing needs the network. gpt2 runs only where
tiktoken's files can be loaded (a cache or a download), and is skipped otherwise.
"""

import hashlib
import json
import multiprocessing
import os
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from altgrad.cli import app
from altgrad.data import ensure_builtin_data, get_tokenizer, load_meta, prepare_dataset
from altgrad.data import prepare as prepare_module
from altgrad.data import sources
from altgrad.data.sources import split_of
from altgrad.errors import UserError

runner = CliRunner()

TRAIN = ["First training document.", "Zweites Dokument: Grüße, ÄÖÜ ß.", "third <|endoftext|> is plain text",
         "Fourth\n\nwith paragraphs and 数字 123."]
VAL = ["A validation document.", "Another one, the last."]
TEST = ["A test document that must be ignored."]


def _gpt2_or_skip():
    try:
        return get_tokenizer("gpt2")
    except UserError as error:
        pytest.skip(f"tiktoken's gpt2 files are not available here: {error}")


@pytest.fixture(params=["byte", "gpt2"])
def tokenizer(request):
    return _gpt2_or_skip() if request.param == "gpt2" else get_tokenizer("byte")


def _write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


def _records(texts):
    # Extra fields, as in LexGLUE, must be ignored.
    return [{"text": text, "labels": [index, 7], "celex_id": f"3199{index}R"} for index, text in enumerate(texts)]


def _tokens(directory, split):
    return np.fromfile(directory / f"{split}.bin", dtype="<u2")


def _check_round_trip(directory, tokenizer, expected):
    meta = load_meta(directory)
    for split, texts in expected.items():
        tokens = _tokens(directory, split)
        eot = tokenizer.eot_token
        assert meta["splits"][split]["tokens"] == len(tokens)
        assert meta["splits"][split]["documents"] == len(texts) == int((tokens == eot).sum())
        assert tokens[-1] == eot  # an end-of-text after every document, the last one included
        want = [token for text in texts for token in [*tokenizer.encode(text), eot]]
        assert tokens.tolist() == want
        assert tokenizer.decode(tokens.tolist()) == "".join(text + "<|endoftext|>" for text in texts)
        data = (directory / f"{split}.bin").read_bytes()
        assert meta["splits"][split]["sha256"] == hashlib.sha256(data).hexdigest()
    assert meta["tokenizer"] == tokenizer.name
    assert meta["vocab_size"] == tokenizer.vocab_size and meta["eot_token"] == tokenizer.eot_token
    return meta


def test_jsonl_folder_round_trip(tmp_path, tokenizer):
    source = tmp_path / "src"
    _write_jsonl(source / "train.jsonl", _records(TRAIN))
    _write_jsonl(source / "validation.jsonl", _records(VAL))
    _write_jsonl(source / "test.jsonl", _records(TEST))
    (source / "README.md").write_text("not data")
    out, meta = prepare_dataset("eurlex", source=source, tokenizer=tokenizer.name, out=tmp_path / "out")
    assert out == tmp_path / "out"
    _check_round_trip(out, tokenizer, {"train": TRAIN, "val": VAL})
    assert meta == load_meta(out)
    assert meta["source"] == str(source.resolve()) and meta["name"] == "eurlex"
    assert any("test split ignored" in note for note in meta["notes"])
    assert {"created", "split_rule", "dtype"} <= set(meta)
    for split in ("train", "val"):
        assert meta["splits"][split]["skipped"] == meta["splits"][split]["empty"] == 0
    if tokenizer.name == "gpt2":
        assert (meta["vocab_size"], meta["eot_token"]) == (50257, 50256)
    else:
        assert (meta["vocab_size"], meta["eot_token"]) == (257, 256)


def test_parquet_in_the_hubs_layout(tmp_path, tokenizer):
    hub = tmp_path / "snapshot" / "eurlex"
    hub.mkdir(parents=True)
    for name, texts in (("train", TRAIN), ("validation", VAL), ("test", TEST)):
        table = pa.table({"text": texts, "labels": [[1, 2]] * len(texts)})
        # Small row groups, so that reading goes batch by batch.
        pq.write_table(table, hub / f"{name}-00000-of-00001.parquet", row_group_size=2)
    out, meta = prepare_dataset("eurlex", source=tmp_path / "snapshot", tokenizer=tokenizer.name, out=tmp_path / "o")
    _check_round_trip(out, tokenizer, {"train": TRAIN, "val": VAL})
    assert "1 train file(s), 1 validation file(s)" in meta["split_rule"]


def test_default_output_folder_is_data_name_under_cwd(tmp_path, monkeypatch):
    _write_jsonl(tmp_path / "docs.jsonl", _records(TRAIN))
    monkeypatch.chdir(tmp_path)
    out, _ = prepare_dataset("eurlex", source=tmp_path / "docs.jsonl", tokenizer="byte")
    assert out == prepare_module.DEFAULT_DATA_ROOT / "eurlex"
    assert (tmp_path / "data" / "eurlex" / "meta.json").is_file()


def test_empty_missing_invalid_and_undecodable_records_are_counted(tmp_path):
    source = tmp_path / "src"
    lines = [
        json.dumps({"text": "good one"}).encode(),
        json.dumps({"text": ""}).encode(),
        json.dumps({"text": "  \n\t"}).encode(),
        json.dumps({"text": None}).encode(),
        json.dumps({"labels": [1]}).encode(),  # no text field
        b'{"text": "broken json',
        json.dumps({"text": 42}).encode(),
        b"[1, 2]",
        b'{"text": "bad \xff byte"}',
        b"",  # a blank line is not a record
        json.dumps({"text": "good two"}).encode(),
    ]
    source.mkdir()
    (source / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    _write_jsonl(source / "dev.jsonl", [{"text": "v"}, {"text": None}])
    out, meta = prepare_dataset("eurlex", source=source, tokenizer="byte", out=tmp_path / "out")
    train = meta["splits"]["train"]
    assert train["documents"] == 3
    assert (train["empty"], train["invalid"], train["undecodable"], train["skipped"]) == (4, 3, 1, 7)
    assert meta["splits"]["val"]["empty"] == 1 and meta["splits"]["val"]["documents"] == 1
    _check_round_trip(out, get_tokenizer("byte"), {"train": ["good one", "bad \ufffd byte", "good two"],
                                                     "val": ["v"]})
    result = runner.invoke(app, ["prepare-data", "eurlex", "--source", str(source), "--tokenizer", "byte",
                                 "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "train: skipped 4 empty or text-less and 3 invalid" in output
    assert "train: 1 document(s) had bytes that are not UTF-8" in output


def test_single_file_is_split_by_document(tmp_path):
    texts = [f"document number {index}" for index in range(41)]
    _write_jsonl(tmp_path / "all.jsonl", _records(texts) + [{"text": ""}])
    out, meta = prepare_dataset("eurlex", source=tmp_path / "all.jsonl", tokenizer="byte", out=tmp_path / "out")
    # 5% of 41 is 2: the last two documents are val, and stay in order.
    _check_round_trip(out, get_tokenizer("byte"), {"train": texts[:39], "val": texts[39:]})
    assert "last 2 of 41 documents" in meta["split_rule"]
    assert meta["splits"]["val"]["empty"] == 1  # the trailing empty record came after the split point

    _write_jsonl(tmp_path / "few.jsonl", _records(["a", "b", "c"]))
    out, _ = prepare_dataset("eurlex", source=tmp_path / "few.jsonl", tokenizer="byte", out=tmp_path / "few")
    _check_round_trip(out, get_tokenizer("byte"), {"train": ["a", "b"], "val": ["c"]})  # at least one

    _write_jsonl(tmp_path / "one.jsonl", _records(["alone"]))
    with pytest.raises(UserError, match="at least 2"):
        prepare_dataset("eurlex", source=tmp_path / "one.jsonl", tokenizer="byte", out=tmp_path / "one")


def test_json_files_and_txt_folders(tmp_path):
    byte = get_tokenizer("byte")
    source = tmp_path / "json"
    source.mkdir()
    (source / "train.json").write_text(json.dumps([{"text": t, "id": i} for i, t in enumerate(TRAIN)]))
    (source / "valid.json").write_text(json.dumps({"data": [{"text": t} for t in VAL]}, indent=2))
    out, _ = prepare_dataset("eurlex", source=source, tokenizer="byte", out=tmp_path / "o1")
    _check_round_trip(out, byte, {"train": TRAIN, "val": VAL})

    # .json holding JSON Lines, as the Hub often stores them.
    lines = tmp_path / "lines"
    _write_jsonl(lines / "train.json", _records(TRAIN))
    _write_jsonl(lines / "val.json", _records(VAL))
    out, _ = prepare_dataset("eurlex", source=lines, tokenizer="byte", out=tmp_path / "o2")
    _check_round_trip(out, byte, {"train": TRAIN, "val": VAL})

    # One document per .txt file; split by folder name; bad bytes replaced, counted, kept.
    txt = tmp_path / "txt"
    for split, texts in (("train", TRAIN), ("dev", VAL)):
        (txt / split).mkdir(parents=True)
        for index, text in enumerate(texts):
            (txt / split / f"doc{index}.txt").write_text(text, encoding="utf-8")
    (txt / "dev" / "doc9.txt").write_bytes(b"caf\xe9")
    (txt / "dev" / "empty.txt").write_text("   ")
    out, meta = prepare_dataset("eurlex", source=txt, tokenizer="byte", out=tmp_path / "o3")
    _check_round_trip(out, byte, {"train": TRAIN, "val": [*VAL, "caf\ufffd"]})
    assert meta["splits"]["val"]["undecodable"] == 1 and meta["splits"]["val"]["empty"] == 1


def test_split_names():
    from pathlib import Path

    cases = {"train.jsonl": "train", "eurlex/train-00000-of-00001.parquet": "train", "validation.jsonl": "val",
             "eurlex_dev.json": "val", "valid.txt": "val", "data/val/doc1.txt": "val", "test.jsonl": "test",
             "interval.jsonl": None, "devices.txt": None, "docs.jsonl": None, "val/train_notes.txt": "train"}
    for name, split in cases.items():
        assert split_of(Path(name)) == split, name


def test_sources_without_text_give_clear_errors(tmp_path):
    _write_jsonl(tmp_path / "a" / "train.jsonl", [{"body": "x"}, {"body": "y"}])
    _write_jsonl(tmp_path / "a" / "val.jsonl", [{"body": "z"}])
    with pytest.raises(UserError, match="no usable documents for train"):
        prepare_dataset("eurlex", source=tmp_path / "a", tokenizer="byte", out=tmp_path / "out")
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"body": ["x", "y"]}), tmp_path / "p" / "train.parquet")
    pq.write_table(pa.table({"body": ["z"]}), tmp_path / "p" / "val.parquet")
    with pytest.raises(UserError, match="no `text` column"):
        prepare_dataset("eurlex", source=tmp_path / "p", tokenizer="byte", out=tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no"):
        prepare_dataset("eurlex", source=tmp_path / "empty", tokenizer="byte", out=tmp_path / "out")
    assert not (tmp_path / "out" / "meta.json").exists()
    assert not [p for p in (tmp_path / "out").iterdir()]  # failed runs leave nothing behind


def test_builtin_corpus_prepares_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "load_hub_dataset", _offline)
    directory = ensure_builtin_data(tmp_path)
    assert directory == tmp_path / "builtin"
    meta = load_meta(directory)
    from pydoc_data.topics import topics

    keys = sorted(topics)
    expected = {"train": [topics[k] for i, k in enumerate(keys) if i % 10 != 9],
                "val": [topics[k] for i, k in enumerate(keys) if i % 10 == 9]}
    _check_round_trip(directory, get_tokenizer("byte"), expected)
    assert meta["source"] == "builtin:pydoc_data.topics"
    assert meta["splits"]["train"]["tokens"] > 100_000

    created = (directory / "train.bin").stat().st_mtime_ns
    assert ensure_builtin_data(tmp_path) == directory  # already there: untouched
    assert (directory / "train.bin").stat().st_mtime_ns == created
    (directory / "meta.json").write_text("{not json")
    ensure_builtin_data(tmp_path)  # broken: prepared again
    assert load_meta(directory)["splits"] == meta["splits"]


def test_builtin_through_the_cli(tmp_path):
    result = runner.invoke(app, ["prepare-data", "builtin", "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    meta = load_meta(tmp_path / "b")
    assert meta["tokenizer"] == "byte"
    for text in ("train", "val", "train.bin", meta["splits"]["val"]["sha256"][:12], f"{meta['splits']['val']['tokens']:,}"):
        assert text in result.output


def _fail_after(count):
    calls = {"n": 0}
    real = prepare_module._TokenFile.add

    def add(self, ids, eot):
        calls["n"] += 1
        if calls["n"] > count:
            raise KeyboardInterrupt  # as if the run were killed
        return real(self, ids, eot)

    return add


def _prepared_split_folder(tmp_path):
    """A source folder with train/val files, already prepared once into tmp_path/out."""
    source = tmp_path / "src"
    _write_jsonl(source / "train.jsonl", _records(TRAIN))
    _write_jsonl(source / "val.jsonl", _records(VAL))
    out = tmp_path / "out"
    prepare_dataset("eurlex", source=source, tokenizer="byte", out=out)
    return source, out


def test_writes_are_atomic(tmp_path, monkeypatch):
    source, out = _prepared_split_folder(tmp_path)
    before = {name: (out / name).read_bytes() for name in ("train.bin", "val.bin", "meta.json")}

    # A run that dies half-way leaves the previous dataset exactly as it was, and no temp files.
    _write_jsonl(source / "train.jsonl", _records([t.upper() for t in TRAIN] * 3))
    (out / ".train.bin.leftover.tmp").write_bytes(b"from a killed run")
    with monkeypatch.context() as patch:
        patch.setattr(prepare_module._TokenFile, "add", _fail_after(5))
        with pytest.raises(KeyboardInterrupt):
            prepare_dataset("eurlex", source=source, tokenizer="byte", out=out)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    assert {name: (out / name).read_bytes() for name in before} == before
    load_meta(out)

    # meta.json is the last file to appear; re-running replaces everything.
    replaced = []
    real_replace = os.replace

    def replace(src, dst):
        replaced.append(os.path.basename(dst))
        real_replace(src, dst)

    monkeypatch.setattr(prepare_module.os, "replace", replace)
    _, meta = prepare_dataset("eurlex", source=source, tokenizer="byte", out=out)
    assert replaced[-1] == "meta.json" and set(replaced) == {"train.bin", "val.bin", "meta.json"}
    assert meta["splits"]["train"]["documents"] == 3 * len(TRAIN)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_a_failure_while_swapping_leaves_no_meta(tmp_path, monkeypatch):
    source, out = _prepared_split_folder(tmp_path)

    def broken(path, payload):
        raise OSError("disk full")

    monkeypatch.setattr(prepare_module, "write_json", broken)
    with pytest.raises(OSError):
        prepare_dataset("eurlex", source=source, tokenizer="byte", out=out)
    with pytest.raises(UserError, match="no meta.json"):  # incomplete, and says so
        load_meta(out)


def test_load_meta_rejects_broken_directories(tmp_path):
    source = tmp_path / "src"
    _write_jsonl(source / "train.jsonl", _records(TRAIN))
    _write_jsonl(source / "val.jsonl", _records(VAL))
    out = tmp_path / "eurlex"
    prepare_dataset("eurlex", source=source, tokenizer="byte", out=out)
    meta_text = (out / "meta.json").read_text()

    with pytest.raises(UserError, match="altgrad prepare-data"):
        load_meta(tmp_path / "nothing")
    (out / "meta.json").write_text(meta_text[:50])
    with pytest.raises(UserError, match="corrupt.*altgrad prepare-data eurlex"):
        load_meta(out)
    (out / "meta.json").write_text(json.dumps({"splits": {}}))
    with pytest.raises(UserError, match="corrupt"):
        load_meta(out)
    (out / "meta.json").write_text(meta_text)
    data = (out / "val.bin").read_bytes()
    (out / "val.bin").write_bytes(data[:-2])
    with pytest.raises(UserError, match="truncated"):
        load_meta(out)
    (out / "val.bin").unlink()
    with pytest.raises(UserError, match="missing"):
        load_meta(out)


def _offline(repo, config):
    raise ConnectionError(f"Couldn't reach '{repo}' on the Hub (LocalEntryNotFoundError)")


def _assert_user_error(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    message = result.stderr.strip()
    assert message.startswith("error:") and "\n" not in message, message
    for needle in needles:
        assert needle in message


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, monkeypatch):
    _assert_user_error(runner.invoke(app, ["prepare-data", "wikitext"]), "eurlex, builtin", "--source")
    _assert_user_error(runner.invoke(app, ["prepare-data", "eurlex", "--source", str(tmp_path / "missing"),
                                           "--tokenizer", "byte"]), "does not exist")
    _assert_user_error(runner.invoke(app, ["prepare-data", "builtin", "--tokenizer", "sentencepiece"]),
                       "gpt2, byte")
    _write_jsonl(tmp_path / "x.jsonl", [{"body": "no text"}] * 3)
    _assert_user_error(runner.invoke(app, ["prepare-data", "eurlex", "--source", str(tmp_path / "x.jsonl"),
                                           "--tokenizer", "byte", "--out", str(tmp_path / "o")]), "`text`")
    monkeypatch.setattr(sources, "load_hub_dataset", _offline)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["prepare-data", "eurlex", "--tokenizer", "byte"])
    _assert_user_error(result, "ConnectionError", "--source PATH", "builtin")
    assert not (tmp_path / "data" / "eurlex" / "meta.json").exists()


def test_tiktoken_unavailable_is_a_user_error(monkeypatch):
    tiktoken = pytest.importorskip("tiktoken")

    def unreachable(name):
        raise ConnectionError("HTTPSConnectionPool(host='openaipublic.blob.core.windows.net'): failed")

    monkeypatch.setattr(tiktoken, "get_encoding", unreachable)
    with pytest.raises(UserError, match="TIKTOKEN_CACHE_DIR.*--tokenizer byte"):
        get_tokenizer("gpt2")
    _assert_user_error(runner.invoke(app, ["prepare-data", "eurlex"]), "TIKTOKEN_CACHE_DIR", "--tokenizer byte")


def _written(directory):
    """Which train.bin `directory` has: each preparation writes a new file (a new inode)."""
    stat = (directory / "train.bin").stat()
    return stat.st_ino, stat.st_mtime_ns


def _prepare(how, root):
    """Prepare root/builtin as a run needing the built-in corpus does, or as `prepare-data` does."""
    if how == "run":
        return ensure_builtin_data(root)
    return prepare_dataset("builtin", out=root / "builtin")[0]


def _prepare_at_once(how, root, barrier, results):
    barrier.wait()
    try:
        results.put(("ok", _written(_prepare(how, root))))
    except BaseException as error:  # noqa: BLE001 - reported to the test
        results.put(("error", repr(error)))


PREPARERS = ["run", "prepare-data"]


@pytest.mark.parametrize("how", PREPARERS)
def test_concurrent_first_preparations_prepare_once_and_all_use_it(tmp_path, how):
    """Four processes that prepare one fresh directory at the same moment (runs side by side,
    SLURM array tasks in one folder, prepare-data twice): one prepares it, the others wait for its
    lock and use the same files (one train.bin, written once), and nobody sees another's
    temporary files."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(4), context.Queue()
    processes = [context.Process(target=_prepare_at_once, args=(how, tmp_path, barrier, results)) for _ in range(4)]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=180) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    assert [o[0] for o in outcomes] == ["ok"] * 4, outcomes
    assert len({o[1] for o in outcomes}) == 1, outcomes  # the same train.bin for all: written once
    assert load_meta(tmp_path / "builtin")["tokenizer"] == "byte"
    assert not list((tmp_path / "builtin").glob(".*.tmp"))


def _hold_and_prepare(directory, held, go, results):
    """Another process preparing `directory`: it holds the lock until told to go on."""
    with prepare_module.preparing(directory):
        held.set()
        go.wait(timeout=180)
        prepare_module.write_tokens(sources.builtin_corpus(), get_tokenizer("byte"), directory, name="builtin")
        results.put(_written(directory))


@pytest.mark.parametrize("how", PREPARERS)
def test_a_preparation_waits_for_another_process_preparing_the_directory_then_uses_its_files(tmp_path, how):
    context = multiprocessing.get_context("spawn")
    directory = tmp_path / "builtin"
    held, go, results = context.Event(), context.Event(), context.Queue()
    holder = context.Process(target=_hold_and_prepare, args=(directory, held, go, results))
    holder.start()
    try:
        assert held.wait(timeout=180)
        outcome = []
        waiter = threading.Thread(target=lambda: outcome.append(_prepare(how, tmp_path)))
        waiter.start()
        waiter.join(timeout=1.0)
        assert waiter.is_alive() and not (directory / "meta.json").exists()  # it waits, and writes nothing
    finally:
        go.set()
    written = results.get(timeout=180)
    waiter.join(timeout=180)
    holder.join(timeout=60)
    assert outcome == [directory] and _written(directory) == written  # what the other prepared, not rewritten
    prepare_dataset("builtin", out=directory)  # prepare-data once the other has finished: prepared again
    assert _written(directory) != written and load_meta(directory)["tokenizer"] == "byte"
