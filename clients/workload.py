"""What a load test sends: which adapter (the mix) and which prompt (the prompt set)."""

from __future__ import annotations

import bisect
import itertools
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DISTRIBUTIONS = ("uniform", "zipf", "weights", "round_robin")


def expand_adapter_ids(count: int, pattern: str = "adapter-{i}", start: int = 0) -> list[str]:
    """`count` ids from a str.format pattern with `{i}`: adapter-0, adapter-1, ..."""
    if count < 1:
        raise ValueError(f"adapter count {count} must be at least 1")
    if "{i" not in pattern:
        raise ValueError(f"adapter pattern {pattern!r} must contain {{i}}")
    return [pattern.format(i=i) for i in range(start, start + count)]


@dataclass(frozen=True)
class AdapterMix:
    """A discrete distribution over adapter ids ("" is the base model)."""

    adapter_ids: tuple[str, ...]
    probabilities: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.adapter_ids:
            raise ValueError("the adapter mix needs at least one adapter id")
        if len(self.adapter_ids) != len(self.probabilities):
            raise ValueError(
                f"{len(self.adapter_ids)} adapter ids but {len(self.probabilities)} weights"
            )
        if len(set(self.adapter_ids)) != len(self.adapter_ids):
            raise ValueError("adapter ids in the mix must be unique")
        object.__setattr__(self, "_cdf", tuple(itertools.accumulate(self.probabilities)))

    @classmethod
    def from_weights(cls, weights: Mapping[str, float] | Sequence[tuple[str, float]]):
        items = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
        for adapter_id, w in items:
            if not (w >= 0.0) or w == float("inf"):
                raise ValueError(f"weight of adapter {adapter_id!r} is {w}, must be >= 0")
        total = sum(w for _, w in items)
        if not total > 0:
            raise ValueError(f"adapter weights sum to {total}, must be > 0")
        return cls(tuple(a for a, _ in items), tuple(w / total for _, w in items))

    @classmethod
    def uniform(cls, adapter_ids: Sequence[str]) -> AdapterMix:
        return cls.from_weights([(a, 1.0) for a in adapter_ids])

    @classmethod
    def zipf(cls, adapter_ids: Sequence[str], exponent: float = 1.0) -> AdapterMix:
        """P(rank k) proportional to 1 / k**exponent, ranks in the order of `adapter_ids`."""
        if exponent < 0:
            raise ValueError(f"zipf exponent {exponent} must be >= 0")
        return cls.from_weights(
            [(a, 1.0 / (k**exponent)) for k, a in enumerate(adapter_ids, start=1)]
        )

    def sample(self, rng: random.Random) -> str:
        cdf: tuple[float, ...] = self._cdf  # type: ignore[attr-defined]
        i = bisect.bisect_right(cdf, rng.random() * cdf[-1])
        return self.adapter_ids[min(i, len(self.adapter_ids) - 1)]

    def probability(self, adapter_id: str) -> float:
        return self.probabilities[self.adapter_ids.index(adapter_id)]


def load_weights_file(path: str | Path) -> dict[str, float]:
    """Adapter weights from JSON ({"id": w} or [["id", w], ...] or [{"adapter_id", "weight"}])
    or from text lines "id weight" / "id,weight" (# comments)."""
    text = Path(path).read_text()
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        return {str(k): float(v) for k, v in data.items()}
    if isinstance(data, list):
        out: dict[str, float] = {}
        for i, item in enumerate(data):
            if isinstance(item, dict):
                out[str(item["adapter_id"])] = float(item["weight"])
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                out[str(item[0])] = float(item[1])
            else:
                raise ValueError(f"{path}: entry {i} is not [id, weight] or an object")
        return out
    out = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.replace(",", " ").split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{lineno}: expected 'adapter_id weight', got {raw!r}")
        try:
            out[parts[0]] = float(parts[1])
        except ValueError:
            raise ValueError(f"{path}:{lineno}: weight {parts[1]!r} is not a number") from None
    if not out:
        raise ValueError(f"{path}: no adapter weights found")
    return out


@dataclass(frozen=True)
class Prompt:
    """A raw prompt or a chat conversation (exactly one is set)."""

    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None

    def request_kwargs(self) -> dict[str, Any]:
        if self.messages is not None:
            return {"messages": [{"role": r, "content": c} for r, c in self.messages]}
        return {"prompt": self.prompt}


_BUILTIN_QUESTIONS = (
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about autumn leaves.",
    "List three tips for writing clean Python code.",
    "What is the difference between a list and a tuple in Python?",
    "Summarize the plot of Romeo and Juliet in one paragraph.",
    "Translate 'Good morning, how are you?' into Spanish and German.",
    "Give me a short recipe for pancakes.",
    "How does a hash table work? Keep it brief.",
    "Write a Python function that checks whether a string is a palindrome.",
    "What are the main causes of inflation?",
    "Describe the water cycle to a ten-year-old.",
    "Suggest five names for a friendly robot.",
    "What is 17 multiplied by 23? Show your steps.",
    "Write a limerick about a cat who loves coffee.",
    "Compare trains and planes for a 500 km trip.",
    "用一句话介绍一下长城。",
    "What's a good way to learn a new language? 🌍",
    "Explain recursion with a simple example.",
    "Draft a polite email asking a colleague to review my pull request.",
    "What is photosynthesis?",
    "Give three arguments for and against remote work.",
    "Tell me a fun fact about octopuses.",
    "Convert 100 degrees Fahrenheit to Celsius and explain the formula.",
)
_LONG_CONTEXT = (
    "The Industrial Revolution began in Britain in the late eighteenth century and spread "
    "to Europe and North America. It replaced hand production with machines, introduced "
    "new chemical and iron-making processes, and shifted power from water wheels to steam. "
    "Factories grew around coal fields, cities expanded quickly, and working conditions "
    "were often harsh, which later led to labour laws and trade unions."
)


def builtin_prompts() -> list[Prompt]:
    """Varied chat prompts: short questions, instructions, code, CJK and emoji, a long one."""
    prompts = [Prompt(messages=(("user", q),)) for q in _BUILTIN_QUESTIONS]
    prompts.append(Prompt(messages=(
        ("system", "You are a concise assistant."),
        ("user", "Summarize this text in two sentences:\n\n" + _LONG_CONTEXT),
    )))
    prompts.append(Prompt(messages=(
        ("user", "Hi! Can you help me plan a trip?"),
        ("assistant", "Of course! Where would you like to go?"),
        ("user", "Somewhere warm in winter, with good food. Any ideas?"),
    )))
    return prompts


def load_prompts_file(path: str | Path) -> list[Prompt]:
    """JSONL: per line a JSON string (raw prompt), {"prompt": ...} or {"messages": [...]}."""
    prompts: list[Prompt] = []
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                item = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {exc.msg}") from None
            if isinstance(item, str):
                prompts.append(Prompt(prompt=item))
            elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
                prompts.append(Prompt(prompt=item["prompt"]))
            elif isinstance(item, dict) and isinstance(item.get("messages"), list):
                try:
                    msgs = tuple((str(m.get("role", "user")), str(m["content"]))
                                 for m in item["messages"])
                except (AttributeError, KeyError):
                    raise ValueError(
                        f"{path}:{lineno}: each message needs 'role' and 'content'"
                    ) from None
                prompts.append(Prompt(messages=msgs))
            else:
                raise ValueError(
                    f"{path}:{lineno}: expected a string, {{\"prompt\": ...}} or "
                    f"{{\"messages\": [...]}}"
                )
    if not prompts:
        raise ValueError(f"{path}: no prompts found")
    return prompts
