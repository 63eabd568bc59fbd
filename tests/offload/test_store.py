import warnings

import pytest
import torch

from moestream.offload import ExpertSource, HostExpertStore
from tests.offload.tiny_store import F, D, LAYER_TYPES, N_EXPERTS, expected_bytes, part_bytes


def expert_bytes(layer: int) -> int:
    tg, tu, td = LAYER_TYPES[layer]
    return part_bytes(tg, F, D) + part_bytes(tu, F, D) + part_bytes(td, D, F)


def test_sizes_from_gguf_block_table(store):
    assert store.n_layers == 2 and store.layers == (1, 3) and store.n_experts == N_EXPERTS
    assert store.layout(1).expert_bytes == expert_bytes(1)
    assert store.max_expert_bytes == max(expert_bytes(1), expert_bytes(3))


def test_views_are_zero_copy_and_byte_exact(layers, store):
    assert store.host_bytes == 0
    for layer in store.layers:
        for expert in range(N_EXPERTS):
            w = store.weights(layer, expert)
            got = b"".join(part.numpy().tobytes() for part in (w.gate, w.up, w.down))
            assert got == expected_bytes(layers, layer, expert)
            # the view reads the caller's array memory itself
            assert w.gate.data_ptr() == layers[layer][1][expert].ctypes.data


def test_read_only_memmaps_do_not_warn(layers):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HostExpertStore(layers, pinned=False, progress=False)


def test_rejects_wrong_part_size(layers):
    layout, gate, up, down = layers[1]
    with pytest.raises(ValueError, match="layer 1 up"):
        HostExpertStore({1: (layout, gate, up[:, :-1], down)}, pinned=False)


def test_store_is_the_all_resident_source(layers, store):
    assert isinstance(store, ExpertSource)
    got = {e: w.down.numpy().tobytes() for e, w in store.load(3, [4, 0, 4, 2])}
    assert sorted(got) == [0, 2, 4]
    assert got[2] == layers[3][3][2].tobytes()
    store.prefetch(1, [0, 1])
    stats = store.stats()
    assert stats["expert_lookups"] == 3 == stats["expert_hits"]
    assert stats["expert_misses"] == stats["bytes_to_device"] == stats["prefetch_issued"] == 0
    assert list(stats["per_layer"]) == [3]


def test_pinned_store_is_one_blob_per_expert(layers, fake_pinning):
    store = HostExpertStore(layers, pinned=True, progress=False)
    assert store.host_bytes == N_EXPERTS * (expert_bytes(1) + expert_bytes(3))
    for layer in store.layers:
        for expert in range(N_EXPERTS):
            (blob,) = store.blob_parts(layer, expert)
            assert blob.numpy().tobytes() == expected_bytes(layers, layer, expert)
            w = store.weights(layer, expert)
            assert w.up.numpy().tobytes() == layers[layer][2][expert].tobytes()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_pinned_without_cuda_is_refused(layers):
    with pytest.raises(ValueError, match="pinned=False"):
        HostExpertStore(layers, pinned=True)
