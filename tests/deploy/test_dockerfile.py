"""The Dockerfile, read as data (there is no Docker engine here): non-root, the port and the
health check the server really uses, a /models volume, a final stage without build tools,
and a build context from which pip builds a complete moestream."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import tomllib
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from moestream.server.cli import build_parser
from tests.deploy.dockerfile import Stage, ignore_patterns, is_ignored, parse_dockerfile
from tests.deploy.live import REPO_ROOT, LiveServer, free_port

STAGES = parse_dockerfile(REPO_ROOT / "Dockerfile")
FINAL = STAGES[-1]
BUILD = STAGES[0]
PACKAGES = ("kernels", "offload", "engine", "tools", "server")  # installed as moestream.<folder>
# Triton compiles a C launcher per kernel signature at run time and kernels/cpu builds its
# C++ kernels for the host CPU at first use: these compiler drivers are run-time needs.
RUNTIME_COMPILER_PACKAGES = {"gcc", "g++", "libc6-dev"}
# The documented `docker run ... IMAGE serve ...` line.
DOCUMENTED_RUN_ARGS = ["serve", "--model", "/models/X.gguf", "--vram-budget", "6GiB", "--host", "0.0.0.0"]


def parse_serve(argv: list[str], env: dict[str, str], monkeypatch):
    """The CLI's reading of `argv` with exactly these MOESTREAM_* variables set."""
    for key in [k for k in os.environ if k.startswith("MOESTREAM_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return build_parser().parse_args(argv)


def apt_packages(stage: Stage) -> set[str]:
    packages = set()
    for run in stage.all("RUN"):
        for command in run.args.split("&&"):
            words = command.split()
            if words[:2] == ["apt-get", "install"]:
                packages |= {w for w in words[2:] if not w.startswith("-")}
    return packages


def test_multi_stage_with_a_non_root_final_user():
    assert len(STAGES) >= 2
    user = FINAL.last("USER")
    assert user is not None, "the final stage must set USER"
    name = user.args.split(":")[0]
    assert name not in ("root", "0"), user.args
    assert name.isdigit(), "a numeric USER lets Kubernetes' runAsNonRoot verify it"


def test_final_stage_has_no_build_tools():
    assert apt_packages(FINAL) <= RUNTIME_COMPILER_PACKAGES, apt_packages(FINAL)
    assert not [r for r in FINAL.all("RUN") if "pip install" in r.args], "install in the build stage"
    for copy in FINAL.all("COPY"):
        assert copy.args.startswith(f"--from={BUILD.name} "), f"final stage copies from the context: {copy.args}"
    assert not apt_packages(BUILD), "nothing in the build stage needs compiling"


def test_entrypoint_cmd_and_env_make_a_server_listening_on_the_exposed_port(monkeypatch):
    assert FINAL.last("ENTRYPOINT").exec_form() == ["moestream"]
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["moestream"] == "moestream.server.cli:main"
    (exposed,) = [int(p.split("/")[0]) for i in FINAL.all("EXPOSE") for p in i.args.split()]
    image_env = {k: v for k, v in FINAL.env().items() if k.startswith("MOESTREAM_")}
    default = parse_serve(FINAL.last("CMD").exec_form(), image_env, monkeypatch)
    assert default.func.__name__ == "cmd_serve"
    assert (default.host, default.port) == ("0.0.0.0", exposed)
    documented = parse_serve(DOCUMENTED_RUN_ARGS, image_env, monkeypatch)
    assert (documented.model, documented.vram_budget, documented.port) == ("/models/X.gguf", "6GiB", exposed)


def test_models_volume():
    volumes = [v for i in FINAL.all("VOLUME") for v in (i.exec_form() if i.args.startswith("[") else i.args.split())]
    assert "/models" in volumes


class _Loading(BaseHTTPRequestHandler):
    def do_GET(self):  # what /health answers while the model loads
        self.send_response(503)
        self.end_headers()

    def log_message(self, *args):
        pass


def _health_check(port: int) -> int:
    argv = FINAL.last("HEALTHCHECK").exec_form()
    env = {"MOESTREAM_PORT": str(port), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, *argv[1:]], env=env, timeout=30).returncode


def test_healthcheck_is_python_asking_health_on_the_configured_port(live_server: LiveServer):
    argv = FINAL.last("HEALTHCHECK").exec_form()
    assert argv[0] in ("python", "python3") and not {"curl", "wget"} & set(" ".join(argv).split())
    assert "/health" in argv[-1] and "MOESTREAM_PORT" in argv[-1]
    assert _health_check(live_server.port) == 0
    assert _health_check(free_port()) != 0  # nothing listening
    loading = ThreadingHTTPServer(("127.0.0.1", 0), _Loading)
    threading.Thread(target=loading.serve_forever, daemon=True).start()
    try:
        assert _health_check(loading.server_address[1]) != 0
    finally:
        loading.shutdown()


def _copied_sources(stage: Stage) -> list[str]:
    """Context paths COPY'd into a stage (not from another stage)."""
    sources = []
    for copy in stage.all("COPY"):
        words = [w for w in copy.args.split() if not w.startswith("--")]
        if not copy.args.startswith("--from="):
            sources += words[:-1]
    return sources


def test_dockerignore_keeps_what_the_build_copies_and_drops_the_rest():
    patterns = ignore_patterns(REPO_ROOT / ".dockerignore")
    for source in _copied_sources(BUILD):
        assert not is_ignored(source, patterns), source
    for unwanted in ("tests", ".git", ".venv", "bench", "deploy", "kernels/__pycache__/x.cpython-311.pyc"):
        assert is_ignored(unwanted, patterns), unwanted


def test_build_context_gives_a_wheel_with_every_package_file(tmp_path):
    """`pip install .` in the image must get the non-Python files too (C++ sources of the
    CPU kernels, ...): build the wheel from exactly what the build stage copies."""
    if shutil.which("git") is None:
        pytest.skip("git is needed to list the package files")
    patterns = ignore_patterns(REPO_ROOT / ".dockerignore")
    context = tmp_path / "context"
    for source in _copied_sources(BUILD):
        src = REPO_ROOT / source
        if src.is_dir():
            shutil.copytree(src, context / source, ignore=lambda d, names: [
                n for n in names if is_ignored(f"{d}/{n}".removeprefix(f"{REPO_ROOT}/"), patterns)])
        else:
            (context / source).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, context / source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path / "dist"),
                    str(context)], check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("moestream-*.whl")
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", *PACKAGES],
                            cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.split()
    package_files = [f for f in listed if (REPO_ROOT / f).is_file()]
    missing = [f for f in package_files if f"moestream/{f}" not in in_wheel]
    assert package_files and not missing, f"not in the wheel (declare them as package data): {missing}"
