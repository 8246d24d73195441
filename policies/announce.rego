# METADATA
# title: Registry announcement
# description: >-
#   May this node announce this block span in the registry? Anyone may announce blocks outside
#   the sensitive prefix; only an attested trusted node may announce prefix blocks.
# entrypoint: true
package fincluster.announce

import data.fincluster.common

# METADATA
# description: A span inside the model, prefix blocks only from trusted nodes, and claims for this node.
requirements(doc, cfg) := ({"valid_span"} | prefix_requirements(doc, cfg)) | common.binding_requirements(doc)

# METADATA
# description: A span that is not known to be clear of the sensitive prefix needs a trusted node.
prefix_requirements(doc, cfg) := set() if {
	common.clear_of_prefix(doc, cfg)
} else := {"trusted_node"}

# METADATA
# description: Deny reasons of the input under the policy data; empty when the announcement is allowed.
reasons := common.unmet(requirements(common.doc, common.config), common.doc, common.config)

default allow := false

# METADATA
# description: Allowed only when the deny reasons are known to be empty.
allow if count(reasons) == 0

# METADATA
# description: The document the engine reads.
decision := {"allow": allow, "reasons": reasons}
