"""Compliance keywords of inbound SMS (CTIA / carrier rules; see reference/sms.md)."""

from __future__ import annotations

import re
from typing import Literal

Keyword = Literal["opt_out", "opt_in", "help"]

OPT_OUT = frozenset(
    {
        "STOP",
        "STOPALL",
        "STOP ALL",
        "UNSUBSCRIBE",
        "CANCEL",
        "END",
        "QUIT",
        "REVOKE",
        "OPT OUT",
        "OPTOUT",
    }
)
OPT_IN = frozenset({"START", "UNSTOP", "YES"})
HELP = frozenset({"HELP", "INFO"})
_SPACES = re.compile(r"\s+")


def classify(text: str) -> Keyword | None:
    """The keyword a whole message is (any case, trimmed, inner spaces collapsed), or None."""
    word = _SPACES.sub(" ", text.strip()).upper().rstrip(".!")
    if word in OPT_OUT:
        return "opt_out"
    if word in OPT_IN:
        return "opt_in"
    if word in HELP:
        return "help"
    return None
