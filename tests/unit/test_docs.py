"""The docs stay true to the code: every config key is documented with its default."""

from pathlib import Path

from nnxtrain.config.reference import reference_tables

ROOT = Path(__file__).resolve().parents[2]


def test_config_reference_matches_the_schemas() -> None:
    doc = (ROOT / "docs" / "config.md").read_text()
    assert reference_tables() in doc, "regenerate docs/config.md from reference_tables()"


def test_every_event_is_documented() -> None:
    from nnxtrain.train.events import HOOKS

    doc = (ROOT / "docs" / "events.md").read_text()
    for hook in (*HOOKS, "teardown"):
        assert f"### `{hook}(" in doc, hook
