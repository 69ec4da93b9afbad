#!/usr/bin/env bash
# Set up the local BigQuery emulator that tests/test_bigquery.py starts: ./.venv-bq holds
# bqemulator (PyPI, needs Python >= 3.11) and ./.venv-bq/home is the HOME it runs with.
#
# bqemulator runs `INSTALL spatial` (required) and `INSTALL avro` at start, which normally
# downloads them from DuckDB's extension repository. This machine and CI cannot reach it, so the
# extensions come from the PyPI packages duckdb-extension-{spatial,avro} (same version as duckdb)
# and are copied to $HOME/.duckdb/extensions/v<version>/<platform>/, where INSTALL finds them
# already installed and does nothing.
#
# Idempotent: a second run only re-checks that the extensions load (about a second).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-bq
BQEMULATOR_VERSION=1.4.0
DUCKDB_VERSION=1.5.5
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3.12 || command -v python3)}
STAMP="$VENV/.installed-bqemulator-$BQEMULATOR_VERSION-duckdb-$DUCKDB_VERSION"

if [ ! -f "$STAMP" ]; then
    start=$(date +%s)
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
        "bqemulator==$BQEMULATOR_VERSION" \
        "duckdb==$DUCKDB_VERSION" \
        "duckdb-extension-spatial==$DUCKDB_VERSION" \
        "duckdb-extension-avro==$DUCKDB_VERSION" \
        numpy 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    touch "$STAMP"
    echo "bqemulator.sh: installed $VENV in $(($(date +%s) - start)) s"
fi

platform=$("$VENV/bin/python" -c 'import duckdb; print(duckdb.execute("PRAGMA platform").fetchone()[0])')
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
ext_dir="$VENV/home/.duckdb/extensions/v$DUCKDB_VERSION/$platform"
mkdir -p "$ext_dir"
for name in spatial avro; do
    src="$site/duckdb_extension_$name/extensions/v$DUCKDB_VERSION/$name.duckdb_extension"
    if [ ! -f "$src" ]; then
        echo "bqemulator.sh: $src is missing (duckdb-extension-$name==$DUCKDB_VERSION for $platform?)" >&2
        exit 1
    fi
    cmp -s "$src" "$ext_dir/$name.duckdb_extension" || cp "$src" "$ext_dir/$name.duckdb_extension"
done

# Fail here, not at emulator start, if the copied extensions do not load offline
HOME="$PWD/$VENV/home" "$VENV/bin/python" -c '
import duckdb
con = duckdb.connect()
for name in ("spatial", "avro"):
    con.execute(f"INSTALL {name}")
    con.execute(f"LOAD {name}")
'
echo "bqemulator.sh: ready: HOME=$PWD/$VENV/home $VENV/bin/bqemulator start --rest-port 9050"
