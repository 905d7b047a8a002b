"""Keyed pseudonyms: stable per key, different across keys, key never stored in data."""

from __future__ import annotations

import stat

import pytest

from shopml.config import load_settings
from shopml.security import Pseudonymizer, load_pseudonymizer, pseudonym_texts


def test_same_id_same_key_same_pseudonym() -> None:
    a = Pseudonymizer(b"key-one")
    assert a.pseudonymize("196") == a.pseudonymize("196")
    assert a.pseudonymize("196") != a.pseudonymize("197")
    assert a.is_pseudonym(a.pseudonymize("196"))
    assert not a.is_pseudonym("196")


def test_different_keys_give_different_pseudonyms() -> None:
    a, b = Pseudonymizer(b"key-one"), Pseudonymizer(b"key-two")
    assert a.pseudonymize("196") != b.pseudonymize("196")
    assert a.key_id != b.key_id


def test_empty_id_is_rejected() -> None:
    with pytest.raises(ValueError, match="user_id is empty"):
        Pseudonymizer(b"k").pseudonymize("")


def test_bulk_pseudonyms_equal_one_by_one_in_every_notation() -> None:
    pseudo = Pseudonymizer(b"key-one")
    ids = [
        "u17",  # opaque ids skip normalization
        "196",
        "abc-DEF_9",
        "Jane.Doe@Example.COM",  # emails are case-folded
        "+1 (415) 555-2671",  # phones become E.164
        "(415) 555-2671",
        "tel:+14155552671",
        "x y",
        "\u0663\u0664\u0665\u0666\u0667\u0668\u0669",  # non-ASCII digits
    ]
    bulk = pseudonym_texts(pseudo.pseudonymize_many(ids))
    assert bulk == [pseudo.pseudonymize(i) for i in ids]
    assert bulk[4] == bulk[5] == bulk[6]  # one person, one pseudonym
    with pytest.raises(ValueError, match="user_id is empty"):
        pseudo.pseudonymize_many(["u1", "   "])


def test_local_key_is_created_once_and_private() -> None:
    settings = load_settings()
    first = load_pseudonymizer(settings)
    second = load_pseudonymizer(settings)
    assert first.key == second.key
    key_file = settings.home / "secrets" / "pseudonymization.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_environment_key_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOPML_PSEUDONYMIZATION_KEY", "from-a-secret")
    pseudonymizer = load_pseudonymizer(load_settings())
    assert pseudonymizer.key == b"from-a-secret"
    assert not (load_settings().home / "secrets").exists()
