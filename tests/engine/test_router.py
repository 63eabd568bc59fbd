"""Expert selection (engine/router.py) against transformers' routers: Glm4MoeTopkRouter
(sigmoid scores, correction bias, grouped selection, renormalised, scaled) and the softmax
top-k of the Qwen3-MoE / OLMoE blocks; and the RouterConfig read from GGUF metadata."""

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from moestream.engine.config import ModelConfig
from moestream.engine.router import Gating, RouterConfig, select_experts
from moestream.kernels.errors import MoestreamError

N_EXPERTS, D = 16, 32


def _hf_router(n_group: int, topk_group: int, norm: bool, scale: float, seed: int) -> Glm4MoeTopkRouter:
    config = transformers.Glm4MoeConfig(hidden_size=D, n_routed_experts=N_EXPERTS, num_experts_per_tok=4,
                                        n_group=n_group, topk_group=topk_group, norm_topk_prob=norm,
                                        routed_scaling_factor=scale)
    router = Glm4MoeTopkRouter(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(N_EXPERTS, D, generator=g) * 0.3)
        router.e_score_correction_bias.copy_(torch.randn(N_EXPERTS, generator=g) * 0.2)
    return router


def _sorted(ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's (id, weight) pairs ordered by id: HF's top-k is unsorted."""
    order = ids.argsort(dim=-1)
    return ids.gather(-1, order), weights.gather(-1, order)


@pytest.mark.parametrize(("n_group", "topk_group", "norm", "scale"), [
    (1, 1, True, 1.0),  # GLM-4.5: one group, renormalised
    (1, 1, False, 2.5),  # not renormalised, scaled
    (4, 2, True, 1.8),  # DeepSeek-V3 style: the best 2 of 4 groups, then top-k
    (8, 3, False, 1.0),
])
def test_sigmoid_router_matches_transformers(n_group, topk_group, norm, scale):
    hf = _hf_router(n_group, topk_group, norm, scale, seed=n_group + topk_group)
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(7))
    _, hf_weights, hf_ids = hf(x)
    router = RouterConfig(Gating.SIGMOID, n_experts_used=4, norm_topk=norm, weights_scale=scale,
                          n_groups=n_group, n_groups_used=topk_group)
    ids, weights = select_experts(F.linear(x, hf.weight), hf.e_score_correction_bias, router)
    ids, weights = _sorted(ids, weights)
    hf_ids, hf_weights = _sorted(hf_ids, hf_weights)
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(weights, hf_weights, rtol=1e-6, atol=1e-7)


def test_the_correction_bias_chooses_but_does_not_weigh():
    """A large bias on expert 0 puts it in every token's top-k; its weight stays its own score."""
    logits = torch.randn(8, N_EXPERTS, generator=torch.Generator().manual_seed(3))
    bias = torch.zeros(N_EXPERTS)
    bias[0] = 10.0
    router = RouterConfig(Gating.SIGMOID, n_experts_used=2, norm_topk=False)
    ids, weights = select_experts(logits, bias, router)
    assert (ids == 0).any(-1).all()
    torch.testing.assert_close(weights, torch.sigmoid(logits).gather(-1, ids))


@pytest.mark.parametrize("norm", [False, True])
def test_softmax_router_matches_transformers_qwen3_moe(norm):
    config = transformers.Qwen3MoeConfig(hidden_size=D, num_experts=N_EXPERTS, num_experts_per_tok=4,
                                         norm_topk_prob=norm)
    hf = Qwen3MoeTopKRouter(config)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(N_EXPERTS, D, generator=torch.Generator().manual_seed(5)))
    x = torch.randn(30, D, generator=torch.Generator().manual_seed(6))
    _, hf_weights, hf_ids = hf(x)
    ids, weights = select_experts(F.linear(x, hf.weight), None, RouterConfig(Gating.SOFTMAX, 4, norm))
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(weights, hf_weights.float(), rtol=1e-6, atol=1e-7)


_META = {"general.architecture": "qwen3moe", "qwen3moe.block_count": 2, "qwen3moe.embedding_length": 64,
         "qwen3moe.attention.head_count": 4, "qwen3moe.attention.layer_norm_rms_epsilon": 1e-6,
         "qwen3moe.expert_count": 16, "qwen3moe.expert_used_count": 4, "qwen3moe.feed_forward_length": 64}


def _router(**keys) -> RouterConfig:
    meta = {**_META, **{f"qwen3moe.{k}": v for k, v in keys.items()}}
    return ModelConfig.from_metadata(meta, 100, "m.gguf").router


def test_router_config_from_metadata():
    assert _router() == RouterConfig(Gating.SOFTMAX, 4, norm_topk=True)  # qwen3moe's defaults
    got = _router(expert_gating_func=2, expert_weights_norm=False, expert_weights_scale=2.5,
                  expert_group_count=4, expert_group_used_count=2)
    assert got == RouterConfig(Gating.SIGMOID, 4, norm_topk=False, weights_scale=2.5, n_groups=4, n_groups_used=2)


@pytest.mark.parametrize(("keys", "needle"), [
    ({"expert_gating_func": 3}, "qwen3moe.expert_gating_func = 3"),
    ({"expert_group_count": 5}, "qwen3moe.expert_group_count = 5"),  # 16 experts in 5 groups
    ({"expert_group_count": 8, "expert_group_used_count": 1}, "expert_group_used_count = 1"),  # 2 < top-4
    ({"expert_weights_scale": 0.0}, "qwen3moe.expert_weights_scale = 0.0"),
])
def test_a_bad_router_key_is_refused_naming_it(keys, needle):
    with pytest.raises(MoestreamError) as err:
        _router(**keys)
    assert needle in str(err.value)
