"""Who sends a command over HTTP: a bearer token from ``STREAMFOLD_API_TOKENS``.

The caller's user id goes into the command's envelope (and so into every event's
metadata); it never comes from the body. Tokens are compared in constant time:
every configured token's SHA-256 digest is compared with the presented one's, with
no early exit, so the time taken tells neither which token nor how much matched.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from app.settings import ApiToken

REALM = "streamfold"


class Unauthorized(Exception):
    """No credential, or a wrong one: 401, with ``challenge`` as the
    ``WWW-Authenticate`` header (RFC 6750)."""

    def __init__(self, message: str, *, invalid: bool) -> None:
        super().__init__(message)
        self.message = message
        error = ', error="invalid_token"' if invalid else ""
        self.challenge = f'Bearer realm="{REALM}"{error}'


class Credentials:
    """The configured tokens, kept as digests, and the user id each stands for."""

    def __init__(self, tokens: Sequence[ApiToken]) -> None:
        self._digests = [(_digest(t.token), t.user_id) for t in tokens]

    @property
    def enabled(self) -> bool:
        """False when no token is configured: then nobody can send commands."""
        return bool(self._digests)

    def user_id(self, authorization: str | None) -> str:
        """The user id of the token in an ``Authorization: Bearer <token>`` header
        value; raises ``Unauthorized`` saying what was wrong."""
        if authorization is None or not authorization.strip():
            raise Unauthorized(
                "this route needs a caller: send Authorization: Bearer <token>",
                invalid=False,
            )
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or " " in token:
            raise Unauthorized(
                "the Authorization header must be 'Bearer <token>'", invalid=True
            )
        presented = _digest(token)
        found = None
        for digest, user_id in self._digests:
            # Every digest is compared, found or not: no early exit.
            if hmac.compare_digest(digest, presented) and found is None:
                found = user_id
        if found is None:
            raise Unauthorized("the bearer token is not valid", invalid=True)
        return found


def _digest(token: str) -> bytes:
    # A header's bytes that are not UTF-8 come as surrogate escapes: digested as
    # they came (a configured token is text, so such a token matches none).
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
