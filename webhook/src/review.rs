//! The `admission.k8s.io/v1` AdmissionReview envelope: decoding a request with errors that say
//! exactly what is wrong, and encoding the response.
//!
//! Only the fields the webhook uses are decoded; the object itself stays a `serde_json::Value`
//! so that unknown fields survive and JSON Pointers computed on it are exact. Every response
//! echoes the request `uid`, which the API server requires to match.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::mutate::PatchOp;

pub const API_VERSION: &str = "admission.k8s.io/v1";
pub const KIND: &str = "AdmissionReview";

/// What went wrong with a request envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReviewError {
    #[error("body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("body is not a JSON object")]
    NotAnObject,
    #[error("apiVersion is {0:?}, expected \"admission.k8s.io/v1\"")]
    WrongApiVersion(String),
    #[error("kind is {0:?}, expected \"AdmissionReview\"")]
    WrongKind(String),
    #[error("request is missing")]
    MissingRequest,
    #[error("request.{0} is missing or not {1}")]
    BadField(&'static str, &'static str),
}

/// The group/version/kind of the object under review.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Gvk {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub kind: String,
}

/// The operation being admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Create,
    Update,
    Delete,
    Connect,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Create => "CREATE",
            Operation::Update => "UPDATE",
            Operation::Delete => "DELETE",
            Operation::Connect => "CONNECT",
        }
    }
}

/// A decoded admission request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub uid: String,
    pub kind: Gvk,
    pub sub_resource: Option<String>,
    pub operation: Operation,
    pub namespace: String,
    pub name: String,
    pub object: Option<Value>,
    pub old_object: Option<Value>,
    pub dry_run: bool,
    pub username: String,
}

impl Request {
    /// The object's name; pods created by controllers have only `metadata.generateName` here.
    pub fn display_name(&self) -> String {
        if !self.name.is_empty() {
            return self.name.clone();
        }
        self.object
            .as_ref()
            .and_then(|o| o.pointer("/metadata/generateName"))
            .and_then(Value::as_str)
            .map(|g| format!("{g}*"))
            .unwrap_or_default()
    }
}

/// The `uid` of a request, if the body has one, even when the rest of it is broken: it lets
/// the webhook answer a broken review with a proper response instead of a bare 400.
pub fn uid_of(body: &Value) -> Option<String> {
    body.pointer("/request/uid")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
}

/// Parses JSON, then decodes the envelope. Errors carry the uid when it could be read.
pub fn decode(body: &[u8]) -> Result<Request, (ReviewError, Option<String>)> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| (ReviewError::InvalidJson(e.to_string()), None))?;
    let uid = uid_of(&v);
    decode_value(&v).map_err(|e| (e, uid))
}

/// Decodes an already parsed envelope.
pub fn decode_value(v: &Value) -> Result<Request, ReviewError> {
    let top = v.as_object().ok_or(ReviewError::NotAnObject)?;
    let api_version = top
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if api_version != API_VERSION {
        return Err(ReviewError::WrongApiVersion(api_version.to_owned()));
    }
    let kind = top.get("kind").and_then(Value::as_str).unwrap_or_default();
    if kind != KIND {
        return Err(ReviewError::WrongKind(kind.to_owned()));
    }
    let req = top
        .get("request")
        .and_then(Value::as_object)
        .ok_or(ReviewError::MissingRequest)?;
    let string = |f: &'static str| req.get(f).and_then(Value::as_str).map(str::to_owned);
    let uid = string("uid")
        .filter(|u| !u.is_empty())
        .ok_or(ReviewError::BadField("uid", "a non-empty string"))?;
    let gvk: Gvk = req
        .get("kind")
        .and_then(|k| Gvk::deserialize(k).ok())
        .filter(|k| !k.kind.is_empty())
        .ok_or(ReviewError::BadField("kind", "a group/version/kind"))?;
    let operation = match string("operation").as_deref() {
        Some("CREATE") => Operation::Create,
        Some("UPDATE") => Operation::Update,
        Some("DELETE") => Operation::Delete,
        Some("CONNECT") => Operation::Connect,
        _ => {
            return Err(ReviewError::BadField(
                "operation",
                "CREATE, UPDATE, DELETE or CONNECT",
            ));
        }
    };
    let object = req.get("object").filter(|o| !o.is_null()).cloned();
    if matches!(operation, Operation::Create | Operation::Update)
        && !object.as_ref().is_some_and(Value::is_object)
    {
        return Err(ReviewError::BadField("object", "an object"));
    }
    let old_object = req.get("oldObject").filter(|o| o.is_object()).cloned();
    Ok(Request {
        uid,
        kind: gvk,
        sub_resource: string("subResource").filter(|s| !s.is_empty()),
        operation,
        namespace: string("namespace").unwrap_or_default(),
        name: string("name").unwrap_or_default(),
        object,
        old_object,
        dry_run: req.get("dryRun").and_then(Value::as_bool).unwrap_or(false),
        username: req
            .get("userInfo")
            .and_then(|u| u.get("username"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
    })
}

/// `status` of a response (a `metav1.Status` subset).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    pub code: u16,
    pub message: String,
}

/// An admission response, serialised inside an AdmissionReview.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    pub uid: String,
    pub allowed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch_type: Option<&'static str>,
    /// Base64 of the JSON Patch document.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub audit_annotations: BTreeMap<String, String>,
}

impl Response {
    /// Allows the object unchanged.
    pub fn allow(uid: &str) -> Response {
        Response {
            uid: uid.to_owned(),
            allowed: true,
            patch_type: None,
            patch: None,
            status: None,
            warnings: Vec::new(),
            audit_annotations: BTreeMap::new(),
        }
    }

    /// Denies with an HTTP-like status code and a message the user sees.
    pub fn deny(uid: &str, code: u16, message: impl Into<String>) -> Response {
        Response {
            allowed: false,
            status: Some(Status {
                code,
                message: message.into(),
            }),
            ..Response::allow(uid)
        }
    }

    /// Attaches a JSON Patch; an empty patch attaches nothing.
    pub fn with_patch(mut self, ops: &[PatchOp]) -> Response {
        if ops.is_empty() {
            return self;
        }
        // Serialising a Vec of plain structs cannot fail.
        let json = serde_json::to_vec(ops).unwrap_or_default();
        self.patch_type = Some("JSONPatch");
        self.patch = Some(base64::engine::general_purpose::STANDARD.encode(json));
        self
    }

    /// Like [`Response::with_patch`] for operations already in JSON form (the grant annotation
    /// needs `add` of objects and `remove`).
    pub fn with_json_patch(mut self, ops: &[Value]) -> Response {
        if ops.is_empty() {
            return self;
        }
        let json = serde_json::to_vec(ops).unwrap_or_default();
        self.patch_type = Some("JSONPatch");
        self.patch = Some(base64::engine::general_purpose::STANDARD.encode(json));
        self
    }

    /// Wraps the response in its AdmissionReview envelope.
    pub fn into_review(self) -> Value {
        serde_json::json!({
            "apiVersion": API_VERSION,
            "kind": KIND,
            "response": self,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn review(request: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({"apiVersion": API_VERSION, "kind": KIND, "request": request}))
            .expect("json")
    }

    #[test]
    fn decode_table() {
        let good = json!({
            "uid": "u1", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE", "namespace": "ns", "name": "p",
            "object": {"spec": {}}, "userInfo": {"username": "alice"}
        });
        let mut no_uid = good.clone();
        no_uid["uid"] = json!("");
        let mut no_object = good.clone();
        no_object["object"] = Value::Null;
        let mut bad_op = good.clone();
        bad_op["operation"] = json!("PATCH");
        let mut delete = good.clone();
        delete["operation"] = json!("DELETE");
        delete["object"] = Value::Null;
        let mut no_kind = good.clone();
        no_kind["kind"] = json!("Pod");

        type Want = Result<&'static str, (ReviewError, Option<&'static str>)>;
        let cases: Vec<(&str, Vec<u8>, Want)> = vec![
            ("good", review(good.clone()), Ok("u1")),
            ("delete needs no object", review(delete), Ok("u1")),
            ("not json", b"{".to_vec(), Err((ReviewError::InvalidJson(String::new()), None))),
            ("array", b"[]".to_vec(), Err((ReviewError::NotAnObject, None))),
            (
                "v1beta1",
                serde_json::to_vec(&json!({"apiVersion": "admission.k8s.io/v1beta1", "kind": KIND, "request": good}))
                    .expect("json"),
                Err((ReviewError::WrongApiVersion("admission.k8s.io/v1beta1".into()), Some("u1"))),
            ),
            (
                "wrong kind",
                serde_json::to_vec(&json!({"apiVersion": API_VERSION, "kind": "Pod"})).expect("json"),
                Err((ReviewError::WrongKind("Pod".into()), None)),
            ),
            (
                "no request",
                serde_json::to_vec(&json!({"apiVersion": API_VERSION, "kind": KIND})).expect("json"),
                Err((ReviewError::MissingRequest, None)),
            ),
            ("empty uid", review(no_uid), Err((ReviewError::BadField("uid", "a non-empty string"), None))),
            ("no object", review(no_object), Err((ReviewError::BadField("object", "an object"), Some("u1")))),
            (
                "bad operation",
                review(bad_op),
                Err((ReviewError::BadField("operation", "CREATE, UPDATE, DELETE or CONNECT"), Some("u1"))),
            ),
            ("kind not gvk", review(no_kind), Err((ReviewError::BadField("kind", "a group/version/kind"), Some("u1")))),
        ];
        for (name, body, want) in cases {
            let got = decode(&body);
            match (got, want) {
                (Ok(r), Ok(uid)) => assert_eq!(r.uid, uid, "{name}"),
                (Err((ReviewError::InvalidJson(_), u)), Err((ReviewError::InvalidJson(_), w))) => {
                    assert_eq!(u.as_deref(), w, "{name}")
                }
                (Err((e, u)), Err((we, wu))) => {
                    assert_eq!(e, we, "{name}");
                    assert_eq!(u.as_deref(), wu, "{name}");
                }
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn decoded_fields() {
        let r = decode(&review(json!({
            "uid": "u2", "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
            "operation": "UPDATE", "subResource": "", "namespace": "ns",
            "object": {"metadata": {"generateName": "web-"}}, "oldObject": {"a": 1}, "dryRun": true
        })))
        .expect("decode");
        assert_eq!(r.kind.kind, "Deployment");
        assert_eq!(r.operation, Operation::Update);
        assert_eq!(r.sub_resource, None);
        assert!(r.dry_run);
        assert_eq!(r.old_object, Some(json!({"a": 1})));
        assert_eq!(r.display_name(), "web-*");
    }

    #[test]
    fn response_shape() {
        let ops = vec![PatchOp {
            op: "replace",
            path: "/spec/containers/0/image".into(),
            value: "a@b".into(),
        }];
        let v = Response::allow("u3").with_patch(&ops).into_review();
        assert_eq!(v["apiVersion"], API_VERSION);
        assert_eq!(v["response"]["uid"], "u3");
        assert_eq!(v["response"]["patchType"], "JSONPatch");
        let patch = base64::engine::general_purpose::STANDARD
            .decode(v["response"]["patch"].as_str().expect("patch"))
            .expect("b64");
        let patch: Value = serde_json::from_slice(&patch).expect("json");
        assert_eq!(
            patch,
            json!([{"op": "replace", "path": "/spec/containers/0/image", "value": "a@b"}])
        );
        let d = Response::deny("u4", 403, "no").into_review();
        assert_eq!(
            d["response"],
            json!({"uid": "u4", "allowed": false, "status": {"code": 403, "message": "no"}})
        );
        let empty = Response::allow("u5").with_patch(&[]).into_review();
        assert_eq!(empty["response"], json!({"uid": "u5", "allowed": true}));
    }
}
