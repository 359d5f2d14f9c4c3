//! The node's libp2p identity: the ed25519 key in `<data_dir>/identity.key`, created once
//! (mode 0600, linked into place so two starts never race) and never silently replaced.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use libp2p::identity::Keypair;
use tracing::info;

use super::config::KademliaError;

/// File name of the node's ed25519 key inside `data_dir`.
pub const IDENTITY_FILE: &str = "identity.key";

/// Loads the node's ed25519 key from `<data_dir>/identity.key`, creating it (mode 0600) on
/// first start. A file that does not decode is an error, never silently replaced: a new key
/// is a new peer id, and other nodes would hold records for a node that no longer exists.
pub fn load_or_create_identity(data_dir: &Path) -> Result<Keypair, KademliaError> {
    let path = data_dir.join(IDENTITY_FILE);
    let io = |source| KademliaError::IdentityIo {
        path: path.clone(),
        source,
    };
    match std::fs::read(&path) {
        Ok(bytes) => return decode_identity(&path, &bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    std::fs::create_dir_all(data_dir).map_err(io)?;
    let keypair = Keypair::generate_ed25519();
    let bytes = keypair
        .to_protobuf_encoding()
        .map_err(|e| KademliaError::Build(format!("encoding identity key: {e}")))?;
    let tmp = data_dir.join(format!(".{IDENTITY_FILE}.{}.tmp", std::process::id()));
    // Left over by a crash of a process that had our pid: it was never linked, so drop it.
    let _ = std::fs::remove_file(&tmp);
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        // A link, unlike a rename, never replaces: if another process created the key in the
        // meantime, its key wins and we read it below.
        std::fs::hard_link(&tmp, &path)
    })();
    let _ = std::fs::remove_file(&tmp);
    match written {
        Ok(()) => {
            // Make the new directory entry durable before the peer id is announced.
            if let Ok(dir) = std::fs::File::open(data_dir) {
                let _ = dir.sync_all();
            }
            info!(path = %path.display(), "created a new identity key");
            Ok(keypair)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let bytes = std::fs::read(&path).map_err(io)?;
            decode_identity(&path, &bytes)
        }
        Err(e) => Err(io(e)),
    }
}

fn decode_identity(path: &Path, bytes: &[u8]) -> Result<Keypair, KademliaError> {
    Keypair::from_protobuf_encoding(bytes).map_err(|e| KademliaError::IdentityCorrupt {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn identity_is_created_private_reused_and_never_silently_replaced() {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        };
        // A data dir that does not exist yet is created.
        let data = dir.path().join("nested");
        let first = match load_or_create_identity(&data) {
            Ok(k) => k.public().to_peer_id(),
            Err(e) => panic!("{e}"),
        };
        let path = data.join(IDENTITY_FILE);
        let mode = std::fs::metadata(&path).map(|m| m.permissions().mode() & 0o777);
        assert_eq!(mode.ok(), Some(0o600));
        let again = load_or_create_identity(&data).map(|k| k.public().to_peer_id());
        assert_eq!(again.ok(), Some(first));
        let leftovers: Vec<_> = std::fs::read_dir(&data)
            .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert_eq!(leftovers, [IDENTITY_FILE], "temporary files left behind");

        for (name, bytes) in [("garbage", &b"garbage"[..]), ("empty", &b""[..])] {
            if let Err(e) = std::fs::write(&path, bytes) {
                panic!("{e}");
            }
            match load_or_create_identity(&data) {
                Err(KademliaError::IdentityCorrupt { .. }) => {}
                other => panic!("{name}: want IdentityCorrupt, got {:?}", other.map(|_| ())),
            }
        }
    }
}
