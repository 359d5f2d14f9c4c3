# The default policy: every image this node holds may be served peer to peer and every tag
# resolved by the cluster (Spegel's behaviour). Copy this bundle to start your own; the decision
# document is described in docs/policy.md.
package speculum.mirror

default allow := true

default reason := "public"

default resolve_tag := true

default require_grant := false

# The one rule the daemon evaluates.
decision := {
	"allow": allow,
	"reason": reason,
	"resolve_tag": resolve_tag,
	"require_grant": require_grant,
}
