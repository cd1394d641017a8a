"""Pure units: E.164 fast path equals the phonenumbers library; cipher; blind index."""

from __future__ import annotations

import base64
import uuid

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from koinonia.members.crypto import ContactCipher, DecryptionError
from koinonia.members.importing import ImportFailedError, map_columns
from koinonia.members.phones import InvalidPhoneError, to_e164


def _library(raw: str, region: str) -> str | None:
    try:
        number = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _ours(raw: str, region: str) -> str | None:
    try:
        return to_e164(raw, region)
    except InvalidPhoneError:
        return None


@settings(max_examples=3000)
@given(
    st.text(alphabet="0123456789", min_size=10, max_size=10),
    st.sampled_from(["{}", "+1{}", "1{}", "({0}{1}{2}) {3}{4}{5}-{6}{7}{8}{9}"]),
    st.sampled_from(["US", "CA", "GB"]),
)
def test_fast_path_agrees_with_the_library(digits: str, shape: str, region: str) -> None:
    raw = shape.format(*digits) if "{0}" in shape else shape.format(digits)
    assert _ours(raw, region) == _library(raw, region)


def test_examples() -> None:
    assert to_e164("(415) 555-2671", "US") == "+14155552671"
    assert to_e164("+44 20 7946 0958", "US") == "+442079460958"
    assert to_e164("020 7946 0958", "GB") == "+442079460958"
    assert to_e164("+1 416 555 0123", "US") == "+14165550123"  # Toronto: CA metadata
    for bad in ("", "12", "555-0000-000", "x" * 40, "+1 000 000 0000"):
        with pytest.raises(InvalidPhoneError):
            to_e164(bad, "US")


def _cipher(active: str = "k1") -> ContactCipher:
    keys = {"k1": b"1" * 32, "k2": b"2" * 32}
    return ContactCipher(keys, active, b"h" * 32)


def test_cipher_round_trip_rotation_and_binding() -> None:
    church, other = uuid.uuid4(), uuid.uuid4()
    old = _cipher("k1").encrypt("+14155550101", church)
    rotated = _cipher("k2")
    assert rotated.decrypt(old, church) == "+14155550101"  # old key still reads
    assert rotated.key_id_of(rotated.encrypt("x", church)) == "k2"
    with pytest.raises(DecryptionError):
        rotated.decrypt(old, other)  # bound to its church
    with pytest.raises(DecryptionError):
        ContactCipher({"k9": b"9" * 32}, "k9", b"h").decrypt(old, church)
    tampered = bytearray(old)
    tampered[-1] ^= 1
    with pytest.raises(DecryptionError):
        rotated.decrypt(bytes(tampered), church)


def test_blind_index_is_per_church_and_per_field() -> None:
    cipher = _cipher()
    a, b = uuid.uuid4(), uuid.uuid4()
    assert cipher.phone_hash("+1415", a) == cipher.phone_hash("+1415", a)
    assert cipher.phone_hash("+1415", a) != cipher.phone_hash("+1415", b)
    assert cipher.email_hash("A@B.org", a) == cipher.email_hash("a@b.org", a)
    assert cipher.blind_index("phone", "x", a) != cipher.blind_index("email", "x", a)


def test_settings_keyring_parses() -> None:
    from koinonia.members.crypto import parse_keyring

    key = base64.b64encode(b"k" * 32).decode()
    assert parse_keyring(f"k1:{key}, k2:{key}") == {"k1": b"k" * 32, "k2": b"k" * 32}


def test_column_mapping() -> None:
    assert map_columns(["First Name", "Cell Phone", "E-mail"], {}) == {
        "first_name": 0,
        "phone": 1,
        "email": 2,
    }
    assert map_columns(["a", "b"], {"phone": "B"}) == {"phone": 1}
    with pytest.raises(ImportFailedError):
        map_columns(["a"], {})
    with pytest.raises(ImportFailedError):
        map_columns(["a"], {"shoe": "a"})
    with pytest.raises(ImportFailedError):
        map_columns(["a"], {"phone": "zzz"})
