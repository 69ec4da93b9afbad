"""Browser check of the Dagster UI over the demo state that `make run` left (`make ui-check`).

Starts `dg dev` (the Dagster webserver + daemon) on a free port, then headless Chromium:

1. the global asset lineage: every asset of the graph must appear in the rendered DOM;
2. one partition of ``daily_predictions``: the partition page must show that day's own row
   count, equal to the number of rows the ``predictions`` table holds for the day.

Screenshots land in ``.sofar/ui-check/*.png`` (their paths are printed). Needs `make run` first
(the check refuses to start without the predictions table) and a `chromium` binary
(``apt-get install -y chromium`` on Debian; run as root it is installed when missing).
Exit 0 when both checks pass, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import html
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHROMIUM_FLAGS = ["--headless", "--virtual-time-budget=15000", "--no-sandbox", "--disable-gpu",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--window-size=1600,1000"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        print("chromium not found: apt-get install -y chromium", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        return shutil.which("chromium") or sys.exit("chromium still not found after apt-get install")
    sys.exit("no chromium binary: install it (Debian/Ubuntu: apt-get update && apt-get install -y chromium)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"dagster exited with code {proc.returncode} before serving {url}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    sys.exit(f"{url} did not answer within {timeout:.0f} s")


def dismiss_community_nux(base: str) -> None:
    """What the modal's *Skip* does: on a localhost origin Dagster covers every page with a
    "Join the Dagster community" dialog until the instance records that it was seen."""
    req = urllib.request.Request(f"{base}/graphql",
                                 data=json.dumps({"query": "mutation { setNuxSeen }"}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        r.read()


def browse(browser: str, url: str, png: Path, profile: str) -> str:
    """Screenshot ``url`` into ``png`` and return its rendered DOM (two Chromium runs)."""
    common = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    subprocess.run([*common, f"--screenshot={png}", url], check=True, capture_output=True, timeout=180)
    dom = subprocess.run([*common, "--dump-dom", url],
                         check=True, capture_output=True, text=True, timeout=180)
    return dom.stdout


def text_of(dom: str) -> str:
    """The page's visible text, whitespace collapsed (scripts and styles dropped)."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom))).strip()


def row_count_shown(text: str) -> int | None:
    """The number the partition page shows for the materialization's ``dagster/row_count``."""
    m = re.search(r"dagster/row_count\s+([\d,]+)", text) or re.search(r"Row count\s+([\d,]+)", text, re.I)
    return int(m.group(1).replace(",", "")) if m else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--day", type=dt.date.fromisoformat,
                        help="partition to check (default: the first day in the table)")
    parser.add_argument("--out", type=Path, default=REPO / ".sofar" / "ui-check")
    parser.add_argument("--dagster-home", type=Path, default=REPO / "dagster_home")
    parser.add_argument("--timeout", type=float, default=240, help="seconds to wait for the webserver")
    args = parser.parse_args()

    import dagster as dg

    from sofar_assets.config import load_config
    from sofar_assets.definitions import build_definitions
    from sofar_assets.settings import config_path

    cfg = load_config(config_path())
    defs = build_definitions(cfg)
    wh = defs.resources["warehouse"].get()
    if not wh.table_exists("predictions"):
        sys.exit("no predictions table: run `make run` first (the check looks at the state it leaves)")
    days = wh.query("SELECT min(prediction_date) AS d FROM {table:predictions}")
    day = args.day or days["d"].iloc[0]
    expected = wh.count_range("predictions", "prediction_date", day, day + dt.timedelta(days=1))
    # what the upstream lineage of daily_predictions must show (not the reports, which are beside it)
    graph = defs.resolve_asset_graph()
    upstream = dg.AssetSelection.assets("daily_predictions").upstream().resolve(graph)
    groups = sorted({graph.get(k).group_name for k in graph.get_all_asset_keys()})  # external specs included
    asset_keys = sorted(k.to_user_string() for k in upstream)
    del wh  # DuckDB: one writer; the webserver process opens the file itself

    browser = chromium()
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(args.out / "dagster.log", "w")  # noqa: SIM115 (closed in finally)
    env = {**os.environ, "DAGSTER_HOME": str(args.dagster_home.resolve()), "SOFAR_CONFIG": str(config_path()),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    dg_bin = Path(sys.executable).with_name("dg")
    server = subprocess.Popen(
        [str(dg_bin), "dev", "-m", "sofar_assets.definitions", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    failures: list[str] = []
    try:
        wait_for(f"{base}/server_info", args.timeout, server)
        dismiss_community_nux(base)
        with tempfile.TemporaryDirectory(prefix="sofar-chromium-") as profile:
            groups_png = args.out / "lineage-groups.png"
            text = text_of(browse(browser, f"{base}/asset-groups", groups_png, profile))
            print(f"{groups_png}: global asset lineage, "
                  f"groups {[g for g in groups if g in text]} of {groups}")
            if any(g not in text for g in groups):
                failures.append(f"global lineage: groups not shown: {[g for g in groups if g not in text]}")

            # the whole graph, expanded: everything upstream of the prediction table
            lineage_png = args.out / "lineage.png"
            url = f"{base}/assets/daily_predictions?view=lineage&lineageScope=upstream&lineageDepth=10"
            text = text_of(browse(browser, url, lineage_png, profile))
            missing = [k for k in asset_keys if k.rsplit("/", 1)[-1] not in text]
            print(f"{lineage_png}: lineage of daily_predictions, "
                  f"{len(asset_keys) - len(missing)}/{len(asset_keys)} assets shown")
            if missing:
                failures.append(f"lineage: assets not shown: {missing}")

            part_png = args.out / f"daily_predictions-{day}.png"
            url = f"{base}/assets/daily_predictions?view=partitions&partition={day}"
            text = text_of(browse(browser, url, part_png, profile))
            (args.out / f"daily_predictions-{day}.txt").write_text(text)
            shown = row_count_shown(text)
            print(f"{part_png}: partition {day} of daily_predictions, row count shown {shown}, "
                  f"rows in the table for the day {expected}")
            if day.isoformat() not in text:
                failures.append(f"partition page does not show {day}")
            if shown != expected:
                failures.append(f"partition {day}: the page shows row count {shown}, "
                                f"the table holds {expected} rows for that day "
                                "(a range run that reports the range's total per partition fails this)")
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
        log.close()
    for f in failures:
        print(f"FAIL {f}", file=sys.stderr)
    print("ui-check: " + ("passed" if not failures else f"FAILED ({len(failures)})"))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
