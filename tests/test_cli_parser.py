"""The command line as documented: every `moestream ...` command in README.md and docs/ parses
and prints its help, every flag has help text, the flags named in error advice exist, and
bad flags fail at once, on one line, with exit code 2."""

from __future__ import annotations

import argparse
import ast
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moestream.server.cli import build_parser, main, subcommands

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
LAYERS = ("kernels", "offload", "engine", "tools", "server")
SOURCES = [path for layer in LAYERS for path in (REPO_ROOT / layer).rglob("*.py")]
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
_INLINE = re.compile(r"`([^`\n]+)`")
_SEPARATORS = {"&&", "||", ";", "|"}
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _commands_in(text: str) -> list[list[str]]:
    """The arguments after each `moestream` word of some shell text (not `docker build -t moestream`)."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        for i, word in enumerate(words):
            is_image = word.startswith("moestream:")  # `docker run ... moestream:cpu serve ...`
            if not (word == "moestream" or is_image) or (i > 0 and words[i - 1] in ("-t", "--tag")):
                continue
            argv = []
            for w in words[i + 1:]:
                if w in _SEPARATORS:
                    break
                argv.append(w.strip("[]"))  # a synopsis' [--optional FLAG] parts
            if argv:
                commands.append([w for w in argv if w])
    return commands


def documented_commands() -> list[tuple[str, list[str], bool]]:
    """(label, argv, is_complete): commands in code blocks are complete; an inline `moestream
    bench` in prose may name a command without its required arguments."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for block in _FENCE.findall(text):
            found += [(f"{doc.name}: {' '.join(argv)}", argv, True) for argv in _commands_in(block)]
        for span in _INLINE.findall(_FENCE.sub("", text)):
            found += [(f"{doc.name}: `{' '.join(argv)}`", argv, False) for argv in _commands_in(span)]
    return found


COMMANDS = documented_commands()


def test_the_docs_have_commands_of_every_kind():
    complete = {argv[0] for _, argv, is_complete in COMMANDS if is_complete}
    assert complete >= {"inspect", "generate", "serve", "synth", "bench"}


@pytest.mark.parametrize("argv, is_complete", [c[1:] for c in COMMANDS], ids=[c[0] for c in COMMANDS])
def test_documented_command_parses_and_prints_its_help(argv, is_complete, monkeypatch, capsys):
    for key in [k for k in os.environ if k.startswith("MOESTREAM_")]:
        monkeypatch.delenv(key)
    parser = build_parser()
    if is_complete and "--help" not in argv:  # argparse stops at --help, before unknown flags or missing values
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"`moestream {' '.join(argv)}` does not parse: {capsys.readouterr().err.strip()} ({exc})")
    else:
        known = {s for a in subcommands(parser)[argv[0]]._actions for s in a.option_strings}
        assert {w for w in argv if w.startswith("--")} <= known
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: moestream {argv[0]}")


def _all_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return {"moestream": parser, **{f"moestream {name}": p for name, p in subcommands(parser).items()}}


def test_every_flag_and_argument_has_help_text():
    missing = [f"{name} {a.option_strings or a.dest}" for name, parser in _all_parsers().items()
               for a in parser._actions if not (a.help and a.help.strip()) or a.help == argparse.SUPPRESS]
    assert not missing, missing


def test_help_shows_the_defaults():
    serve = subcommands(build_parser())["serve"].format_help()
    for text in ("(default: 8000)", "(default: 4096)", "(default: auto)", "(default: INFO)"):
        assert text in " ".join(serve.split()), text


def _advice_flags() -> dict[str, list[str]]:
    """{--flag: [where]} for every flag named in the message of a raised *Error(...) in the sources."""
    flags: dict[str, list[str]] = {}
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)):
                continue
            for part in ast.walk(node.exc):
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    for flag in _FLAG.findall(part.value):
                        flags.setdefault(flag, []).append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    return flags


def test_flags_named_in_error_advice_exist():
    known = {s for parser in _all_parsers().values() for a in parser._actions for s in a.option_strings}
    advice = _advice_flags()
    assert {"--vram-budget", "--ctx-size"} <= set(advice), "the scan finds no advice"
    unknown = {flag: where for flag, where in advice.items() if flag not in known}
    assert not unknown, f"error messages name flags no command has: {unknown}"


def test_log_level_works_before_and_after_the_subcommand():
    parser = build_parser()
    assert parser.parse_args(["inspect", "x.gguf"]).log_level == "INFO"
    assert parser.parse_args(["--log-level", "debug", "inspect", "x.gguf"]).log_level == "DEBUG"
    assert parser.parse_args(["inspect", "x.gguf", "--log-level", "warning"]).log_level == "WARNING"


@pytest.mark.parametrize("argv", [["serve"], ["generate", "-p", "hi"], ["bench"], ["perplexity", "--text", "t.txt"]])
def test_dash_m_names_the_model_on_every_command_that_loads_one(argv):
    assert build_parser().parse_args([*argv, "-m", "x.gguf"]).model == "x.gguf"


def test_synth_preset_alone_is_enough(tmp_path):
    from moestream.tools.synth import PRESETS, get_preset

    args = build_parser().parse_args(["synth", "--preset", "olmoe-1b-7b", "-o", str(tmp_path / "x.gguf")])
    assert get_preset(args.arch, args.preset) is PRESETS["olmoe"]["olmoe-1b-7b"]
    assert get_preset("qwen3moe", "tiny") is PRESETS["qwen3moe"]["tiny"]


def _moestream(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moestream.server.cli", *args], capture_output=True, text=True,
                          timeout=120, **kwargs)


def _assert_one_line_exit_2(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_ambiguous_synth_preset_says_to_add_arch(tmp_path):
    _assert_one_line_exit_2(_moestream("synth", "--preset", "tiny", "-o", str(tmp_path / "x.gguf")),
                            "'tiny'", "olmoe", "--arch")


@pytest.mark.parametrize("flags, needle", [
    (["--vram-budget", "banana"], "--vram-budget"),
    (["--ctx-size", "0"], "--ctx-size"),
    (["--port", "70000"], "--port"),
    (["--device", "gpu"], "--device"),
    (["--threads", "two"], "--threads"),
])
def test_serve_rejects_bad_flags_at_once_without_binding(flags, needle):
    start_s = time.monotonic()
    done = _moestream("serve", "--demo", *flags)
    # No port bound, no model loaded: uvicorn's start-up lines would be in the output.
    _assert_one_line_exit_2(done, needle)
    assert "Uvicorn" not in done.stderr + done.stdout and time.monotonic() - start_s < 60


def test_serve_rejects_a_bad_value_from_the_environment():
    done = _moestream("serve", "--demo", env={**os.environ, "MOESTREAM_VRAM_BUDGET": "lots"})
    _assert_one_line_exit_2(done, "--vram-budget", "'lots'")


def test_serve_that_cannot_place_the_model_stops_with_one_line_and_exit_2():
    """The plan fails in the loader thread, after the port is bound: the server stops, the
    thread is joined, and the process exits 2 with the planner's advice (no abort, exit 134)."""
    from tests.fixtures.models import get_fixture
    from tests.server.conftest import free_port

    done = _moestream("serve", "-m", str(get_fixture("olmoe", "Q4_K_M").gguf_path), "--vram-budget", "1MiB",
                      "--port", str(free_port()), "--log-level", "WARNING")
    _assert_one_line_exit_2(done, "moestream: error: VRAM budget 1.00 MiB is too small", "--vram-budget")


def test_serve_on_a_taken_port_says_so_before_loading():
    import socket

    from tests.fixtures.models import get_fixture

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _moestream("serve", "-m", str(get_fixture("olmoe", "Q4_K_M").gguf_path), "--port", str(port))
    _assert_one_line_exit_2(done, f"cannot listen on 127.0.0.1:{port}", "--port")
