"""The champion, served: single-photo latency over HTTP and batch throughput per CPU core.

    python bench/bench_serving.py [--quick] [--samples DIR] [--rounds N] [--core 0]

1. Registers efficientnet_lite0 (the offline ImageNet weights, 7 classes, a kNN bank like a
   trained package's) in a throw-away MLflow registry exactly as ``sofar_classifier`` does
   (safetensors + ONNX + code_paths), calibrates it (``calibration.json``), sets ``@champion``.
2. Starts ``mlflow models serve -m models:/bench@champion --env-manager local`` pinned to ONE core
   (``taskset -c CORE``; the model's ONNX Runtime runs 1 intra-op thread) and posts each real photo
   (the 20 shared SOFAR samples, full size, base64 JSON) with a keep-alive HTTP client on another
   core: p50/p95 latency of a photo in, its row out (decode, preprocess, network, OOD included).
3. In this process, pinned to the same single core (``torch.set_num_threads(1)``, ORT intra-op 1):
   batch throughput of ONNX Runtime vs PyTorch eager on the same decoded batch, in interleaved
   rounds; and end-to-end images/s (decode + network + scoring) of each runtime.

Last line: ``RESULT p95_ms=<x> ort_vs_eager=<x>``. Targets: p95 <= 40 ms, ort_vs_eager >= 2.0.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a plain script from a checkout
    sys.path.insert(0, str(REPO))

DEFAULT_SAMPLES = Path(__file__).resolve().parents[2] / "shared/data/sofar-public-samples"
CLASSES = ["normal", "defect", "dirt", "bubble_wash", "wash_machine", "dashboard", "seat"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(pid: int) -> set[int]:
    """``pid`` and its descendants (Linux /proc)."""
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, todo = set(), [pid]
    while todo:
        p = todo.pop()
        tree.add(p)
        todo += [c for c, pp in parents.items() if pp == p and c not in tree]
    return tree


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and its descendants: unlike wall time,
    what a request costs does not grow with the machine's load."""
    total = 0
    for p in _tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


def _tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants (Linux /proc; 0 elsewhere)."""
    try:
        total = 0
        for p in _tree(pid):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        return total
    except OSError:
        return 0


def register(tmp: Path, bank: int) -> str:
    """A registered, calibrated champion in a sqlite registry under ``tmp``; returns the tracking URI."""
    import mlflow
    import torch

    from sofar_assets.lib.model import ood
    from sofar_assets.lib.model.conformal import LabelSets
    from sofar_assets.lib.model.models import ModelSpec, build_model
    from sofar_assets.lib.serving import registry
    from sofar_assets.lib.serving.packaging import log_and_register

    uri = f"sqlite:///{tmp}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    exp = mlflow.create_experiment("bench", artifact_location=(tmp / "art").as_uri())
    torch.manual_seed(0)
    spec = ModelSpec(num_classes=len(CLASSES), pretrained=True)  # efficientnet_lite0, offline weights
    model = build_model(spec).eval()
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(bank, model.backbone.num_features)).astype(np.float32)
    with mlflow.start_run(experiment_id=exp):
        reg = log_and_register(model, spec, CLASSES, "bench", extra={"ood_knn_k": 1},
                               ood_stats=ood.fit_feature_stats(feats, np.arange(bank) % len(CLASSES)))
    client = mlflow.MlflowClient()
    registry.write_calibration(client, "bench", str(reg["version"]),
                               registry.Calibration("knn", 1.0, 0.5, LabelSets("lac", 0.9, 0.9, 100)))
    client.set_registered_model_alias("bench", "champion", str(reg["version"]))
    return uri


def serve_latency(tracking_uri: str, photos: list[bytes], rounds: int, core: int,
                  tmp: Path) -> tuple[np.ndarray, int, float]:
    """Seconds per request (one photo each) against a real `mlflow models serve` on one core, the
    server's resident memory (bytes, its process tree) after them and its CPU ms per request."""
    import requests

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the model's code_paths carry the code
    env |= {"MLFLOW_TRACKING_URI": tracking_uri, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/bench@champion", "--env-manager",
           "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    if shutil.which("taskset"):
        cmd = ["taskset", "-c", str(core), *cmd]
    log = open(tmp / "serve.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow models serve exited:\n{(tmp / 'serve.log').read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/ping", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() - t0 > 300:
                raise RuntimeError("mlflow models serve did not answer /ping in 300 s")
            time.sleep(0.5)
        print(f"server ready in {time.monotonic() - t0:.1f} s (pinned to core {core})", flush=True)
        session = requests.Session()  # keep-alive, as an app's client would
        bodies = [{"dataframe_records": [{"image": base64.b64encode(p).decode(), "image_id": str(i)}]}
                  for i, p in enumerate(photos)]
        for body in bodies[:5]:  # warm-up
            session.post(f"{url}/invocations", json=body, timeout=60).raise_for_status()
        times = []
        cpu0 = _tree_cpu_s(proc.pid)
        for _ in range(rounds):
            for body in bodies:
                t = time.perf_counter()
                r = session.post(f"{url}/invocations", json=body, timeout=60)
                times.append(time.perf_counter() - t)
                r.raise_for_status()
                row = r.json()["predictions"][0]
                if row["error"] is not None:
                    raise RuntimeError(f"photo {row['image_id']}: {row['error']}")
        cpu_ms = (_tree_cpu_s(proc.pid) - cpu0) / len(times) * 1000
        return np.asarray(times), _tree_rss(proc.pid), cpu_ms
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)
        log.close()


def throughput(photos: list[bytes], rounds: int, tracking_uri: str) -> dict:
    """images/s on one core: network only (ORT vs eager on one decoded batch) and end to end."""
    import mlflow
    import torch

    from sofar_assets.lib.data.images import load_image_array
    from sofar_assets.lib.serving.packaging import load_registered
    from sofar_assets.lib.serving.predictor import Predictor, Scoring, make_runner

    torch.set_num_threads(1)
    mlflow.set_tracking_uri(tracking_uri)
    model, meta = load_registered("models:/bench@champion")
    runners = {"eager": make_runner(model, meta, "torch", "cpu"), "ort": make_runner(model, meta, "onnx", threads=1)}
    cal = meta["calibration"]
    predictors = {k: Predictor(r, Scoring(meta["classes"], cal["threshold"], cal["score_method"], cal["temperature"],
                                          None, meta["ood_stats"], 1)) for k, r in runners.items()}
    size = int(meta["spec"]["image_size"])
    x = torch.from_numpy(np.stack([load_image_array(p, str(i), size) for i, p in enumerate(photos)]))
    for r in runners.values():  # warm-up
        r(x, features=True)
    net = {k: [] for k in runners}
    e2e = {k: [] for k in runners}
    for i in range(rounds):
        order = list(runners) if i % 2 == 0 else list(runners)[::-1]  # interleaved: noise hits both alike
        for k in order:
            t = time.perf_counter()
            runners[k](x, features=True)
            net[k].append(len(photos) / (time.perf_counter() - t))
            t = time.perf_counter()
            arrays = np.stack([load_image_array(p, str(j), size) for j, p in enumerate(photos)])
            predictors[k].probs_and_scores(torch.from_numpy(arrays))
            e2e[k].append(len(photos) / (time.perf_counter() - t))
    med = {f"{kind}_{k}": float(np.median(v)) for kind, d in (("net", net), ("e2e", e2e)) for k, v in d.items()}
    # the served pyfunc in this process, no HTTP: what the server spends per photo
    import pandas as pd

    pyfunc = mlflow.pyfunc.load_model("models:/bench@champion")
    frames = [pd.DataFrame({"image": [p], "image_id": [str(i)]}) for i, p in enumerate(photos)]
    pyfunc.predict(frames[0])
    times = []
    for _ in range(rounds):
        for f in frames:
            t = time.perf_counter()
            pyfunc.predict(f)
            times.append(time.perf_counter() - t)
    med["pyfunc_p50_ms"] = float(np.percentile(times, 50) * 1000)
    med["pyfunc_p95_ms"] = float(np.percentile(times, 95) * 1000)
    return med


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=Path, default=DEFAULT_SAMPLES, help="folder searched for *.jpg")
    ap.add_argument("--rounds", type=int, default=10, help="passes over the photos (latency and throughput)")
    ap.add_argument("--core", type=int, default=0, help="the CPU core the server and the throughput runs use")
    ap.add_argument("--bank", type=int, default=5000, help="kNN bank size (train features of the package)")
    ap.add_argument("--quick", action="store_true", help="3 rounds (a smoke run; figures are noisier)")
    args = ap.parse_args(argv)
    rounds = 3 if args.quick else args.rounds
    photos = [p.read_bytes() for p in sorted(args.samples.rglob("*.jpg"))]
    if not photos:
        print(f"no *.jpg under {args.samples}", file=sys.stderr)
        return 2
    cores = sorted(os.sched_getaffinity(0))
    core = args.core if args.core in cores else cores[0]
    client_cores = [c for c in cores if c != core] or cores
    print(f"{len(photos)} photos, {rounds} rounds, server on core {core} of {len(cores)} "
          f"(the client on {client_cores}); machine load {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp_s:
        tmp = Path(tmp_s)
        t = time.perf_counter()
        uri = register(tmp, args.bank)
        print(f"registered + ONNX export in {time.perf_counter() - t:.1f} s", flush=True)
        os.sched_setaffinity(0, client_cores)
        lat, rss, cpu_ms = serve_latency(uri, photos, rounds, core, tmp)
        lat = lat * 1000
        os.sched_setaffinity(0, {core})
        tp = throughput(photos, rounds, uri)
    p50, p95 = np.percentile(lat, 50), np.percentile(lat, 95)
    ratio = tp["net_ort"] / tp["net_eager"]
    print(f"\nsingle-photo latency over HTTP, {len(lat)} requests: p50 {p50:.1f} ms, p95 {p95:.1f} ms, "
          f"max {lat.max():.1f} ms; server RSS {rss / 2**20:.0f} MiB")
    print(f"server CPU time per request (what a request costs on a core of its own; load-independent): "
          f"{cpu_ms:.1f} ms")
    print(f"the same pyfunc in process, no HTTP: p50 {tp['pyfunc_p50_ms']:.1f} ms, p95 {tp['pyfunc_p95_ms']:.1f} ms")
    print("batch throughput per core (images/s, median of rounds):")
    print(f"  network only (batch of {len(photos)}): ORT {tp['net_ort']:.1f}, eager {tp['net_eager']:.1f} "
          f"-> ort_vs_eager {ratio:.2f}")
    print(f"  decode + network + scoring:     ORT {tp['e2e_ort']:.1f}, eager {tp['e2e_eager']:.1f}")
    print(f"targets: p95 <= 40 ms ({'met' if p95 <= 40 else 'MISSED'}), ort_vs_eager >= 2.0 "
          f"({'met' if ratio >= 2.0 else 'MISSED'})")
    print(f"RESULT p95_ms={p95:.1f} ort_vs_eager={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
