"""Stop strings, matched as the answer streams, in time linear in the text.

Each stop string gets a Knuth-Morris-Pratt automaton whose state is the longest suffix of the text
so far that is a prefix of that stop. Feeding a piece advances every automaton by the piece's
characters only (amortised O(1) per character: nothing is ever re-scanned), and the text held
back — what may still turn out to be the start of a stop — is exactly the longest such suffix, so
it is never longer than the longest stop minus one.

The cut is where the first stop begins among those that end in the piece that completed one (as
`str.find` over the held text and the piece would say): the same answers as a search of the
whole text (tests/test_harden.py holds the two equal). It must be linear: a client controls the
stop strings, and with a quadratic matcher one 1 MB stop string kept the engine busy for minutes
(issue 21).
"""

from __future__ import annotations


def _failure(s: str) -> list[int]:
    """KMP: fail[i] = length of the longest proper prefix of s[:i + 1] that is also its suffix."""
    fail = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


class StopText:
    """Cuts the answer before the first stop string; text that may be the start of one is held
    back until the next piece decides."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._fail = [_failure(s) for s in self.stops]
        self._state = [0] * len(self.stops)  # per stop: the longest suffix so far that prefixes it
        self.held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text that is certainly answer, whether a stop string was reached)."""
        if not self.stops:
            return piece, False
        hit = False
        for j, stop in enumerate(self.stops):
            k, fail, n = self._state[j], self._fail[j], len(stop)
            for c in piece:
                while k and c != stop[k]:
                    k = fail[k - 1]
                if c == stop[k]:
                    k += 1
                if k == n:  # a whole stop: the cut is decided below
                    hit = True
                    k = fail[k - 1]
            self._state[j] = k
        text = self.held + piece
        if hit:
            # Every stop that ends in this piece starts inside held + piece (held is the longest
            # partial match before it): a find there is bounded by len(held) + len(piece).
            self.held = ""
            self._state = [0] * len(self.stops)
            return text[:min(i for i in (text.find(s) for s in self.stops) if i >= 0)], True
        keep = max(self._state)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        held, self.held = self.held, ""
        self._state = [0] * len(self.stops)
        return held
