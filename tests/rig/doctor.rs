//! `speculum doctor` on the network-namespace rig (`tests/rig/`): two nodes with real containerd,
//! real daemons (private DHT, shared-key peer authentication, a tested policy bundle, grant
//! keys) and a real upstream registry. Doctor runs inside a node's namespace, as on a node.
//!
//! One job: prove that a healthy node gets every check ok and exit 0, and that each way of
//! breaking a node on purpose — hosts.toml deleted or edited, containerd's `config_path` wrong
//! or missing, `discard_unpacked_layers = true`, containerd or the daemon stopped, a policy
//! bundle with a failing test, an unreadable content store, a bad key — fails exactly the check
//! that names it, with its fix, and exit 1. The judging itself is table-tested in
//! `src/doctor/`; this file proves it against the real things.
//!
//! Needs root (network namespaces). When not root, or with `SPECULUM_SKIP_RIG=1`, the test
//! prints why it skipped and returns. Knobs: `RIG_DIR`, `RIG_NS_PREFIX`, `RIG_SUBNET`,
//! `RIG_CONTAINERD` (1.6 reports its CRI config itself; 2.3 does not, so doctor reads the node's
//! containerd.toml) — see `tests/cluster.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;
use testkit::rig::*;

/// The node doctor examines and breaks; node 1 is its healthy peer.
const NODE: u32 = 2;

#[derive(Debug, Deserialize)]
struct Report {
    status: String,
    findings: Vec<Finding>,
}

#[derive(Debug, Deserialize, Clone)]
struct Finding {
    id: String,
    #[serde(default)]
    subject: Option<String>,
    status: String,
    summary: String,
    #[serde(default)]
    fix: String,
}

/// One doctor run: exit code, the report, and its text for failure messages.
struct Run {
    code: i32,
    report: Report,
    raw: String,
}

impl Run {
    fn by_id(&self, id: &str) -> Result<&Finding> {
        self.report
            .findings
            .iter()
            .find(|f| f.id == id)
            .with_context(|| format!("no finding {id} in:\n{}", self.raw))
    }

    /// `id` fails with a fix that contains `fix`, the summary contains `says`, and the exit
    /// code is 1.
    fn expect_fail(&self, id: &str, says: &str, fix: &str) -> Result<()> {
        let f = self.by_id(id)?;
        ensure!(
            f.status == "fail" && f.summary.contains(says) && f.fix.contains(fix),
            "want {id} to fail saying {says:?} with a fix containing {fix:?}, got {f:#?}\n{}",
            self.raw
        );
        ensure!(
            self.code == 1 && self.report.status == "fail",
            "a failed check must exit 1 (got {}):\n{}",
            self.code,
            self.raw
        );
        Ok(())
    }

    fn expect_healthy(&self) -> Result<()> {
        let not_ok: Vec<&Finding> = self
            .report
            .findings
            .iter()
            .filter(|f| f.status != "ok" && !(f.id == "clock.skew" && f.status == "skip"))
            .collect();
        ensure!(
            not_ok.is_empty() && self.code == 0,
            "a healthy node: every check ok (clock.skew skips outside a pod) and exit 0; got exit \
             {} and {not_ok:#?}",
            self.code
        );
        let ids: Vec<&str> = self.report.findings.iter().map(|f| f.id.as_str()).collect();
        for id in [
            "containerd.reachable",
            "containerd.config_path",
            "containerd.discard_layers",
            "containerd.content_store",
            "hosts.toml",
            "daemon.ready",
            "daemon.metrics",
            "dht.peers",
            "dht.private_network",
            "peer.auth",
            "policy.bundle",
            "grants.keys",
            "clock.skew",
        ] {
            ensure!(ids.contains(&id), "no {id} finding in {ids:?}");
        }
        Ok(())
    }
}

/// The secrets and the bundle every daemon of the rig uses, in a directory of their own.
struct Setup {
    dir: PathBuf,
}

impl Setup {
    fn new(rig: &Rig) -> Result<Setup> {
        let dir = rig.dir.join("doctor");
        let _ = std::fs::remove_dir_all(&dir);
        for d in ["policy", "failing-policy", "keys", "no-keys"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        let here = Path::new(env!("CARGO_MANIFEST_DIR"));
        for f in ["mirror.rego", "mirror_test.rego"] {
            std::fs::copy(
                here.join("policies/default").join(f),
                dir.join("policy").join(f),
            )?;
            std::fs::copy(
                here.join("policies/default").join(f),
                dir.join("failing-policy").join(f),
            )?;
        }
        std::fs::write(
            dir.join("failing-policy/broken_test.rego"),
            "package speculum.doctor_test\n\ntest_that_fails if {\n\tfalse\n}\n",
        )?;
        let (_, public) = speculum_grant::generate();
        std::fs::write(dir.join("keys/webhook.pem"), public)?;
        std::fs::write(
            dir.join("swarm.key"),
            speculum::routing::psk::to_key_file(speculum::routing::psk::generate()),
        )?;
        std::fs::write(dir.join("bad-swarm.key"), "not a swarm key\n")?;
        std::fs::write(
            dir.join("peer.key"),
            "doctor-rig-shared-peer-secret-0123456789\n",
        )?;
        std::fs::write(
            dir.join("other-peer.key"),
            "a-different-secret-of-another-cluster-42\n",
        )?;
        let s = Setup { dir };
        for (k, v) in s.env() {
            rig.set_env(&k, &v);
        }
        Ok(s)
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn env(&self) -> Vec<(String, String)> {
        [
            ("SPECULUM_ROUTING_PSK_FILE", self.path("swarm.key")),
            ("SPECULUM_TENANCY_PEER_AUTH_MODE", "shared_key".to_owned()),
            (
                "SPECULUM_TENANCY_PEER_AUTH_SHARED_KEY_FILE",
                self.path("peer.key"),
            ),
            ("SPECULUM_POLICY_BUNDLE", self.path("policy")),
            ("SPECULUM_TENANCY_GRANTS_KEYS_DIR", self.path("keys")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }
}

/// `speculum doctor --output json` inside node `n`'s namespace, with the daemon's config and
/// environment; `env` overrides settings for this run only, `wrap` runs doctor under another
/// command (e.g. `setpriv`).
fn doctor(rig: &Rig, n: u32, args: &[&str], env: &[(&str, &str)], wrap: &[&str]) -> Result<Run> {
    let node_dir = rig.dir.join(format!("n{n}"));
    let config = node_dir.join("speculum.yaml").display().to_string();
    let containerd_config = node_dir.join("containerd.toml").display().to_string();
    let bin = rig.bin.display().to_string();
    let node = n.to_string();
    let mut argv: Vec<&str> = vec!["node_exec", &node];
    argv.extend_from_slice(wrap);
    argv.extend_from_slice(&[
        &bin,
        "doctor",
        "--config",
        &config,
        "--containerd-config",
        &containerd_config,
        "--output",
        "json",
    ]);
    argv.extend_from_slice(args);
    let mut cmd: Command = rig.function(&argv);
    rig.env(&mut cmd);
    // Outside a pod and without a kubeconfig, clock.skew skips (the healthy run expects it).
    cmd.env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let t0 = Instant::now();
    let out = cmd.output().context("running doctor")?;
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    let report: Report = serde_json::from_str(raw.trim()).with_context(|| {
        format!(
            "doctor printed no JSON report (exit {:?}):\n{raw}\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    rig.step(&format!(
        "doctor on node {n}: {} in {:?}",
        report.status,
        t0.elapsed()
    ));
    Ok(Run {
        code: out.status.code().unwrap_or(-1),
        report,
        raw,
    })
}

/// Restarts node `n`'s containerd with its config changed by `edit` (the rig's own writer makes
/// the config; containerd is started exactly as `start_containerd` does, minus the rewrite).
fn restart_containerd_with(rig: &Rig, n: u32, edit: impl Fn(&str) -> String) -> Result<()> {
    rig.call(&["stop_pid", &format!("n{n}-containerd"), "TERM"])?;
    let path = rig.dir.join(format!("n{n}/containerd.toml"));
    let text = std::fs::read_to_string(&path)?;
    let edited = edit(&text);
    ensure!(
        edited != text,
        "the edit changed nothing in {}",
        path.display()
    );
    std::fs::write(&path, edited)?;
    let script = format!(
        r#"bin=$(containerd_bin) && start_bg n{n}-containerd "$(node_ns {n})" "$(node_dir {n})/containerd.log" env PATH="$bin:$PATH" "$bin/containerd" --config "$(node_dir {n})/containerd.toml" && wait_containerd {n}"#
    );
    rig.call(&["eval", &script])?;
    Ok(())
}

/// Puts back node `n`'s containerd as the rig made it and waits for its daemon to be ready.
fn restore_containerd(rig: &Rig, n: u32) -> Result<()> {
    let node = n.to_string();
    rig.call(&["stop_pid", &format!("n{n}-containerd"), "TERM"])?;
    rig.call(&["start_containerd", &node])?;
    rig.call(&["wait_containerd", &node])?;
    wait_ready(rig, n)
}

fn wait_ready(rig: &Rig, n: u32) -> Result<()> {
    rig.call(&[
        "poll_until",
        "60",
        "the daemon ready again",
        "speculum_ready",
        &n.to_string(),
    ])?;
    Ok(())
}

/// Polls until node `n`'s daemon reports at least one DHT peer.
fn wait_peers(rig: &Rig, n: u32) -> Result<()> {
    let peers = Series {
        name: "speculum_routing_peers",
        labels: &[],
    };
    let t0 = Instant::now();
    while t0.elapsed() < WAIT {
        if rig.metric(n, &peers)? >= 1.0 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("node {n}'s daemon has no DHT peer after {WAIT:?}")
}

fn config_line(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find(|l| l.trim_start().starts_with(&format!("{key} =")))
        .map(str::to_owned)
}

#[test]
fn healthy_node_is_ok_and_each_broken_part_fails_with_its_fix() -> Result<()> {
    let Some(rig) = Rig::start_with(
        "healthy_node_is_ok_and_each_broken_part_fails_with_its_fix",
        &["small"],
        &[("RIG_NODES", "2")],
    )?
    else {
        return Ok(());
    };
    let setup = Setup::new(&rig)?;
    let images = rig.images()?;
    let small = image_named(&images, "small")?;
    for n in 1..=2 {
        rig.start_speculum(n)?;
    }
    // Blobs in node 2's content store, so the content check reads a real one.
    rig.cri_pull(NODE, small.tag("v1")?, small)?;
    wait_peers(&rig, NODE)?;

    rig.step("a healthy node: every check ok, exit 0");
    let healthy = doctor(&rig, NODE, &[], &[], &[])?;
    healthy.expect_healthy()?;
    // containerd 1.6/1.7 and 2.4+ report their CRI settings; 2.0-2.3 do not, and doctor reads
    // the node's containerd.toml instead. Either way the summary says where it looked.
    let source = &healthy.by_id("containerd.config_path")?.summary;
    ensure!(
        source.contains("as containerd reports it")
            || source.contains("containerd.toml (config version"),
        "containerd.config_path names its source: {source}"
    );
    rig.step(&format!("containerd.config_path: {source}"));
    let text_run = {
        let mut cmd = rig.function(&[
            "node_exec",
            &NODE.to_string(),
            &rig.bin.display().to_string(),
            "doctor",
            "--config",
            &rig.dir
                .join(format!("n{NODE}/speculum.yaml"))
                .display()
                .to_string(),
            "--containerd-config",
            &rig.dir
                .join(format!("n{NODE}/containerd.toml"))
                .display()
                .to_string(),
        ]);
        rig.env(&mut cmd);
        cmd.env_remove("KUBECONFIG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .output()?
    };
    let text = String::from_utf8_lossy(&text_run.stdout);
    ensure!(
        text_run.status.success()
            && text.contains("ok    peer.auth")
            && text.contains(" ok, 0 warn, 0 fail, 1 skip"),
        "the text report of a healthy node:\n{text}"
    );
    let peer_auth = healthy.by_id("peer.auth")?;
    ensure!(
        peer_auth.summary.contains(&node_ip(1)),
        "peer.auth must have asked node 1 (the bootstrap peer): {peer_auth:?}"
    );

    let hosts = rig
        .dir
        .join(format!("n{NODE}/certs.d/{}/hosts.toml", upstream_host()));
    let node = NODE.to_string();

    rig.step("hosts.toml deleted");
    std::fs::remove_file(&hosts)?;
    doctor(&rig, NODE, &[], &[], &[])?.expect_fail(
        "hosts.toml",
        "does not exist",
        "speculum configure",
    )?;
    rig.call(&["configure_node", &node])?;

    rig.step("hosts.toml edited by hand");
    let ours = std::fs::read_to_string(&hosts)?;
    std::fs::write(
        &hosts,
        ours.replace("dial_timeout = \"200ms\"", "dial_timeout = \"5s\""),
    )?;
    ensure!(
        std::fs::read_to_string(&hosts)? != ours,
        "the edit changed nothing:\n{ours}"
    );
    let run = doctor(&rig, NODE, &[], &[], &[])?;
    run.expect_fail(
        "hosts.toml",
        "not what `configure` writes now",
        "speculum configure",
    )?;
    ensure!(
        run.by_id("hosts.toml")?.subject.as_deref() == Some(upstream_host().as_str()),
        "hosts.toml names its registry"
    );
    rig.call(&["configure_node", &node])?;

    rig.step("containerd's config_path names another directory");
    let certs = rig
        .dir
        .join(format!("n{NODE}/certs.d"))
        .display()
        .to_string();
    restart_containerd_with(&rig, NODE, |t| {
        t.replace(
            &format!("config_path = \"{certs}\""),
            "config_path = \"/etc/elsewhere/certs.d\"",
        )
    })?;
    let run = doctor(&rig, NODE, &[], &[], &[])?;
    run.expect_fail(
        "containerd.config_path",
        "/etc/elsewhere/certs.d",
        &format!("config_path = \"{certs}\""),
    )?;

    rig.step("containerd's config_path missing");
    restart_containerd_with(&rig, NODE, |t| {
        t.lines()
            .filter(|l| !l.trim_start().starts_with("config_path ="))
            .map(|l| format!("{l}\n"))
            .collect()
    })?;
    let run = doctor(&rig, NODE, &[], &[], &[])?;
    run.expect_fail(
        "containerd.config_path",
        "",
        &format!("config_path = \"{certs}\""),
    )?;

    rig.step("discard_unpacked_layers = true");
    restore_containerd(&rig, NODE)?;
    let discard_line = config_line(
        &std::fs::read_to_string(rig.dir.join(format!("n{NODE}/containerd.toml")))?,
        "discard_unpacked_layers",
    )
    .context("the rig's containerd config sets discard_unpacked_layers")?;
    restart_containerd_with(&rig, NODE, |t| {
        t.replace(&discard_line, "  discard_unpacked_layers = true")
    })?;
    let run = doctor(&rig, NODE, &[], &[], &[])?;
    run.expect_fail(
        "containerd.discard_layers",
        "discards layers",
        "discard_unpacked_layers = false",
    )?;
    ensure!(
        run.by_id("containerd.config_path")?.status == "ok",
        "only the discard check fails:\n{}",
        run.raw
    );
    restore_containerd(&rig, NODE)?;

    rig.step("containerd stopped");
    rig.call(&["stop_pid", &format!("n{NODE}-containerd"), "TERM"])?;
    let run = doctor(&rig, NODE, &[], &[], &[])?;
    run.expect_fail(
        "containerd.reachable",
        "does not answer",
        "containerd.socket",
    )?;
    ensure!(
        run.by_id("containerd.config_path")?.status == "skip",
        "checks that need containerd skip when it is down:\n{}",
        run.raw
    );
    restore_containerd(&rig, NODE)?;

    rig.step("the content store is unreadable (root without CAP_DAC_*)");
    let blobs = rig.dir.join(format!(
        "n{NODE}/root/io.containerd.content.v1.content/blobs/sha256"
    ));
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        let m = std::fs::metadata(&blobs)
            .with_context(|| format!("{} after a pull", blobs.display()))?
            .permissions()
            .mode();
        std::fs::set_permissions(&blobs, std::fs::Permissions::from_mode(0o000))?;
        m
    };
    let run = doctor(
        &rig,
        NODE,
        &[],
        &[],
        &[
            "setpriv",
            "--bounding-set",
            "-dac_override,-dac_read_search",
            "--",
        ],
    );
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&blobs, std::fs::Permissions::from_mode(mode))?;
    }
    run?.expect_fail(
        "containerd.content_store",
        "not readable",
        "run the daemon as uid 0",
    )?;

    rig.step("the policy bundle has a failing test");
    let failing = setup.path("failing-policy");
    doctor(
        &rig,
        NODE,
        &[],
        &[("SPECULUM_POLICY_BUNDLE", &failing)],
        &[],
    )?
    .expect_fail(
        "policy.bundle",
        "data.speculum.doctor_test.test_that_fails",
        "speculum policy test",
    )?;

    rig.step("no grant key");
    doctor(
        &rig,
        NODE,
        &[],
        &[("SPECULUM_TENANCY_GRANTS_KEYS_DIR", &setup.path("no-keys"))],
        &[],
    )?
    .expect_fail("grants.keys", "no *.pem key", "grant-keys")?;

    rig.step("a broken private-network key");
    doctor(
        &rig,
        NODE,
        &[],
        &[("SPECULUM_ROUTING_PSK_FILE", &setup.path("bad-swarm.key"))],
        &[],
    )?
    .expect_fail(
        "dht.private_network",
        "not a swarm key",
        "speculum psk generate",
    )?;

    rig.step("a peer key the cluster does not share");
    doctor(
        &rig,
        NODE,
        &[],
        &[(
            "SPECULUM_TENANCY_PEER_AUTH_SHARED_KEY_FILE",
            &setup.path("other-peer.key"),
        )],
        &[],
    )?
    .expect_fail("peer.auth", "refuses this node's token", "shared_key_file")?;

    rig.step("the daemon stopped");
    rig.call(&["stop_speculum", &node])?;
    let run = doctor(&rig, NODE, &[], &[], &[])?;
    run.expect_fail("daemon.ready", "no daemon answers", "speculum registry")?;
    ensure!(
        run.by_id("dht.peers")?.status == "skip",
        "dht.peers skips without a daemon:\n{}",
        run.raw
    );
    rig.start_speculum(NODE)?;
    wait_peers(&rig, NODE)?;

    rig.step("everything put back: healthy again");
    doctor(&rig, NODE, &[], &[], &[])?.expect_healthy()?;
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// clock.skew against an API server whose clock is off (no rig needed).

/// A fake API server on 127.0.0.1 that answers every request with `Date: now + offset`, until
/// `served` requests were answered or 30 s passed.
fn fake_api_server(
    offset_secs: i64,
    served: usize,
) -> Result<(u16, std::thread::JoinHandle<usize>)> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let port = listener.local_addr()?.port();
    let handle = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut n = 0;
        while n < served && Instant::now() < deadline {
            let Ok((mut conn, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            let _ = conn.set_nonblocking(false);
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let now = std::time::SystemTime::now();
            let date = if offset_secs >= 0 {
                now + Duration::from_secs(offset_secs as u64)
            } else {
                now - Duration::from_secs(offset_secs.unsigned_abs())
            };
            let body = r#"{"major":"1","minor":"33"}"#;
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nDate: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                httpdate::fmt_http_date(date),
                body.len()
            );
            n += 1;
        }
        n
    });
    Ok((port, handle))
}

#[test]
fn clock_skew_is_judged_from_the_api_servers_date() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cases = [(0i64, "ok"), (-120, "fail"), (12, "warn")];
    for (offset, want) in cases {
        let (port, server) = fake_api_server(offset, 1)?;
        let kubeconfig = dir.path().join(format!("kubeconfig-{port}"));
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{port}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: c\n  context:\n    cluster: fake\n    user: u\ncurrent-context: c\n"
            ),
        )?;
        // Everything else on this host is not a node: those checks fail or skip, this one is
        // looked at alone.
        let out = Command::new(env!("CARGO_BIN_EXE_speculum"))
            .args(["doctor", "--output", "json", "--timeout", "3s"])
            .args(["--containerd-socket", "/nonexistent/containerd.sock"])
            .args(["--metrics-listen", "127.0.0.1:1"])
            .args([
                "--certs-dir",
                &dir.path().join("certs.d").display().to_string(),
            ])
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("SPECULUM_CONFIG")
            .output()?;
        let raw = String::from_utf8_lossy(&out.stdout);
        let report: Report = serde_json::from_str(raw.trim()).with_context(|| {
            format!(
                "no JSON report: {raw}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        let f = report
            .findings
            .iter()
            .find(|f| f.id == "clock.skew")
            .context("no clock.skew finding")?;
        ensure!(
            f.status == want,
            "API server {offset:+}s off: want clock.skew {want}, got {f:#?}"
        );
        if want == "fail" {
            // `Date` has a one-second resolution: 120 s off reads as 119-121 s.
            let secs: Option<u64> = f
                .summary
                .split("clock is ")
                .nth(1)
                .and_then(|r| r.split('s').next())
                .and_then(|n| n.parse().ok());
            ensure!(
                secs.is_some_and(|s| (118..=122).contains(&s))
                    && f.summary.contains("ahead of the API server's")
                    && f.fix.contains("synchronise"),
                "{f:#?}"
            );
        }
        ensure!(
            server
                .join()
                .map_err(|_| anyhow::anyhow!("server thread"))?
                == 1,
            "doctor never asked the API server"
        );
        // The rest of this host is no node: doctor must say so with exit 1, whatever the clock.
        ensure!(out.status.code() == Some(1), "exit {:?}", out.status.code());
    }
    Ok(())
}
