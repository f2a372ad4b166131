"""API keys: where they come from, how a presented key is checked, and where a server without
keys may listen.

Keys are read from a file (one a line, `#` comments) and/or the `DETRKIT_API_KEYS` variable
(comma or whitespace separated). Only their SHA-256 digests are kept; a presented key is
hashed and compared with every digest by `hmac.compare_digest`, all of them every time, so
the time taken says nothing about which key, or how much of one, matched. Keys are never
logged; a key is named in logs and metrics by `key_id` (the first 8 hex digits of its digest).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import stat
from collections.abc import Iterable

__all__ = [
    "ENV_VAR",
    "ApiKeyChecker",
    "AuthConfigError",
    "check_bind_address",
    "is_loopback_host",
    "load_api_keys",
]

ENV_VAR = "DETRKIT_API_KEYS"
logger = logging.getLogger(__name__)


class AuthConfigError(ValueError):
    """The server's key set-up is unusable or unsafe; the message says what to change."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def _check_key(key: str, where: str) -> str:
    if any(c.isspace() for c in key) or not key.isprintable():
        raise AuthConfigError(
            f"{where}: an API key contains whitespace or unprintable characters; a key is one "
            "printable token, e.g. one made by Python's secrets.token_urlsafe(32)"
        )
    return key


def load_api_keys(key_file: str | None = None, environ: dict[str, str] | None = None) -> list[str]:
    """The keys of `key_file` (one a line; blank lines and `#` comments skipped) plus those of
    `$DETRKIT_API_KEYS` (comma or whitespace separated), duplicates removed."""
    environ = os.environ if environ is None else environ
    keys: list[str] = []
    if key_file:
        try:
            with open(key_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise AuthConfigError(
                f"--api-key-file {key_file}: cannot be read ({e.strerror or e})"
            ) from None
        except UnicodeDecodeError:
            raise AuthConfigError(
                f"--api-key-file {key_file}: not UTF-8 text; expected one key a line"
            ) from None
        file_keys = [line.strip() for line in lines]
        file_keys = [k for k in file_keys if k and not k.startswith("#")]
        if not file_keys:
            raise AuthConfigError(
                f"--api-key-file {key_file}: holds no key; expected one key a line"
            )
        keys += [_check_key(k, f"--api-key-file {key_file}") for k in file_keys]
        mode = os.stat(key_file).st_mode
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            logger.warning(
                "API key file %s is readable by other users; consider `chmod 600 %s`",
                key_file,
                key_file,
            )
    env_value = environ.get(ENV_VAR, "")
    env_keys = [k for k in env_value.replace(",", " ").split() if k]
    keys += [_check_key(k, f"${ENV_VAR}") for k in env_keys]
    return list(dict.fromkeys(keys))


class ApiKeyChecker:
    """Checks `Authorization: Bearer <key>` values against a fixed set of keys."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(k) for k in keys]
        if not self._digests:
            raise AuthConfigError("ApiKeyChecker needs at least one key")

    def __len__(self) -> int:
        return len(self._digests)

    def check(self, presented: str | None) -> str | None:
        """The key id of `presented` when it is one of the keys, else None. Compares against
        every key in constant time per key."""
        if not presented:
            return None
        digest = _digest(presented)
        matched = False
        for known in self._digests:
            matched |= hmac.compare_digest(digest, known)  # no short circuit
        return digest.hex()[:8] if matched else None


def is_loopback_host(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind_address(
    host: str, have_keys: bool, allow_anonymous: bool, insecure_bind: bool
) -> None:
    """Refuse set-ups that would let someone without a key in: no keys and no
    `--allow-anonymous`; anonymous access on a non-loopback host without `--insecure-bind`;
    keys and `--allow-anonymous` together (it would be unclear whether keys are required)."""
    if have_keys and allow_anonymous:
        raise AuthConfigError(
            f"API keys are configured (--api-key-file or ${ENV_VAR}) and --allow-anonymous is "
            "given; use one: keys to require them, --allow-anonymous (and no keys) to serve "
            "without authentication"
        )
    if have_keys:
        return
    if not allow_anonymous:
        raise AuthConfigError(
            f"no API key: pass --api-key-file FILE (one key a line) or set ${ENV_VAR}; to serve "
            "without authentication on this machine only, pass --allow-anonymous"
        )
    if not is_loopback_host(host) and not insecure_bind:
        raise AuthConfigError(
            f"--allow-anonymous serves without authentication, so it only listens on a loopback "
            f"host (127.0.0.1, ::1, localhost), not --host {host}; add --insecure-bind to "
            "accept anyone who can reach this address"
        )
