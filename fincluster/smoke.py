"""``fincluster generate``: an operator's smoke test of a running swarm.

A prompt goes in as a client of the swarm would send it — with this node's certificate, trust
settings (policies, authority keys, clearances) and audit log — and the generated text comes out,
followed by where every block ran (node, attested tier, address). It is the quickest way to see that
a deployment works end to end for a given data classification.
"""

from __future__ import annotations

from typing import TextIO

from fincluster.audit.node import open_node_audit_log
from fincluster.bootstrap import trust_from_settings
from fincluster.client import DistributedModelForCausalLM, Swarm
from fincluster.errors import ConfigurationError
from fincluster.settings import Settings
from fincluster.store import ModelStore
from fincluster.trust.pki import Credential


def run_generate(
    settings: Settings,
    credential: Credential,
    *,
    prompt: str,
    classification: str,
    max_new_tokens: int,
    raw: bool,
    out: TextIO,
) -> int:
    """Generate greedily for ``prompt`` through the swarm and print the text and the placement."""
    if settings.registry.address is None:
        raise ConfigurationError("generate needs --registry HOST:PORT (or registry.address)")
    if settings.client.store is None:
        raise ConfigurationError("generate needs --store (or client.store): the client part of the model")
    store = ModelStore.open(settings.client.store)
    trust = trust_from_settings(settings.trust, credential)
    tokenizer = store.load_tokenizer()
    if not raw and tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = prompt
    input_ids = tokenizer(text, return_tensors="pt").input_ids
    with (
        open_node_audit_log(settings.audit, credential) as audit,
        Swarm(
            registry=settings.registry.address,
            credential=credential,
            settings=settings.client,
            trust=trust,
            audit=audit,
        ) as swarm,
    ):
        model = DistributedModelForCausalLM.from_pretrained(store, swarm=swarm, classification=classification)
        output = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False)
        verdicts = {hop.record.node_id: verdict for hop, verdict in swarm.last_route}
        answer = str(tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True))
        print(answer.strip(), file=out)
        print(f"\nplacement ({model.classification.value} data, {store.model_id})", file=out)
        for node_id, span in model.last_chain:
            verdict = verdicts.get(node_id)
            claims = verdict.claims if verdict is not None else None
            if not trust.verifies_attestations:
                tier = "unverified"  # no authority key: this client cannot know any node's tier
            else:
                tier = claims.tier.value if claims is not None else "unattested"
            address = verdict.record.address if verdict is not None else "in this process"
            print(f"  blocks {span!s:>7}  {tier:<10}  {node_id}  {address}", file=out)
        print(f"audit log: {audit.path}", file=out)
    return 0
