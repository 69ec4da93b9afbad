"""Dagster definitions: thin, declarative wrappers over :mod:`sofar_assets.lib`."""
