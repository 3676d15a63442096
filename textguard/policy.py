"""Output policies: the file format, its validation (file, line, reason), and the rules.

A policy file (YAML; JSON is YAML too) holds a list of rules:

    rules:
      - name: secrets              # reported in responses, logs and metrics
        terms: [password, 密码]     # blocked terms (case-insensitive)
        action: stop               # or redact (the default)
      - name: order-id
        pattern: 'ORD-\\d{6}'       # a regular expression (the `regex` module's syntax)
        tag: "[ORDER]"             # what replaces a match (default [REDACTED])
      - name: pii
        pii: all                   # or a list of: email, cn_id, card, phone

Each rule has exactly one of `terms`, `pattern`, `pii`. Optional keys: `action`, `tag`,
`ignore_case` (patterns), `max_chars` (the longest match of a pattern whose length has no
bound; default 256). Unknown keys are refused, so a typo never disables a rule. The full
description is in docs/security.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import regex
import yaml

from textguard.detectors import (
    DETECTORS,
    UNBOUNDED,
    Matcher,
    _sre_parse,
    terms_pattern,
)

ACTIONS = ("redact", "stop")
DEFAULT_TAG = "[REDACTED]"
DEFAULT_MAX_CHARS = 256  # hold-back cap of a pattern whose length has no bound
MAX_CHARS_LIMIT = 4096
MAX_RULES = 256
MAX_TERMS = 10_000
MAX_TERM_CHARS = 256
MAX_PATTERN_CHARS = 2000
ADAPTER_POLICY_FILE = "output_policy.yaml"  # beside an adapter's weights
MANIFEST_KEY = "output_policy"  # or inside its switchboard.json
_RULE_KEYS = {"name", "terms", "pattern", "pii", "action", "tag", "ignore_case", "max_chars"}
_NAME = regex.compile(r"[\w.:-]{1,64}")  # letters of any script, digits, _ . : -


class PolicyError(ValueError):
    """A policy that cannot be used: `file`, `line` (1-based; 0 when unknown), `reason`."""

    def __init__(self, file: str, line: int, reason: str) -> None:
        self.file, self.line, self.reason = file, line, reason
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True, eq=False)
class Rule:
    name: str
    action: str  # redact | stop
    matchers: tuple[Matcher, ...]
    source: str  # file:line, for messages


class Policy:
    """Rules in order. `a + b` applies both (the per-adapter rules add to the global
    ones). Immutable: a reload makes a new Policy, requests keep the one they started
    with."""

    def __init__(self, rules: Iterable[Rule] = (), source: str = "") -> None:
        self.rules = tuple(rules)
        self.source = source

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __add__(self, other: Policy | None) -> Policy:
        if not other:
            return self
        if not self:
            return other
        return Policy(self.rules + other.rules, f"{self.source} + {other.source}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.rules)

    def stream(self):
        """A PolicyStream for one response (None when the policy has no rules)."""
        from textguard.stream import PolicyStream

        return PolicyStream(self) if self.rules else None

    def apply(self, text: str) -> tuple[str, list[str], bool]:
        """A finished text through the policy -> (text, rule names hit, stopped)."""
        s = self.stream()
        if s is None:
            return text, [], False
        out, _ = s.push(text)
        tail, _ = s.finish()
        return out + tail, list(s.hits), s.stopped


# ---- parsing -----------------------------------------------------------------------

def load_policy(path: str | Path) -> Policy:
    """Read and check a policy file; PolicyError names the file, line and reason."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError(str(p), 0, f"cannot read the policy file ({e})") from e
    return parse_policy(text, str(p))


def parse_policy(text: str, source: str) -> Policy:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        reason = getattr(e, "problem", None) or str(e)
        raise PolicyError(source, mark.line + 1 if mark else 0, f"not valid YAML: {reason}") \
            from None
    if node is None:
        raise PolicyError(source, 1, "the policy is empty (expected a mapping with 'rules')")
    return _policy_from_node(node, source)


def policy_from_data(data: Any, source: str) -> Policy:
    """A policy already parsed (say from JSON) without line numbers."""
    return _policy_from_node(yaml.SafeDumper(None).represent_data(data), source, lines=False)


def load_adapter_policy(adapter_dir: str | Path, manifest_name: str = "switchboard.json"
                        ) -> Policy | None:
    """The per-adapter policy: `output_policy.yaml` beside the weights, or the
    `output_policy` key of the manifest; None when there is neither; PolicyError when it
    is malformed or both exist (one place only, so no one edits the wrong copy)."""
    d = Path(adapter_dir)
    beside = d / ADAPTER_POLICY_FILE
    manifest = d / manifest_name
    embedded = None
    if manifest.is_file():
        try:
            text = manifest.read_text(encoding="utf-8")
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            root = None  # the manifest's own reader reports an unreadable manifest
        if isinstance(root, yaml.MappingNode):
            embedded = next((v for k, v in root.value if k.value == MANIFEST_KEY), None)
    if beside.is_file() and embedded is not None:
        raise PolicyError(str(beside), 0, f"{manifest} also has '{MANIFEST_KEY}': keep the "
                          "adapter's policy in one place")
    if beside.is_file():
        return load_policy(beside)
    if embedded is not None:
        return _policy_from_node(embedded, f"{manifest} ({MANIFEST_KEY})")
    return None


def _line(node, lines: bool) -> int:
    return node.start_mark.line + 1 if lines and node.start_mark is not None else 0


def _plain(node) -> Any:
    loader = yaml.SafeLoader("")
    return loader.construct_object(node, deep=True)


def _policy_from_node(node, source: str, lines: bool = True) -> Policy:
    err = lambda n, reason: PolicyError(source, _line(n, lines), reason)  # noqa: E731
    if not isinstance(node, yaml.MappingNode):
        raise err(node, "the policy must be a mapping with a 'rules' list")
    rules_node = None
    for k, v in node.value:
        if k.value == "rules":
            rules_node = v
        elif k.value != "version":
            raise err(k, f"unknown key {k.value!r} (expected 'rules')")
    if rules_node is None:
        raise err(node, "the policy has no 'rules' list")
    if not isinstance(rules_node, yaml.SequenceNode):
        raise err(rules_node, "'rules' must be a list")
    if len(rules_node.value) > MAX_RULES:
        raise err(rules_node, f"{len(rules_node.value)} rules; the limit is {MAX_RULES}")
    rules: list[Rule] = []
    seen: dict[str, int] = {}
    for i, rn in enumerate(rules_node.value):
        rule = _rule(rn, i, source, lines)
        if rule.name in seen:
            raise err(rn, f"rules[{i}]: name {rule.name!r} is used twice (also rules"
                      f"[{seen[rule.name]}])")
        seen[rule.name] = i
        rules.append(rule)
    policy = Policy(rules, source)
    _check_tags(policy, rules_node, source, lines)
    return policy


def _rule(rn, i: int, source: str, lines: bool) -> Rule:
    where = f"rules[{i}]"
    if not isinstance(rn, yaml.MappingNode):
        raise PolicyError(source, _line(rn, lines), f"{where} must be a mapping")
    fields: dict[str, Any] = {}
    for k, v in rn.value:
        if k.value not in _RULE_KEYS:
            raise PolicyError(source, _line(k, lines), f"{where}: unknown key {k.value!r} "
                              f"(expected one of {', '.join(sorted(_RULE_KEYS))})")
        fields[k.value] = v
    line = lambda key: _line(fields.get(key, rn), lines)  # noqa: E731

    def fail(key: str, reason: str) -> PolicyError:
        return PolicyError(source, line(key), f"{where}: {reason}")

    def value(key: str, default=None):
        if key not in fields:
            return default
        n = fields[key]
        if isinstance(n, yaml.ScalarNode):
            return _plain(n)
        if isinstance(n, yaml.SequenceNode):
            return _plain(n)
        raise fail(key, f"{key} must be a value or a list")

    name = value("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise fail("name", "name is missing or not 1-64 letters, digits or _ . : -")
    where = f"rules[{i}] ({name})"
    kinds = [k for k in ("terms", "pattern", "pii") if k in fields]
    if len(kinds) != 1:
        raise fail("name", "a rule needs exactly one of terms, pattern, pii (found "
                   f"{', '.join(kinds) or 'none'})")
    action = value("action", "redact")
    if action not in ACTIONS:
        raise fail("action", f"action {action!r} is not one of {', '.join(ACTIONS)}")
    tag = value("tag")
    if tag is not None and (not isinstance(tag, str) or not 0 < len(tag) <= 64):
        raise fail("tag", "tag must be a string of 1-64 characters")
    ignore_case = value("ignore_case", False)
    if not isinstance(ignore_case, bool):
        raise fail("ignore_case", "ignore_case must be true or false")
    max_chars = value("max_chars", 0)
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or \
            not 0 <= max_chars <= MAX_CHARS_LIMIT:
        raise fail("max_chars", f"max_chars must be an integer in [1, {MAX_CHARS_LIMIT}]")
    kind = kinds[0]
    src = f"{source}:{line(kind)}" if line(kind) else source
    if kind == "terms":
        terms = value("terms")
        terms = [terms] if isinstance(terms, str) else terms
        if not isinstance(terms, list) or not terms or \
                not all(isinstance(t, str) and t.strip() for t in terms):
            raise fail("terms", "terms must be a non-empty list of non-empty strings")
        if len(terms) > MAX_TERMS:
            raise fail("terms", f"{len(terms)} terms; the limit is {MAX_TERMS}")
        long = next((t for t in terms if len(t) > MAX_TERM_CHARS), None)
        if long is not None:
            raise fail("terms", f"term {long[:20]!r}... has {len(long)} characters; the "
                       f"limit is {MAX_TERM_CHARS}")
        m = Matcher(terms_pattern(terms), tag=tag or DEFAULT_TAG, ignore_case=True,
                    label=name)
        return Rule(name, action, (m,), src)
    if kind == "pattern":
        pattern = value("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise fail("pattern", "pattern must be a non-empty string")
        if len(pattern) > MAX_PATTERN_CHARS:
            raise fail("pattern", f"pattern has {len(pattern)} characters; the limit is "
                       f"{MAX_PATTERN_CHARS}")
        try:
            m = Matcher(pattern, tag=tag or DEFAULT_TAG, ignore_case=ignore_case, label=name,
                        max_chars=max_chars)
        except regex.error as e:
            raise fail("pattern", f"pattern {pattern!r} is not a valid regular expression "
                       f"({e})") from None
        if _min_width(pattern, m) == 0:
            raise fail("pattern", f"pattern {pattern!r} can match the empty string")
        if m.width >= UNBOUNDED and not max_chars:
            m.max_chars = DEFAULT_MAX_CHARS
        return Rule(name, action, (m,), src)
    pii = value("pii")
    names = list(DETECTORS) if pii == "all" else [pii] if isinstance(pii, str) else pii
    if not isinstance(names, list) or not names or \
            any(n not in DETECTORS for n in names):
        raise fail("pii", f"pii {pii!r}: expected 'all' or a list of "
                   f"{', '.join(DETECTORS)}")
    ordered = [n for n in DETECTORS if n in names]  # the detectors' own order
    return Rule(name, action, tuple(DETECTORS[n].matcher(tag) for n in ordered), src)


def _min_width(pattern: str, m: Matcher) -> int:
    try:
        return int(_sre_parse.parse(pattern, 0).getwidth()[0])
    except Exception:
        return 0 if m.search.fullmatch("") is not None else 1


def _check_tags(policy: Policy, rules_node, source: str, lines: bool) -> None:
    """A replacement must not itself be a match: then the text a client receives could
    contain one (a tag `[PHONE]` and a blocked term `phone`)."""
    for i, rule in enumerate(policy.rules):
        for m in rule.matchers:
            if rule.action != "redact":
                continue
            for other in policy.rules:
                if any(o.search.search(m.tag) for o in other.matchers):
                    raise PolicyError(source, _line(rules_node.value[i], lines),
                                      f"rules[{i}] ({rule.name}): its tag {m.tag!r} is itself "
                                      f"matched by rule {other.name!r}; choose another tag")
