//! The private network's pre-shared key: reading `routing.psk_file`, and making new keys.
//!
//! With a key, every DHT connection runs libp2p's private-network handshake (XSalsa20 over
//! the TCP stream) before noise, so a node without the same key cannot even finish the
//! security handshake: it can neither join the routing mesh nor ask who holds what. Wiring
//! the key into the transport is [`super::kademlia`]'s job; this module only turns a file
//! into a [`PreSharedKey`] and never lets the key's bytes reach an error or a log line (the
//! [`Fingerprint`] may: it identifies a key without revealing it).
//!
//! Accepted formats: go-libp2p's `swarm.key` (`/key/swarm/psk/1.0.0/`, `/base16/`, 64 hex
//! digits, one per line) and a bare line of 64 hex digits. `docs/routing.md` ("Private
//! network") says what the key protects and what it does not.

use std::path::{Path, PathBuf};

pub use libp2p::pnet::{Fingerprint, PreSharedKey};

/// First line of a go-libp2p swarm key file.
const KEY_TYPE: &str = "/key/swarm/psk/1.0.0/";
/// Second line: the only encoding go-libp2p and rust-libp2p read.
const ENCODING: &str = "/base16/";
/// A key is 32 bytes.
const KEY_HEX_LEN: usize = 64;
/// Anything longer is not a key file; refused before it is read whole.
const MAX_FILE_BYTES: u64 = 4096;

/// Why `routing.psk_file` cannot be used. No variant carries any part of the key.
#[derive(Debug, thiserror::Error)]
pub enum PskError {
    #[error("cannot read psk file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("psk file {path} is not a swarm key: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// Reads and parses the key file. Errors name the file and what is wrong, never the content.
pub fn load(path: &Path) -> Result<PreSharedKey, PskError> {
    let io = |source| PskError::Io {
        path: path.to_owned(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_FILE_BYTES {
        return Err(PskError::Invalid {
            path: path.to_owned(),
            reason: format!("{len} bytes, a key file has about 90"),
        });
    }
    let bytes = std::fs::read(path).map_err(io)?;
    let text = std::str::from_utf8(&bytes).map_err(|_| PskError::Invalid {
        path: path.to_owned(),
        reason: "not UTF-8 text".to_owned(),
    })?;
    parse(text).map_err(|reason| PskError::Invalid {
        path: path.to_owned(),
        reason,
    })
}

/// Parses a swarm key file or a bare 64-hex-digit line. The error says what is wrong with the
/// shape (lengths, header lines), never which characters were found.
pub fn parse(text: &str) -> Result<PreSharedKey, String> {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let hex_line = match lines.as_slice() {
        [hex] => *hex,
        [key_type, encoding, hex] => {
            if *key_type != KEY_TYPE {
                return Err(format!("first line must be {KEY_TYPE}"));
            }
            if *encoding != ENCODING {
                return Err(format!(
                    "second line must be {ENCODING} (the only supported encoding)"
                ));
            }
            *hex
        }
        other => {
            return Err(format!(
                "want {KEY_TYPE}, {ENCODING} and {KEY_HEX_LEN} hex digits on three lines, or \
                 one line of {KEY_HEX_LEN} hex digits; found {} non-empty lines",
                other.len()
            ));
        }
    };
    if hex_line.len() != KEY_HEX_LEN {
        return Err(format!(
            "the key must be {KEY_HEX_LEN} hex digits (32 bytes), found {} characters",
            hex_line.chars().count()
        ));
    }
    let mut key = [0u8; 32];
    // hex's own error names the offending character: a piece of the key. Say only that.
    hex::decode_to_slice(hex_line, &mut key)
        .map_err(|_| "the key contains a character that is not a hex digit".to_owned())?;
    Ok(PreSharedKey::new(key))
}

/// A new random key.
pub fn generate() -> PreSharedKey {
    PreSharedKey::new(rand::random())
}

/// The go-libp2p `swarm.key` text of `key` (three lines). This is the secret itself: for
/// writing a key file, never for logs.
pub fn to_key_file(key: PreSharedKey) -> String {
    key.to_key_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00112233445566778899aabbccddeeff0";

    #[test]
    fn parses_swarm_key_files_and_bare_hex() {
        let want = parse(HEX).map(|k| k.fingerprint().to_string());
        type Case = (&'static str, String, bool);
        let cases: Vec<Case> = vec![
            (
                "go-libp2p file",
                format!("{KEY_TYPE}\n{ENCODING}\n{HEX}\n"),
                true,
            ),
            (
                "crlf and no final newline",
                format!("{KEY_TYPE}\r\n{ENCODING}\r\n{HEX}"),
                true,
            ),
            ("bare hex", format!("{HEX}\n"), true),
            ("bare upper-case hex", HEX.to_uppercase(), true),
            ("short", HEX[..62].to_owned(), false),
            ("long", format!("{HEX}00"), false),
            ("not hex", format!("{}zz", &HEX[..62]), false),
            (
                "wrong type",
                format!("/key/swarm/psk/2.0.0/\n{ENCODING}\n{HEX}"),
                false,
            ),
            ("base64", format!("{KEY_TYPE}\n/base64/\n{HEX}"), false),
            ("empty", String::new(), false),
            ("two lines", format!("{ENCODING}\n{HEX}"), false),
        ];
        for (name, text, ok) in cases {
            let got = parse(&text);
            assert_eq!(got.is_ok(), ok, "{name}: {:?}", got.as_ref().err());
            if let Ok(key) = got {
                assert_eq!(Ok(key.fingerprint().to_string()), want.clone(), "{name}");
            }
            if let Err(e) = got {
                assert!(!e.contains(&HEX[..16]), "{name}: key bytes in {e:?}");
            }
        }
    }

    #[test]
    fn generated_keys_differ_and_read_back() {
        let a = generate();
        let b = generate();
        assert!(a != b);
        let file = to_key_file(a);
        assert!(file.starts_with(KEY_TYPE), "{file}");
        assert!(parse(&file).is_ok_and(|k| k == a));
    }
}
