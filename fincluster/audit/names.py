"""Names people read in reports: a node's short name beside its SPIFFE id, a client's department.

Departments come from the policy data every node already shares (``policies/data.json``), under
``fincluster.departments``: ``{"spiffe://bank.example/client/alice": "treasury", ...}``. The same
mapping can serve quotas; a client not listed is reported under :data:`UNASSIGNED`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from fincluster.errors import ConfigurationError

UNASSIGNED = "(no department)"


def node_name(spiffe_id: str) -> str:
    """``spiffe://bank.example/server/gpu-a`` reads as ``server gpu-a``; anything else as given."""
    parts = spiffe_id.removeprefix("spiffe://").split("/")
    return f"{parts[1]} {parts[2]}" if spiffe_id.startswith("spiffe://") and len(parts) == 3 else spiffe_id


def load_departments(policy_data: Path) -> dict[str, str]:
    """``fincluster.departments`` of a policy data file (empty when the file has none)."""
    try:
        data = json.loads(policy_data.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigurationError(f"cannot read policy data {policy_data}: {error.strerror}") from error
    except ValueError as error:
        raise ConfigurationError(f"{policy_data} is not JSON: {error}") from error
    departments = data.get("fincluster", {}).get("departments", {}) if isinstance(data, dict) else {}
    if not isinstance(departments, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in departments.items()
    ):
        raise ConfigurationError(f"{policy_data}: fincluster.departments must map SPIFFE ids to names")
    return dict(departments)
