"""The operator's API: bearer-token check and request bodies (the routes are in :mod:`service.app`).

The token comes from ``MTRANK_ADMIN_TOKEN`` only and is compared in constant time
(:func:`hmac.compare_digest`); it is never logged or echoed. Without a token the admin routes do
not exist (404). A missing or malformed ``Authorization`` header is 401, a wrong token 403.
Model names and versions are validated before any path is built from them, so they cannot leave
the store (no ``..``, no separators, no leading dot; versions are integers).
"""

from __future__ import annotations

import hmac

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from service.routing import NAME_PATTERN, is_safe_name

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="mtrank-admin"'}


def check_bearer(authorization: str | None, token: SecretStr) -> None:
    """Raise 401 (no/malformed ``Authorization: Bearer <token>``) or 403 (wrong token)."""
    if authorization is None or not authorization.strip():
        raise HTTPException(401, "missing Authorization: Bearer <token> header", headers=_CHALLENGE)
    scheme, _, cred = authorization.strip().partition(" ")
    cred = cred.strip()
    if scheme.lower() != "bearer" or not cred or any(c.isspace() for c in cred):
        raise HTTPException(401, "malformed Authorization header: expected 'Bearer <token>'", headers=_CHALLENGE)
    if not hmac.compare_digest(cred.encode("utf-8"), token.get_secret_value().encode("utf-8")):
        raise HTTPException(403, "wrong admin token")


class ModelId(BaseModel):
    """One bundle version in the store: ``{"name": "demo", "version": 3}``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description=f"model name: {NAME_PATTERN}, no '..'")
    version: int = Field(ge=1, description="version number")

    @field_validator("name")
    @classmethod
    def _safe(cls, v: str) -> str:
        if not is_safe_name(v):
            raise ValueError(f"must be one plain name ({NAME_PATTERN}, no '..'): no path separators or dots first")
        return v

    @field_validator("version", mode="before")
    @classmethod
    def _int(cls, v):
        number = isinstance(v, int) or (isinstance(v, str) and v.isascii() and v.isdecimal())
        if isinstance(v, bool) or not number:
            raise ValueError("must be a version number")
        return v
