"""The MLflow "models from code" entry for :class:`~sofar_assets.lib.packaging.SofarPyfunc`.

``log_and_register`` logs this file instead of a cloudpickled object: MLflow copies it into the
model and runs it on ``mlflow.pyfunc.load_model`` (which needs ``sofar_assets`` importable).
"""

from mlflow.models import set_model

from sofar_assets.lib.packaging import SofarPyfunc

set_model(SofarPyfunc())
