"""transformers generation features through the swarm behave exactly as with the local model."""

from __future__ import annotations

import pytest
import torch
from transformers import TextStreamer

from fincluster.errors import UsageError
from tests.helpers import Cluster
from tests.test_exact_match_demo import chat_ids

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
PROMPT = "Name two ways a central bank can tighten monetary policy."


def both(cluster: Cluster, reference, ids: torch.Tensor, **kwargs) -> tuple[list[int], list[int]]:
    torch.manual_seed(1234)
    expected = reference.generate(ids, **kwargs)
    with cluster.swarm() as swarm:
        torch.manual_seed(1234)
        produced = cluster.model(swarm).generate(ids, **kwargs)
    return produced[0].tolist(), expected[0].tolist()


@pytest.mark.parametrize(
    "options",
    [
        {"do_sample": True, "temperature": 0.7},
        {"do_sample": True, "top_k": 20},
        {"do_sample": True, "top_p": 0.9, "temperature": 1.3},
        {"do_sample": False, "repetition_penalty": 1.3},
    ],
    ids=["temperature", "top_k", "top_p", "repetition_penalty"],
)
def test_sampling_options_match_local_with_the_same_seed(
    demo_cluster: Cluster, demo_reference, options
) -> None:
    reference, tokenizer = demo_reference
    produced, expected = both(
        demo_cluster, reference, chat_ids(tokenizer, PROMPT), max_new_tokens=20, **options
    )
    assert produced == expected


def test_generation_stops_at_eos(demo_cluster: Cluster, demo_reference) -> None:
    reference, tokenizer = demo_reference
    ids = chat_ids(tokenizer, PROMPT)
    greedy = reference.generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1] :].tolist()
    stop_token = greedy[4]  # declare the 5th greedy token to be end-of-sequence
    produced, expected = both(
        demo_cluster, reference, ids, max_new_tokens=10, do_sample=False, eos_token_id=stop_token
    )
    assert produced == expected
    assert produced[-1] == stop_token and len(produced) <= ids.shape[1] + 5


def test_stop_strings(demo_cluster: Cluster, demo_reference) -> None:
    reference, tokenizer = demo_reference
    ids = chat_ids(tokenizer, PROMPT)
    full = tokenizer.decode(reference.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :])
    stop = full.split()[3]
    produced, expected = both(
        demo_cluster,
        reference,
        ids,
        max_new_tokens=24,
        do_sample=False,
        stop_strings=[stop],
        tokenizer=tokenizer,
    )
    assert produced == expected
    assert tokenizer.decode(produced[ids.shape[1] :]).rstrip().endswith(stop)


def test_text_streamer_prints_the_generated_text(demo_cluster: Cluster, demo_reference, capsys) -> None:
    _, tokenizer = demo_reference
    ids = chat_ids(tokenizer, PROMPT)
    with demo_cluster.swarm() as swarm:
        output = demo_cluster.model(swarm).generate(
            ids, max_new_tokens=12, do_sample=False, streamer=TextStreamer(tokenizer, skip_prompt=True)
        )
    printed = capsys.readouterr().out
    assert printed.strip() == tokenizer.decode(output[0, ids.shape[1] :]).strip()


def test_one_session_across_several_generate_calls(demo_cluster: Cluster, demo_reference) -> None:
    """A second generate continues the session (only new tokens are sent) and equals one long generate."""
    reference, tokenizer = demo_reference
    ids = chat_ids(tokenizer, PROMPT)
    expected = reference.generate(ids, max_new_tokens=16, do_sample=False)
    with demo_cluster.swarm() as swarm:
        model = demo_cluster.model(swarm)
        with model.inference_session(max_length=ids.shape[1] + 16) as session:
            first = model.generate(ids, max_new_tokens=8, do_sample=False)
            held = session.position
            second = model.generate(first, max_new_tokens=8, do_sample=False)
            assert held == ids.shape[1] + 7 and session.position == ids.shape[1] + 15
    assert second.tolist() == expected.tolist()


def test_a_session_refuses_input_that_does_not_continue_it(demo_cluster: Cluster, demo_reference) -> None:
    _, tokenizer = demo_reference
    ids = chat_ids(tokenizer, PROMPT)
    with demo_cluster.swarm() as swarm:
        model = demo_cluster.model(swarm)
        with model.inference_session(max_length=ids.shape[1] + 16):
            model.generate(ids, max_new_tokens=2, do_sample=False)
            other = chat_ids(tokenizer, "Something else entirely, and longer than before, much longer.")
            with pytest.raises(UsageError, match="mask must cover the held tokens"):
                model(other, attention_mask=torch.ones(1, 3, dtype=torch.int64))


def test_audit_log_holds_no_prompt_text_tokens_or_activations(
    demo_cluster: Cluster, demo_reference, tmp_path
) -> None:
    """The real prompt through the real swarm: the client's audit database never contains it."""
    from fincluster.audit import AuditSettings, TransferEvent, read_events
    from fincluster.audit.node import open_node_audit_log
    from fincluster.trust.pki import Role
    from fincluster.wire.tensors import encode

    _, tokenizer = demo_reference
    secret = "Client 4471 plans to sell EUR 30m of Bund futures before Friday's auction."
    ids = chat_ids(tokenizer, secret)
    credential = demo_cluster.pki.credential(Role.CLIENT, "analyst")
    with (
        open_node_audit_log(AuditSettings(directory=tmp_path), credential) as log,
        demo_cluster.swarm(audit=log) as swarm,
    ):
        model = demo_cluster.model(swarm)
        model.generate(ids, max_new_tokens=4, do_sample=False)
        embeddings = model.get_input_embeddings()(ids).detach()
    assert sum(isinstance(e, TransferEvent) for e in read_events(log.path)) == 12
    blob = b"".join(path.read_bytes() for path in tmp_path.glob("*.sqlite*"))
    for needle in (
        secret.encode(),
        b"Bund futures",
        str(ids[0].tolist()).encode(),
        encode(embeddings[0, -1]).data[:128],
    ):
        assert needle not in blob
