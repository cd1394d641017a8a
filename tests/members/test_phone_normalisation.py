"""Property tests of phone normalisation (pure functions, no database)."""

from __future__ import annotations

import re
import unicodedata

import phonenumbers
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from koinonia.members.phones import InvalidPhoneError, to_e164

E164 = re.compile(r"^\+[1-9][0-9]{7,14}$")
# Decimal digit sets a person may type: Arabic-Indic, Extended Arabic-Indic, Devanagari,
# Bengali, Thai, fullwidth, mathematical bold.
ZEROS = ["\u0660", "\u06f0", "\u0966", "\u09e6", "\u0e50", "\uff10", "\U0001d7ce"]
REGIONS = ["US", "CA", "GB", "DE", "FR", "IN", "BR", "AU", "JM", "PR"]

nanp_national = st.from_regex(r"[2-9][0-9]{2}[2-9][0-9]{6}", fullmatch=True)
ascii_numbers = st.one_of(
    nanp_national,
    nanp_national.map(lambda n: f"+1 ({n[:3]}) {n[3:6]}-{n[6:]}"),
    nanp_national.map(lambda n: f"1-{n[:3]}-{n[3:6]}-{n[6:]}"),
    st.from_regex(r"\+?[0-9 ().-]{4,20}", fullmatch=True),
    st.from_regex(r"\+(44|49|33|91|55|61)[0-9]{6,12}", fullmatch=True),
)


def library(raw: str, region: str) -> str | None:
    """What `phonenumbers` alone answers (None when it refuses)."""
    raw = raw.strip()
    if not raw or len(raw) > 32:
        return None
    try:
        number = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def ours(raw: str, region: str) -> str | None:
    try:
        return to_e164(raw, region)
    except InvalidPhoneError:
        return None


def respell(raw: str, zero: str) -> str:
    """`raw` with its ASCII digits written in the digit set whose zero is `zero`."""
    return "".join(chr(ord(zero) + int(c)) if c.isdigit() else c for c in raw)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(raw=ascii_numbers, region=st.sampled_from(REGIONS))
@example(raw="+1 212 555 0123", region="US")
@example(raw="2125550123", region="GB")
def test_ascii_input_gives_the_library_answer(raw: str, region: str) -> None:
    assert ours(raw, region) == library(raw, region)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(raw=ascii_numbers, region=st.sampled_from(REGIONS), data=st.data())
def test_unicode_digit_variants_give_the_same_e164(
    raw: str, region: str, data: st.DataObject
) -> None:
    zero = data.draw(st.sampled_from(ZEROS))
    # Some digits respelt, some left ASCII: mixed scripts, as people paste them.
    mask = data.draw(st.lists(st.booleans(), min_size=len(raw), max_size=len(raw)))
    variant = "".join(respell(c, zero) if m else c for c, m in zip(raw, mask, strict=True))
    assert ours(variant, region) == ours(raw, region)
    assert ours(respell(raw, zero), region) == ours(raw, region)


def test_mixed_scripts_are_one_phone() -> None:
    assert to_e164("+1 212 5٥٥ ٠١٢٣", "US") == "+12125550123"
    assert to_e164("+1 ２１２ 555 ０１２３", "CA") == "+12125550123"
    assert to_e164("+44 ２０ ７９４６ ٠٩٥٨", "US") == "+442079460958"


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.text(max_size=40), region=st.sampled_from(REGIONS))
@example(raw="+1 212 555 0123\n", region="US")
@example(raw="+1 212 5٥٥ ٠١٢٣", region="US")
def test_output_is_always_ascii_e164_or_refused(raw: str, region: str) -> None:
    result = ours(raw, region)
    assert result is None or E164.fullmatch(result), result


@settings(max_examples=300)
@given(
    raw=st.text(
        alphabet=st.characters(categories=["Nd"]) | st.sampled_from(" +()-0123456789"),
        min_size=8,
        max_size=20,
    ),
    region=st.sampled_from(REGIONS),
)
@example(raw="+1 212 5٥٥ ٠١٢٣", region="US")
@example(raw="415 ５5５ 0１99", region="CA")
def test_any_decimal_digits_normalise_like_their_ascii_values(raw: str, region: str) -> None:
    ascii_raw = "".join(
        str(unicodedata.decimal(c)) if unicodedata.category(c) == "Nd" else c for c in raw
    )
    assert ours(raw, region) == ours(ascii_raw, region)
