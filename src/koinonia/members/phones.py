"""Phone numbers to E.164 with the `phonenumbers` library.

`phonenumbers.parse` + `is_valid_number` costs ~65 µs a number, which alone would make a
100k-row import take 6.5 s. For the common case (a North American number read in a NANP
region) we apply the same metadata patterns the library uses, compiled once, and fall back
to the full library for everything else, so both paths give the library's answer.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from functools import cache

import phonenumbers
from phonenumbers import PhoneNumberFormat

_NANP_REGIONS = frozenset(phonenumbers.COUNTRY_CODE_TO_REGION_CODE[1])
_NANP_SHAPE = re.compile(r"^(?:\+?1)?([2-9][0-9]{9})$")
# What every stored phone matches; anything else is refused, whatever the parser said.
E164 = re.compile(r"^\+[1-9][0-9]{7,14}$")
_PUNCTUATION = str.maketrans("", "", " ().-")
_NUMBER_TYPES = (
    "fixed_line",
    "mobile",
    "toll_free",
    "premium_rate",
    "shared_cost",
    "personal_number",
    "voip",
    "pager",
    "uan",
    "voicemail",
)
MAX_LENGTH = 32


class InvalidPhoneError(ValueError):
    pass


_Patterns = list[tuple[re.Pattern[str] | None, re.Pattern[str], list[re.Pattern[str]]]]


@cache
def _nanp_patterns() -> _Patterns:
    """(leading digits, general, per-type) patterns of every NANP region, main one first,
    in the order `phonenumbers` tries them to find a number's region."""
    compiled: _Patterns = []
    for region in phonenumbers.COUNTRY_CODE_TO_REGION_CODE[1]:
        metadata = phonenumbers.PhoneMetadata.metadata_for_region(region)
        if metadata is None or metadata.general_desc is None:
            continue
        leading = re.compile(metadata.leading_digits) if metadata.leading_digits else None
        general = re.compile(metadata.general_desc.national_number_pattern or "")
        types = [
            re.compile(desc.national_number_pattern)
            for name in _NUMBER_TYPES
            if (desc := getattr(metadata, name)) is not None and desc.national_number_pattern
        ]
        compiled.append((leading, general, types))
    return compiled


def _fast_nanp(raw: str) -> str | None:
    match = _NANP_SHAPE.match(raw.translate(_PUNCTUATION))
    if match is None:
        return None
    national = match.group(1)
    for leading, general, types in _nanp_patterns():
        if leading is not None and not leading.match(national):
            continue
        if general.fullmatch(national) and any(p.fullmatch(national) for p in types):
            return "+1" + national
    return None


@cache
def _ascii_table() -> dict[int, str]:
    """Every Unicode decimal digit (Arabic-Indic `٥`, fullwidth `５`, Devanagari `५` …) →
    its ASCII digit (built on first use: ~0.1 s)."""
    return {
        code: str(unicodedata.decimal(chr(code)))
        for code in range(128, sys.maxunicode + 1)
        if unicodedata.category(chr(code)) == "Nd"
    }


def ascii_digits(raw: str) -> str:
    """`raw` with every Unicode decimal digit replaced by its ASCII digit."""
    return raw if raw.isascii() else raw.translate(_ascii_table())


def to_e164(raw: str, region: str) -> str:
    """The number in E.164 (always `^\\+[1-9][0-9]{7,14}$`), or `InvalidPhoneError`.

    Unicode digits are made ASCII first, so `+1 212 5٥٥ ٠١٢٣` and `+1 212 555 0123` are
    the same phone (the same blind index), whichever path reads them."""
    raw = ascii_digits(raw).strip()
    if not raw:
        raise InvalidPhoneError("is required")
    if len(raw) > MAX_LENGTH:
        raise InvalidPhoneError("is too long to be a phone number")
    if region in _NANP_REGIONS or raw.startswith("+1"):
        fast = _fast_nanp(raw)
        if fast is not None:
            return fast
    try:
        number = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException:
        raise InvalidPhoneError("is not a phone number") from None
    if not phonenumbers.is_valid_number(number):
        raise InvalidPhoneError("is not a valid phone number")
    e164 = phonenumbers.format_number(number, PhoneNumberFormat.E164)
    if not E164.fullmatch(e164):
        raise InvalidPhoneError("is not a valid phone number")
    return e164
