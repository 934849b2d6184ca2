"""PII redaction for region data: before training, and before anything is cached on a node's disk.

Builtin detectors find URLs, e-mail addresses, IBANs, payment card numbers and phone numbers; a region adds its
own identifiers (order numbers, member ids) as custom patterns. Every match is replaced by its type token
(``[EMAIL]``, ``[ORDER]``), and only counts per type leave this module, never a matched value.

Review text is full of numbers that are not personal (prices, years, dates, model and version numbers), so the
detectors favour precision: number-shaped candidates must pass a checksum (IBAN mod-97, card Luhn) or have the
shape and length of a real phone number, and none of them may start or end inside a longer word or number.

Custom patterns come from a policy file, so redaction bounds them: each runs through the ``regex`` module with a
time limit per text (``CUSTOM_TIMEOUT_S``), and a pattern is refused when the policy loads if it backtracks
catastrophically on short adversarial strings (``_probe``). A hang would stop a node before training, silently.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import regex

from common.errors import ConfigError, InputError

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


# A custom pattern gets this long for one text (one pass over a free-text stretch of it); far above what a
# sane pattern needs on a review (microseconds), far below a hang.
CUSTOM_TIMEOUT_S = 1.0
# ... and this long for all its probe strings together when the policy loads. The regex module memoises much
# backtracking, so nested repetition is often polynomial rather than exponential there: probes as long as a long review
# (cubic: seconds) tell it from a sane pattern (linear: microseconds, even on a busy machine).
PROBE_TIMEOUT_S = 0.5
_PROBE_LENGTH = 2000
_PROBE_CHARS = "aA0 .-_@/:中"


class PatternTimeout(InputError):
    """A custom pattern ran past its time limit on a text: it backtracks catastrophically on such input."""

    def __init__(self, name: str, pattern: str) -> None:
        self.name = name
        self.pattern = pattern
        super().__init__(
            f"custom PII pattern {name} ({pattern!r}) ran longer than {CUSTOM_TIMEOUT_S} s on one text: it "
            "backtracks catastrophically (nested or overlapping repetition); rewrite it without nesting"
        )


@dataclass(frozen=True)
class _Detector:
    name: str  # the key in the counts
    regex: Any  # a compiled pattern: re's for the builtins, the regex module's (with time limits) for custom ones
    valid: Callable[[str], bool] | None = None  # a candidate the regex found is PII only if this holds
    timeout: float | None = None  # seconds per text; custom patterns only (the builtins are ours and linear)

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
        compiled = regex.compile(pattern)
    except regex.error as err:
        return [f"does not compile: {err} (in {pattern!r})"]
    if compiled.fullmatch("") is not None:
        # an empty match replaces nothing but would still insert a token between every two characters
        return [f"{pattern!r} matches the empty string"]
    slow = _probe(compiled)
    if slow is not None:
        return [
            f"{pattern!r} backtracks catastrophically: searching strings like {slow!r} ({_PROBE_LENGTH + 1} "
            f"characters) took longer than {PROBE_TIMEOUT_S} s, and a node would spend that on every such text "
            "(nested or overlapping repetition such as (a+)+ or (\\w+\\s?)+); rewrite it without nesting"
        ]
    return []


def _probe(compiled: Any) -> str | None:
    """The adversarial string the pattern was searching when ``PROBE_TIMEOUT_S`` ran out, else None.

    Each string repeats one character (common classes, and every character the pattern itself names) and ends
    in one that nothing repeats: exactly the input on which nested repetition tries every way to split the run.
    Running the pattern settles it where reading its syntax would guess.
    """
    literals = [ch for ch in dict.fromkeys(compiled.pattern) if ch.isalnum() or ch in " -_.,;:@#/"][:32]
    deadline = time.monotonic() + PROBE_TIMEOUT_S
    for ch in dict.fromkeys(_PROBE_CHARS + "".join(literals)):
        for end in ("\x00", "!"):
            text = ch * _PROBE_LENGTH + end
            try:
                compiled.search(text, timeout=max(deadline - time.monotonic(), 0.001))
            except TimeoutError:
                return ch * 8 + "…" + end
    return None


def custom_share(pattern: CustomPattern, texts: Sequence[str]) -> float:
    """The share of the characters of ``texts`` that ``pattern`` alone would replace (0..1); the same time
    limit per text as redaction (``PatternTimeout``)."""
    compiled = regex.compile(pattern.pattern)
    matched = total = 0
    for text in texts:
        total += len(text)
        try:
            matched += sum(m.end() - m.start() for m in compiled.finditer(text, timeout=CUSTOM_TIMEOUT_S))
        except TimeoutError as err:
            raise PatternTimeout(pattern.name, pattern.pattern) from err
    return matched / total if total else 0.0


@dataclass(frozen=True)
class PiiRules:
    """Which builtin detectors run, and which custom patterns run after them, in the order given."""

    types: tuple[str, ...] = PII_TYPES
    custom: tuple[CustomPattern, ...] = ()
    # compiled once, when the rules are made (they are immutable): no cache shared by the whole process
    _compiled: tuple[re.Pattern[str], tuple[_Detector, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        problems: list[str] = []
        if isinstance(self.types, str):
            problems.append(f"types: must be a list of type names, got the string {self.types!r}")
        else:
            # a list from YAML or code becomes a tuple, so the rules stay hashable and comparable
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
        object.__setattr__(self, "_compiled", _compile(self))


def _compile(rules: PiiRules) -> tuple[re.Pattern[str], tuple[_Detector, ...]]:
    """The regex of every token, and the detectors in the order they run."""
    detectors = [_BUILTIN[name] for name in _ORDER if name in rules.types]
    detectors += [_Detector(c.name, regex.compile(c.pattern), timeout=CUSTOM_TIMEOUT_S) for c in rules.custom]
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
        if detector.timeout is None:
            parts[i] = detector.regex.sub(replace, parts[i])
            continue
        try:
            parts[i] = detector.regex.sub(replace, parts[i], timeout=detector.timeout)
        except TimeoutError as err:
            raise PatternTimeout(detector.name, detector.regex.pattern) from err
    return "".join(parts), hits


def redact(text: str, rules: PiiRules) -> tuple[str, Counter[str]]:
    """Replace every match by its type token ("[EMAIL]", "[PHONE]", "[IBAN]", "[CARD]", "[URL]", custom "[NAME]").

    Return the new text and the counts per type (keys: lower-case builtin names, custom names as given). The
    result is a fixed point: ``redact`` of it changes nothing and counts nothing.
    """
    tokens, detectors = rules._compiled
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
