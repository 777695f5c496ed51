"""One name per concept across the commands: a walk over every command's options that
fails on a concept spelled two ways, an option without help, or a command without an
example; and the 0.1 spellings still accepted, with a warning."""

from __future__ import annotations

import click
import pytest

from bnkit.cli import RENAMED, _renamed, cli

CONCEPTS = {
    "image side in pixels": ("--image-size", {"--input-size", "--size", "--img-size"}),
    "data to validate or verify on": ("--val", {"--example", "--check", "--check-data"}),
    "the output a command writes": ("--output", {"--out", "--out-dir", "--output-dir"}),
    "training steps planned or taken": ("--train-steps", {"--steps", "--n-steps"}),
    "TENT's optimizer steps per batch": ("--tent-steps", {"--adapt-steps"}),
    "BN layers picked by a selector": ("--select", {"--selector", "--layers"}),
    "replace what bnkit wrote before": ("--overwrite", {"--force", "--replace"}),
    "print JSON": ("--json", {"--as-json", "--format-json"}),
}
"""Concept: (its name, the spellings it must not have). `--input-shape` (one sample's
shape, for random inputs) and `--seed` (a seed) against `--seeds` (how many) are other
concepts."""


def _options(command: click.Command) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option) and not p.hidden]


def test_no_concept_is_spelled_two_ways():
    for name, command in cli.commands.items():
        spelled = {opt for p in _options(command) for opt in p.opts}
        for concept, (canonical, others) in CONCEPTS.items():
            wrong = spelled & others
            assert not wrong, f"bnkit {name}: {sorted(wrong)} for {concept}; use {canonical}"


def test_every_output_is_o_and_output():
    for name, command in cli.commands.items():
        for p in _options(command):
            if "-o" in p.opts or "--output" in p.opts:
                assert {"-o", "--output"} <= set(p.opts), (name, p.opts)


def test_every_option_has_help_and_every_command_an_example():
    for name, command in cli.commands.items():
        for p in _options(command):
            assert p.help, f"bnkit {name} {p.opts[0]} has no help text"
        assert "Examples:" in (command.epilog or ""), f"bnkit {name} --help has no example"
        assert f"bnkit {name}" in command.epilog


@pytest.mark.parametrize(
    ("command", "old", "new"),
    [(c, o, n) for c, names in RENAMED.items() for o, n in names.items()],
)
def test_old_spellings_are_hidden_aliases_with_a_warning(command, old, new):
    args, notes = _renamed([command, "x", old, "1"])
    assert args == [command, "x", new, "1"] or args == [command, "-o", "x", new, "1"]
    assert any(f"{old} is now {new}" in n for n in notes)
    assert new in {o for p in _options(cli.commands[command]) for o in p.opts}
    assert old not in {o for p in _options(cli.commands[command]) for o in p.opts}


def test_the_tta_command_and_library_default_to_the_same_batch_size():
    import inspect

    import bnkit

    default = inspect.signature(bnkit.tta).parameters["batch_size"].default
    batch = next(p for p in cli.commands["tta"].params if p.name == "batch_size")
    assert batch.default == default == 64
