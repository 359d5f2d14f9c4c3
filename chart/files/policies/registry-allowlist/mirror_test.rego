package speculum.mirror_test

import data.speculum.mirror

test_listed_registry_is_allowed if {
	d := mirror.decision with input as {"image": {"registry": "ghcr.io", "repository": "org/app", "tag": "v1"}}
	d.allow
	d.reason == "registry allowed"
}

test_unlisted_registry_is_denied if {
	d := mirror.decision with input as {"image": {"registry": "docker.io", "repository": "library/alpine", "tag": "3"}}
	not d.allow
	d.reason == "registry not in allowlist"
}

test_allowlist_comes_from_data if {
	d := mirror.decision with input as {"image": {"registry": "quay.io", "repository": "x/y"}}
		with data.allowlist.registries as ["quay.io"]
	d.allow
}

test_missing_registry_is_denied if {
	d := mirror.decision with input as {}
	not d.allow
}
