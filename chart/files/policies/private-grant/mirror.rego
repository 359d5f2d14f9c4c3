# Example: images under the prefixes in data.json (`private.prefixes`, matched against
# `registry/repository`) are private: the decision says `require_grant`, and they are served
# peer to peer only with a grant for the repository. The daemon checks the grant itself
# (signature, expiry, namespace, pod, node, manifest closure — docs/tenancy.md) and asks again
# with `input.grant` = the grant that passed; without one, containerd goes to the registry with
# the pod's own credentials.
package speculum.mirror

default allow := true

default reason := "public"

default resolve_tag := true

default require_grant := false

name := concat("/", [input.image.registry, input.image.repository])

private if {
	some prefix in data.private.prefixes
	startswith(name, prefix)
}

granted if input.grant.repository == name

require_grant if private

allow := false if {
	private
	not granted
}

reason := "private: no grant" if {
	private
	not granted
}

reason := "private: granted" if {
	private
	granted
}

decision := {
	"allow": allow,
	"reason": reason,
	"resolve_tag": resolve_tag,
	"require_grant": require_grant,
}
