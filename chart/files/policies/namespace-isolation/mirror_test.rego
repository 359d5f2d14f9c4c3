package speculum.mirror_test

import data.speculum.mirror

image(repo) := {"registry": "ghcr.io", "repository": repo, "tag": "v1"}

test_unowned_is_shared if {
	d := mirror.decision with input as {"image": image("public/app"), "namespaces": ["team-a"]}
	d.allow
	d.reason == "shared repository"
}

test_owner_is_served if {
	d := mirror.decision with input as {"image": image("team-b/app"), "namespaces": ["team-b", "team-b-ci"]}
	d.allow
	d.reason == "owning namespace"
}

test_other_namespace_is_denied if {
	d := mirror.decision with input as {"image": image("team-a/app"), "namespaces": ["team-b"]}
	not d.allow
}

test_mixed_waiters_are_denied if {
	d := mirror.decision with input as {"image": image("team-a/app"), "namespaces": ["team-a", "team-b"]}
	not d.allow
}

test_unknown_waiters_fail_closed if {
	d := mirror.decision with input as {"image": image("team-a/app"), "namespaces": []}
	not d.allow
	d.reason == "repository isolated to its namespaces"
}
