"""Policy files (format, errors with file/line/reason) and the streaming matcher: the same
text whole or in pieces, nothing released that could still complete a match, items (token
ids) dropped with their text, the hold-back bounded."""

from __future__ import annotations

import json
import random

import pytest

from textguard import PolicyError, load_policy, parse_policy
from textguard.policy import load_adapter_policy

POLICY = """\
rules:
  - name: secrets
    terms: [password, swordfish, 密码, 芝麻开门]
  - name: pii
    pii: all
  - name: order
    pattern: 'ORD-\\d{6}'
    tag: "[ORDER]"
  - name: forbidden
    terms: [kaboom, 爆炸]
    action: stop
"""
TEXTS = [
    "Call 13812345678 or mail abc@x.com, the password is swordfish. Order ORD-123456 ok.",
    "请拨打138-1234-5678或发邮件至abc@x.com谢谢，我的密码是芝麻开门。座机0755-1234567。",
    "Mixed: 联系邮箱abc@x.com谢谢 and +86 138 1234 5678, card 4111 1111 1111 1111 end",
    "Nothing to see here, just a long answer about the capital of France, which is Paris.",
]


@pytest.fixture(scope="module")
def policy():
    return parse_policy(POLICY, "policy.yaml")


def _chunks(text: str, rng: random.Random) -> list[str]:
    out, i = [], 0
    while i < len(text):
        n = rng.choice([0, 1, 1, 2, 3, 5])
        out.append(text[i:i + n])
        i += n
    return out


def _stream(policy, pieces):
    s = policy.stream()
    released, items = [], []
    for i, piece in enumerate(pieces):
        text, its = s.push(piece, i)
        released.append(text)
        items += its
    text, its = s.finish()
    released.append(text)
    return s, released, items + its


def test_whole_text(policy):
    assert policy.apply(TEXTS[0]) == (
        "Call [PHONE] or mail [EMAIL], the [REDACTED] is [REDACTED]. Order [ORDER] ok.",
        ["pii", "secrets", "order"], False)
    assert policy.apply(TEXTS[1])[0] == (
        "请拨打[PHONE]或发邮件至[EMAIL]谢谢，我的[REDACTED]是[REDACTED]。座机[PHONE]。")
    assert policy.apply(TEXTS[3]) == (TEXTS[3], [], False)


@pytest.mark.parametrize("seed", range(20))
def test_streamed_in_any_pieces_equals_whole(policy, seed):
    rng = random.Random(seed)
    for text in TEXTS:
        whole, rules, _ = policy.apply(text)
        s, released, _ = _stream(policy, _chunks(text, rng))
        assert "".join(released) == whole
        assert list(s.hits) == rules
        # every prefix a client could have seen is a prefix of the final text, and the
        # final text holds no match: no chunk ever completed one
        seen = ""
        for part in released:
            seen += part
            assert whole.startswith(seen)
        for rule in policy.rules:
            for m in rule.matchers:
                assert not list(m.finditer(whole.replace(m.tag, ""))), (rule.name, whole)


def test_hold_back_is_only_what_a_match_still_needs(policy):
    s = policy.stream()
    s.push("The capital of France is Paris. ")
    assert s.held == 0
    s.push("Call 138")  # could become a phone number: held from "138" on... and "Call"
    assert s.held == len("138")
    s.push("1234")
    assert s.held == len("1381234")
    text, _ = s.push("5678. ")
    assert text == "[PHONE]. " and s.held == 0
    s.push("我的密")  # a prefix of 密码
    assert s.held == 1
    text, _ = s.push("钥")
    assert text == "密钥" and s.held == 0


def test_stop_ends_the_text_and_drops_later_items(policy):
    pieces = ["It will go ", "ka", "boom", " now and more"]
    s, released, items = _stream(policy, pieces)
    assert "".join(released) == "It will go " and s.stopped and s.stop_rule == "forbidden"
    assert items == [0]  # "ka" and "boom" made the match; nothing after it is released
    s, released, _ = _stream(policy, ["那里会", "爆", "炸的"])
    assert "".join(released) == "那里会" and s.stopped


def test_stop_is_decided_as_soon_as_its_match_is_certain(policy):
    # "kaboom." could still be the start of an e-mail address ("kaboom.x@y.com", a redact
    # match at the same place): a stop rule wins there, so the stop does not wait for it
    s = policy.stream()
    assert s.push("Then kaboom") == ("Then ", [])
    assert s.push(".") == ("", []) and s.stopped and s.stop_rule == "forbidden"


def test_items_follow_their_text(policy):
    # item 1 produced no text yet (an incomplete character): it belongs to the next delta
    s = policy.stream()
    assert s.push("Hello", 0) == ("", [])  # "Hello" could start an e-mail address
    assert s.push(" ", 1) == ("Hello ", [0, 1])
    assert s.push("", 2) == ("", [])
    assert s.push("你好", 3) == ("你好", [2, 3])  # item 2's text came with this delta
    # item 4 holds " " and the start of the phone number: held until the number is decided,
    # then dropped with it, like item 5; items 6 and 7 made only the ".。" after it (the "."
    # alone is still held: "13812345678.x@y.com" would be an e-mail address)
    assert s.push(" 1381234", 4) == (" ", [])
    assert s.push("5678", 5) == ("", [])
    assert s.push(".", 6) == ("", [])
    assert s.push("。", 7) == ("[PHONE].。", [6, 7])
    assert s.finish() == ("", [])


def test_items_of_redacted_text_are_dropped():
    policy = parse_policy("rules:\n  - name: p\n    pii: [phone]\n", "p.yaml")
    s = policy.stream()
    out = [s.push(piece, i) for i, piece in enumerate(["a ", "1381234", "5678", " b"])]
    out.append(s.finish())
    assert "".join(t for t, _ in out) == "a [PHONE] b"
    assert [i for _, its in out for i in its] == [0, 3]


def test_unbounded_pattern_is_capped():
    policy = parse_policy("rules:\n  - name: digits\n    pattern: '\\d+'\n    max_chars: 8\n",
                          "p.yaml")
    s = policy.stream()
    for _ in range(30):
        s.push("7")
        assert s.held <= 8
    default = parse_policy("rules:\n  - name: d\n    pattern: 'x\\d+'\n", "p.yaml")
    assert default.rules[0].matchers[0].max_chars == 256


@pytest.mark.parametrize("text, line, reason", [
    ("rules: [\n", 2, "not valid YAML"),
    ("", 1, "empty"),
    ("rules: {}\n", 1, "'rules' must be a list"),
    ("rule:\n  - name: a\n", 1, "unknown key 'rule'"),
    ("rules:\n  - name: a\n    terms: [x]\n    action: block\n", 4,
     "action 'block' is not one of redact, stop"),
    ("rules:\n  - name: a\n    pattern: 'ab('\n", 3, "not a valid regular expression"),
    ("rules:\n  - name: a\n    pattern: 'a*'\n", 3, "can match the empty string"),
    ("rules:\n  - name: a\n    pii: [ssn]\n", 3, "expected 'all' or a list of"),
    ("rules:\n  - name: a\n    terms: [x]\n    pattern: y\n", 2, "exactly one of"),
    ("rules:\n  - name: a\n    terms: [x]\n    colour: red\n", 4, "unknown key 'colour'"),
    ("rules:\n  - name: a\n    terms: [x]\n  - name: a\n    terms: [y]\n", 4, "used twice"),
    ("rules:\n  - name: phone\n    terms: [phone]\n  - name: p\n    pii: [phone]\n", 4,
     "tag '[PHONE]' is itself matched by rule 'phone'"),
    ("rules:\n  - name: a\n    pattern: 'x\\d+'\n    max_chars: 100000\n", 4, "max_chars"),
])
def test_malformed_policy_names_file_line_and_reason(tmp_path, text, line, reason):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(PolicyError) as e:
        load_policy(p)
    assert (e.value.file, e.value.line) == (str(p), line)
    assert reason in e.value.reason
    assert str(e.value).startswith(f"{p}:{line}: ")


def test_adapter_policy_beside_or_in_manifest(tmp_path):
    assert load_adapter_policy(tmp_path) is None
    manifest = {"method": "lora", "output_policy": {"rules": [{"name": "m", "terms": ["x"]}]}}
    (tmp_path / "switchboard.json").write_text(json.dumps(manifest, indent=2))
    assert load_adapter_policy(tmp_path).names == ("m",)
    (tmp_path / "output_policy.yaml").write_text("rules:\n  - name: f\n    terms: [y]\n")
    with pytest.raises(PolicyError, match="in one place"):
        load_adapter_policy(tmp_path)
    (tmp_path / "switchboard.json").write_text(json.dumps({"method": "lora"}))
    assert load_adapter_policy(tmp_path).names == ("f",)
    bad = {"method": "lora", "output_policy": {"rules": [{"name": "m", "pattern": "("}]}}
    (tmp_path / "output_policy.yaml").unlink()
    (tmp_path / "switchboard.json").write_text(json.dumps(bad, indent=2))
    with pytest.raises(PolicyError) as e:
        load_adapter_policy(tmp_path)
    assert e.value.line == 7 and "switchboard.json" in e.value.file


def test_global_and_adapter_rules_add_up(policy):
    adapter = parse_policy("rules:\n  - name: extra\n    terms: [Paris]\n", "a.yaml")
    both = policy + adapter
    assert both.names == (*policy.names, "extra")
    assert both.apply("Call 13812345678 in Paris.")[0] == "Call [PHONE] in [REDACTED]."
    assert policy.apply("in Paris.")[0] == "in Paris."
