"""The champion, served: `mlflow models serve` answers each photo with its daily_predictions row.

The registered, calibrated demo model of the ``pipeline`` fixture scores a day of REAL photos
(the shared SOFAR samples plus a corrupt file) through ``daily_predictions`` with
``inference.runtime: onnx``; then a real ``mlflow models serve`` process (no PYTHONPATH, started
outside the repository: the model's own ``code_paths`` carry the code) gets each photo's bytes
over HTTP and must answer that photo's row.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import requests
import torch
import yaml

from conftest import _assets

DAY = dt.date(2026, 11, 20)
SCORES = ("top1_prob", "top2_prob", "ood_score")
SAME = ("top1_label", "top2_label", "label_set", "label_set_size", "is_ood")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_photos(samples: Path) -> list[Path]:
    return sorted(samples.glob("*/*/*.jpg"))


@pytest.fixture(scope="module")
def served_day(pipeline, samples, tmp_path_factory):
    """daily_predictions of a day of real photos (runtime onnx) against the pipeline's registry."""
    from sofar_assets.config import load_config
    from sofar_assets.definitions import build_definitions

    base = pipeline["cfg"]
    folder = tmp_path_factory.mktemp("served")
    day_dir = folder / "uploads" / DAY.isoformat()
    day_dir.mkdir(parents=True)
    photos = {}
    for p in sample_photos(samples):
        name = "_".join(p.relative_to(samples).parts)
        shutil.copyfile(p, day_dir / name)
        photos[f"{DAY.isoformat()}/{name}"] = p.read_bytes()  # the image_id of a folder upload
    (day_dir / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    raw = yaml.safe_load((pipeline["folder"] / "sofar.yaml").read_text())
    raw["uploads"] = {"folder": str(folder / "uploads")}
    raw["storage"] = {"root": str(folder / "state"), "mlflow": {"tracking_uri": base.mlflow_tracking_uri}}
    raw["inference"] = {**raw.get("inference", {}), "runtime": "onnx"}
    path = folder / "sofar.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    defs = build_definitions(cfg)
    result = dg.materialize(_assets(defs), selection=dg.AssetSelection.assets("daily_predictions"),
                            partition_key=DAY.isoformat(), resources=defs.resources,
                            instance=pipeline["instance"])
    assert result.success
    rows = defs.resources["warehouse"].get().read_table("predictions")
    return {"cfg": cfg, "rows": rows.set_index("image_id"), "photos": photos}


@pytest.fixture(scope="module")
def server(served_day, tmp_path_factory):
    """`mlflow models serve -m models:/<name>@champion` as a real process, outside the repository."""
    cfg = served_day["cfg"]
    port = _free_port()
    cwd = tmp_path_factory.mktemp("elsewhere")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"MLFLOW_TRACKING_URI": cfg.mlflow_tracking_uri,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}  # uvicorn of this venv
    log = open(cwd / "serve.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{cfg.model.name}@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n"
                            f"{(cwd / 'serve.log').read_text()}")
            try:
                if requests.get(f"{url}/ping", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        else:
            pytest.fail("mlflow models serve did not answer /ping in 240 s:\n"
                        f"{(cwd / 'serve.log').read_text()}")
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)
        log.close()


def _plain(v):
    """A table cell as JSON gives it back (None for NULL, Python scalars)."""
    if pd.isna(v):
        return None
    return v.item() if hasattr(v, "item") else v


def _post(url: str, records: list[dict]) -> list[dict]:
    r = requests.post(f"{url}/invocations", json={"dataframe_records": records}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def test_served_rows_equal_the_daily_rows(served_day, server):
    rows, photos = served_day["rows"], served_day["photos"]
    cfg = served_day["cfg"]
    champion = rows["model_version"].iloc[0]
    assert len(photos) == 20 and set(photos) <= set(rows.index), sorted(rows.index)
    for name, data in photos.items():
        (got,) = _post(server, [{"image": base64.b64encode(data).decode(), "image_id": name}])
        want = rows.loc[name]
        assert got["error"] is None and pd.isna(want["error"])
        assert got["model_name"] == cfg.model.name and got["model_version"] == str(champion)
        for col in SAME:
            assert got[col] == _plain(want[col]), (name, col, got[col], want[col])
        for col in SCORES:
            assert abs(got[col] - float(want[col])) <= 1e-5, (name, col, got[col], want[col])


def test_a_corrupt_photo_gets_a_clear_error_row(served_day, server):
    rows = served_day["rows"]
    bad = b"\xff\xd8\xff\xe0 not really a jpeg"
    # one request per kind: MLflow decodes the binary column of every row of a request
    got = [*_post(server, [{"image": base64.b64encode(bad).decode(), "image_id": "corrupt.jpg"}]),
           *_post(server, [{"image_uri": "/etc/passwd", "image_id": "outside"}]),
           *_post(server, [{"image_id": "empty"}])]
    assert got[0]["error"].startswith("ImageDecodeError: corrupt.jpg: ")
    # daily wrote an error row too
    assert rows.loc[f"{DAY.isoformat()}/corrupt.jpg", "error"].startswith("ImageDecodeError: ")
    assert got[0]["top1_label"] is None and got[0]["is_ood"] is False and got[0]["model_version"]
    assert got[1]["error"].startswith("UploadRefused: /etc/passwd: outside the allowed roots")
    assert "neither 'image'" in got[2]["error"]


def test_onnx_agrees_with_pytorch_on_every_shared_photo(samples):
    """The production network (efficientnet_lite0, offline ImageNet weights, 224 px): ONNX Runtime's
    logits and features equal PyTorch's to 1e-4 on each real photo, after the one decode."""
    from sofar_assets.lib.data.images import load_image_array
    from sofar_assets.lib.model.models import ModelSpec, build_model
    from sofar_assets.lib.serving.predictor import OnnxRunner, TorchRunner, export_onnx

    torch.manual_seed(0)
    model = build_model(ModelSpec(num_classes=7, pretrained=True)).eval()
    onnx = OnnxRunner(export_onnx(model, 224), threads=1)
    ref = TorchRunner(model, "cpu")
    photos = sample_photos(samples)
    assert len(photos) == 20
    x = torch.from_numpy(np.stack([load_image_array(p.read_bytes(), str(p), 224) for p in photos]))
    want, want_f = ref(x, features=True)
    got, got_f = onnx(x, features=True)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got_f, want_f, atol=1e-4, rtol=0)
    one, _ = onnx(x[:1], features=False)  # a single photo (serving's batch) gives the same logits
    np.testing.assert_allclose(one, want[:1], atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- Kubernetes

SERVING_YAML = Path(__file__).resolve().parents[1] / "deploy" / "serving" / "serving.yaml"
K8S_VERSION = "1.37.0"  # kubernetes-validate's newest offline schemas


def rendered_serving(tag: str = "abc123") -> dict[str, dict]:
    """deploy/serving/serving.yaml with the image tag filled in, by kind."""
    docs = [d for d in yaml.safe_load_all(SERVING_YAML.read_text().replace("IMAGE_TAG", tag)) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs)
    return by_kind


def test_serving_manifests_pass_kubernetes_schema_validation():
    import kubernetes_validate

    docs = rendered_serving()
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "CronJob"} <= set(docs)
    for doc in docs.values():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    broken = yaml.safe_load(yaml.safe_dump(docs["Deployment"]))
    container = broken["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")  # a typo must not pass
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_serving_manifests_fit_together_and_serve_the_champion():
    from sofar_assets.cli import build_parser
    from sofar_assets.config import load_config
    from sofar_assets.lib.serving.pyfunc import CHAMPION_ANNOTATION

    cfg = load_config(Path(__file__).resolve().parents[1] / "config" / "prod.yaml", check_paths=False)
    docs = rendered_serving()
    dep, svc, hpa, cron = (docs["Deployment"], docs["Service"],
                           docs["HorizontalPodAutoscaler"], docs["CronJob"])
    pod = dep["spec"]["template"]
    (server,) = pod["spec"]["containers"]
    cmd = server["command"]
    assert (cmd[:3] == ["mlflow", "models", "serve"]
            and cmd[cmd.index("-m") + 1] == f"models:/{cfg.model.name}@champion")
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert env["MLFLOW_TRACKING_URI"] == cfg.storage.mlflow.tracking_uri
    port = int(cmd[cmd.index("-p") + 1])
    assert server["ports"][0]["containerPort"] == port
    assert server["readinessProbe"]["httpGet"]["path"] == "/ping"  # 200 only once the model is loaded
    assert server["resources"]["requests"]["cpu"] == server["resources"]["limits"]["cpu"] == "1"
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    # a champion move never drops traffic
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert CHAMPION_ANNOTATION in pod["metadata"]["annotations"]
    sync = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    args = build_parser().parse_args(sync[1:])  # a real CLI command of the image
    assert (args.cmd, args.namespace, args.deployment) == ("serving-sync", dep["metadata"]["namespace"],
                                                             dep["metadata"]["name"])
    role = docs["Role"]["rules"][0]
    assert {"get", "patch"} <= set(role["verbs"]) and role["resourceNames"] == [dep["metadata"]["name"]]


def test_a_champion_move_rolls_the_deployment_once():
    """`sofar serving-sync`: the pod template's annotation follows @champion, so Kubernetes rolls
    the pods onto the new version; nothing is patched while the champion stays."""
    from types import SimpleNamespace

    from sofar_assets.lib.serving.pyfunc import CHAMPION_ANNOTATION, sync_rollout

    class Apps:
        def __init__(self):
            self.annotations = {CHAMPION_ANNOTATION: "unknown"}
            self.patches = []

        def read_namespaced_deployment(self, name, namespace):
            meta = SimpleNamespace(annotations=dict(self.annotations))
            return SimpleNamespace(spec=SimpleNamespace(template=SimpleNamespace(metadata=meta)))

        def patch_namespaced_deployment(self, name, namespace, body):
            self.patches.append((namespace, name, body))
            self.annotations.update(body["spec"]["template"]["metadata"]["annotations"])

    apps = Apps()
    assert sync_rollout(apps, "sofar-serving", "sofar-serving", "3") == "unknown"
    assert sync_rollout(apps, "sofar-serving", "sofar-serving", "3") is None  # no move, no rollout
    assert sync_rollout(apps, "sofar-serving", "sofar-serving", "4") == "3"
    assert [p[2]["spec"]["template"]["metadata"]["annotations"][CHAMPION_ANNOTATION]
            for p in apps.patches] == ["3", "4"]


# --------------------------------------------------------------------------- inference.runtime


def test_runtime_onnx_scores_like_torch_and_says_what_is_missing(tmp_path, samples):
    """``inference.runtime: onnx`` gives the torch rows (labels equal, scores to 1e-4) through the
    same predict_images; a package without model.onnx or an unknown runtime is a clear error."""
    from sofar_assets.config import ConfigError, parse_config
    from sofar_assets.lib.model.models import ModelSpec, build_model
    from sofar_assets.lib.serving.inference import predict_frame
    from sofar_assets.lib.serving.packaging import load_package, save_package
    from sofar_assets.lib.serving.predictor import make_runner

    torch.manual_seed(0)
    spec = ModelSpec(num_classes=3, backbone="test_efficientnet", pretrained=False, image_size=64)
    save_package(build_model(spec), spec, ["a", "b", "c"], tmp_path / "pkg")
    model, meta = load_package(tmp_path / "pkg")
    items = [(p.name, str(p)) for p in sample_photos(samples)[:6]]
    kw = {"classes": ["a", "b", "c"], "image_size": 64, "threshold": 0.3, "score_method": "energy",
          "temperature": 1.7, "num_workers": 0, "device": "cpu"}
    ref = predict_frame(model, items, **kw)
    got = predict_frame(make_runner(model, meta, "onnx"), items, **kw)
    assert list(got["top1_label"]) == list(ref["top1_label"]) and list(got["is_ood"]) == list(ref["is_ood"])
    for col in SCORES:
        np.testing.assert_allclose(got[col], ref[col], atol=1e-4)
    with pytest.raises(ValueError, match="no model.onnx"):
        make_runner(model, {**meta, "onnx_model": None}, "onnx")
    with pytest.raises(ValueError, match="unknown inference runtime 'tensorrt'"):
        make_runner(model, meta, "tensorrt")
    with pytest.raises(ConfigError, match="runtime"):
        parse_config({"tasks": {}, "inference": {"runtime": "tensorrt"}}, base_dir=tmp_path)


def test_calibration_travels_in_the_package_and_a_copied_version_keeps_the_owners(tmp_path):
    """write_calibration puts calibration.json (with the version's name and number) into the
    version's own package; a re-calibration by that version replaces it; a version registered
    from another version's logged model (the same package) does not overwrite it."""
    import mlflow

    from sofar_assets.lib.model.models import ModelSpec, build_model
    from sofar_assets.lib.serving import registry
    from sofar_assets.lib.serving.packaging import (
        load_registered,
        log_and_register,
        write_calibration_artifact,
    )

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        exp = mlflow.create_experiment("cal", artifact_location=(tmp_path / "art").as_uri())
        spec = ModelSpec(num_classes=3, backbone="test_efficientnet", image_size=32, pretrained=False)
        with mlflow.start_run(experiment_id=exp):
            log_and_register(build_model(spec), spec, ["a", "b", "c"], "demo")
        client = mlflow.MlflowClient()
        registry.write_calibration(client, "demo", "1", registry.Calibration("max_logit", 1.3, 0.5))
        registry.write_calibration(client, "demo", "1", registry.Calibration("energy", 1.4, 0.25))
        copy = client.create_model_version("demo", client.get_model_version("demo", "1").source)
        assert not write_calibration_artifact(client, "demo", copy.version,
                                              registry.Calibration("max_logit", 9.0, 9.0).as_artifact())
        _, meta = load_registered("models:/demo/1")
    finally:
        mlflow.set_tracking_uri(previous)
    assert meta["calibration"] == {"model_name": "demo", "model_version": "1", "score_method": "energy",
                                   "temperature": 1.4, "threshold": 0.25,
                                   "target_tpr": None, "label_sets": None}
