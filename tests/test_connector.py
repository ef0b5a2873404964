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


def test_gated_mlp_inference_with_and_without_the_silu_kernel(monkeypatch):
    """GatedMLP at inference: silu(gate) * up through the one-pass kernel where it applies, through torch's
    in-place ops where it declines; both equal the autograd path's out-of-place ops."""
    from idefics2 import kernels
    from idefics2.layers import GatedMLP

    torch.manual_seed(0)
    mlp = GatedMLP(32, 80, 24, "silu").eval()
    x = torch.randn(3, 37, 32)
    reference = mlp(x).detach()  # autograd on: F.silu(gate) * up
    with torch.no_grad():
        fused = mlp(x)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
    calls = []
    monkeypatch.setattr(kernels, "silu_mul_", lambda gate, up: calls.append(1))  # declines: returns None
    with torch.no_grad():
        assert torch.equal(mlp(x), reference)  # torch's silu_ and mul_: the same bits as out of place
    assert calls == [1]
