"""PII redaction for region data: before training, and before anything is cached on a node's disk.

Builtin detectors find URLs, e-mail addresses, IBANs, payment card numbers and phone numbers; a region adds its
own identifiers (order numbers, member ids) as custom patterns. Every match is replaced by its type token
(``[EMAIL]``, ``[ORDER]``), and only counts per type leave this module, never a matched value.

Review text is full of numbers that are not personal (prices, years, dates, model and version numbers), so the
detectors favour precision: number-shaped candidates must pass a checksum (IBAN mod-97, card Luhn) or have the
shape and length of a real phone number, and none of them may start or end inside a longer word or number.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache

from common.errors import ConfigError

PII_TYPES: tuple[str, ...] = ("email", "phone", "iban", "card", "url")

# Detection order: a URL may hold an "@", a card or an IBAN holds digit groups that look like a phone number, so the
# wider shapes claim their text first.
_ORDER = ("url", "email", "iban", "card", "phone")

_NAME_RE = re.compile(r"[A-Z][A-Z0-9_]*")
_SEPARATORS = " .-"  # where a too-long number candidate may be cut back (see _pii_length)

# ASCII classes throughout, not \w or \d: Chinese characters are \w, and text like "联系我13800138000谢谢" has no
# space around the number. Full-width digits are deliberately not treated as digits.
_URL_RE = re.compile(
    r"(?<![A-Za-z0-9.@_%+-])(?i:https?://|www\.)"
    # URL characters, but not quotes, brackets or spaces; CJK text and full-width punctuation end the URL
    r"[A-Za-z0-9._~:/?#@!$&()*+,;=%-]*"
    # sentence punctuation ".,;:!?)" right after a URL belongs to the sentence
    r"[A-Za-z0-9_~/#@$&*+=%-]"
)
_EMAIL_RE = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}"
)
_IBAN_RE = re.compile(
    r"(?<![A-Za-z0-9])[A-Za-z]{2}[0-9]{2}"
    r"(?:[A-Za-z0-9]{11,30}|(?: [A-Za-z0-9]{4}){2,7}(?: [A-Za-z0-9]{1,4})?)"
    r"(?![A-Za-z0-9])"
)
_CARD_RE = re.compile(
    # not a piece of a longer number or of a decimal ("3.14159265358979")
    r"(?<![0-9])(?<![0-9][.,])"
    # compact, or groups with one kind of separator: 4-4-4-4, 4-6-5 (Amex), 4-4-4-4-3
    r"(?:[0-9]{13,19}|[0-9]{4}(?P<sep>[ -])[0-9]{3,6}(?:(?P=sep)[0-9]{3,6}){1,3})"
    r"(?![0-9])(?![.,][0-9])"
)
_PHONE_RE = re.compile(
    # not after a letter, digit or sign that makes it part of a code, price, decimal, rating or version
    r"(?<![A-Za-z0-9_+.,/#@$¥£€-])(?:"
    # international: +CC, an optional "(0)" or area code in parentheses, digit groups
    r"\+[0-9]{1,3}(?:[ .-]?\([0-9]{1,4}\))?[ .-]?[0-9]{1,14}(?:[ .-][0-9]{1,14}){0,5}"
    # North American: "(415) 555-2671"; "415-555-2671", "415.555.2671" with one kind of separator
    r"|\([2-9][0-9]{2}\) ?[2-9][0-9]{2}[ .-][0-9]{4}"
    r"|[2-9][0-9]{2}(?P<na>[ .-])[2-9][0-9]{2}(?P=na)[0-9]{4}"
    # trunk prefix 0: "020 7946 0958", "010-12345678", "07700 900123"
    # ("00" begins an international number, so "0044 0532 0130" inside other digit groups is none)
    r"|0[1-9][0-9]{0,3}[ -][0-9]{3,4}[ -]?[0-9]{3,4}"
    # French pairs: "01 23 45 67 89"
    r"|0[1-9](?P<fr>[ .-])[0-9]{2}(?:(?P=fr)[0-9]{2}){3}"
    # Chinese mobile: "13800138000", "138 0013 8000"
    r"|1[3-9][0-9](?:[0-9]{8}|(?P<cn>[ -])[0-9]{4}(?P=cn)[0-9]{4})"
    r")(?![A-Za-z0-9_])(?![.,/-][0-9])"
)


def _iban_ok(candidate: str) -> bool:
    """ISO 13616: 15 to 34 characters, and the number read with letters as 10..35 is 1 modulo 97."""
    iban = candidate.replace(" ", "").upper()
    if not 15 <= len(iban) <= 34:
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def _card_ok(candidate: str) -> bool:
    """13 to 19 digits, a payment-card first digit, and the Luhn check."""
    digits = [int(ch) for ch in candidate if ch in "0123456789"]
    # Major industry identifiers 2-6 are the card networks; 9 (ISBNs, EAN barcodes) and 1 are far likelier in
    # reviews than a card, so they are not taken for one. Of 13-digit numbers only old Visa cards (4) are cards;
    # the rest are EAN-13 barcodes ("690..." on Chinese products).
    if not 13 <= len(digits) <= 19 or not 2 <= digits[0] <= 6 or (len(digits) == 13 and digits[0] != 4):
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _phone_ok(candidate: str) -> bool:
    """International: 8 to 15 digits (E.164, a "(0)" trunk not counted), 11 for +1; national: 9 to 12 digits."""
    if candidate.startswith("+"):
        digits = sum(ch in "0123456789" for ch in candidate.replace("(0)", ""))
        # every number under +1 (North America and the Caribbean) has ten digits after it, so a year that
        # follows is cut off rather than taken for more of the number
        return digits == 11 if candidate.startswith("+1") else 8 <= digits <= 15
    return 9 <= sum(ch in "0123456789" for ch in candidate) <= 12


@dataclass(frozen=True)
class _Detector:
    name: str  # the key in the counts
    regex: re.Pattern[str]
    valid: Callable[[str], bool] | None = None  # a candidate the regex found is PII only if this holds

    @property
    def token(self) -> str:
        return f"[{self.name.upper()}]"


_BUILTIN = {
    "url": _Detector("url", _URL_RE),
    "email": _Detector("email", _EMAIL_RE),
    "iban": _Detector("iban", _IBAN_RE, _iban_ok),
    "card": _Detector("card", _CARD_RE, _card_ok),
    "phone": _Detector("phone", _PHONE_RE, _phone_ok),
}
_BUILTIN_TOKENS = frozenset(name.upper() for name in PII_TYPES)


@dataclass(frozen=True)
class CustomPattern:
    """A region's own identifier: every match of ``pattern`` becomes ``[NAME]``, counted under ``name``."""

    name: str  # upper-case token name, [A-Z][A-Z0-9_]*, not a builtin type
    pattern: str  # a Python regex; must compile and must not match the empty string

    def __post_init__(self) -> None:
        problems = [f"name: {p}" for p in _name_problems(self.name)]
        problems += [f"pattern: {p}" for p in _pattern_problems(self.pattern)]
        if problems:
            raise ConfigError(problems)


def _name_problems(name: object) -> list[str]:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        return [f"must be an upper-case token name ([A-Z][A-Z0-9_]*), got {name!r}"]
    if name in _BUILTIN_TOKENS:
        return [f"{name!r} is a builtin type; list it in types instead"]
    return []


def _pattern_problems(pattern: object) -> list[str]:
    if not isinstance(pattern, str):
        return [f"must be a regex string, got {type(pattern).__name__} {pattern!r}"]
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        return [f"does not compile: {err} (in {pattern!r})"]
    if compiled.fullmatch("") is not None:
        # an empty match replaces nothing but would still insert a token between every two characters
        return [f"{pattern!r} matches the empty string"]
    return []


@dataclass(frozen=True)
class PiiRules:
    """Which builtin detectors run, and which custom patterns run after them, in the order given."""

    types: tuple[str, ...] = PII_TYPES
    custom: tuple[CustomPattern, ...] = ()

    def __post_init__(self) -> None:
        problems: list[str] = []
        if isinstance(self.types, str):
            problems.append(f"types: must be a list of type names, got the string {self.types!r}")
        else:
            # a list from YAML or code becomes a tuple, so the rules stay hashable (compiled detectors are cached)
            object.__setattr__(self, "types", tuple(self.types))
            unknown = [t for t in self.types if t not in PII_TYPES]
            if unknown:
                names = ", ".join(repr(t) for t in unknown)
                problems.append(f"types: unknown {names} (builtin: {', '.join(PII_TYPES)})")
        object.__setattr__(self, "custom", tuple(self.custom))
        first: dict[str, int] = {}
        for i, item in enumerate(self.custom):
            if not isinstance(item, CustomPattern):
                problems.append(f"custom[{i}]: must be a CustomPattern, got {type(item).__name__}")
            elif item.name in first:
                problems.append(f"custom[{i}].name: duplicate {item.name!r} (also custom[{first[item.name]}])")
            else:
                first[item.name] = i
        if problems:
            raise ConfigError(problems)


@lru_cache(maxsize=32)
def _compile(rules: PiiRules) -> tuple[re.Pattern[str], tuple[_Detector, ...]]:
    """The regex of every token, and the detectors in the order they run."""
    detectors = [_BUILTIN[name] for name in _ORDER if name in rules.types]
    detectors += [_Detector(c.name, re.compile(c.pattern)) for c in rules.custom]
    names = sorted(_BUILTIN_TOKENS | {c.name for c in rules.custom})
    tokens = re.compile(r"(\[(?:" + "|".join(re.escape(n) for n in names) + r")\])")
    return tokens, tuple(detectors)


def _pii_length(candidate: str, valid: Callable[[str], bool] | None) -> int:
    """How much of a candidate is PII: all of it, else the longest part before a separator that passes ``valid``.

    Greedy digit groups can run on into a year or a word ("4111 1111 1111 1111 2020"); cutting back keeps the
    card and leaves the rest. 0: none of it.
    """
    if valid is None:
        return len(candidate)
    cuts = [len(candidate)] + [i for i in range(len(candidate) - 1, 0, -1) if candidate[i] in _SEPARATORS]
    return next((cut for cut in cuts if valid(candidate[:cut])), 0)


def _apply(detector: _Detector, text: str, tokens: re.Pattern[str]) -> tuple[str, int]:
    """Replace the detector's matches outside existing tokens; return the text and how many were replaced."""
    hits = 0

    def replace(match: re.Match[str]) -> str:
        nonlocal hits
        candidate = match.group()
        keep = _pii_length(candidate, detector.valid)
        if keep == 0:  # also every empty match, so a pattern can never insert a token without consuming text
            return candidate
        hits += 1
        return detector.token + candidate[keep:]

    # split() with a capturing group: even items are free text, odd items are tokens, which no pattern may touch
    parts = tokens.split(text)
    for i in range(0, len(parts), 2):
        parts[i] = detector.regex.sub(replace, parts[i])
    return "".join(parts), hits


def redact(text: str, rules: PiiRules) -> tuple[str, Counter[str]]:
    """Replace every match by its type token ("[EMAIL]", "[PHONE]", "[IBAN]", "[CARD]", "[URL]", custom "[NAME]").

    Return the new text and the counts per type (keys: lower-case builtin names, custom names as given). The
    result is a fixed point: ``redact`` of it changes nothing and counts nothing.
    """
    tokens, detectors = _compile(rules)
    counts: Counter[str] = Counter()
    # A replacement can expose a match a pass could not see (a custom pattern's token now borders a phone
    # number), so passes repeat until one finds nothing. This ends: every replacement turns at least one
    # character of free text into a token, and tokens are never matched again.
    while True:
        found = 0
        for detector in detectors:
            text, hits = _apply(detector, text, tokens)
            if hits:
                counts[detector.name] += hits
                found += hits
        if not found:
            return text, counts


def redact_texts(texts: Iterable[str], rules: PiiRules) -> tuple[list[str], dict[str, int]]:
    """Redact many texts; return them and the total counts per type (only types found, sorted by name)."""
    out: list[str] = []
    total: Counter[str] = Counter()
    for text in texts:
        redacted, counts = redact(text, rules)
        out.append(redacted)
        total.update(counts)
    return out, {name: total[name] for name in sorted(total) if total[name] > 0}
