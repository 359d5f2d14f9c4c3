//! Criterion benches of the per-request hot paths, each beside a reference done in the same run.
//!
//! One job: catch regressions in the work every pull request does before any byte moves —
//! parsing the `/v2/` path, the `Range` header and references, finding a manifest's children —
//! and in the work every peer-served byte costs: digest verification. Each group has a
//! reference that bounds what the operation could cost (a plain `str` split for parsing,
//! `sha2` hashing with no wrapper for verification), so a report reads as a ratio.
//!
//! `cargo bench --bench hot_paths` (full), `cargo bench --bench hot_paths -- --quick` (short).

use std::hint::black_box;
use std::str::FromStr;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sha2::{Digest as _, Sha256};
use speculum::oci::Digest;
use speculum::oci::media;
use speculum::oci::path::parse_v2_path;
use speculum::oci::range::parse_range;
use speculum::oci::reference::Reference;

const BLOB_PATH: &str = "/v2/library/nginx/blobs/sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
const MANIFEST_PATH: &str = "/v2/team/app/backend/manifests/v1.2.3";

fn parsing(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse");
    g.bench_function("reference: split a /v2 path on '/'", |b| {
        b.iter(|| black_box(BLOB_PATH).split('/').count())
    });
    g.bench_function("v2 path, blob by digest", |b| {
        b.iter(|| parse_v2_path(black_box(BLOB_PATH)).is_ok())
    });
    g.bench_function("v2 path, manifest by tag", |b| {
        b.iter(|| parse_v2_path(black_box(MANIFEST_PATH)).is_ok())
    });
    g.bench_function("range header", |b| {
        b.iter(|| parse_range(black_box("bytes=1048576-"), black_box(209_715_200)).is_ok())
    });
    g.bench_function("reference with registry port and tag", |b| {
        b.iter(|| Reference::parse(black_box("10.250.77.2:5000/rig/big:v1")).is_ok())
    });
    g.bench_function("digest", |b| {
        b.iter(|| {
            Digest::from_str(black_box(
                "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            ))
            .is_ok()
        })
    });
    g.finish();
}

fn manifest_children(c: &mut Criterion) {
    // An OCI manifest with a config and 10 layers: what `store::closure` reads per image.
    let layer = |i: usize| {
        format!(
            r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:{i:064x}","size":{}}}"#,
            1000 + i
        )
    };
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{:064x}","size":7023}},"layers":[{}]}}"#,
        999,
        (0..10).map(layer).collect::<Vec<_>>().join(",")
    );
    let mut g = c.benchmark_group("manifest");
    g.bench_function("reference: serde_json::Value parse", |b| {
        b.iter(|| {
            serde_json::from_slice::<serde_json::Value>(black_box(manifest.as_bytes())).is_ok()
        })
    });
    g.bench_function("children of a 10-layer manifest", |b| {
        b.iter(|| media::children(black_box(manifest.as_bytes())).len())
    });
    g.bench_function("detect media type", |b| {
        b.iter(|| media::detect(black_box(manifest.as_bytes())))
    });
    g.finish();
}

fn verification(c: &mut Criterion) {
    let chunk = vec![0x5au8; 1 << 20];
    let digest = Digest::sha256_of(&chunk);
    let mut g = c.benchmark_group("verify 1 MiB");
    g.throughput(Throughput::Bytes(chunk.len() as u64));
    g.bench_function("reference: sha2 Sha256::digest", |b| {
        b.iter(|| Sha256::digest(black_box(&chunk)))
    });
    g.bench_function("Verifier (the mirror's check of peer bytes)", |b| {
        b.iter(|| {
            let mut v = digest.verifier();
            // 64 KiB pieces, as bodies arrive.
            for piece in chunk.chunks(64 << 10) {
                v.update(black_box(piece));
            }
            v.verify()
        })
    });
    g.finish();
}

criterion_group!(benches, parsing, manifest_children, verification);
criterion_main!(benches);
