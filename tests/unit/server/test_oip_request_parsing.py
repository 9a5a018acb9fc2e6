"""Reading a v2 infer request before the model: the JSON value count and the binary header length.

Units (no server): the same checks run on the server in tests/e2e/protocols/test_oip.py.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from digitflow_fastapi.config import Settings
from digitflow_fastapi.errors import RequestError
from digitflow_fastapi.protocols.model_inputs import check_json_values
from digitflow_fastapi.protocols.v2.tensors import split_body

# Strings full of the bytes that are counted, and of escapes that hide a quote.
TRICKY_TEXT = st.text(alphabet=st.sampled_from(list(',[]{}:"\\ aé\n\t/')), max_size=12)
JSON_DOCS = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(-1e9, 1e9) | TRICKY_TEXT,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(TRICKY_TEXT, inner, max_size=6),
    max_leaves=40,
)


def marks(value: Any) -> int:
    """What the check counts, from the parsed document: each container and each comma."""
    if isinstance(value, list):
        return 1 + max(len(value) - 1, 0) + sum(marks(v) for v in value)
    if isinstance(value, dict):
        return 1 + max(len(value) - 1, 0) + sum(marks(v) for v in value.values())
    return 0


@settings(max_examples=300, deadline=None)
@given(JSON_DOCS, st.booleans())
def test_the_value_count_is_exact_whatever_the_strings_hold(value: Any, spaced: bool) -> None:
    text = json.dumps(value).encode() if spaced else orjson.dumps(value)
    count = marks(value)
    check_json_values(text, count, "MAX_JSON_VALUES")
    if count:
        with pytest.raises(RequestError) as caught:
            check_json_values(text, count - 1, "MAX_JSON_VALUES")
        assert caught.value.status_code == 413


def test_the_default_cap_takes_a_full_batch_of_nested_pixels_and_refuses_a_flood() -> None:
    cap = Settings().json_values_cap()
    assert cap == 64 * 814 + 1024
    pixels = [[[[0.5] * 28 for _ in range(28)]] for _ in range(64)]
    tensor = {"name": "pixels", "datatype": "FP32", "shape": [64, 1, 28, 28], "data": pixels}
    document, binary = split_body(orjson.dumps({"inputs": [tensor]}), None, cap)
    assert document["inputs"][0]["shape"] == [64, 1, 28, 28] and binary == b""
    with pytest.raises(RequestError, match=r"more than 53120 values \(MAX_JSON_VALUES\)"):
        split_body(b"[" + b"{}," * 60_000 + b"{}]", None, cap)


@pytest.mark.parametrize("length", ["²", "١٢", "1_0", "+5", "0x5", "-1", "", "9" * 16, "5 5"])
def test_the_binary_header_length_must_be_ascii_digits_within_the_body(length: str) -> None:
    body = b'{"inputs":[]}' + b"\0" * 32
    with pytest.raises(RequestError, match="Inference-Header-Content-Length") as caught:
        split_body(body, length, 1000)
    assert caught.value.status_code == 400


def test_a_binary_header_length_may_have_surrounding_blanks() -> None:
    header = b'{"inputs":[]}'
    document, binary = split_body(header + b"\1\2", f" {len(header)}\t", 1000)
    assert document == {"inputs": []} and binary == b"\1\2"
