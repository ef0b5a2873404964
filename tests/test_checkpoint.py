"""Checkpoint I/O: both directions with transformers, shards, dtypes, old key names, and clear errors."""

import json
import os

import pytest
import torch
from reference import make_prompt, reference_model, tiny_config_dict
from safetensors.torch import load_file, save_file
from transformers import Idefics2ForConditionalGeneration as RefModel

from idefics2 import CheckpointError, Idefics2ForConditionalGeneration, Idefics2Model
from idefics2.checkpoint import read_safetensors

CONFIG = tiny_config_dict()


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref")
    reference_model(CONFIG, seed=3).save_pretrained(path)
    return path


def sample_inputs():
    g = torch.Generator().manual_seed(0)
    ids = make_prompt(g, CONFIG, 1, 7)[None]
    return dict(input_ids=ids, pixel_values=torch.rand(1, 1, 3, 56, 42, generator=g))


def logits(model):
    with torch.no_grad():
        return model(**sample_inputs()).logits


def test_our_checkpoint_loads_in_transformers_with_identical_logits(ref_dir, tmp_path):
    ours = Idefics2ForConditionalGeneration.from_pretrained(ref_dir)
    ours.save_pretrained(tmp_path)
    back = RefModel.from_pretrained(tmp_path).eval()
    # Bit-identical weights give bit-identical reference logits; ours agree to 1e-5 (our small-batch
    # matmul kernel rounds differently from MKL).
    assert torch.equal(logits(back), logits(RefModel.from_pretrained(ref_dir).eval()))
    assert (logits(back) - logits(ours)).abs().max() <= 1e-5


def test_sharded_checkpoints_both_ways(ref_dir, tmp_path):
    ours = Idefics2ForConditionalGeneration.from_pretrained(ref_dir)
    ours.save_pretrained(tmp_path / "ours", max_shard_size="100KB")
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 3 and not (tmp_path / "ours" / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in ours.state_dict().values())
    reloaded = Idefics2ForConditionalGeneration.from_pretrained(tmp_path / "ours")
    assert torch.equal(logits(reloaded), logits(ours))
    assert (logits(RefModel.from_pretrained(tmp_path / "ours").eval()) - logits(ours)).abs().max() <= 1e-5

    RefModel.from_pretrained(ref_dir).save_pretrained(tmp_path / "ref", max_shard_size="100KB")
    assert (tmp_path / "ref" / "model.safetensors.index.json").exists()
    assert torch.equal(logits(Idefics2ForConditionalGeneration.from_pretrained(tmp_path / "ref")), logits(ours))


def test_bf16_checkpoint_loads_as_bf16_and_as_fp32(tmp_path):
    reference_model(CONFIG, seed=4, dtype=torch.bfloat16).save_pretrained(tmp_path)
    stored = load_file(str(tmp_path / "model.safetensors"))
    auto = Idefics2ForConditionalGeneration.from_pretrained(tmp_path)
    assert auto.dtype == torch.bfloat16
    fp32 = Idefics2ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32)
    also = Idefics2ForConditionalGeneration.from_pretrained(tmp_path, torch_dtype="float32")
    assert fp32.dtype == also.dtype == torch.float32
    for name, tensor in fp32.state_dict().items():
        assert torch.equal(tensor, stored[name].float()), name
    assert torch.isfinite(logits(auto)).all()
    ref32 = RefModel.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert (logits(ref32) - logits(fp32)).abs().max() <= 1e-5


def test_weights_are_not_copied_when_dtype_matches(ref_dir):
    """fp32 -> fp32 on CPU: parameters are views of the file mapping, not fresh allocations."""
    model = Idefics2ForConditionalGeneration.from_pretrained(ref_dir)
    mapped = read_safetensors(str(ref_dir / "model.safetensors"))
    # Same bytes, and the parameter storage is exactly the tensor's bytes inside the mapping.
    w = model.lm_head.weight
    assert torch.equal(w, mapped["lm_head.weight"])
    assert w.untyped_storage().nbytes() == w.numel() * w.element_size()
    assert not w.untyped_storage().resizable()  # a buffer-backed storage, not a torch allocation


def test_base_model_and_old_key_layouts(ref_dir, tmp_path):
    state = load_file(str(ref_dir / "model.safetensors"))
    expected = logits(Idefics2ForConditionalGeneration.from_pretrained(ref_dir))

    def write(layout_dir, tensors):
        os.makedirs(layout_dir, exist_ok=True)
        (layout_dir / "config.json").write_text((ref_dir / "config.json").read_text())
        save_file(tensors, str(layout_dir / "model.safetensors"))
        return Idefics2ForConditionalGeneration.from_pretrained(layout_dir)

    # Newer naming of the decoder.
    renamed = {k.replace("model.text_model.", "model.language_model."): v for k, v in state.items()}
    assert torch.equal(logits(write(tmp_path / "v5", renamed)), expected)

    # Original M4 remote-code names, with the added-token rows stored apart.
    n_base = CONFIG["text_config"]["vocab_size"] - 3
    m4 = {}
    for k, v in state.items():
        k2 = (k.replace("model.text_model.layers.", "model.layers.").replace("model.text_model.norm.", "model.norm.")
              .replace("model.connector.", "model."))
        if k == "model.text_model.embed_tokens.weight":
            m4["model.embed_tokens.weight"] = v[:n_base].clone()
            m4["model.embed_tokens.additional_embedding.weight"] = v[n_base:].clone()
        elif k == "lm_head.weight":
            m4["lm_head.linear.weight"] = v[:n_base].clone()
            m4["additional_fc.weight"] = v[n_base:].clone()
        else:
            m4[k2] = v
    m4["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    assert torch.equal(logits(write(tmp_path / "m4", m4)), expected)

    # An Idefics2Model state dict (no `model.` prefix) into the base model.
    no_prefix = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    base_dir = tmp_path / "base"
    os.makedirs(base_dir)
    (base_dir / "config.json").write_text((ref_dir / "config.json").read_text())
    save_file(no_prefix, str(base_dir / "model.safetensors"))
    assert isinstance(Idefics2Model.from_pretrained(base_dir), Idefics2Model)


def test_missing_unexpected_and_misshaped_tensors_are_named(ref_dir, tmp_path):
    state = load_file(str(ref_dir / "model.safetensors"))
    state.pop("model.connector.perceiver_resampler.latents")
    state["model.text_model.norm.weight"] = torch.ones(3)
    state["model.extra.weight"] = torch.ones(1)
    (tmp_path / "config.json").write_text((ref_dir / "config.json").read_text())
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        Idefics2ForConditionalGeneration.from_pretrained(tmp_path)
    message = str(info.value)
    assert "missing tensors: model.connector.perceiver_resampler.latents" in message
    assert "unexpected tensors: model.extra.weight" in message
    assert "model.text_model.norm.weight (checkpoint (3,) vs model (64,)" in message


def test_truncated_and_corrupt_files_are_reported_by_path(ref_dir, tmp_path):
    (tmp_path / "config.json").write_text((ref_dir / "config.json").read_text())
    data = (ref_dir / "model.safetensors").read_bytes()
    target = tmp_path / "model.safetensors"
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{target}.*truncated or corrupt: tensor"):
        Idefics2ForConditionalGeneration.from_pretrained(tmp_path)
    target.write_bytes(data[:4])
    with pytest.raises(CheckpointError, match=rf"{target} is truncated"):
        Idefics2ForConditionalGeneration.from_pretrained(tmp_path)
    target.write_bytes((100).to_bytes(8, "little") + b"{not json" + b" " * 200)
    with pytest.raises(CheckpointError, match=rf"{target} is corrupt: its safetensors header is not valid JSON"):
        Idefics2ForConditionalGeneration.from_pretrained(tmp_path)


def test_missing_config_and_weights(ref_dir, tmp_path):
    with pytest.raises(CheckpointError, match="config.json not found"):
        Idefics2ForConditionalGeneration.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((ref_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="pickle files are never loaded"):
        Idefics2ForConditionalGeneration.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        Idefics2ForConditionalGeneration.from_pretrained(str(tmp_path / "nowhere"))


def test_unreachable_hub_id_says_what_to_do():
    with pytest.raises(CheckpointError, match=r"Could not get model 'HuggingFaceM4/idefics2-8b'.*local directory"):
        Idefics2ForConditionalGeneration.from_pretrained("HuggingFaceM4/idefics2-8b", local_files_only=True)


def test_unsupported_options_are_clear_errors(ref_dir):
    with pytest.raises(NotImplementedError, match="quantization_config"):
        Idefics2ForConditionalGeneration.from_pretrained(ref_dir, quantization_config=object())
    if not torch.cuda.is_available():  # several devices: see tests/test_device_map.py
        with pytest.raises(ValueError, match=r"device_map\['lm_head'\] = 'cuda:0' asks for CUDA"):
            Idefics2ForConditionalGeneration.from_pretrained(ref_dir, device_map={"model": "cpu", "lm_head": "cuda:0"})
    with pytest.raises(ValueError, match="dtype='int3'"):
        Idefics2ForConditionalGeneration.from_pretrained(ref_dir, dtype="int3")
    model = Idefics2ForConditionalGeneration.from_pretrained(ref_dir, device_map="auto", dtype="auto")
    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_device_map_dicts_place_every_parameter_and_impossible_placements_fail_early(ref_dir, monkeypatch):
    placement = {"model.vision_model": "disk", "model.connector": "cpu", "model.text_model": "cpu", "lm_head": "disk"}
    model = Idefics2ForConditionalGeneration.from_pretrained(ref_dir, device_map=placement)
    assert all(p.device.type == "cpu" for p in model.parameters())
    with pytest.raises(ValueError, match="leaves parameters without a device: lm_head.weight"):
        Idefics2ForConditionalGeneration.from_pretrained(ref_dir, device_map={"model": "cpu"})
    with pytest.raises(ValueError, match="does not have: \\['model.decoder'\\]"):
        Idefics2ForConditionalGeneration.from_pretrained(ref_dir, device_map={"": "cpu", "model.decoder": "cpu"})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"no CUDA device.*weights need .* GiB in float32; try quantize='int8'"):
            Idefics2ForConditionalGeneration.from_pretrained(ref_dir, device_map={"": "cuda"})
    import idefics2.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "available_memory", lambda: 1000)
    with pytest.raises(MemoryError, match=r"needs .* GiB but 0.0 GiB are available; .*quantize='int8'"):
        Idefics2ForConditionalGeneration.from_pretrained(ref_dir, dtype=torch.bfloat16)
    Idefics2ForConditionalGeneration.from_pretrained(ref_dir)  # no conversion: the mapped files are enough
