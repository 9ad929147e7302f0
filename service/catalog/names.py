"""Names people give to what they upload: bounded in length and free of control characters.

A name is metadata shown back in listings and in download headers, so it must stay small (a
200,000-character name once came back in a 200 KB ``Content-Disposition``) and must not carry line
breaks or other control characters that could split a header or a log line.
"""

from __future__ import annotations

import unicodedata

from service.errors import InvalidName

NAME_SETTING = "ENGINE_SERVICE_MAX_NAME_CHARS"


def checked_name(name: str, *, max_chars: int, what: str) -> str:
    """``name`` without surrounding whitespace, or InvalidName saying what to change.

    ``what`` names the thing in the message ("model name"). Refused: longer than ``max_chars``
    characters, or holding control or format characters (Unicode categories Cc, Cf: line breaks,
    NUL, bidirectional overrides).
    """
    stripped = name.strip()
    if len(stripped) > max_chars:
        raise InvalidName(
            f"The {what} is {len(stripped)} characters long; names are limited to {max_chars} characters "
            f"({NAME_SETTING}). Send a shorter name."
        )
    if any(unicodedata.category(char) in ("Cc", "Cf") for char in stripped):
        raise InvalidName(
            f"The {what} contains control characters (line breaks, tabs, NUL or direction marks); "
            "send a name of printable characters only."
        )
    return stripped
