"""Characters no text field may carry, checked once for every request and CSV cell.

- NUL (U+0000): PostgreSQL `text` cannot store it (and `jsonb` refuses `\\u0000`).
- Lone surrogates (U+D800–U+DFFF): not encodable as UTF-8, so neither PostgreSQL nor an
  SMS can carry them (JSON can still spell them as `\\ud800`).
- The other C0 controls (U+0001–U+001F except tab, line feed and carriage return): an SMS
  cannot carry them (GSM-7 has no such characters; in UCS-2 handsets drop or garble them),
  and in names they only hide text from people and logs. Tab, LF and CR stay allowed
  (multi-line message bodies and help texts). DEL and the C1 controls are left alone:
  PostgreSQL stores them and the SMS encoder falls back to UCS-2 for them like any
  non-GSM character.
"""

from __future__ import annotations

import re

_UNSAFE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff]")


def unsafe_character(value: str) -> str | None:
    """Why `value` cannot be stored or texted, or None when it can."""
    found = _UNSAFE.search(value)
    if found is None:
        return None
    char = found.group()
    if char == "\x00":
        what = "a NUL character (U+0000)"
    elif "\ud800" <= char <= "\udfff":
        what = f"a lone surrogate (U+{ord(char):04X})"
    else:
        what = f"a control character (U+{ord(char):04X})"
    return f"contains {what}, which cannot be stored or texted"
