"""The production components as real local processes, for ``make prod-local`` and the ``stack`` tests.

Not used by the pipeline itself: ``servers.py`` starts and stops PostgreSQL, the GCS emulator,
the MLflow tracking server (basic auth) and the Dagster webserver + daemon on this machine.
"""
