"""Names that are quoted into SQL: tables, columns, schemas, BigQuery projects and datasets.

Each is checked against a strict pattern before it reaches a query, so quoting can never be
escaped (a backtick in a project name, a quote in a table name).
"""

from __future__ import annotations

import re

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,299}")
# GCP project ids: 6-30 characters, lowercase letters, digits and hyphens, starting with a letter
# and not ending with a hyphen; legacy domain-scoped ids are "example.com:my-project".
_PROJECT = re.compile(r"(?:[a-z0-9](?:[a-z0-9.-]{0,61}[a-z0-9])?:)?[a-z][a-z0-9-]{4,28}[a-z0-9]")
_DATASET = re.compile(r"[A-Za-z0-9_]{1,1024}")


def check_identifier(name: str, what: str = "name") -> str:
    """Table and column names are plain identifiers, so they can be quoted into SQL safely."""
    if not isinstance(name, str) or not _IDENT.fullmatch(name):
        raise ValueError(
            f"invalid {what} {name!r}: use letters, digits and underscores, not starting with a digit"
        )
    return name


def check_project(project: str) -> str:
    """A GCP project id (``my-project`` or domain-scoped ``example.com:my-project``)."""
    if not isinstance(project, str) or not _PROJECT.fullmatch(project):
        raise ValueError(
            f"invalid BigQuery project {project!r}: a GCP project id is 6-30 lowercase letters, digits "
            "or hyphens, starting with a letter and not ending with a hyphen (domain-scoped: "
            "'example.com:my-project')"
        )
    return project


def check_dataset(dataset: str) -> str:
    """A BigQuery dataset id: letters, digits and underscores."""
    if not isinstance(dataset, str) or not _DATASET.fullmatch(dataset):
        raise ValueError(f"invalid BigQuery dataset {dataset!r}: use letters, digits and underscores")
    return dataset
