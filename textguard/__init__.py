"""Text detectors and output policies shared by the trainer's data cleaning and the server's
output filter: blocked terms (whole-word for space-delimited scripts, substring for CJK),
personal data (e-mail, card numbers with the Luhn check, phone numbers including mainland
mobile and landline formats, mainland resident ID numbers with their check digit), policy
files, and a streaming matcher that releases text only once no match can still cover it.

Pure Python (`regex`, `pyyaml`): no torch, no server or trainer imports. Format and
guarantees: docs/security.md, "Output policies".
"""

from textguard.detectors import (
    DETECTORS,
    Blocklist,
    Detector,
    cn_id_ok,
    find_pii,
    luhn_ok,
    redact,
)
from textguard.policy import Policy, PolicyError, Rule, load_policy, parse_policy, policy_from_data
from textguard.stream import PolicyStream

__all__ = [
    "DETECTORS", "Blocklist", "Detector", "Policy", "PolicyError", "PolicyStream", "Rule",
    "cn_id_ok", "find_pii", "load_policy", "luhn_ok", "parse_policy", "policy_from_data",
    "redact",
]
