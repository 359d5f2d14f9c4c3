//! The fuzz targets' bodies (`fuzz/targets/oci.rs`) on stable, as part of `make test`: every
//! seed, every recorded crasher (`fuzz/regressions/<target>/`), and a bounded number of
//! deterministic mutations of the seeds. The long runs are libFuzzer's (`make fuzz`, see
//! ROBUSTNESS.md); this keeps the properties and the regressions checked on every change.
//! The webhook's AdmissionReview target is smoke-run by `make fuzz-smoke` (libFuzzer), since
//! this crate does not depend on the webhook.

#[path = "../../fuzz/targets/oci.rs"]
mod oci;

use std::path::Path;

/// Mutations per target: ~0.1 s each in a debug build.
const MUTATIONS: usize = 20_000;

/// Fragments that matter to these grammars, spliced into inputs by the mutator.
const TOKENS: &[&[u8]] = &[
    b"/",
    b"..",
    b"%2F",
    b"%2e",
    b"%",
    b":",
    b"@",
    b"sha256:",
    b"sha512:",
    b"-",
    b",",
    b"=",
    b"bytes=",
    b"?ns=",
    b"&ns=",
    b"%3A",
    b"[",
    b"]",
    b"{",
    b"}",
    b"\"",
    b"0",
    b"9",
    b"18446744073709551615",
    b"__",
    b".",
    b"\xff",
    b"\x00",
    b"manifests",
    b"blobs",
    b"\"mediaType\":",
    b"\"digest\":",
    b"\"schemaVersion\":2",
    b"\"manifests\":[",
    b"\r\n",
    b"\r\n\r\n",
    b"GET ",
    b"HEAD ",
    b" HTTP/1.1",
    b"Connection: close",
    b"Content-Length: ",
    b"Transfer-Encoding: chunked",
];

/// A small deterministic PRNG (xorshift64*): reproducible failures, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(v.len() + 1);
        match rng.below(5) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            1 if !v.is_empty() => {
                let end = (at + rng.below(8)).min(v.len());
                v.drain(at.min(end)..end);
            }
            2 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                v.splice(at..at, t.iter().copied());
            }
            3 => v.truncate(at),
            _ => {
                // Repeat a slice: long names, long numbers, many separators.
                let end = (at + 1 + rng.below(4)).min(v.len());
                let piece = v[at.min(end)..end].to_vec();
                for _ in 0..rng.below(64) {
                    v.splice(at..at, piece.iter().copied());
                }
            }
        }
    }
    v
}

fn files(dir: &Path) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(std::path::PathBuf, Vec<u8>)> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b)))
        .collect();
    out.sort();
    out.into_iter().map(|(_, b)| b).collect()
}

/// A target's name (its directory under `fuzz/seeds` and `fuzz/regressions`) and its body.
type Target = (&'static str, fn(&[u8]));

#[test]
fn fuzz_targets_hold_on_seeds_regressions_and_mutations() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let targets: [Target; 7] = [
        ("digest", oci::digest),
        ("reference", oci::reference),
        ("v2_path", oci::v2_path),
        ("range", oci::range),
        ("media", oci::media),
        ("pull_request", oci::pull_request),
        ("http_head", oci::http_head),
    ];
    for (name, target) in targets {
        let seeds = files(&fuzz.join("seeds").join(name));
        assert!(!seeds.is_empty(), "{name}: no seeds in fuzz/seeds/{name}");
        for input in seeds
            .iter()
            .chain(files(&fuzz.join("regressions").join(name)).iter())
        {
            target(input);
        }
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
        for _ in 0..MUTATIONS {
            let seed = &seeds[rng.below(seeds.len())];
            let input = mutate(&mut rng, seed);
            // A panic names the target; the input is printed so it can become a regression.
            let caught = std::panic::catch_unwind(|| target(&input));
            assert!(
                caught.is_ok(),
                "{name} panicked on {:?} (add it to fuzz/regressions/{name}/)",
                String::from_utf8_lossy(&input)
            );
        }
    }
}
