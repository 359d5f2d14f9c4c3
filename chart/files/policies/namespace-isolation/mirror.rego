# Example: repositories owned by namespaces (data.json `isolation.owners`: repository prefix →
# namespaces) are shared peer to peer only when every pod waiting for the image runs in an
# owning namespace. Unowned repositories are shared with everyone. While nobody is known to be
# waiting (`input.namespaces` empty), owned repositories are not shared: fail closed.
package speculum.mirror

default allow := true

default reason := "shared repository"

default resolve_tag := true

default require_grant := false

owners contains ns if {
	some prefix, namespaces in data.isolation.owners
	startswith(input.image.repository, prefix)
	some ns in namespaces
}

isolated if count(owners) > 0

only_owners_waiting if {
	count(input.namespaces) > 0
	every ns in input.namespaces {
		ns in owners
	}
}

allow := false if {
	isolated
	not only_owners_waiting
}

reason := "repository isolated to its namespaces" if {
	isolated
	not only_owners_waiting
}

reason := "owning namespace" if {
	isolated
	only_owners_waiting
}

decision := {
	"allow": allow,
	"reason": reason,
	"resolve_tag": resolve_tag,
	"require_grant": require_grant,
}
