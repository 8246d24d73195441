# METADATA
# title: Unit tests of the router placement decision
package fincluster.route_test

import data.fincluster.common
import data.fincluster.route

cfg := {"sensitive_prefix": {"default_fraction": 0.25, "models": {}}, "allowed_zones": ["eu-fra"]}

weights := "1111111111111111111111111111111111111111111111111111111111111111"

node := "spiffe://bank.example/server/a"

trusted := {"node_id": node, "tier": "trusted", "zone": "eu-fra", "model_manifest_sha256": weights}

standard := {"node_id": node, "tier": "standard", "zone": "eu-fra", "model_manifest_sha256": weights}

request(classification, start, claims) := {
	"client": {"id": "spiffe://bank.example/client/analyst", "clearance": "confidential"},
	"classification": classification,
	"model": {"id": "m", "num_blocks": 32, "manifest_sha256": weights},
	"span": {"start": start, "end": 32},
	"node": {"id": node, "claims": claims},
}

route_reasons(doc) := common.unmet(route.requirements(doc, cfg), doc, cfg)

test_missing_input_is_denied_with_reasons if {
	not route.allow
	count(route.reasons) > 0
	route.decision == {"allow": false, "reasons": route.reasons}
}

test_every_request_is_checked_for_shape_and_clearance if {
	route.request_requirements == {"known_classification", "valid_span", "client_cleared"}
}

test_public_request_needs_only_the_request_checks if route.requirements(request("public", 0, null), cfg) == route.request_requirements

test_public_prefix_may_go_to_an_unattested_node if route_reasons(request("public", 0, null)) == set()

test_internal_prefix_is_denied_to_an_unattested_node if {
	route_reasons(request("internal", 0, null)) == {"node is not attested as trusted", "node's attested weights are not the requested model"}
}

test_internal_prefix_is_denied_to_a_standard_node if route_reasons(request("internal", 0, standard)) == {"node is not attested as trusted"}

test_internal_prefix_may_go_to_a_trusted_node if route_reasons(request("internal", 0, trusted)) == set()

test_internal_after_prefix_may_go_to_an_unattested_node if route_reasons(request("internal", 8, null)) == set()

test_confidential_needs_a_trusted_node_for_every_block if route_reasons(request("confidential", 8, standard)) == {"node is not attested as trusted"}

test_confidential_needs_an_allowed_zone if {
	route_reasons(request("confidential", 8, object.union(trusted, {"zone": "us-nyc"}))) == {"node is not attested in an allowed zone"}
}

test_confidential_may_go_to_a_trusted_node_in_an_allowed_zone if route_reasons(request("confidential", 0, trusted)) == set()

test_restricted_prefix_never_leaves_the_client if {
	doc := object.union(request("restricted", 0, trusted), {"client": {"clearance": "restricted"}})
	route_reasons(doc) == {"restricted data keeps the sensitive prefix on the client"}
}

test_restricted_after_prefix_may_go_to_a_trusted_node_in_an_allowed_zone if {
	route_reasons(object.union(request("restricted", 8, trusted), {"client": {"clearance": "restricted"}})) == set()
}

test_uncleared_client_is_denied if {
	route_reasons(request("restricted", 8, trusted)) == {"client clearance does not cover the data classification"}
}

test_claims_of_another_node_are_denied if {
	doc := request("public", 0, object.union(standard, {"node_id": "spiffe://bank.example/server/b"}))
	route_reasons(doc) == {"attestation names a different node"}
}
