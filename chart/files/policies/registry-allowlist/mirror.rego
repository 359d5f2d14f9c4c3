# Example: only images from the registries listed in data.json (`allowlist.registries`) are
# served peer to peer; everything else goes upstream.
package speculum.mirror

default allow := false

default reason := "registry not in allowlist"

default resolve_tag := true

default require_grant := false

allow if input.image.registry in data.allowlist.registries

reason := "registry allowed" if allow

decision := {
	"allow": allow,
	"reason": reason,
	"resolve_tag": resolve_tag,
	"require_grant": require_grant,
}
