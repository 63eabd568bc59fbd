"""Model families whose forward differs from MoEModel's, one file each, keyed by the GGUF
`general.architecture`; every other supported architecture runs MoEModel."""

from __future__ import annotations

from moestream.engine.model import MoEModel
from moestream.engine.models.gptoss import GptOssModel
from moestream.engine.models.qwen35moe import Qwen35MoeModel

FAMILIES: dict[str, type[MoEModel]] = {
    "qwen35moe": Qwen35MoeModel,
    "gpt-oss": GptOssModel,
}


def model_class(arch: str) -> type[MoEModel]:
    return FAMILIES.get(arch, MoEModel)
