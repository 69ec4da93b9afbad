"""Start the local BigQuery emulator (bqemulator, set up by scripts/bqemulator.sh) for tests.

Test-only: the emulator runs from ./.venv-bq as a subprocess on a free loopback port, with HOME
pointed at ./.venv-bq/home where the setup script put DuckDB's spatial and avro extensions.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from sofar_assets.lib.warehouse.bigquery import EmulatorHttp, emulator_client

REPO = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("SOFAR_BQEMU_VENV", REPO / ".venv-bq"))  # override: another checkout's venv
SETUP_COMMAND = "bash scripts/bqemulator.sh"


class EmulatorUnavailable(RuntimeError):
    """The emulator is not set up or did not start; the message says why and how to fix it."""


class EmulatorSession(EmulatorHttp):
    """The HTTP session google-cloud-bigquery uses against the emulator in tests.

    The emulator's media-type fix comes from :class:`EmulatorHttp` (what the production
    resource uses with ``api_endpoint``); on top, a refused connection (emulator gone) raises a
    non-retryable error at once, instead of the client's default retry loop waiting ten minutes.
    """

    def request(self, method, url, data=None, headers=None, **kwargs):
        try:
            return super().request(method, url, data=data, headers=headers, **kwargs)
        except requests.ConnectionError as exc:
            raise EmulatorUnavailable(f"BigQuery emulator at {url} is not reachable: {exc}") from None


def _die_with_parent() -> None:
    """Linux: SIGTERM the emulator when the test process dies, so a killed run leaves no server."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    """One emulator process. ``start()`` returns when ``/readyz`` answers 200."""

    def __init__(self, project: str = "sofar-test", startup_timeout_s: float = 60.0):
        self.project = project
        self.startup_timeout_s = startup_timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None
        self._workdir = tempfile.TemporaryDirectory(prefix="bqemu-")
        self.log_path = Path(self._workdir.name) / "bqemulator.log"
        self.startup_s: float | None = None

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def start(self) -> Emulator:
        exe = VENV / "bin" / "bqemulator"
        home = VENV / "home"
        if not exe.exists() or not (home / ".duckdb").is_dir():
            raise EmulatorUnavailable(
                f"BigQuery emulator not set up ({exe} or {home}/.duckdb missing): run `{SETUP_COMMAND}`"
            )
        cmd = [
            str(exe), "start", "--ephemeral", "--project", self.project,
            "--rest-host", "127.0.0.1", "--rest-port", str(self.port), "--grpc-port", "0",
            "--log-level", "warning", "--log-format", "console",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("BQEMU_")}
        env["HOME"] = str(home)
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            # cwd: a private folder, so no stray .bqemu.toml changes the settings
            self._proc = subprocess.Popen(
                cmd,
                cwd=self._workdir.name,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        while True:
            if self._proc.poll() is not None:
                raise EmulatorUnavailable(
                    f"bqemulator exited with code {self._proc.returncode} at start "
                    f"(is `{SETUP_COMMAND}` complete?):\n{self.log_tail()}"
                )
            try:
                if requests.get(self.url + "/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() - t0 > self.startup_timeout_s:
                tail = self.log_tail()
                self.stop()
                raise EmulatorUnavailable(
                    f"bqemulator not ready after {self.startup_timeout_s:.0f} s:\n{tail}"
                )
            time.sleep(0.1)
        self.startup_s = time.monotonic() - t0
        return self

    def client(self):
        return emulator_client(self.project, self.url, http=EmulatorSession())

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        self._proc = None
        self._workdir.cleanup()
