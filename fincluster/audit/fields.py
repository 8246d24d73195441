"""Typed field values of audit events and checkpoints (shared ids and digests: ``fincluster.values``).

Every string field has a pattern and a length bound. That is the redaction rule of the audit log:
there is no field that could hold a prompt, token ids or activations, and the identifier fields cannot
hold free text either. Only the short reason fields take prose, and they are fed from policy and trust
decisions, never from user input.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime, Field, PlainSerializer

HexSignature = Annotated[str, Field(pattern=r"^(?:[0-9a-f]{2}){32,160}$")]
"""An Ed25519 or DER-encoded ECDSA signature as lowercase hex."""

CertFingerprint = Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]
"""``sha256:<hex>`` of a certificate's DER bytes (``fincluster.trust.pki.certificate_fingerprint``)."""

Label = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
"""A lowercase label such as a data classification (``confidential``) or a trust tier (``trusted``)."""

ReasonText = Annotated[str, Field(min_length=1, max_length=512, pattern=r"^[^\x00-\x1f\x7f]+$")]
"""A short, single-line reason from the policy or trust layer."""


def _as_utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


def format_utc(value: datetime) -> str:
    # One fixed textual form (microseconds, "Z"), so the canonical bytes of a record never depend on
    # how the caller's datetime happened to be built.
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


UtcTime = Annotated[
    AwareDatetime,
    AfterValidator(_as_utc),
    PlainSerializer(format_utc, return_type=str, when_used="json"),
]
"""A timezone-aware instant, stored in UTC as ``YYYY-MM-DDTHH:MM:SS.ffffffZ``."""
