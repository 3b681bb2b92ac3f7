import sys
from pathlib import Path

from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))

settings.register_profile("default", deadline=None, max_examples=200)
settings.load_profile("default")


import json  # noqa: E402

import pytest  # noqa: E402

PHRASES = (
    "The Member States shall adopt the measures necessary to comply with this Directive.",
    "This Regulation shall enter into force on the twentieth day following its publication.",
    "The Commission shall be assisted by a committee composed of representatives of the Member States.",
    "Article {n} shall apply from the first day of the month following the date of notification.",
)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small prepared corpus (byte tokenizer) of legislation-like sentences, made once per session."""
    from altgrad.data import prepare_dataset

    root = tmp_path_factory.mktemp("tiny-data")
    source = root / "corpus.jsonl"
    with source.open("w") as stream:
        for doc in range(160):
            sentences = [PHRASES[(doc + i) % len(PHRASES)].format(n=doc % 17 + i) for i in range(4)]
            stream.write(json.dumps({"text": " ".join(sentences)}) + "\n")
    directory, _ = prepare_dataset("eurlex", source=source, tokenizer="byte", out=root / "prepared")
    return directory
