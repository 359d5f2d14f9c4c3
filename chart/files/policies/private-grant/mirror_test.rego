package speculum.mirror_test

import data.speculum.mirror

private_image := {"registry": "ghcr.io", "repository": "acme-internal/billing", "tag": "v3"}

test_public_needs_nothing if {
	d := mirror.decision with input as {"image": {"registry": "ghcr.io", "repository": "acme/site", "tag": "v1"}, "grant": null}
	d.allow
	not d.require_grant
}

test_private_without_grant_is_denied if {
	d := mirror.decision with input as {"image": private_image, "grant": null}
	not d.allow
	d.require_grant
	d.reason == "private: no grant"
}

test_private_with_grant_is_served if {
	d := mirror.decision with input as {"image": private_image, "grant": {"namespace": "billing", "pod": "api-1", "repository": "ghcr.io/acme-internal/billing", "digest": "sha256:0000000000000000000000000000000000000000000000000000000000000000", "expires": 1}}
	d.allow
	d.require_grant
}

test_grant_for_another_repository_is_denied if {
	d := mirror.decision with input as {"image": private_image, "grant": {"namespace": "billing", "pod": "api-1", "repository": "ghcr.io/acme-internal/other", "digest": "sha256:0000000000000000000000000000000000000000000000000000000000000000", "expires": 1}}
	not d.allow
}
