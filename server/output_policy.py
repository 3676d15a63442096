"""The server's output policies: the global one (`--output-policy FILE`, reloaded on SIGHUP)
and the per-adapter ones (read with the adapter by the registry), combined per request.

A request takes the policy in force when it is submitted (global rules, then its adapter
version's rules) for its whole life: a reload or a hot swap applies to new requests only.
A file that fails to load leaves the previous policy in force. Format, matching and
guarantees: textguard and docs/security.md.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from textguard import Policy, PolicyError, load_policy
from textguard.stream import PolicyStream

log = logging.getLogger(__name__)


class OutputPolicies:
    def __init__(self, path: Path | None = None) -> None:
        """Raises PolicyError (file, line, reason) when `path` is malformed."""
        self.path = path
        self._lock = threading.Lock()
        self._global = load_policy(path) if path is not None else Policy()

    @property
    def current(self) -> Policy:
        with self._lock:
            return self._global

    def reload(self) -> Policy:
        """Read the global file again; PolicyError, and the previous policy stays, when it
        is malformed."""
        if self.path is None:
            return self.current
        policy = load_policy(self.path)
        with self._lock:
            self._global = policy
        return policy

    def stream_for(self, adapter_policy: Policy | None) -> PolicyStream | None:
        """A matcher for one response (None: nothing to apply)."""
        return (self.current + adapter_policy).stream()


def describe(policy: Policy) -> str:
    """For start-up and reload lines: rule names and actions, never the terms."""
    if not policy:
        return "no rules"
    return ", ".join(f"{r.name} ({r.action})" for r in policy.rules)


__all__ = ["OutputPolicies", "PolicyError", "describe"]
