//! Unit tests of the blob cache: LRU, restart, digest mismatch, followers of in-flight blobs.

use std::time::Duration;

use futures::TryStreamExt;

use super::*;

const MIB: u64 = 1024 * 1024;

fn blob(seed: u8, len: usize) -> (Digest, Vec<u8>) {
    let bytes: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    (Digest::sha256_of(&bytes), bytes)
}

async fn put(cache: &Arc<Cache>, digest: &Digest, bytes: &[u8]) -> Result<u64, CacheError> {
    let mut w = cache.begin(digest)?;
    w.set_size(bytes.len() as u64);
    for chunk in bytes.chunks(100_000) {
        w.write(chunk).await?;
    }
    w.finish().await
}

async fn read_all(cache: &Arc<Cache>, digest: &Digest) -> Result<Vec<u8>, String> {
    let (_, stream) = cache.read(digest, None).map_err(|e| e.to_string())?;
    let chunks: Vec<Bytes> = stream.try_collect().await.map_err(|e| e.to_string())?;
    Ok(chunks.concat())
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"))
}

fn open(dir: &Path, max: u64) -> Arc<Cache> {
    Cache::open(dir, max).unwrap_or_else(|e| panic!("open: {e}"))
}

#[tokio::test]
async fn complete_blobs_read_back_whole_and_by_range() {
    let dir = tempdir();
    let cache = open(dir.path(), 10 * MIB);
    let (d, bytes) = blob(1, 700_000);
    assert_eq!(put(&cache, &d, &bytes).await.ok(), Some(700_000));
    assert_eq!(read_all(&cache, &d).await.ok(), Some(bytes.clone()));
    let cases = [
        ("first byte", 0, 0),
        ("middle", 1000, 299_999),
        ("last byte", 699_999, 699_999),
    ];
    for (name, start, end) in cases {
        let (size, s) = cache
            .read(&d, Some(ByteRange { start, end }))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(size, 700_000, "{name}");
        let got: Vec<Bytes> = s.try_collect().await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got.concat(), bytes[start as usize..=end as usize], "{name}");
    }
    assert!(matches!(
        cache.read(
            &d,
            Some(ByteRange {
                start: 0,
                end: 700_000
            })
        ),
        Err(CacheError::Range { size: 700_000 })
    ));
    assert!(matches!(cache.begin(&d), Err(CacheError::Present(_))));
    assert_eq!(cache.complete(), vec![d]);
}

#[tokio::test]
async fn a_digest_mismatch_is_never_complete() {
    let dir = tempdir();
    let cache = open(dir.path(), 10 * MIB);
    let (d, _) = blob(2, 1000);
    let (_, other) = blob(3, 1000);
    let got = put(&cache, &d, &other).await;
    assert!(
        matches!(got, Err(CacheError::DigestMismatch { .. })),
        "{got:?}"
    );
    assert!(!cache.contains(&d));
    assert_eq!(cache.usage(), (0, 0));
    assert!(cache.complete().is_empty());
    // Nothing left on disk either, and the digest can be written again.
    assert_eq!(
        std::fs::read_dir(dir.path().join("ingest"))
            .map(|d| d.count())
            .ok(),
        Some(0)
    );
    let (_, right) = blob(2, 1000);
    assert!(put(&cache, &d, &right).await.is_ok());
}

#[tokio::test]
async fn short_and_long_writes_fail() {
    let dir = tempdir();
    let cache = open(dir.path(), 10 * MIB);
    let (d, bytes) = blob(4, 1000);
    let mut w = cache.begin(&d).unwrap_or_else(|e| panic!("{e}"));
    w.set_size(1000);
    assert!(w.write(&bytes[..600]).await.is_ok());
    let too_long = w.write(&bytes).await;
    assert!(
        matches!(too_long, Err(CacheError::SizeMismatch { .. })),
        "{too_long:?}"
    );
    let short = w.finish().await;
    assert!(
        matches!(short, Err(CacheError::SizeMismatch { .. })),
        "{short:?}"
    );
    assert!(!cache.contains(&d));
}

#[tokio::test]
async fn least_recently_used_is_evicted_first_never_a_pinned_one() {
    let dir = tempdir();
    let cache = open(dir.path(), 2 * MIB + 1000);
    let (a, abytes) = blob(10, MIB as usize);
    let (b, bbytes) = blob(11, MIB as usize);
    let (c, cbytes) = blob(12, MIB as usize);
    let (e, ebytes) = blob(13, MIB as usize);
    put(&cache, &a, &abytes)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    put(&cache, &b, &bbytes)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // Use `a`: `b` is now the least recently used.
    assert!(read_all(&cache, &a).await.is_ok());
    put(&cache, &c, &cbytes)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(cache.contains(&a) && cache.contains(&c), "a and c kept");
    assert!(!cache.contains(&b), "b was least recently used");
    assert!(!dir.path().join("blobs/sha256").join(b.hex()).exists());
    // A reader pins `a` (least recently used now): `c` goes instead.
    let (_, pinned) = cache.read(&a, None).unwrap_or_else(|e| panic!("{e}"));
    put(&cache, &e, &ebytes)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(cache.contains(&a), "a is being read: never evicted");
    assert!(!cache.contains(&c));
    let got: Vec<Bytes> = pinned.try_collect().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got.concat(), abytes);
    let events = cache.take_events();
    assert!(
        events.contains(&CacheEvent::Evicted(b.clone())),
        "{events:?}"
    );
    assert!(events.contains(&CacheEvent::Added(e.clone())), "{events:?}");
}

#[tokio::test]
async fn restart_rebuilds_the_index_and_drops_partial_files() {
    let dir = tempdir();
    let (a, abytes) = blob(20, 5000);
    let (b, bbytes) = blob(21, 5000);
    {
        let cache = open(dir.path(), 10 * MIB);
        put(&cache, &a, &abytes)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut w = cache.begin(&b).unwrap_or_else(|e| panic!("{e}"));
        w.set_size(5000);
        w.write(&bbytes[..4000])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        w.flush().await.unwrap_or_else(|e| panic!("{e}"));
        // A crash: the writer never finishes nor cleans up.
        std::mem::forget(w);
    }
    assert!(
        dir.path()
            .join("ingest")
            .join(format!("sha256-{}", b.hex()))
            .exists()
    );
    std::fs::write(dir.path().join("blobs/sha256/not-a-digest"), b"x")
        .unwrap_or_else(|e| panic!("{e}"));
    let cache = open(dir.path(), 10 * MIB);
    assert_eq!(cache.complete(), vec![a.clone()]);
    assert_eq!(cache.usage(), (1, 5000));
    assert_eq!(read_all(&cache, &a).await.ok(), Some(abytes));
    assert_eq!(
        std::fs::read_dir(dir.path().join("ingest"))
            .map(|d| d.count())
            .ok(),
        Some(0)
    );
    assert!(!dir.path().join("blobs/sha256/not-a-digest").exists());
    // A smaller limit at restart evicts down to it.
    drop(cache);
    let cache = open(dir.path(), MIB);
    assert_eq!(cache.usage().0, 1);
}

#[tokio::test]
async fn followers_get_bytes_as_they_land() {
    let dir = tempdir();
    let cache = open(dir.path(), 10 * MIB);
    let (d, bytes) = blob(30, 3 * WRITE_CHUNK + 17);
    let mut w = cache.begin(&d).unwrap_or_else(|e| panic!("{e}"));
    // Size pending: a reader waits for it, bounded.
    assert_eq!(cache.size(&d, Duration::from_millis(20)).await, None);
    w.set_size(bytes.len() as u64);
    assert_eq!(
        cache.size(&d, Duration::from_millis(20)).await,
        Some(bytes.len() as u64)
    );
    let (_, mut follower) = cache.read(&d, None).unwrap_or_else(|e| panic!("{e}"));
    let (_, ranged) = cache
        .read(
            &d,
            Some(ByteRange {
                start: 5,
                end: 2 * WRITE_CHUNK as u64,
            }),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    w.write(&bytes[..WRITE_CHUNK])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // The first chunk is readable before the blob is complete.
    let first = tokio::time::timeout(Duration::from_secs(5), follower.try_next())
        .await
        .unwrap_or_else(|_| panic!("follower got nothing while the writer wrote"))
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_default();
    assert_eq!(first, bytes[..WRITE_CHUNK]);
    let writer = tokio::spawn(async move {
        for chunk in bytes[WRITE_CHUNK..].chunks(50_000) {
            w.write(chunk).await?;
        }
        w.finish().await.map(|_| bytes)
    });
    let rest: Vec<Bytes> = follower
        .try_collect()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let part: Vec<Bytes> = ranged.try_collect().await.unwrap_or_else(|e| panic!("{e}"));
    let bytes = match writer.await {
        Ok(Ok(b)) => b,
        other => panic!("writer: {other:?}"),
    };
    assert_eq!([first.to_vec(), rest.concat()].concat(), bytes);
    assert_eq!(part.concat(), bytes[5..=2 * WRITE_CHUNK]);
    assert_eq!(cache.complete(), vec![d]);
}

#[tokio::test]
async fn followers_get_an_error_when_the_writer_fails() {
    let dir = tempdir();
    let cache = open(dir.path(), 10 * MIB);
    let (d, bytes) = blob(40, 2 * WRITE_CHUNK);
    let mut w = cache.begin(&d).unwrap_or_else(|e| panic!("{e}"));
    w.set_size(bytes.len() as u64);
    w.write(&bytes[..WRITE_CHUNK])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (_, follower) = cache.read(&d, None).unwrap_or_else(|e| panic!("{e}"));
    let reader = tokio::spawn(async move {
        let r: Result<Vec<Bytes>, _> = follower.try_collect().await;
        r
    });
    drop(w);
    let got = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .unwrap_or_else(|_| panic!("follower hung after the writer failed"));
    assert!(matches!(got, Ok(Err(_))), "want an error, got {got:?}");
    assert!(!cache.contains(&d));
}

#[test]
fn config_validation_names_each_field() {
    type Break = fn(&mut CacheConfig);
    let cases: [(&str, Break, &str); 5] = [
        ("relative dir", |c| c.dir = "cache".into(), "cache.dir"),
        ("tiny", |c| c.max_bytes = 10, "cache.max_bytes"),
        (
            "bad host",
            |c| c.plain_http = vec!["http://x".into()],
            "cache.plain_http",
        ),
        (
            "zero ttl",
            |c| c.claim_ttl = Duration::ZERO,
            "cache.claim_ttl",
        ),
        (
            "timeout over ttl",
            |c| c.claim_timeout = Duration::from_secs(120),
            "cache.claim_timeout",
        ),
    ];
    assert!(CacheConfig::default().validate().is_empty());
    for (name, break_it, field) in cases {
        let mut c = CacheConfig::default();
        break_it(&mut c);
        let errors = c.validate();
        assert!(
            errors.iter().any(|e| e.starts_with(field)),
            "{name}: {errors:?}"
        );
    }
}

/// A follower of an in-flight blob never receives the whole of a blob that turns out wrong:
/// the last byte is readable only once the digest matched, and the mismatch fails the read.
#[tokio::test]
async fn a_follower_never_gets_a_wrong_blob_whole() {
    let dir = tempdir();
    let cache = open(dir.path(), 10 * MIB);
    let (d, _) = blob(50, 2 * WRITE_CHUNK);
    let (_, wrong) = blob(51, 2 * WRITE_CHUNK);
    let mut w = cache.begin(&d).unwrap_or_else(|e| panic!("{e}"));
    w.set_size(wrong.len() as u64);
    let (_, follower) = cache.read(&d, None).unwrap_or_else(|e| panic!("{e}"));
    let reader = tokio::spawn(async move {
        let mut got = 0usize;
        let mut follower = follower;
        loop {
            match follower.try_next().await {
                Ok(Some(b)) => got += b.len(),
                Ok(None) => return (got, false),
                Err(_) => return (got, true),
            }
        }
    });
    for chunk in wrong.chunks(WRITE_CHUNK) {
        w.write(chunk).await.unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(matches!(
        w.finish().await,
        Err(CacheError::DigestMismatch { .. })
    ));
    let (got, failed) = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .unwrap_or_else(|_| panic!("follower hung"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(failed, "the read must fail");
    assert!(
        got < wrong.len(),
        "{got} bytes: the wrong blob arrived whole"
    );
}
