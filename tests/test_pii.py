"""PII redaction: what each detector takes, what review text keeps, and the rules' validation."""

from __future__ import annotations

from collections import Counter

import pytest

from common.errors import ConfigError
from common.pii import PII_TYPES, CustomPattern, PiiRules, redact, redact_texts

ALL = PiiRules()
ORDER = CustomPattern("ORDER", r"ORD-\d{6}")


def redacted(text: str, rules: PiiRules = ALL) -> str:
    out, _ = redact(text, rules)
    return out


# ---------------------------------------------------------------------------------------------------------
# Each detector: several formats, in a sentence


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("see https://shop.example.com/item?id=3&ref=a#top now", "see [URL] now"),
        ("see http://example.com", "see [URL]"),
        ("see HTTPS://EXAMPLE.COM/A", "see [URL]"),
        ("see www.example.com/path for more", "see [URL] for more"),
        # sentence punctuation after a URL stays in the sentence
        ("Visit https://example.com/a.", "Visit [URL]."),
        ("Visit www.example.com, then", "Visit [URL], then"),
        ("(see www.example.com)", "(see [URL])"),
        ("Really? https://example.com/x?!", "Really? [URL]?!"),
        ('he said "https://example.com/q"', 'he said "[URL]"'),
        ("访问https://example.com/a。谢谢", "访问[URL]。谢谢"),
        ("网址：www.example.com，欢迎！", "网址：[URL]，欢迎！"),
        # one URL, not a URL and an e-mail address
        ("http://a.com/x@y", "[URL]"),
        ("https://example.com/?u=a@b.com", "[URL]"),
    ],
)
def test_url(text: str, expected: str) -> None:
    out, counts = redact(text, ALL)
    assert out == expected
    assert counts == Counter(url=1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mail john.doe@example.com today", "mail [EMAIL] today"),
        ("First.Last+tag@mail.co.uk.", "[EMAIL]."),
        ("a_b-c%d@sub-domain.example.org", "[EMAIL]"),
        ("<anna@example.de>", "<[EMAIL]>"),
        ("邮箱abc@example.com。", "邮箱[EMAIL]。"),
        ("联系张三abc@example.com谢谢", "联系张三[EMAIL]谢谢"),
        # a QQ address is an e-mail address, not a phone number plus a domain
        ("13800138000@qq.com", "[EMAIL]"),
        # a host beginning with www is still the domain of the address
        ("user@www.example.com", "[EMAIL]"),
    ],
)
def test_email(text: str, expected: str) -> None:
    out, counts = redact(text, ALL)
    assert out == expected
    assert counts == Counter(email=1)


@pytest.mark.parametrize(
    "iban",
    [
        "DE89370400440532013000",
        "DE89 3704 0044 0532 0130 00",
        "GB82 WEST 1234 5698 7654 32",
        "GB82WEST12345698765432",
        "FR14 2004 1010 0505 0001 3M02 606",
        "NO9386011117947",  # the shortest, 15 characters
        "be68 5390 0754 7034",  # typed in lower case
    ],
)
def test_iban(iban: str) -> None:
    out, counts = redact(f"Überweisung an {iban}, danke", ALL)
    assert out == "Überweisung an [IBAN], danke"
    assert counts == Counter(iban=1)


def test_iban_followed_by_a_four_letter_word_keeps_the_word() -> None:
    assert redacted("pay BE68 5390 0754 7034 from my account") == "pay [IBAN] from my account"


@pytest.mark.parametrize(
    "card",
    [
        "4111111111111111",
        "4111 1111 1111 1111",
        "4111-1111-1111-1111",
        "5555 5555 5555 4444",
        "3782 822463 10005",  # Amex 4-6-5
        "378282246310005",
        "6011111111111117",
        "4222222222222",  # 13 digits
    ],
)
def test_card(card: str) -> None:
    out, counts = redact(f"paid with {card}.", ALL)
    assert out == "paid with [CARD]."
    assert counts == Counter(card=1)


def _luhn_complete(prefix: str) -> str:
    """``prefix`` with the check digit that makes it pass Luhn."""
    for last in "0123456789":
        digits = [int(c) for c in prefix + last][::-1]
        total = sum(d if i % 2 == 0 else (d * 2 - 9 if d > 4 else d * 2) for i, d in enumerate(digits))
        if total % 10 == 0:
            return prefix + last
    raise AssertionError("unreachable")


def test_card_of_19_digits() -> None:
    card = _luhn_complete("622202123456789012")
    assert len(card) == 19
    assert redacted(f"卡号{card}") == "卡号[CARD]"


def test_card_followed_by_a_year_keeps_the_year() -> None:
    assert redacted("card 4111 1111 1111 1111 2020 expired") == "card [CARD] 2020 expired"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("call +44 20 7946 0958 now", "call [PHONE] now"),
        ("call +86 138 0013 8000 now", "call [PHONE] now"),
        ("call +1 (415) 555-2671 now", "call [PHONE] now"),
        ("call +8613800138000 now", "call [PHONE] now"),
        ("call +44 (0)20 7946 0958 now", "call [PHONE] now"),
        ("call +49-30-1234567 now", "call [PHONE] now"),
        ("call (415) 555-2671 now", "call [PHONE] now"),
        ("call 415-555-2671 now", "call [PHONE] now"),
        ("call 415.555.2671 now", "call [PHONE] now"),
        ("call 020 7946 0958 now", "call [PHONE] now"),
        ("call 07700 900123 now", "call [PHONE] now"),
        ("call 010-12345678 now", "call [PHONE] now"),
        ("call 01 23 45 67 89 now", "call [PHONE] now"),
        ("call 13800138000 now", "call [PHONE] now"),
        ("call 138 0013 8000 now", "call [PHONE] now"),
        ("call 138-0013-8000.", "call [PHONE]."),
        ("联系我13800138000谢谢", "联系我[PHONE]谢谢"),
        ("电话：(415) 555-2671，谢谢", "电话：[PHONE]，谢谢"),
        ("tel:+86 138 0013 8000", "tel:[PHONE]"),
    ],
)
def test_phone(text: str, expected: str) -> None:
    out, counts = redact(text, ALL)
    assert out == expected
    assert counts == Counter(phone=1)


@pytest.mark.parametrize("number", ["+44 20 7946 0958", "+1 415 555 2671", "+86 138 0013 8000"])
def test_phone_followed_by_more_digit_groups_keeps_them(number: str) -> None:
    # the groups after the number are cut back (E.164: at most 15 digits; +1: exactly 11), not taken with it
    assert redact(f"{number} 2019 2020", ALL) == ("[PHONE] 2019 2020", Counter(phone=1))


# ---------------------------------------------------------------------------------------------------------
# What review text keeps


@pytest.mark.parametrize(
    "text",
    [
        "Bought it in 2019 for ¥299 (was $1,299.00), delivered 2021-03-04, firmware 1.2.3, rated 4.5/5.",
        "Shipped 2021/3/4, arrived 04.03.2021 at 12:30-13:45; 15% off, 3 x 128GB, qty 12345, 2019-2021.",
        "Model SM-G9730 and i7-12700H, RTX 3080, A2403, v10.0.19041.1234, IP 192.168.1.100, price €1.299,00.",
        "2021年3月4日买的，花了299元，原价¥1999，评分4.5/5，用了3年，型号SM-G9730。",
        "ISBN 978-7-111-12345-6 and ISBN 9787111123456, EAN 6901234567892 barcodes.",
        "Scores 10086 and 95588 and +5 and +15% and 3.14159265358979 and 1,234,567,890.",
        "www. is not a site, http:// neither, and a@b is not an address.",
    ],
)
def test_review_text_is_kept(text: str) -> None:
    assert redact(text, ALL) == (text, Counter())


def test_luhn_failures_are_not_cards() -> None:
    text = "ref 4111 1111 1111 1112 and 4111111111111112 and 5555555555554445"
    assert redact(text, ALL) == (text, Counter())


def test_non_card_first_digit_is_not_a_card() -> None:
    # passes Luhn, but 9 is the first digit of ISBNs and barcodes, not of card networks
    number = _luhn_complete("978711112345")
    assert redact(f"ISBN {number}", ALL) == (f"ISBN {number}", Counter())


def test_mod97_failures_are_not_ibans() -> None:
    text = "codes DE89 3704 0044 0532 0130 01, GB82WEST12345698765431 and AB12CDEFGHIJKLMNO"
    assert redact(text, ALL) == (text, Counter())


def test_numbers_inside_words_and_longer_numbers_are_not_phones() -> None:
    text = "SKU X13800138000, id 138001380001234, #13800138000, ¥13800138000"
    assert redact(text, ALL) == (text, Counter())


# ---------------------------------------------------------------------------------------------------------
# Rules: chosen types, custom patterns, order


def test_only_the_chosen_types_run() -> None:
    text = "mail a@example.com or call 13800138000"
    assert redact(text, PiiRules(types=("email",))) == ("mail [EMAIL] or call 13800138000", Counter(email=1))
    assert redact(text, PiiRules(types=())) == (text, Counter())


def test_card_is_not_reported_as_a_phone() -> None:
    assert redact("4111 1111 1111 1111", ALL) == ("[CARD]", Counter(card=1))
    # without the card detector the same digits are still no phone number
    assert redact("4111 1111 1111 1111", PiiRules(types=("phone",)))[1] == Counter()


def test_custom_pattern() -> None:
    rules = PiiRules(custom=(ORDER,))
    out, counts = redact("订单ORD-123456已发货, ORD-654321 too; ORD-12345 is short", rules)
    assert out == "订单[ORDER]已发货, [ORDER] too; ORD-12345 is short"
    assert counts == Counter(ORDER=2)


def test_custom_patterns_run_after_the_builtins_in_the_order_given() -> None:
    # the builtins take the e-mail address first; then ACCOUNT, listed first, wins over DIGITS
    rules = PiiRules(
        custom=(CustomPattern("ACCOUNT", r"ACC\d+"), CustomPattern("DIGITS", r"\d{4,}")),
    )
    out, counts = redact("ACC12345 and 99999 and acc1@example.com", rules)
    assert out == "[ACCOUNT] and [DIGITS] and [EMAIL]"
    assert counts == Counter(ACCOUNT=1, DIGITS=1, email=1)


def test_custom_pattern_never_matches_inside_a_token() -> None:
    rules = PiiRules(custom=(CustomPattern("SHOUT", r"[A-Z]{3,}"),))
    out, counts = redact("Visit www.example.com NOW", rules)
    assert out == "Visit [URL] [SHOUT]"
    assert counts == Counter(url=1, SHOUT=1)


def test_a_match_exposed_by_a_replacement_is_redacted_too() -> None:
    # the phone number is glued to a member id; once the id is a token, the number stands alone
    rules = PiiRules(custom=(CustomPattern("MEMBER", r"M\d{3}"),))
    assert redact("M12313800138000", rules) == ("[MEMBER][PHONE]", Counter(MEMBER=1, phone=1))


@pytest.mark.parametrize(
    "text",
    [
        "mail a@example.com, call +44 20 7946 0958, pay DE89 3704 0044 0532 0130 00 by 4111 1111 1111 1111",
        "see http://a.com/x@y and www.example.com。联系我13800138000谢谢",
        "a@b.com13800138000 and M12313800138000 and ORD-123456ORD-654321",
        "already [EMAIL] and [PHONE][CARD] and [ORDER] tokens, [NOT A TOKEN]",
        "+1 415 555 2671 2019 2020 and BE68 5390 0754 7034 from",
        "Bought in 2019 for ¥299, now $1,299.00",
    ],
)
def test_redact_is_idempotent(text: str) -> None:
    rules = PiiRules(custom=(ORDER, CustomPattern("MEMBER", r"M\d{3}"), CustomPattern("SHOUT", r"[A-Z]{3,}")))
    once, _ = redact(text, rules)
    assert redact(once, rules) == (once, Counter())


def test_counts_hold_types_never_values() -> None:
    text = "a@example.com b@example.com 13800138000 ORD-123456"
    out, counts = redact(text, PiiRules(custom=(ORDER,)))
    assert counts == Counter(email=2, phone=1, ORDER=1)
    assert all(isinstance(n, int) for n in counts.values())
    for value in ("a@example.com", "13800138000", "ORD-123456", "example"):
        assert value not in out
        assert value not in repr(counts)


def test_redact_texts_totals() -> None:
    texts = ["a@example.com and 13800138000", "nothing here, 2019", "b@example.com ORD-123456", ""]
    out, totals = redact_texts(iter(texts), PiiRules(custom=(ORDER,)))
    assert out == ["[EMAIL] and [PHONE]", "nothing here, 2019", "[EMAIL] [ORDER]", ""]
    assert totals == {"ORDER": 1, "email": 2, "phone": 1}
    assert list(totals) == sorted(totals)
    assert redact_texts([], ALL) == ([], {})
    assert redact_texts(["2019"], ALL) == (["2019"], {})


# ---------------------------------------------------------------------------------------------------------
# Validation


def test_defaults() -> None:
    assert PII_TYPES == ("email", "phone", "iban", "card", "url")
    assert ALL.types == PII_TYPES
    assert ALL.custom == ()


def test_lists_become_tuples_and_rules_stay_hashable() -> None:
    rules = PiiRules(types=["email", "url"], custom=[ORDER])  # type: ignore[arg-type]
    assert rules.types == ("email", "url")
    assert rules.custom == (ORDER,)
    assert hash(rules) == hash(PiiRules(types=("email", "url"), custom=(ORDER,)))


def test_bad_regex() -> None:
    with pytest.raises(
        ConfigError, match=r"(?m)^  - pattern: does not compile: unterminated character set .*'ORD-\[0-9'"
    ):
        CustomPattern("ORDER", "ORD-[0-9")


@pytest.mark.parametrize("pattern", ["", "x*", "(ab)?", "^$", "a|"])
def test_regex_matching_the_empty_string(pattern: str) -> None:
    with pytest.raises(ConfigError, match=r"(?m)^  - pattern: .* matches the empty string$"):
        CustomPattern("ORDER", pattern)


@pytest.mark.parametrize("name", ["order", "Order", "1ORDER", "ORD-ER", "", "ÖRDER"])
def test_bad_name(name: str) -> None:
    with pytest.raises(ConfigError, match=r"(?m)^  - name: must be an upper-case token name") as info:
        CustomPattern(name, r"ORD-\d{6}")
    assert repr(name) in str(info.value)


@pytest.mark.parametrize("name", ["EMAIL", "PHONE", "IBAN", "CARD", "URL"])
def test_builtin_name(name: str) -> None:
    with pytest.raises(ConfigError, match=rf"(?m)^  - name: '{name}' is a builtin type"):
        CustomPattern(name, r"ORD-\d{6}")


def test_custom_pattern_reports_name_and_pattern_together() -> None:
    with pytest.raises(ConfigError) as info:
        CustomPattern("order", "(")
    name, pattern = info.value.problems
    assert name.startswith("name: must be an upper-case token name")
    assert pattern.startswith("pattern: does not compile")


def test_unknown_types() -> None:
    with pytest.raises(
        ConfigError, match=r"(?m)^  - types: unknown 'fax', 'emial' \(builtin: email, phone, iban, card, url\)$"
    ):
        PiiRules(types=("email", "fax", "emial"))


def test_types_as_a_string() -> None:
    with pytest.raises(ConfigError, match=r"(?m)^  - types: must be a list of type names, got the string 'email'$"):
        PiiRules(types="email")  # type: ignore[arg-type]


def test_rules_report_every_problem_in_one_message() -> None:
    with pytest.raises(ConfigError) as info:
        PiiRules(
            types=("email", "fax"),
            custom=(ORDER, CustomPattern("TICKET", r"T\d+"), CustomPattern("ORDER", r"O\d+"), "ORD-\\d+"),  # type: ignore[arg-type]
        )
    assert info.value.problems == [
        "types: unknown 'fax' (builtin: email, phone, iban, card, url)",
        "custom[2].name: duplicate 'ORDER' (also custom[0])",
        "custom[3]: must be a CustomPattern, got str",
    ]
