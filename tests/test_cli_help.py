"""`smat ... --help`: every argument has a help text that shows its default, every command a description and
an example, and every example is a command line the parser accepts."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

import pytest

from smat.cli import build_parser


def all_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) of `smat` and every sub-command below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from all_parsers(sub, (*path, name))


PARSERS = dict(all_parsers(build_parser()))


def has_default(action: argparse.Action) -> bool:
    default = action.default
    return bool(action.option_strings) and not (default is None or default is False or default == []
                                                or default is argparse.SUPPRESS)


def test_the_command_tree_is_complete():
    commands = {" ".join(path) for path in PARSERS if path}
    assert {"data build-embedded", "data convert", "data check", "episodes sample", "fetch", "import pmf",
            "import smat-official", "pretrain", "train", "evaluate", "select-lr", "compare", "tables",
            "figures"} <= commands


@pytest.mark.parametrize("path", list(PARSERS), ids=lambda p: " ".join(p) or "smat")
def test_every_argument_has_help_with_its_default(path):
    parser = PARSERS[path]
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            missing = [choice.dest for choice in action._choices_actions if not choice.help]
            assert not missing, f"smat {' '.join(path)}: sub-commands without help: {missing}"
            continue
        assert action.help and action.help.strip(), f"smat {' '.join(path)}: {action.dest} has no help"
        if has_default(action):
            shown = f"(default: {action.default})" in text or "default" in action.help
            assert shown, f"smat {' '.join(path)}: the default of {action.dest} is not shown"


@pytest.mark.parametrize("path", list(PARSERS), ids=lambda p: " ".join(p) or "smat")
def test_every_command_has_a_description_and_examples_that_parse(path):
    parser = PARSERS[path]
    assert parser.description and len(parser.description) > 30, f"smat {' '.join(path)} has no description"
    assert parser.epilog and parser.epilog.startswith("example:"), f"smat {' '.join(path)} has no example"
    examples = [line.strip() for line in parser.epilog.splitlines()[1:]]
    assert examples
    for example in examples:
        words = shlex.split(example)
        assert words[0] == "smat"
        assert tuple(words[1:1 + len(path)]) == path, f"the example of smat {' '.join(path)} runs another command"
        build_parser().parse_args(words[1:])      # exits (SystemExit) on an argument the command does not take


def test_help_through_the_installed_command_shows_defaults_and_example():
    result = subprocess.run([sys.executable, "-m", "smat.cli", "episodes", "sample", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "number of episodes (default: 600)" in text
    assert "example: smat episodes sample --store" in text


def test_fetch_does_not_ask_for_an_arch_it_can_infer():
    text = " ".join(PARSERS[("fetch",)].format_help().split())
    assert "needed for" not in text
    assert "inferred from the weights" in text
