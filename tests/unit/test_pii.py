"""Normalization, masking, the clean stage's use of them, and the canary scanner."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shopml.pii import (
    find_pii,
    luhn_valid,
    mask_text,
    normalize_identifier,
)
from shopml.security import Pseudonymizer, scan_for_values
from tests.unit.test_clean import CATALOG_HEADER, GOOD_ITEM, run_clean

EMAIL_NOTATIONS = [
    "jane.doe+promo@example.com",
    "  Jane.Doe+Promo@Example.COM ",
    "JANE.DOE+PROMO@EXAMPLE.COM",
]
PHONE_NOTATIONS = [
    "+1 415-555-2671",
    "(415) 555-2671",
    "415.555.2671",
    "+1 (415) 555 2671",
    "tel:+1-415-555-2671",
    "001 415 555 2671",
]


@pytest.mark.parametrize("notation", EMAIL_NOTATIONS)
def test_email_notations_normalize_to_one_form(notation: str) -> None:
    assert normalize_identifier(notation) == "jane.doe+promo@example.com"


@pytest.mark.parametrize("notation", PHONE_NOTATIONS)
def test_phone_notations_normalize_to_e164(notation: str) -> None:
    assert normalize_identifier(notation) == "+14155552671"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("196", "196"), ("4155552671", "4155552671"), (" AbC-7 ", "AbC-7")],
    ids=["movielens-id", "bare-digits", "opaque"],
)
def test_opaque_ids_are_only_trimmed(raw: str, expected: str) -> None:
    assert normalize_identifier(raw) == expected


def test_same_person_in_every_notation_gets_one_pseudonym() -> None:
    pseudo = Pseudonymizer(b"key-one")
    assert len({pseudo.pseudonymize(n) for n in EMAIL_NOTATIONS}) == 1
    assert len({pseudo.pseudonymize(n) for n in PHONE_NOTATIONS}) == 1
    other = Pseudonymizer(b"key-two")
    assert pseudo.pseudonymize(EMAIL_NOTATIONS[0]) != other.pseudonymize(
        EMAIL_NOTATIONS[0]
    )


def test_subject_ref_differs_from_the_pseudonym() -> None:
    pseudo = Pseudonymizer(b"key-one")
    ref = pseudo.subject_ref("Jane.Doe+Promo@Example.com")
    assert ref == pseudo.subject_ref("jane.doe+promo@example.com")
    assert ref.startswith("s_") and len(ref) == 18
    assert ref[2:] not in pseudo.pseudonymize("jane.doe+promo@example.com")


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("mail Jane.Doe+x@Mail.Example.co.uk now", "mail [EMAIL] now"),
        ("call (415) 555-2671 today", "call [PHONE] today"),
        ("or +44 20 7946 0958", "or [PHONE]"),
        ("card 4111 1111 1111 1111.", "card [CARD]."),
        ("card 4111-1111-1111-1111", "card [CARD]"),
        ("ship to 221B Baker Street, Apt 4 London", "ship to [ADDRESS] London"),
        ("1600 Pennsylvania Ave NW", "[ADDRESS]"),
        ("Hauptstraße 12 Berlin", "[ADDRESS] Berlin"),
        ("PO Box 4432", "[ADDRESS]"),
        ("ring 030 72946153 after six", "ring [PHONE] after six"),
        ("tel +44 20 7946 0321 030 72946153", "tel [PHONE]"),
        ("call 0049 30 72946153", "call [PHONE]"),
    ],
    ids=[
        "email",
        "phone-us",
        "phone-uk",
        "card",
        "card-dashes",
        "street",
        "avenue",
        "strasse",
        "po-box",
        "phone-de-national",
        "phones-side-by-side",
        "phone-00-prefix",
    ],
)
def test_personal_data_is_masked(text: str, masked: str) -> None:
    assert mask_text(text) == masked


@pytest.mark.parametrize(
    "text",
    [
        "iphone 15 pro 256gb",
        "samsung 55 inch tv 2024",
        "order 4111 1111 1111 1112",  # fails Luhn: an order number, not a card
        "toy story 2 1995",
        "sizes 10 12 14 16",  # grouped digits not dialled like a phone number
        "released 2024-05-01",
        "book 0439064872",  # an ASIN: a bare digit run is an id
        "sha 536436fbfffdc03d4f49d1ae70562bf96ae892f7d0fb04436634584b7f821f60",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert mask_text(text) == text
    assert find_pii(text) == []


def test_luhn_check() -> None:
    assert luhn_valid("4111111111111111")
    assert luhn_valid("5500005555555559")
    assert not luhn_valid("4111111111111112")


def test_clean_normalizes_ids_and_masks_queries(tmp_path: Path) -> None:
    events = (
        "user_id,item_id,event_type,timestamp,value,query\n"
        "Jane@Example.com,i1,search,2024-01-01T00:00:00Z,,mail jane@example.com\n"
        " jane@example.COM ,i1,view,2024-01-02T00:00:00Z,,\n"
        "(415) 555-2671,i1,search,2024-01-03T00:00:00Z,,card 4111 1111 1111 1111\n"
        "+1 415 555 2671,i1,view,2024-01-04T00:00:00Z,,running shoes\n"
    )
    result, curated, _ = run_clean(tmp_path, events, CATALOG_HEADER + GOOD_ITEM)

    table = pq.read_table(curated / "events.parquet")
    assert table.num_rows == 4
    assert len(set(table.column("user_id").to_pylist())) == 2
    queries = sorted(q for q in table.column("query").to_pylist() if q)
    assert queries == ["card [CARD]", "mail [EMAIL]", "running shoes"]
    assert result.tables["events"].repairs["masked_query"] == 2


def _zip_bytes(name: str, content: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, content)
    return buffer.getvalue()


def test_scanner_finds_planted_values_in_every_kind_of_file(tmp_path: Path) -> None:
    out, raw = tmp_path / "out", tmp_path / "raw"
    out.mkdir()
    raw.mkdir()
    table = pa.table({"note": ["x", "contact JANE.DOE+promo@example.com"]})
    pq.write_table(table, out / "t.parquet", compression="zstd")
    (out / "model.pt").write_bytes(_zip_bytes("data.pkl", b"... 4111111111111111 ..."))
    (out / "run.log").write_text("user +14155552671 logged in\n")
    (out / "clean.log").write_text("user u_0123 logged in\n")
    (raw / "events.csv").write_text("Jane.Doe+promo@Example.com\n")

    values = ["Jane.Doe+promo@Example.com", "4111 1111 1111 1111", "(415) 555-2671"]
    hits = scan_for_values([tmp_path], [], values, exclude=[raw])

    found = {(h.value_index, Path(h.location.split("!")[0]).name) for h in hits}
    assert found == {(0, "t.parquet"), (1, "model.pt"), (2, "run.log")}
    assert all("raw" not in Path(h.location).parts for h in hits)


@pytest.mark.parametrize(
    "text",
    [
        "2026-12-04T22:42:05.211159+00:00",  # seconds from 0 with a grouped fraction
        "2026-12-05T03:21:13.109902+00:00",  # phonenumbers alone read 13.109902
        "2026-12-05T08:10:13.102610+00:00",
        "delivered on 04.12.2026 at 10:30",
    ],
)
def test_timestamps_and_dates_are_not_phone_numbers(text: str) -> None:
    assert find_pii(text) == []
