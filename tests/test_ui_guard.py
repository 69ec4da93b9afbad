"""`make ui` refuses what another website could send it: a foreign Host (DNS rebinding), a
foreign Origin, a cross-site request (a GraphQL mutation in an <img> GET); pages still open."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from sofar_assets.settings import REPO_ROOT
from sofar_assets.stack.ui import LocalOnly

MUTATION = "/graphql?query=mutation%20%7BdeleteRun(runId%3A%22x%22)%7B__typename%7D%7D"


async def _ws(websocket):
    await websocket.accept()
    await websocket.send_text("hello")
    await websocket.close()


def _app():
    calls = []

    async def ok(request):
        calls.append(request.url.path)
        return PlainTextResponse("served")

    app = Starlette(
        routes=[Route("/{path:path}", ok, methods=["GET", "POST"]), WebSocketRoute("/graphql", _ws)]
    )
    return app, calls


@pytest.fixture
def client():
    app, calls = _app()
    c = TestClient(LocalOnly(app, "127.0.0.1", 3000), base_url="http://127.0.0.1:3000")
    c.calls = calls
    return c


def test_the_bound_address_and_localhost_are_served(client):
    assert client.get("/runs").text == "served"
    assert client.get("/runs", headers={"host": "localhost:3000"}).status_code == 200
    same = {"origin": "http://127.0.0.1:3000", "sec-fetch-site": "same-origin"}
    assert client.post("/graphql", json={"query": "mutation {x}"}, headers=same).status_code == 200
    with client.websocket_connect(
        "/graphql", headers={"host": "localhost:3000", "origin": "http://localhost:3000"}
    ) as ws:
        assert ws.receive_text() == "hello"


@pytest.mark.parametrize(
    "host", ["attacker.example:3000", "attacker.example", "127.0.0.1:3001", "127.0.0.1", "0.0.0.0:3000", ""]
)
def test_a_foreign_host_is_refused(client, host):
    """DNS rebinding: the attacker's name resolves to 127.0.0.1, the browser sends its own Host."""
    r = client.get("/runs", headers={"host": host})
    assert r.status_code == 403 and "is not this server's address" in r.text
    assert client.calls == [], "the app never saw it"


@pytest.mark.parametrize(
    "origin", ["http://attacker.example", "null", "http://127.0.0.1:5000", "https://127.0.0.1:3000"]
)
def test_a_foreign_origin_is_refused_get_and_post(client, origin):
    assert client.get(MUTATION, headers={"origin": origin}).status_code == 403
    r = client.post("/graphql", json={"query": "mutation {deleteRun}"}, headers={"origin": origin})
    assert r.status_code == 403 and "only pages of this server" in r.text
    with (
        pytest.raises(WebSocketDisconnect) as closed,
        client.websocket_connect("/graphql", headers={"host": "127.0.0.1:3000", "origin": origin}) as ws,
    ):
        ws.receive_text()
    assert closed.value.code == 1008 and "only pages of this server" in closed.value.reason
    assert client.calls == []


def test_cross_site_requests_without_origin_are_refused_but_links_open_pages(client):
    img = {"sec-fetch-site": "cross-site", "sec-fetch-mode": "no-cors", "sec-fetch-dest": "image"}
    assert client.get(MUTATION, headers=img).status_code == 403
    link_to_graphql = {
        "sec-fetch-site": "cross-site",
        "sec-fetch-mode": "navigate",
        "sec-fetch-dest": "document",
    }
    assert client.get(MUTATION, headers=link_to_graphql).status_code == 403
    from_mlflow = {"sec-fetch-site": "same-site", "sec-fetch-mode": "navigate", "sec-fetch-dest": "document"}
    assert client.get("/runs/abc", headers=from_mlflow).status_code == 200  # the MLflow UI's links
    assert client.calls == ["/runs/abc"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(port: int, method: str, path: str, headers: dict, body: str | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        conn.close()


def test_make_ui_serves_dagster_behind_the_guard(tmp_path):
    """The real webserver as `make ui` starts it (without the daemon), on a free port."""
    defs = tmp_path / "defs.py"
    defs.write_text(
        "import dagster as dg\n\n@dg.asset\ndef a():\n    return 1\n\ndefs = dg.Definitions(assets=[a])\n"
    )
    (tmp_path / "home").mkdir()
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sofar_assets.stack.ui", "--port", str(port), "--no-daemon", "-f", str(defs)],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "DAGSTER_HOME": str(tmp_path / "home")},
        start_new_session=True,
    )
    here = {"Host": f"127.0.0.1:{port}"}
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if _request(port, "GET", "/server_info", here)[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, "the webserver exited"
            assert time.monotonic() < deadline, "the webserver did not answer in 180 s"
            time.sleep(1)
        status, text = _request(port, "GET", "/server_info", {"Host": f"rebound.example:{port}"})
        assert status == 403 and "is not this server's address" in text
        query = '{"query": "mutation { terminateRun(runId: \\"x\\") { __typename } }"}'
        status, text = _request(
            port,
            "POST",
            "/graphql",
            {**here, "Origin": "http://attacker.example", "Content-Type": "application/json"},
            query,
        )
        assert status == 403 and "only pages of this server" in text
        status, text = _request(
            port,
            "POST",
            "/graphql",
            {**here, "Origin": f"http://127.0.0.1:{port}", "Content-Type": "application/json"},
            '{"query": "{ version }"}',
        )
        assert status == 200 and '"version"' in text, text
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
