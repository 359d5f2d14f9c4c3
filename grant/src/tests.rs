use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::*;

const NS: &str = "team-a";
const REPO: &str = "127.0.0.1:5000/rig/private";
const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const T0: u64 = 1_800_000_000;
const TTL: Duration = Duration::from_secs(600);

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn claims_json(aud: &str, iss: &str) -> Value {
    json!({"iss": iss, "aud": aud, "sub": NS, "repo": REPO, "digest": DIGEST,
           "iat": T0, "nbf": T0, "exp": T0 + 600, "jti": "00"})
}

/// Signs arbitrary claims with an arbitrary header and key (the attacker's toolbox).
fn raw(header: Header, claims: &Value, key: &EncodingKey) -> String {
    jsonwebtoken::encode(&header, claims, key).expect("encode")
}

fn ed_header(kid: Option<&str>) -> Header {
    let mut h = Header::new(Algorithm::EdDSA);
    h.kid = kid.map(str::to_owned);
    h
}

fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

/// Replaces one of the three dot-separated parts of a token.
fn with_part(token: &str, index: usize, part: &str) -> String {
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    parts[index] = part.to_owned();
    parts.join(".")
}

struct Keys {
    signer: Signer,
    private_pem: String,
    public_pem: String,
}

fn keys() -> Keys {
    let (private_pem, public_pem) = generate();
    Keys {
        signer: Signer::from_pem(private_pem.as_bytes()).expect("signer"),
        private_pem,
        public_pem,
    }
}

fn reason(r: Result<Claims, GrantError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(e) => e.reason(),
    }
}

#[test]
fn sign_and_verify_round_trip() {
    let k = keys();
    assert_eq!(k.signer.public_key_pem(), k.public_pem);
    assert_eq!(k.signer.kid().len(), 16);
    let set = KeySet::from_pems([k.public_pem.as_bytes()]).expect("keyset");
    assert_eq!(set.len(), 1);
    assert_eq!(set.kids(), [k.signer.kid()]);
    let token = k.signer.sign(NS, REPO, DIGEST, TTL, at(T0)).expect("sign");
    assert!(token.len() < 1024, "a grant is small: {}", token.len());
    let header = jsonwebtoken::decode_header(&token).expect("header");
    assert_eq!(header.alg, Algorithm::EdDSA);
    assert_eq!(header.kid.as_deref(), Some(k.signer.kid()));
    let c = set
        .verify(&token, DEFAULT_AUDIENCE, at(T0 + 1))
        .expect("verify");
    assert_eq!(
        (
            c.iss.as_str(),
            c.aud.as_str(),
            c.sub.as_str(),
            c.repo.as_str(),
            c.digest.as_str()
        ),
        (ISSUER, DEFAULT_AUDIENCE, NS, REPO, DIGEST)
    );
    assert_eq!(
        (c.iat, c.nbf, c.exp),
        (T0 as i64, T0 as i64, T0 as i64 + 600)
    );
    assert_eq!(c.jti.len(), 32);
    let again = k.signer.sign(NS, REPO, DIGEST, TTL, at(T0)).expect("sign");
    assert_ne!(
        set.verify(&again, DEFAULT_AUDIENCE, at(T0))
            .expect("verify")
            .jti,
        c.jti,
        "jti is unique"
    );
}

#[test]
fn verify_table() {
    let k = keys();
    let other = keys();
    let set = KeySet::from_pems([k.public_pem.as_bytes()]).expect("keyset");
    let ed = EncodingKey::from_ed_pem(k.private_pem.as_bytes()).expect("ed key");
    let other_ed = EncodingKey::from_ed_pem(other.private_pem.as_bytes()).expect("ed key");
    let kid = k.signer.kid().to_owned();
    let good = k.signer.sign(NS, REPO, DIGEST, TTL, at(T0)).expect("sign");
    let [h, p, s]: [&str; 3] = good
        .split('.')
        .collect::<Vec<_>>()
        .try_into()
        .expect("three parts");

    // A payload claiming another namespace, spliced onto the good header and signature.
    let mut forged_claims = claims_json(DEFAULT_AUDIENCE, ISSUER);
    forged_claims["sub"] = json!("team-b");
    let forged_payload = b64(forged_claims.to_string().as_bytes());
    // The signature with its first byte flipped.
    let mut sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .expect("sig");
    sig[0] ^= 1;
    let flipped_sig = b64(&sig);
    let none_header = b64(br#"{"alg":"none","typ":"JWT"}"#);
    let hs256 = raw(
        {
            let mut hd = Header::new(Algorithm::HS256);
            hd.kid = Some(kid.clone());
            hd
        },
        &claims_json(DEFAULT_AUDIENCE, ISSUER),
        &EncodingKey::from_secret(k.public_pem.as_bytes()),
    );
    let hs256_nokid = raw(
        Header::new(Algorithm::HS256),
        &claims_json(DEFAULT_AUDIENCE, ISSUER),
        &EncodingKey::from_secret(k.public_pem.as_bytes()),
    );
    let mut missing_repo = claims_json(DEFAULT_AUDIENCE, ISSUER);
    missing_repo.as_object_mut().expect("object").remove("repo");
    let mut empty_sub = claims_json(DEFAULT_AUDIENCE, ISSUER);
    empty_sub["sub"] = json!("");

    let now = at(T0 + 10);
    // (name, token, want reason)
    let cases: Vec<(&str, String, &str)> = vec![
        ("good", good.clone(), "ok"),
        (
            "no kid: every key is tried",
            raw(ed_header(None), &claims_json(DEFAULT_AUDIENCE, ISSUER), &ed),
            "ok",
        ),
        ("empty", String::new(), "malformed"),
        ("garbage", "not a token".into(), "malformed"),
        ("two parts", format!("{h}.{p}"), "malformed"),
        ("four parts", format!("{good}.{s}"), "malformed"),
        ("header not base64", with_part(&good, 0, "%%%"), "malformed"),
        (
            "header not json",
            with_part(&good, 0, &b64(b"[1,2")),
            "malformed",
        ),
        (
            "too large",
            format!("{h}.{}.{s}", "A".repeat(9000)),
            "too_large",
        ),
        (
            "tampered payload",
            with_part(&good, 1, &forged_payload),
            "bad_signature",
        ),
        (
            "tampered signature",
            with_part(&good, 2, &flipped_sig),
            "bad_signature",
        ),
        (
            "signature removed",
            with_part(&good, 2, ""),
            "bad_signature",
        ),
        (
            "alg none",
            format!("{none_header}.{p}."),
            "malformed", // jsonwebtoken does not even know `none`
        ),
        (
            "alg HS256 keyed with the public PEM",
            hs256,
            "wrong_algorithm",
        ),
        ("alg HS256, no kid", hs256_nokid, "wrong_algorithm"),
        (
            "unknown kid",
            raw(
                ed_header(Some("0000000000000000")),
                &claims_json(DEFAULT_AUDIENCE, ISSUER),
                &ed,
            ),
            "unknown_key",
        ),
        (
            "another key claiming our kid",
            raw(
                ed_header(Some(&kid)),
                &claims_json(DEFAULT_AUDIENCE, ISSUER),
                &other_ed,
            ),
            "bad_signature",
        ),
        (
            "another key, no kid",
            raw(
                ed_header(None),
                &claims_json(DEFAULT_AUDIENCE, ISSUER),
                &other_ed,
            ),
            "bad_signature",
        ),
        (
            "wrong issuer",
            raw(
                ed_header(Some(&kid)),
                &claims_json(DEFAULT_AUDIENCE, "someone"),
                &ed,
            ),
            "wrong_issuer",
        ),
        (
            "wrong audience",
            raw(
                ed_header(Some(&kid)),
                &claims_json("elsewhere", ISSUER),
                &ed,
            ),
            "wrong_audience",
        ),
        (
            "missing claim",
            raw(ed_header(Some(&kid)), &missing_repo, &ed),
            "malformed",
        ),
        (
            "empty namespace",
            raw(ed_header(Some(&kid)), &empty_sub, &ed),
            "malformed",
        ),
        (
            "payload not an object",
            raw(ed_header(Some(&kid)), &json!([1, 2]), &ed),
            "malformed",
        ),
    ];
    for (name, token, want) in cases {
        assert_eq!(
            reason(set.verify(&token, DEFAULT_AUDIENCE, now)),
            want,
            "{name}"
        );
    }
    assert_eq!(
        reason(KeySet::default().verify(&good, DEFAULT_AUDIENCE, now)),
        "unknown_key",
        "empty key set"
    );
    assert_eq!(
        reason(set.verify(&good, "another-audience", now)),
        "wrong_audience",
        "the verifier's audience decides"
    );
}

#[test]
fn time_edges_with_leeway() {
    let k = keys();
    let set = KeySet::from_pems([k.public_pem.as_bytes()]).expect("keyset");
    let token = k.signer.sign(NS, REPO, DIGEST, TTL, at(T0)).expect("sign");
    let exp = T0 + 600;
    // (name, now, want)
    let cases = [
        ("31 s before nbf", T0 - 31, "not_yet_valid"),
        ("30 s before nbf (leeway)", T0 - 30, "ok"),
        ("at nbf", T0, "ok"),
        ("at exp", exp, "ok"),
        ("30 s after exp (leeway)", exp + 30, "ok"),
        ("31 s after exp", exp + 31, "expired"),
        ("a day later", exp + 86_400, "expired"),
        ("before the epoch", 0, "not_yet_valid"),
    ];
    for (name, now, want) in cases {
        assert_eq!(
            reason(set.verify(&token, DEFAULT_AUDIENCE, at(now))),
            want,
            "{name}"
        );
    }
}

#[test]
fn rotation() {
    let (old, new) = (keys(), keys());
    let both =
        KeySet::from_pems([old.public_pem.as_bytes(), new.public_pem.as_bytes()]).expect("keyset");
    assert_eq!(both.len(), 2);
    let only_new = KeySet::from_pems([new.public_pem.as_bytes()]).expect("keyset");
    let t_old = old
        .signer
        .sign(NS, REPO, DIGEST, TTL, at(T0))
        .expect("sign");
    let t_new = new
        .signer
        .sign(NS, REPO, DIGEST, TTL, at(T0))
        .expect("sign");
    // (name, set, token, want)
    let cases = [
        ("old key, both loaded", &both, &t_old, "ok"),
        ("new key, both loaded", &both, &t_new, "ok"),
        ("new key, old removed", &only_new, &t_new, "ok"),
        ("old key after removal", &only_new, &t_old, "unknown_key"),
    ];
    for (name, set, token, want) in cases {
        assert_eq!(
            reason(set.verify(token, DEFAULT_AUDIENCE, at(T0))),
            want,
            "{name}"
        );
    }
    // One file holding both keys is the same set.
    let bundle = format!("{}{}", old.public_pem, new.public_pem);
    assert_eq!(
        KeySet::from_pems([bundle.as_bytes()])
            .expect("bundle")
            .kids(),
        both.kids()
    );
}

#[test]
fn keys_from_openssl_and_bad_pems() {
    // PKCS#8 v1 as `openssl genpkey -algorithm ed25519` writes it (RFC 8410 §10.3 example key).
    let rfc8410 = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n-----END PRIVATE KEY-----\n";
    let signer = Signer::from_pem(rfc8410.as_bytes()).expect("openssl key");
    // Its public key, from the same RFC section.
    assert!(
        signer
            .public_key_pem()
            .contains("MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE="),
        "{}",
        signer.public_key_pem()
    );
    let set = KeySet::from_pems([signer.public_key_pem().as_bytes()]).expect("keyset");
    let token = signer.sign(NS, REPO, DIGEST, TTL, at(T0)).expect("sign");
    assert!(set.verify(&token, DEFAULT_AUDIENCE, at(T0)).is_ok());
    assert!(
        !format!("{signer:?}").contains("MC4C"),
        "Debug hides the key"
    );

    let k = keys();
    // (name, private PEM input, want Ok)
    let private_cases: [(&str, &[u8], bool); 6] = [
        ("generated", k.private_pem.as_bytes(), true),
        ("empty", b"", false),
        ("public key given", k.public_pem.as_bytes(), false),
        (
            "not base64",
            b"-----BEGIN PRIVATE KEY-----\n!!!\n-----END PRIVATE KEY-----\n",
            false,
        ),
        ("no end", b"-----BEGIN PRIVATE KEY-----\nMC4CAQAw\n", false),
        ("not utf-8", b"\xff\xfe", false),
    ];
    for (name, pem, ok) in private_cases {
        assert_eq!(Signer::from_pem(pem).is_ok(), ok, "{name}");
    }
    let two = format!("{}{}", k.private_pem, k.private_pem);
    assert!(
        Signer::from_pem(two.as_bytes()).is_err(),
        "two private keys"
    );
    let rsa_like = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n";
    let public_cases: [(&str, &[u8], bool); 4] = [
        ("generated", k.public_pem.as_bytes(), true),
        ("private key given", k.private_pem.as_bytes(), false),
        ("not ed25519", rsa_like.as_bytes(), false),
        ("empty", b"", false),
    ];
    for (name, pem, ok) in public_cases {
        assert_eq!(KeySet::from_pems([pem]).is_ok(), ok, "{name}");
    }
}

#[test]
fn sign_refuses_empty_fields() {
    let k = keys();
    let cases = [
        ("namespace", "", REPO, DIGEST, TTL),
        ("repo", NS, "", DIGEST, TTL),
        ("digest", NS, REPO, "", TTL),
        ("ttl", NS, REPO, DIGEST, Duration::ZERO),
    ];
    for (name, ns, repo, digest, ttl) in cases {
        let e = k
            .signer
            .sign(ns, repo, digest, ttl, at(T0))
            .expect_err(name);
        assert_eq!(e.reason(), "invalid", "{name}");
    }
}

#[test]
fn load_dir_reads_a_configmap_mount() {
    let (a, b) = (keys(), keys());
    let dir = tempfile::tempdir().expect("tempdir");
    // What the kubelet makes of a ConfigMap: `..<ts>/` holds the files, `..data` links to it,
    // and each visible name links into `..data/`.
    let ts = dir.path().join("..2026_11_23_19_00_00.1");
    std::fs::create_dir(&ts).expect("ts dir");
    std::fs::write(ts.join(format!("{}.pem", a.signer.kid())), &a.public_pem).expect("write");
    std::fs::write(ts.join(format!("{}.pem", b.signer.kid())), &b.public_pem).expect("write");
    std::fs::write(ts.join("README"), "not a key").expect("write");
    std::os::unix::fs::symlink(&ts, dir.path().join("..data")).expect("link");
    for name in [
        format!("{}.pem", a.signer.kid()),
        format!("{}.pem", b.signer.kid()),
        "README".to_owned(),
    ] {
        std::os::unix::fs::symlink(Path::new("..data").join(&name), dir.path().join(&name))
            .expect("link");
    }
    // A hidden key file is not loaded even though it is valid.
    std::fs::write(dir.path().join(".hidden.pem"), keys().public_pem).expect("write");
    let set = KeySet::load_dir(dir.path()).expect("load");
    let mut want = vec![a.signer.kid().to_owned(), b.signer.kid().to_owned()];
    want.sort();
    assert_eq!(set.kids(), want);

    std::fs::write(dir.path().join("broken.pem"), "nope").expect("write");
    let err = KeySet::load_dir(dir.path()).expect_err("broken file");
    assert!(err.to_string().contains("broken.pem"), "{err}");
    assert_eq!(
        KeySet::load_dir(&dir.path().join("missing"))
            .expect_err("missing")
            .reason(),
        "read"
    );
    let empty = tempfile::tempdir().expect("tempdir");
    assert!(
        KeySet::load_dir(empty.path())
            .expect("empty dir")
            .is_empty()
    );
}
