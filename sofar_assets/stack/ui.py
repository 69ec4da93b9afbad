"""``make ui``: the Dagster webserver behind a local-only guard, and the daemon beside it.

    python -m sofar_assets.stack.ui [--host 127.0.0.1] [--port 3000] [--allow-host NAME ...]
                                    [--no-daemon] -m sofar_assets.definitions

Dagster's webserver answers any ``Host`` header and runs GraphQL mutations (launch, terminate,
delete runs) sent by any page the operator's browser has open, GETs included. Locally that means
a web page can drive the UI (a cross-site request) or reach it under its own name through DNS
rebinding. :class:`LocalOnly` wraps the webserver's ASGI app and refuses, with a 403 naming the
reason:

- a ``Host`` that is not the bound address (``127.0.0.1:3000``; on a loopback address also
  ``localhost`` and ``[::1]``; more with ``--allow-host``): DNS rebinding;
- an ``Origin`` that is not one of those hosts (fetch/XHR/form posts and WebSockets from another
  site, ``Origin: null`` from sandboxed frames);
- a request the browser marks ``Sec-Fetch-Site: cross-site`` or ``same-site`` (another port on
  this machine), except a plain link followed to a page (``GET``, ``Sec-Fetch-Mode: navigate``,
  not ``/graphql``): links from the MLflow UI keep working, an ``<img src=/graphql?query=…>``
  does not.

The app is Dagster's own (``dagster_webserver.cli``, with all its options), only wrapped; the
daemon runs as ``dagster-daemon run`` over the same workspace, as ``dg dev`` runs it. In
production the UI is not exposed like this: it sits behind the cluster's identity-aware proxy
(docs/production.md).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterable

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _host_port(host: str, port: int) -> str:
    name = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"{name}:{port}"


class LocalOnly:
    """ASGI middleware: pass a request to ``app`` only if its Host is this server and it does not
    come from another site (see the module docstring); else a 403 (a WebSocket is closed)."""

    def __init__(self, app, host: str, port: int, extra_hosts: Iterable[str] = ()):
        self.app = app
        names = {host, *extra_hosts} | (set(LOOPBACK) if host in LOOPBACK else set())
        self.hosts = {_host_port(n, port).lower() for n in names}
        if port == 80:
            self.hosts |= {(f"[{n}]" if ":" in n else n).lower() for n in names}
        self.origins = {f"http://{h}" for h in self.hosts}

    def refusal(self, scope) -> str | None:
        """Why this request is refused (None: it is served)."""
        from sofar_assets.lib.common.names import shown

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if host.lower() not in self.hosts:
            return (
                f"Host {shown(host)!r} is not this server's address ({', '.join(sorted(self.hosts))}); "
                "open the UI at that address"
            )
        origin = headers.get("origin")
        if origin is not None and origin.lower() not in self.origins:
            return f"a request from {shown(origin)!r}: only pages of this server may call it"
        site = headers.get("sec-fetch-site")
        if site in ("cross-site", "same-site"):
            navigation = (
                scope["type"] == "http"
                and scope.get("method") in ("GET", "HEAD")
                and headers.get("sec-fetch-mode") == "navigate"
                and not scope.get("path", "").startswith("/graphql")
            )
            if not navigation:
                return f"a {site} request: only pages of this server may call it"
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):  # lifespan
            await self.app(scope, receive, send)
            return
        why = self.refusal(scope)
        if why is None:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await receive()  # websocket.connect; closing before accepting answers 403
            await send({"type": "websocket.close", "code": 1008, "reason": why[:120]})
            return
        body = f"refused: {why}\n".encode()
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=3000)
    ap.add_argument("--allow-host", action="append", default=[], help="another name the UI is opened under")
    ap.add_argument(
        "--no-daemon", action="store_true", help="the webserver only (no schedules, no run queue)"
    )
    args, workspace = ap.parse_known_args(argv)

    import dagster_webserver.cli as web

    make_app = web.create_app_from_workspace_process_context

    def guarded_app(*a, **kw):
        return LocalOnly(make_app(*a, **kw), args.host, args.port, args.allow_host)

    web.create_app_from_workspace_process_context = guarded_app  # what the CLI serves with uvicorn
    daemon = None
    if not args.no_daemon:
        daemon = subprocess.Popen([sys.executable, "-m", "dagster._daemon", "run", *workspace])
    try:
        return (
            web.cli.main(
                args=["--host", args.host, "--port", str(args.port), *workspace],
                prog_name="dagster-webserver",
                standalone_mode=False,
            )
            or 0
        )
    finally:
        if daemon is not None:
            daemon.terminate()
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()


if __name__ == "__main__":
    sys.exit(main())
