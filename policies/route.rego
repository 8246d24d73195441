# METADATA
# title: Client router placement
# description: >-
#   May the client send this block span of a request of this classification to this node? The
#   router asks for every candidate node and never routes a block to a node this denies.
# entrypoint: true
package fincluster.route

import data.fincluster.common

# METADATA
# description: The request is well formed and the node meets what its classification needs.
requirements(doc, cfg) := (request_requirements | common.node_requirements(doc, cfg)) | common.binding_requirements(doc)

# METADATA
# description: Every request names a known classification and a span inside the model, for a cleared client.
request_requirements := {"known_classification", "valid_span", "client_cleared"}

# METADATA
# description: Deny reasons of the input under the policy data; empty when the placement is allowed.
reasons := common.unmet(requirements(common.doc, common.config), common.doc, common.config)

default allow := false

# METADATA
# description: Allowed only when the deny reasons are known to be empty.
allow if count(reasons) == 0

# METADATA
# description: The document the engine reads.
decision := {"allow": allow, "reasons": reasons}
