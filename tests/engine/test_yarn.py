"""YaRN frequencies and cos/sin scale against transformers' _compute_yarn_parameters, with
and without truncation of the correction range (gpt-oss: without; llama.cpp: always with)."""

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from moestream.engine.yarn import YarnScaling


@pytest.mark.parametrize("truncate", [False, True])
@pytest.mark.parametrize("base, factor, original, head_dim", [
    (150000.0, 32.0, 4096, 64),  # gpt-oss-20b/120b
    (10000.0, 4.0, 2048, 128),
])
def test_matches_transformers(truncate, base, factor, original, head_dim):
    config = transformers.GptOssConfig(
        head_dim=head_dim, rope_parameters={"rope_type": "yarn", "rope_theta": base, "factor": factor,
                                            "beta_fast": 32.0, "beta_slow": 1.0, "truncate": truncate,
                                            "original_max_position_embeddings": original})
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](config, torch.device("cpu"))
    yarn = YarnScaling(factor, original, 32.0, 1.0, 1.0, truncate)
    ours = yarn.inv_freq(head_dim, base, torch.device("cpu"))
    torch.testing.assert_close(ours.float(), inv_freq, rtol=1e-6, atol=0)
    assert yarn.mscale == pytest.approx(attention_factor, rel=1e-12)
    other = YarnScaling(factor, original, 32.0, 1.0, 1.0, not truncate).inv_freq(head_dim, base, torch.device("cpu"))
    assert not torch.allclose(other.float(), inv_freq, rtol=1e-4), "truncation must change the frequencies"
