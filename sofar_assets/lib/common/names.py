"""Names as they are SHOWN: a file name, URI or error text made safe for a terminal, a log line,
a PNG caption and a markdown cell.

A phone or a bucket allows almost any character in a name: newlines (which break a log line, a
markdown table, and Pillow's single-line text measuring), terminal escape codes (which recolour
or rewrite a terminal), bidi overrides (which reorder what is read), zero-width characters, and
names of thousands of characters. :func:`shown` writes every such character as a visible
backslash escape and shortens a long name in the middle (its extension stays visible).

Only what is displayed passes through here: the stored ``image_id``/``image_uri`` are never
altered (they are keys, and the real name is what a person must be able to find).
"""

from __future__ import annotations

import math
import re
import unicodedata

MAX_SHOWN = 160
"""Longest name shown, in characters (after escaping)."""
_TAIL = 24  # characters kept from the end of a shortened name (its extension, a counter)
_ELLIPSIS = "…"
# control (Cc), format (Cf: bidi overrides, zero-width joiners, BOM), line/paragraph separators,
# surrogates (undecodable bytes of a file name), private use and unassigned code points
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_BACKTICKS = re.compile("`+")


def _escape(ch: str) -> str:
    if ch in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[ch]
    cp = ord(ch)
    if cp <= 0xFF:
        return f"\\x{cp:02x}"
    if cp <= 0xFFFF:
        return f"\\u{cp:04x}"
    return f"\\U{cp:08x}"


def _safe_char(ch: str) -> str:
    if ch.isascii():
        return ch if " " <= ch <= "~" else _escape(ch)
    return _escape(ch) if unicodedata.category(ch) in _UNSAFE_CATEGORIES else ch


def shown(value: object, max_len: int = MAX_SHOWN) -> str:
    """``value`` as one printable line of at most ``max_len`` characters.

    Control characters, escape codes, bidi and other format characters, line separators and
    unassigned code points become ``\\n``, ``\\x1b``, ``\\u202e``...; a longer result keeps its
    start and its last characters around ``…``. ``None``/NaN give ``"-"``.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = value if isinstance(value, str) else str(value)
    if len(text) > 2 * max_len:  # never walk a megabyte-long name: only its ends can be shown
        head = "".join(_safe_char(ch) for ch in text[:max_len])
        out = head + _ELLIPSIS + "".join(_safe_char(ch) for ch in text[-_TAIL:])
    else:
        out = "".join(_safe_char(ch) for ch in text)
    if len(out) > max_len:
        keep_tail = min(_TAIL, max_len // 3)
        out = out[: max_len - keep_tail - 1] + _ELLIPSIS + out[len(out) - keep_tail :]
    return out


def md_text(value: object, max_len: int = MAX_SHOWN, *, table: bool = False) -> str:
    """:func:`shown` as a markdown code span: nothing in a name is rendered (no ``[link](…)``, no
    ``<tag>``, no emphasis) and the raw text stays readable. A backtick in the name gets a longer
    fence; with ``table`` a ``|`` is written ``\\|`` so that it does not split a GFM table cell."""
    text = shown(value, max_len)
    if table:
        text = text.replace("|", "\\|")
    fence = "`" * (max((len(r) for r in _BACKTICKS.findall(text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _text_columns(df, columns) -> list:
    if columns is not None:
        return list(columns)
    from pandas.api.types import is_object_dtype, is_string_dtype

    return [c for c in df.columns if is_object_dtype(df[c]) or is_string_dtype(df[c])]


def md_frame(df, columns=None):
    """A copy of ``df`` whose text ``columns`` (default: every text column) are :func:`md_text`:
    for ``DataFrame.to_markdown``."""
    return df.assign(
        **{
            str(c): df[c].map(lambda v: md_text(v, table=True), na_action="ignore").astype(object)
            for c in _text_columns(df, columns)
        }
    )


def shown_frame(df, columns=None):
    """A copy of ``df`` whose text ``columns`` (default: every text column) are :func:`shown`:
    for ``DataFrame.to_string`` in a terminal."""
    return df.assign(
        **{str(c): df[c].map(shown, na_action="ignore").astype(object) for c in _text_columns(df, columns)}
    )
