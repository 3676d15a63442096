"""Text transformation in Chinese: a date written the Chinese way -> ISO 8601 (YYYY-MM-DD).

The prompts mix Arabic and Chinese numerals (二〇二一年三月五日), day suffixes 日 and 号,
weekdays (星期五) and the year placed last (3月5日，2021年): the model must read the text,
not copy digits."""

from __future__ import annotations

import calendar
import random

from trainer.tasks.date_iso import random_date

INSTRUCTION = "把下面的日期改写成 ISO 8601 格式（YYYY-MM-DD）："
DIGITS = "〇一二三四五六七八九"
WEEKDAYS = "一二三四五六日"


def _year(y: int) -> str:
    return "".join(DIGITS[int(c)] for c in str(y))


def _number(n: int) -> str:
    """1..31 in Chinese numerals: 五, 十, 十二, 二十, 二十三, 三十一."""
    tens, ones = divmod(n, 10)
    if tens == 0:
        return DIGITS[ones]
    head = "" if tens == 1 else DIGITS[tens]
    return head + "十" + (DIGITS[ones] if ones else "")


def make_example(rng: random.Random) -> dict[str, str]:
    year, month, day = random_date(rng)
    weekday = "星期" + WEEKDAYS[calendar.weekday(year, month, day)]
    style = rng.randrange(5)
    if style == 0:
        text = f"{year}年{month}月{day}日"
    elif style == 1:
        text = f"{_year(year)}年{_number(month)}月{_number(day)}日"
    elif style == 2:
        text = f"{month}月{day}号，{year}年"
    elif style == 3:
        text = f"{year}年{_number(month)}月{_number(day)}号"
    else:
        text = f"{year}年{month}月{day}日（{weekday}）"
    return {"prompt": INSTRUCTION + text, "completion": f"{year:04d}-{month:02d}-{day:02d}"}
