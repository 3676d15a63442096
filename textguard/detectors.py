"""The detectors: blocked terms and personal data, for English and Chinese text alike.

A `Matcher` is one regular expression (the `regex` module, for partial matching in
streams), an optional validator that a match must pass (Luhn, the ID check digit), the tag
that replaces a match, and the longest match it can make (`max_chars`).

Word boundaries are defined for mixed scripts: a blocked term that starts (ends) with a
letter or digit of a space-delimited script must not be preceded (followed) by another
such letter or digit; a term that starts (ends) with a character of a script written
without spaces between words (Han, kana, Hangul, Thai, ...) matches as a substring. So
`pass` does not match inside `password` or `bypass`, `密码` matches inside `我的密码是123`,
and `pass` matches in `我的pass是` (Chinese next to Latin is a boundary). The PII patterns
use ASCII classes and digit look-arounds instead of `\\b`, which treats a Chinese
character as a word character: `联系邮箱abc@x.com谢谢` yields exactly `abc@x.com`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import regex

try:  # the stdlib parser computes a pattern's width (min, max)
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]

UNBOUNDED = 1 << 30

# Scripts written without spaces between words: a term's end in one of these matches as a
# substring. CJK symbols and punctuation, kana, bopomofo, Han (+ extensions, compatibility),
# Yi, Hangul syllables, half-width kana, Thai, Lao, Khmer, Myanmar.
NO_SPACE_SCRIPTS = (
    "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u2e80-\u2fdf\u3000-\u303f\u3040-\u30ff"
    "\u3100-\u31ff\u3200-\u4dbf\u4e00-\u9fff\ua000-\ua4cf\uac00-\ud7af\uf900-\ufaff"
    "\uff66-\uff9f\U00020000-\U0003134f"
)
_SPACED_WORD = rf"[^\W{NO_SPACE_SCRIPTS}]"  # a letter/digit/_ of a space-delimited script
_NO_SPACE = regex.compile(rf"[{NO_SPACE_SCRIPTS}]")


def pattern_width(pattern: str, flags: int = 0) -> int:
    """The longest match `pattern` can make, UNBOUNDED when it has no bound (or when only
    the `regex` module understands it)."""
    try:
        hi = _sre_parse.parse(pattern, flags & 0xFF).getwidth()[1]
    except Exception:
        return UNBOUNDED
    return UNBOUNDED if hi >= 1 << 16 else int(hi)


class Matcher:
    """One expression with its validator and tag. `search` finds; `extends` answers
    whether a match found at a position could still grow with more text."""

    def __init__(self, pattern: str, *, tag: str, ignore_case: bool = False,
                 validate: Callable[[str], bool] | None = None, max_chars: int = 0,
                 label: str = "") -> None:
        flags = regex.IGNORECASE if ignore_case else 0
        self.pattern = pattern
        self.search = regex.compile(pattern, flags)
        self.extends = regex.compile(rf"(?:{pattern})\Z", flags)
        self.tag = tag
        self.validate = validate
        self.label = label  # the detector's name (email, phone, ...) or the rule's
        width = pattern_width(pattern, flags)
        self.width = width
        self.max_chars = min(max_chars or width, width)  # the hold-back cap in streams

    def finditer(self, text: str) -> Iterable[tuple[int, int]]:
        """Validated, non-overlapping matches in a finished text, leftmost first."""
        pos = 0
        while pos <= len(text):
            m = self.search.search(text, pos)
            if m is None:
                return
            if self.validate is None or self.validate(m.group(0)):
                yield m.start(), m.end()
                pos = m.end() if m.end() > m.start() else m.end() + 1
            else:
                pos = m.start() + 1


# ---- personal data -------------------------------------------------------------------

def luhn_ok(digits: str) -> bool:
    """The Luhn check of a card number's digits."""
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = int(ch)
        if i % 2 == parity:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"


def cn_id_ok(number: str) -> bool:
    """The check digit (ISO 7064 MOD 11-2) of an 18-character mainland resident ID."""
    if len(number) != 18 or not number[:17].isdigit():
        return False
    total = sum(int(d) * w for d, w in zip(number[:17], _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11] == number[17].upper()


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def _card_ok(text: str) -> bool:
    d = _digits(text)
    return 13 <= len(d) <= 19 and luhn_ok(d)


def _phone_ok(text: str) -> bool:
    return len(_digits(text)) >= 7


EMAIL = (r"(?<![A-Za-z0-9_.%+-])[A-Za-z0-9_.%+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.){1,8}"
         r"[A-Za-z]{2,24}(?![A-Za-z0-9-])")
CARD = r"(?<!\d)\d(?:[ -]?\d){12,18}(?!\d)"
PHONE = "|".join((
    # international: +CC then groups
    r"(?<![A-Za-z0-9_+])\+\d{1,3}[ .-]?\(?\d{1,4}\)?(?:[ .-]?\d{2,4}){2,4}(?!\d)",
    # North American: (555) 123-4567, 555-123-4567, 555.123.4567
    r"(?<![A-Za-z0-9_-])(?:\(\d{3}\)|\d{3})[ .-]\d{3}[ .-]\d{4}(?!\d)",
    # mainland mobile: 13812345678, 138-1234-5678, 138 1234 5678, +86 / 86 prefix
    r"(?<![\d+])(?:\+?86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}(?!\d)",
    # mainland landline: 010-12345678, 0755-1234567, (021) 12345678
    r"(?<![\d+])(?:\+?86[ -]?)?(?:\(0\d{2,3}\)[ -]?|0\d{2,3}[ -])\d{7,8}(?!\d)",
))
# mainland resident ID: region (6), birth date yyyymmdd, sequence (3), check digit or X
CN_ID = (r"(?<!\d)[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"
         r"\d{3}[0-9Xx](?!\d)")


@dataclass(frozen=True)
class Detector:
    name: str
    tag: str
    pattern: str
    validate: Callable[[str], bool] | None
    description: str

    def matcher(self, tag: str | None = None) -> Matcher:
        return Matcher(self.pattern, tag=tag or self.tag, validate=self.validate,
                       label=self.name)


# Order matters where two can match at the same place: an ID before a card number.
DETECTORS: dict[str, Detector] = {d.name: d for d in (
    Detector("email", "[EMAIL]", EMAIL, None, "e-mail addresses (ASCII)"),
    Detector("cn_id", "[ID]", CN_ID, cn_id_ok,
             "mainland resident ID numbers (18 characters, check digit verified)"),
    Detector("card", "[CARD]", CARD, _card_ok, "card numbers, 13-19 digits, Luhn-valid"),
    Detector("phone", "[PHONE]", PHONE, _phone_ok,
             "phone numbers: international +CC, North American, mainland mobile and landline"),
)}


@dataclass(frozen=True)
class Hit:
    start: int
    end: int
    label: str  # detector name or rule name
    tag: str


def find_all(matchers: list[Matcher], text: str) -> list[Hit]:
    """Validated matches of several matchers in a finished text, non-overlapping: the
    leftmost wins, then the longest, then the first matcher."""
    hits = [Hit(s, e, m.label, m.tag) for m in matchers for s, e in m.finditer(text)]
    hits.sort(key=lambda h: (h.start, -(h.end - h.start)))
    out: list[Hit] = []
    for h in hits:
        if not out or h.start >= out[-1].end:
            out.append(h)
    return out


_PII_MATCHERS = {name: d.matcher() for name, d in DETECTORS.items()}


def find_pii(text: str, names: Iterable[str] = tuple(DETECTORS)) -> list[Hit]:
    """Personal data in `text` (detectors `names`), non-overlapping."""
    return find_all([_PII_MATCHERS[n] for n in names], text)


def replace_hits(text: str, hits: list[Hit]) -> str:
    parts, pos = [], 0
    for h in hits:
        parts += [text[pos:h.start], h.tag]
        pos = h.end
    return "".join(parts) + text[pos:]


def redact(text: str, counts: dict[str, int] | None = None,
           names: Iterable[str] = tuple(DETECTORS)) -> str:
    """Replace personal data by tags ([EMAIL], [ID], [CARD], [PHONE]); `counts` (by
    detector name) is increased by what was replaced."""
    hits = find_pii(text, names)
    if counts is not None:
        for h in hits:
            counts[h.label] = counts.get(h.label, 0) + 1
    return replace_hits(text, hits)


# ---- blocked terms -------------------------------------------------------------------

def term_pattern(term: str) -> str:
    """A term as a pattern: whitespace inside it matches 1-8 whitespace characters; a
    boundary is required at each end that is a letter or digit of a space-delimited
    script (see the module docstring)."""
    words = term.split()
    if not words:
        raise ValueError("a blocked term is empty")
    body = r"\s{1,8}".join(regex.escape(w) for w in words)
    first, last = words[0][0], words[-1][-1]
    head = "" if _NO_SPACE.match(first) or not (first.isalnum() or first == "_") else \
        rf"(?<!{_SPACED_WORD})"
    tail = "" if _NO_SPACE.match(last) or not (last.isalnum() or last == "_") else \
        rf"(?!{_SPACED_WORD})"
    return head + body + tail


def terms_pattern(terms: Iterable[str]) -> str:
    """One alternation of terms, longest first (so that a longer term wins at a place)."""
    unique = sorted({t.strip() for t in terms if t.strip()}, key=lambda t: (-len(t), t))
    if not unique:
        raise ValueError("no blocked terms")
    return "|".join(f"(?:{term_pattern(t)})" for t in unique)


class Blocklist:
    """Blocked terms, case-insensitive, matched as described in the module docstring."""

    def __init__(self, terms: Iterable[str], tag: str = "[BLOCKED]", label: str = "") -> None:
        self.terms = tuple(t for t in terms if t.strip())
        self.matcher = Matcher(terms_pattern(self.terms), tag=tag, ignore_case=True,
                               label=label or "blocklist") if self.terms else None

    def search(self, text: str) -> str | None:
        """The first blocked term found in `text` (as written there), or None."""
        if self.matcher is None:
            return None
        m = self.matcher.search.search(text)
        return m.group(0) if m else None

    def __bool__(self) -> bool:
        return self.matcher is not None
