"""Settings: one pydantic-settings tree, read only at the entry points (CLI, demo).

Sources, highest priority first: keyword arguments, ``FINCLUSTER_*`` environment variables (nested
with ``__``, e.g. ``FINCLUSTER_SERVER__PORT=7000``), a TOML file (``FINCLUSTER_CONFIG`` or ``--config``),
defaults. Below the entry points settings travel as objects.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from fincluster.audit.log import AuditSettings
from fincluster.errors import ConfigurationError
from fincluster.spans import BlockSpan
from fincluster.trust.pki import Credential
from fincluster.values import Quantization, StepStrategy, TensorDType


class LogFormat(enum.StrEnum):
    CONSOLE = "console"
    JSON = "json"


class TLSSettings(BaseModel):
    """Paths of this node's mTLS material (issued by ``fincluster certs``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ca_cert: Path
    cert: Path
    key: Path

    def credential(self) -> Credential:
        return Credential.from_files(cert_path=self.cert, key_path=self.key, ca_cert_path=self.ca_cert)


class TrustSettings(BaseModel):
    """Policy, attestation and revocation. Without ``policy_dir`` a node handles public data only."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    policy_dir: Path | None = Field(default=None, description="directory of Rego policies (policies/)")
    policy_data: Path | None = Field(
        default=None, description="policy data JSON; default policy_dir/data.json"
    )
    opa_url: str | None = Field(default=None, description="evaluate on this OPA server instead of in-process")
    opa_timeout_seconds: float = Field(default=1.5, gt=0)
    opa_ca_file: Path | None = Field(
        default=None, description="CA certificate that signs the OPA server's TLS certificate (https URLs)"
    )
    authority_keys: list[Path] = Field(default_factory=list, description="attestation authority public keys")
    attestation: Path | None = Field(default=None, description="this server's attestation token file")
    crl: Path | None = Field(default=None, description="the swarm CA's revocation list (crl.pem)")
    clearances: dict[str, str] = Field(
        default_factory=dict, description="client SPIFFE id -> highest classification it may send"
    )
    clearances_file: Path | None = Field(
        default=None,
        description="shared JSON/TOML file of client SPIFFE id -> classification, re-read when it changes",
    )
    adapter_keys: list[Path] = Field(
        default_factory=list,
        description="adapter-signing public keys: a server applies only LoRA adapters one of them signed",
    )


class DepartmentQuota(BaseModel):
    """What one department may use of one server."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    session_share: float = Field(default=1.0, gt=0, le=1, description="share of the server's streams")
    tokens_per_minute: int | None = Field(default=None, gt=0, description="tokens computed per minute")
    weight: float = Field(default=1.0, gt=0, description="share of the compute worker when it is busy")


class ServerSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    store: Path | None = Field(default=None, description="model store directory")
    blocks: BlockSpan | Literal["auto"] | None = Field(
        default=None,
        description='block span START:END this server hosts, or "auto": chosen where the swarm needs it',
    )
    num_blocks: int | None = Field(
        default=None, gt=0, description="with --blocks auto: how many blocks (none: as many as memory holds)"
    )
    memory_budget_bytes: int | None = Field(
        default=None,
        gt=0,
        description="with --blocks auto: bytes for weights + KV cache (none: the device's free memory)",
    )
    throughput: float | None = Field(
        default=None,
        gt=0,
        description="blocks/s announced for routing and placement (none: measured at start and after moves)",
    )
    rebalance_seconds: float = Field(
        default=60.0, gt=0, description="with --blocks auto: how often to check whether moving would help"
    )
    rebalance_min_gain: float = Field(
        default=0.25,
        ge=0,
        description="with --blocks auto: move only if the weakest block's throughput gains this fraction",
    )
    host: str = Field(default="127.0.0.1", description="address to bind (0.0.0.0: every interface)")
    port: int = Field(default=0, ge=0, le=65535, description="port to bind; 0 picks a free port")
    public_address: str | None = Field(
        default=None,
        description="HOST:PORT announced to the registry, a SAN of the certificate (none: host:port)",
    )
    dtype: TensorDType = TensorDType.FLOAT32
    device: str = "cpu"
    step_strategy: StepStrategy = Field(
        default=StepStrategy.AUTO,
        description="inference steps: auto (graphs on CUDA, else eager), eager, static (KV pool, batched "
        "decode), graphs (static + CUDA graphs); static and graphs preallocate cache_budget_bytes",
    )
    quant: Quantization = Field(
        default=Quantization.NONE,
        description="weights: none, int8 (LLM.int8, outliers in 16 bits) or nf4 (bitsandbytes)",
    )
    max_batch_size: int = Field(
        default=32, gt=0, description="one-token steps of concurrent sessions run together, at most"
    )
    cache_budget_bytes: int = Field(default=512 * 2**20, gt=0)
    cache_wait_seconds: float = Field(default=1.0, ge=0, description="bounded wait for cache space at open")
    max_session_length: int = Field(default=4096, gt=0)
    session_idle_timeout_seconds: float = Field(default=300.0, gt=0)
    max_message_bytes: int = Field(default=64 * 2**20, gt=0)
    max_streams: int = Field(default=256, gt=0, description="inference streams open at once, all clients")
    max_streams_per_client: int = Field(
        default=8, gt=0, description="inference streams open at once, one client"
    )
    max_calls_per_client: int = Field(default=8, gt=0, description="unary calls one client runs at once")
    first_message_seconds: float = Field(
        default=10.0, gt=0, description="a new stream must open a session within"
    )
    departments: dict[str, str] = Field(default_factory=dict, description="client SPIFFE id -> department")
    quotas: dict[str, DepartmentQuota] = Field(
        default_factory=dict, description="department -> its share of this server's streams, tokens, compute"
    )
    announce_ttl_seconds: int = Field(default=15, gt=0)
    adapter_store: str | None = Field(
        default=None,
        description="adapter store (a directory or an fsspec URL) the LoRA adapters requests name come from",
    )
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="HTTP port of Prometheus /metrics (none: off; 0: any free port); counts and timings only",
    )
    metrics_host: str = Field(default="127.0.0.1", description="address the /metrics endpoint binds")

    @field_validator("blocks", mode="before")
    @classmethod
    def _parse_blocks(cls, value: object) -> object:
        return BlockSpan.parse(value) if isinstance(value, str) and value != "auto" else value


class ClientSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    request_timeout_seconds: float = Field(default=60.0, gt=0, description="deadline of one unary call")
    step_timeout_seconds: float = Field(
        default=30.0, gt=0, description="a hop that does not answer a session step within this fails over"
    )
    max_message_bytes: int = Field(default=64 * 2**20, gt=0)
    failover_attempts: int = Field(default=3, ge=0, description="replacements tried per failed hop")
    failover_backoff_seconds: float = Field(default=0.2, ge=0, description="first wait between attempts")
    failover_backoff_max_seconds: float = Field(default=2.0, ge=0)
    ban_seconds: float = Field(
        default=10.0, gt=0, description="a failed node is not routed to for this long (doubling on repeats)"
    )
    rtt_refresh_seconds: float = Field(default=30.0, gt=0, description="round trips are measured again after")
    quarantine_seconds: float = Field(
        default=3600.0,
        gt=0,
        description="a node whose output verification found wrong is not routed to for this long",
    )
    max_batch_tokens: int = Field(
        default=8192,
        gt=0,
        description="a stateless pass (training, scoring) over more tokens (batch x sequence, deep prompts "
        "included) is split into micro-batches of at most this many",
    )

    store: Path | None = Field(default=None, description="model store with the client part (generate)")


class RegistryBackend(enum.StrEnum):
    MEMORY = "memory"
    ETCD = "etcd"


class EtcdSettings(BaseModel):
    """The etcd cluster behind the registry service; only that service holds these credentials."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    endpoints: list[str] = Field(min_length=1, description="host:port of each etcd member")
    prefix: str = "/fincluster/registry/"
    ca_cert: Path = Field(description="CA that issued the etcd members' certificates")
    cert: Path = Field(description="the registry service's etcd client certificate (CN = etcd user)")
    key: Path
    timeout_seconds: float = Field(default=2.0, gt=0, description="deadline of each etcd call")


class RegistrySettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    address: str | None = Field(
        default=None, description="HOST:PORT of the registry, for servers and clients"
    )
    host: str = Field(
        default="127.0.0.1", description="address the registry binds (0.0.0.0: every interface)"
    )
    port: int = Field(default=0, ge=0, le=65535, description="port the registry binds; 0 picks a free port")
    public_address: str | None = Field(
        default=None, description="HOST:PORT that servers and clients dial (checked against its certificate)"
    )
    backend: RegistryBackend = RegistryBackend.MEMORY
    etcd: EtcdSettings | None = None


class LoggingSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format: LogFormat = LogFormat.CONSOLE
    level: str = "info"


class Settings(BaseSettings):
    """Root of the settings tree."""

    model_config = SettingsConfigDict(env_prefix="FINCLUSTER_", env_nested_delimiter="__", extra="forbid")

    tls: TLSSettings | None = None
    trust: TrustSettings = TrustSettings()
    server: ServerSettings = ServerSettings()
    client: ClientSettings = ClientSettings()
    registry: RegistrySettings = RegistrySettings()
    logging: LoggingSettings = LoggingSettings()
    audit: AuditSettings = AuditSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # the TOML file is the one named by model_config["toml_file"] (see load_settings), if any
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build settings at an entry point: ``overrides`` > ``FINCLUSTER_*`` environment > the TOML file
    (``config_file``, else ``$FINCLUSTER_CONFIG``) > defaults. Changes no global state."""
    from_env = os.environ.get("FINCLUSTER_CONFIG")
    path = config_file if config_file is not None else Path(from_env) if from_env else None
    if path is None:
        return Settings(**overrides)
    if not path.is_file():
        raise ConfigurationError(f"config file {path} does not exist")

    class FileSettings(Settings):
        model_config = SettingsConfigDict(**{**Settings.model_config, "toml_file": path})

    return FileSettings(**overrides)
