# METADATA
# title: Unit tests of the registry announcement decision
package fincluster.announce_test

import data.fincluster.announce
import data.fincluster.common

cfg := {"sensitive_prefix": {"default_fraction": 0.25, "models": {}}, "allowed_zones": ["eu-fra"]}

node := "spiffe://bank.example/server/a"

attestation(tier) := {
	"node_id": node,
	"tier": tier,
	"zone": "eu-fra",
	"model_manifest_sha256": "1111111111111111111111111111111111111111111111111111111111111111",
}

announcement(start, end, claims) := {
	"model": {"id": "m", "num_blocks": 32},
	"span": {"start": start, "end": end},
	"node": {"id": node, "claims": claims},
}

announce_reasons(doc) := common.unmet(announce.requirements(doc, cfg), doc, cfg)

test_missing_input_is_denied_with_reasons if {
	not announce.allow
	count(announce.reasons) > 0
	announce.decision == {"allow": false, "reasons": announce.reasons}
}

test_unattested_node_may_announce_blocks_after_the_prefix if announce_reasons(announcement(8, 32, null)) == set()

test_unattested_node_may_not_announce_prefix_blocks if announce_reasons(announcement(0, 8, null)) == {"node is not attested as trusted"}

test_standard_node_may_not_announce_prefix_blocks if announce_reasons(announcement(7, 9, attestation("standard"))) == {"node is not attested as trusted"}

test_trusted_node_may_announce_prefix_blocks if announce_reasons(announcement(0, 32, attestation("trusted"))) == set()

test_claims_of_another_node_are_refused if {
	doc := announcement(8, 32, object.union(attestation("trusted"), {"node_id": "spiffe://bank.example/server/b"}))
	announce_reasons(doc) == {"attestation names a different node"}
}

test_span_outside_the_model_is_refused if announce_reasons(announcement(8, 33, null)) == {"block span is not inside the model"}

test_prefix_blocks_need_a_trusted_node if announce.prefix_requirements(announcement(0, 8, null), cfg) == {"trusted_node"}

test_blocks_after_the_prefix_need_nothing if announce.prefix_requirements(announcement(8, 32, null), cfg) == set()

test_span_not_known_to_be_clear_needs_a_trusted_node if announce.prefix_requirements({}, cfg) == {"trusted_node"}
