"""Open the configured policy engine: in-process regopy, or an OPA server when a URL is given."""

from __future__ import annotations

from pathlib import Path

from fincluster.trust.opa_backend import OpaEngine
from fincluster.trust.policy import PolicyBundle, PolicyEngine
from fincluster.trust.regopy_backend import RegopyEngine

__all__ = ["open_policy_engine"]


def open_policy_engine(
    policy_dir: Path,
    *,
    data_file: Path | None = None,
    opa_url: str | None = None,
    opa_timeout_s: float = 1.5,
    opa_ca_file: Path | None = None,
) -> PolicyEngine:
    """Load the bundle from ``policy_dir`` and start its engine; raises PolicyError if it cannot."""
    bundle = PolicyBundle.load(policy_dir, data_file=data_file)
    if opa_url is None:
        return RegopyEngine(bundle)
    return OpaEngine(bundle, url=opa_url, timeout_s=opa_timeout_s, ca_file=opa_ca_file)
