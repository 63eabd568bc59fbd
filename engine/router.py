"""Top-k expert selection as data: the router of each family is a RouterConfig read from
the GGUF metadata, and one function does what llama.cpp's build_moe_ffn does with it.

llama.cpp: scores are softmax or sigmoid of the router logits (`{arch}.expert_gating_func`,
1 = softmax, 2 = sigmoid); a correction bias (`blk.N.exp_probs_b.bias`, DeepSeek-V3 style)
is added for choosing experts only, the weights are the unbiased scores; experts may first
be narrowed to the best `expert_group_used_count` of `expert_group_count` groups (a group
scored by the sum of its two best experts); the chosen weights are optionally renormalised
(`expert_weights_norm`) and scaled (`expert_weights_scale`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

# llama.cpp clamps the sum of the chosen weights to the smallest normal fp16 before dividing
_MIN_WEIGHT_SUM = 6.103515625e-5


class Gating(Enum):
    """llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE values (0 = unset: the arch's default)."""

    SOFTMAX = 1
    SIGMOID = 2


@dataclass(frozen=True)
class RouterConfig:
    gating: Gating
    n_experts_used: int
    norm_topk: bool  # renormalise the k chosen weights to sum to 1
    weights_scale: float = 1.0  # multiplies the chosen weights (routed_scaling_factor)
    n_groups: int = 1  # expert groups; 1: no grouped selection
    n_groups_used: int = 1  # groups a token may choose experts from

    def __post_init__(self) -> None:
        assert self.n_experts_used >= 1 and self.weights_scale > 0
        assert 1 <= self.n_groups_used <= self.n_groups


def select_experts(logits: torch.Tensor, correction_bias: torch.Tensor | None,
                   router: RouterConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ids [T, k] and their weights [T, k] (float32) from router logits [T, E]."""
    logits = logits.float()
    if router.gating is Gating.SOFTMAX:
        probs = torch.softmax(logits, dim=-1)
    else:
        probs = torch.sigmoid(logits)
    choice = probs if correction_bias is None else probs + correction_bias.float()
    if router.n_groups > 1:
        choice = _best_groups_only(choice, router.n_groups, router.n_groups_used)
    ids = choice.topk(router.n_experts_used, dim=-1).indices
    weights = probs.gather(-1, ids)
    if router.norm_topk:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(_MIN_WEIGHT_SUM)
    if router.weights_scale != 1.0:
        weights = weights * router.weights_scale
    return ids, weights


def _best_groups_only(scores: torch.Tensor, n_groups: int, n_used: int) -> torch.Tensor:
    """scores [T, E] with the experts outside each token's best `n_used` groups at -inf."""
    T, E = scores.shape
    grouped = scores.view(T, n_groups, E // n_groups)  # [T, G, E/G]
    group_scores = grouped.topk(min(2, E // n_groups), dim=-1).values.sum(-1)  # [T, G]
    best = group_scores.topk(n_used, dim=-1).indices  # [T, n_used]
    keep = torch.zeros(T, n_groups, dtype=torch.bool, device=scores.device).scatter_(1, best, True)
    return grouped.masked_fill(~keep[..., None], float("-inf")).view(T, E)
