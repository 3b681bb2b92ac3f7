"""Tokenizers that turn a document into uint16 token ids, plus the id that ends a document."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

from ..errors import UserError

TOKENIZERS = ("gpt2", "byte")
TIKTOKEN_HOST = "openaipublic.blob.core.windows.net"


class Tokenizer(Protocol):
    """What preparing and reading a corpus needs: a name, the vocabulary size and the end-of-text id."""

    name: str
    vocab_size: int
    eot_token: int

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token spellings in the text are plain text, never `eot_token`."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens 0..255 and 256 as end-of-text: needs no download, so it always works."""

    name = "byte"
    vocab_size = 257
    eot_token = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        # The end-of-text id is not a byte; render it as tiktoken renders its special token.
        parts, run = [], bytearray()
        for token in ids:
            if token == self.eot_token:
                parts.append(run.decode("utf-8", errors="replace") + "<|endoftext|>")
                run = bytearray()
            else:
                run.append(token)
        return "".join(parts) + run.decode("utf-8", errors="replace")


class TiktokenTokenizer(Tokenizer):
    """A tiktoken encoding (GPT-2 BPE); its files are downloaded once, or read from TIKTOKEN_CACHE_DIR."""

    def __init__(self, name: str):
        try:
            import tiktoken
        except ImportError as error:
            raise UserError(f"the {name} tokenizer needs tiktoken (pip install tiktoken), "
                            "or use --tokenizer byte") from error
        try:
            self._encoding = tiktoken.get_encoding(name)
        except Exception as error:  # requests/OSError offline, ValueError on a bad download: all the user's to fix
            cache = os.environ.get("TIKTOKEN_CACHE_DIR")
            where = f"TIKTOKEN_CACHE_DIR={cache} has no copy of them" if cache else "TIKTOKEN_CACHE_DIR is not set"
            if isinstance(error, OSError):  # requests' ConnectionError and friends: long, and all say "offline"
                failure = f"its files could not be downloaded from {TIKTOKEN_HOST} ({type(error).__name__})"
            else:
                failure = f"{type(error).__name__}: {_first_line(error)}"
            raise UserError(
                f"could not load tiktoken's {name} encoding: {failure}, and {where}. "
                "Point TIKTOKEN_CACHE_DIR at a folder holding tiktoken's cached files, "
                "or use --tokenizer byte (no download)"
            ) from error
        self.name = name
        self.vocab_size = self._encoding.n_vocab
        self.eot_token = self._encoding.eot_token
        if self.vocab_size > 2**16:
            raise UserError(f"{name} has {self.vocab_size} tokens; token files hold uint16 ids (at most 65536)")

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._encoding.decode(list(ids))


def get_tokenizer(name: str) -> Tokenizer:
    """The tokenizer called `name` (gpt2 or byte); a clear `UserError` if it is unknown or cannot load."""
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return TiktokenTokenizer(name)
    raise UserError(f"unknown tokenizer {name!r}; choose one of: {', '.join(TOKENIZERS)}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else "no message"
