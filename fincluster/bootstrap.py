"""Building a node's runtime objects from settings: what the entry points (CLI, demo) call.

This is the one place where settings turn into trust machinery, so the layers below never import
``fincluster.settings``: they are handed a :class:`~fincluster.trust.enforcement.TrustContext`.
"""

from __future__ import annotations

from fincluster.errors import ConfigurationError
from fincluster.settings import TrustSettings
from fincluster.trust.attestation import AuthorityKeys
from fincluster.trust.clearances import Clearances, parse_clearances
from fincluster.trust.enforcement import TrustContext
from fincluster.trust.pki import Credential, RevocationList, load_certificate
from fincluster.trust.verifiers import SignedSoftwareVerifier, VerifierSet


def trust_from_settings(settings: TrustSettings, credential: Credential) -> TrustContext:
    """The trust context of a node with ``credential``; without ``policy_dir``, public data only."""
    ca_pem, _, _ = credential.read()
    ca_certificate = load_certificate(ca_pem)
    revocations = RevocationList(settings.crl, ca_certificate) if settings.crl is not None else None
    if settings.policy_dir is None:
        if settings.attestation is not None or settings.authority_keys:
            raise ConfigurationError(
                "attestation settings need trust.policy_dir: policy decides who is trusted"
            )
        return TrustContext.public_only(ca_certificate, revocations=revocations)
    from fincluster.trust.policy_engine import open_policy_engine

    policy = open_policy_engine(
        settings.policy_dir,
        data_file=settings.policy_data,
        opa_url=settings.opa_url,
        opa_timeout_s=settings.opa_timeout_seconds,
        opa_ca_file=settings.opa_ca_file,
    )
    verifiers = VerifierSet(
        [SignedSoftwareVerifier(AuthorityKeys.from_files(settings.authority_keys))]
        if settings.authority_keys
        else []
    )
    clearances = Clearances(
        parse_clearances(settings.clearances, source="trust.clearances"), settings.clearances_file
    )
    return TrustContext(
        ca_certificate=ca_certificate,
        policy=policy,
        verifiers=verifiers,
        revocations=revocations,
        clearances=clearances,
    )
