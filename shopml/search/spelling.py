"""Spelling correction of query tokens against the catalog vocabulary.

A symmetric-delete index (as in SymSpell): every vocabulary token is stored under the
strings obtained by deleting up to ``max_distance`` characters, so a query token's
candidates are found by looking up its own deletions, then checked with a real
Damerau-Levenshtein distance. Tokens already in the vocabulary, numbers and short tokens
are never changed. Among equally close candidates the most frequent token wins, as
OpenSearch's ``fuzziness`` prefers common terms.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

#: Tokens shorter than this are never corrected (too many near neighbours).
MIN_CORRECTED_LEN = 4
#: Tokens at least this long may be two edits away; shorter ones only one.
TWO_EDITS_FROM_LEN = 8


def _deletes(word: str, distance: int) -> set[str]:
    """Every string made by deleting up to ``distance`` characters of ``word``."""
    found = {word}
    frontier = {word}
    for _ in range(distance):
        frontier = {w[:i] + w[i + 1 :] for w in frontier for i in range(len(w))}
        found |= frontier
    return found


def edit_distance(a: str, b: str) -> int:
    """Damerau-Levenshtein distance (optimal string alignment) between two strings."""
    rows = len(a) + 1
    cols = len(b) + 1
    dist = [[0] * cols for _ in range(rows)]
    for i in range(rows):
        dist[i][0] = i
    for j in range(cols):
        dist[0][j] = j
    for i in range(1, rows):
        for j in range(1, cols):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            dist[i][j] = min(
                dist[i - 1][j] + 1, dist[i][j - 1] + 1, dist[i - 1][j - 1] + cost
            )
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                dist[i][j] = min(dist[i][j], dist[i - 2][j - 2] + 1)
    return dist[-1][-1]


class SpellingCorrector:
    """Corrects query tokens to the closest, most frequent vocabulary token.

    Args:
        frequencies: vocabulary token -> how many items contain it.
        max_distance: the largest edit distance corrected (1 or 2).

    Raises:
        ValueError: ``max_distance`` is not 1 or 2.
    """

    def __init__(self, frequencies: Mapping[str, int], max_distance: int = 2) -> None:
        if max_distance not in {1, 2}:
            raise ValueError(f"max_distance={max_distance} must be 1 or 2")
        self.max_distance = max_distance
        self.frequencies = dict(frequencies)
        self._deletes: dict[str, list[str]] = defaultdict(list)
        for word in self.frequencies:
            if len(word) >= MIN_CORRECTED_LEN - 1 and word.isalpha():
                for deleted in _deletes(word, max_distance):
                    self._deletes[deleted].append(word)

    @classmethod
    def from_documents(
        cls, documents: Iterable[list[str]], max_distance: int = 2
    ) -> SpellingCorrector:
        """Build the corrector from tokenized documents (document frequencies)."""
        frequencies: dict[str, int] = defaultdict(int)
        for tokens in documents:
            for token in set(tokens):
                frequencies[token] += 1
        return cls(frequencies, max_distance)

    def correct(self, token: str) -> str:
        """The token itself when known or not correctable, else its best correction.

        Args:
            token: one query token.

        Returns:
            A vocabulary token within the allowed distance, or ``token`` unchanged.
        """
        if token in self.frequencies or len(token) < MIN_CORRECTED_LEN:
            return token
        if not token.isalpha():
            return token
        allowed = 2 if len(token) >= TWO_EDITS_FROM_LEN else 1
        allowed = min(allowed, self.max_distance)

        best: tuple[int, int, str] | None = None
        for deleted in _deletes(token, allowed):
            for word in self._deletes.get(deleted, ()):
                distance = edit_distance(token, word)
                if distance > allowed:
                    continue
                key = (distance, -self.frequencies[word], word)
                if best is None or key < best:
                    best = key
        return token if best is None else best[2]

    def correct_all(self, tokens: list[str]) -> list[str]:
        """Correct every token of a query; see :meth:`correct`."""
        return [self.correct(token) for token in tokens]
