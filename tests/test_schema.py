"""The OpenAPI schema is what the server does: schemathesis reads ``/openapi.json`` of a live
server (the embedded model, ``edgellm serve`` on loopback), generates requests for every
operation from it, valid ones and invalid ones, and no answer may be a 5xx.

The number of cases is bounded per operation (``MAX_EXAMPLES`` per generation mode, plus
schemathesis's boundary cases), and so is each generation: a context of 64 tokens."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode

from server.cli import DEFAULT_MODEL
from tests.processes import served

pytestmark = pytest.mark.cluster
log = logging.getLogger(__name__)

MODEL = "default_model"
MAX_EXAMPLES = 25
CASES: Counter[str] = Counter()  # operation -> cases sent
STATUSES: Counter[int] = Counter()


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log_path = tmp_path_factory.mktemp("logs") / "serve.log"
    with served(DEFAULT_MODEL, "--model-name", MODEL, "--max-context", "64", log_path=log_path) as base:
        yield base
    assert "Traceback" not in log_path.read_text(), log_path.read_text()[-4000:]


def _app_schema() -> dict:
    """The schema the server serves, built in-process at collection time (one pytest item per
    operation); ``test_the_live_server_serves_this_schema`` checks it is the live one."""
    from server.app import create_app
    from server.state import ServerState

    return create_app(ServerState(MODEL)).openapi()


schema = schemathesis.openapi.from_dict(_app_schema())
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=MAX_EXAMPLES)


def test_the_live_server_serves_this_schema(url: str) -> None:
    assert httpx.get(f"{url}/openapi.json").json() == _app_schema()


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case: schemathesis.Case, url: str) -> None:
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        body["model"] = MODEL  # past the model check, into sampling, tokenizing and generation
    response = case.call(base_url=url, timeout=120)
    CASES[f"{case.operation.method.upper()} {case.operation.path}"] += 1
    STATUSES[response.status_code] += 1
    assert response.status_code < 500, (case.as_curl_command(), response.status_code, response.text[:2000])


def test_every_operation_was_exercised(url: str) -> None:
    """Runs after the generated cases (pytest keeps file order): each operation of the schema got
    cases, and the generation endpoints were reached past validation (some answered 200)."""
    paths = httpx.get(f"{url}/openapi.json").json()["paths"]
    operations = {f"{method.upper()} {path}" for path, ops in paths.items() for method in ops}
    assert len(operations) == 9
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize", "POST /detokenize"} <= {
        f"{m.upper()} {p}" for p, ops in paths.items() for m, op in ops.items() if "requestBody" in op}
    assert set(CASES) == operations, sorted(operations - set(CASES))
    assert STATUSES[200] > 0 and not any(code >= 500 for code in STATUSES)
    log.warning("schemathesis: %d operations, %d cases, statuses %s", len(CASES), sum(CASES.values()),
                dict(sorted(STATUSES.items())))
    for operation, count in sorted(CASES.items()):
        log.warning("  %-28s %d cases", operation, count)
