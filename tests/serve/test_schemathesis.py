"""Schemathesis against mil-serve's own OpenAPI (/v1/openapi.json): no request it generates gets a 500.

Bounded: 20 examples per operation (~20 operations: a few hundred requests). The app has a finished
job, and ids in paths are sometimes that job's, so the job routes are exercised past their 404s."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

pytestmark = pytest.mark.slow

EXAMPLES = 20


@pytest.fixture(scope="module")
def api(slides_root, tmp_path_factory):
    from fastapi.testclient import TestClient

    from serve_helpers import make_app, wait_done

    app = make_app(slides_root, tmp_path_factory.mktemp("state"), max_jobs=4)
    with TestClient(app) as c:
        job = c.post("/v1/jobs", json={"slide": "sub/lesion.svs", "model": "abmil_demo"}).json()
        wait_done(c, job["id"])
        app.state.known_job = job["id"]
        schema = schemathesis.openapi.from_asgi("/v1/openapi.json", app)

        @schema.hook
        def map_path_parameters(context, path_parameters):
            if path_parameters and "job_id" in path_parameters and hash(str(path_parameters)) % 2:
                path_parameters["job_id"] = job["id"]
            return path_parameters

        yield schema


def test_no_server_error(api):
    from hypothesis import given

    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 15
    seen = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call()
            seen.append((case.path, response.status_code))
            assert response.status_code < 500 or response.status_code == 503, \
                f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
            if response.status_code >= 400 and "application/json" in str(response.headers.get("content-type", "")):
                body = response.json()
                assert isinstance(body["error"]["code"], int) and "Traceback" not in body["error"]["line"]

        check()
    assert len(seen) >= 250
    ok_job_routes = {path for path, status in seen if "{job_id}" in path and status == 200}
    assert len(ok_job_routes) >= 5, ok_job_routes  # the known job was reached, not only 404s
    print(f"{len(seen)} requests over {len(operations)} operations: no 500")
