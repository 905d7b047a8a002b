"""Normalization of user identifiers and masking of personal data in free text.

Normalization runs before pseudonymization so that one person yields one pseudonym:

* an identifier that looks like an email address is trimmed and case-folded
  (``" Jane.Doe+promo@Example.COM "`` -> ``"jane.doe+promo@example.com"``); plus tags
  are kept, since not every provider treats ``a+x@`` and ``a@`` as one mailbox;
* an identifier written as a phone number (a ``+``/``00`` prefix, or digits grouped by
  spaces, dots, dashes or parentheses) that Google's ``phonenumbers`` library reads as a
  valid number becomes E.164 (``"(415) 555-2671"`` -> ``"+14155552671"``); national
  notations are read in :data:`DEFAULT_REGION`;
* anything else is an opaque id and only trimmed; a bare run of digits (``"196"``,
  ``"4155552671"``) stays as it is, because datasets use numeric ids.

Masking (:func:`mask_text`) replaces, in this order:

* payment card numbers: 13-19 digits, optionally grouped by spaces or dashes, that pass
  the Luhn check -> ``[CARD]`` (digit runs failing Luhn, such as order numbers, stay);
* email addresses (plus-addressing and subdomains included) -> ``[EMAIL]``;
* phone numbers that ``phonenumbers`` finds and validates in international form or in
  the national form of :data:`DEFAULT_REGION` -> ``[PHONE]``; besides, any run of 7 or
  more digits that starts the way a dialled number does (``+``, ``(``, or a
  trunk/international ``0`` followed by groups split by spaces, dots, dashes or
  parentheses) -> ``[PHONE]``, which catches national notations of other regions
  (``030 72946153``) and numbers written next to each other, where ``phonenumbers``
  reads one invalid number;
* street addresses in the common English form: a house number, one to four words and a
  street suffix (``221B Baker Street``, ``1600 Pennsylvania Ave NW``), with an optional
  unit (``Apt 4``, ``Suite 200``, ``#12``); German-style ``Hauptstrasse 5`` /
  ``Hauptstr. 5``; and ``PO Box 123`` -> ``[ADDRESS]``.

Not detected: names of people, postal codes or cities on their own, addresses without a
house number or street suffix (``"the blue house by the station"``), national numbers
of regions other than :data:`DEFAULT_REGION` written without a country code as one
bare run of digits (``03072946153``) or without the trunk ``0`` (``72946153``), card
numbers split other than by spaces/dashes, IBANs, government ids (SSN and the like) and
IP addresses. Free-text columns are therefore still treated as ``sensitive`` in the raw
zone; masking lowers the risk in curated data, it does not prove the text anonymous.
A version string such as ``0.1.2.3.4.5.6`` is masked as a phone number and titles such
as ``"21 Jump Street"`` as addresses: a false positive costs a search query some words,
a false negative leaks personal data.

Presidio was not used: its recognizers need a spaCy model downloaded from a model hub at
install time, and its pattern recognizers for these four kinds are what is written here.
``phonenumbers`` (Google's libphonenumber metadata) does the part regexes do badly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import phonenumbers

#: Region whose national phone notation is understood without a country code.
DEFAULT_REGION = "US"

#: Replacement tokens per kind of personal data.
MASKS: dict[str, str] = {
    "card": "[CARD]",
    "email": "[EMAIL]",
    "phone": "[PHONE]",
    "address": "[ADDRESS]",
}

_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}(?![\w-])"
)
_CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")
_PHONE_LIKE = re.compile(r"(?:tel:)?\+?[\d\s().-]{7,}")
# A maximal run of grouped digits starting like a dialled number: "+", "(" or "0".
# Not after ":" nor before ":" (clock times such as 21:42:05.211159+00:00).
_DIALLED_RUN = re.compile(r"(?<![\w+.:-])(?:\+|\(\+?)?\d(?:[ ().-]{0,2}\d)+(?![\w:])")
# Calendar dates written with separators (04.12.2026, 04-12-26) are not numbers to dial.
_DATE = re.compile(r"\d{1,2}([./-])\d{1,2}\1\d{2,4}")
_MIN_PHONE_DIGITS = 7
_STREET_SUFFIXES = (
    "street|st|avenue|ave|road|rd|boulevard|blvd|lane|ln|drive|dr|court|ct|place|pl|"
    "way|terrace|ter|parkway|pkwy|highway|hwy|square|sq|close|crescent|cres|circle|cir|"
    "alley|row|trail|trl|plaza"
)
_ADDRESS = re.compile(
    r"\b\d{1,6}[A-Za-z]?\s+(?:[A-Za-z][A-Za-z.'-]*\s+){1,4}"
    rf"(?:{_STREET_SUFFIXES})\b\.?"
    r"(?:\s+(?:N|S|E|W|NE|NW|SE|SW)\b)?"
    r"(?:,?\s+(?:apt|apartment|suite|ste|unit|flat|#)\.?\s*[A-Za-z0-9-]+)?",
    re.IGNORECASE,
)
_GERMAN_ADDRESS = re.compile(
    r"\b[A-Za-zÄÖÜäöüß-]+(?:stra(?:ss|ß)e|str\.|weg|platz|allee|gasse)\s+\d{1,4}[a-z]?\b",
    re.IGNORECASE,
)
_PO_BOX = re.compile(r"\bP\.?\s?O\.?\s+Box\s+\d+\b", re.IGNORECASE)


@dataclass(frozen=True)
class PiiSpan:
    """One piece of personal data found in a text.

    Attributes:
        kind: ``card``, ``email``, ``phone`` or ``address``.
        start: offset of the first character.
        end: offset after the last character.
    """

    kind: str
    start: int
    end: int


def normalize_email(value: str) -> str:
    """Trim and case-fold an email address (plus tags are kept).

    Args:
        value: the address as typed.

    Returns:
        The normalized address.
    """
    return value.strip().casefold()


def normalize_phone(value: str, region: str = DEFAULT_REGION) -> str | None:
    """The E.164 form of a phone number, or None when it is not a valid number.

    Args:
        value: the number in any national or international notation; ``00`` and
            ``tel:`` prefixes are understood.
        region: region of national notations (ISO 3166 alpha-2).

    Returns:
        ``+<country code><number>`` or None.
    """
    text = value.strip().removeprefix("tel:")
    if text.startswith("00"):
        text = "+" + text[2:]
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


def normalize_identifier(value: str, region: str = DEFAULT_REGION) -> str:
    """Bring a raw user identifier into the one form its pseudonym is computed from.

    Args:
        value: the raw identifier.
        region: region of national phone notations.

    Returns:
        The normalized identifier (see the module docstring for the rules).
    """
    text = value.strip()
    if "@" in text and _EMAIL.fullmatch(text):
        return normalize_email(text)
    if _looks_like_phone(text):
        phone = normalize_phone(text, region)
        if phone is not None:
            return phone
    return text


def _looks_like_phone(text: str) -> bool:
    """Written as a phone number: a prefix or grouping, not a bare run of digits."""
    if text.isdigit() or not _PHONE_LIKE.fullmatch(text):
        return False
    return sum(c.isdigit() for c in text) >= 7


def luhn_valid(digits: str) -> bool:
    """Tell whether a digit string passes the Luhn checksum of payment cards.

    Args:
        digits: the digits only.

    Returns:
        True when the checksum holds.
    """
    total = 0
    for position, char in enumerate(reversed(digits)):
        digit = int(char)
        if position % 2 == 1:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def find_pii(text: str, region: str = DEFAULT_REGION) -> list[PiiSpan]:
    """Find card numbers, email addresses, phone numbers and street addresses.

    Overlapping finds are resolved in the order card, email, phone, address: a span is
    dropped when it overlaps one found earlier in that order.

    Args:
        text: free text (a search query, a review, an address line).
        region: region of national phone notations.

    Returns:
        The spans, sorted by start.
    """
    found: list[PiiSpan] = []
    for match in _CARD.finditer(text):
        digits = re.sub(r"\D", "", match.group())
        if luhn_valid(digits):
            found.append(PiiSpan("card", match.start(), match.end()))
    _add_spans(found, "email", ((m.start(), m.end()) for m in _EMAIL.finditer(text)))
    # Dialled-looking digit runs first: one span over numbers written side by side, so
    # a number phonenumbers validates cannot leave its neighbour unmasked.
    _add_spans(found, "phone", _dialled_runs(text))
    phones = phonenumbers.PhoneNumberMatcher(
        text, region, leniency=phonenumbers.Leniency.VALID
    )
    # phonenumbers reads the seconds of a clock time ("21:13.109902") as a number.
    _add_spans(
        found,
        "phone",
        ((m.start, m.end) for m in phones if not text[: m.start].endswith(":")),
    )
    for pattern in (_ADDRESS, _GERMAN_ADDRESS, _PO_BOX):
        _add_spans(
            found, "address", ((m.start(), m.end()) for m in pattern.finditer(text))
        )
    return sorted(found, key=lambda span: span.start)


def _dialled_runs(text: str) -> Iterable[tuple[int, int]]:
    """Spans of digit runs written like a dialled phone number (see the docstring)."""
    for match in _DIALLED_RUN.finditer(text):
        run = match.group()
        # A bare digit run is an id (an ASIN, an order number), not a dialled number.
        is_grouped = not run.isdigit()
        is_dialled = run[0] in "+(" or (
            run.startswith("0") and is_grouped and not _DATE.fullmatch(run)
        )
        if is_dialled and sum(c.isdigit() for c in run) >= _MIN_PHONE_DIGITS:
            yield match.start(), match.end()


def _add_spans(
    found: list[PiiSpan], kind: str, spans: Iterable[tuple[int, int]]
) -> None:
    for start, end in spans:
        if not any(start < other.end and other.start < end for other in found):
            found.append(PiiSpan(kind, start, end))


def mask_text(text: str, region: str = DEFAULT_REGION) -> str:
    """Replace every piece of personal data :func:`find_pii` detects by its token.

    Args:
        text: free text.
        region: region of national phone notations.

    Returns:
        The text with ``[CARD]``, ``[EMAIL]``, ``[PHONE]`` and ``[ADDRESS]`` in place
        of what was found; unchanged when nothing was.
    """
    spans = find_pii(text, region)
    if not spans:
        return text
    parts, cursor = [], 0
    for span in spans:
        parts.append(text[cursor : span.start])
        parts.append(MASKS[span.kind])
        cursor = span.end
    parts.append(text[cursor:])
    return "".join(parts)


def mask_values(
    values: Iterable[str | None], region: str = DEFAULT_REGION
) -> list[str | None]:
    """Mask a column of free text; missing values stay missing.

    Args:
        values: the texts (None for a missing value).
        region: region of national phone notations.

    Returns:
        The masked texts, in order; each distinct text is masked once.
    """
    cache: dict[str, str] = {}
    masked: list[str | None] = []
    for value in values:
        if value is None:
            masked.append(None)
            continue
        if value not in cache:
            cache[value] = mask_text(value, region)
        masked.append(cache[value])
    return masked
