"""Web-text quality filters: Gopher's quality and repetition rules, C4's line rules and
FineWeb's quality rules.

Words are whitespace-separated (``str.split``). Every rule is a linear pass done by C code
(``str`` methods, compiled regexes, numpy), so a chain reads several MB/s on one core.
"""

from __future__ import annotations

import re
from dataclasses import field
from itertools import filterfalse
from typing import ClassVar

import numpy as np

from lmpipe.config import stage_config
from spark_jobs.curate.base import Doc, Filter, register

_last: list = [None, None]  # (text, its words): consecutive filters share one split


def words_of(text: str) -> list[str]:
    """The whitespace-separated words of ``text`` (do not modify the list: it is shared)."""
    if _last[0] is not text:
        _last[0], _last[1] = text, text.split()
    return _last[1]


def duplicates(parts: list[str]) -> tuple[int, int]:
    """(how many of ``parts`` repeat an earlier one, their characters)."""
    seen: set[str] = set()
    n = chars = 0
    for p in parts:
        if p in seen:
            n += 1
            chars += len(p)
        else:
            seen.add(p)
    return n, chars


# ---------------------------------------------------------------------------------------------
# Gopher quality

STOP_WORDS = ["the", "be", "to", "of", "and", "that", "have", "with"]
HAS_ALPHA = re.compile(r"[^\W\d_]")
HAS_ALNUM = re.compile(r"[^\W_]")


@stage_config
class GopherQualityConfig:
    min_words: int = 50  # fewest words; words of punctuation only are not counted
    max_words: int = 100_000  # most words
    min_mean_word_length: float = 3.0  # mean characters per word: lower bound
    max_mean_word_length: float = 10.0  # and upper bound
    max_symbol_ratio: float = 0.1  # most '#', and most ellipses ('...', '…'), per word
    max_bullet_lines: float = 0.9  # largest fraction of lines that start with a bullet (•, -)
    max_ellipsis_lines: float = 0.3  # largest fraction of lines that end with an ellipsis
    min_alpha_words: float = 0.8  # smallest fraction of words with an alphabetic character
    min_stop_words: int = 2  # fewest stop-word occurrences (whole words, any case)
    stop_words: list[str] = field(default_factory=lambda: list(STOP_WORDS))  # the stop words


@register
class GopherQuality(Filter):
    """Gopher's document quality rules (Rae et al. 2021, MassiveText, appendix A), with
    the thresholds of datatrove's ``GopherQualityFilter``. Stop words match whole words in
    any case. Reasons: ``too_few_words``, ``too_many_words``, ``mean_word_length``,
    ``symbol_ratio``, ``bullet_lines``, ``ellipsis_lines``, ``alpha_words``, ``stop_words``."""

    name: ClassVar[str] = "gopher_quality"
    Config: ClassVar[type] = GopherQualityConfig

    def __init__(self, cfg=None):
        super().__init__(cfg)
        alts = "|".join(sorted(map(re.escape, self.cfg.stop_words), key=len, reverse=True))
        self._stop = re.compile(rf"(?<!\w)(?:{alts})(?!\w)", re.IGNORECASE) if alts else None

    def apply(self, doc: Doc) -> str | None:
        c, text = self.cfg, doc.text
        words = words_of(text)
        odd = list(filterfalse(str.isalpha, words))  # only these can lack a letter
        no_alpha = [w for w in odd if HAS_ALPHA.search(w) is None]
        symbols = [w for w in no_alpha if HAS_ALNUM.search(w) is None]
        n_all = len(words)
        n = n_all - len(symbols)
        if n == 0 or n < c.min_words:
            return "too_few_words"
        if n > c.max_words:
            return "too_many_words"
        mean = (sum(map(len, words)) - sum(map(len, symbols))) / n
        if not c.min_mean_word_length <= mean <= c.max_mean_word_length:
            return "mean_word_length"
        ellipses = text.count("...") + text.count("…")
        if max(text.count("#"), ellipses) / n_all > c.max_symbol_ratio:
            return "symbol_ratio"
        lines = text.splitlines()
        if sum(1 for ln in lines if ln.lstrip().startswith(("•", "-"))) / len(lines) > c.max_bullet_lines:
            return "bullet_lines"
        if sum(1 for ln in lines if ln.rstrip().endswith(("...", "…"))) / len(lines) > c.max_ellipsis_lines:
            return "ellipsis_lines"
        if (n_all - len(no_alpha)) / n_all < c.min_alpha_words:
            return "alpha_words"
        if c.min_stop_words > 0:
            found = 0
            for _ in self._stop.finditer(text) if self._stop else ():
                found += 1
                if found >= c.min_stop_words:
                    break
            if found < c.min_stop_words:
                return "stop_words"
        return None


# ---------------------------------------------------------------------------------------------
# Gopher repetition

PARAGRAPHS = re.compile(r"\n{2,}")
MULT = np.uint64(0x9E3779B97F4A7C15)  # odd: n-gram hashes are polynomials mod 2**64


def _grams(h: np.ndarray, n: int, at: np.ndarray | None = None) -> np.ndarray:
    """64-bit hashes of the word n-grams starting at ``at`` (default: everywhere)."""
    if at is None:
        m = max(len(h) - n + 1, 0)
        g = h[:m].copy()
        for k in range(1, n):
            g = g * MULT + h[k:k + m]
        return g
    g = h[at]
    for k in range(1, n):
        g = g * MULT + h[at + k]
    return g


def _covered_chars(lens: np.ndarray, starts: np.ndarray, n: int) -> int:
    """Characters of the words covered by the n-grams at ``starts``, each word once."""
    m = len(lens)
    delta = np.bincount(starts, minlength=m + n) - np.bincount(starts + n, minlength=m + n)
    return int(lens[np.cumsum(delta[:m]) > 0].sum())


@stage_config
class GopherRepetitionConfig:
    max_dup_lines: float = 0.3  # largest fraction of lines that repeat an earlier line
    max_dup_paragraphs: float = 0.3  # largest fraction of paragraphs that repeat an earlier one
    max_dup_line_chars: float = 0.2  # largest share of characters in repeated lines
    max_dup_paragraph_chars: float = 0.2  # largest share of characters in repeated paragraphs
    # n -> largest share of characters in the occurrences of the most frequent word n-gram
    top_ngrams: dict[int, float] = field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    # n -> largest share of characters in word n-grams that repeat an earlier one
    dup_ngrams: dict[int, float] = field(default_factory=lambda: {
        5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})


@register
class GopherRepetition(Filter):
    """Gopher's repetition rules (Rae et al. 2021, table A1), with the thresholds of
    datatrove's ``GopherRepetitionFilter``. Paragraphs are split on blank lines, lines on
    newlines. Duplicate n-gram characters are those of the words covered by an n-gram that
    occurred earlier, each word counted once. N-grams are compared by 64-bit hashes, one sort
    per document: linear-time in practice. Reasons: ``dup_paragraphs``,
    ``dup_paragraph_chars``, ``dup_lines``, ``dup_line_chars``, ``top_<n>gram``,
    ``dup_<n>gram``."""

    name: ClassVar[str] = "gopher_repetition"
    Config: ClassVar[type] = GopherRepetitionConfig

    def apply(self, doc: Doc) -> str | None:
        text = doc.text
        stripped = text.strip()
        if not stripped:
            return None
        reason = self._parts(stripped, len(text))
        words = words_of(text)
        if reason or len(words) < 2:
            return reason
        h = np.fromiter(map(hash, words), np.int64, len(words)).view(np.uint64)
        lens = np.fromiter(map(len, words), np.int64, len(words))
        return self._top(h, lens, len(text)) or self._dup(h, lens, len(text))

    def _parts(self, stripped: str, size: int) -> str | None:
        c = self.cfg
        paragraphs = PARAGRAPHS.split(stripped) if "\n\n" in stripped else [stripped]
        lines = [ln for ln in stripped.split("\n") if ln]
        for parts, frac, char_frac, what in (
                (paragraphs, c.max_dup_paragraphs, c.max_dup_paragraph_chars, "paragraph"),
                (lines, c.max_dup_lines, c.max_dup_line_chars, "line")):
            if len(parts) < 2:
                continue
            n, chars = duplicates(parts)
            if n / len(parts) > frac:
                return f"dup_{what}s"
            if chars / size > char_frac:
                return f"dup_{what}_chars"
        return None

    def _top(self, h: np.ndarray, lens: np.ndarray, size: int) -> str | None:
        limits = sorted(self.cfg.top_ngrams.items())
        if not limits:
            return None
        _, first, counts = np.unique(h, return_index=True, return_counts=True)
        mass, most = int((counts * lens[first]).max()), int(counts.max())
        for n, frac in limits:
            # The n-gram seen most, k <= most times, holds at most `mass` characters at each
            # of its n offsets, and k spaces between each two.
            if n * mass + (n - 1) * most <= frac * size:
                continue
            g = _grams(h, n)
            if not g.size:
                continue
            vals, counts = np.unique(g, return_counts=True)
            k = int(counts.argmax())
            at = int(np.flatnonzero(g == vals[k])[0])
            if int(counts[k]) * (int(lens[at:at + n].sum()) + n - 1) / size > frac:
                return f"top_{n}gram"
        return None

    def _dup(self, h: np.ndarray, lens: np.ndarray, size: int) -> str | None:
        limits = sorted(self.cfg.dup_ngrams.items())
        if not limits:
            return None
        base = _grams(h, limits[0][0])
        ranked = np.sort(base)
        if base.size < 2 or not (ranked[1:] == ranked[:-1]).any():
            return None  # no n-gram repeats (the common case): one plain sort
        order = np.argsort(base, kind="stable")
        ranked = base[order]
        same = ranked[1:] == ranked[:-1]
        repeated = np.zeros(len(base), bool)
        repeated[1:] |= same
        repeated[:-1] |= same
        # An n-gram (n >= the smallest) that repeats starts where the smallest one repeats.
        cand = np.sort(order[repeated])
        for n, frac in limits:
            cand = cand[cand <= len(h) - n]
            vals = _grams(h, n, cand)
            o = np.argsort(vals, kind="stable")  # equal hashes keep their position order
            later = cand[o[1:][vals[o][1:] == vals[o][:-1]]]
            if not later.size:
                return None
            if _covered_chars(lens, later, n) / size > frac:
                return f"dup_{n}gram"
        return None


# ---------------------------------------------------------------------------------------------
# C4

CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
END_PUNCTUATION = (".", "?", "!", '"', "'")
POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
SENTENCE_END = re.compile(r"[.!?]+['\")\]]*(?=\s|$)")


@stage_config
class C4Config:
    min_sentences: int = 5  # documents with fewer sentences in their kept lines are removed (0: off)
    min_words_per_line: int = 3  # lines with fewer words are removed
    max_word_length: int = 1000  # lines with a longer word are removed (0: off)
    terminal_punctuation: bool = True  # remove lines not ending in . ? ! " ' (or ending in ...)
    remove_citations: bool = True  # strip Wikipedia-style citations: [1], [edit], [citation needed]
    lorem_ipsum: bool = True  # remove documents with a kept line containing "lorem ipsum"
    javascript: bool = True  # remove lines mentioning "javascript"
    curly_bracket: bool = True  # remove documents with a kept line containing "{"
    policy: bool = True  # remove lines about terms of use, privacy or cookie policies


@register
class C4(Filter):
    """C4's line and page rules (Raffel et al. 2020, section 2.2), as datatrove's
    ``C4QualityFilter`` applies them (its defaults: 5 sentences, curly brackets removed).
    Lines are kept or dropped in order; the document's text becomes its kept lines.
    Sentences are counted by their final punctuation. Reasons: ``lorem_ipsum``,
    ``curly_bracket``, ``no_lines_left``, ``too_few_sentences``."""

    name: ClassVar[str] = "c4"
    Config: ClassVar[type] = C4Config

    def apply(self, doc: Doc) -> str | None:
        c, text = self.cfg, doc.text
        lower = text.lower()
        flagged = (c.lorem_ipsum and "lorem ipsum" in lower) or (c.javascript and "javascript" in lower) \
            or (c.curly_bracket and "{" in text) or (c.policy and any(p in lower for p in POLICY))
        kept, sentences = [], 0
        for line in text.splitlines():
            line = line.strip()
            words = line.split()
            if c.max_word_length > 0 and len(line) > c.max_word_length \
                    and any(len(w) > c.max_word_length for w in words):
                continue
            if c.remove_citations and "[" in line:
                line = CITATION.sub("", line)
            if c.terminal_punctuation and (not line.endswith(END_PUNCTUATION) or line.endswith("...")):
                continue
            if len(words) < c.min_words_per_line:
                continue
            verdict = self._verdict(line) if flagged else None
            if verdict == "drop":
                continue
            if verdict:
                return verdict
            if sentences < c.min_sentences:
                sentences += max(1, len(SENTENCE_END.findall(line)))
            kept.append(line)
        if not kept:
            return "no_lines_left"
        if sentences < c.min_sentences:
            return "too_few_sentences"
        text = "\n".join(kept)
        if text != doc.text:
            doc.text, doc.changed = text, True
        return None

    def _verdict(self, line: str) -> str | None:
        """A kept line's verdict: a reason to remove the document, ``drop`` the line, or None."""
        c, lower = self.cfg, line.lower()
        if c.lorem_ipsum and "lorem ipsum" in lower:
            return "lorem_ipsum"
        if c.javascript and "javascript" in lower:
            return "drop"
        if c.curly_bracket and "{" in line:
            return "curly_bracket"
        if c.policy and any(p in lower for p in POLICY):
            return "drop"
        return None


# ---------------------------------------------------------------------------------------------
# FineWeb

STOP_CHARS = (".", "'", '"', "!", "?")


@stage_config
class FineWebConfig:
    # Removed when the fraction of lines ending in . ' " ! ? is at most this.
    min_line_punct_ratio: float = 0.12
    short_line_length: int = 30  # a line of at most this many characters is short
    max_short_line_ratio: float = 0.67  # removed when at least this fraction of lines is short
    # Removed when at least this share of the characters (newlines aside) is in repeated lines.
    max_char_dup_ratio: float = 0.01
    max_newline_ratio: float = 0.3  # removed when there are more newlines per word than this


@register
class FineWeb(Filter):
    """FineWeb's quality rules (Penedo et al. 2024), as datatrove's ``FineWebQualityFilter``
    with its defaults. Reasons: ``line_punct_ratio``, ``short_line_ratio``,
    ``char_dup_ratio``, ``list_ratio``."""

    name: ClassVar[str] = "fineweb"
    Config: ClassVar[type] = FineWebConfig

    def apply(self, doc: Doc) -> str | None:
        c, text = self.cfg, doc.text
        lines = text.split("\n")
        if sum(1 for ln in lines if ln.endswith(STOP_CHARS)) / len(lines) <= c.min_line_punct_ratio:
            return "line_punct_ratio"
        if sum(1 for ln in lines if len(ln) <= c.short_line_length) / len(lines) >= c.max_short_line_ratio:
            return "short_line_ratio"
        chars = len(text) - (len(lines) - 1)
        if duplicates([ln for ln in lines if ln.strip()])[1] / max(chars, 1) >= c.max_char_dup_ratio:
            return "char_dup_ratio"
        if (len(lines) - 1) / max(len(words_of(text)), 1) > c.max_newline_ratio:
            return "list_ratio"
        return None
