"""Text handling of product search: normalization, tokens, PII masking, truncation.

The same :func:`tokenize` runs over catalog text at index time and over queries at
search time, so both sides agree on what a token is:

* Unicode NFKC normalization and case folding ("Ｍｉｌｋ" and "MILK" are "milk");
* punctuation splits words, but a hyphenated or slashed compound also yields its joined
  form ("usb-c" gives ``usb``, ``c`` and ``usbc``);
* a number followed by a unit, written together or apart, becomes one token with the
  unit spelled one way ("500 ml", "500ml" and "500 mL" are all ``500ml``; "16 ounces"
  is ``16oz``);
* a light plural folding (``bananas`` -> ``banana``, ``berries`` -> ``berry``);
* a handful of function words ("for", "with", "the") are dropped.

:func:`mask_pii` replaces e-mail addresses and phone or card numbers in a
query before it is logged; the query itself is still searched as typed.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

#: Longest query, in characters after normalization, that is searched; longer queries
#: are cut and the response says so.
MAX_QUERY_CHARS = 256

# Unit spellings folded to one canonical form.
UNITS: dict[str, str] = {
    "ml": "ml", "milliliter": "ml", "milliliters": "ml", "millilitre": "ml",
    "l": "l", "liter": "l", "liters": "l", "litre": "l", "litres": "l", "ltr": "l",
    "cl": "cl", "dl": "dl",
    "g": "g", "gr": "g", "gram": "g", "grams": "g", "gm": "g",
    "kg": "kg", "kilo": "kg", "kilos": "kg", "kilogram": "kg", "kilograms": "kg",
    "mg": "mg", "oz": "oz", "ounce": "oz", "ounces": "oz", "floz": "floz",
    "lb": "lb", "lbs": "lb", "pound": "lb", "pounds": "lb",
    "ct": "ct", "count": "ct", "pk": "pk", "pack": "pk", "packs": "pk",
    "in": "in", "inch": "in", "inches": "in", "cm": "cm", "mm": "mm", "m": "m",
    "ft": "ft", "gb": "gb", "tb": "tb", "mb": "mb", "mah": "mah", "w": "w",
    "v": "v", "mp": "mp", "hz": "hz", "qt": "qt", "gal": "gal", "pc": "pc", "pcs": "pc",
}  # fmt: skip

# Function words that match too many titles to rank anything; never indexed.
STOPWORDS = frozenset(
    {"a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "of", "on", "or",
     "the", "to", "with", "without"}
)  # fmt: skip

_WORD = re.compile(r"[^\W_]+(?:[-/.'][^\W_]+)*")
_NUMBER_UNIT = re.compile(r"^(\d+(?:\.\d+)?)([a-z]+)$")
_NUMBER = re.compile(r"^\d+(?:\.\d+)?$")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
# Nine or more digits, spaces/dots/dashes/brackets between: phone and card numbers.
_LONG_DIGITS = re.compile(r"\+?\(?\d(?:[ ().-]{0,2}\d){8,}")


def normalize(text: str) -> str:
    """NFKC-normalize, case-fold and collapse whitespace.

    Args:
        text: any text.

    Returns:
        The normalized text; ``""`` for blank input.
    """
    folded = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(folded.split())


def _singular(word: str) -> str:
    """Fold a regular English plural; words of four letters or fewer are kept."""
    if len(word) <= 4 or not word.isalpha():
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("sses", "shes", "ches", "xes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _split_unit(token: str) -> list[str]:
    """``500ml`` -> ``["500ml"]`` with the unit canonical; other tokens unchanged."""
    match = _NUMBER_UNIT.match(token)
    if match and match.group(2) in UNITS:
        return [match.group(1) + UNITS[match.group(2)]]
    return [token]


def _words(text: str) -> list[str]:
    """Words of normalized text; compounds give their parts and their joined form."""
    words: list[str] = []
    for match in _WORD.finditer(text):
        chunk = match.group(0)
        if _NUMBER.match(chunk) or _NUMBER_UNIT.match(chunk):
            words.append(chunk)  # "2.5kg" and "1.5" stay whole
            continue
        parts = [p for p in re.split(r"[-/.']", chunk) if p]
        if len(parts) > 1 and not all(_NUMBER.match(p) for p in parts):
            words.extend(parts)
            words.append("".join(parts))
        else:
            words.append(chunk.replace("'", ""))
    return words


def tokenize(text: str) -> list[str]:
    """Split text into search tokens (see the module docstring).

    Args:
        text: raw or normalized text.

    Returns:
        Tokens in text order; ``[]`` for text without letters or digits.
    """
    words = _words(normalize(text))
    tokens: list[str] = []
    skip_next = False
    for position, word in enumerate(words):
        if skip_next:
            skip_next = False
            continue
        following = words[position + 1] if position + 1 < len(words) else ""
        # "500 ml" -> "500ml": a number directly followed by a unit word.
        if _NUMBER.match(word) and following in UNITS:
            tokens.append(word + UNITS[following])
            skip_next = True
            continue
        if word not in STOPWORDS:
            tokens.extend(_singular(t) for t in _split_unit(word))
    return tokens


def mask_pii(text: str) -> str:
    """Replace e-mail addresses and phone or card numbers before logging.

    Args:
        text: a query as typed.

    Returns:
        The text with ``<email>`` and ``<number>`` (nine digits or more) in place of
        matches.
    """
    return _LONG_DIGITS.sub("<number>", _EMAIL.sub("<email>", text))


@dataclass(frozen=True)
class PreparedQuery:
    """A query ready to search.

    Attributes:
        text: the normalized query, cut to ``MAX_QUERY_CHARS``.
        tokens: its search tokens.
        truncated: whether the query was cut.
        original_chars: length of the normalized query before cutting.
    """

    text: str
    tokens: list[str]
    truncated: bool
    original_chars: int


def prepare_query(query: str, max_chars: int = MAX_QUERY_CHARS) -> PreparedQuery:
    """Normalize, truncate (at a word boundary when possible) and tokenize a query.

    Args:
        query: the query as typed.
        max_chars: the longest normalized query searched.

    Returns:
        The prepared query.

    Raises:
        ValueError: ``max_chars`` is below 1.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars={max_chars} must be at least 1")
    text = normalize(query)
    original_chars = len(text)
    truncated = original_chars > max_chars
    if truncated:
        cut = text[:max_chars]
        boundary = cut.rfind(" ")
        text = cut[:boundary] if boundary > max_chars // 2 else cut
    return PreparedQuery(text, tokenize(text), truncated, original_chars)


def item_text(
    title: str, category: str | None = None, extra: list[str] | None = None
) -> str:
    """The text a catalog item is searched and encoded by.

    Args:
        title: the product title.
        category: its category (``"dairy eggs > yogurt"`` and the like), if any.
        extra: further attributes (brand, free text).

    Returns:
        ``title``, then the category and extra attributes, joined by `` | ``.
    """
    parts = [title, *(p for p in [category, *(extra or [])] if p)]
    return " | ".join(part.strip() for part in parts if part and part.strip())
