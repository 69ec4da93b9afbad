"""The MLflow "models from code" entry for :class:`~sofar_assets.lib.serving.pyfunc.SofarPyfunc`.

``log_and_register`` logs this file instead of a cloudpickled object, with the ``sofar_assets``
package in the model's ``code_paths``: MLflow copies both into the model and runs this file on
``mlflow.pyfunc.load_model`` / ``mlflow models serve``, so no checkout of this repository is needed.
"""

from mlflow.models import set_model

from sofar_assets.lib.serving.pyfunc import SofarPyfunc

set_model(SofarPyfunc())
