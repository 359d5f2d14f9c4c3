//! Multi-tenant protection on the namespace-node rig: three nodes with real containerd and a
//! daemon each, the `private-grant` policy marking `rig/small` private, grants signed with the
//! webhook's key format, pods described by a pods file (`tenancy.pods.source: file`), and peer
//! authentication with a shared key.
//!
//! One job: the attack matrix of `docs/tenancy.md` — every attack is refused (401 or 403 on the
//! serving node's peer endpoint, 404 towards containerd) **and** leaves an audit line naming the
//! reason; a granted private image and a public image still travel peer to peer.
//!
//! The routing-mesh case (an outsider without the pre-shared key cannot join the DHT) runs on
//! loopback in `tests/loopback/routing_psk.rs`.
//!
//! Needs root; skips (saying why on stderr) otherwise or with `SPECULUM_SKIP_RIG=1`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use speculum::tenancy::peer_auth::{PeerTokens, SharedKey};
use speculum_grant::Signer;
use testkit::rig::*;

/// The serving node (holds every image), the granted requester, the other node.
const SERVER: u32 = 1;
const GRANTED: u32 = 2;
const OTHER: u32 = 3;

/// Bound for a pods-file or key change to be picked up by the daemons.
const PICKUP: Duration = Duration::from_secs(30);

#[test]
fn attack_matrix_refuses_and_audits_every_case() -> Result<()> {
    let Some(rig) = Rig::start(
        "attack_matrix_refuses_and_audits_every_case",
        &["small", "docker"],
    )?
    else {
        return Ok(());
    };
    let images = rig.images()?;
    let private = image_named(&images, "small")?.clone();
    let public = image_named(&images, "docker")?.clone();
    let t = Tenancy::set_up(&rig, &private)?;

    for n in 1..=3 {
        rig.start_speculum(n)?;
    }
    rig.step("node 1 pulls both images from upstream (nobody else has them)");
    rig.cri_pull(SERVER, private.tag("v1")?, &private)?;
    rig.cri_pull(SERVER, public.tag("v1")?, &public)?;

    // ---- positive cases ------------------------------------------------------------------
    rig.step("public image: node 3 (no grant, no pods) pulls it from node 1");
    rig.wait_mirror_finds(OTHER, &public, &public.digest)?;
    let before = rig.upstream_gets(&public.repository, Some(OTHER))?;
    rig.cri_pull(OTHER, &public.by_digest, &public)?;
    ensure!(
        rig.upstream_gets(&public.repository, Some(OTHER))? == before,
        "node 3 went upstream for the public image"
    );

    rig.step("private image: pod team-a/web on node 2 holds a valid grant; node 2 pulls P2P");
    let grant = t.sign("team-a", &private.digest, 600, 0)?;
    t.pods(&[
        pod("team-a", "web", "n2", &private, &[&grant]),
        pod("team-b", "api", "n3", &private, &[]),
    ])?;
    rig.wait_mirror_finds(GRANTED, &private, &private.digest)?;
    rig.cri_pull(GRANTED, &private.by_digest, &private)?;
    ensure!(
        rig.upstream_gets(&private.repository, Some(GRANTED))? == 0,
        "node 2 went upstream for the granted private image"
    );
    let served = rig.audit(SERVER, |l| {
        l.iter().any(|l| {
            l.source == "peer" && l.kind == "blob" && l.decision == "allow" && l.status == 200
        })
    })?;
    ensure!(
        served.iter().any(|l| l.source == "peer"
            && l.kind == "blob"
            && l.repository == "rig/small"
            && l.status == 200
            && l.requester.as_deref() == Some("n2")
            && l.grant.as_deref() == Some("team-a/web")),
        "node 1 has no audit line for serving node 2 under grant team-a/web: {served:#?}"
    );

    // ---- the containerd side: no grant on this node → 404, audit, upstream ---------------
    rig.step("no grant: pod team-b/api on node 3 waits for the private image without one");
    let status = rig.call(&[
        "mirror_status",
        &OTHER.to_string(),
        &private.repository,
        &private.digest,
    ])?;
    ensure!(
        status.trim() == "404",
        "node 3's mirror answered {status} without a grant"
    );
    expect_audit(&rig, OTHER, "rig/small", "private: no grant", 404)?;
    rig.cri_pull(OTHER, &private.by_digest, &private)?;
    ensure!(
        rig.upstream_gets(&private.repository, Some(OTHER))? > 0,
        "node 3 got the private image without a grant and without going upstream"
    );

    // ---- the serving side: crafted requests against node 1's peer endpoint ----------------
    let manifest = format!("/v2/rig/small/manifests/{}", private.digest);
    let layer = &private
        .layers()
        .next()
        .context("small has no layer")?
        .digest;
    let foreign_blob = &public
        .layers()
        .next()
        .context("docker has no layer")?
        .digest;
    let n2 = t.peer_token("n2")?;
    let n3 = t.peer_token("n3")?;
    let forged_peer = t.forged_peer_token("n2")?;
    let rogue = Signer::from_pem(speculum_grant::generate().0.as_bytes())?;
    let forged = rogue
        .sign(
            "team-a",
            &t.repo,
            &private.digest,
            Duration::from_secs(600),
            SystemTime::now(),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let expired = t.sign("team-a", &private.digest, 600, 7200)?;
    let other_digest = t.sign(
        "team-a",
        "sha256:0000000000000000000000000000000000000000000000000000000000000001",
        600,
        0,
    )?;
    let tampered = tamper(&grant);
    // Pods for the namespace and node cases; the directory must hold them before they are used.
    t.pods(&[
        pod("team-a", "web", "n2", &private, &[&grant]),
        pod("team-b", "api", "n3", &private, &[&grant]),
        pod("team-a", "bystander", "n2", &private, &[]),
        pod("team-a", "old", "n2", &private, &[&expired, &other_digest]),
    ])?;
    let web = |token: &str| format!("team-a/web {token}");
    rig.step("waiting until node 1's pod directory has the new pods file");
    wait_pods_seen(&rig, &n2, &other_digest, &manifest)?;

    let cases: Vec<Case> = vec![
        Case::new(
            "peer request without a token",
            OTHER,
            None,
            &[],
            &manifest,
            401,
            "peer auth: no_token",
        ),
        Case::new(
            "forged peer token",
            OTHER,
            Some(&forged_peer),
            &[],
            &manifest,
            401,
            "peer auth: bad_signature",
        ),
        Case::new(
            "no grant",
            GRANTED,
            Some(&n2),
            &[],
            &manifest,
            403,
            "private: no grant",
        ),
        Case::new(
            "forged grant (unknown key)",
            GRANTED,
            Some(&n2),
            &[web(&forged)],
            &manifest,
            403,
            "private: grant unknown_key",
        ),
        Case::new(
            "tampered grant",
            GRANTED,
            Some(&n2),
            &[web(&tampered)],
            &manifest,
            403,
            "private: grant bad_signature",
        ),
        Case::new(
            "expired grant",
            GRANTED,
            Some(&n2),
            &[format!("team-a/old {expired}")],
            &manifest,
            403,
            "private: grant expired",
        ),
        Case::new(
            "grant for another digest",
            GRANTED,
            Some(&n2),
            &[format!("team-a/old {other_digest}")],
            &manifest,
            403,
            "private: object outside the granted image",
        ),
        Case::new(
            "grant presented for another namespace's pod",
            OTHER,
            Some(&n3),
            &[format!("team-b/api {grant}")],
            &manifest,
            403,
            "private: grant for another namespace",
        ),
        Case::new(
            "grant replayed from another node",
            OTHER,
            Some(&n3),
            &[web(&grant)],
            &manifest,
            403,
            "private: grant of a pod on another node",
        ),
        Case::new(
            "grant not held by the named pod",
            GRANTED,
            Some(&n2),
            &[format!("team-a/bystander {grant}")],
            &manifest,
            403,
            "private: grant not held by the named pod",
        ),
        Case::new(
            "blob outside the granted manifest",
            GRANTED,
            Some(&n2),
            &[web(&grant)],
            &format!("/v2/rig/small/blobs/{foreign_blob}"),
            403,
            "private: object outside the granted image",
        ),
        Case::new(
            "malformed grant header",
            GRANTED,
            Some(&n2),
            &["not a grant".to_owned()],
            &manifest,
            403,
            "private: malformed grant header",
        ),
        // The control: the same request with everything right is served.
        Case::new(
            "valid grant, right node (control)",
            GRANTED,
            Some(&n2),
            &[web(&grant)],
            &format!("/v2/rig/small/blobs/{layer}"),
            200,
            "",
        ),
    ];
    for case in &cases {
        case.run(&rig)?;
    }

    rig.step("direct access to the peer port from a non-daemon (the upstream namespace)");
    let (status, body) = peer_request_from_upstream(&rig, &manifest)?;
    ensure!(status == 401, "non-daemon got {status}: {body}");
    ensure!(body.contains("UNAUTHORIZED"), "no OCI error body: {body}");
    expect_audit(&rig, SERVER, "rig/small", "peer auth: no_token", 401)?;
    Ok(())
}

// ------------------------------------------------------------------------------------------------

/// One crafted request to node 1's peer endpoint and what must come of it.
struct Case {
    name: &'static str,
    from: u32,
    token: Option<String>,
    grants: Vec<String>,
    path: String,
    status: u16,
    reason: &'static str,
}

impl Case {
    fn new(
        name: &'static str,
        from: u32,
        token: Option<&str>,
        grants: &[String],
        path: &str,
        status: u16,
        reason: &'static str,
    ) -> Case {
        Case {
            name,
            from,
            token: token.map(str::to_owned),
            grants: grants.to_vec(),
            path: path.to_owned(),
            status,
            reason,
        }
    }

    fn run(&self, rig: &Rig) -> Result<()> {
        rig.step(&format!("attack: {}", self.name));
        let (status, body) = self.send(rig)?;
        ensure!(
            status == self.status,
            "{}: status {status}, want {}; body {body}",
            self.name,
            self.status
        );
        if self.status != 200 {
            let code = if self.status == 401 {
                "UNAUTHORIZED"
            } else {
                "DENIED"
            };
            ensure!(
                body.contains(code),
                "{}: body {body} lacks {code}",
                self.name
            );
            expect_audit(rig, SERVER, "rig/small", self.reason, self.status)
                .with_context(|| self.name)?;
        }
        Ok(())
    }

    /// Sends the request from inside node `from`'s namespace; status and body.
    fn send(&self, rig: &Rig) -> Result<(u16, String)> {
        let url = format!(
            "http://{}:5081{}?ns={}",
            node_ip(SERVER),
            self.path,
            upstream_host().replace(':', "%3A")
        );
        let mut args: Vec<String> = [
            "node_exec",
            &self.from.to_string(),
            "curl",
            "-s",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "--max-time",
            "10",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(token) = &self.token {
            args.push("-H".into());
            args.push(format!("Authorization: Bearer {token}"));
        }
        for g in &self.grants {
            args.push("-H".into());
            args.push(format!("x-speculum-grant: {g}"));
        }
        args.push(url);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = rig.call(&argv)?;
        let (body, status) = out.rsplit_once('\n').unwrap_or(("", out.as_str()));
        let status: u16 = status.trim().parse().context("curl status")?;
        Ok((status, body.to_owned()))
    }
}

/// Polls node `n`'s audit file until its **last** line is a deny for `repository` with
/// `reason` and `status` (the requests are sequential, so the last line is the latest one).
fn expect_audit(rig: &Rig, n: u32, repository: &str, reason: &str, status: u16) -> Result<()> {
    let matches = |l: &AuditLine| {
        l.repository == repository
            && l.decision == "deny"
            && l.reason == reason
            && l.status == status
    };
    let lines = rig.audit(n, |lines| lines.last().is_some_and(matches))?;
    match lines.last() {
        Some(l) if matches(l) => Ok(()),
        other => bail!("node {n}: last audit line {other:#?}, want deny {status} {reason:?}"),
    }
}

/// Polls (bounded) until node 1 judges a grant of pod `team-a/old` — which exists only in the
/// newest pods file — by its digest rather than by the pod's absence.
fn wait_pods_seen(rig: &Rig, token: &str, grant: &str, path: &str) -> Result<()> {
    let t0 = Instant::now();
    let probe = Case::new(
        "probe",
        GRANTED,
        Some(token),
        &[format!("team-a/old {grant}")],
        path,
        403,
        "",
    );
    loop {
        let (status, body) = probe.send(rig)?;
        if status == 403 && body.contains("outside the granted image") {
            return Ok(());
        }
        ensure!(
            t0.elapsed() < PICKUP,
            "node 1 did not pick up the pods file: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn peer_request_from_upstream(rig: &Rig, path: &str) -> Result<(u16, String)> {
    let url = format!(
        "http://{}:5081{path}?ns={}",
        node_ip(SERVER),
        upstream_host().replace(':', "%3A")
    );
    let out = rig.call(&[
        "up_exec",
        "curl",
        "-s",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        "--max-time",
        "10",
        &url,
    ])?;
    let (body, status) = out.rsplit_once('\n').unwrap_or(("", out.as_str()));
    Ok((status.trim().parse()?, body.to_owned()))
}

/// The tenancy material of one rig: grant keys, the shared peer key, the pods file, the policy.
struct Tenancy {
    dir: PathBuf,
    signer: Signer,
    repo: String,
}

impl Tenancy {
    /// Writes keys, the policy bundle and an empty pods file under the rig directory and points
    /// every daemon started afterwards at them (`SPECULUM_*` environment).
    fn set_up(rig: &Rig, private: &Image) -> Result<Tenancy> {
        let dir = rig.dir.join("tenancy");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("keys"))?;
        let (private_pem, public_pem) = speculum_grant::generate();
        let signer = Signer::from_pem(private_pem.as_bytes())?;
        std::fs::write(dir.join("keys/webhook.pem"), public_pem)?;
        std::fs::write(dir.join("peer.key"), random_key())?;
        std::fs::write(dir.join("other-peer.key"), random_key())?;
        let repo = format!("{}/{}", upstream_host(), private.repository);
        let policy = dir.join("policy");
        std::fs::create_dir_all(&policy)?;
        let bundle = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/private-grant");
        std::fs::copy(bundle.join("mirror.rego"), policy.join("mirror.rego"))?;
        std::fs::write(
            policy.join("data.json"),
            serde_json::json!({"private": {"prefixes": [repo]}}).to_string(),
        )?;
        let t = Tenancy { dir, signer, repo };
        t.pods(&[])?;
        for (k, v) in [
            ("SPECULUM_POLICY_BUNDLE", t.dir.join("policy")),
            ("SPECULUM_TENANCY_PODS_FILE", t.dir.join("pods.yaml")),
            ("SPECULUM_TENANCY_GRANTS_KEYS_DIR", t.dir.join("keys")),
            (
                "SPECULUM_TENANCY_PEER_AUTH_SHARED_KEY_FILE",
                t.dir.join("peer.key"),
            ),
        ] {
            rig.set_env(k, &v.to_string_lossy());
        }
        rig.set_env("SPECULUM_TENANCY_PODS_SOURCE", "file");
        rig.set_env("SPECULUM_TENANCY_PEER_AUTH_MODE", "shared_key");
        Ok(t)
    }

    /// A grant for `namespace` on the private repository, issued `age_secs` ago.
    fn sign(&self, namespace: &str, digest: &str, ttl_secs: u64, age_secs: u64) -> Result<String> {
        let issued = SystemTime::now() - Duration::from_secs(age_secs);
        self.signer
            .sign(
                namespace,
                &self.repo,
                digest,
                Duration::from_secs(ttl_secs),
                issued,
            )
            .map_err(|e| anyhow::anyhow!("signing: {e}"))
    }

    /// Rewrites the pods file atomically (daemons re-read it when it changes).
    fn pods(&self, pods: &[serde_json::Value]) -> Result<()> {
        let path = self.dir.join("pods.yaml");
        let tmp = self.dir.join(".pods.yaml.tmp");
        std::fs::write(&tmp, serde_json::json!({ "pods": pods }).to_string())?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// A peer token of node `node`, signed with the cluster's shared key (what a daemon sends).
    fn peer_token(&self, node: &str) -> Result<String> {
        token(&self.dir.join("peer.key"), node)
    }

    /// The same, signed with a key that is not the cluster's.
    fn forged_peer_token(&self, node: &str) -> Result<String> {
        token(&self.dir.join("other-peer.key"), node)
    }
}

fn token(key: &Path, node: &str) -> Result<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let key = SharedKey::from_file(key, node, Duration::from_secs(600))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    rt.block_on(key.token()).map_err(|e| anyhow::anyhow!("{e}"))
}

fn pod(ns: &str, name: &str, node: &str, image: &Image, grants: &[&str]) -> serde_json::Value {
    let mut annotations = serde_json::Map::new();
    if !grants.is_empty() {
        annotations.insert(
            speculum_grant::ANNOTATION.to_owned(),
            serde_json::Value::String(serde_json::to_string(grants).unwrap_or_default()),
        );
    }
    serde_json::json!({
        "namespace": ns,
        "name": name,
        "node": node,
        "images": [image.by_digest],
        "annotations": annotations,
    })
}

/// The token with one payload character changed: the signature no longer matches.
fn tamper(token: &str) -> String {
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    if let Some(payload) = parts.get_mut(1) {
        let last = payload.pop().unwrap_or('A');
        payload.push(if last == 'A' { 'B' } else { 'A' });
    }
    parts.join(".")
}

/// A fresh 32-byte secret, hex-encoded (what an operator would put in the Secret).
fn random_key() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}
