//! The pure mutation: where the images of a workload object live, which of them to pin, and
//! the JSON Patch that pins them.
//!
//! Nothing here does I/O. The webhook (and the offline `pin` command) runs it in three steps:
//! [`plan`] lists every image site of an object and says which ones want a digest, the caller
//! resolves those images however it likes, and [`patch`] turns the answers into JSON Patch
//! `replace` operations on exact paths (RFC 6902 §4.3: `replace` fails if the path is absent, so
//! a patch computed for one object can never silently create fields in another).
//!
//! Pods and pod templates are handled by the same code, so a template and the pods made from
//! it are pinned the same way. On UPDATE an image the old object already had is left exactly as
//! it is: pinning it now would change the template (a new ReplicaSet, a rollout nobody asked
//! for) or a running pod's spec (a container restart). A re-applied unpinned tag whose old
//! object carried a pin keeps that pin ([`Prior::PinnedBefore`]).

use serde::Serialize;
use serde_json::Value;

/// The object kinds the webhook understands, and where their pod spec lives.
/// `None` for kinds it leaves alone.
pub fn pod_spec_pointer(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "Pod" => "/spec",
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => "/spec/template/spec",
        "CronJob" => "/spec/jobTemplate/spec/template/spec",
        "PodTemplate" => "/template/spec",
        _ => return None,
    })
}

/// Where in a pod spec an image reference sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Role {
    Container,
    InitContainer,
    EphemeralContainer,
    /// `spec.volumes[].image.reference` (image volumes, Kubernetes 1.31+).
    ImageVolume,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Container => "container",
            Role::InitContainer => "initContainer",
            Role::EphemeralContainer => "ephemeralContainer",
            Role::ImageVolume => "imageVolume",
        }
    }

    /// The pod spec field holding the list, and the path inside one entry to the image.
    fn fields(self) -> (&'static str, &'static str) {
        match self {
            Role::Container => ("containers", "/image"),
            Role::InitContainer => ("initContainers", "/image"),
            Role::EphemeralContainer => ("ephemeralContainers", "/image"),
            Role::ImageVolume => ("volumes", "/image/reference"),
        }
    }

    const ALL: [Role; 4] = [
        Role::Container,
        Role::InitContainer,
        Role::EphemeralContainer,
        Role::ImageVolume,
    ];
}

/// What the old object (on UPDATE) said about a site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prior {
    /// CREATE, or a container/volume the old object did not have, or a changed image.
    New,
    /// The old object had exactly this image string here: leave it alone.
    Unchanged,
    /// The old object had this image pinned (`<image>@<digest>`); keep that digest.
    PinnedBefore(String),
}

/// One image reference inside an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    /// JSON Pointer (RFC 6901) of the image string.
    pub pointer: String,
    pub role: Role,
    /// Container or volume name (empty when the object has none).
    pub name: String,
    /// The image exactly as written.
    pub image: String,
    pub prior: Prior,
}

impl Site {
    /// True when the image already names a digest; such images are never touched.
    pub fn is_pinned(&self) -> bool {
        is_pinned(&self.image)
    }

    /// True when the webhook should look up a digest for this site.
    pub fn wants_resolution(&self) -> bool {
        !self.is_pinned() && self.prior == Prior::New
    }
}

/// `true` for references that carry `@<digest>`.
pub fn is_pinned(image: &str) -> bool {
    image.contains('@')
}

/// Errors of the pure mutation: the object is not shaped like the kind it claims to be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MutateError {
    #[error("{pointer} should be {expected}")]
    Malformed {
        pointer: String,
        expected: &'static str,
    },
}

/// Lists every image site of `object` (of kind `kind`). Kinds the webhook does not handle have
/// no sites. `old` is the previous version of the object on UPDATE.
pub fn plan(kind: &str, object: &Value, old: Option<&Value>) -> Result<Vec<Site>, MutateError> {
    let Some(spec_ptr) = pod_spec_pointer(kind) else {
        return Ok(Vec::new());
    };
    let mut sites = Vec::new();
    let Some(spec) = object.pointer(spec_ptr) else {
        return Ok(sites);
    };
    if !spec.is_object() {
        return Err(malformed(spec_ptr, "an object"));
    }
    let old_spec = old.and_then(|o| o.pointer(spec_ptr));
    for role in Role::ALL {
        let (field, image_path) = role.fields();
        let list_ptr = format!("{spec_ptr}/{field}");
        let Some(list) = spec.get(field) else {
            continue;
        };
        if list.is_null() {
            continue;
        }
        let Some(items) = list.as_array() else {
            return Err(malformed(&list_ptr, "an array"));
        };
        for (i, item) in items.iter().enumerate() {
            let item_ptr = format!("{list_ptr}/{i}");
            if !item.is_object() {
                return Err(malformed(&item_ptr, "an object"));
            }
            let name = item
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let image = match item.pointer(image_path) {
                None | Some(Value::Null) => continue, // volumes of other types; no image yet
                Some(Value::String(s)) => s.clone(),
                Some(_) => return Err(malformed(&format!("{item_ptr}{image_path}"), "a string")),
            };
            if image.is_empty() {
                continue;
            }
            let prior = prior_of(old_spec, field, &name, i, image_path, &image);
            sites.push(Site {
                pointer: format!("{item_ptr}{image_path}"),
                role,
                name,
                image,
                prior,
            });
        }
    }
    Ok(sites)
}

fn malformed(pointer: &str, expected: &'static str) -> MutateError {
    MutateError::Malformed {
        pointer: pointer.to_owned(),
        expected,
    }
}

/// Finds the same container (by name; by index for nameless entries) in the old spec.
fn prior_of(
    old_spec: Option<&Value>,
    field: &str,
    name: &str,
    index: usize,
    image_path: &str,
    image: &str,
) -> Prior {
    let Some(old_items) = old_spec
        .and_then(|s| s.get(field))
        .and_then(Value::as_array)
    else {
        return Prior::New;
    };
    let old_item = if name.is_empty() {
        old_items.get(index)
    } else {
        old_items
            .iter()
            .find(|c| c.get("name").and_then(Value::as_str) == Some(name))
    };
    let Some(old_image) = old_item
        .and_then(|c| c.pointer(image_path))
        .and_then(Value::as_str)
    else {
        return Prior::New;
    };
    if old_image == image {
        return Prior::Unchanged;
    }
    match old_image.split_once('@') {
        Some((unpinned, digest)) if unpinned == image && !digest.is_empty() => {
            Prior::PinnedBefore(digest.to_owned())
        }
        _ => Prior::New,
    }
}

/// One JSON Patch operation. Only `replace` is ever produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PatchOp {
    pub op: &'static str,
    pub path: String,
    pub value: String,
}

/// The pinned form of `image`: the name and tag as written, plus `@digest`.
pub fn pinned(image: &str, digest: &str) -> String {
    format!("{image}@{digest}")
}

/// Builds the patch: a `replace` for every unpinned site with a digest. `digest_for` is asked
/// only about sites that want resolution; sites with [`Prior::PinnedBefore`] get their old
/// digest back. The result is empty when there is nothing to do, so running the webhook on its
/// own output changes nothing (reinvocation is idempotent).
pub fn patch<'a>(
    sites: &[Site],
    mut digest_for: impl FnMut(&Site) -> Option<&'a str>,
) -> Vec<PatchOp> {
    let mut ops = Vec::new();
    for site in sites {
        if site.is_pinned() {
            continue;
        }
        let digest = match &site.prior {
            Prior::Unchanged => continue,
            Prior::PinnedBefore(d) => Some(d.as_str()),
            Prior::New => digest_for(site),
        };
        if let Some(d) = digest {
            ops.push(PatchOp {
                op: "replace",
                path: site.pointer.clone(),
                value: pinned(&site.image, d),
            });
        }
    }
    ops
}

/// Applies `replace` operations to a JSON value (used by the offline `pin` command and tests).
/// Fails on a path that does not exist, as RFC 6902 §4.3 requires.
pub fn apply(object: &mut Value, ops: &[PatchOp]) -> Result<(), MutateError> {
    for op in ops {
        let slot = object
            .pointer_mut(&op.path)
            .ok_or_else(|| malformed(&op.path, "an existing path"))?;
        *slot = Value::String(op.value.clone());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    fn pod_spec() -> Value {
        json!({
            "initContainers": [{"name": "init", "image": "127.0.0.1:5000/a/init:v1"}],
            "containers": [
                {"name": "app", "image": "127.0.0.1:5000/a/app:v1"},
                {"name": "side", "image": format!("127.0.0.1:5000/a/side:v1@{D1}")}
            ],
            "ephemeralContainers": [{"name": "dbg", "image": "127.0.0.1:5000/a/dbg"}],
            "volumes": [
                {"name": "data", "emptyDir": {}},
                {"name": "models", "image": {"reference": "127.0.0.1:5000/a/models:v2"}}
            ]
        })
    }

    fn wrap(kind: &str, spec: Value) -> Value {
        let template = json!({"metadata": {}, "spec": spec});
        match kind {
            "Pod" => json!({"kind": "Pod", "spec": template["spec"]}),
            "CronJob" => json!({"spec": {"jobTemplate": {"spec": {"template": template}}}}),
            "PodTemplate" => json!({"template": template}),
            _ => json!({"spec": {"template": template}}),
        }
    }

    #[test]
    fn every_kind_has_the_same_sites() {
        let kinds = [
            ("Pod", "/spec"),
            ("Deployment", "/spec/template/spec"),
            ("StatefulSet", "/spec/template/spec"),
            ("DaemonSet", "/spec/template/spec"),
            ("ReplicaSet", "/spec/template/spec"),
            ("ReplicationController", "/spec/template/spec"),
            ("Job", "/spec/template/spec"),
            ("CronJob", "/spec/jobTemplate/spec/template/spec"),
            ("PodTemplate", "/template/spec"),
        ];
        for (kind, base) in kinds {
            let sites = plan(kind, &wrap(kind, pod_spec()), None).expect("plan");
            let got: Vec<(String, Role, bool)> = sites
                .iter()
                .map(|s| (s.pointer.clone(), s.role, s.wants_resolution()))
                .collect();
            let want = vec![
                (format!("{base}/containers/0/image"), Role::Container, true),
                (format!("{base}/containers/1/image"), Role::Container, false),
                (
                    format!("{base}/initContainers/0/image"),
                    Role::InitContainer,
                    true,
                ),
                (
                    format!("{base}/ephemeralContainers/0/image"),
                    Role::EphemeralContainer,
                    true,
                ),
                (
                    format!("{base}/volumes/1/image/reference"),
                    Role::ImageVolume,
                    true,
                ),
            ];
            assert_eq!(got, want, "{kind}");
        }
    }

    #[test]
    fn patch_then_plan_again_is_empty() {
        let obj = wrap("Deployment", pod_spec());
        let sites = plan("Deployment", &obj, None).expect("plan");
        let ops = patch(&sites, |_| Some(D1));
        assert_eq!(ops.len(), 4);
        assert!(ops.iter().all(|o| o.op == "replace"));
        let mut pinned_obj = obj.clone();
        apply(&mut pinned_obj, &ops).expect("apply");
        assert_eq!(
            pinned_obj.pointer("/spec/template/spec/containers/0/image"),
            Some(&json!(format!("127.0.0.1:5000/a/app:v1@{D1}")))
        );
        let again = plan("Deployment", &pinned_obj, None).expect("plan");
        assert!(
            patch(&again, |_| Some(D1)).is_empty(),
            "reinvocation is a no-op"
        );
    }

    #[test]
    fn update_rules() {
        let old = json!({"spec": {"containers": [
            {"name": "same", "image": "r.io/a:v1"},
            {"name": "repinned", "image": format!("r.io/b:v1@{D1}")},
            {"name": "changed", "image": "r.io/c:v1"}
        ]}});
        let new = json!({"spec": {"containers": [
            {"name": "same", "image": "r.io/a:v1"},
            {"name": "repinned", "image": "r.io/b:v1"},
            {"name": "changed", "image": "r.io/c:v2"},
            {"name": "added", "image": "r.io/d:v1"}
        ]}});
        let sites = plan("Pod", &new, Some(&old)).expect("plan");
        let priors: Vec<(&str, Prior)> = sites
            .iter()
            .map(|s| (s.name.as_str(), s.prior.clone()))
            .collect();
        assert_eq!(
            priors,
            vec![
                ("same", Prior::Unchanged),
                ("repinned", Prior::PinnedBefore(D1.into())),
                ("changed", Prior::New),
                ("added", Prior::New),
            ]
        );
        let mut asked = Vec::new();
        let ops = patch(&sites, |s| {
            asked.push(s.name.clone());
            Some("sha256:2")
        });
        assert_eq!(asked, vec!["changed", "added"]);
        let values: Vec<&str> = ops.iter().map(|o| o.value.as_str()).collect();
        assert_eq!(
            values,
            vec![
                format!("r.io/b:v1@{D1}").as_str(),
                "r.io/c:v2@sha256:2",
                "r.io/d:v1@sha256:2"
            ]
        );
    }

    #[test]
    fn malformed_and_foreign_objects() {
        let cases: Vec<(&str, &str, Value, Result<usize, MutateError>)> = vec![
            (
                "service is ignored",
                "Service",
                json!({"spec": {"containers": 1}}),
                Ok(0),
            ),
            ("no spec", "Pod", json!({"metadata": {}}), Ok(0)),
            (
                "empty containers",
                "Pod",
                json!({"spec": {"containers": null}}),
                Ok(0),
            ),
            (
                "image missing",
                "Pod",
                json!({"spec": {"containers": [{"name": "a"}]}}),
                Ok(0),
            ),
            (
                "containers not a list",
                "Pod",
                json!({"spec": {"containers": {"a": 1}}}),
                Err(malformed("/spec/containers", "an array")),
            ),
            (
                "image not a string",
                "Pod",
                json!({"spec": {"containers": [{"name": "a", "image": 5}]}}),
                Err(malformed("/spec/containers/0/image", "a string")),
            ),
            (
                "spec not an object",
                "Job",
                json!({"spec": {"template": {"spec": []}}}),
                Err(malformed("/spec/template/spec", "an object")),
            ),
        ];
        for (name, kind, obj, want) in cases {
            assert_eq!(plan(kind, &obj, None).map(|s| s.len()), want, "{name}");
        }
    }

    #[test]
    fn apply_refuses_missing_paths() {
        let mut v = json!({"spec": {}});
        let op = PatchOp {
            op: "replace",
            path: "/spec/containers/0/image".into(),
            value: "x".into(),
        };
        assert!(apply(&mut v, &[op]).is_err());
    }

    #[test]
    fn pointer_escaping_is_not_needed() {
        // Pointers are built from fixed field names and indexes only: container names (which
        // may contain '~' or '/') never appear in a path.
        let obj = json!({"spec": {"containers": [{"name": "a/b~c", "image": "r.io/x:1"}]}});
        let sites = plan("Pod", &obj, None).expect("plan");
        assert_eq!(sites[0].pointer, "/spec/containers/0/image");
    }
}
