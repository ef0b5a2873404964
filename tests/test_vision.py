"""Vision tower parity, component by component."""

import torch
from reference import reference_model, tiny_config_dict
from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionEmbeddings as RefEmbeddings

from idefics2 import Idefics2VisionConfig
from idefics2.vision import Idefics2VisionTransformer, patch_position_ids


def test_position_ids_match_reference_for_every_grid_size():
    """All valid extents 1..70 on the 8b grid, including the float32 corner cases (n = 25, 49, 50, 55)."""
    ref = RefEmbeddings(type("C", (), dict(hidden_size=4, image_size=980, patch_size=14, num_channels=3))())
    captured = {}
    ref.position_embedding.register_forward_hook(lambda m, args, out: captured.__setitem__("ids", args[0]))
    for n_rows in range(1, 71):
        n_cols = 71 - n_rows
        mask = torch.zeros(2, 70, 70, dtype=torch.bool)
        mask[0, :n_rows, :n_cols] = True
        mask[1, :n_cols, :n_rows] = True
        ref(torch.zeros(2, 3, 980, 980), mask)
        assert torch.equal(patch_position_ids(mask, 70), captured["ids"]), n_rows


def test_vision_tower_matches_reference_with_padding_masks():
    config = tiny_config_dict()
    ref = reference_model(config).model
    ours = Idefics2VisionTransformer(Idefics2VisionConfig.from_dict(config["vision_config"]))
    ours.load_state_dict({k.removeprefix("vision_model."): v for k, v in ref.state_dict().items()
                          if k.startswith("vision_model.")})
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(3, 3, 56, 56, generator=g)
    mask = torch.zeros(3, 4, 4, dtype=torch.bool)
    mask[0] = True
    mask[1, :3, :2] = True
    mask[2, :1, :4] = True
    with torch.no_grad():
        a = ref.vision_model(pixel_values=pixels, patch_attention_mask=mask).last_hidden_state
        b = ours.eval()(pixels, mask)
    valid = mask.reshape(3, -1)
    assert (a[valid] - b[valid]).abs().max() <= 1e-5


def test_inference_overwrites_activations_in_place_but_not_what_hooks_keep():
    """Without autograd, residual sums and activations are written into the tensors they consume (the same values
    as out of place: the tanh GELU's kernel within a few ulp of torch's op); an output a forward hook has seen is
    left alone."""
    from idefics2.layers import overwritable

    torch.manual_seed(0)
    tower = Idefics2VisionTransformer(Idefics2VisionConfig.from_dict(tiny_config_dict()["vision_config"])).eval()
    pixels = torch.rand(2, 3, 56, 56)
    mlp = tower.encoder.layers[0].mlp
    with torch.no_grad():
        assert overwritable(mlp.fc1)
        in_place = tower(pixels)
    out_of_place = tower(pixels)  # autograd on: fresh tensors all the way
    assert out_of_place.requires_grad
    torch.testing.assert_close(in_place, out_of_place.detach(), rtol=1e-5, atol=1e-5)
    kept = []
    handle = mlp.fc1.register_forward_hook(lambda module, args, out: kept.append((out, out.clone())))
    with torch.no_grad():
        assert not overwritable(mlp.fc1)
        torch.testing.assert_close(tower(pixels), out_of_place.detach(), rtol=1e-5, atol=1e-5)
    handle.remove()
    assert torch.equal(*kept[0])  # the hook's tensor was not overwritten by the activation


def test_without_the_activation_kernels_inference_uses_torch_ops(monkeypatch):
    """Where the elementwise kernels do not apply (AVX2 machines, other devices) the in-place inference path
    runs torch's ops: the same features as the autograd path, within rounding of fc1's bias order."""
    from idefics2 import kernels

    calls = []
    monkeypatch.setattr(kernels, "gelu_tanh_", lambda x, bias=None: calls.append(1))  # declines: returns None
    torch.manual_seed(0)
    tower = Idefics2VisionTransformer(Idefics2VisionConfig.from_dict(tiny_config_dict()["vision_config"])).eval()
    pixels = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        in_place = tower(pixels)
    assert len(calls) == len(tower.encoder.layers)  # asked once per MLP, declined each time
    torch.testing.assert_close(in_place, tower(pixels).detach(), rtol=1e-6, atol=1e-6)
