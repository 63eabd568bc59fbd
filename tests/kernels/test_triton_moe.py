"""Grouped MoE matmul and expert FFN over shuffled cache slots vs per-expert gguf references.

Slots not holding a routed expert are filled with 0xFF bytes (NaN fp16 scales), so reading
the wrong slot or offset turns the output into NaN and fails the check.
"""

from dataclasses import dataclass

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from moestream.kernels.expert_layout import SlotLayout, SlotTensor
from moestream.kernels.formats import random_blocks
from moestream.kernels.moe_align import moe_align_block_size
from moestream.kernels.moe_ffn import moe_ffn
from moestream.kernels.dispatch import grouped_qmatmul
from moestream.kernels.triton_moe import GroupedConfig, moe_block_m, triton_grouped_qmatmul
from tests.kernels.triton_helpers import activations, assert_matches, poisoned


@dataclass
class Slots:
    buffer: torch.Tensor  # uint8 [n_slots, slot_bytes]
    slot_of_expert: torch.Tensor  # int32 [n_experts]

    def weight(self, expert: int, t: SlotTensor) -> np.ndarray:
        """Expert's W as float64, decoded by gguf from the bytes in its slot."""
        raw = self.buffer[int(self.slot_of_expert[expert]), t.offset_bytes : t.end_bytes]
        return gguf.quants.dequantize(raw.numpy().reshape(t.shape[0], -1), t.qtype).astype(np.float64)


def _fill_slots(tensors: list[SlotTensor], n_experts: int, n_slots: int, gen: torch.Generator) -> Slots:
    slot_bytes = max(t.end_bytes for t in tensors) + 5
    buffer = torch.full((n_slots, slot_bytes), 0xFF, dtype=torch.uint8)
    slot_of_expert = torch.randperm(n_slots, generator=gen)[:n_experts].to(torch.int32)
    for slot in slot_of_expert.tolist():
        for t in tensors:
            n_blocks = t.nbytes // gguf.GGML_QUANT_SIZES[t.qtype][1]
            buffer[slot, t.offset_bytes : t.end_bytes] = random_blocks(t.qtype, n_blocks, gen).reshape(-1)
    return Slots(buffer, slot_of_expert)


def _routing(n_tokens: int, top_k: int, n_experts: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.stack([torch.randperm(n_experts, generator=gen)[:top_k] for _ in range(n_tokens)])
    return ids, torch.rand(n_tokens, top_k, generator=gen)


GROUPED_CASES = [  # qtype, offset, tokens, top_k, experts, x per pair, routed weights, dtype, BLOCK_K, K
    (Q.Q4_K, 0, 5, 2, 6, False, True, torch.float16, 256, 256),
    (Q.Q6_K, 210, 16, 4, 8, True, False, torch.float32, 128, 256),
    (Q.Q8_0, 7, 3, 2, 4, False, True, torch.float32, 64, 256),  # an odd byte offset inside the slot
    (Q.IQ3_S, 110, 4, 2, 3, True, True, torch.float16, 256, 256),
    # The 32-block and float types at odd (or, for F32, not 4-aligned) offsets, K ending
    # inside a tile (352 = 256 + 96 columns, as Qwen1.5-MoE's 1408-wide Q5_0 down projections)
    (Q.Q5_0, 11, 5, 2, 6, False, True, torch.float16, 256, 352),
    (Q.Q4_0, 3, 4, 2, 4, True, True, torch.float32, 128, 352),
    (Q.Q4_1, 22, 3, 2, 4, False, False, torch.float32, 256, 288),
    (Q.Q5_1, 5, 4, 2, 4, False, True, torch.float16, 64, 256),
    (Q.IQ4_NL, 9, 4, 2, 4, True, True, torch.float32, 256, 352),
    (Q.F16, 1, 4, 2, 4, False, True, torch.float16, 256, 200),
    (Q.BF16, 3, 4, 2, 4, True, False, torch.float32, 64, 200),
    (Q.F32, 6, 4, 2, 4, False, True, torch.float32, 128, 200),
    (Q.IQ1_S, 50, 4, 2, 4, True, True, torch.float32, 128, 256),
    (Q.IQ1_M, 1, 4, 2, 4, False, True, torch.float16, 64, 256),
    (Q.MXFP4, 7, 4, 2, 4, True, True, torch.float32, 256, 352),
]


@pytest.mark.parametrize("qtype, offset, n_tokens, top_k, n_experts, per_pair, weighted, dtype, block_k, k",
                         GROUPED_CASES, ids=lambda v: v.name if isinstance(v, Q) else None)
def test_grouped_matches_per_expert(qtype, offset, n_tokens, top_k, n_experts, per_pair, weighted, dtype,
                                    block_k, k, device) -> None:
    gen = torch.Generator().manual_seed(offset + n_tokens)
    weight = SlotTensor(offset, qtype, (64, k))
    slots = _fill_slots([weight], n_experts, n_experts + 3, gen)
    topk_ids, topk_weights = _routing(n_tokens, top_k, n_experts, gen)
    x = activations(n_tokens * top_k if per_pair else n_tokens, k, dtype, gen)
    routed = topk_weights if weighted else None

    expected = np.empty((n_tokens, top_k, 64))
    for t in range(n_tokens):
        for j in range(top_k):
            row = x[t * top_k + j if per_pair else t].double().numpy()
            scale = topk_weights[t, j].item() if weighted else 1.0
            expected[t, j] = scale * (slots.weight(int(topk_ids[t, j]), weight) @ row)

    n_pairs = n_tokens * top_k
    x, buffer, slot_of_expert, topk_ids = (t.to(device) for t in (x, slots.buffer, slots.slot_of_expert, topk_ids))
    routed = None if routed is None else routed.to(device)
    alignment = moe_align_block_size(topk_ids, n_experts, moe_block_m(n_pairs, n_experts))
    out = triton_grouped_qmatmul(x, buffer, slot_of_expert, weight, alignment, routed,
                                 GroupedConfig(block_n=64, block_k=block_k),
                                 out=poisoned((n_pairs, 64), dtype, device))
    assert_matches(out.view(n_tokens, top_k, 64), expected, dtype)
    args = (x, buffer, slot_of_expert, weight, topk_ids, routed)
    assert_matches(grouped_qmatmul(*args, backend="triton"), expected, dtype)
    assert_matches(grouped_qmatmul(*args, backend="torch"), expected, dtype)


LAYOUTS = {  # name -> (gate type, up type, down type, up offset past gate's end, I)
    "fused-gate-up": (Q.Q4_K, Q.Q4_K, Q.Q6_K, 0, 256),  # gate|up back to back: one [2I, D] matmul
    "separate-gate-up": (Q.Q5_K, Q.IQ4_XS, Q.Q6_K, 64, 256),
    # Qwen1.5-MoE Q4_K_M: Q5_0 down projections, K = I ends inside a 256-column tile
    "q5_0-down": (Q.Q4_K, Q.Q4_K, Q.Q5_0, 0, 352),
}


def _layout(name: str) -> SlotLayout:
    gate_type, up_type, down_type, gap, inter = LAYOUTS[name]
    hidden = 256
    gate = SlotTensor(0, gate_type, (inter, hidden))
    up = SlotTensor(gate.end_bytes + gap, up_type, (inter, hidden))
    return SlotLayout(gate, up, SlotTensor(up.end_bytes, down_type, (hidden, inter)))


@pytest.mark.parametrize("name", LAYOUTS)
def test_moe_ffn_matches_numpy(name: str, device) -> None:
    gen = torch.Generator().manual_seed(len(name))
    layout = _layout(name)
    assert (layout.fused_gate_up is not None) == (LAYOUTS[name][3] == 0)
    n_experts, n_tokens, top_k = 4, 3, 2
    slots = _fill_slots([layout.gate, layout.up, layout.down], n_experts, 6, gen)
    topk_ids, topk_weights = _routing(n_tokens, top_k, n_experts, gen)
    x = activations(n_tokens, 256, torch.float32, gen)

    expected = np.zeros((n_tokens, 256))
    for t in range(n_tokens):
        row = x[t].double().numpy()
        for j in range(top_k):
            e = int(topk_ids[t, j])
            gate, up = slots.weight(e, layout.gate) @ row, slots.weight(e, layout.up) @ row
            hidden = gate / (1 + np.exp(-gate)) * up
            expected[t] += topk_weights[t, j].item() * (slots.weight(e, layout.down) @ hidden)

    on_device = (t.to(device) for t in (x, slots.buffer, slots.slot_of_expert, topk_ids, topk_weights))
    x, buffer, slot_of_expert, topk_ids, topk_weights = on_device
    for backend in ("triton", "torch"):
        y = moe_ffn(x, buffer, slot_of_expert, layout, topk_ids, topk_weights, backend=backend)
        assert_matches(y, expected, torch.float32)


def _grouped_args(**change) -> dict:
    weight = SlotTensor(0, Q.Q4_K, (64, 256))
    args = dict(
        x=torch.zeros(3, 256), slot_buffer=torch.zeros(4, weight.nbytes, dtype=torch.uint8),
        slot_of_expert=torch.arange(4, dtype=torch.int32), weight=weight,
        topk_ids=torch.zeros(3, 2, dtype=torch.int64), topk_weights=None,
    )
    return {**args, **change}


@pytest.mark.parametrize("change, match", [
    (dict(x=torch.zeros(4, 256)), "one row per token"),
    (dict(slot_buffer=torch.zeros(4, 100, dtype=torch.uint8)), "slots hold 100"),
    (dict(slot_of_expert=torch.arange(4.0)), "slot_of_expert"),
    (dict(topk_weights=torch.ones(3, 1)), "topk_weights"),
    (dict(alignment=moe_align_block_size(torch.zeros(2, 2, dtype=torch.int64), 4, 16)), "covers 4 pairs"),
])
def test_grouped_rejects_bad_arguments(change, match) -> None:
    with pytest.raises(ValueError, match=match):
        grouped_qmatmul(**_grouped_args(**change), backend="triton")
