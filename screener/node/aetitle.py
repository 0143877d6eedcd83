"""The one AE title rule, for the titles we answer to, accept, and call with."""

from __future__ import annotations

__all__ = ["validate_ae_title"]


def validate_ae_title(key: str, value: object) -> str:
    """``value`` without padding if it is a valid AE title, else ValueError naming ``key``.

    PS3.5 6.2 AE: 1 to 16 characters of the default repertoire (printable ASCII), no
    backslash, not only spaces; leading and trailing spaces are padding, not significant.
    """
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key}: an AE title is required (1-16 printable ASCII characters), got {value!r}")
    if len(value) > 16:
        raise ValueError(f"{key}: AE title {value!r} is {len(value)} characters; at most 16 are allowed")
    if "\\" in value or any(not 0x20 <= ord(c) < 0x7F for c in value):
        raise ValueError(f"{key}: AE title {value!r} may hold printable ASCII only, no backslash or control characters")
    return value.strip()
