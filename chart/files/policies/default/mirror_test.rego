package speculum.mirror_test

import data.speculum.mirror

tag_request := {
	"request": {"action": "serve", "kind": "manifest", "method": "HEAD", "source": "local", "reference": "v1", "is_tag": true},
	"image": {"registry": "127.0.0.1:5000", "repository": "rig/small", "tag": "v1", "digest": null},
	"node": {"name": "node-1"},
	"namespaces": [],
	"peer": null,
	"grant": null,
}

test_allows_a_tag if {
	d := mirror.decision with input as tag_request
	d.allow
	d.resolve_tag
	not d.require_grant
	d.reason == "public"
}

test_allows_latest if {
	d := mirror.decision with input as object.union(tag_request, {"image": {"tag": "latest"}, "request": {"reference": "latest"}})
	d.allow
	d.resolve_tag
}

test_allows_a_blob_for_a_peer if {
	d := mirror.decision with input as {
		"request": {"action": "serve", "kind": "blob", "method": "GET", "source": "peer", "reference": "sha256:00", "is_tag": false},
		"image": {"registry": "docker.io", "repository": "library/alpine", "tag": null, "digest": "sha256:00"},
	}
	d.allow
}

test_allows_an_empty_input if {
	d := mirror.decision with input as {}
	d.allow
}
