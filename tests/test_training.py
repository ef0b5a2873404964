"""Fine-tuning (issue #7): label masking, loss parity with transformers, LoRA / full overfit, gradient
checkpointing with adapters, adapter merge, exact resume after SIGKILL, torchrun DDP equivalence, CLI errors."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from idefics2 import Idefics2ForConditionalGeneration, Idefics2Processor, kernels
from idefics2.training import (
    DEFAULT_LORA_TARGET,
    ChatCollator,
    DataError,
    Sample,
    TrainConfig,
    Trainer,
    apply_lora,
    expected_lora_parameters,
    filter_by_length,
    load_jsonl,
    target_positions,
)
from idefics2.training.__main__ import main as training_main

pytest.importorskip("peft")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]


def conversation(color: str) -> dict:
    return {"messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": f"It is {color}."}]},
    ], "images": [f"img/{color}.png"]}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    """The tiny random preset with the real processor files; images resized to 56 px to keep steps fast."""
    from idefics2.cli import copy_processor_files
    from idefics2.presets import write_random_checkpoint

    path = tmp_path_factory.mktemp("tiny")
    write_random_checkpoint("tiny", path)
    copy_processor_files(str(path))
    config_path = path / "preprocessor_config.json"
    config = json.loads(config_path.read_text())
    config.update(do_image_splitting=False, size={"shortest_edge": 56, "longest_edge": 56})
    config_path.write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("data")
    (directory / "img").mkdir()
    with open(directory / "train.jsonl", "w") as handle:
        for i, color in enumerate(COLORS):
            Image.new("RGB", (20 + i, 16), color).save(directory / "img" / f"{color}.png")
            handle.write(json.dumps(conversation(color)) + "\n")
    return str(directory / "train.jsonl")


def run_config(tiny_dir, data_file, out, **kwargs) -> TrainConfig:
    defaults = dict(model=tiny_dir, train_file=data_file, output_dir=str(out), progress=False, max_length=512)
    defaults.update(kwargs)
    return TrainConfig(**defaults)


def losses(path: str) -> dict[int, float]:
    out = {}
    with open(path) as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the line a SIGKILL cut short
                continue
            if "loss" in record:
                out[record["step"]] = record["loss"]  # a resumed run rewrites later steps: keep the last
    return out


# ---- data and masking ------------------------------------------------------------------------------------------
def test_masking_two_turns_system_two_images(tiny_dir):
    processor = Idefics2Processor.from_pretrained(tiny_dir)
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
        {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A blue circle, I think."}]},
    ]
    images = {"a": Image.new("RGB", (30, 20), "red"), "b": Image.new("RGB", (16, 24), "blue")}
    collator = ChatCollator(processor, image_loader=images.__getitem__)
    short = [messages[1], messages[2]]
    batch = collator([Sample(messages, ["a", "b"], 1), Sample(short, ["a"], 2)])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert batch["pixel_values"].shape[:2] == (2, 2)
    assert mask[1, -1] == 0 and mask[0].all()  # right padding
    assert torch.equal(ids, processor(text=[processor.apply_chat_template(m) for m in (messages, short)],
                                      images=[[images["a"], images["b"]], [images["a"]]], padding="longest",
                                      padding_side="right", return_tensors="pt")["input_ids"])

    eou = processor.end_of_utterance_token_id
    for row, conv in ((0, messages), (1, short)):
        rendered = processor.apply_chat_template(conv)
        # Walk the template rendering token by token: the header "Assistant:" opens an assistant turn, its
        # <end_of_utterance> closes it (inclusive). Everything else must be masked.
        tokens = processor.tokenizer.convert_ids_to_tokens(ids[row].tolist())
        expected, in_answer, turns = [], False, []
        for k, (token_id, token) in enumerate(zip(ids[row].tolist(), tokens)):
            if mask[row, k] == 0:
                expected.append(False)
                continue
            expected.append(in_answer and token_id not in (processor.image_token_id, processor.fake_image_token_id))
            if in_answer and token_id == eou:
                in_answer = False
            if token == ":" and k >= 2 and "".join(tokens[k - 2:k]) in ("Assistant", "▁Assistant"):
                in_answer, turns = True, [*turns, k + 1]
        got = (labels[row] != -100).tolist()
        assert got == expected
        assert torch.equal(labels[row][labels[row] != -100], ids[row][labels[row] != -100])
        # The labelled runs decode to exactly the assistant answers (+ <end_of_utterance>) of the rendering.
        answers = [m["content"][0]["text"] for m in conv if m["role"] == "assistant"]
        runs, current = [], []
        for k, keep in enumerate(got):
            if keep:
                current.append(int(ids[row, k]))
            elif current:
                runs.append(current)
                current = []
        assert [processor.decode(r) for r in runs] == [f"{a}<end_of_utterance>" for a in answers]
        for a in answers:
            assert f"Assistant: {a}<end_of_utterance>" in rendered
        assert len(turns) == len(answers)
        kinds = set(ids[row][(labels[row] == -100) & (mask[row] == 1)].tolist())
        assert {processor.image_token_id, processor.fake_image_token_id} <= kinds

    everything = ChatCollator(processor, train_on_all_text=True, image_loader=images.__getitem__)([
        Sample(messages, ["a", "b"], 1)])
    kept = everything["labels"][0] != -100
    assert not kept[0]  # bos
    assert kept[1:].tolist() == [i not in (processor.image_token_id, processor.fake_image_token_id)
                                 for i in ids[0, 1:].tolist()]


def test_bad_lines_reported_with_line_numbers(tmp_path, tiny_dir, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    good = conversation("red") | {"images": ["ok.png"]}
    lines = [
        json.dumps(good),
        json.dumps(good | {"images": ["missing.png"]}),
        json.dumps(good | {"images": []}),
        json.dumps({"messages": [good["messages"][0], {"role": "assistant", "content": [{"type": "text",
                                                                                         "text": " "}]}],
                    "images": ["ok.png"]}),
        "{not json",
    ]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        load_jsonl(str(tmp_path / "bad.jsonl"))
    message = str(info.value)
    assert "4 bad line(s)" in message
    for number, words in ((2, "image '"), (3, "1 image part(s)"), (4, "message 1 is an empty assistant turn"), (5, "")):
        assert f"bad.jsonl:{number}: {words}" in message
    assert "missing.png' does not exist" in message and "bad.jsonl:1:" not in message
    code = training_main(["finetune", "--model", tiny_dir, "--train", str(tmp_path / "bad.jsonl"), "--output",
                          str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("idefics2: error: 4 bad line(s)") and err.count("\n") == 1


def test_long_samples_are_dropped_or_refused_never_cut(tiny_dir, data_file):
    processor = Idefics2Processor.from_pretrained(tiny_dir)
    collator = ChatCollator(processor)
    samples = load_jsonl(data_file)
    long = conversation("red")["messages"]
    long = [{"role": "user", "content": [{"type": "image"}, *long[0]["content"]]}, long[1]]
    samples.insert(2, Sample(long, samples[0].images * 2, 99, source="x"))  # one more image block: 64+ tokens
    lengths = [collator.num_tokens(s.messages) for s in samples]
    limit = min(lengths)
    kept = filter_by_length(samples, collator, limit)
    assert [s.num_tokens for s in kept] == [n for n in lengths if n <= limit] and len(kept) < len(samples)
    assert all(s.num_tokens <= limit for s in kept)
    batch = collator(kept[:2])
    assert batch["input_ids"].shape[1] == max(s.num_tokens for s in kept[:2])  # whole samples, image blocks intact
    with pytest.raises(DataError, match="never truncated"):
        filter_by_length(samples, collator, limit, on_long="error")


# ---- loss parity ---------------------------------------------------------------------------------------------
def test_loss_matches_transformers_on_padded_batch(tmp_path):
    from reference import make_prompt, pad_images, reference_model, tiny_config_dict

    config = tiny_config_dict()
    ref = reference_model(config, seed=3)
    ref.save_pretrained(tmp_path)
    ours = Idefics2ForConditionalGeneration.from_pretrained(tmp_path)
    g = torch.Generator().manual_seed(0)
    rows = [make_prompt(g, config, 2, 9), make_prompt(g, config, 1, 4)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, r in enumerate(rows):  # right padding, as in training
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[(ids == config["image_token_id"]) | (ids == config["image_token_id"] - 1)] = -100
    labels[:, :3] = -100
    pixels, pixel_mask = pad_images(g, [[(56, 42), (28, 56)], [(56, 56)]])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, pixel_attention_mask=pixel_mask,
                  labels=labels)
    with torch.no_grad():
        expected = ref(**inputs).loss
        got = ours(**inputs).loss
        got_sum = ours(**inputs, num_items_in_batch=int((labels[:, 1:] != -100).sum())).loss
    assert abs(float(got) - float(expected)) <= 1e-5
    assert abs(float(got_sum) - float(expected)) <= 1e-5
    # The trainer's call: logits only where a target is, full-length labels; the same loss and gradients.
    positions = target_positions(labels)
    assert 0 < len(positions) < width
    kept = ours(**inputs, logits_to_keep=positions)
    assert kept.logits.shape[1] == len(positions)
    assert abs(float(kept.loss) - float(expected)) <= 1e-5
    kept.loss.backward()
    kept_grads = [p.grad.clone() for p in ours.parameters()]
    ours.zero_grad()
    ours(**inputs).loss.backward()
    for p, kept_grad in zip(ours.parameters(), kept_grads):
        assert torch.allclose(p.grad, kept_grad, atol=1e-6)
    with pytest.raises(ValueError, match="labels must be"):
        ours(**{**inputs, "labels": labels[:, :-1]}, logits_to_keep=positions)


# ---- LoRA ------------------------------------------------------------------------------------------------------
def test_lora_parameter_count_merge_and_transformers_load(tiny_dir, tmp_path, capsys):
    model = Idefics2ForConditionalGeneration.from_pretrained(tiny_dir)
    for p in model.parameters():
        p.data = p.data.clone()
    expected = expected_lora_parameters(model, DEFAULT_LORA_TARGET, 8)
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    lora = apply_lora(model, r=8, alpha=8, dropout=0.1)
    trainable = {n: p for n, p in lora.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == expected > 0
    adapted = {n.split(".lora_")[0].removeprefix("base_model.model.") for n in trainable}
    assert adapted == {n for n in names if n.startswith(("model.text_model.", "model.connector.modality_projection",
                                                         "model.connector.perceiver_resampler"))
                       and n.rsplit(".", 1)[-1].endswith("_proj")}
    assert not any("vision_model" in n for n in adapted)
    with torch.no_grad():  # B starts at zero: make the adapter do something
        for n, p in trainable.items():
            if "lora_B" in n:
                p.normal_(std=0.05)
    lora.eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 30000, (2, 12), generator=g)
    with torch.no_grad():
        adapter_logits = lora(input_ids=ids).logits
    lora.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert training_main(["merge-lora", "--model", tiny_dir, "--adapter", str(tmp_path / "adapter"),
                          "--output", str(tmp_path / "merged")]) == 0
    merged = Idefics2ForConditionalGeneration.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
    assert (merged_logits - adapter_logits).abs().max() <= 1e-5
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    Idefics2Processor.from_pretrained(tmp_path / "merged")

    from transformers import Idefics2ForConditionalGeneration as Reference

    reference = Reference.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (reference(input_ids=ids).logits - adapter_logits).abs().max() <= 1e-5
    # The adapter is a standard peft adapter: peft loads it onto a fresh base model.
    from peft import PeftModel

    again = PeftModel.from_pretrained(Idefics2ForConditionalGeneration.from_pretrained(tiny_dir),
                                      tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (again(input_ids=ids).logits - adapter_logits).abs().max() <= 1e-6
    assert training_main(["merge-lora", "--model", tiny_dir, "--adapter", str(tmp_path / "adapter"),
                          "--output", str(tmp_path / "merged")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_fused_lora_dropout_is_peft_lora_with_a_regenerated_mask(tiny_dir, tmp_path):
    import peft

    from idefics2.kernels import seeded_dropout
    from idefics2.training.lora import DropoutLoraDown

    models = []
    for fused in (True, False):
        model = Idefics2ForConditionalGeneration.from_pretrained(tiny_dir)
        torch.manual_seed(0)
        if fused:
            models.append(apply_lora(model, r=8, alpha=16, dropout=0.1))
        else:
            for p in model.parameters():
                p.requires_grad_(False)
            models.append(peft.get_peft_model(model, peft.LoraConfig(
                r=8, lora_alpha=16, lora_dropout=0.1, target_modules=DEFAULT_LORA_TARGET, init_lora_weights="gaussian")))
    fused, plain = models
    layers = [m for m in fused.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert layers and all(isinstance(m.lora_A["default"], DropoutLoraDown) for m in layers)
    assert all(isinstance(m.lora_dropout["default"], torch.nn.Identity) for m in layers)
    # Same parameters under the same names: adapters saved from either are the same peft adapter.
    fused_state, plain_state = fused.state_dict(), plain.state_dict()
    assert fused_state.keys() == plain_state.keys()
    assert all(torch.equal(fused_state[k], plain_state[k]) for k in fused_state)
    with torch.no_grad():
        for model in models:  # B starts at zero: make the adapters do something, identically
            g = torch.Generator().manual_seed(3)
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ids = torch.randint(3, 30000, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # eval: no dropout, exactly peft's computation
        assert torch.equal(fused.eval()(input_ids=ids).logits, plain.eval()(input_ids=ids).logits)

    # Training: output and gradients are those of base(x) + B(A(x * mask / 0.9)) * scaling with the mask that
    # the two seeds drawn from torch's generator give.
    layer = layers[0]
    layer.train()
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    torch.manual_seed(7)
    out = layer(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.manual_seed(7)
    seeds = tuple(torch.randint(0, 1 << 32, (2,)).tolist())
    mask = seeded_dropout(torch.ones_like(x), 0.1, seeds)
    assert 0.05 < float((mask == 0).float().mean()) < 0.15
    down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x2, down2, up2 = (t.detach().clone().requires_grad_() for t in (x, down, up))
    expected = layer.base_layer(x2) + F.linear(F.linear(x2 * mask, down2), up2) * layer.scaling["default"]
    expected.backward(grad)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for got, want in ((x.grad, x2.grad), (down.grad, down2.grad), (up.grad, up2.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # fp32 sums in another order
    # DoRA applies dropout its own way: left to peft.
    dora = apply_lora(Idefics2ForConditionalGeneration.from_pretrained(tiny_dir), dropout=0.1, use_dora=True)
    assert all(type(m.lora_dropout["default"]) is torch.nn.Dropout and type(m.lora_A["default"]) is torch.nn.Linear
               for m in dora.modules() if isinstance(m, peft.tuners.lora.LoraLayer))


@pytest.mark.parametrize("dropout, dora", [(0.0, True), (0.1, False)])
def test_gradient_checkpointing_with_lora_matches(tiny_dir, data_file, dropout, dora):
    """Checkpointed LoRA gives the plain run's loss and gradients: with DoRA under checkpointing (its magnitude
    vectors get grads; the reentrant-checkpointing + frozen-input failure must not happen), and with the fused
    dropout (the recomputed forward draws the same seeds, so the same masks)."""
    processor = Idefics2Processor.from_pretrained(tiny_dir)
    batch = ChatCollator(processor)(load_jsonl(data_file)[:2])
    grads = []
    for checkpointing in (False, True):
        model = Idefics2ForConditionalGeneration.from_pretrained(tiny_dir)
        if checkpointing:
            model.gradient_checkpointing_enable()
        torch.manual_seed(0)
        lora = apply_lora(model, dropout=dropout, use_dora=dora and checkpointing).train()
        loss = lora(**batch).loss
        loss.backward()
        named = {n: p.grad for n, p in lora.named_parameters() if p.requires_grad and ".lora_" in n}
        assert all(g is not None for g in named.values())
        grads.append((float(loss.detach()), named))
    assert abs(grads[0][0] - grads[1][0]) < 1e-6
    for name, grad in grads[0][1].items():
        assert torch.allclose(grad, grads[1][1][name], atol=1e-6), name


# ---- training runs ---------------------------------------------------------------------------------------------
def test_full_finetune_overfits_and_generates_a_training_answer(tiny_dir, data_file, tmp_path):
    out = tmp_path / "full"
    Trainer(run_config(tiny_dir, data_file, out, method="full", batch_size=4, max_steps=32, learning_rate=5e-3,
                       lr_scheduler="constant", warmup_steps=2)).train()
    history = losses(out / "metrics.jsonl")
    assert history[32] <= 0.1 * history[1], history
    model = Idefics2ForConditionalGeneration.from_pretrained(out)
    processor = Idefics2Processor.from_pretrained(out)
    sample = conversation("red")
    prompt = processor.apply_chat_template(sample["messages"][:1], add_generation_prompt=True)
    inputs = processor(text=prompt, images=[Image.open(os.path.join(os.path.dirname(data_file), "img/red.png"))],
                       return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = processor.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert answer in {f"It is {c}." for c in COLORS}, answer


def test_lora_finetune_halves_the_loss(tiny_dir, data_file, tmp_path):
    out = tmp_path / "lora"
    Trainer(run_config(tiny_dir, data_file, out, method="lora", batch_size=4, max_steps=20, learning_rate=1e-2,
                       lr_scheduler="constant", lora_target=f"({DEFAULT_LORA_TARGET})|lm_head")).train()
    history = losses(out / "metrics.jsonl")
    assert history[20] <= 0.5 * history[1], history
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 8


@pytest.mark.skipif(not kernels.kernel_available(), reason="the memory pool is part of the compiled kernels")
def test_trainer_memory_pool_serves_the_steps_and_changes_no_bits(tiny_dir, data_file, tmp_path, monkeypatch):
    """On the CPU the training loop runs inside `kernels.cpu_memory_pool` (here with a 4 KiB threshold so the
    tiny model's tensors use it): the same losses, bit for bit, as with --no-memory-pool."""
    seen = []
    pool = kernels.cpu_memory_pool

    @contextlib.contextmanager
    def small_block_pool():
        with pool(threshold=4096) as enabled:
            kernels.cpu_memory_pool_stats(reset_peak=True)
            yield enabled
            seen.append(kernels.cpu_memory_pool_stats())

    monkeypatch.setattr(kernels, "cpu_memory_pool", small_block_pool)
    history = {}
    for use_pool in (True, False):
        out = tmp_path / f"pool{use_pool}"
        Trainer(run_config(tiny_dir, data_file, out, method="lora", batch_size=2, max_steps=4,
                           memory_pool=use_pool)).train()
        history[use_pool] = losses(out / "metrics.jsonl")
    assert history[True] == history[False] and len(history[True]) == 4
    assert len(seen) == 1 and seen[0]["enabled"] and seen[0]["hits"] > seen[0]["misses"] > 0
    assert not kernels.cpu_memory_pool_stats()["enabled"]


def test_qlora_without_bitsandbytes_says_so(tiny_dir, data_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    code = training_main(["finetune", "--model", tiny_dir, "--train", data_file, "--output", str(tmp_path),
                          "--method", "qlora", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--method qlora needs bitsandbytes" in err and err.count("\n") == 1, err


def _qlora_targets(tiny_dir: str) -> list[str]:
    """The linears QLoRA quantizes: every nn.Linear of the text decoder and the connector."""
    model = Idefics2ForConditionalGeneration.from_pretrained(tiny_dir)
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith(("model.text_model.", "model.connector."))]


def test_qlora_base_is_bnb_nf4_and_checkpointing_keeps_gradients(tiny_dir, data_file, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    targets = _qlora_targets(tiny_dir)
    results = []
    for checkpointing in (False, True):
        trainer = Trainer(run_config(tiny_dir, data_file, tmp_path / str(checkpointing), method="qlora",
                                     lora_dropout=0.0, gradient_checkpointing=checkpointing, batch_size=2))
        trainer.build()
        modules = dict(trainer.model.base_model.model.named_modules())
        for name in targets:
            base = modules[name].base_layer  # peft's LoRA wrapper around the quantized layer
            assert isinstance(base, bnb.nn.Linear4bit), name
            assert isinstance(base.weight, bnb.nn.Params4bit) and base.weight.dtype == torch.uint8, name
            state = base.weight.quant_state
            assert state.quant_type == "nf4" and state.nested, name  # NF4 with double quantization
            assert base.compute_dtype == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
        assert trainer.quantized_layers == len(targets) > 20
        float_linears = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear)
                         and not isinstance(m, bnb.nn.Linear4bit) and "lora_" not in n]
        assert any(n.startswith("model.vision_model.") for n in float_linears) and "lm_head" in float_linears
        assert all(n.startswith(("model.vision_model.", "lm_head")) for n in float_linears), float_linears
        assert all("lora_" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
        batch = trainer._to_device(trainer.collator(trainer.train_samples[:2]))
        out = trainer.model(**batch)
        out.loss.backward()
        grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.requires_grad}
        assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
        results.append((float(out.loss.detach()), grads))
    assert abs(results[0][0] - results[1][0]) < 1e-6
    for name, grad in results[0][1].items():
        assert torch.allclose(grad, results[1][1][name], atol=1e-6), name


def test_qlora_finetune_cli_lowers_the_loss_and_saves_a_peft_adapter(tiny_dir, data_file, tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel
    from safetensors.torch import load_file

    out = tmp_path / "qlora"
    run = subprocess.run(_cli("--model", tiny_dir, "--train", data_file, "--output", str(out), "--method", "qlora",
                              "--gradient-checkpointing", "--batch-size", "4", "--max-steps", "12",
                              "--learning-rate", "5e-3", "--lr-scheduler", "constant", "--max-length", "512",
                              "--threads", "1", "--no-progress"),
                         env=_env(), capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    targets = _qlora_targets(tiny_dir)
    compute = "bfloat16" if torch.cuda.is_available() else "float32"
    assert f"{len(targets)} linear layers in bitsandbytes 4-bit NF4 (double quant, compute {compute})" in run.stderr
    history = losses(out / "metrics.jsonl")
    assert sorted(history) == list(range(1, 13))
    assert history[12] <= 0.9 * history[1] and history[12] < min(history[k] for k in range(1, 7)), history
    # peft layout: one lora_A / lora_B pair per quantized linear, loadable by peft onto the float base model.
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    saved = load_file(out / "adapter_model.safetensors")
    assert sorted(saved) == sorted(f"base_model.model.{n}.lora_{ab}.weight" for n in targets for ab in "AB")
    again = PeftModel.from_pretrained(Idefics2ForConditionalGeneration.from_pretrained(tiny_dir), out)
    loaded = {n: p for n, p in again.named_parameters() if "lora_" in n}
    for key, tensor in saved.items():
        assert torch.equal(loaded[key.replace(".weight", ".default.weight")], tensor), key


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "idefics2.training", "finetune", *args]


def _env(cpu_only: bool = False) -> dict[str, str]:
    """`cpu_only`: hide any GPU (the multi-process tests compare gloo runs on CPU with a CPU run)."""
    # Keep the caller's PYTHONPATH after ours: packages may come from there (e.g. bitsandbytes on a GPU machine).
    path = os.pathsep.join(p for p in (os.path.join(ROOT, "src"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    return {**env, "CUDA_VISIBLE_DEVICES": ""} if cpu_only else env


def test_resume_after_sigkill_gives_the_same_losses(tiny_dir, data_file, tmp_path):
    common = ["--model", tiny_dir, "--train", data_file, "--batch-size", "2", "--max-steps", "12",
              "--learning-rate", "5e-3", "--warmup-steps", "3", "--save-steps", "2", "--save-total-limit", "2",
              "--threads", "1", "--no-progress", "--gradient-accumulation-steps", "2", "--max-length", "512"]
    # LoRA dropout 0.1 draws random numbers every step: the RNG state must be restored too.
    reference = subprocess.Popen(_cli(*common, "--output", str(tmp_path / "straight")), env=_env(),
                                 stderr=subprocess.PIPE, text=True)
    killed_dir = tmp_path / "killed"
    victim = subprocess.Popen(_cli(*common, "--output", str(killed_dir)), env=_env(), stderr=subprocess.DEVNULL)
    metrics = killed_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and victim.poll() is None:
        if metrics.exists() and max(losses(metrics), default=0) >= 4:
            break
        time.sleep(0.02)
    assert victim.poll() is None, "the run finished before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = max(losses(metrics))
    assert 4 <= killed_at < 12
    checkpoints = sorted(int(p.name.split("-")[1]) for p in killed_dir.glob("checkpoint-*") if p.name[-1].isdigit())
    assert checkpoints and checkpoints[-1] <= killed_at
    resumed = subprocess.run(_cli(*common, "--output", str(killed_dir), "--resume"), env=_env(),
                             capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed at step {checkpoints[-1]}" in resumed.stderr
    _, err = reference.communicate(timeout=180)
    assert reference.returncode == 0, err
    straight, after = losses(tmp_path / "straight" / "metrics.jsonl"), losses(metrics)
    assert sorted(after) == list(range(1, 13))
    for step in range(1, 13):
        assert abs(after[step] - straight[step]) <= 1e-6, (step, after[step], straight[step])
    with open(killed_dir / "metrics.jsonl") as handle:
        resumed_steps = [json.loads(line)["step"] for line in handle if line.endswith("}\n")][killed_at:]
    assert resumed_steps[0] == checkpoints[-1] + 1  # the resumed run really re-ran the lost steps


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")
def test_torchrun_two_processes_equal_one_process_double_batch(tiny_dir, data_file, tmp_path):
    from safetensors.torch import load_file

    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    # Adam turns rounding-level gradient differences of near-zero gradients into differences of order lr, so
    # a small lr keeps the comparison at 1e-5 meaningful (parameters still move ~3e-4).
    args = ["--model", tiny_dir, "--train", data_file, "--method", "full", "--max-steps", "3", "--learning-rate",
            "1e-4", "--no-progress", "--max-length", "512", "--freeze", "vision"]
    run = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "idefics2.training",
                          "finetune", *args, "--batch-size", "1", "--output", str(tmp_path / "ddp")],
                         env=_env(cpu_only=True), capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 process(es)" in run.stderr
    one = _one_process_double_batch(tiny_dir, data_file, tmp_path / "one")
    _assert_trained_alike(tiny_dir, load_file(tmp_path / "ddp" / "model.safetensors"), one)
    # FSDP (sharded full fine-tuning, with a sharded checkpoint gathered on rank 0) trains the same parameters.
    run = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "idefics2.training", "finetune",
                          *args, "--batch-size", "1", "--fsdp", "--save-steps", "2", "--output",
                          str(tmp_path / "fsdp")], env=_env(cpu_only=True), capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    fsdp = load_file(tmp_path / "fsdp" / "model.safetensors")
    for name in one:
        assert (fsdp[name] - one[name]).abs().max() <= 1e-5, name
    assert (tmp_path / "fsdp" / "checkpoint-2" / "optimizer.pt").is_file()
    assert losses(tmp_path / "ddp" / "metrics.jsonl")[1] == pytest.approx(losses(tmp_path / "one" /
                                                                                 "metrics.jsonl")[1], abs=1e-5)


def _one_process_double_batch(tiny_dir: str, data_file: str, out) -> dict:
    """The single-process run that 2 processes x batch 1 must reproduce: batch 2, 3 steps, full tuning."""
    from safetensors.torch import load_file

    Trainer(run_config(tiny_dir, data_file, out, method="full", batch_size=2, max_steps=3, learning_rate=1e-4,
                       freeze=["vision"], device="cpu")).train()
    return load_file(out / "model.safetensors")


def _assert_trained_alike(tiny_dir: str, multi: dict, one: dict) -> None:
    """Same parameters (<= 1e-5) after training, and training did move them."""
    from safetensors.torch import load_file

    base = load_file(os.path.join(tiny_dir, "model.safetensors"))
    assert multi.keys() == one.keys()
    moved = 0
    for name in one:
        assert (multi[name] - one[name]).abs().max() <= 1e-5, name
        moved += not torch.equal(one[name], base[name])
    assert moved > 10


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(sys.executable), "accelerate")),
                    reason="accelerate not installed")
def test_accelerate_launch_two_processes_equal_one_process_double_batch(tiny_dir, data_file, tmp_path):
    from safetensors.torch import load_file

    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    # No user accelerate config may change the launch; every default accelerate would warn about is given.
    env = {**_env(cpu_only=True), "HF_HOME": str(tmp_path / "hf_home")}
    launch = [accelerate, "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
    args = ["--model", tiny_dir, "--train", data_file, "--method", "full", "--max-steps", "3", "--learning-rate",
            "1e-4", "--no-progress", "--max-length", "512", "--freeze", "vision", "--batch-size", "1"]
    # --multi_gpu runs torch's elastic agent (what torchrun runs), also on a CPU-only machine: DDP with gloo.
    run = subprocess.run([*launch, "--multi_gpu", "--main_process_port", str(_free_port()), "-m", "idefics2",
                          "finetune", *args, "--output", str(tmp_path / "ddp")],
                         env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 process(es)" in run.stderr
    one = _one_process_double_batch(tiny_dir, data_file, tmp_path / "one")
    _assert_trained_alike(tiny_dir, load_file(tmp_path / "ddp" / "model.safetensors"), one)
    assert losses(tmp_path / "ddp" / "metrics.jsonl")[3] == pytest.approx(losses(tmp_path / "one" /
                                                                                 "metrics.jsonl")[3], abs=1e-5)
    # --cpu without mpirun starts one plain process: refused in one line instead of training with half the batch.
    run = subprocess.run([*launch, "--cpu", "--main_process_port", str(_free_port()), "-m", "idefics2", "finetune",
                          *args, "--output", str(tmp_path / "cpu")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode != 0
    assert "idefics2: error: accelerate launch --cpu started a single process" in run.stderr
    assert "--multi_gpu" in run.stderr and not (tmp_path / "cpu" / "metrics.jsonl").exists()


def test_mpi_environment_gives_rank_and_world(monkeypatch):
    """mpirun (accelerate launch --cpu --mpirun_hostfile) names ranks in MPI variables; they are read too."""
    from idefics2.training import trainer

    calls = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    with pytest.raises(trainer.TrainingSetupError, match="MASTER_ADDR / MASTER_PORT are not set"):
        trainer.init_distributed()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    dist = trainer.init_distributed()
    assert (dist.rank, dist.world, dist.local_rank, dist.device.type) == (3, 4, 1, "cpu")
    assert calls == [{"backend": "gloo", "rank": 3, "world_size": 4}]
    for name in ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"):
        monkeypatch.delenv(name)
    with pytest.raises(trainer.TrainingSetupError, match="accelerate launch --cpu started a single process"):
        trainer.init_distributed()


def test_device_choice_and_too_few_gpus_are_clear_errors(monkeypatch):
    """--device cpu trains on CPU (gloo) beside a GPU; more processes than GPUs, or cuda without one, say so."""
    from idefics2.training import trainer

    calls = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: calls.append(kw))
    for name in ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
                 "OMPI_COMM_WORLD_LOCAL_RANK", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(trainer.TrainingSetupError, match="--device cuda: no CUDA GPU is visible"):
        trainer.init_distributed("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # one GPU, two processes on this machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(trainer.TrainingSetupError, match=r"local rank 1 has no GPU: 1 CUDA device\(s\) are visible"):
        trainer.init_distributed()
    dist = trainer.init_distributed("cpu")
    assert dist.device.type == "cpu" and calls == [{"backend": "gloo", "rank": 1, "world_size": 2}]
