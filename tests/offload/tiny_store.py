"""A tiny expert store of random bytes: two MoE layers with different quant mixes (as Q4_K_M
mixes types per layer), so slot size is the larger layer's expert and offsets differ."""

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from moestream.offload import ExpertLayout, ProjLayout

N_EXPERTS = 6
D, F = 256, 512  # hidden, expert FFN width (multiples of the 256-element K super-block)
LAYER_TYPES = {1: (Q.Q4_K, Q.Q4_K, Q.Q6_K), 3: (Q.Q8_0, Q.Q8_0, Q.Q4_0)}


def part_bytes(qtype: Q, rows: int, cols: int) -> int:
    """Independent of kernels/: straight from gguf's block table."""
    block, size = GGML_QUANT_SIZES[qtype]
    return rows * cols // block * size


def make_layers(seed: int = 0) -> dict[int, tuple]:
    rng = np.random.default_rng(seed)
    layers = {}
    for layer, (tg, tu, td) in LAYER_TYPES.items():
        layout = ExpertLayout(ProjLayout.of(tg, F, D), ProjLayout.of(tu, F, D),
                              ProjLayout.of(td, D, F))
        arrays = [rng.integers(0, 256, (N_EXPERTS, p.nbytes), dtype=np.uint8)
                  for p in (layout.gate, layout.up, layout.down)]
        for array in arrays:
            array.setflags(write=False)  # as GGUFReader's memory maps are
        layers[layer] = (layout, *arrays)
    return layers


def expected_bytes(layers: dict[int, tuple], layer: int, expert: int) -> bytes:
    """gate | up | down of one expert, from the original arrays."""
    _, gate, up, down = layers[layer]
    return gate[expert].tobytes() + up[expert].tobytes() + down[expert].tobytes()
