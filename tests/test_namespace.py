"""One import namespace: installed, every module of ours lives under `moestream.`; nothing
lands in site-packages as a bare `kernels`, `engine`, `offload`, `server` or `tools`
(Hugging Face's kernel-hub package is called `kernels`)."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("kernels", "offload", "engine", "tools", "server")
_BARE_IMPORT = re.compile(rf"^\s*(from|import)\s+({'|'.join(LAYERS)})\b", re.MULTILINE)


def _python_sources() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO_ROOT, capture_output=True, text=True,
                            check=True).stdout.split()
    return [REPO_ROOT / f for f in listed if (REPO_ROOT / f).is_file()]


def test_no_source_file_imports_a_layer_by_its_bare_name():
    offenders = [f"{path.relative_to(REPO_ROOT)}: {m.group(0).strip()}"
                 for path in _python_sources() for m in _BARE_IMPORT.finditer(path.read_text())]
    assert offenders == []


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> list[str]:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(REPO_ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = out.glob("moestream-*.whl")
    return zipfile.ZipFile(wheel).namelist()


def test_wheel_holds_only_the_moestream_package(wheel_names):
    top = {name.split("/")[0] for name in wheel_names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"moestream"}
    for layer in LAYERS:
        assert f"moestream/{layer}/__init__.py" in wheel_names
    assert any(re.fullmatch(r"moestream/kernels/cpu/csrc/.+\.cpp", n) for n in wheel_names)


def test_installed_package_imports_under_moestream_only(tmp_path):
    """From a folder outside the checkout (so the repo root is not on sys.path), our layers
    import as moestream.* and no bare layer name resolves to our code."""
    probe = (
        "import importlib.util, pathlib, sys\n"
        "import moestream.server.cli, moestream.tools.synth\n"
        f"repo = pathlib.Path({str(REPO_ROOT)!r})\n"
        f"for name in {LAYERS!r}:\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    origin = spec.origin if spec is not None and spec.origin else ''\n"
        "    assert not origin.startswith(str(repo)), (name, origin)\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
