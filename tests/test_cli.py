"""The `idefics2` command, run as users run it: in subprocesses, on a checkpoint made by `init-random`."""

import io
import json
import os
import subprocess
import sys
import time

import pytest
from PIL import Image

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def idefics2(*args, input_text=None, timeout=240, env=None):
    return subprocess.run([sys.executable, "-m", "idefics2", *map(str, args)], input=input_text,
                          capture_output=True, text=True, timeout=timeout, env=env or ENV)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    result = idefics2("init-random", "--preset", "tiny", path, "--force")
    assert result.returncode == 0, result.stderr
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, size in enumerate([(64, 48), (40, 90)]):
        path = folder / f"img{i}.png"
        Image.new("RGB", size, color=(40 * i, 120, 200)).save(path)
        paths.append(path)
    (folder / "not-an-image.png").write_text("hello")
    return folder, paths


def test_init_random_writes_the_published_layout(tiny):
    names = set(os.listdir(tiny))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "preprocessor_config.json", "processor_config.json"} <= names
    dry = idefics2("init-random", "--preset", "8b-shapes", "--dry-run")
    assert dry.returncode == 0 and "8,402,768,112 parameters" in dry.stdout


def test_generate_streams_an_answer_and_reports_timing(tiny, images):
    _, paths = images
    result = idefics2("generate", "--model", tiny, "--image", paths[0], "--image", paths[1], "--prompt",
                      "Compare them.", "--max-new-tokens", "5", "--no-image-splitting", "--verbose")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "tokens/s" in result.stderr and "prefill" in result.stderr


@pytest.mark.parametrize("case", ["missing image", "not an image", "no config"])
def test_user_errors_are_one_line_with_exit_code_2(tiny, images, tmp_path, case):
    folder, paths = images
    model, image = tiny, paths[0]
    if case == "missing image":
        image = folder / "nope.png"
    elif case == "not an image":
        image = folder / "not-an-image.png"
    else:
        model = tmp_path
    result = idefics2("generate", "--model", model, "--image", image, "--prompt", "hi", "--max-new-tokens", "2")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("idefics2: error:")


def test_chat_keeps_history_and_handles_commands(tiny, images):
    _, paths = images
    script = f"/image {paths[0]}\nWhat is this?\n/image /does/not/exist.png\n/reset\nHello\n/exit\n"
    result = idefics2("chat", "--model", tiny, "--max-new-tokens", "3", "--no-image-splitting",
                      input_text=script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant> ") == 2
    assert "image attached" in result.stderr and "conversation reset" in result.stderr
    assert "does not exist" in result.stderr


def test_batch_records_bad_lines_and_resumes_after_a_kill(tiny, images, tmp_path):
    folder, paths = images
    requests = tmp_path / "requests.jsonl"
    lines = [{"id": i, "prompt": f"Describe picture {i}.", "images": [str(paths[i % 2])]} for i in range(6)]
    lines.insert(2, {"id": "bad-image", "prompt": "x", "images": ["missing.png"]})
    lines.append({"id": "chat", "messages": [{"role": "user", "content": [{"type": "image"},
                                                                         {"type": "text", "text": "Hi"}]}],
                  "images": [os.path.relpath(paths[0], tmp_path)]})  # relative to the JSONL file
    requests.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    answers = tmp_path / "answers.jsonl"
    command = [sys.executable, "-m", "idefics2", "batch", "--model", str(tiny), "--input", str(requests),
               "--output", str(answers), "--batch-size", "1", "--max-new-tokens", "4", "--no-image-splitting"]
    # Interrupt the first run for real once some answers are written.
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if answers.exists() and len(answers.read_text().splitlines()) >= 2:
            process.kill()
            break
        time.sleep(0.05)
    process.wait()
    first = answers.read_text().splitlines() if answers.exists() else []
    resumed = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert "already answered" in resumed.stderr and "items/s" in resumed.stderr
    records = [json.loads(x) for x in answers.read_text().splitlines()]
    ids = [r["id"] for r in records]
    assert sorted(map(str, ids)) == sorted(map(str, [x["id"] for x in lines] + ["line-9"]))
    assert len(ids) == len(set(map(str, ids)))  # nothing answered twice
    assert len(first) >= 2
    by_id = {str(r["id"]): r for r in records}
    assert "does not exist" in by_id["bad-image"]["error"]
    assert "invalid JSON" in by_id["line-9"]["error"]
    assert by_id["chat"]["generated_tokens"] >= 1 and "answer" in by_id["0"]


def test_demo_runs_on_a_fresh_cache(tmp_path):
    result = subprocess.run([sys.executable, "-m", "idefics2.demo", "--max-new-tokens", "3"], capture_output=True,
                            text=True, timeout=300, env={**ENV, "IDEFICS2_CACHE": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "assistant>" in result.stdout and "tokens/s" in result.stderr


def test_json_schema_in_generate_and_batch(tiny, images, tmp_path):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    result = idefics2("generate", "--model", tiny, "--prompt", "Count.", "--json-schema", tmp_path / "schema.json",
                      "--max-new-tokens", "30")
    assert result.returncode == 0, result.stderr
    assert set(json.loads(result.stdout.strip())) == {"n"}
    other = {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 2}
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(json.dumps(x) for x in [
        {"id": "global", "prompt": "Count."},
        {"id": "own", "prompt": "List.", "json_schema": other},
    ]) + "\n")
    answers = tmp_path / "answers.jsonl"
    result = idefics2("batch", "--model", tiny, "--input", requests, "--output", answers, "--max-new-tokens", "30",
                      "--json-schema", tmp_path / "schema.json", "--batch-size", "2")
    assert result.returncode == 0, result.stderr
    by_id = {r["id"]: r for r in map(json.loads, answers.read_text().splitlines())}
    assert set(json.loads(by_id["global"]["answer"])) == {"n"}
    assert set(json.loads(by_id["own"]["answer"])) <= {"a", "b"}
    bad = idefics2("generate", "--model", tiny, "--prompt", "x", "--json-schema", tmp_path / "missing.json")
    assert bad.returncode == 2 and "does not exist" in bad.stderr


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantize_writes_a_checkpoint_that_generates(tiny, images, tmp_path, method):
    _, paths = images
    out = tmp_path / method
    result = idefics2("quantize", "--model", tiny, "--method", method, "--output", out)
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["method"] == method and config["int4_layout"] == "x16"
    assert {"tokenizer.json", "preprocessor_config.json", "generation_config.json"} <= set(os.listdir(out))
    result = idefics2("generate", "--model", out, "--image", paths[0], "--prompt", "What is this?",
                      "--max-new-tokens", "4", "--seed", "0")
    assert result.returncode == 0 and result.stdout.strip(), result.stderr


@pytest.mark.parametrize("splitting", [False, True])
def test_chat_session_encodes_each_image_once_and_answers_as_with_pixels(tiny, images, splitting):
    """Each turn's answer equals the one generate() gives from the whole history's pixels; the vision tower runs
    once per attached image, not once per image per turn."""
    import torch

    from idefics2.cli import ChatSession, load_model_and_processor, run_chat_turn, user_message

    _, paths = images
    model, processor = load_model_and_processor(str(tiny), image_splitting=splitting)
    encoded = []
    model.model.vision_model.register_forward_hook(lambda m, args, out: encoded.append(args[0].shape[0]))
    gen = dict(max_new_tokens=6, do_sample=False)
    session = ChatSession(model, processor)
    pictures = [Image.open(p).convert("RGB") for p in paths]
    session.attach(pictures[0])
    turns = [("What is this?", [pictures[0]]), ("And now?", []), ("Compare.", [pictures[1]])]
    messages, history = [], []
    for i, (prompt, new) in enumerate(turns):
        if i == 2:
            session.attach(pictures[1])
        out = io.StringIO()
        answer = session.ask(prompt, gen, out=out)
        history.extend(new)
        messages.append(user_message(prompt, len(new)))
        # the cached features are those of the pixel path (all images padded into one batch), within float noise,
        # and the session's prompt ids are the processor's
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        pixels = processor(text=text, images=history, return_tensors="pt")
        seen = len(encoded)
        with torch.inference_mode():
            expected, _ = model.model.get_image_features(pixels["pixel_values"], pixels["pixel_attention_mask"])
        del encoded[seen:]  # this check's own encoding is not counted
        torch.testing.assert_close(torch.cat(session.features), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(session.inputs_of_last_turn["input_ids"], pixels["input_ids"])
        reference = run_chat_turn(model, processor, messages, history, gen, out=io.StringIO())
        messages.append({"role": "assistant", "content": [{"type": "text", "text": reference}]})
        assert answer == reference and out.getvalue().strip() == answer
    crops = 5 if splitting else 1
    # turn by turn, session then reference: the session encodes image 0 at turn 0 and image 1 at turn 2 only;
    # the reference re-encodes every image of the history every turn
    assert encoded == [crops, crops, crops, crops, 2 * crops]
    assert session.messages == messages and torch.cat(session.features).shape[0] == 2 * crops
