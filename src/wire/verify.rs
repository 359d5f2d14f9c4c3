//! A whole blob checked against its digest on the way through, one job: pass the bytes on as
//! they come, hashing them, and hold the last piece back until the digest is known to match.
//! A mismatch (or a body longer than announced) ends the stream with an error instead, so a
//! client never receives a complete body that is wrong: its connection ends short of the
//! `Content-Length` it was promised, and it retries.

use bytes::Bytes;
use futures::StreamExt;

use super::ByteStream;
use crate::oci::Digest;
use crate::oci::digest::Verifier;

/// `stream` (the whole blob, `size` bytes from byte 0) checked against `digest`.
pub fn verified(stream: ByteStream, digest: &Digest, size: u64) -> ByteStream {
    let state = Check {
        inner: stream,
        verifier: Some(digest.verifier()),
        seen: 0,
        size,
        digest: digest.to_string(),
    };
    futures::stream::unfold(state, |mut s| async move {
        let item = s.step().await?;
        Some((item, s))
    })
    .boxed()
}

struct Check {
    inner: ByteStream,
    /// `None` once the end was checked (or failed): nothing more is passed on.
    verifier: Option<Verifier>,
    seen: u64,
    size: u64,
    digest: String,
}

impl Check {
    async fn step(&mut self) -> Option<std::io::Result<Bytes>> {
        let verifier = self.verifier.as_mut()?;
        match self.inner.next().await {
            Some(Ok(bytes)) => {
                self.seen += bytes.len() as u64;
                verifier.update(&bytes);
                if self.seen < self.size {
                    return Some(Ok(bytes));
                }
                let verifier = self.verifier.take()?;
                if self.seen == self.size && verifier.verify() {
                    Some(Ok(bytes))
                } else {
                    tracing::warn!(
                        digest = %self.digest,
                        bytes = self.seen,
                        "peer blob does not match its digest; ending the response short"
                    );
                    Some(Err(std::io::Error::other(format!(
                        "blob {} does not match its digest",
                        self.digest
                    ))))
                }
            }
            Some(Err(e)) => {
                self.verifier = None;
                Some(Err(e))
            }
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn collect(s: ByteStream) -> (Vec<u8>, bool) {
        let items: Vec<_> = s.collect().await;
        let failed = items.iter().any(|i| i.is_err());
        let bytes = items
            .into_iter()
            .filter_map(Result::ok)
            .flat_map(|b| b.to_vec())
            .collect();
        (bytes, failed)
    }

    fn chunks(data: &[u8], n: usize) -> ByteStream {
        let parts: Vec<std::io::Result<Bytes>> = data
            .chunks(n)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        futures::stream::iter(parts).boxed()
    }

    #[tokio::test]
    async fn verified_table() {
        let good = b"hello, blob".to_vec();
        let digest = Digest::sha256_of(&good);
        let mut bad = good.clone();
        bad[3] ^= 1;
        // (name, body sent, size announced, bytes the client gets, the stream fails)
        type Case = (&'static str, Vec<u8>, u64, Vec<u8>, bool);
        let cases: Vec<Case> = vec![
            ("good", good.clone(), good.len() as u64, good.clone(), false),
            // Everything but the last piece got through; the last is held back as an error.
            (
                "one bit flipped",
                bad.clone(),
                bad.len() as u64,
                bad[..8].to_vec(),
                true,
            ),
            (
                "longer than announced",
                good.clone(),
                5,
                good[..4].to_vec(),
                true,
            ),
        ];
        for (name, body, size, want, fails) in cases {
            let (got, failed) = collect(verified(chunks(&body, 4), &digest, size)).await;
            assert_eq!(failed, fails, "{name}");
            assert_eq!(got, want, "{name}");
        }
    }
}
