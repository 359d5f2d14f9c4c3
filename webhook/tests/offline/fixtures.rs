//! Fixture table: AdmissionReview requests → expected JSON Patches, through the pure path
//! (envelope decoding, `mutate::plan`, `mutate::patch`) with a fixed tag → digest map and no
//! network. Each fixture is then applied and run again to prove reinvocation is a no-op.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;
use speculum_webhook::mutate::{self, Prior};
use speculum_webhook::review;

#[derive(Deserialize)]
struct Fixture {
    review: Value,
    digests: HashMap<String, String>,
    patch: Value,
}

#[test]
fn every_fixture_gives_its_patch_and_is_idempotent() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .expect("fixtures dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    names.sort();
    assert!(names.len() >= 14, "fixtures missing: {names:?}");
    for path in names {
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        let fx: Fixture =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect(&name);
        let body = serde_json::to_vec(&fx.review).expect("json");
        let req = review::decode(&body).map_err(|(e, _)| e).expect(&name);
        let object = req.object.clone().expect("object");
        let sites = mutate::plan(&req.kind.kind, &object, req.old_object.as_ref()).expect(&name);
        let ops = mutate::patch(&sites, |s| fx.digests.get(&s.image).map(String::as_str));
        assert_eq!(
            serde_json::to_value(&ops).expect("json"),
            fx.patch,
            "{name}"
        );

        // The response carries the uid and exactly this patch.
        let resp = review::Response::allow(&req.uid)
            .with_patch(&ops)
            .into_review();
        assert_eq!(
            resp["response"]["uid"], fx.review["request"]["uid"],
            "{name}"
        );

        // Reinvocation: the patched object yields no further patch, on CREATE and UPDATE.
        let mut patched = object.clone();
        mutate::apply(&mut patched, &ops).expect(&name);
        // (The API server reinvokes with the same oldObject.)
        let again = mutate::plan(&req.kind.kind, &patched, req.old_object.as_ref()).expect(&name);
        let more = mutate::patch(&again, |s| fx.digests.get(&s.image).map(String::as_str));
        assert!(more.is_empty(), "{name}: second run patched {more:?}");
        let as_update = mutate::plan(&req.kind.kind, &patched, Some(&patched)).expect(&name);
        assert!(
            as_update.iter().all(|s| s.prior == Prior::Unchanged),
            "{name}"
        );
    }
}

#[test]
fn broken_reviews_are_errors_with_the_uid_when_known() {
    let cases: [(&str, &[u8], Option<&str>); 5] = [
        ("empty body", b"", None),
        ("invalid json", b"{\"apiVersion\":", None),
        ("wrong kind", br#"{"apiVersion":"admission.k8s.io/v1","kind":"Pod","request":{"uid":"u1"}}"#, Some("u1")),
        ("missing object", br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u2","kind":{"kind":"Pod"},"operation":"CREATE"}}"#, Some("u2")),
        ("object not an object", br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u3","kind":{"kind":"Pod"},"operation":"CREATE","object":"x"}}"#, Some("u3")),
    ];
    for (name, body, uid) in cases {
        let (_, got) = review::decode(body).expect_err(name);
        assert_eq!(got.as_deref(), uid, "{name}");
    }
}

/// Truncations and byte flips of every fixture: decoding and planning may fail, never panic.
#[test]
fn garbage_never_panics() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut seed: u64 = 0x5eed;
    let mut next = move || {
        // xorshift: deterministic, no dependency.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for entry in std::fs::read_dir(&dir)
        .expect("fixtures dir")
        .filter_map(Result::ok)
    {
        let fx: Value =
            serde_json::from_slice(&std::fs::read(entry.path()).expect("read")).expect("json");
        let body = serde_json::to_vec(&fx["review"]).expect("json");
        let mut inputs: Vec<Vec<u8>> = (0..body.len())
            .step_by(7)
            .map(|n| body[..n].to_vec())
            .collect();
        for _ in 0..300 {
            let mut b = body.clone();
            for _ in 0..3 {
                let i = (next() as usize) % b.len();
                b[i] = (next() % 256) as u8;
            }
            inputs.push(b);
        }
        for input in inputs {
            if let Ok(req) = review::decode(&input)
                && let Some(obj) = &req.object
            {
                let _ = mutate::plan(&req.kind.kind, obj, req.old_object.as_ref());
            }
        }
    }
}
