package speculum.mirror_test

import data.speculum.mirror

test_latest_is_not_resolved if {
	d := mirror.decision with input as {"request": {"is_tag": true}, "image": {"registry": "127.0.0.1:5000", "repository": "rig/tags", "tag": "latest"}}
	d.allow
	not d.resolve_tag
	d.reason == "latest is resolved upstream"
}

test_other_tags_are_resolved if {
	d := mirror.decision with input as {"request": {"is_tag": true}, "image": {"registry": "127.0.0.1:5000", "repository": "rig/tags", "tag": "v1"}}
	d.allow
	d.resolve_tag
}

test_digests_are_served if {
	d := mirror.decision with input as {"image": {"registry": "127.0.0.1:5000", "repository": "rig/tags", "tag": null, "digest": "sha256:00"}}
	d.allow
}

test_pinned_latest_is_resolved if {
	d := mirror.decision with input as {"image": {"registry": "127.0.0.1:5000", "repository": "pinned/app", "tag": "latest"}}
	d.resolve_tag
}
