"""The app's routes: each path matches one path template alone, so the order the routers are included
in (the generation endpoints first, as most requests are theirs) never changes which one answers."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from sloth_serve.api import create_app
from sloth_serve.api.http_metrics import path_routes
from sloth_serve.config import Config


def test_every_path_matches_only_its_own_route() -> None:
    app = create_app(Config(allow_runtime_lora=True))
    routes = [(template, regex) for template, regex in path_routes(app.routes)
              if not template.startswith(("/docs", "/redoc", "/openapi"))]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models/{model_id}", "/v1/load_lora_adapter"} <= {
        template for template, _ in routes}
    for template, _ in routes:
        path = re.sub(r"\{[^}]+\}", "some-id", template)
        # (several methods of one path, such as GET and DELETE of a response, are one router's)
        assert {t for t, regex in routes if regex.match(path)} == {template}


def test_a_wrong_method_is_still_405() -> None:
    client = TestClient(create_app(Config()))  # no lifespan: the model never loads, routing still answers
    assert client.get("/v1/chat/completions").status_code == 405
    assert client.post("/v1/models").status_code == 405
