"""API keys from a file of hashed keys, reloaded when the file changes.

The file (YAML or JSON) lists keys by a hash, never in plain text:

    keys:
      - name: tenant-a                 # shown in logs and errors, never the key itself
        hash: sha256:<64 hex digits>   # or scrypt:<n>:<r>:<p>:<salt hex>:<hash hex>
        adapters: ["tenant-a", "tenant-a-*"]   # glob patterns over adapter_id
        base_model: true               # may call with an empty adapter_id (default true)
        admin: false                   # may call AdapterAdmin (default false)
        max_concurrent: 8              # optional; default --max-concurrent-per-key

`python -m server.security.keys new --name tenant-a --adapter 'tenant-a*'` makes a random
key and prints it once with the entry to paste into the file.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

_SCRYPT_DEFAULT = (1 << 14, 8, 1)
_FIELDS = {"name", "hash", "adapters", "base_model", "admin", "max_concurrent"}


class KeysFileError(Exception):
    """A keys file that cannot be used; the message names the file, entry and field."""


@dataclass(frozen=True)
class ApiKey:
    name: str
    hash: str
    adapters: tuple[str, ...] = ()
    base_model: bool = True
    admin: bool = False
    max_concurrent: int | None = None

    def allows(self, adapter_id: str) -> bool:
        """Whether this key may generate with `adapter_id` ("" = the base model)."""
        if not adapter_id:
            return self.base_model
        return any(fnmatch.fnmatchcase(adapter_id, p) for p in self.adapters)


def hash_key(key: str, scheme: str = "sha256") -> str:
    """The string stored in the keys file for `key`."""
    if scheme == "sha256":
        return "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    if scheme == "scrypt":
        n, r, p = _SCRYPT_DEFAULT
        salt = secrets.token_bytes(16)
        digest = hashlib.scrypt(key.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
        return f"scrypt:{n}:{r}:{p}:{salt.hex()}:{digest.hex()}"
    raise ValueError(f"hash scheme {scheme!r} is not one of sha256, scrypt")


def _check_hash(where: str, stored: str) -> None:
    scheme, _, rest = stored.partition(":")
    if scheme == "sha256":
        if len(rest) != 64 or any(c not in "0123456789abcdef" for c in rest.lower()):
            raise KeysFileError(f"{where}: hash 'sha256:' needs 64 hex digits")
    elif scheme == "scrypt":
        parts = rest.split(":")
        try:
            n, r, p = (int(x) for x in parts[:3])
            bytes.fromhex(parts[3]), bytes.fromhex(parts[4])
        except (ValueError, IndexError):
            raise KeysFileError(
                f"{where}: hash 'scrypt:' needs n:r:p:salt-hex:hash-hex") from None
        if len(parts) != 5 or n < 2 or n & (n - 1) or r < 1 or p < 1:
            raise KeysFileError(f"{where}: hash 'scrypt:' needs n:r:p:salt-hex:hash-hex")
    else:
        raise KeysFileError(f"{where}: hash scheme {scheme!r} is not one of sha256, scrypt "
                            "(plain-text keys are not accepted)")


def _scrypt_matches(stored: str, key: str) -> bool:
    _, n, r, p, salt, digest = stored.split(":")
    want = bytes.fromhex(digest)
    got = hashlib.scrypt(key.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r),
                         p=int(p), dklen=len(want), maxmem=256 << 20)
    return hmac.compare_digest(got, want)


def parse_keys(text: str, source: str = "keys file") -> list[ApiKey]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise KeysFileError(f"{source}: not valid YAML/JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise KeysFileError(f"{source}: expected a mapping with a list 'keys'")
    out, names = [], set()
    for i, item in enumerate(data["keys"]):
        where = f"{source}: keys[{i}]"
        if not isinstance(item, dict):
            raise KeysFileError(f"{where}: expected a mapping")
        unknown = sorted(set(item) - _FIELDS)
        if unknown:
            raise KeysFileError(f"{where}: unknown field(s) {', '.join(unknown)}")
        name, stored = item.get("name"), item.get("hash")
        if not isinstance(name, str) or not name:
            raise KeysFileError(f"{where}: 'name' must be a non-empty string")
        if name in names:
            raise KeysFileError(f"{where}: name {name!r} is used twice")
        names.add(name)
        if not isinstance(stored, str):
            raise KeysFileError(f"{where}: 'hash' must be a string")
        _check_hash(where, stored)
        adapters = item.get("adapters", [])
        if isinstance(adapters, str):
            adapters = [adapters]
        if not isinstance(adapters, list) or not all(isinstance(a, str) for a in adapters):
            raise KeysFileError(f"{where}: 'adapters' must be a list of glob patterns")
        limit = item.get("max_concurrent")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise KeysFileError(f"{where}: 'max_concurrent' must be an integer >= 1")
        for flag in ("base_model", "admin"):
            if not isinstance(item.get(flag, False), bool):
                raise KeysFileError(f"{where}: {flag!r} must be true or false")
        out.append(ApiKey(name, stored.lower() if stored.startswith("sha256:") else stored,
                          tuple(adapters), item.get("base_model", True),
                          item.get("admin", False), limit))
    return out


class KeyStore:
    """Looks up presented keys; re-reads the file when its size, mtime or inode changes
    (checked at most every `check_interval` seconds). A file that fails to parse (for
    example half-written) is logged and the previous keys stay in force."""

    def __init__(self, path: Path, check_interval: float = 1.0) -> None:
        self.path = Path(path)
        self.check_interval = check_interval
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._by_sha: dict[str, ApiKey] = {}
        self._scrypt: list[ApiKey] = []
        self._cache: dict[str, ApiKey] = {}  # sha256(key) -> scrypt key, positive hits only
        stamp = self._stat()
        if stamp is None:
            raise KeysFileError(f"{self.path}: cannot read the keys file")
        self._load(stamp)

    @property
    def keys(self) -> list[ApiKey]:
        with self._lock:
            return [*self._by_sha.values(), *self._scrypt]

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self, stamp: tuple[int, int, int]) -> None:
        try:
            text = self.path.read_text()
        except OSError as e:
            raise KeysFileError(f"{self.path}: {e}") from None
        keys = parse_keys(text, str(self.path))
        self._by_sha = {k.hash.removeprefix("sha256:"): k for k in keys
                        if k.hash.startswith("sha256:")}
        self._scrypt = [k for k in keys if k.hash.startswith("scrypt:")]
        self._cache = {}
        self._stamp = stamp
        log.info("api keys: %d loaded from %s", len(keys), self.path)

    def maybe_reload(self, force: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            if not force and now - self._checked < self.check_interval:
                return
            self._checked = now
            stamp = self._stat()
            if stamp is None or stamp == self._stamp:
                if stamp is None:
                    log.error("api keys: %s is missing; keeping the loaded keys", self.path)
                return
            try:
                self._load(stamp)
            except KeysFileError as e:
                self._stamp = stamp  # do not retry until the file changes again
                log.error("api keys: not reloaded, keeping the loaded keys: %s", e)

    def authenticate(self, key: str) -> ApiKey | None:
        self.maybe_reload()
        digest = hashlib.sha256(key.encode()).hexdigest()
        with self._lock:
            found = self._by_sha.get(digest) or self._cache.get(digest)
            scrypt = list(self._scrypt) if found is None else []
        for candidate in scrypt:
            if _scrypt_matches(candidate.hash, key):
                with self._lock:
                    if len(self._cache) < 4096:
                        self._cache[digest] = candidate
                return candidate
        return found


def _main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m server.security.keys",
                                description="make an API key and its keys-file entry")
    sub = p.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new", help="a random key, printed once, with its entry")
    new.add_argument("--name", required=True)
    new.add_argument("--adapter", action="append", default=[], help="glob; repeatable")
    new.add_argument("--no-base-model", action="store_true")
    new.add_argument("--admin", action="store_true")
    new.add_argument("--max-concurrent", type=int)
    new.add_argument("--scheme", choices=["sha256", "scrypt"], default="sha256")
    h = sub.add_parser("hash", help="hash a key read from stdin")
    h.add_argument("--scheme", choices=["sha256", "scrypt"], default="sha256")
    a = p.parse_args(argv)
    if a.command == "hash":
        print(hash_key(input().strip(), a.scheme))
        return
    key = "sb-" + secrets.token_urlsafe(32)
    entry = {"name": a.name, "hash": hash_key(key, a.scheme), "adapters": a.adapter,
             "base_model": not a.no_base_model, "admin": a.admin}
    if a.max_concurrent:
        entry["max_concurrent"] = a.max_concurrent
    print(f"# key (shown once): {key}")
    print(yaml.safe_dump({"keys": [entry]}, sort_keys=False).rstrip())


if __name__ == "__main__":
    _main()
