"""Start and stop the production servers as real processes on this machine.

``Stack`` owns one temporary folder and every process it starts:

- PostgreSQL from the machine's binaries (``pg_config --bindir``), run as an unprivileged user
  (``nobody`` when we are root: PostgreSQL refuses root) over a folder that user owns, on a
  loopback port, with a password (SCRAM) for TCP clients;
- the GCS emulator (PyPI ``gcp-storage-emulator``, in memory);
- the MLflow tracking server (``mlflow server``): PostgreSQL backend store, artifacts proxied
  (``--serve-artifacts``) into a ``gs://`` bucket of the GCS emulator, basic auth on;
- the Dagster webserver and daemon over an instance on PostgreSQL (``deploy/prod-local``).

Every process starts in its own session and carries ``SOFAR_STACK_ID=<id>`` in its environment.
``close()`` stops them in reverse order, then kills anything still carrying the marker (a run
worker a daemon forked) and deletes the folder: nothing outlives the stack, also on an error or
Ctrl-C (``Stack`` is a context manager).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import requests

MARKER = "SOFAR_STACK_ID"
REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "deploy" / "prod-local"
BIN = Path(sys.executable).parent  # this venv's console scripts: mlflow, dagster-*, gcp-storage-emulator
PG_USER = "sofar"
MLFLOW_ADMIN = "admin"


class StackError(RuntimeError):
    """A component did not start or stop; the message names it and ends with its log tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_free(port: int, what: str) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise StackError(f"{what}: port 127.0.0.1:{port} is in use "
                             "(another prod-local running?)") from None
    return port


def render(template: str, dest: Path, **values) -> Path:
    """``deploy/prod-local/<template>`` with ``$name`` placeholders filled, written to ``dest``."""
    text = string.Template((TEMPLATES / template).read_text()).substitute(values)
    dest.write_text(text)
    return dest


class Service:
    """One started process (its own session, so its children stop with it)."""

    def __init__(self, name: str, endpoint: str, proc: subprocess.Popen, log: Path,
                 stop_signal=signal.SIGTERM):
        self.name, self.endpoint, self.proc, self.log = name, endpoint, proc, log
        self.stop_signal = stop_signal

    def tail(self, n: int = 25) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise StackError(f"{self.name} exited with code {self.proc.returncode}; "
                             f"log {self.log}:\n{self.tail()}")

    def wait_until(self, ready: Callable[[], bool], timeout_s: float, what: str) -> float:
        t0 = time.monotonic()
        while True:
            self.check()
            try:
                if ready():
                    return time.monotonic() - t0
            except Exception:  # not up yet: connection refused, 503, ...
                pass
            if time.monotonic() - t0 > timeout_s:
                raise StackError(f"{self.name}: {what} not ready after {timeout_s:.0f} s; "
                                 f"log {self.log}:\n{self.tail()}")
            time.sleep(0.2)

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, self.stop_signal)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the leader and whatever it left in its session
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)


def marked_processes(stack_id: str) -> list[tuple[int, str]]:
    """``(pid, command line)`` of every live process whose environment carries this stack's marker."""
    needle = f"{MARKER}={stack_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                found.append((int(entry.name), cmd))
        except OSError:  # gone, or not ours to read
            continue
    return found


class Postgres:
    """A throwaway PostgreSQL server; ``dsn(db)`` for clients, the password in ``password``."""

    def __init__(self, stack: Stack, port: int):
        self.stack, self.port = stack, port
        self.password = secrets.token_urlsafe(18)
        self.dir = stack.root / "postgres"
        self.service: Service | None = None

    def _as_owner(self, cmd: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return cmd
        pw = pwd.getpwnam("nobody")
        return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", "--", *cmd]

    def start(self) -> Postgres:
        bindir = Path(subprocess.run(["pg_config", "--bindir"],
                                     check=True, capture_output=True, text=True).stdout.strip())
        for exe in ("initdb", "postgres"):
            if not (bindir / exe).exists():
                raise StackError(f"PostgreSQL: {bindir / exe} not found (pg_config --bindir); "
                                 "install the server package")
        self.dir.mkdir()
        pwfile = self.dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            pw = pwd.getpwnam("nobody")
            for p in (self.dir, pwfile):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        self.dir.chmod(0o700)
        env = self.stack.env(LC_ALL="C")
        init = subprocess.run(
            self._as_owner([str(bindir / "initdb"), "-D", str(self.dir / "data"), "-U", PG_USER,
                            f"--pwfile={pwfile}", "--auth-host=scram-sha-256", "--auth-local=trust",
                            "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"]),
            cwd=self.dir, env=env, capture_output=True, text=True,
        )  # fmt: skip
        pwfile.unlink()
        if init.returncode != 0:
            raise StackError(f"PostgreSQL initdb failed ({init.returncode}):\n"
                             f"{init.stdout[-2000:]}{init.stderr[-2000:]}")
        cmd = self._as_owner([
            str(bindir / "postgres"), "-D", str(self.dir / "data"), "-c", "listen_addresses=127.0.0.1",
            "-c", f"port={self.port}", "-c", f"unix_socket_directories={self.dir}",
            "-c", "max_connections=200",
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
        ])  # fmt: skip
        # SIGINT is PostgreSQL's "fast" shutdown: roll back open transactions, stop at once
        self.service = self.stack.spawn("PostgreSQL", f"127.0.0.1:{self.port}", cmd, env=env, cwd=self.dir,
                                        stop_signal=signal.SIGINT)
        self.service.wait_until(lambda: self.connect().close() is None, 60, "connections")
        return self

    def connect(self, db: str = "postgres"):
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=PG_USER, password=self.password,
                                dbname=db, connect_timeout=3)

    def create_database(self, name: str) -> str:
        con = self.connect()
        try:
            con.autocommit = True
            with con.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            con.close()
        return name

    def dsn(self, db: str) -> str:
        return f"postgresql+psycopg2://{PG_USER}:{self.password}@127.0.0.1:{self.port}/{db}"

    def query(self, db: str, sql: str) -> list[tuple]:
        con = self.connect(db)
        try:
            with con.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall()
        finally:
            con.close()


class GcsEmulator:
    """The GCS API on loopback (in memory). google-cloud-storage honours ``STORAGE_EMULATOR_HOST``."""

    def __init__(self, stack: Stack, port: int):
        self.stack, self.port = stack, port
        self.url = f"http://127.0.0.1:{port}"
        self.service: Service | None = None

    def start(self) -> GcsEmulator:
        folder = self.stack.root / "gcs"
        folder.mkdir()
        cmd = [str(BIN / "gcp-storage-emulator"), "start", "--host", "127.0.0.1", "--port", str(self.port),
               "--in-memory", "-q"]
        self.service = self.stack.spawn("GCS emulator", self.url, cmd, env=self.stack.env(), cwd=folder)
        self.service.wait_until(lambda: requests.get(f"{self.url}/storage/v1/b", timeout=2).ok, 60, "the API")
        return self

    def client(self):
        """A client of this emulator (anonymous, its own endpoint), from the one factory."""
        from sofar_assets.lib.data import storage

        return storage.gcs_client(endpoint=self.url, project="sofar-local")

    def create_buckets(self, *names: str) -> None:
        client = self.client()
        for name in names:
            client.create_bucket(name)

    def objects(self, bucket: str, prefix: str = "") -> list[str]:
        return [b.name for b in self.client().list_blobs(bucket, prefix=prefix)]


class MlflowServer:
    """``mlflow server --app-name basic-auth`` over PostgreSQL, artifacts proxied into ``gs://``.

    The admin password goes to the server through ``MLFLOW_AUTH_ADMIN_PASSWORD``; the pipeline
    gets its own non-admin user (``user``/``password``), which clients read from
    ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``.
    """

    def __init__(self, stack: Stack, port: int, pg: Postgres, gcs: GcsEmulator, artifacts_destination: str,
                 workers: int = 2):
        self.stack, self.port, self.pg, self.gcs, self.workers = stack, port, pg, gcs, workers
        self.url = f"http://127.0.0.1:{port}"
        self.artifacts_destination = artifacts_destination
        self.admin_password = secrets.token_urlsafe(18)
        self.user, self.password = "sofar-pipeline", secrets.token_urlsafe(18)
        self.service: Service | None = None

    def start(self) -> MlflowServer:
        folder = self.stack.root / "mlflow"
        folder.mkdir()
        backend = self.pg.create_database("mlflow")
        auth_db = self.pg.create_database("mlflow_auth")
        ini = render("basic_auth.ini", folder / "basic_auth.ini", auth_database_uri=self.pg.dsn(auth_db),
                     admin_username=MLFLOW_ADMIN)
        env = self.stack.env(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_AUTH_ADMIN_PASSWORD=self.admin_password,
                             # the CSRF key of the auth app
                             MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_urlsafe(24),
                             STORAGE_EMULATOR_HOST=self.gcs.url)
        cmd = [str(BIN / "mlflow"), "server", "--app-name", "basic-auth",
               "--backend-store-uri", self.pg.dsn(backend),
               "--serve-artifacts", "--artifacts-destination", self.artifacts_destination,
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers)]
        self.service = self.stack.spawn("MLflow server", self.url, cmd, env=env, cwd=folder)
        self.service.wait_until(lambda: requests.get(f"{self.url}/health", timeout=2).ok, 180, "/health")
        r = requests.post(f"{self.url}/api/2.0/mlflow/users/create",
                          json={"username": self.user, "password": self.password},
                          auth=(MLFLOW_ADMIN, self.admin_password), timeout=30)
        if not r.ok:
            raise StackError(f"MLflow server: creating user {self.user!r} failed: "
                             f"{r.status_code} {r.text[:300]}")
        return self

    def client_env(self) -> dict[str, str]:
        """What a pipeline process needs to reach this server: credentials by environment only."""
        return {"MLFLOW_TRACKING_USERNAME": self.user, "MLFLOW_TRACKING_PASSWORD": self.password}


class Dagster:
    """A Dagster instance on PostgreSQL (``deploy/prod-local/dagster.yaml``) and, on request,
    its webserver and daemon over the repo's code location (``SOFAR_CONFIG`` from ``env``)."""

    def __init__(self, stack: Stack, pg: Postgres, env: dict[str, str] | None = None):
        self.stack, self.pg = stack, pg
        self.home = stack.root / "dagster_home"
        self.home.mkdir()
        db = pg.create_database("dagster")
        render("dagster.yaml", self.home / "dagster.yaml")
        self.workspace = render("workspace.yaml", self.home / "workspace.yaml", repo=str(REPO))
        self.env = {"DAGSTER_HOME": str(self.home),
                    "DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(pg.port),
                    "DAGSTER_PG_USER": PG_USER, "DAGSTER_PG_PASSWORD": pg.password, "DAGSTER_PG_DB": db,
                    # this checkout's code in every Dagster process (code servers, run and step workers)
                    "PYTHONPATH": os.pathsep.join(
                        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
                    **(env or {})}
        self.url: str | None = None

    def instance(self):
        """A ``DagsterInstance`` on this home (sets the variables its dagster.yaml reads in this process)."""
        import dagster as dg

        os.environ.update(self.env)
        return dg.DagsterInstance.from_config(str(self.home))

    def cli(self, *args: str) -> str:
        out = subprocess.run([str(BIN / "dagster"), *args], env=self.stack.env(**self.env), cwd=REPO,
                             capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise StackError(f"dagster {' '.join(args)} failed:\n{out.stdout[-1500:]}{out.stderr[-1500:]}")
        return out.stdout

    def start_webserver(self, port: int) -> Service:
        self.url = f"http://127.0.0.1:{port}"
        cmd = [str(BIN / "dagster-webserver"), "-w", str(self.workspace), "-h", "127.0.0.1", "-p", str(port)]
        svc = self.stack.spawn("Dagster webserver", self.url, cmd, env=self.stack.env(**self.env), cwd=REPO)
        svc.wait_until(lambda: requests.get(f"{self.url}/server_info", timeout=3).ok, 300, "/server_info")
        svc.wait_until(self._location_loaded, 300, "the code location")
        return svc

    def _location_loaded(self) -> bool:
        data = self.graphql("{ workspaceOrError { ... on Workspace { locationEntries { name "
                            "locationOrLoadError { __typename ... on PythonError { message } } } } } }")
        entries = data["workspaceOrError"]["locationEntries"]
        for e in entries:
            if e["locationOrLoadError"] and e["locationOrLoadError"]["__typename"] == "PythonError":
                raise StackError(f"code location {e['name']} failed to load: "
                                 f"{e['locationOrLoadError']['message']}")
        return bool(entries) and all(e["locationOrLoadError"] for e in entries)

    def start_daemon(self) -> Service:
        cmd = [str(BIN / "dagster-daemon"), "run", "-w", str(self.workspace)]
        svc = self.stack.spawn("Dagster daemon", "(no port)", cmd, env=self.stack.env(**self.env), cwd=REPO)

        def healthy() -> bool:
            q = "{ instance { daemonHealth { allDaemonStatuses { daemonType healthy required } } } }"
            statuses = self.graphql(q)["instance"]["daemonHealth"]["allDaemonStatuses"]
            return all(s["healthy"] for s in statuses if s["required"])

        svc.wait_until(healthy, 300, "daemon heartbeats")
        return svc

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        r = requests.post(f"{self.url}/graphql", json={"query": query, "variables": variables or {}},
                          timeout=120)
        r.raise_for_status()
        body = r.json()
        if body.get("errors"):
            raise StackError(f"GraphQL error: {body['errors']}")
        return body["data"]


class Stack:
    """The owner of every process and file started for one prod-local (or test) session."""

    def __init__(self, prefix: str = "sofar-stack-"):
        self.id = uuid.uuid4().hex
        self.root = Path(tempfile.mkdtemp(prefix=prefix))
        self.root.chmod(0o711)  # the unprivileged PostgreSQL user must reach its own folder inside
        self.services: list[Service] = []
        self.leftovers: list[tuple[int, str]] = []

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, MARKER: self.id, **extra}

    def spawn(self, name: str, endpoint: str, cmd: list[str], *, env: dict[str, str], cwd: Path,
              stop_signal=signal.SIGTERM) -> Service:
        log = self.root / f"{name.lower().replace(' ', '-')}.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        svc = Service(name, endpoint, proc, log, stop_signal)
        self.services.append(svc)
        return svc

    def postgres(self, port: int | None = None) -> Postgres:
        return Postgres(self, port or free_port()).start()

    def gcs(self, port: int | None = None) -> GcsEmulator:
        return GcsEmulator(self, port or free_port()).start()

    def mlflow(self, pg: Postgres, gcs: GcsEmulator, artifacts_destination: str, port: int | None = None,
               workers: int = 2) -> MlflowServer:
        return MlflowServer(self, port or free_port(), pg, gcs, artifacts_destination, workers).start()

    def close(self) -> list[tuple[int, str]]:
        """Stop everything (reverse start order), kill marked stragglers, delete the folder.
        Returns the stragglers that had to be killed (normally none)."""
        for svc in reversed(self.services):
            try:
                svc.stop()
            except Exception as exc:  # keep stopping the others
                print(f"stopping {svc.name}: {exc}", file=sys.stderr)
        self.services.clear()
        self.leftovers = marked_processes(self.id)
        for pid, _ in self.leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)
        return self.leftovers

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
