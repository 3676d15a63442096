"""Text transformation: a date written in words -> ISO 8601 (YYYY-MM-DD)."""

from __future__ import annotations

import calendar
import random

MONTHS = list(calendar.month_name)[1:]
INSTRUCTION = "Rewrite this date in ISO 8601 format (YYYY-MM-DD):"


def _ordinal(d: int) -> str:
    suffix = "th" if 11 <= d % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")
    return f"{d}{suffix}"


def random_date(rng: random.Random) -> tuple[int, int, int]:
    """(year, month, day) between 1950 and 2049; shared by the date tasks."""
    year = rng.randint(1950, 2049)
    month = rng.randint(1, 12)
    return year, month, rng.randint(1, calendar.monthrange(year, month)[1])


def make_example(rng: random.Random) -> dict[str, str]:
    year, month, day = random_date(rng)
    name = MONTHS[month - 1]
    style = rng.randrange(5)
    if style == 0:
        text = f"{name} {day}, {year}"
    elif style == 1:
        text = f"{day} {name} {year}"
    elif style == 2:
        text = f"{name[:3]} {day} {year}"
    elif style == 3:
        text = f"the {_ordinal(day)} of {name}, {year}"
    else:
        text = f"{calendar.day_name[calendar.weekday(year, month, day)]}, {name} {day}, {year}"
    return {"prompt": f"{INSTRUCTION} {text}", "completion": f"{year:04d}-{month:02d}-{day:02d}"}
