"""Data: sources (Hub, local files, built-in), tokenizers, and prepared token files."""

from .prepare import (
    DATASETS,
    DEFAULT_DATA_ROOT,
    SPLITS,
    SplitStats,
    ensure_builtin_data,
    load_meta,
    prepare_dataset,
)
from .sources import Corpus, Document, builtin_corpus, hub_corpus, local_corpus
from .tokenizers import TOKENIZERS, ByteTokenizer, Tokenizer, get_tokenizer

__all__ = [
    "DATASETS",
    "DEFAULT_DATA_ROOT",
    "SPLITS",
    "TOKENIZERS",
    "ByteTokenizer",
    "Corpus",
    "Document",
    "SplitStats",
    "Tokenizer",
    "builtin_corpus",
    "ensure_builtin_data",
    "get_tokenizer",
    "hub_corpus",
    "load_meta",
    "local_corpus",
    "prepare_dataset",
]
