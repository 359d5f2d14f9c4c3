//! Fuzz target body for the pull-grant verifier (`speculum_grant::KeySet::verify`), as a plain
//! function (see `oci.rs` for why). The key is fixed (RFC 8410 §10.3's example key) and so is
//! the clock, so the seeds (grants signed with that key) verify and mutations start from valid
//! tokens. Properties: no panic; an accepted grant names our issuer and audience and is valid
//! at the clock used; verifying twice gives the same answer.

use std::sync::OnceLock;
use std::time::{Duration, UNIX_EPOCH};

use speculum_grant::{DEFAULT_AUDIENCE, ISSUER, KeySet, LEEWAY_SECS};

/// The public half of RFC 8410's example private key
/// (`MC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC`).
const PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n";
/// The seeds were signed at this time with a 600 s lifetime.
pub const NOW: u64 = 1_800_000_100;

fn keys() -> &'static KeySet {
    static KEYS: OnceLock<KeySet> = OnceLock::new();
    KEYS.get_or_init(|| KeySet::from_pems([PUBLIC_PEM.as_bytes()]).expect("the fixed key loads"))
}

pub fn grant_verify(data: &[u8]) {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let now = UNIX_EPOCH + Duration::from_secs(NOW);
    let first = keys().verify(token, DEFAULT_AUDIENCE, now);
    if let Ok(c) = &first {
        assert_eq!(c.iss, ISSUER);
        assert_eq!(c.aud, DEFAULT_AUDIENCE);
        let t = NOW as i64;
        assert!(
            c.nbf - LEEWAY_SECS <= t && t <= c.exp + LEEWAY_SECS,
            "{c:?}"
        );
        assert!(!c.sub.is_empty() && !c.repo.is_empty() && !c.digest.is_empty());
    }
    let second = keys().verify(token, DEFAULT_AUDIENCE, now);
    assert_eq!(
        first.map_err(|e| e.reason()),
        second.map_err(|e| e.reason()),
        "verification is deterministic"
    );
}
