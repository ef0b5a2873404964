"""Connector (modality projection + perceiver resampler) parity."""

import torch
from reference import reference_model, tiny_config_dict

from idefics2 import Idefics2Config
from idefics2.connector import Idefics2Connector


def test_connector_matches_reference_with_masked_context():
    config = tiny_config_dict(perceiver_depth=3, perceiver_heads=4, perceiver_kv_heads=1)
    ref = reference_model(config).model
    ours = Idefics2Connector(Idefics2Config.from_dict(config)).eval()
    ours.load_state_dict({k.removeprefix("connector."): v for k, v in ref.state_dict().items()
                          if k.startswith("connector.")})
    g = torch.Generator().manual_seed(0)
    context = torch.randn(3, 16, 32, generator=g)
    mask = torch.ones(3, 16, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2, :] = False  # no valid patch at all: latents attend only to themselves
    with torch.no_grad():
        a = ref.connector(context, attention_mask=mask)
        b = ours(context, mask)
    assert b.shape == (3, 4, 64)
    assert torch.isfinite(b).all()
    assert (a - b).abs().max() <= 1e-5
