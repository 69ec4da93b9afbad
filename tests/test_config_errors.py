"""A broken config is one clear line naming the file (and the line), never a traceback:
a non-UTF-8 byte, SOFAR_CONFIG naming a folder, nesting 50,000 deep, a key given twice."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sofar_assets.config import ConfigError, load_config, parse_config
from sofar_assets.settings import REPO_ROOT

DEMO = (REPO_ROOT / "config" / "demo.yaml").read_bytes()
CASES = {
    "non_utf8_comment": (
        DEMO + b"# caf\xe9: a Latin-1 byte in a comment\n",
        r"line \d+: byte 0xe9 is not UTF-8",
    ),
    "nested_50000_deep": (b"tasks: " + b"[" * 50_000 + b"]" * 50_000 + b"\n", "nested too deeply"),
    "duplicate_gate": (
        DEMO + b"\ngate:\n  max_ece: 0.05\ngate:\n  max_ece: 0.9\n",
        r"line (\d+), column 1: not valid YAML: duplicate key 'gate' \(first on line \d+, "
        r"again on line \1\)",
    ),
    "duplicate_nested_key": (DEMO + b"\ngate: {max_ece: 0.05, max_ece: 0.9}\n", "duplicate key 'max_ece'"),
}


def _write(tmp_path: Path, case: str) -> Path:
    path = tmp_path / f"{case}.yaml"
    path.write_bytes(CASES[case][0])
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_config_names_the_file_and_the_problem(tmp_path, case):
    path = _write(tmp_path, case)
    with pytest.raises(ConfigError, match=CASES[case][1]) as exc:
        load_config(path, check_paths=False)
    assert str(exc.value).startswith(f"{path}: ")


def test_a_folder_is_not_a_config(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a config file"):
        load_config(tmp_path)


def _error(fn) -> str:
    try:
        fn()
    except ConfigError as exc:
        return str(exc)
    return "no error"


def test_a_pipe_or_a_huge_file_is_not_read(tmp_path):
    os.mkfifo(tmp_path / "pipe.yaml")
    got = []
    # in a thread: a read of the pipe would block forever (no writer), and the test must fail, not hang
    reader = threading.Thread(
        target=lambda: got.append(_error(lambda: load_config(tmp_path / "pipe.yaml"))), daemon=True
    )
    reader.start()
    reader.join(30)
    assert got and "is a named pipe, not a config file" in got[0], "the pipe was opened"
    with open(tmp_path / "huge.yaml", "wb") as f:
        f.truncate(10**9)  # sparse: no disk
    with pytest.raises(ConfigError, match="1000000000 bytes is not a config file"):
        load_config(tmp_path / "huge.yaml")


def test_merge_keys_may_still_be_overridden(tmp_path):
    """``<<`` is how YAML says "these defaults, then my changes": not a duplicate."""
    path = tmp_path / "merge.yaml"
    path.write_bytes(
        DEMO + b"\nx-gate: &strict {max_ece: 0.05, min_ood_auroc: 0.9}\ngate: {<<: *strict, max_ece: 0.1}\n"
    )
    with pytest.raises(ConfigError, match="x-gate: unknown key"):  # parsed fine; the extra key is named
        load_config(path, check_paths=False)


@pytest.mark.parametrize("case", [*sorted(CASES), "folder"])
def test_sofar_validate_prints_one_line_and_exits_2(tmp_path, case):
    target = tmp_path if case == "folder" else _write(tmp_path, case)
    run = subprocess.run(
        [sys.executable, "-m", "sofar_assets.cli", "validate"],
        capture_output=True,
        text=True,
        env={**os.environ, "SOFAR_CONFIG": str(target)},
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert run.stderr.startswith(f"{target}: ")


# -- item 8 (timezone part): checked when the config loads ---------------------------------------


def test_unknown_timezone_is_a_config_error_naming_the_key():
    base = {"tasks": {"defect": {"folder": "t", "labels": {"0": "normal", "1": "defect"}}},
            "uploads": {"folder": "up"}}
    for tz in ("Mars/Olympus", "../../etc/localtime", ""):
        with pytest.raises(ConfigError, match=r"partitions\.timezone: .*unknown time zone"):
            parse_config({**base, "partitions": {"start_date": "2026-11-01", "timezone": tz}},
                         base_dir=Path("/tmp"))
    cfg = parse_config({**base, "partitions": {"start_date": "2026-11-01", "timezone": "Asia/Seoul"}},
                       base_dir=Path("/tmp"))
    assert cfg.partitions.timezone == "Asia/Seoul"


