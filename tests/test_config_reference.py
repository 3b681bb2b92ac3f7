"""docs/reference/config.md: generated from TrainConfig's field declarations, and fresh."""

from pathlib import Path

from altgrad.training.config import SETTINGS, sections
from altgrad.training.config_doc import COMMAND, config_reference

ROOT = Path(__file__).parent.parent
PAGE = ROOT / "docs" / "reference" / "config.md"


def test_committed_page_is_fresh():
    assert PAGE.read_text() == config_reference(), f"docs/reference/config.md is stale: run `{COMMAND}`"


def test_every_field_has_a_row_in_its_section():
    page = config_reference()
    for name, group in sections().items():
        part = page.split(f"\n## {name}\n", 1)[1].split("\n## ", 1)[0]
        for setting in group:
            assert f"| `{setting.name}` |" in part, setting.name
    assert sum(line.startswith("| `") for line in page.splitlines()) == len(SETTINGS)


def test_rows_say_result_resume_unit_and_option():
    page = config_reference()
    row = lambda name: next(line for line in page.splitlines() if line.startswith(f"| `{name}` |"))  # noqa: E731
    assert "| steps | yes | yes | `--max-steps` |" in row("max_steps")
    assert "| yes (arm axis) | no | `--optimizer`, `-o` |" in row("optimizer")
    assert "| no | no | `--shadow/--no-shadow` |" in row("use_shadow")
    assert "| yes | no | - |" in row("n_layer") and "(per layer in a policy rule)" in row("rounding")
