# METADATA
# title: Shared requirements of fincluster decisions
# description: >-
#   Every check is a function of the input document (doc) and the policy configuration (cfg), so
#   unit tests call it with literal documents. A requirement whose check is undefined (a missing
#   or mistyped field) is unmet: undefined inputs deny.
package fincluster.common

# METADATA
# description: >-
#   The input document, or an empty one when there is none, so a missing input is denied with
#   reasons like any other incomplete input.
default doc := {}

doc := input

# METADATA
# description: >-
#   Configuration from policy data. Undefined when an entry is missing, which leaves every
#   decision undefined, so the engine refuses to start instead of guessing.
config := {
	"sensitive_prefix": data.fincluster.sensitive_prefix,
	"allowed_zones": data.fincluster.allowed_zones,
}

# METADATA
# description: Data classifications, least to most sensitive; a clearance covers its rank and below.
classifications := ["public", "internal", "confidential", "restricted"]

# METADATA
# description: The human-readable deny reason of each requirement.
messages := {
	"known_classification": "unknown data classification",
	"valid_span": "block span is not inside the model",
	"client_cleared": "client clearance does not cover the data classification",
	"caller_is_client": "caller is not a client workload",
	"trusted_node": "node is not attested as trusted",
	"attested_weights": "node's attested weights are not the requested model",
	"allowed_zone": "node is not attested in an allowed zone",
	"prefix_on_client": "restricted data keeps the sensitive prefix on the client",
	"attestation_names_node": "attestation names a different node",
}

# METADATA
# description: >-
#   Deny reasons of the requirements in names that doc does not satisfy. A name without a message
#   is its own reason, so a misspelt requirement denies instead of vanishing.
unmet(names, doc, cfg) := {object.get(messages, name, name) |
	some name in names
	not satisfied(name, doc, cfg)
}

# METADATA
# description: >-
#   What the node must prove for a request of doc's classification: public needs nothing;
#   internal needs an attested trusted node for the sensitive prefix; confidential needs one in
#   an allowed zone for every block; restricted also keeps the prefix on the client.
node_requirements(doc, cfg) := {"trusted_node", "attested_weights", "allowed_zone", "prefix_on_client"} if {
	doc.classification == "restricted"
} else := {"trusted_node", "attested_weights", "allowed_zone"} if {
	doc.classification == "confidential"
} else := {"trusted_node", "attested_weights"} if {
	doc.classification == "internal"
	not clear_of_prefix(doc, cfg)
} else := set()

# METADATA
# description: A node that presents claims must present claims issued for itself.
binding_requirements(doc) := {"attestation_names_node"} if {
	doc.node.claims != null
} else := set()

# METADATA
# description: Whether doc satisfies the named requirement; undefined (unmet) otherwise.
satisfied("known_classification", doc, _) if classifications[_] == doc.classification

satisfied("valid_span", doc, _) if span_inside_model(doc)

satisfied("client_cleared", doc, _) if rank(doc.client.clearance) >= rank(doc.classification)

satisfied("caller_is_client", doc, _) if regex.match(`^spiffe://[^/]+/client/[^/]+$`, doc.client.id)

satisfied("trusted_node", doc, _) if {
	attested(doc)
	doc.node.claims.tier == "trusted"
}

satisfied("attested_weights", doc, _) if {
	attested(doc)
	is_string(doc.model.manifest_sha256)
	doc.node.claims.model_manifest_sha256 == doc.model.manifest_sha256
}

satisfied("allowed_zone", doc, cfg) if {
	attested(doc)
	cfg.allowed_zones[_] == doc.node.claims.zone
}

satisfied("prefix_on_client", doc, cfg) if clear_of_prefix(doc, cfg)

satisfied("attestation_names_node", doc, _) if attested(doc)

# METADATA
# description: Position of a classification in classifications; undefined for unknown ones.
rank(classification) := i if classifications[i] == classification

# METADATA
# description: The node presents verified claims issued for its own identity.
attested(doc) if doc.node.claims.node_id == doc.node.id

# METADATA
# description: 0 <= start < end <= the model's block count.
span_inside_model(doc) if {
	is_number(doc.span.start)
	is_number(doc.span.end)
	is_number(doc.model.num_blocks)
	0 <= doc.span.start
	doc.span.start < doc.span.end
	doc.span.end <= doc.model.num_blocks
}

# METADATA
# description: >-
#   How many leading blocks see activations from which a prompt can be recovered: the model's
#   entry in cfg.sensitive_prefix.models, else default_fraction of its blocks, rounded up.
sensitive_prefix_length(doc, cfg) := n if {
	n := cfg.sensitive_prefix.models[doc.model.id]
} else := ceil(doc.model.num_blocks * cfg.sensitive_prefix.default_fraction)

# METADATA
# description: The span starts at or after the end of the sensitive prefix.
clear_of_prefix(doc, cfg) if doc.span.start >= sensitive_prefix_length(doc, cfg)
