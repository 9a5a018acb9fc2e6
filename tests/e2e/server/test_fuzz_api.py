"""Schemathesis over the OpenAPI schema, against the seed's gunicorn command: no 500, no answer
that breaks the schema. Bounded: a fixed number of examples per operation and generation mode."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode, checks

from digitflow_fastapi.app import create_app
from digitflow_fastapi.config import Settings
from tests.support.gunicorn_server import TrainedModel, serve
from tests.support.processes import ServerProcess

pytestmark = pytest.mark.slow  # starts real servers or trains a model

SCHEMA = schemathesis.openapi.from_dict(create_app(Settings()).openapi())
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]
# Negative cases need something to break: a parameter or a body.
CASES = [(op, GenerationMode.POSITIVE) for op in OPERATIONS] + [
    (op, GenerationMode.NEGATIVE) for op in OPERATIONS if len(op.query) or len(op.body)
]


@pytest.fixture(scope="module")
def fuzzed_server(
    trained_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    yield from serve(tmp_path_factory.mktemp("fuzz") / "gunicorn.log", trained_model)


@pytest.mark.parametrize(
    ("operation", "mode"), CASES, ids=[f"{op.label} {mode.value}" for op, mode in CASES]
)
def test_no_request_from_the_schema_gets_a_500_or_an_answer_outside_it(
    fuzzed_server: ServerProcess, operation: schemathesis.APIOperation, mode: GenerationMode
) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    def check(case: schemathesis.Case) -> None:
        # Random bytes are a schema-valid `binary` upload but not an image: refusing them (4xx)
        # is right, so "positive data accepted" is not checked; everything else is.
        case.call_and_validate(
            base_url=fuzzed_server.url, excluded_checks=[checks.positive_data_acceptance]
        )

    check()
