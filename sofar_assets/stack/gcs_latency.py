"""The GCS emulator (PyPI ``gcp-storage-emulator``) in this process, threaded, with a latency
added to every object download: what ``bench/bench_scale.py`` reads through the real
google-cloud-storage client (``STORAGE_EMULATOR_HOST``), so the benchmark measures the client,
its connection pool and the reads in flight that production runs, not a ``time.sleep``.

The emulator's own server handles one request at a time (``http.server.HTTPServer``); this one
serves each connection in its own thread, as GCS serves concurrent requests.
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass, field
from http import server

from gcp_storage_emulator.server import RequestHandler
from gcp_storage_emulator.storage import Storage


class _SlowMedia(RequestHandler):
    latency_s = 0.0
    protocol_version = "HTTP/1.1"  # keep-alive, as GCS: the clients' connection pools are reused
    # TCP_NODELAY, as GCS's front ends: the handler writes the headers and the body in two sends;
    # with Nagle's algorithm the body waited for the client's delayed ACK of the headers (40 ms on
    # Linux), which added ~40 ms to every "50 ms" download on a kept-alive connection
    disable_nagle_algorithm = True

    def do_GET(self):
        if "alt=media" in self.path:  # an object download (not a metadata or a list request)
            time.sleep(self.latency_s)
        super().do_GET()

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


class _Server(server.ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's listen backlog is 5: the 2 x 32 connections a scoring run's workers open at
    # once overflowed it, and each dropped SYN was resent after Linux's 1 s initial RTO (the first
    # batch of every worker took 1.1-2.8 s instead of ~0.1 s). GCS's front ends accept them all
    request_queue_size = 1024
    connections = 0

    def process_request(self, request, client_address):
        self.connections += 1  # one per TCP connection the clients opened
        super().process_request(request, client_address)


@dataclass
class LatencyGcs:
    """A running emulator: ``url`` for ``STORAGE_EMULATOR_HOST``; ``connections`` opened so far."""

    latency_s: float = 0.05
    host: str = "127.0.0.1"
    _httpd: _Server | None = field(default=None, repr=False)

    def start(self) -> LatencyGcs:
        handler = type("Handler", (_SlowMedia,), {"latency_s": self.latency_s})
        self._httpd = _Server((self.host, 0), functools.partial(handler, Storage(use_memory_fs=True)))
        threading.Thread(target=self._httpd.serve_forever, name="gcs-emulator", daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._httpd.server_address[1]}"

    @property
    def connections(self) -> int:
        return self._httpd.connections

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def __enter__(self) -> LatencyGcs:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    """``python -m sofar_assets.stack.gcs_latency [LATENCY_S]``: serve until killed; the first
    line printed is the URL for ``STORAGE_EMULATOR_HOST`` (a process of its own, so that its
    request threads do not share the GIL of the process under test)."""
    import sys

    gcs = LatencyGcs(latency_s=float(sys.argv[1]) if len(sys.argv) > 1 else 0.05).start()
    print(gcs.url, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
