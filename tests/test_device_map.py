"""device_map dicts spreading a model over several places: per-parameter placement ("cpu" = memory of its own,
"disk" = a view of a file mapping), outputs and generated ids identical to the plain model, one-line errors.

CUDA entries cannot run here (CPU-only CI); the offload hooks are exercised with the meta device standing in
for a GPU."""

import os

import pytest
import torch
from reference import left_pad, make_prompt, pad_images, tiny_config_dict
from torch import nn

import idefics2.checkpoint as checkpoint
from idefics2 import Idefics2ForConditionalGeneration
from idefics2.config import Idefics2Config
from idefics2.dispatch import covering_key, dispatch_model

CONFIG = tiny_config_dict()
MIXED = {
    "model.vision_model": "cpu",
    "model.connector": "disk",
    "model.text_model.embed_tokens": "disk",
    "model.text_model.layers.0": "cpu",
    "model.text_model.layers.1": "disk",
    "model.text_model.norm": "cpu",
    "model.text_model.rotary_emb": "cpu",
    "lm_head": "disk",
}

# A ModuleList key, and the rotary embedding (no parameters) left to the main device.
BY_LIST = {"model.vision_model": "disk", "model.connector": "cpu", "model.text_model.embed_tokens": "cpu",
           "model.text_model.layers": "disk", "model.text_model.norm": "disk", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("device_map")
    torch.manual_seed(5)
    model = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(CONFIG))
    with torch.no_grad():
        for name, p in model.named_parameters():  # norms start at 1, latents at 1: make a misplacement show
            if p.dim() == 1 or name.endswith("latents"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return path


def batch_inputs():
    g = torch.Generator().manual_seed(1)
    ids, mask = left_pad([make_prompt(g, CONFIG, 1, 5), make_prompt(g, CONFIG, 2, 3)])
    pixels, pixel_mask = pad_images(g, [[(56, 42)], [(28, 56), (42, 42)]])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, pixel_attention_mask=pixel_mask)


def file_mappings(path) -> list[tuple[int, int]]:
    """Address ranges where this process maps `path` (from /proc/self/maps)."""
    target = os.path.realpath(path)
    ranges = []
    with open("/proc/self/maps", encoding="utf-8") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == target:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def in_mapping(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    begin = tensor.data_ptr()
    end = begin + tensor.numel() * tensor.element_size()
    return any(start <= begin and end <= stop for start, stop in ranges)


def assert_placed(model, device_map, mapped_files):
    ranges = [r for path in mapped_files for r in file_mappings(path)]
    assert ranges, "the weight files should be mapped"
    for name, param in model.named_parameters():
        where = device_map[covering_key(name, device_map)]
        assert param.device.type == "cpu", name
        if where == "disk":  # read through the file mapping, never copied into memory of its own
            assert in_mapping(param, ranges) and not param.untyped_storage().resizable(), name
        else:  # "cpu": loaded into memory that torch allocated
            assert not in_mapping(param, ranges) and param.untyped_storage().resizable(), name


needs_proc_maps = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc/self/maps")


@needs_proc_maps
@pytest.mark.parametrize("device_map", [MIXED, BY_LIST], ids=["mixed", "by_list"])
def test_cpu_and_disk_entries_are_placed_per_parameter_and_outputs_are_exact(ckpt, device_map):
    plain = Idefics2ForConditionalGeneration.from_pretrained(ckpt)
    spread = Idefics2ForConditionalGeneration.from_pretrained(ckpt, device_map=device_map)
    assert spread.hf_device_map == device_map and spread.device == torch.device("cpu")
    assert_placed(spread, device_map, [ckpt / "model.safetensors"])

    inputs = batch_inputs()
    with torch.no_grad():
        expected, got = plain(**inputs), spread(**inputs)
    assert torch.equal(got.logits, expected.logits)
    assert torch.equal(got.image_hidden_states, expected.image_hidden_states)
    for kwargs in (dict(max_new_tokens=6), dict(max_new_tokens=4, num_beams=2)):
        ids = spread.generate(**inputs, **kwargs)
        assert torch.equal(ids, plain.generate(**inputs, **kwargs)), kwargs
    # Generating left the weights where they were.
    assert_placed(spread, device_map, [ckpt / "model.safetensors"])


@needs_proc_maps
def test_converted_disk_weights_are_written_to_offload_folder_and_mapped(ckpt, tmp_path):
    with pytest.raises(ValueError, match=r"^device_map\['model.connector'\] = 'disk' needs offload_folder=DIR"):
        Idefics2ForConditionalGeneration.from_pretrained(ckpt, device_map=MIXED, dtype=torch.bfloat16)
    folder = tmp_path / "offload"
    spread = Idefics2ForConditionalGeneration.from_pretrained(ckpt, device_map=MIXED, dtype=torch.bfloat16,
                                                               offload_folder=folder)
    written = sorted(folder.iterdir())
    assert [p.name for p in written] == ["idefics2-offload-00001.safetensors"]
    assert spread.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in spread.parameters())
    assert_placed(spread, MIXED, written)

    plain = Idefics2ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.bfloat16)
    inputs = batch_inputs()
    with torch.no_grad():
        assert torch.equal(spread(**inputs).logits, plain(**inputs).logits)
    assert torch.equal(spread.generate(**inputs, max_new_tokens=5), plain.generate(**inputs, max_new_tokens=5))


BAD_MAPS = [
    ({"model": "cpu", "lm_head": "gpu"}, {}, r"^device_map\['lm_head'\] = 'gpu' is not a device; use 'cpu', 'disk'"),
    ({"model": "auto", "lm_head": "cpu"}, {}, r"^device_map\['model'\] = 'auto' is not a device"),
    ({"model": "disk", "lm_head": "cuda:x"}, {}, r"^device_map\['lm_head'\] = 'cuda:x' is not a device"),
    ({"model": "cpu", "lm_head": "disk", "model.decoder": "cpu"}, {},
     r"^device_map names modules the model does not have: \['model.decoder'\]$"),
    ({"model.vision_model": "cpu", "model.connector": "disk", "model.text_model": "cpu"}, {},
     r"^device_map leaves parameters without a device: lm_head.weight$"),
    ({"": "cpu", "model.text_model.layers.0.mlp": "disk"}, {},
     r"^device_map\['model.text_model.layers.0.mlp'\] splits 'model.text_model.layers.0' \(MistralDecoderLayer\)"),
    ({"": "cpu", "model.connector.modality_projection.up_proj": "disk"}, {},
     r"splits 'model.connector.modality_projection' \(GatedMLP\)"),
    ({"model": "cpu", "lm_head": "disk"}, {"quantize": "int8"}, r"cannot be combined with quantization"),
]


@pytest.mark.parametrize("device_map, kwargs, message", BAD_MAPS)
def test_bad_device_maps_are_one_line_errors_naming_the_key(ckpt, device_map, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        Idefics2ForConditionalGeneration.from_pretrained(ckpt, device_map=device_map, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a CPU-only machine")
def test_cuda_entries_without_cuda_and_auto_on_a_cpu_only_machine(ckpt):
    with pytest.raises(ValueError, match=r"^device_map\['lm_head'\] = 'cuda:0' asks for CUDA but no CUDA device is "
                                         r"available; the weights need .* GiB in float32") as info:
        Idefics2ForConditionalGeneration.from_pretrained(ckpt, device_map={"model": "disk", "lm_head": "cuda:0"})
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"^device_map\['model'\] = 'cuda:1' asks for CUDA"):
        Idefics2ForConditionalGeneration.from_pretrained(ckpt, device_map={"model": 1, "lm_head": "cpu"})
    model = Idefics2ForConditionalGeneration.from_pretrained(ckpt, device_map="auto")
    assert model.device == torch.device("cpu") and not hasattr(model, "hf_device_map")


def test_spread_maps_that_do_not_fit_fail_early_with_the_estimate(ckpt, monkeypatch):
    lm_head_bytes = CONFIG["text_config"]["vocab_size"] * CONFIG["text_config"]["hidden_size"] * 4
    placement = {"model": "disk", "lm_head": "cpu"}
    monkeypatch.setattr(checkpoint, "available_memory", lambda: lm_head_bytes - 1)
    with pytest.raises(MemoryError, match=r"^device_map puts 0.00 GiB of weights on 'cpu' \('lm_head'\) but 0.00 GiB "
                                          r"are free there; the weights need .* GiB in float32; try quantize="):
        Idefics2ForConditionalGeneration.from_pretrained(ckpt, device_map=placement)
    # Only the "cpu" part needs memory of its own: the "disk" part stays in the file mapping.
    monkeypatch.setattr(checkpoint, "available_memory", lambda: lm_head_bytes)
    model = Idefics2ForConditionalGeneration.from_pretrained(ckpt, device_map=placement)
    assert model.num_parameters() * 4 > 10 * lm_head_bytes


def test_offloaded_weights_are_copied_to_the_execution_device_for_the_call_only():
    """A "cpu" entry next to a GPU main device: the meta device stands in for the GPU."""
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    net[2].to("meta")
    original = net[0].weight
    dispatch_model(net, {"0": "cpu", "1": "cpu", "2": "meta"})  # main device: the first non-offload one
    assert net.hf_device_map == {"0": "cpu", "1": "cpu", "2": "meta"}

    out = net(torch.ones(5, 4))  # a CPU input goes to meta; layer 0 runs there on a copy of its weights
    assert out.device.type == "meta" and out.shape == (5, 2)
    assert net[0].weight is original and original.device.type == "cpu"
    with pytest.raises(RuntimeError):
        net(torch.ones(5, 7))  # fails inside layer 0, after its weights were copied
    net(torch.ones(1, 4))
    assert net[0].weight is original  # the next call put the original back


# ---- planned maps: device_map="auto" / "balanced" / "sequential" with max_memory ------------------------------
GIB = 2**30


def skeleton():
    from idefics2.modeling import empty_weights

    with empty_weights():
        return Idefics2ForConditionalGeneration(Idefics2Config.from_dict(CONFIG))


def covers_every_parameter_once(model, device_map):
    for name, _ in model.named_parameters():
        assert covering_key(name, device_map) is not None, name


def test_plan_balances_gpus_then_spills_to_cpu_then_disk():
    from idefics2.dispatch import placement_units, plan_device_map

    model = skeleton()
    units = placement_units(model, torch.float32)
    total = sum(size for _, size in units)
    assert total == sum(p.numel() * 4 for p in model.parameters())  # every parameter in exactly one unit
    assert units[0][0] == "model.vision_model.embeddings" and units[-1][0] == "lm_head"
    # Two GPUs with room for everything: balanced shares them (neither holds more than half + one unit) ...
    plan = plan_device_map(model, torch.float32, [("cuda:0", 10 * GIB), ("cuda:1", 10 * GIB), ("cpu", None)])
    covers_every_parameter_once(model, plan)
    per_device = {}
    for name, size in units:
        device = plan[covering_key(name, plan)]
        per_device[device] = per_device.get(device, 0) + size
    biggest = max(size for _, size in units)
    assert set(per_device) == {"cuda:0", "cuda:1"} and max(per_device.values()) <= total / 2 + biggest
    # ... in forward order: the first GPU runs the vision tower, the last one lm_head.
    assert plan["model.vision_model"] == "cuda:0" and plan["lm_head"] == "cuda:1"
    # sequential fills the first GPU: the whole model in one key.
    assert plan_device_map(model, torch.float32, [("cuda:0", 10 * GIB), ("cuda:1", 10 * GIB)], balanced=False) \
        == {"": "cuda:0"}
    # Too little room: GPU, then CPU, then disk, in that order along the forward pass.
    plan = plan_device_map(model, torch.float32, [("cuda:0", total // 3), ("cpu", total // 3), ("disk", None)])
    order = [plan[covering_key(name, plan)] for name, _ in units]
    assert order == sorted(order, key=["cuda:0", "cpu", "disk"].index) and set(order) == {"cuda:0", "cpu", "disk"}
    with pytest.raises(MemoryError, match=r"do not fit the room given \(cuda:0: .* GiB, cpu: .* GiB\); .* finds no "
                                          r"place: raise max_memory, allow 'disk' with offload_folder=, or quantize"):
        plan_device_map(model, torch.float32, [("cuda:0", total // 3), ("cpu", total // 3)])


def test_max_memory_sizes_and_errors():
    from idefics2.checkpoint import parse_max_memory

    assert parse_max_memory({0: "2GiB", "cuda:1": 1000, "cpu": "1.5 GB", "disk": "10MiB"}) == {
        "cuda:0": 2 * GIB, "cuda:1": 1000, "cpu": 1_500_000_000, "disk": 10 * 2**20}
    with pytest.raises(ValueError, match=r"max_memory\['cpu'\] = 'lots' is not a size"):
        parse_max_memory({"cpu": "lots"})
    with pytest.raises(ValueError, match=r"max_memory key 'gpu' is not a device"):
        parse_max_memory({"gpu": 10})


@pytest.fixture
def no_gpu(monkeypatch):
    """The planned-map tests describe a machine without GPUs (with one, "auto" would put everything there)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@needs_proc_maps
def test_auto_with_max_memory_spreads_over_cpu_and_disk(ckpt, no_gpu):
    plain = Idefics2ForConditionalGeneration.from_pretrained(ckpt)
    total = sum(p.numel() * p.element_size() for p in plain.parameters())
    spread = Idefics2ForConditionalGeneration.from_pretrained(ckpt, device_map="auto",
                                                               max_memory={"cpu": total // 2})
    device_map = spread.hf_device_map
    assert set(device_map.values()) == {"cpu", "disk"} and device_map["model.vision_model"] == "cpu"
    assert_placed(spread, device_map, [ckpt / "model.safetensors"])
    in_ram = sum(p.numel() * p.element_size() for p in spread.parameters() if p.untyped_storage().resizable())
    assert 0 < in_ram <= total // 2
    inputs = batch_inputs()
    with torch.no_grad():
        assert torch.equal(spread(**inputs).logits, plain(**inputs).logits)
    assert torch.equal(spread.generate(**inputs, max_new_tokens=5), plain.generate(**inputs, max_new_tokens=5))
    # "auto" alone on a machine without GPUs is the CPU, as before.
    assert not hasattr(Idefics2ForConditionalGeneration.from_pretrained(ckpt, device_map="auto"), "hf_device_map")


@pytest.mark.parametrize("kwargs, message", [
    (dict(device_map="cpu", max_memory={"cpu": "1GiB"}),
     r"max_memory= goes with device_map='auto', 'balanced' or 'sequential', not 'cpu'"),
    (dict(device_map="auto", max_memory={"cpu": "1GiB"}, quantize="int8"), r"cannot be combined with quantization"),
    (dict(device_map="balanced", max_memory={"cuda:3": "1GiB"}), r"max_memory names cuda:3 but \d+ CUDA device"),
    (dict(device_map="sequential", max_memory={"cpu": 1000}, dtype=torch.bfloat16),
     r"finds no place: raise max_memory, allow 'disk' with offload_folder=, or quantize"),
])
def test_planned_map_errors(ckpt, kwargs, message, no_gpu):
    with pytest.raises((ValueError, MemoryError), match=message):
        Idefics2ForConditionalGeneration.from_pretrained(ckpt, **kwargs)
