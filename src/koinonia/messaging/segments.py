"""GSM-7 / UCS-2 encoding and segment counting (3GPP TS 23.038; see reference/sms.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡"
    "ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION = frozenset("^{}\\[~]|€\f")  # two septets each (escape + character)
# Characters word processors paste that silently force UCS-2, with GSM-7 stand-ins.
SMART_PUNCTUATION = {"’": "'", "‘": "'", "“": '"', "”": '"', "–": "-", "—": "-", "…": "..."}

Encoding = Literal["GSM-7", "UCS-2"]


@dataclass(frozen=True, slots=True)
class SegmentCount:
    encoding: Encoding
    units: int  # septets (GSM-7) or UTF-16 code units (UCS-2)
    segments: int
    characters: int


def encoding_of(text: str) -> Encoding:
    allowed = GSM7_BASIC | GSM7_EXTENSION
    return "GSM-7" if all(c in allowed for c in text) else "UCS-2"


def _unit_sizes(text: str, encoding: Encoding) -> list[int]:
    if encoding == "GSM-7":
        return [2 if c in GSM7_EXTENSION else 1 for c in text]
    return [2 if ord(c) > 0xFFFF else 1 for c in text]  # surrogate pairs


def count(text: str) -> SegmentCount:
    encoding = encoding_of(text)
    sizes = _unit_sizes(text, encoding)
    units = sum(sizes)
    single, multi = (160, 153) if encoding == "GSM-7" else (70, 67)
    if units <= single:
        segments = 1 if text else 0
    else:
        # Fill segments greedily; an escape pair or surrogate pair never straddles two.
        segments, used = 1, 0
        for size in sizes:
            if used + size > multi:
                segments += 1
                used = 0
            used += size
    return SegmentCount(encoding, units, segments, len(text))


def gsm_friendly(text: str) -> str:
    """The text with smart punctuation replaced by its GSM-7 equivalent."""
    return "".join(SMART_PUNCTUATION.get(c, c) for c in text)
