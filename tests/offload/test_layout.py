"""The offload layer's expert layout and the grouped kernels' slot layout address the same bytes."""

import torch
from gguf import GGMLQuantizationType as Q

from moestream.offload.layout import ExpertLayout, ExpertWeights, ProjLayout


def test_slot_layout_addresses_the_same_bytes_as_the_blob_views():
    layout = ExpertLayout(ProjLayout.of(Q.Q4_K, 512, 256), ProjLayout.of(Q.Q5_K, 512, 256),
                          ProjLayout.of(Q.Q6_K, 256, 512))
    blob = torch.randint(0, 256, (layout.expert_bytes,), dtype=torch.uint8)
    views = ExpertWeights.from_blob(layout, blob)
    slot = layout.slot_layout()
    assert slot.slot_bytes == layout.expert_bytes
    for view, part in zip((views.gate, views.up, views.down), (slot.gate, slot.up, slot.down)):
        assert torch.equal(blob[part.offset_bytes:part.end_bytes], view)
    assert slot.fused_gate_up is None  # gate and up differ in type: no fused [2I, D] matmul
