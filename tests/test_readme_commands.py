"""Every `moestream` command in the README's code blocks parses as written (issue 19: the
README showed `serve -m`, which `serve` rejects)."""

import argparse
import re
import shlex
from pathlib import Path

import pytest

from moestream.server.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[list[str]]:
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    text = "\n".join(blocks).replace("\\\n", " ")
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    commands = []
    for line in text.splitlines():
        for segment in line.split("&&"):
            words = shlex.split(segment, comments=True)
            # After the program (or the image, in `docker run ... moestream serve ...`).
            starts = [i + 1 for i, w in enumerate(words) if w == "moestream" and words[i + 1:i + 2]
                      and words[i + 1] in subcommands]
            commands += [words[i:] for i in starts[:1]]
    return commands


def test_the_readme_has_moestream_commands():
    assert {c[0] for c in readme_commands()} >= {"serve", "generate", "inspect"}


@pytest.mark.parametrize("command", readme_commands(), ids=" ".join)
def test_a_readme_command_parses(command):
    build_parser().parse_args(command)  # argparse exits with 2 on a flag the command lacks
