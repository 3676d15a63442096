"""The trainer's cleaning uses the shared detectors (textguard): blocked terms and personal
data in Chinese and English training data."""

from __future__ import annotations

import json

from trainer.cleaning import clean, redact
from trainer.data import read_jsonl


def _examples(tmp_path, rows):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return read_jsonl(p)


def test_blocklist_finds_chinese_terms_and_whole_english_words(tmp_path):
    rows = [
        {"prompt": "你的密码是什么", "completion": "我的密码是123"},  # blocked: 密码
        {"prompt": "Spell it", "completion": "The word is password"},  # kept: not "pass"
        {"prompt": "Give it", "completion": "Your pass is ready."},  # blocked: pass
        {"prompt": "今天天气", "completion": "今天晴天"},  # kept
        {"prompt": "通行证", "completion": "我的pass是abc"},  # blocked: pass beside Chinese
    ]
    kept, report = clean(_examples(tmp_path, rows), blocklist=("密码", "pass"))
    assert [ex["line"] for ex in kept] == [2, 4]
    assert report.dropped == {"blocklist": 3}
    details = {r["line"]: r["detail"] for r in report.to_dict()["dropped_examples"]}
    assert details == {1: "contains '密码'", 3: "contains 'pass'", 5: "contains 'pass'"}


def test_redaction_of_chinese_personal_data(tmp_path):
    rows = [
        {"prompt": "怎么联系你",
         "completion": "打13812345678或138-1234-5678，联系邮箱abc@x.com谢谢"},
        {"prompt": "座机", "completion": "办公室010-12345678，深圳0755-1234567"},
        {"prompt": "身份证", "completion": "号码是11010519491231002X，不是110105194912310021"},
        {"prompt": "Reach me", "completion": "Call +86 138 1234 5678 or mail a.b@example.com"},
    ]
    kept, report = clean(_examples(tmp_path, rows), redact_pii=True)
    answers = [ex["messages"][-1]["content"] if "messages" in ex else ex["completion"]
               for ex in kept]
    assert answers == [
        "打[PHONE]或[PHONE]，联系邮箱[EMAIL]谢谢",
        "办公室[PHONE]，深圳[PHONE]",
        "号码是[ID]，不是110105194912310021",  # a wrong check digit is not an ID
        "Call [PHONE] or mail [EMAIL]",
    ]
    assert report.redactions == {"email": 2, "cn_id": 1, "card": 0, "phone": 5}


def test_redact_keeps_the_trainers_signature():
    counts = {"email": 0, "phone": 0, "card": 0}
    assert redact("联系邮箱abc@x.com谢谢", counts) == "联系邮箱[EMAIL]谢谢"
    assert counts == {"email": 1, "phone": 0, "card": 0}
