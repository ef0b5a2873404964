"""Constrained decoding: every output of a random model parses and validates; unconstrained rows are untouched."""

import json
import re

import jsonschema
import pytest
import torch
from conftest import tiny_pipeline

from idefics2.structured import ConstraintError

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "invoice": {"type": "object", "properties": {
                "number": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                "total": {"type": "number", "minimum": 0, "maximum": 1000},
            }, "required": ["number", "total"], "additionalProperties": False},
            "paid": {"type": "boolean"},
        },
        "required": ["invoice", "paid"], "additionalProperties": False,
    },
    "array": {"type": "array", "items": {"type": "integer", "minimum": -50, "maximum": 50},
              "minItems": 2, "maxItems": 4},
    "enum-optional": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "note": {"type": "string", "maxLength": 6},
                       "count": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["color"], "additionalProperties": False,
    },
    "strings": {"type": "object", "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
    }, "required": ["name", "tags"], "additionalProperties": False},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    runner = tiny_pipeline(tmp_path_factory.mktemp("tiny"))
    return runner.model, runner.processor


def prompts(processor, n, text="Extract the fields."):
    return processor(text=[f"{text} #{i}" for i in range(n)], padding=True, return_tensors="pt")


def decode_new(processor, output, width):
    return [processor.decode(row[width:], skip_special_tokens=True) for row in output]


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_200_sampled_outputs_per_schema_all_validate(tiny, name):
    model, processor = tiny
    schema = SCHEMAS[name]
    outputs = []
    for seed in range(4):
        inputs = prompts(processor, 50)
        out = model.generate(**inputs, do_sample=True, seed=seed, max_new_tokens=120, json_schema=schema,
                             tokenizer=processor.tokenizer)
        outputs += decode_new(processor, out, inputs["input_ids"].shape[1])
    assert len(outputs) == 200
    for text in outputs:
        jsonschema.validate(json.loads(text), schema)
    assert len(set(outputs)) > 20  # really sampled, not one answer 200 times


def test_regex_and_choices(tiny):
    model, processor = tiny
    inputs = prompts(processor, 40)
    width = inputs["input_ids"].shape[1]
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    out = model.generate(**inputs, do_sample=True, seed=1, max_new_tokens=20, regex=pattern,
                         tokenizer=processor.tokenizer)
    assert all(re.fullmatch(pattern, t) for t in decode_new(processor, out, width))
    options = ["yes", "no", "maybe not"]
    out = model.generate(**inputs, do_sample=True, seed=2, max_new_tokens=20, choices=options,
                         tokenizer=processor.tokenizer)
    answers = decode_new(processor, out, width)
    assert set(answers) <= set(options) and len(set(answers)) > 1


def test_mixed_batch_constrained_and_free_rows(tiny):
    model, processor = tiny
    inputs = prompts(processor, 8, "Row")
    width = inputs["input_ids"].shape[1]
    names = ["nested", "array", "strings"]
    per_row = [SCHEMAS[names[i % 3]] if i not in (2, 5) else None for i in range(8)]
    out = model.generate(**inputs, max_new_tokens=150, json_schema=per_row, tokenizer=processor.tokenizer)
    free = model.generate(**inputs, max_new_tokens=150)
    texts = decode_new(processor, out, width)
    for i, schema in enumerate(per_row):
        if schema is None:
            row = out[i, width:]
            reference = free[i, width:]
            assert torch.equal(row[: reference.shape[0]], reference[: row.shape[0]]), f"free row {i} changed"
        else:
            jsonschema.validate(json.loads(texts[i]), schema)


def test_bad_constraints_are_clear_errors(tiny):
    model, processor = tiny
    inputs = prompts(processor, 2)
    with pytest.raises(ConstraintError, match="regex"):
        model.generate(**inputs, regex="([a-z", tokenizer=processor.tokenizer)
    with pytest.raises(ConstraintError, match="more than one"):
        model.generate(**inputs, regex="a", choices=["b"], tokenizer=processor.tokenizer)
    with pytest.raises(ConstraintError, match="3 entries for a batch of 2"):
        model.generate(**inputs, json_schema=[{}, {}, {}], tokenizer=processor.tokenizer)
    with pytest.raises(ValueError, match="need the tokenizer"):
        model.generate(**inputs, regex="a")
