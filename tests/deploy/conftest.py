from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.deploy.live import SERVED_MODEL_NAME, LiveServer, start_server


@pytest.fixture(scope="session")
def live_server(tmp_path_factory) -> Iterator[LiveServer]:
    """`moestream serve --demo` with a budget and an expert cache of 8 of its 64 experts,
    so the placement and expert cache metrics exist and move."""
    server = start_server(tmp_path_factory.mktemp("server"), [
        "--demo", "--served-model-name", SERVED_MODEL_NAME, "--vram-budget", "1GiB",
        "--max-cached-experts", "8", "--ctx-size", "512", "--max-batch", "4"])
    yield server
    server.process.stop()
