# METADATA
# title: Unit tests of the shared requirements
package fincluster.common_test

import data.fincluster.common

cfg := {"sensitive_prefix": {"default_fraction": 0.25, "models": {"tiny": 2}}, "allowed_zones": ["eu-fra"]}

weights := "1111111111111111111111111111111111111111111111111111111111111111"

other_weights := "2222222222222222222222222222222222222222222222222222222222222222"

node := "spiffe://bank.example/server/a"

node_claims(tier, zone) := {"node_id": node, "tier": tier, "zone": zone, "model_manifest_sha256": weights}

placement(classification, start, end, claims) := {
	"client": {"id": "spiffe://bank.example/client/analyst", "clearance": "restricted"},
	"classification": classification,
	"model": {"id": "m", "num_blocks": 32, "manifest_sha256": weights},
	"span": {"start": start, "end": end},
	"node": {"id": node, "claims": claims},
}

test_missing_input_is_an_empty_document if common.doc == {}

test_input_is_the_document if {
	doc := placement("public", 0, 8, null)
	common.doc == doc with input as doc
}

test_shipped_prefix_fraction_is_a_fraction if {
	common.config.sensitive_prefix.default_fraction > 0
	common.config.sensitive_prefix.default_fraction <= 1
}

test_shipped_config_allows_some_zone if count(common.config.allowed_zones) > 0

test_classifications_run_least_to_most_sensitive if {
	common.classifications == ["public", "internal", "confidential", "restricted"]
}

test_every_requirement_has_a_message if {
	{name | common.messages[name]} == {
		"known_classification", "valid_span", "client_cleared", "caller_is_client", "trusted_node",
		"attested_weights", "allowed_zone", "prefix_on_client", "attestation_names_node",
	}
}

test_unmet_lists_only_failed_requirements if {
	doc := placement("public", 0, 4, null)
	common.unmet({"known_classification", "trusted_node"}, doc, cfg) == {"node is not attested as trusted"}
}

test_unknown_requirement_is_its_own_reason if {
	common.unmet({"no_such_requirement"}, placement("public", 0, 4, null), cfg) == {"no_such_requirement"}
}

test_public_needs_nothing_from_the_node if common.node_requirements(placement("public", 0, 4, null), cfg) == set()

test_internal_prefix_needs_a_trusted_node if {
	common.node_requirements(placement("internal", 7, 9, null), cfg) == {"trusted_node", "attested_weights"}
}

test_internal_after_prefix_needs_nothing if common.node_requirements(placement("internal", 8, 32, null), cfg) == set()

test_internal_without_span_needs_a_trusted_node if {
	common.node_requirements({"classification": "internal"}, cfg) == {"trusted_node", "attested_weights"}
}

test_confidential_needs_a_trusted_node_in_an_allowed_zone if {
	common.node_requirements(placement("confidential", 8, 32, null), cfg) == {"trusted_node", "attested_weights", "allowed_zone"}
}

test_restricted_also_keeps_the_prefix_on_the_client if {
	common.node_requirements(placement("restricted", 8, 32, null), cfg) == {"trusted_node", "attested_weights", "allowed_zone", "prefix_on_client"}
}

test_unknown_classification_adds_no_node_requirement if common.node_requirements({"classification": "secret"}, cfg) == set()

test_binding_is_required_of_claims if {
	common.binding_requirements(placement("public", 0, 4, node_claims("standard", "us-nyc"))) == {"attestation_names_node"}
}

test_binding_is_not_required_without_claims if common.binding_requirements(placement("public", 0, 4, null)) == set()

test_known_classification_is_satisfied if common.satisfied("known_classification", {"classification": "confidential"}, cfg)

test_unknown_classification_is_not_satisfied if not common.satisfied("known_classification", {"classification": "secret"}, cfg)

test_missing_classification_is_not_satisfied if not common.satisfied("known_classification", {}, cfg)

test_span_inside_model_is_valid if common.satisfied("valid_span", placement("public", 0, 32, null), cfg)

test_span_past_the_model_is_invalid if not common.satisfied("valid_span", placement("public", 30, 33, null), cfg)

test_empty_span_is_invalid if not common.satisfied("valid_span", placement("public", 4, 4, null), cfg)

test_negative_start_is_invalid if not common.satisfied("valid_span", placement("public", -1, 4, null), cfg)

test_non_numeric_span_is_invalid if not common.satisfied("valid_span", placement("public", "0", 4, null), cfg)

test_clearance_covers_lower_classifications if {
	common.satisfied("client_cleared", {"client": {"clearance": "internal"}, "classification": "public"}, cfg)
}

test_clearance_does_not_cover_higher_classifications if {
	not common.satisfied("client_cleared", {"client": {"clearance": "internal"}, "classification": "confidential"}, cfg)
}

test_missing_clearance_is_not_cleared if not common.satisfied("client_cleared", {"classification": "public"}, cfg)

test_client_workload_is_a_client if {
	common.satisfied("caller_is_client", {"client": {"id": "spiffe://bank.example/client/analyst"}}, cfg)
}

test_server_workload_is_not_a_client if {
	not common.satisfied("caller_is_client", {"client": {"id": "spiffe://bank.example/server/a"}}, cfg)
}

test_trusted_tier_is_trusted if common.satisfied("trusted_node", placement("public", 0, 4, node_claims("trusted", "eu-fra")), cfg)

test_standard_tier_is_not_trusted if not common.satisfied("trusted_node", placement("public", 0, 4, node_claims("standard", "eu-fra")), cfg)

test_unattested_node_is_not_trusted if not common.satisfied("trusted_node", placement("public", 0, 4, null), cfg)

test_matching_weights_are_satisfied if common.satisfied("attested_weights", placement("public", 0, 4, node_claims("trusted", "eu-fra")), cfg)

test_other_weights_are_not_satisfied if {
	doc := placement("public", 0, 4, object.union(node_claims("trusted", "eu-fra"), {"model_manifest_sha256": other_weights}))
	not common.satisfied("attested_weights", doc, cfg)
}

test_unknown_requested_weights_are_not_satisfied if {
	doc := object.union(placement("public", 0, 4, node_claims("trusted", "eu-fra")), {"model": {"id": "m", "num_blocks": 32, "manifest_sha256": null}})
	not common.satisfied("attested_weights", doc, cfg)
}

test_allowed_zone_is_satisfied if common.satisfied("allowed_zone", placement("public", 0, 4, node_claims("trusted", "eu-fra")), cfg)

test_other_zone_is_not_satisfied if not common.satisfied("allowed_zone", placement("public", 0, 4, node_claims("trusted", "us-nyc")), cfg)

test_prefix_stays_on_client_when_span_is_clear if common.satisfied("prefix_on_client", placement("restricted", 8, 32, null), cfg)

test_prefix_span_does_not_keep_prefix_on_client if not common.satisfied("prefix_on_client", placement("restricted", 0, 32, null), cfg)

test_own_claims_name_the_node if common.satisfied("attestation_names_node", placement("public", 0, 4, node_claims("standard", "us-nyc")), cfg)

test_claims_of_another_node_do_not_name_it if {
	doc := placement("public", 0, 4, object.union(node_claims("trusted", "eu-fra"), {"node_id": "spiffe://bank.example/server/b"}))
	not common.satisfied("attestation_names_node", doc, cfg)
}

test_rank_orders_classifications if {
	common.rank("public") < common.rank("internal")
	common.rank("confidential") < common.rank("restricted")
}

test_unknown_classification_has_no_rank if not common.rank("secret")

test_attested_needs_claims_for_the_node if {
	common.attested(placement("public", 0, 4, node_claims("standard", "us-nyc")))
	not common.attested(placement("public", 0, 4, null))
}

test_span_inside_model_allows_the_whole_model if common.span_inside_model(placement("public", 0, 32, null))

test_prefix_length_uses_the_model_entry if common.sensitive_prefix_length({"model": {"id": "tiny", "num_blocks": 30}}, cfg) == 2

test_prefix_length_defaults_to_a_fraction_rounded_up if {
	common.sensitive_prefix_length({"model": {"id": "other", "num_blocks": 30}}, cfg) == 8
	common.sensitive_prefix_length({"model": {"id": "other", "num_blocks": 32}}, cfg) == 8
}

test_span_starting_at_prefix_end_is_clear if common.clear_of_prefix(placement("internal", 8, 9, null), cfg)

test_span_starting_inside_prefix_is_not_clear if not common.clear_of_prefix(placement("internal", 7, 32, null), cfg)
