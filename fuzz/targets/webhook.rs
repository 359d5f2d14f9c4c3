//! Fuzz target body for the webhook's AdmissionReview decoder, as a plain function (see
//! `oci.rs` for why). Property: whatever decodes, the patch planned for it applies to the
//! object it was planned on (the API server would reject a patch that does not).

use speculum_webhook::{mutate, review};

const DIGEST: &str = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

pub fn admission_review(data: &[u8]) {
    let Ok(req) = review::decode(data) else {
        return;
    };
    let _ = req.display_name();
    let Some(object) = &req.object else {
        return;
    };
    let Ok(sites) = mutate::plan(&req.kind.kind, object, req.old_object.as_ref()) else {
        return;
    };
    let ops = mutate::patch(&sites, |_| Some(DIGEST));
    let mut patched = object.clone();
    mutate::apply(&mut patched, &ops).expect("a planned patch applies to its own object");
}
