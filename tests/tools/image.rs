//! The container image (`scripts/image.sh`, issue 15) built from the release binaries and checked
//! with the real tools: two builds give the same digest (a different SOURCE_DATE_EPOCH does not),
//! the OCI labels and the nonroot user are in the config, the layers hold the binaries, exactly
//! the libraries `ldd` names and the CA bundle of the ca-certificates package, the binaries run
//! from the image's own rootfs (`umoci unpack`, `chroot` as 65532) and find their TLS roots
//! there, the image pushed to a real `docker-registry` reads back (`skopeo inspect`) with the
//! same digest, and the Dockerfile's final stage built with buildah yields the same image.
//!
//! Needs root (chroot, owners kept on unpack), the release binaries (`make image` builds them;
//! `make test` depends on it; SPECULUM_IMAGE_BINS names another directory) and python3, umoci,
//! skopeo, buildah, docker-registry and openssl from `scripts/setup.sh`. Never skips: a missing
//! piece fails the test with what to do.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest as _, Sha256};

const VERSION: &str = env!("CARGO_PKG_VERSION");
const BINS: [&str; 2] = ["speculum", "speculum-webhook"];
const NONROOT: &str = "65532:65532";
const LABELS: [&str; 7] = [
    "title",
    "description",
    "source",
    "version",
    "revision",
    "licenses",
    "created",
];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The release binaries: $SPECULUM_IMAGE_BINS, else `release/` next to this test's own profile
/// directory (`CARGO_TARGET_DIR/debug/deps/image-…` → `CARGO_TARGET_DIR/release`).
fn bin_dir() -> PathBuf {
    let dir = std::env::var_os("SPECULUM_IMAGE_BINS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_BIN_EXE_speculum"))
                .parent()
                .and_then(Path::parent)
                .expect("target dir")
                .join("release")
        });
    for bin in BINS {
        assert!(
            dir.join(bin).is_file(),
            "{}: missing; build it with `make image` (cargo build --release -p speculum -p speculum-webhook --bin speculum --bin speculum-webhook)",
            dir.join(bin).display()
        );
    }
    dir
}

/// Runs a command bounded by `timeout`; panics with its stderr unless it succeeds.
fn run(secs: u32, program: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let out = try_run(secs, program, args, env);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn try_run(secs: u32, program: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new("timeout")
        .arg(secs.to_string())
        .arg(program)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (scripts/setup.sh installs it)"))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn json_file(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .expect("json")
}

/// One layout written by `image.sh build`, with its manifest and config parsed.
struct Image {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    digest: String,
    manifest: Value,
    config: Value,
}

impl Image {
    fn build(epoch: Option<&str>) -> Image {
        assert_eq!(
            stdout(&run(5, "id", &["-u"], &[])),
            "0",
            "tests/tools/image.rs needs root (chroot, owners)"
        );
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("layout");
        let bins = bin_dir();
        let script = repo().join("scripts/image.sh");
        let env: Vec<(&str, &str)> = epoch
            .map(|e| ("SOURCE_DATE_EPOCH", e))
            .into_iter()
            .collect();
        let out = run(
            300,
            "bash",
            &[
                script.to_str().expect("path"),
                "build",
                bins.to_str().expect("path"),
                dir.to_str().expect("path"),
            ],
            &env,
        );
        let digest = stdout(&out);
        let index = json_file(&dir.join("index.json"));
        assert_eq!(
            index["manifests"][0]["digest"],
            digest.as_str(),
            "printed digest is the index's"
        );
        let manifest = json_file(&dir.join(blob(&digest)));
        let config =
            json_file(&dir.join(blob(manifest["config"]["digest"].as_str().expect("config"))));
        Image {
            _tmp: tmp,
            dir,
            digest,
            manifest,
            config,
        }
    }

    fn layers(&self) -> Vec<PathBuf> {
        self.manifest["layers"]
            .as_array()
            .expect("layers")
            .iter()
            .map(|l| self.dir.join(blob(l["digest"].as_str().expect("digest"))))
            .collect()
    }

    /// `umoci unpack` into a fresh directory: the rootfs as a runtime would see it.
    fn unpack(&self) -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let bundle = tmp.path().join("bundle");
        let image = format!("{}:{VERSION}", self.dir.display());
        run(
            120,
            "umoci",
            &["unpack", "--image", &image, bundle.to_str().expect("path")],
            &[],
        );
        (tmp, bundle.join("rootfs"))
    }

    fn env(&self) -> Vec<String> {
        let env = self.config["config"]["Env"].as_array().expect("Env");
        env.iter()
            .map(|e| e.as_str().expect("env").to_owned())
            .collect()
    }
}

fn blob(digest: &str) -> String {
    format!(
        "blobs/sha256/{}",
        digest.strip_prefix("sha256:").expect("sha256 digest")
    )
}

/// The image the tests share (assembly costs a few seconds).
fn image() -> &'static Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    IMAGE.get_or_init(|| Image::build(None))
}

/// Runs PROGRAM in ROOTFS as the image's user would: chroot as 65532, only the image's Env.
fn in_image(img: &Image, rootfs: &Path, args: &[&str]) -> Output {
    // Absolute paths: the environment is the image's only, and chroot finds ARGS[0] on its PATH.
    let mut cmd = Command::new("/usr/bin/timeout");
    cmd.args([
        "60",
        "/usr/sbin/chroot",
        "--userspec",
        NONROOT,
        rootfs.to_str().expect("path"),
    ])
    .args(args);
    cmd.env_clear().env("HOME", "/home/nonroot");
    for kv in img.env() {
        let (k, v) = kv.split_once('=').expect("KEY=VALUE");
        cmd.env(k, v);
    }
    cmd.output().expect("chroot")
}

/// Follows symlinks inside ROOTFS (an absolute target is the image's, not the host's).
fn resolve_in(rootfs: &Path, path: &str) -> PathBuf {
    let mut p = rootfs.join(path.trim_start_matches('/'));
    for _ in 0..8 {
        match fs::read_link(&p) {
            Ok(t) if t.is_absolute() => p = rootfs.join(t.strip_prefix("/").expect("absolute")),
            Ok(t) => p = p.parent().expect("parent").join(t),
            Err(_) => return p,
        }
    }
    panic!("{path}: symlink loop in the image");
}

/// The loader and libraries the host resolves for BIN: what the image must hold.
fn needed_libraries(bin: &Path) -> Vec<String> {
    let elf = stdout(&run(
        10,
        "readelf",
        &["-l", bin.to_str().expect("path")],
        &[],
    ));
    let interp = elf
        .lines()
        .find_map(|l| l.split_once("Requesting program interpreter: "))
        .map(|(_, r)| r.trim_end_matches(']').to_owned())
        .expect("program interpreter");
    let ldd = stdout(&run(10, "ldd", &[bin.to_str().expect("path")], &[]));
    let mut libs: Vec<String> = ldd
        .lines()
        .filter_map(|l| {
            l.split_once("=> ")
                .map(|(_, r)| r.split(' ').next().unwrap_or("").to_owned())
        })
        .filter(|p| p.starts_with('/'))
        .collect();
    libs.push(interp);
    libs
}

#[test]
fn same_inputs_same_digest() {
    let a = image();
    let b = Image::build(None);
    assert_eq!(
        a.digest, b.digest,
        "two builds from the same binaries differ"
    );
    let blobs = |i: &Image| {
        let mut v: Vec<_> = fs::read_dir(i.dir.join("blobs/sha256"))
            .expect("blobs")
            .map(|e| e.expect("entry").file_name())
            .collect();
        v.sort();
        v
    };
    assert_eq!(blobs(a), blobs(&b));
    // The timestamps come from SOURCE_DATE_EPOCH only: another epoch, another digest.
    let c = Image::build(Some("1"));
    assert_ne!(a.digest, c.digest);
    assert_eq!(c.config["created"], "1970-01-01T00:00:01Z");
    assert_ne!(
        c.manifest["layers"][1]["digest"],
        a.manifest["layers"][1]["digest"]
    );
}

#[test]
fn labels_user_and_command() {
    let img = image();
    let labels = &img.config["config"]["Labels"];
    for key in LABELS {
        let key = format!("org.opencontainers.image.{key}");
        assert!(
            labels[&key].as_str().is_some_and(|v| !v.is_empty()),
            "label {key} missing"
        );
        assert_eq!(
            img.manifest["annotations"][&key], labels[&key],
            "annotation {key}"
        );
    }
    assert_eq!(labels["org.opencontainers.image.version"], VERSION);
    assert_eq!(labels["org.opencontainers.image.licenses"], "Apache-2.0");
    let head = stdout(&run(
        10,
        "git",
        &["-C", repo().to_str().expect("path"), "rev-parse", "HEAD"],
        &[],
    ));
    let revision = labels["org.opencontainers.image.revision"]
        .as_str()
        .expect("revision");
    assert!(
        revision == head || revision == format!("{head}-dirty"),
        "revision {revision} is not HEAD {head}"
    );
    let commit_time = stdout(&run(
        10,
        "git",
        &[
            "-C",
            repo().to_str().expect("path"),
            "log",
            "-1",
            "--format=%cI",
        ],
        &[],
    ));
    let created = labels["org.opencontainers.image.created"]
        .as_str()
        .expect("created");
    assert_eq!(img.config["created"], created);
    let created_epoch = stdout(&run(5, "date", &["-u", "-d", created, "+%s"], &[]));
    let commit_epoch = stdout(&run(5, "date", &["-u", "-d", &commit_time, "+%s"], &[]));
    assert_eq!(
        created_epoch, commit_epoch,
        "created is the commit time (default SOURCE_DATE_EPOCH)"
    );
    let packages = labels["io.speculum.image.debian-packages"]
        .as_str()
        .expect("packages label");
    let libc = stdout(&run(
        5,
        "dpkg-query",
        &["-W", "-f=${Version}", "libc6"],
        &[],
    ));
    assert!(packages.contains(&format!("libc6={libc}")), "{packages}");

    assert_eq!(img.config["config"]["User"], NONROOT);
    assert_eq!(
        img.config["config"]["Cmd"],
        serde_json::json!(["speculum", "--help"])
    );
    assert!(
        img.env()
            .iter()
            .any(|e| e.starts_with("PATH=/usr/local/bin:")),
        "{:?}",
        img.env()
    );
    let index = json_file(&img.dir.join("index.json"));
    assert_eq!(
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        VERSION
    );
    let tag = run(
        10,
        "bash",
        &[
            repo().join("scripts/image.sh").to_str().expect("path"),
            "tag",
            img.dir.to_str().expect("path"),
        ],
        &[],
    );
    assert_eq!(stdout(&tag), VERSION);
}

#[test]
fn layers_are_normalised_and_hold_exactly_what_the_binaries_need() {
    let img = image();
    let layers = img.layers();
    assert_eq!(layers.len(), 2, "base (Debian files) and app (binaries)");
    let epoch = img.config["created"].as_str().expect("created").to_owned();
    for (n, layer) in layers.iter().enumerate() {
        // gzip without a timestamp or name: bytes 4..8 are MTIME.
        let gz = fs::read(layer).expect("layer");
        assert_eq!(&gz[..2], &[0x1f, 0x8b]);
        assert_eq!(&gz[4..8], &[0, 0, 0, 0], "layer {n}: gzip mtime set");
        let diff_id = img.config["rootfs"]["diff_ids"][n]
            .as_str()
            .expect("diff_id");
        let tar = run(60, "gzip", &["-dc", layer.to_str().expect("path")], &[]).stdout;
        assert_eq!(
            format!("sha256:{}", sha256_hex(&tar)),
            diff_id,
            "layer {n}: diff_id"
        );
        let list = stdout(&run(
            60,
            "tar",
            &[
                "--numeric-owner",
                "--full-time",
                "--utc",
                "-tvzf",
                layer.to_str().expect("path"),
            ],
            &[],
        ));
        let mut names = Vec::new();
        for line in list.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let name = f[5].trim_end_matches('/');
            let owner = if name == "home/nonroot" {
                "65532/65532"
            } else {
                "0/0"
            };
            assert_eq!(f[1], owner, "layer {n}: {line}");
            assert_eq!(
                format!("{}T{}Z", f[3], f[4]),
                epoch,
                "layer {n}: mtime of {line}"
            );
            names.push(name.to_owned());
        }
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted, "layer {n}: entries not sorted");
    }

    let (_tmp, rootfs) = img.unpack();
    let bins = bin_dir();
    for bin in BINS {
        let inside = rootfs.join("usr/local/bin").join(bin);
        assert_eq!(
            fs::read(&inside).expect("binary in image"),
            fs::read(bins.join(bin)).expect("binary"),
            "{bin}"
        );
        assert_eq!(
            fs::metadata(&inside).expect("meta").permissions().mode() & 0o7777,
            0o755
        );
    }
    // Exactly the loader and libraries ldd names: nothing missing, nothing extra.
    let mut want: Vec<PathBuf> = Vec::new();
    for lib in BINS.iter().flat_map(|b| needed_libraries(&bins.join(b))) {
        let f = resolve_in(&rootfs, &lib);
        assert!(
            f.is_file(),
            "{lib} (needed by the binaries) is not in the image"
        );
        want.push(f.strip_prefix(&rootfs).expect("inside").to_owned());
    }
    want.sort();
    want.dedup();
    let found = run(
        30,
        "find",
        &[
            rootfs.to_str().expect("path"),
            "-type",
            "f",
            "-name",
            "*.so*",
            "-printf",
            "%P\\n",
        ],
        &[],
    );
    let mut have: Vec<PathBuf> = stdout(&found).lines().map(PathBuf::from).collect();
    have.sort();
    assert_eq!(
        have, want,
        "shared objects in the image vs what the binaries link"
    );

    // The CA bundle: every certificate of the ca-certificates package, none of the host's own.
    let bundle =
        fs::read_to_string(rootfs.join("etc/ssl/certs/ca-certificates.crt")).expect("CA bundle");
    let shipped = stdout(&run(10, "dpkg-query", &["-L", "ca-certificates"], &[]))
        .lines()
        .filter(|l| l.starts_with("/usr/share/ca-certificates/") && l.ends_with(".crt"))
        .count();
    assert!(
        shipped > 100,
        "ca-certificates ships {shipped} certificates?"
    );
    assert_eq!(
        bundle.matches("-----BEGIN CERTIFICATE-----").count(),
        shipped
    );
    for local in fs::read_dir("/usr/local/share/ca-certificates")
        .into_iter()
        .flatten()
        .flatten()
    {
        let pem = fs::read_to_string(local.path()).unwrap_or_default();
        let body = pem.lines().nth(1).unwrap_or("-");
        assert!(
            !bundle.contains(body),
            "host-local CA {} leaked into the image",
            local.path().display()
        );
    }

    let passwd = fs::read_to_string(rootfs.join("etc/passwd")).expect("passwd");
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("nonroot:x:65532:65532:")),
        "{passwd}"
    );
    let group = fs::read_to_string(rootfs.join("etc/group")).expect("group");
    assert!(group.lines().any(|l| l == "nonroot:x:65532:"), "{group}");
    let tmp = fs::metadata(rootfs.join("tmp")).expect("/tmp");
    assert_eq!(tmp.permissions().mode() & 0o7777, 0o1777, "/tmp mode");
    let home = fs::metadata(rootfs.join("home/nonroot")).expect("home");
    assert_eq!((home.uid(), home.gid()), (65532, 65532));
    let packages = fs::read_to_string(rootfs.join("usr/share/doc/speculum/packages.txt"))
        .expect("packages.txt");
    for pkg in ["libc6", "libgcc-s1", "ca-certificates", "base-files"] {
        let version = stdout(&run(5, "dpkg-query", &["-W", "-f=${Version}", pkg], &[]));
        assert!(
            packages
                .lines()
                .any(|l| l.starts_with(&format!("{pkg} {version} "))),
            "{pkg} {version} not in packages.txt:\n{packages}"
        );
        assert!(
            rootfs.join("var/lib/dpkg/status.d").join(pkg).is_file(),
            "status.d/{pkg}"
        );
    }
}

#[test]
fn binaries_run_from_the_image_as_nonroot() {
    let img = image();
    let (_tmp, rootfs) = img.unpack();
    // Found through the image's PATH, as the chart's `command: ["speculum"]` is.
    for bin in BINS {
        let out = in_image(img, &rootfs, &[bin, "--version"]);
        assert!(
            out.status.success(),
            "{bin} --version in the image: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout(&out), format!("{bin} {VERSION}"));
    }
    let out = in_image(img, &rootfs, &["speculum-webhook", "--help"]);
    assert!(
        out.status.success() && stdout(&out).contains("serve"),
        "{out:?}"
    );
    // The daemon's config loading (defaults, env, flags) works in the image too.
    let out = in_image(img, &rootfs, &["speculum", "config", "--node-name", "n1"]);
    assert!(
        out.status.success() && stdout(&out).contains("n1"),
        "{out:?}"
    );
}

/// A fresh directory with a lowercase name, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(prefix: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A `docker-registry` on 127.0.0.1 with its own config in a temp dir; killed (our child, by
/// PID) on drop. `tls`: (certificate, key) files.
struct Registry {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start(tls: Option<(&Path, &Path)>) -> Registry {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let tls = tls.map_or(String::new(), |(c, k)| {
            format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                c.display(),
                k.display()
            )
        });
        let config = dir.path().join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n{tls}",
                dir.path().join("data").display()
            ),
        )
        .expect("config");
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry (scripts/setup.sh)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("docker-registry exited: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry on {port} did not come up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Registry {
            port,
            child,
            _dir: dir,
        }
    }

    fn reference(&self) -> String {
        format!("127.0.0.1:{}/speculum/speculum:{VERSION}", self.port)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn push(img: &Image, reference: &str) {
    let script = repo().join("scripts/image.sh");
    run(
        120,
        "bash",
        &[
            script.to_str().expect("path"),
            "push",
            img.dir.to_str().expect("path"),
            reference,
        ],
        &[],
    );
}

#[test]
fn pushed_image_reads_back_with_the_same_digest() {
    let img = image();
    let registry = Registry::start(None);
    let reference = registry.reference();
    push(img, &reference);
    let docker = format!("docker://{reference}");
    let inspect: Value = serde_json::from_slice(
        &run(
            60,
            "skopeo",
            &["inspect", "--tls-verify=false", &docker],
            &[],
        )
        .stdout,
    )
    .expect("inspect");
    assert_eq!(inspect["Digest"], img.digest.as_str());
    assert_eq!(inspect["Labels"], img.config["config"]["Labels"]);
    let raw = run(
        60,
        "skopeo",
        &["inspect", "--raw", "--tls-verify=false", &docker],
        &[],
    )
    .stdout;
    assert_eq!(
        format!("sha256:{}", sha256_hex(&raw)),
        img.digest,
        "registry's manifest bytes"
    );
}

/// The binaries' TLS roots are the image's /etc/ssl/certs/ca-certificates.crt: `speculum-webhook
/// pin` in the image against an https registry whose CA is not in the bundle fails on the
/// certificate, and passes once that CA is appended to the image's bundle file.
#[test]
fn tls_roots_come_from_the_image_bundle() {
    let img = image();
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    let script = format!(
        "set -e; cd {}
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem -days 2 \
          -subj /CN=speculum-image-test-ca -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout leaf.key -out leaf.csr -subj /CN=127.0.0.1 2>/dev/null
        printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\nextendedKeyUsage=serverAuth\\n' > ext
        openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out leaf.pem -days 2 -extfile ext 2>/dev/null",
        d.display()
    );
    run(30, "bash", &["-c", &script], &[]);
    let registry = Registry::start(Some((&d.join("leaf.pem"), &d.join("leaf.key"))));
    let reference = registry.reference();
    push(img, &reference);

    let (_tmp, rootfs) = img.unpack();
    fs::write(
        rootfs.join("tmp/pod.yaml"),
        format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\nspec:\n  containers:\n    - name: c\n      image: {reference}\n"),
    )
    .expect("pod.yaml");
    let pin = || {
        in_image(
            img,
            &rootfs,
            &["speculum-webhook", "pin", "--strict", "/tmp/pod.yaml"],
        )
    };
    let refused = pin();
    let stderr = String::from_utf8_lossy(&refused.stderr).to_lowercase();
    assert!(
        !refused.status.success(),
        "pinned through an unknown CA: {refused:?}"
    );
    assert!(
        stderr.contains("invalid peer certificate: unknownissuer"),
        "not a certificate error: {stderr}"
    );

    let bundle = rootfs.join("etc/ssl/certs/ca-certificates.crt");
    let mut pem = fs::read_to_string(&bundle).expect("bundle");
    pem.push_str(&fs::read_to_string(d.join("ca.pem")).expect("ca.pem"));
    fs::write(&bundle, pem).expect("bundle");
    let pinned = pin();
    assert!(
        pinned.status.success(),
        "pin with the CA in the image bundle: {}",
        String::from_utf8_lossy(&pinned.stderr)
    );
    assert!(
        stdout(&pinned).contains(&format!("{reference}@{}", img.digest)),
        "{}",
        stdout(&pinned)
    );
}

/// The Dockerfile's final stage, built with buildah (no daemon): `build` replaced by a directory
/// holding the same binaries (--build-context), the distroless base by our image's base layer.
/// The result must have our image's files (path, mode, owner, content), user, env, command and
/// OCI labels. The `build` stage is not run here (no rust image offline).
#[test]
fn dockerfile_final_stage_yields_the_same_image() {
    let img = image();
    // The build stage is not run here; it must at least run the cargo command `make image` runs.
    let packages = "-p speculum -p speculum-webhook --bin speculum --bin speculum-webhook";
    let dockerfile = fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    let makefile = fs::read_to_string(repo().join("Makefile")).expect("Makefile");
    assert!(
        makefile.contains(packages),
        "Makefile's image target changed: update this test"
    );
    assert!(
        dockerfile.contains(&format!("cargo build --release --locked {packages}")),
        "the Dockerfile's build stage does not build what `make image` builds"
    );
    // buildah names an `oci:` base after its path, and image names must be lowercase: not a
    // tempfile name.
    let tmp = Scratch::new("speculum-image-dockerfile");
    let d = tmp.0.as_path();

    // Base-only layout: our manifest minus the app layer.
    let base = d.join("base");
    fs::create_dir_all(base.join("blobs/sha256")).expect("mkdir");
    fs::copy(img.dir.join("oci-layout"), base.join("oci-layout")).expect("oci-layout");
    let put = |bytes: &[u8]| {
        let digest = format!("sha256:{}", sha256_hex(bytes));
        fs::write(base.join(blob(&digest)), bytes).expect("blob");
        serde_json::json!({"digest": digest, "size": bytes.len()})
    };
    let layer0 = &img.manifest["layers"][0];
    let layer_digest = layer0["digest"].as_str().expect("digest");
    fs::copy(
        img.dir.join(blob(layer_digest)),
        base.join(blob(layer_digest)),
    )
    .expect("layer");
    let mut config = img.config.clone();
    config["rootfs"]["diff_ids"] = serde_json::json!([config["rootfs"]["diff_ids"][0]]);
    config["history"] = serde_json::json!([config["history"][0]]);
    let mut c = put(&serde_json::to_vec(&config).expect("json"));
    c["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
    let manifest = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": c, "layers": [layer0]});
    let mut m = put(&serde_json::to_vec(&manifest).expect("json"));
    m["mediaType"] = "application/vnd.oci.image.manifest.v1+json".into();
    m["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": "base"});
    fs::write(
        base.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [m]}))
            .expect("json"),
    )
    .expect("index");

    // The `build` stage's output: /out/usr/local/bin/{speculum,speculum-webhook}.
    let stage = d.join("stage");
    let bins = bin_dir();
    fs::create_dir_all(stage.join("out/usr/local/bin")).expect("mkdir");
    for bin in BINS {
        let to = stage.join("out/usr/local/bin").join(bin);
        fs::copy(bins.join(bin), &to).expect("copy");
        fs::set_permissions(&to, fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    let labels = &img.config["config"]["Labels"];
    let label = |k: &str| {
        labels[format!("org.opencontainers.image.{k}")]
            .as_str()
            .expect("label")
            .to_owned()
    };
    let root = d.join("storage");
    let storage = [
        "--root",
        &format!("{}/root", root.display()),
        "--runroot",
        &format!("{}/run", root.display()),
        "--storage-driver",
        "vfs",
    ];
    let s = |p: &Path| p.to_str().expect("path").to_owned();
    let mut args: Vec<String> = storage.iter().map(|s| (*s).to_owned()).collect();
    args.extend(
        [
            "bud",
            "--pull-never",
            "--isolation",
            "chroot",
            "--format",
            "oci",
            "--build-context",
            &format!("build={}", s(&stage)),
            "--build-arg",
            &format!("BASE_IMAGE=oci:{}:base", s(&base)),
            "--build-arg",
            &format!("VERSION={}", label("version")),
            "--build-arg",
            &format!("REVISION={}", label("revision")),
            "--build-arg",
            &format!("CREATED={}", label("created")),
            "-f",
            &s(&repo().join("Dockerfile")),
            "-t",
            "localhost/speculum-dockerfile-check:test",
            &s(repo()),
        ]
        .map(str::to_owned),
    );
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let built = run(300, "buildah", &argv, &[]);
    let log = String::from_utf8_lossy(&built.stdout);
    assert!(!log.contains("RUN "), "buildah ran the build stage:\n{log}");
    let out = d.join("out");
    let mut args: Vec<&str> = storage.to_vec();
    let dest = format!("oci:{}:{VERSION}", s(&out));
    args.extend([
        "push",
        "--format",
        "oci",
        "localhost/speculum-dockerfile-check:test",
        &dest,
    ]);
    run(300, "buildah", &args, &[]);

    let index = json_file(&out.join("index.json"));
    let theirs_manifest = json_file(&out.join(blob(
        index["manifests"][0]["digest"].as_str().expect("digest"),
    )));
    let theirs = json_file(
        &out.join(blob(
            theirs_manifest["config"]["digest"]
                .as_str()
                .expect("digest"),
        )),
    );
    for key in ["User", "Env", "Cmd", "WorkingDir"] {
        assert_eq!(
            theirs["config"][key], img.config["config"][key],
            "Dockerfile image: {key}"
        );
    }
    for key in LABELS {
        let key = format!("org.opencontainers.image.{key}");
        assert_eq!(
            theirs["config"]["Labels"][&key], labels[&key],
            "Dockerfile image: label {key}"
        );
    }

    let tree = |rootfs: &Path| -> BTreeMap<String, String> {
        let out = run(
            60,
            "find",
            &[
                rootfs.to_str().expect("path"),
                "-mindepth",
                "1",
                "-printf",
                "%P %M %U:%G %l\\n",
            ],
            &[],
        );
        stdout(&out)
            .lines()
            .map(|l| {
                let (path, rest) = l.split_once(' ').expect("find line");
                let p = rootfs.join(path);
                let hash = if p.is_file() && !p.is_symlink() {
                    sha256_hex(&fs::read(&p).expect("read"))
                } else {
                    String::new()
                };
                (path.to_owned(), format!("{rest} {hash}"))
            })
            .collect()
    };
    let (_t1, ours) = img.unpack();
    let theirs_bundle = d.join("theirs");
    run(
        120,
        "umoci",
        &[
            "unpack",
            "--image",
            &format!("{}:{VERSION}", s(&out)),
            &s(&theirs_bundle),
        ],
        &[],
    );
    assert_eq!(
        tree(&theirs_bundle.join("rootfs")),
        tree(&ours),
        "Dockerfile image's files vs ours"
    );
}
