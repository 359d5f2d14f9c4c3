//! The `grant_verify` fuzz target's body (`fuzz/targets/grant.rs`) on stable: every seed, every
//! recorded crasher and deterministic mutations of the seeds (the long run is libFuzzer's,
//! `make fuzz`). `write_fuzz_seeds` (ignored) regenerates `fuzz/seeds/grant_verify/`.

#[path = "../../fuzz/targets/grant.rs"]
mod grant;

use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use speculum_grant::Signer;

const MUTATIONS: usize = 20_000;
/// RFC 8410 §10.3's example private key: the fuzz target holds its public half.
const PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n-----END PRIVATE KEY-----\n";

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn files(dir: &Path) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    paths.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

/// xorshift64*: deterministic, no dependency.
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

const TOKENS: &[&[u8]] = &[b".", b"=", b"-", b"_", b"eyJ", b"A", b"\"", b"{", b"}"];

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..=rng.below(4) {
        let at = rng.below(v.len() + 1);
        match rng.below(4) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if at < v.len() => {
                let end = (at + 1 + rng.below(8)).min(v.len());
                v.drain(at..end);
            }
            2 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                v.splice(at..at, t.iter().copied());
            }
            _ => v.insert(at, rng.next() as u8),
        }
    }
    v
}

#[test]
fn grant_verify_holds_on_seeds_regressions_and_mutations() {
    let seeds = files(&fuzz_dir().join("seeds/grant_verify"));
    assert!(!seeds.is_empty(), "no seeds in fuzz/seeds/grant_verify");
    for input in seeds
        .iter()
        .chain(files(&fuzz_dir().join("regressions/grant_verify")).iter())
    {
        grant::grant_verify(input);
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..MUTATIONS {
        let seed = &seeds[rng.below(seeds.len())];
        let input = mutate(&mut rng, seed);
        let caught = std::panic::catch_unwind(|| grant::grant_verify(&input));
        assert!(
            caught.is_ok(),
            "grant_verify panicked on {:?} (add it to fuzz/regressions/grant_verify/)",
            String::from_utf8_lossy(&input)
        );
    }
}

/// `cargo test -p speculum-grant --test fuzz_smoke -- --ignored write_fuzz_seeds`
#[test]
#[ignore]
fn write_fuzz_seeds() {
    let signer = Signer::from_pem(PRIVATE_PEM.as_bytes()).expect("key");
    let at = UNIX_EPOCH + Duration::from_secs(grant::NOW - 100);
    let dir = fuzz_dir().join("seeds/grant_verify");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let ttl = Duration::from_secs(600);
    let seeds = [
        (
            "good",
            signer.sign(
                "team-a",
                "127.0.0.1:5000/rig/private",
                "sha256:1111111111111111111111111111111111111111111111111111111111111111",
                ttl,
                at,
            ),
        ),
        (
            "docker-hub",
            signer.sign(
                "b",
                "docker.io/library/nginx",
                "sha256:2222222222222222222222222222222222222222222222222222222222222222",
                ttl,
                at,
            ),
        ),
        (
            "expired",
            signer.sign(
                "team-a",
                "r.io/x",
                "sha256:3",
                Duration::from_secs(1),
                UNIX_EPOCH + Duration::from_secs(1_000),
            ),
        ),
        (
            "other-audience",
            signer.sign_for("elsewhere", "team-a", "r.io/x", "sha256:4", ttl, at),
        ),
    ];
    for (name, token) in seeds {
        std::fs::write(dir.join(name), token.expect("sign")).expect("write");
    }
    std::fs::write(
        dir.join("alg-none"),
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ4In0.",
    )
    .expect("write");
}
