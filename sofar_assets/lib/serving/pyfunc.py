"""The served model: a request's photos (bytes or URIs) -> their prediction rows.

What ``mlflow models serve`` runs (:class:`SofarPyfunc`, logged as code by
``packaging.log_and_register``). A request is a table with, per photo, ``image`` (the photo's
bytes: MLflow's binary column, base64 in JSON) or ``image_uri`` (a path or gs:// URI under the
model's ``allowed_roots``), and an optional ``image_id``. Each photo goes through the same
read + decode (:func:`~sofar_assets.lib.serving.inference.predict_images`) and the same scoring core
(:class:`~sofar_assets.lib.serving.predictor.Predictor`) as ``daily_predictions``, with the version's
calibration and feature statistics from its own package, so a photo gets the row the daily
table holds for it. A photo that cannot be read or decoded gets an error row, never a failed
request.
"""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from sofar_assets.lib.data import storage, uploads
from sofar_assets.lib.model import ood
from sofar_assets.lib.model.conformal import LabelSets
from sofar_assets.lib.serving.inference import Item, predict_frame
from sofar_assets.lib.serving.packaging import PYFUNC_ARTIFACT, load_package
from sofar_assets.lib.serving.predictor import make_runner
from sofar_assets.lib.warehouse.predictions import IMAGE_COLUMNS, PREDICTION_COLUMNS

OUTPUT_COLUMNS = (*IMAGE_COLUMNS, "model_name", "model_version")  # a request has no day
DEFAULT_MAX_BYTES = 50_000_000
_MEMORY = "request://"


class Uncalibrated(ValueError):
    """The package has no ``calibration.json``: ``ood_calibration`` never ran for this version."""


class Service:
    """A loaded model version that answers requests (what :class:`SofarPyfunc` holds).

    ``runtime``: ``onnx`` (default, ONNX Runtime on the CPU) or ``torch``; ``threads``: the
    intra-op threads of either (one per serving worker: scale with workers and replicas).
    """

    def __init__(self, model, meta: dict, *, runtime: str = "onnx", threads: int | None = 1,
                 allowed_roots: list[str] | None = None, max_bytes: int = DEFAULT_MAX_BYTES, device: str = "cpu"):
        cal = meta.get("calibration")
        if not cal:
            raise Uncalibrated("this model version has no calibration.json in its package: materialize "
                               "ood_calibration for it before serving it")
        if threads is not None and runtime == "torch":
            torch.set_num_threads(int(threads))
        self.runner = make_runner(model, meta, runtime, device, threads)
        self.model_name = str(cal["model_name"])
        self.model_version = str(cal["model_version"])
        self.allowed_roots = list(allowed_roots or [])
        self.max_bytes = int(max_bytes)
        self.predict_kwargs = {
            "classes": list(meta["classes"]), "image_size": int(meta["spec"]["image_size"]),
            "threshold": float(cal["threshold"]), "score_method": cal["score_method"],
            "temperature": float(cal["temperature"]),
            "label_sets": LabelSets(**cal["label_sets"]) if cal.get("label_sets") else None,
            "ood_stats": meta.get("ood_stats") or {}, "knn_k": ood.package_knn_k(meta),
        }

    def _items(self, request: pd.DataFrame) -> tuple[list[Item], dict[str, bytes], list[bool]]:
        items, memory, from_bytes = [], {}, []
        cols = set(request.columns)
        for i, row in enumerate(request.itertuples(index=False)):
            rec = row._asdict()
            data = rec.get("image") if "image" in cols else None
            uri = rec.get("image_uri") if "image_uri" in cols else None
            image_id = rec.get("image_id") if "image_id" in cols else None
            image_id = uploads.safe_text(str(image_id)) if _given(image_id) else str(i)
            if _given(data):
                key = f"{_MEMORY}{i}"
                memory[key] = bytes(data)
                items.append(Item(image_id, image_id, None, key))  # errors name the photo by its id
                from_bytes.append(True)
            elif _given(uri):
                uri = uploads.safe_text(str(uri))
                refusal = uploads.refusal(uri, self.allowed_roots)
                error = f"{uploads.REFUSED}: {uri}: {refusal}" if refusal else None
                items.append(Item(image_id, uri, error, None))
                from_bytes.append(False)
            else:
                items.append(Item(image_id, "", f"{uploads.REFUSED}: image {image_id}: the request row has "
                                  "neither 'image' (the photo's bytes) nor 'image_uri'"))
                from_bytes.append(False)
        return items, memory, from_bytes

    def predict(self, request: pd.DataFrame) -> pd.DataFrame:
        """One row per request row, in order: :data:`OUTPUT_COLUMNS` (JSON-ready: None for NULL)."""
        items, memory, from_bytes = self._items(request)

        def read(path: str, max_bytes: int | None = None) -> bytes:
            if path.startswith(_MEMORY):
                data = memory[path]
                if max_bytes is not None and len(data) > max_bytes:
                    raise storage.ImageReadError(path, f"too large: {len(data)} bytes > max_bytes={max_bytes}")
                return data
            return storage.read_bytes(path, max_bytes=max_bytes)

        rows = predict_frame(self.runner, items, **self.predict_kwargs, batch_size=max(1, len(items)),
                             num_workers=0, reads_in_flight=1, read_bytes=read, max_bytes=self.max_bytes)
        if not len(rows):
            rows = rows.reindex(columns=list(PREDICTION_COLUMNS))
        rows.loc[np.asarray(from_bytes, dtype=bool), "image_uri"] = None
        rows["model_name"] = self.model_name
        rows["model_version"] = self.model_version
        out = rows[list(OUTPUT_COLUMNS)].astype(object)
        return out.where(out.notna(), None)


def _given(v) -> bool:
    if v is None:
        return False
    if isinstance(v, float) and np.isnan(v):
        return False
    return not (isinstance(v, (str, bytes, bytearray)) and len(v) == 0)


class SofarPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: a request table (``image`` bytes / ``image_uri``, ``image_id``) -> rows.

    ``model_config`` (set at registration, overridable in ``mlflow.pyfunc.load_model``):
    ``runtime`` (``onnx``), ``threads`` (1), ``allowed_roots`` ([]: URIs are refused, send
    bytes), ``max_bytes``.
    """

    def load_context(self, context) -> None:

        model, meta = load_package(context.artifacts[PYFUNC_ARTIFACT])
        conf = dict(context.model_config or {})
        self.service = Service(model, meta, runtime=conf.get("runtime", "onnx"), threads=conf.get("threads", 1),
                               allowed_roots=conf.get("allowed_roots"),
                               max_bytes=int(conf.get("max_bytes", DEFAULT_MAX_BYTES)))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        return self.service.predict(pd.DataFrame(model_input))


# --------------------------------------------------------------------------- reload on alias move

CHAMPION_ANNOTATION = "sofar.ai/champion-version"


def sync_rollout(apps_api, namespace: str, deployment: str, champion_version: str) -> str | None:
    """Roll the serving Deployment onto a moved ``@champion``.

    The server loads ``models:/<name>@champion`` when a pod starts; this writes the champion's
    version into the pod template's :data:`CHAMPION_ANNOTATION`, which Kubernetes turns into a
    rolling update (new pods load the new version and take traffic once their readiness probe
    passes; old pods serve until then). ``apps_api`` is a ``kubernetes.client.AppsV1Api``.
    Returns the annotation's previous value ("" if none) when it patched, None when the
    Deployment already runs ``champion_version``.
    """
    dep = apps_api.read_namespaced_deployment(deployment, namespace)
    annotations = (dep.spec.template.metadata.annotations if dep.spec.template.metadata else None) or {}
    current = annotations.get(CHAMPION_ANNOTATION)
    if current == str(champion_version):
        return None
    apps_api.patch_namespaced_deployment(deployment, namespace, {
        "spec": {"template": {"metadata": {"annotations": {CHAMPION_ANNOTATION: str(champion_version)}}}}})
    return current or ""
