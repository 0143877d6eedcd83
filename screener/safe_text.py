"""What of a dataset's values may appear in audit messages and logs.

Audit rows and log lines outlive the images (retention deletes images, not the trail) and are
read by people who need no patient data to do their job. So a message quotes a header value
only when it is a coded value (CS, UI, AS, DA, IS, DS) that matches its value representation's
repertoire, truncated; anything else (a name typed into BodyPartExamined, free text, bytes) is
described, never copied. :func:`scrub` does the same for messages of exceptions raised by
libraries, which often quote the offending value.
"""

from __future__ import annotations

import re

__all__ = ["quote", "scrub"]

# PS3.5 6.2: the characters each coded VR may hold (CS after upper-casing).
_REPERTOIRE = {
    "CS": re.compile(r"[A-Z0-9 _]{1,16}"),
    "UI": re.compile(r"[0-9.]{1,64}"),
    "AS": re.compile(r"[0-9]{3}[DWMY]"),
    "DA": re.compile(r"[0-9]{8}"),
    "IS": re.compile(r"[+-]?[0-9]{1,12}"),
    "DS": re.compile(r"[0-9+\-.Ee]{1,16}"),
}
_MESSAGE_MAX = 300
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|b'[^']*'")


def quote(value: object, vr: str) -> str:
    """``'VALUE'`` when ``value`` is a valid ``vr`` value, else a description without it."""
    text = str(value).strip() if value is not None else ""
    if not text:
        return "empty"
    pattern = _REPERTOIRE[vr]
    if pattern.fullmatch(text):
        return f"'{text}'"
    return f"a value that is not a valid {vr} (not quoted)"


def scrub(message: object, limit: int = _MESSAGE_MAX) -> str:
    """An exception's message with every quoted part replaced and the length bounded."""
    text = _QUOTED.sub("'…'", " ".join(str(message).split()))
    return text if len(text) <= limit else text[: limit - 1] + "…"
