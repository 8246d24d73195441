# METADATA
# title: Unit tests of the server admission decision
package fincluster.serve_test

import data.fincluster.common
import data.fincluster.route
import data.fincluster.serve

cfg := {"sensitive_prefix": {"default_fraction": 0.25, "models": {}}, "allowed_zones": ["eu-fra"]}

weights := "1111111111111111111111111111111111111111111111111111111111111111"

node := "spiffe://bank.example/server/a"

trusted := {"node_id": node, "tier": "trusted", "zone": "eu-fra", "model_manifest_sha256": weights}

call(caller, classification, start) := {
	"client": {"id": caller, "clearance": "confidential"},
	"classification": classification,
	"model": {"id": "m", "num_blocks": 32, "manifest_sha256": weights},
	"span": {"start": start, "end": 32},
	"node": {"id": node, "claims": trusted},
}

serve_reasons(doc) := common.unmet(serve.requirements(doc, cfg), doc, cfg)

test_missing_input_is_denied_with_reasons if {
	not serve.allow
	count(serve.reasons) > 0
	serve.decision == {"allow": false, "reasons": serve.reasons}
}

test_serving_applies_the_route_requirements_and_checks_the_caller if {
	doc := call("spiffe://bank.example/client/analyst", "internal", 0)
	serve.requirements(doc, cfg) == route.requirements(doc, cfg) | {"caller_is_client"}
}

test_trusted_node_serves_a_cleared_client if serve_reasons(call("spiffe://bank.example/client/analyst", "confidential", 0)) == set()

test_server_workload_is_refused if {
	serve_reasons(call("spiffe://bank.example/server/b", "public", 0)) == {"caller is not a client workload"}
}

test_uncleared_client_is_refused if {
	serve_reasons(call("spiffe://bank.example/client/analyst", "restricted", 8)) == {"client clearance does not cover the data classification"}
}
