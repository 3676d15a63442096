"""The detectors in English and Chinese: PII patterns with their checks, and the blocklist's
word boundaries for space-delimited and CJK text. (No __init__.py: see tests/trainer.)"""

from __future__ import annotations

import pytest

from textguard.detectors import Blocklist, cn_id_ok, find_pii, luhn_ok, redact

VALID_ID = "11010519491231002X"  # the check digit of 11010519491231002 is X


def _id_with_check(first17: str) -> str:
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    total = sum(int(d) * w for d, w in zip(first17, weights, strict=True))
    return first17 + "10X98765432"[total % 11]


def test_luhn():
    assert luhn_ok("4111111111111111") and luhn_ok("79927398713")
    assert not luhn_ok("4111111111111112") and not luhn_ok("79927398710")


def test_resident_id_check_digit():
    assert cn_id_ok(VALID_ID) and cn_id_ok(VALID_ID.lower())
    assert not cn_id_ok("110105194912310021")  # right shape, wrong check digit
    other = _id_with_check("44030119900307451")
    assert cn_id_ok(other) and other[-1] == "1"  # weighted sum 264 = 24 * 11 -> "1"
    assert not cn_id_ok(other[:-1] + "7") and not cn_id_ok(other[:-1] + "X")


@pytest.mark.parametrize("text, expected", [
    ("13812345678", "[PHONE]"),
    ("138-1234-5678", "[PHONE]"),
    ("138 1234 5678", "[PHONE]"),
    ("+86 138 1234 5678", "[PHONE]"),
    ("+8613812345678", "[PHONE]"),
    ("010-12345678", "[PHONE]"),
    ("0755-1234567", "[PHONE]"),
    ("(021) 12345678", "[PHONE]"),
    ("call +1 415-555-0134 now", "call [PHONE] now"),
    ("call (415) 555-0134 now", "call [PHONE] now"),
    ("请拨打13812345678联系我", "请拨打[PHONE]联系我"),
    ("座机：010-12345678。", "座机：[PHONE]。"),
    ("联系邮箱abc@x.com谢谢", "联系邮箱[EMAIL]谢谢"),
    ("mail jane.doe+tag@mail.example.co.uk, thanks", "mail [EMAIL], thanks"),
    ("邮箱：a_b@qq.com。", "邮箱：[EMAIL]。"),
    ("card 4111 1111 1111 1111.", "card [CARD]."),
    ("卡号4111111111111111谢谢", "卡号[CARD]谢谢"),
    (f"身份证号{VALID_ID}，请核对", "身份证号[ID]，请核对"),
    (f"ID {VALID_ID.lower()} on file", "ID [ID] on file"),
])
def test_pii_found_in_both_languages(text, expected):
    assert redact(text) == expected


@pytest.mark.parametrize("text", [
    "order 1234 5678 9012 3456",  # 16 digits failing the Luhn check: not a card
    "身份证号110105194912310021",  # resident-ID shape with a wrong check digit
    "on 2021-03-05 at 12:30",  # dates are not phone numbers
    "日期2024-01-15，订单号20240115123456789",
    "138123456789",  # 12 digits: not a mobile number
    "12812345678",  # 12x is not a mobile prefix
    "version 1.2.3 of 4.5",
    "用户名abc，没有邮箱",
])
def test_look_alikes_are_left_alone(text):
    assert redact(text) == text


def test_counts_and_order():
    counts: dict[str, int] = {}
    text = f"电话13812345678，邮箱abc@x.com，身份证{VALID_ID}，卡4111111111111111"
    assert redact(text, counts) == "电话[PHONE]，邮箱[EMAIL]，身份证[ID]，卡[CARD]"
    assert counts == {"phone": 1, "email": 1, "cn_id": 1, "card": 1}
    hits = find_pii(text)
    assert [h.label for h in hits] == ["phone", "email", "cn_id", "card"]
    assert text[hits[1].start:hits[1].end] == "abc@x.com"


def test_blocklist_cjk_is_substring():
    b = Blocklist(["密码", "芝麻开门"])
    assert b.search("我的密码是123") == "密码"
    assert b.search("请说芝麻开门吧") == "芝麻开门"
    assert b.search("我的密钥是123") is None


def test_blocklist_english_is_whole_word():
    b = Blocklist(["pass", "api key"])
    assert b.search("Your PASS is here") == "PASS"
    assert b.search("pass.") == "pass"
    for text in ("password", "bypass", "passage", "compass_x", "pass_word"):
        assert b.search(text) is None, text
    assert b.search("my api  key") == "api  key"
    assert b.search("my apikey") is None


def test_blocklist_mixed_scripts():
    b = Blocklist(["pass", "WiFi密码"])
    assert b.search("我的pass是123") == "pass"  # Chinese beside Latin is a boundary
    assert b.search("你的wifi密码呢") == "wifi密码"
    assert b.search("mywifi密码") is None  # starts with a Latin letter: whole word there
