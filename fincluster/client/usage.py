"""Checks of how the SDK is called, made before anything leaves the client.

A mistake found here costs nothing; found by a server, it costs a round trip and a remote error with
less context; found mid-generation, it costs the tokens generated so far. So: how long a ``generate``
call can run (transformers' own length rules), whether it fits an open inference session, whether
tier pins can be honoured at all, and which dtype the client part may be converted to.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from transformers import GenerationConfig

from fincluster.client.placement import Pins
from fincluster.errors import ConfigurationError, UsageError
from fincluster.trust.attestation import TrustTier


def generation_length(
    generation_config: GenerationConfig,
    prompt_length: int,
    kwargs: Mapping[str, Any],
    *,
    max_position_embeddings: int | None,
) -> int:
    """The sequence length (prompt included) at which transformers' ``generate`` stops at the latest,
    by its rules: ``max_new_tokens`` wins, then an explicit ``max_length``, then its model-agnostic
    default of that many new tokens, capped at the model's positions."""
    config = copy.deepcopy(kwargs.get("generation_config") or generation_config)
    config.update(**{key: kwargs[key] for key in ("max_new_tokens", "max_length") if key in kwargs})
    if config.max_new_tokens is not None:
        return prompt_length + int(config.max_new_tokens)
    if config.max_length is not None:
        return int(config.max_length)
    # transformers' own table of defaults (private API of the pinned version; the tests compare the
    # outcome with transformers' generate)
    default_new = int(GenerationConfig._get_default_generation_params()["max_length"])
    length = prompt_length + default_new
    return min(length, max_position_embeddings) if max_position_embeddings else length


def check_fits_session(
    *, total_length: int, prompt_length: int, continues_session: bool, position: int, max_length: int
) -> None:
    """Refuse a ``generate`` inside an inference session that would run past its ``max_length``.

    Every generated token but the last is fed back, so the session must hold ``total_length - 1``
    tokens (plus what it holds already when the prompt does not repeat them).
    """
    needed = total_length - 1 + (0 if continues_session else position)
    if needed <= max_length:
        return
    new_tokens = total_length - prompt_length
    fits = max(0, max_length - (needed - new_tokens))
    raise UsageError(
        f"{new_tokens} new tokens do not fit the active inference session: it holds {position} of its "
        f"max_length={max_length} tokens and this call would need {needed}; ask for at most {fits} new "
        f"tokens, or open the session with inference_session(max_length={needed})"
    )


def check_pins(pins: Pins, *, verifies_attestations: bool) -> None:
    """Tier pins name attested tiers; refuse unknown tiers, and any tier pin when nobody can verify one."""
    tiers = [tier.value for tier in TrustTier]
    for blocks, allowed in pins.items():
        if not isinstance(blocks, range) or blocks.step != 1 or len(blocks) == 0:
            raise ConfigurationError(
                f"pin keys are non-empty ranges of blocks such as range(0, 8), not {blocks!r}"
            )
        where = f"pin {{range({blocks.start}, {blocks.stop}): {allowed!r}}}"
        if not isinstance(allowed, str):
            continue
        if allowed not in tiers:
            raise ConfigurationError(f"{where}: {allowed!r} is not a trust tier ({', '.join(tiers)})")
        if not verifies_attestations:
            raise ConfigurationError(
                f"{where} cannot be honoured: a node's tier is what its verified attestation says, and "
                "this swarm connection verifies no attestations (no policy and attestation authority "
                "key), so every node counts as unattested. Give the Swarm a trust context with the "
                "authority's public key, e.g. trust_from_settings(TrustSettings(policy_dir=..., "
                "authority_keys=[...]), credential), or pin node ids instead"
            )


def requested_dtype(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.dtype | None:
    """The dtype a ``Module.to(...)`` call asks for, if any (``to(dtype)``, ``to(device, dtype)``,
    ``to(tensor)``, ``to(dtype=...)``)."""
    dtype = kwargs.get("dtype")
    for arg in args:
        if isinstance(arg, torch.dtype):
            dtype = arg
        elif isinstance(arg, torch.Tensor):
            dtype = arg.dtype
    if isinstance(kwargs.get("tensor"), torch.Tensor):
        dtype = kwargs["tensor"].dtype
    return dtype if isinstance(dtype, torch.dtype) else None


def check_dtype_change(current: torch.dtype, requested: torch.dtype | None) -> None:
    """The client part's dtype is the wire dtype the servers check: it cannot change after loading."""
    if requested is None or requested == current:
        return
    name = str(requested).removeprefix("torch.")
    raise UsageError(
        f"cannot convert the model to {name}: its activations travel to the servers as "
        f"{str(current).removeprefix('torch.')}, the dtype it was loaded with, and servers refuse any "
        f"other. For a swarm of {name} servers load it as "
        f"DistributedModelForCausalLM.from_pretrained(store, swarm=..., dtype=torch.{name})"
    )
