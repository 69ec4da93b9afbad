"""Free text that people type and the system stores (reasons, inspectors' names): one line, no
control characters, and (for cells that end up in a spreadsheet) no formula prefix.

A newline in a promotion reason forges lines in the champion history; an escape sequence
repaints the terminal that prints it; ``=HYPERLINK(...)`` in an inspector column runs when the
table is opened in a spreadsheet (CSV injection). These are refused, not cleaned: the person
who typed them is told which field and fixes it.
"""

from __future__ import annotations

import unicodedata

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
"""What spreadsheets read as the start of a formula (OWASP's CSV-injection list)."""
_SEPARATORS = {"\u2028", "\u2029"}  # line and paragraph separators: a new line to some readers
_BIDI = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))}  # reorder what is shown


def text_problem(value: str, *, formula: bool = False) -> str | None:
    """Why ``value`` cannot be stored as one line of text (None: it can). With ``formula``, a
    leading ``= + - @``, tab or carriage return is refused too."""
    for ch in value:
        if unicodedata.category(ch) == "Cc" or ch in _SEPARATORS or ch in _BIDI:
            return f"contains the control character {ascii(ch)[1:-1]} (one line of plain text only)"
    if formula and value.startswith(FORMULA_PREFIXES):
        return (f"starts with {ascii(value[0])[1:-1]!r}, which a spreadsheet runs as a formula "
                "(write it without the leading character)")
    return None
