import functools

import pytest

from tests.fixtures.models import get_fixture


@functools.lru_cache(maxsize=None)
def cached_engine(arch: str, quant: str = "F32", **options):
    from moestream.engine import Engine

    return Engine.from_gguf(get_fixture(arch, quant).gguf_path, **options)


@pytest.fixture
def engine_for():
    return cached_engine
