"""The command line's help, every command's and the group's, exactly as recorded in
tests/snapshots/cli_help.json before the command line was split into a package: a
refactor that changes none of the options, texts or defaults keeps this green. A change
meant to alter the help rewrites the snapshot with `python tests/test_cli_help.py`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import keras
import pytest
from click.testing import CliRunner

SNAPSHOT = Path(__file__).parent / "snapshots" / "cli_help.json"
WIDTH = 100

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "torch", reason="framework-free: once, in the torch pass"
)


def helps() -> dict[str, str]:
    """`bnkit --help` (key '') and `bnkit COMMAND --help` for every command."""
    from bnkit.cli import cli

    runner = CliRunner()
    out = {"": runner.invoke(cli, ["--help"], prog_name="bnkit", terminal_width=WIDTH).output}
    for name in cli.commands:
        result = runner.invoke(cli, [name, "--help"], prog_name="bnkit", terminal_width=WIDTH)
        assert result.exit_code == 0, (name, result.output)
        out[name] = result.output
    return out


def test_every_commands_help_is_unchanged():
    recorded = json.loads(SNAPSHOT.read_text())
    current = helps()
    assert sorted(current) == sorted(recorded)
    changed = [name or "(group)" for name in recorded if current[name] != recorded[name]]
    assert not changed, f"help changed for {changed}: rewrite the snapshot if meant"


def test_the_run_options_default_to_the_librarys_settings():
    """`compare`'s --epochs/--seeds are `bnkit.compare`'s defaults and `demo`'s are the
    demo's own (the docs' recorded demo run is checked against those)."""
    from bnkit.cli import cli
    from bnkit.compare import DEFAULT_EPOCHS, DEFAULT_SEEDS
    from bnkit.demo import STORY_EPOCHS, STORY_LABELS_PER_CLASS, STORY_SEEDS

    def defaults(command: str) -> dict[str, object]:
        return {p.name: p.default for p in cli.commands[command].params}

    assert (defaults("compare")["epochs"], defaults("compare")["seeds"]) == (
        DEFAULT_EPOCHS, DEFAULT_SEEDS)  # fmt: skip
    demo = defaults("demo")
    assert (demo["epochs"], demo["seeds"], demo["labels_per_class"]) == (
        STORY_EPOCHS, STORY_SEEDS, STORY_LABELS_PER_CLASS)  # fmt: skip


if __name__ == "__main__":
    SNAPSHOT.write_text(json.dumps(helps(), indent=1, sort_keys=True) + "\n")
    sys.exit(0)
