# METADATA
# title: Server admission
# description: >-
#   May this server serve this client's request of this classification on this span? The server
#   applies the router's placement rules to itself and also checks who is calling.
# entrypoint: true
package fincluster.serve

import data.fincluster.common
import data.fincluster.route

# METADATA
# description: The route requirements, plus a caller that is a client workload.
requirements(doc, cfg) := route.requirements(doc, cfg) | {"caller_is_client"}

# METADATA
# description: Deny reasons of the input under the policy data; empty when serving is allowed.
reasons := common.unmet(requirements(common.doc, common.config), common.doc, common.config)

default allow := false

# METADATA
# description: Allowed only when the deny reasons are known to be empty.
allow if count(reasons) == 0

# METADATA
# description: The document the engine reads.
decision := {"allow": allow, "reasons": reasons}
