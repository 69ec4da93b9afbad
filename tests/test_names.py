"""Upload names a phone or a bucket allows (newlines, escape codes, bidi overrides, very long)
are shown safely everywhere: review sheet, Dagster metadata, CLI output; stored as they are."""

from __future__ import annotations

import datetime as dt
import io
import re
import shutil
import unicodedata
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from sofar_assets import cli
from sofar_assets.config import load_config
from sofar_assets.definitions import build_definitions
from sofar_assets.lib.common import names
from sofar_assets.lib.review import queue as review

from conftest import _assets

HOSTILE = [
    "new\nline.png",
    "\x1b[31mred\x1b[0m\x1b]0;owned\x07.png",
    "bidi\u202egnp.exe.png",
    "tab\tand\rcr\x7f.png",
    "zero\u200bwidth\u2028sep.png",
    "pipe|tick`[link](http:x)<b>.png",
    "L" * 240 + ".png",
]
UNSAFE = {"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"}


def _raw_controls(text: str) -> list[str]:
    """Characters a terminal, log line or markdown table must not get raw (newlines between lines
    of multi-line output are the caller's own and are split off first)."""
    return [repr(ch) for line in text.split("\n") for ch in line if unicodedata.category(ch) in UNSAFE]


@pytest.mark.parametrize("name", HOSTILE)
def test_shown_is_one_printable_bounded_line(name):
    out = names.shown(name)
    assert not _raw_controls(out) and "\n" not in out, out
    assert len(out) <= names.MAX_SHOWN
    assert out.endswith(".png"), "a shortened name keeps its end (the extension)"
    md = names.md_text(name, table=True)  # a code span: nothing in it is rendered as markdown or HTML
    assert "\n" not in md and "|" not in md.replace("\\|", "")
    assert md.startswith("`") and md.endswith("`") and "`" not in md.strip("`").replace("tick`[", "")


def test_shown_escapes_visibly_and_bounds_a_megabyte_name():
    assert names.shown("a\nb\x1b[0m\u202ec") == "a\\nb\\x1b[0m\\u202ec"
    assert names.shown("plain-name_01.jpg") == "plain-name_01.jpg"
    assert names.shown("fotó 사진.jpg") == "fotó 사진.jpg"  # letters of any script are shown as they are
    huge = "x" * 1_000_000 + "\n.jpg"
    out = names.shown(huge)
    assert len(out) <= names.MAX_SHOWN and out.endswith("\\n.jpg") and "…" in out
    assert names.shown(None) == "-" and names.shown(float("nan")) == "-"
    assert names.md_text("a`b") == "``a`b``" and names.md_text("`x") == "`` `x ``"


def _queue(uris: list[str]) -> pd.DataFrame:
    n = len(uris)
    return pd.DataFrame(
        {
            "image_id": [f"2026-11-20/{Path(u).name}" for u in uris],
            "image_uri": uris,
            "top1_label": ["dirt"] * n,
            "top1_prob": np.linspace(0.3, 0.6, n),
            "top2_label": ["normal"] * n,
            "top2_prob": [0.2] * n,
            "label_set": ["dirt|normal"] * n,
            "label_set_size": [2] * n,
            "ood_score": [1.0] * n,
            "is_ood": [True] * n,
            "reason": [review.OOD] * n,
        }
    )


def test_review_sheet_and_rows_text_take_any_name(tmp_path):
    good = tmp_path / "ok.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(good)
    uris = []
    for name in HOSTILE:
        shutil.copy(good, tmp_path / name)
        uris.append(str(tmp_path / name))
    rows = _queue(uris)

    png = review.review_sheet_png(rows, lambda u: Path(u).read_bytes(), title="hostile names")

    assert Image.open(io.BytesIO(png)).size[0] > 0
    text = review.rows_text(rows)
    assert not _raw_controls(text), _raw_controls(text)
    assert len(text.splitlines()) == 1 + len(rows), "one line per row: no name breaks a line"


# -- the whole path: a day of such names through commit_days, then `sofar show` / `sofar review` ---


@pytest.fixture(scope="module")
def hostile_day(pipeline, demo_data, tmp_path_factory):
    """A day of the demo's OOD documents and photos under hostile names, predicted."""
    tmp = tmp_path_factory.mktemp("names")
    day = dt.date(2026, 11, 20)
    folder = tmp / "uploads" / day.isoformat()
    folder.mkdir(parents=True)
    sources = sorted((demo_data / "ood" / "documents").iterdir())
    sources += sorted((demo_data / "uploads" / "2026-11-01").iterdir())
    for k, name in enumerate(HOSTILE):  # the names on OOD documents: they land in the review queue
        shutil.copy(sources[k % len(sources)], folder / name)
    for k, src in enumerate(sources[len(HOSTILE) : len(HOSTILE) + 4]):
        shutil.copy(src, folder / f"{k}\x1b[2J{src.name}")
    base = yaml.safe_load((pipeline["folder"] / "sofar.yaml").read_text())
    base["uploads"] = {"folder": str(tmp / "uploads")}
    base["storage"]["warehouse"] = {"kind": "duckdb", "path": str(tmp / "names.duckdb")}
    path = tmp / "names.yaml"
    path.write_text(yaml.safe_dump(base))
    defs = build_definitions(load_config(path))
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        _assets(defs),
        selection=dg.AssetSelection.assets("daily_predictions"),
        partition_key=day.isoformat(),
        resources=defs.resources,
        instance=instance,
        raise_on_error=False,
    )
    return {"day": day, "result": result, "path": path, "defs": defs, "instance": instance, "tmp": tmp}


def test_a_day_of_hostile_names_commits_with_metadata_and_checks(hostile_day):
    result, day = hostile_day["result"], hostile_day["day"]
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    mats = [m for m in result.get_asset_materialization_events() if m.partition == day.isoformat()]
    assert len(mats) == 1, "the partition's materialization is recorded"
    md = mats[0].materialization.metadata
    assert md["review_queue"].value >= 1 and "review_sheet" in md, "the hostile names are in the review queue"
    table = md["review_rows"].value
    assert not _raw_controls(table), _raw_controls(table)
    assert len(table.splitlines()) == 2 + min(md["review_queue"].value, 18), "one markdown line per row"
    cells = {len(re.findall(r"(?<!\\)\|", line)) for line in table.splitlines()}
    assert len(cells) == 1, "no name adds a cell to its row"
    assert {c.check_name for c in result.get_asset_check_evaluations()} >= {
        "rows_match_uploads",
        "ood_rate_vs_trailing_7_days",
        "label_mix_vs_trailing_7_days",
        "uploads_found",
    }
    wh = hostile_day["defs"].resources["warehouse"].get()
    stored = wh.read_range("predictions", "prediction_date", day, day + dt.timedelta(days=1))
    assert {i.split("/", 1)[1] for i in stored["image_id"]} >= set(HOSTILE), "stored names are not altered"


@pytest.mark.parametrize("command", ["show", "review"])
def test_cli_output_has_no_raw_control_characters(hostile_day, monkeypatch, capsys, command):
    monkeypatch.setenv("SOFAR_CONFIG", str(hostile_day["path"]))
    out_png = hostile_day["tmp"] / f"{command}.png"
    code = cli.main([command, hostile_day["day"].isoformat(), "--out", str(out_png)])
    got = capsys.readouterr()
    assert code == 0, got.err
    assert not _raw_controls(got.out), _raw_controls(got.out)
    assert "\\x1b" in got.out or "\\n" in got.out, "the hostile names are listed, escaped"
    assert out_png.stat().st_size > 0
