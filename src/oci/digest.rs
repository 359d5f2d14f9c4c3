//! Content digests (`algorithm:hex`), as defined by the OCI image spec, "Digests" section.
//!
//! Only the registered algorithms `sha256` and `sha512` are accepted, with lowercase hex of
//! the exact length. Anything else is rejected here, so no malformed digest ever reaches
//! containerd or a peer.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256, Sha512};

/// Why a string is not a valid digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("digest has no algorithm separator ':'")]
    MissingSeparator,
    #[error("unsupported digest algorithm {0:?}")]
    UnsupportedAlgorithm(String),
    #[error("digest hex must be {want} lowercase hex characters")]
    BadHex { want: usize },
}

/// A digest algorithm the OCI spec registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// A validated content digest such as `sha256:9f86d0…`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

impl Digest {
    /// The sha256 digest of `bytes`.
    pub fn sha256_of(bytes: &[u8]) -> Digest {
        Digest {
            algorithm: Algorithm::Sha256,
            hex: hex::encode(Sha256::digest(bytes)),
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The lowercase hex part, without the algorithm.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// A hasher for this digest's algorithm, to verify streamed content.
    pub fn verifier(&self) -> Verifier {
        Verifier {
            want: self.clone(),
            state: match self.algorithm {
                Algorithm::Sha256 => HashState::Sha256(Sha256::new()),
                Algorithm::Sha512 => HashState::Sha512(Box::new(Sha512::new())),
            },
        }
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (alg, hex) = s.split_once(':').ok_or(DigestError::MissingSeparator)?;
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            other => {
                return Err(DigestError::UnsupportedAlgorithm(
                    other.chars().take(32).collect(),
                ));
            }
        };
        let want = algorithm.hex_len();
        // Uppercase hex is not canonical (image-spec: `[a-f0-9]`), so it is refused rather
        // than normalised: a normalised digest would name different bytes in a URL.
        if hex.len() != want || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(DigestError::BadHex { want });
        }
        Ok(Digest {
            algorithm,
            hex: hex.to_owned(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.as_str(), self.hex)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

enum HashState {
    Sha256(Sha256),
    Sha512(Box<Sha512>),
}

/// Incrementally hashes content and says whether it matches the expected digest.
pub struct Verifier {
    want: Digest,
    state: HashState,
}

impl Verifier {
    pub fn update(&mut self, bytes: &[u8]) {
        match &mut self.state {
            HashState::Sha256(h) => h.update(bytes),
            HashState::Sha512(h) => h.update(bytes),
        }
    }

    /// True when everything fed so far hashes to the expected digest.
    pub fn verify(self) -> bool {
        let got = match self.state {
            HashState::Sha256(h) => hex::encode(h.finalize()),
            HashState::Sha512(h) => hex::encode(h.finalize()),
        };
        got == self.want.hex
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX64: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn parse_table() {
        let upper = HEX64.to_uppercase();
        let cases: Vec<(&str, String, Result<(), DigestError>)> = vec![
            ("sha256 ok", format!("sha256:{HEX64}"), Ok(())),
            ("sha512 ok", format!("sha512:{HEX64}{HEX64}"), Ok(())),
            (
                "no colon",
                HEX64.to_string(),
                Err(DigestError::MissingSeparator),
            ),
            (
                "unknown alg",
                format!("md5:{HEX64}"),
                Err(DigestError::UnsupportedAlgorithm("md5".into())),
            ),
            (
                "short",
                "sha256:abc".into(),
                Err(DigestError::BadHex { want: 64 }),
            ),
            (
                "uppercase",
                format!("sha256:{upper}"),
                Err(DigestError::BadHex { want: 64 }),
            ),
            (
                "non-hex",
                format!("sha256:{}g", &HEX64[1..]),
                Err(DigestError::BadHex { want: 64 }),
            ),
            ("empty", String::new(), Err(DigestError::MissingSeparator)),
            (
                "sha512 wrong len",
                format!("sha512:{HEX64}"),
                Err(DigestError::BadHex { want: 128 }),
            ),
        ];
        for (name, input, want) in cases {
            let got = input.parse::<Digest>().map(|_| ());
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn display_round_trips_and_verifier_checks_content() {
        let d = Digest::sha256_of(b"test");
        assert_eq!(d.to_string(), format!("sha256:{HEX64}"));
        assert_eq!(d.to_string().parse::<Digest>().ok(), Some(d.clone()));
        let mut v = d.verifier();
        v.update(b"te");
        v.update(b"st");
        assert!(v.verify());
        let mut v = d.verifier();
        v.update(b"tesT");
        assert!(!v.verify());
    }
}
