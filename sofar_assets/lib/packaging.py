"""Model packages (safetensors + JSON) and their MLflow registration.

A package is a folder holding ``model.safetensors`` (the state dict), ``sofar_model.json``
(format tag, :class:`ModelSpec`, class names, free-form extras) and, when given,
``ood_stats.safetensors``: what the feature OOD scores need at prediction time (the kNN bank
of normalised training features, the Mahalanobis class means and precision; see
``ood.fit_feature_stats``), loaded back as ``meta["ood_stats"]`` (numpy arrays). Loading one needs no pickle:
the network is rebuilt from the spec and the tensors are loaded into it.

In MLflow the package travels as the ``package`` artifact of a pyfunc model
(:class:`SofarPyfunc`), logged as code (``pyfunc_model.py``), so nothing is pickled.
:func:`load_registered` reads that artifact directly; ``mlflow.pyfunc.load_model`` works as well
(it needs ``sofar_assets`` importable: the logged file imports this module).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import torch
from torch import nn

from sofar_assets.lib.models import ModelSpec, build_model

PACKAGE_FORMAT = "sofar-model/1"
WEIGHTS_FILE = "model.safetensors"
OOD_STATS_FILE = "ood_stats.safetensors"
META_FILE = "sofar_model.json"
PYFUNC_ARTIFACT = "package"


def save_package(model: nn.Module, spec: ModelSpec, classes: list[str], directory: str | Path,
                 extra: dict | None = None, ood_stats: dict[str, np.ndarray] | None = None) -> Path:
    """Write ``model.safetensors`` + ``sofar_model.json`` (+ ``ood_stats.safetensors``) into ``directory``."""
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
    meta = {"format": PACKAGE_FORMAT, "spec": spec.to_dict(), "classes": list(classes), "extra": dict(extra or {})}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
    return directory


def read_meta(meta_path: Path, package_format: str, what: str) -> dict:
    """A package's JSON metadata, checked to be of ``package_format`` (``what`` names the kind of
    package in the error)."""
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: not a {what}")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != package_format:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {package_format!r}")
    return meta


def load_package(directory: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the network from a package folder; returns (model in eval mode on CPU, meta).

    ``meta["ood_stats"]`` holds the feature-score statistics (empty dict when the package has none).
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
    return model, meta


class SofarPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc wrapper: float32 NCHW in [0, 1] -> logits (numpy)."""

    batch_size = 64

    def load_context(self, context) -> None:
        self.model, self.meta = load_package(context.artifacts[PYFUNC_ARTIFACT])

    # np.ndarray hints: MLflow skips its type-hint schema inference (the signature is explicit)
    # and no longer warns that `predict` has no type hints.
    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(np.asarray(model_input, dtype=np.float32)))
        if x.ndim != 4:
            raise ValueError(f"expected a float32 NCHW array, got shape {tuple(x.shape)}")
        with torch.no_grad():
            out = [self.model(x[i : i + self.batch_size]) for i in range(0, x.shape[0], self.batch_size)]
        if not out:
            return np.zeros((0, len(self.meta["classes"])), np.float32)
        return torch.cat(out).numpy().astype(np.float32)


def _signature(spec: ModelSpec):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    s = spec.image_size
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, s, s))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, spec.num_classes))]),
    )


def _pip_requirements() -> list[str]:
    import safetensors
    import timm

    def base(v: str) -> str:
        return v.split("+", 1)[0]  # drop local tags such as "+cpu"

    return [
        f"mlflow=={base(mlflow.__version__)}",
        f"torch=={base(torch.__version__)}",
        f"timm=={base(timm.__version__)}",
        f"safetensors=={base(safetensors.__version__)}",
        f"numpy=={base(np.__version__)}",
    ]


def log_and_register(model: nn.Module, spec: ModelSpec, classes: list[str], registered_model_name: str, *,
                     extra: dict | None = None, tags: dict | None = None,
                     ood_stats: dict[str, np.ndarray] | None = None) -> dict:
    """Log the model as a pyfunc in the active run, register it and tag the new version.

    Returns ``{"model_uri": "models:/<name>/<version>", "version": int, "run_id": str}``.
    """
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_and_register must be called inside an active mlflow run")
    with tempfile.TemporaryDirectory(prefix="sofar-pkg-") as tmp:
        pkg = save_package(model, spec, classes, Path(tmp) / PYFUNC_ARTIFACT, extra, ood_stats)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),  # models from code: no pickle
            artifacts={PYFUNC_ARTIFACT: str(pkg)},
            registered_model_name=registered_model_name,
            signature=_signature(spec),
            # one blank image: MLflow validates serving with it instead of warning that none was given
            input_example=np.zeros((1, 3, spec.image_size, spec.image_size), np.float32),
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
