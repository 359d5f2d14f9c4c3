# Example: everything is served peer to peer, but `latest` (and references that default to it)
# is never resolved by the cluster: containerd asks the registry what `latest` means today,
# then fetches the content by digest, from peers when they have it.
# The same effect for every repository is the `policy.resolve_latest_tag: false` switch; a
# policy can narrow it (here: only repositories outside `pinned/`).
package speculum.mirror

default allow := true

default reason := "public"

default resolve_tag := true

default require_grant := false

resolve_tag := false if {
	input.image.tag == "latest"
	not startswith(input.image.repository, "pinned/")
}

reason := "latest is resolved upstream" if not resolve_tag

decision := {
	"allow": allow,
	"reason": reason,
	"resolve_tag": resolve_tag,
	"require_grant": require_grant,
}
