"""Model packages (safetensors + JSON) and their MLflow registration.

A package is a folder holding ``model.safetensors`` (the state dict), ``sofar_model.json``
(format tag, :class:`ModelSpec`, class names, free-form extras), ``model.onnx`` (the same
network exported for ONNX Runtime, lib/serving/predictor.py), ``calibration.json`` once the version is
calibrated (:func:`write_calibration_artifact`: score method, temperature, threshold, label-set
rule, and the registered name and version) and, when given,
``ood_stats.safetensors``: what the feature OOD scores need at prediction time (the kNN bank
of normalised training features, the Mahalanobis class means and precision; see
``ood.fit_feature_stats``), loaded back as ``meta["ood_stats"]`` (numpy arrays). Loading one needs no pickle:
the network is rebuilt from the spec and the tensors are loaded into it.

In MLflow the package travels as the ``package`` artifact of a pyfunc model
(:class:`~sofar_assets.lib.serving.pyfunc.SofarPyfunc`: photo bytes or URIs in, prediction rows
out), logged as code (``pyfunc_model.py``), so nothing is pickled, with this package's code in
the model's ``code_paths``: it loads (and ``mlflow models serve`` serves it) without this
repository. :func:`load_registered` reads the package artifact directly.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import mlflow
import numpy as np
import torch
from torch import nn

from sofar_assets.lib.model.models import ModelSpec, build_model, read_meta

PACKAGE_FORMAT = "sofar-model/1"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
CALIBRATION_FILE = "calibration.json"
OOD_STATS_FILE = "ood_stats.safetensors"
META_FILE = "sofar_model.json"
PYFUNC_ARTIFACT = "package"


def save_package(model: nn.Module, spec: ModelSpec, classes: list[str], directory: str | Path,
                 extra: dict | None = None, ood_stats: dict[str, np.ndarray] | None = None,
                 onnx: bool = True) -> Path:
    """Write ``model.safetensors`` + ``sofar_model.json`` (+ ``ood_stats.safetensors``, + with
    ``onnx`` the ONNX export ``model.onnx``) into ``directory``."""
    from safetensors.numpy import save_file as save_numpy
    from safetensors.torch import save_file

    if len(classes) != spec.num_classes:
        raise ValueError(f"{len(classes)} class names for a {spec.num_classes}-class model")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # channels_last weights are not contiguous in the default layout; safetensors wants them so.
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": PACKAGE_FORMAT})
    if ood_stats:
        save_numpy({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in ood_stats.items()},
                   str(directory / OOD_STATS_FILE))
    if onnx:
        from sofar_assets.lib.serving.predictor import export_onnx

        (directory / ONNX_FILE).write_bytes(export_onnx(model, spec.image_size))
    meta = {"format": PACKAGE_FORMAT, "spec": spec.to_dict(), "classes": list(classes), "extra": dict(extra or {})}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    return directory




def load_package(directory: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the network from a package folder; returns (model in eval mode on CPU, meta).

    ``meta["ood_stats"]`` holds the feature-score statistics (empty dict when the package has none),
    ``meta["onnx_model"]`` the ONNX export's bytes (None without one) and ``meta["calibration"]``
    the version's calibration (None before ``ood_calibration`` wrote it).
    """
    from safetensors.numpy import load_file as load_numpy
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = read_meta(directory / META_FILE, PACKAGE_FORMAT, "sofar model package")
    spec_dict = dict(meta["spec"])
    # The weights come from the file, so never touch the offline ImageNet weights here.
    spec_dict["pretrained"] = False
    model = build_model(ModelSpec.from_dict(spec_dict))
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
    model.eval()
    stats_path = directory / OOD_STATS_FILE
    meta["ood_stats"] = load_numpy(str(stats_path)) if stats_path.is_file() else {}
    onnx_path, cal_path = directory / ONNX_FILE, directory / CALIBRATION_FILE
    meta["onnx_model"] = onnx_path.read_bytes() if onnx_path.is_file() else None
    meta["calibration"] = json.loads(cal_path.read_text()) if cal_path.is_file() else None
    return model, meta


def write_calibration_artifact(client, name: str, version: str, calibration: dict) -> bool:
    """Add ``calibration.json`` (``calibration`` plus ``model_name`` and ``model_version``) to the
    package artifact of registered version ``name``/``version``, so the model carries what it
    needs to score (the version's tags say the same for people and the registry UI).

    Returns False, writing nothing, for a version that is not a logged model (a version created
    by hand from some other source: it has no package, and serving it fails on load, naming the
    missing ``calibration.json``), and for a version registered from ANOTHER version's logged
    model (``create_model_version(source=v1.source)``): the package is shared and keeps the
    calibration of the version it was logged for, so its rows name that version.
    """
    mv = client.get_model_version(name, str(version))
    model_id = getattr(mv, "model_id", None)
    if not model_id and str(mv.source).startswith("models:/m-"):  # sqlite stores leave model_id empty
        model_id = str(mv.source).removeprefix("models:/").split("/", 1)[0]
    if not model_id:
        return False
    package = f"artifacts/{PYFUNC_ARTIFACT}"
    if any(f.path.endswith(CALIBRATION_FILE) for f in client.list_logged_model_artifacts(model_id, package)):
        with tempfile.TemporaryDirectory(prefix="sofar-cal-") as tmp:
            root = client.get_logged_model(model_id).artifact_location.rstrip("/")
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{root}/{package}/{CALIBRATION_FILE}", dst_path=tmp, tracking_uri=client.tracking_uri)
            owner = json.loads(Path(local).read_text())
        if (owner.get("model_name"), owner.get("model_version")) != (name, str(version)):
            return False  # another version's package: it keeps its own calibration
    payload = {**calibration, "model_name": name, "model_version": str(version)}
    with tempfile.TemporaryDirectory(prefix="sofar-cal-") as tmp:
        Path(tmp, CALIBRATION_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True))
        client.log_model_artifacts(model_id, tmp, artifact_path=package)
    return True


def _pip_requirements() -> list[str]:
    import onnxruntime
    import pandas
    import PIL
    import safetensors
    import scipy
    import sklearn
    import timm

    def base(v: str) -> str:
        return v.split("+", 1)[0]  # drop local tags such as "+cpu"

    return [
        f"mlflow=={base(mlflow.__version__)}",
        f"torch=={base(torch.__version__)}",
        f"timm=={base(timm.__version__)}",
        f"safetensors=={base(safetensors.__version__)}",
        f"numpy=={base(np.__version__)}",
        f"onnxruntime=={base(onnxruntime.__version__)}",
        f"pandas=={base(pandas.__version__)}",
        f"pillow=={base(PIL.__version__)}",
        f"scipy=={base(scipy.__version__)}",
        f"scikit-learn=={base(sklearn.__version__)}",
    ]


def serving_signature():
    """The served model's signature (lib/serving/pyfunc.py's SofarPyfunc): photos in (bytes or
    URI, optional id), rows out."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image", required=False), ColSpec("string", "image_uri", required=False),
                       ColSpec("string", "image_id", required=False)]),
        outputs=Schema([
            ColSpec("string", "image_id"), ColSpec("string", "image_uri", required=False),
            ColSpec("string", "top1_label", required=False), ColSpec("double", "top1_prob", required=False),
            ColSpec("string", "top2_label", required=False), ColSpec("double", "top2_prob", required=False),
            ColSpec("string", "label_set", required=False), ColSpec("long", "label_set_size", required=False),
            ColSpec("double", "ood_score", required=False), ColSpec("boolean", "is_ood"),
            ColSpec("string", "error", required=False), ColSpec("string", "model_name"),
            ColSpec("string", "model_version"),
        ]),
    )


def log_and_register(model: nn.Module, spec: ModelSpec, classes: list[str], registered_model_name: str, *,
                     extra: dict | None = None, tags: dict | None = None,
                     ood_stats: dict[str, np.ndarray] | None = None, model_config: dict | None = None) -> dict:
    """Log the model as a pyfunc in the active run, register it and tag the new version.

    The pyfunc is lib/serving/pyfunc.py's (photos in, prediction rows out) with this package's code in
    ``code_paths``; ``model_config`` is its serving configuration (``allowed_roots``, ``runtime``,
    ``threads``, ``max_bytes``). It answers once the version is calibrated
    (:func:`write_calibration_artifact`).

    Returns ``{"model_uri": "models:/<name>/<version>", "version": int, "run_id": str}``.
    """
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_and_register must be called inside an active mlflow run")
    with tempfile.TemporaryDirectory(prefix="sofar-pkg-") as tmp:
        pkg = save_package(model, spec, classes, Path(tmp) / PYFUNC_ARTIFACT, extra, ood_stats)
        with warnings.catch_warnings():
            # no input example: the model answers only once calibrated (write_calibration_artifact),
            # so MLflow could not run one now; the signature is explicit
            warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(Path(__file__).with_name("pyfunc_model.py")),  # models from code: no pickle
                artifacts={PYFUNC_ARTIFACT: str(pkg)},
                code_paths=[str(Path(__file__).resolve().parents[2])],  # sofar_assets: loads without the repo
                model_config={"runtime": "onnx", "threads": 1, **(model_config or {})},
                registered_model_name=registered_model_name,
                signature=serving_signature(),
                pip_requirements=_pip_requirements(),
            )
    version = info.registered_model_version
    if version is None:
        raise RuntimeError(f"MLflow did not register a version of {registered_model_name!r}")
    client = mlflow.MlflowClient()
    for key, value in (tags or {}).items():
        client.set_model_version_tag(registered_model_name, str(version), key, str(value))
    return {"model_uri": f"models:/{registered_model_name}/{version}", "version": int(version),
            "run_id": info.run_id or run.info.run_id}


def load_registered(model_uri: str) -> tuple[nn.Module, dict]:
    """Load ``models:/name/3`` or ``models:/name@alias`` (any pyfunc model URI) without unpickling.

    Reads the pyfunc flavor's artifact path for ``package`` from the ``MLmodel`` file, downloads
    only that folder, and rebuilds the network with :func:`load_package`.
    """
    import yaml

    base = model_uri.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="sofar-load-") as tmp:
        mlmodel_path = mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/MLmodel", dst_path=tmp)
        mlmodel = yaml.safe_load(Path(mlmodel_path).read_text())
        try:
            rel = mlmodel["flavors"]["python_function"]["artifacts"][PYFUNC_ARTIFACT]["path"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{model_uri} is not a sofar pyfunc model (no '{PYFUNC_ARTIFACT}' artifact)") from e
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/{rel}", dst_path=tmp)
        return load_package(local)
