"""Step outputs between assets as small JSON files, never pickles.

Our assets hand each other small pointers and reports (model name + version + run id, metrics).
A pickling IO manager would execute whatever a tampered file under the IO base (a ``gs://``
bucket in production) tells it to when the next step loads it; JSON can only ever be data.
"""

from __future__ import annotations

import json

import dagster as dg
from pydantic import Field

from sofar_assets.lib.data import storage

MAX_OUTPUT_BYTES = 64_000_000  # a step output is a small dict; anything bigger is not ours


class StepOutputError(ValueError):
    """A step output cannot be stored or loaded as JSON; the message names the asset and the file."""


def _name(context: dg.OutputContext | dg.InputContext) -> str:
    return context.asset_key.to_user_string() if context.has_asset_key else context.name


class JsonIOManager(dg.ConfigurableIOManager):
    """Stores each output at ``<base_dir>/<asset key path>[/<partition>].json`` (a local folder or
    a ``gs://bucket/prefix``). Outputs must be JSON: dicts, lists, str, int, float (NaN allowed),
    bool, None. Anything else is refused with an error naming the asset."""

    base_dir: str = Field(description="local folder or gs://bucket/prefix")

    def _uri(self, context: dg.OutputContext | dg.InputContext) -> str:
        parts = context.get_asset_identifier() if context.has_asset_key else context.get_identifier()
        return "/".join([self.base_dir.rstrip("/"), *parts]) + ".json"

    def handle_output(self, context: dg.OutputContext, obj: object) -> None:
        uri = self._uri(context)
        try:
            text = json.dumps(obj, allow_nan=True, indent=1)
        except (TypeError, ValueError) as exc:
            raise StepOutputError(
                f"asset {_name(context)}: its output is not JSON ({exc}); outputs between steps must be small "
                "JSON values (dict/list/str/int/float/bool/None): convert numpy values at the source, and keep "
                "weights in MLflow and rows in the warehouse"
            ) from None
        storage.write_bytes(uri, text.encode("utf-8"), content_type="application/json")
        context.add_output_metadata({"path": dg.MetadataValue.path(uri)})

    def load_input(self, context: dg.InputContext) -> object:
        uri = self._uri(context)
        name = _name(context)
        try:
            data = storage.read_bytes(uri, max_bytes=MAX_OUTPUT_BYTES)
        except storage.ImageReadError as exc:
            raise StepOutputError(
                f"{uri}: the stored output of asset {name} cannot be read ({exc.reason}); materialize {name} again"
            ) from None
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            what = "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else f"{exc.msg} at char {exc.pos}"
            raise StepOutputError(
                f"{uri}: the stored output of asset {name} is not JSON ({what}); it was refused, nothing in it "
                f"was loaded or run. If it was not written by this pipeline, find out who wrote it; then "
                f"materialize {name} again"
            ) from None
