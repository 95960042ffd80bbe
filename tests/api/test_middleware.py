"""HTTP guards that act before a route runs (no model needed): body-size limit, CORS, API keys."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from sloth_serve.api import create_app
from sloth_serve.config import Config


@pytest.fixture()
def client() -> TestClient:
    # Without `with`, the lifespan (model loading) never starts: only the middleware is exercised.
    app = create_app(Config(max_request_bytes=1024, allowed_origins=("https://ui.example",), api_key=("k1", "k2")))
    return TestClient(app)


def test_body_over_the_limit_is_413_with_an_openai_error(client: TestClient) -> None:
    r = client.post("/v1/completions", content=b"x" * 5000, headers={"Authorization": "Bearer k1"})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large" and "1024" in r.json()["error"]["message"]


def test_streamed_body_without_length_is_cut_at_the_limit(client: TestClient) -> None:
    def chunks():  # type: ignore[no-untyped-def]
        for _ in range(10):
            yield b"y" * 500

    r = client.post("/v1/completions", content=chunks(), headers={"Authorization": "Bearer k2"})
    assert r.status_code == 413


def test_cors_preflight_allows_configured_origin_only(client: TestClient) -> None:
    ok = client.options("/v1/chat/completions", headers={
        "Origin": "https://ui.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://ui.example"
    other = client.options("/v1/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in other.headers


def test_missing_or_wrong_key_is_401_and_health_stays_open(client: TestClient) -> None:
    assert client.post("/v1/completions", json={}).status_code == 401
    wrong = client.post("/v1/completions", json={}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    assert client.get("/health").status_code == 503  # open (no key), and not ready: nothing loaded
    assert client.get("/metrics").status_code == 200
