"""The one-pass split of plain multipart bodies gives exactly what python-multipart's parser gives,
or steps aside (None) and lets the parser read the body."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator

import httpx
import pytest
from benchmarks.http_load import BOUNDARY, multipart_body
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header

from digitflow_fastapi.errors import RequestError
from digitflow_fastapi.protocols.uploads import (
    _PLAIN_DISPOSITION,
    _Parser,
    disposition_names,
    read_multipart,
    split_plain_body,
)

TOKEN = "abcXYZ019'-_.+"
MAX_PARTS = 3


def parsed(body: bytes, boundary: bytes) -> list[tuple[str, str | None, bytes]] | str:
    """What python-multipart's parser makes of `body`: the parts, or the error's kind."""
    parser = _Parser(boundary, MAX_PARTS)
    try:
        parser.write(body)
        return [(p.name, p.filename, bytes(p.data)) for p in parser.finish()]
    except MultipartParseError:
        return "malformed"
    except RequestError as exc:
        return f"{exc.status_code}"


def split(body: bytes, boundary: bytes) -> list[tuple[str, str | None, bytes]] | str | None:
    try:
        parts = split_plain_body(body, boundary, MAX_PARTS)
    except RequestError as exc:
        return f"{exc.status_code}"
    return None if parts is None else [(p.name, p.filename, bytes(p.data)) for p in parts]


GOOD_HEADERS = [
    b'Content-Disposition: form-data; name="image_file"; filename="a.png"',
    b"Content-Disposition: form-data; name=x",
    b'content-disposition:form-data; name="f"; filename="\xc3\xa9.png"',
    b"Content-Type: image/png",
    b"Content-Type:    image/png  ",
]
BAD_HEADERS = [
    b"X-Bad Name: 1",
    b": empty name",
    b"NoColon",
    b"X-Cr: a\rb",
    b"X-Lf: a\nb",
    b"X-Long: " + b"v" * 5000,
]


def mostly(good: list[bytes], bad: list[bytes]) -> st.SearchStrategy[bytes]:
    """One of `good` nine times in ten, else one of `bad`: most bodies are well formed, so the
    split's answers are compared, not only its stepping aside."""
    return st.sampled_from(good * 9 * max(1, len(bad)) + bad * len(good))


@st.composite
def bodies(draw: st.DrawFn) -> tuple[bytes, bytes]:
    boundary = draw(st.text(TOKEN, min_size=1, max_size=12)).encode()
    delimiter = b"--" + boundary
    chunks = [draw(mostly([b""], [b"\r\n", b"preamble\r\n"]))]
    for _ in range(draw(st.integers(1, 4))):
        chunks.append(delimiter + draw(mostly([b"\r\n"], [b" \r\n", b"x\r\n"])))
        lines = draw(st.lists(mostly(GOOD_HEADERS, BAD_HEADERS), min_size=1, max_size=3))
        if draw(st.integers(0, 19)) == 0:
            lines = lines * 4  # past the parser's 8 header lines
        chunks.append(b"\r\n".join(lines))
        chunks.append(draw(mostly([b"\r\n\r\n"], [b"\r\n", b"\n\n"])))
        tricky = [b"\r\n", b"\r\n--", b"\r\n" + delimiter[:-1], b"\r\n" + delimiter + b"z"]
        pieces = draw(
            st.lists(st.one_of(st.binary(max_size=40), st.sampled_from(tricky)), max_size=4)
        )
        chunks.append(b"".join(pieces) + b"\r\n")
    chunks.append(delimiter + draw(mostly([b"--\r\n", b"--"], [b"--epilogue", b"\r\n", b""])))
    return b"".join(chunks), boundary


def test_the_split_agrees_with_the_parser_or_steps_aside() -> None:
    used = collections.Counter[bool]()

    @settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(bodies())
    def check(case: tuple[bytes, bytes]) -> None:
        body, boundary = case
        fast = split(body, boundary)
        assert fast is None or fast == parsed(body, boundary)
        used[fast is not None] += 1

    check()
    # Real answers were compared, not only bodies the split left alone.
    assert used[True] >= 100 and used[False] >= 50, used


def _httpx_body(files: list[tuple[str, tuple[str, bytes, str]]]) -> tuple[bytes, bytes]:
    request = httpx.Request("POST", "http://x/", files=files)
    boundary = request.headers["content-type"].split("boundary=")[1].encode()
    return request.read(), boundary


@pytest.mark.parametrize("count", [1, 3])
def test_what_clients_send_takes_the_one_pass_split(count: int) -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) + b"\r\n--not-the-boundary\r\n"
    files = [("image_file", (f"{i}.png", png, "image/png")) for i in range(count)]
    for body, boundary in (
        _httpx_body(files),  # httpx, as the tests and Python clients send
        (multipart_body([(png, f"{i}.png") for i in range(count)]), BOUNDARY.encode()),  # wrk's
    ):
        fast = split(body, boundary)
        assert fast is not None
        assert fast == parsed(body, boundary)
        assert [data for _, _, data in fast] == [png] * count


def test_too_many_parts_is_the_same_413_either_way() -> None:
    body, boundary = _httpx_body(
        [("image_file", (f"{i}.png", b"x", "image/png")) for i in range(4)]
    )
    assert split(body, boundary) == parsed(body, boundary) == "413"


def test_a_body_past_the_whole_body_size_is_parsed_as_it_streams() -> None:
    big = b"\x00" * (1 << 20)
    body, boundary = _httpx_body([("image_file", ("big.png", big, "image/png"))])

    async def stream() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    content_type = f"multipart/form-data; boundary={boundary.decode()}"
    parts = asyncio.run(read_multipart(content_type, stream(), 4 << 20, MAX_PARTS))
    assert [(p.name, p.filename, p.data) for p in parts] == [("image_file", "big.png", big)]


def multipart_names(value: bytes) -> tuple[bytes, bytes | None]:
    """`name` and `filename` as python-multipart's own header parser reads them."""
    _, options = parse_options_header(value)
    return options.get(b"name", b""), options.get(b"filename")


VALUE_CHARS = st.sampled_from([*'ab7 ._-"\\;=*:\t', "é", "%22"])
NAMES = st.lists(VALUE_CHARS, max_size=8).map("".join)


@st.composite
def dispositions(draw: st.DrawFn) -> bytes:
    """Content-Disposition values: the plain form clients send, and variations of it (spacing,
    case, escapes, RFC 2231 keys, IE paths, `;` in quotes, order, missing parts)."""
    name, filename = draw(NAMES), draw(NAMES)
    key_case = draw(st.sampled_from(["name", "Name", "NAME"]))
    filename_key = draw(st.sampled_from(["filename", "FileName", "filename*"]))
    gap = draw(st.sampled_from(["; ", ";", ";  ", " ; ", ";\t"]))
    head = draw(st.sampled_from(["form-data", "Form-Data", "attachment"]))
    quoted = draw(st.booleans())
    value = f'"{filename}"' if quoted else filename
    parts = [f'{key_case}="{name}"']
    if draw(st.booleans()):
        parts.append(f"{filename_key}={value}")
    if draw(st.booleans()):
        parts.reverse()
    return (head + gap + gap.join(parts)).encode("utf-8")


@settings(max_examples=600, deadline=None)
@given(dispositions())
def test_content_disposition_names_agree_with_python_multipart(value: bytes) -> None:
    assert disposition_names(value) == multipart_names(value)


@pytest.mark.parametrize(
    "value",
    [
        b'form-data; name="image_file"; filename="0_7.png"',
        b'form-data; name="image_file"; filename=""',
        b'form-data; name="note"',
        b'form-data; name="image_file"; filename="digit \xc3\xa9 7.png"',
    ],
)
def test_what_clients_send_takes_the_one_match_path(value: bytes) -> None:
    assert _PLAIN_DISPOSITION.fullmatch(value) is not None
    assert disposition_names(value) == multipart_names(value)
