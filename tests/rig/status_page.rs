//! The node status page (`src/status/`, docs/status-page.md) in a real headless Chromium
//! (Debian's `chromium`): the page the daemon serves, its script running, the DOM it builds.
//!
//! - `hostile_names_render_as_text`: the page's router on loopback in this process, its ring
//!   fed records whose repository and reference are HTML/JS injection attempts; Chromium must
//!   show them as the characters they are and run none of them.
//! - `the_page_follows_a_pull_under_load`: three namespace nodes (`tests/rig/`), the page on
//!   nodes 1 and 2 (`RIG_STATUS`), node 3 without it. Node 1 pulls an image from upstream,
//!   node 2 from node 1; Chromium runs *inside node 2's network namespace* against its metrics
//!   listener and must show the pulled layers (source, decision, bytes, served from a peer);
//!   then again while a bounded concurrent request loop keeps the daemon busy, with a
//!   screenshot under the target dir. Node 3 answers 404 on `/status`.
//!
//! Skips (with a line on stderr) without Chromium, and the rig test also without root or with
//! `SPECULUM_SKIP_RIG=1`. Rig knobs: `RIG_DIR`, `RIG_NS_PREFIX`, `RIG_SUBNET` as for every
//! rig test. Screenshots: `$CARGO_TARGET_TMPDIR/status-page/*.png`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use speculum::audit::recent::RecentRequests;
use speculum::audit::{AuditRecord, AuditSink};
use testkit::rig::*;

/// The longest one Chromium run may take (start, load, script, dump) on 2 busy cores.
const BROWSER_WAIT: Duration = Duration::from_secs(90);

fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

fn out_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("status-page");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// What one Chromium run should produce.
enum Output<'a> {
    /// The DOM after the page's script ran (stdout).
    Dom,
    /// A PNG of the page.
    Screenshot(&'a Path),
}

/// Runs headless Chromium on `url`, prefixed by `prefix` (e.g. `ip netns exec NS`), with a
/// virtual time budget so the page's first polls have answered before the DOM is taken.
/// Everything that is not loopback goes to a dead proxy: the browser reaches nothing else.
fn browse(prefix: &[&str], url: &str, output: Output<'_>) -> Result<String> {
    let bin = chromium().context("no chromium")?;
    // A fresh profile per run: a second browser on a profile in use would hand its URL to the
    // first one and wait.
    let dir = tempfile::tempdir()?;
    let profile = dir.path();
    let mut cmd = match prefix.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(&bin);
            c
        }
        None => Command::new(&bin),
    };
    cmd.args([
        "--headless",
        "--no-sandbox", // runs as root (the rig needs it)
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-domain-reliability",
        "--no-pings",
        "--proxy-server=127.0.0.1:9",
        "--hide-scrollbars",
        "--window-size=1400,1000",
        "--virtual-time-budget=4000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    match output {
        Output::Dom => {
            cmd.arg("--dump-dom");
        }
        Output::Screenshot(path) => {
            cmd.arg(format!("--screenshot={}", path.display()));
        }
    }
    // Files, not pipes: a DOM of hundreds of rows outgrows a pipe's buffer, and `wait_child`
    // does not read while it waits.
    let stdout = profile.join("stdout");
    let stderr = profile.join("stderr");
    cmd.arg(url)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout)?)
        .stderr(std::fs::File::create(&stderr)?);
    let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let out = wait_child(child, BROWSER_WAIT).context("chromium")?;
    let said = std::fs::read_to_string(&stderr).unwrap_or_default();
    ensure!(
        out.status.success(),
        "chromium failed ({}): {}",
        out.status,
        said.lines()
            .filter(|l| !l.contains("dbus"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(std::fs::read_to_string(&stdout)?)
}

/// The `<tr class="request" …>` rows of the dumped DOM, each as its whole markup.
fn request_rows(dom: &str) -> Vec<&str> {
    dom.match_indices("<tr class=\"request\"")
        .filter_map(|(i, _)| dom[i..].find("</tr>").map(|end| &dom[i..i + end]))
        .collect()
}

/// The value of attribute `name` in a row's start tag.
fn attr<'a>(row: &'a str, name: &str) -> Option<&'a str> {
    let key = format!("{name}=\"");
    let start = row.find(&key)? + key.len();
    row[start..].find('"').map(|end| &row[start..start + end])
}

fn hostile(i: usize) -> AuditRecord {
    let names = [
        "<img src=x onerror=\"document.title='pwned'\">",
        "<script>document.title='pwned'</script>",
        "\"><svg onload=document.title='pwned'>",
    ];
    AuditRecord {
        time: format!("2026-12-03T18:00:{i:02}.000Z"),
        event: "request".to_owned(),
        node: "n1".to_owned(),
        client: "127.0.0.1:40000".to_owned(),
        source: "containerd".to_owned(),
        registry: "127.0.0.1:5000".to_owned(),
        repository: names[i % names.len()].to_owned(),
        reference: "<b>bold</b>&amp;".to_owned(),
        kind: "manifest".to_owned(),
        method: "GET".to_owned(),
        decision: "allow".to_owned(),
        reason: "<i>reason</i>".to_owned(),
        served_from: "local".to_owned(),
        status: 200,
        bytes: 1234 + i as u64,
        duration_ms: 1.5,
        ..AuditRecord::default()
    }
}

#[test]
fn hostile_names_render_as_text() -> Result<()> {
    if chromium().is_none() {
        skip(
            "hostile_names_render_as_text",
            "no chromium (apt-get install chromium chromium-driver)",
        );
        return Ok(());
    }
    let ring = RecentRequests::new(10);
    for i in 0..3 {
        ring.record(hostile(i));
    }
    let sources = speculum::status::StatusSources {
        node: "<u>node</u>".to_owned(),
        peer_id: "12D3KooWtest".to_owned(),
        listen_addrs: vec!["/ip4/127.0.0.1/tcp/5082".to_owned()],
        cache_enabled: false,
        cache_max_bytes: 0,
        metrics: Arc::new(|| {
            "speculum_routing_peers 2\nspeculum_routing_advertised_keys 9\n".to_owned()
        }),
        policy: Arc::new(|| "bundle <b>x</b>@r1 (0123456789ab)".to_owned()),
        readiness: speculum::readiness::Readiness::new(),
        recent: ring,
    };
    let runtime = tokio::runtime::Runtime::new()?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr: SocketAddr = listener.local_addr()?;
    let app = speculum::status::router(sources);
    runtime.spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    let dom = browse(&[], &format!("http://{addr}/status"), Output::Dom)?;
    let rows = request_rows(&dom);
    ensure!(rows.len() == 3, "want 3 rows, got {}:\n{dom}", rows.len());
    // Injected markup would be elements in the DOM; as text it is serialised escaped.
    for bad in ["<img", "<svg", "<b>", "<i>", "<u>", "pwned</title>"] {
        ensure!(
            !dom.contains(bad),
            "the DOM holds {bad:?}: markup was parsed\n{dom}"
        );
    }
    ensure!(
        !dom.contains("<script>document"),
        "a client string became a script element\n{dom}"
    );
    for want in [
        "&lt;img src=x onerror=\"document.title='pwned'\"&gt;",
        "&lt;script&gt;document.title='pwned'&lt;/script&gt;",
        "\"&gt;&lt;svg onload=document.title='pwned'&gt;",
        "&lt;b&gt;bold&lt;/b&gt;&amp;amp;",
        "bundle &lt;b&gt;x&lt;/b&gt;@r1 (0123456789ab)",
    ] {
        ensure!(dom.contains(want), "the DOM lacks the text {want:?}\n{dom}");
    }
    ensure!(
        dom.contains("<title>speculum · &lt;u&gt;node&lt;/u&gt;</title>"),
        "title not escaped\n{dom}"
    );
    let bytes: Vec<&str> = rows.iter().filter_map(|r| attr(r, "data-bytes")).collect();
    ensure!(
        bytes == ["1236", "1235", "1234"],
        "rows newest first: {bytes:?}"
    );
    Ok(())
}

/// A bounded concurrent request loop inside node `n`'s namespace: up to `batches` rounds of
/// `curl --parallel` over the image's blobs (audited), its status JSON and its metrics, until
/// `stop` exists or `limit` seconds pass.
fn load_script(image: &Image, stop: &Path, batches: u32, limit: u32) -> String {
    let mut urls = String::new();
    for _ in 0..4 {
        for blob in &image.blobs {
            urls.push_str(&format!(
                "url = \"http://127.0.0.1:5080/v2/{}/blobs/{}?ns={}\"\noutput = \"/dev/null\"\n",
                image.repository,
                blob.digest,
                upstream_host().replace(':', "%3A")
            ));
        }
        for path in ["status/api", "metrics", "status"] {
            urls.push_str(&format!(
                "url = \"http://127.0.0.1:9402/{path}\"\noutput = \"/dev/null\"\n"
            ));
        }
    }
    let config = out_dir().join("load.curl");
    let _ = std::fs::write(&config, urls);
    format!(
        "deadline=$((SECONDS + {limit})); rounds=0; why=exhausted
         for i in $(seq 1 {batches}); do
           if [ -e '{stop}' ]; then why=stopped; break; fi
           if [ $SECONDS -ge $deadline ]; then why=deadline; break; fi
           curl -s --parallel --parallel-max 8 --max-time 20 -K '{config}' || true
           rounds=$i
         done
         echo \"$why $rounds\"",
        stop = stop.display(),
        config = config.display(),
    )
}

#[test]
fn the_page_follows_a_pull_under_load() -> Result<()> {
    const TEST: &str = "the_page_follows_a_pull_under_load";
    if chromium().is_none() {
        skip(
            TEST,
            "no chromium (apt-get install chromium chromium-driver)",
        );
        return Ok(());
    }
    let Some(rig) = Rig::start_with(TEST, &["small"], &[("RIG_STATUS", "1 2")])? else {
        return Ok(());
    };
    let images = rig.images()?;
    let small = image_named(&images, "small")?;
    for n in 1..=3 {
        rig.start_speculum(n)?;
    }

    rig.step("node 3 runs without the page: /status and /status/api answer 404");
    for path in ["status", "status/api"] {
        let code = rig.call(&[
            "node_exec",
            "3",
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
            &format!("http://127.0.0.1:9402/{path}"),
        ])?;
        ensure!(
            code.trim() == "404",
            "node 3 /{path} answered {code}, want 404"
        );
    }
    let metrics = rig.call(&["speculum_metrics", "3"])?;
    ensure!(
        metrics.contains("speculum_ready"),
        "node 3's metrics listener is up"
    );

    rig.step("node 1 pulls from upstream; node 2 pulls from node 1");
    rig.cri_pull(1, small.tag("v1")?, small)?;
    rig.wait_mirror_finds(2, small, &small.digest)?;
    rig.cri_pull(2, &small.by_digest, small)?;

    let ns = format!(
        "{}n2",
        std::env::var("RIG_NS_PREFIX").unwrap_or_else(|_| "spcl-".to_owned())
    );
    let prefix = ["ip", "netns", "exec", ns.as_str()];
    let url = "http://127.0.0.1:9402/status";

    rig.step("chromium in node 2's namespace: the pulled layers in the table");
    let dom = browse(&prefix, url, Output::Dom)?;
    let _ = std::fs::write(out_dir().join("pull.html"), &dom);
    check_layers(&dom, small, "peer").context("after the pull")?;
    ensure!(
        dom.contains("data-updated="),
        "the page never received a snapshot"
    );
    ensure!(dom.contains(">ready<"), "node 2 not shown ready");
    let after_pull = out_dir().join("status-after-pull.png");
    browse(&prefix, url, Output::Screenshot(&after_pull))?;

    rig.step("again while a concurrent request loop runs on node 2");
    let stop = out_dir().join("load.stop");
    let _ = std::fs::remove_file(&stop);
    let script = load_script(small, &stop, 200, 120);
    let load = rig.spawn(&["node_exec", "2", "bash", "-c", &script])?;
    // The loop has begun once the ring counts more requests than the pull made.
    let before = seen(&rig)?;
    let t0 = Instant::now();
    while seen(&rig)? < before + 20 {
        ensure!(t0.elapsed() < WAIT, "the load loop made no requests");
        std::thread::sleep(Duration::from_millis(100));
    }
    let t_load = Instant::now();
    let dom = browse(&prefix, url, Output::Dom);
    let shot = out_dir().join("status-under-load.png");
    let screenshot = browse(&prefix, url, Output::Screenshot(&shot));
    let browse_time = t_load.elapsed();
    let during = seen(&rig)?;
    let _ = std::fs::write(&stop, "");
    let load_out = wait_child(load, WAIT)?;
    let rounds = String::from_utf8_lossy(&load_out.stdout).trim().to_owned();
    let dom = dom?;
    screenshot?;
    let _ = std::fs::write(out_dir().join("load.html"), &dom);
    rig.step(&format!(
        "under load: {} requests recorded while chromium ran ({browse_time:?}), {rounds} rounds of curl",
        during.saturating_sub(before)
    ));
    ensure!(
        rounds.starts_with("stopped "),
        "the load loop ended ({rounds}) before the browser was done: no overlap"
    );
    ensure!(
        !dom.contains("update failed"),
        "a poll failed under load\n{dom}"
    );
    let rows = request_rows(&dom);
    ensure!(!rows.is_empty(), "no request rows under load");
    ensure!(
        rows.iter()
            .any(|r| attr(r, "data-source") == Some("containerd")
                && attr(r, "data-decision") == Some("allow")),
        "under load: no allowed containerd request rows"
    );
    let png = std::fs::metadata(&shot).with_context(|| format!("{}", shot.display()))?;
    ensure!(png.len() > 10_000, "screenshot is {} bytes", png.len());
    eprintln!("screenshot: {}", shot.display());

    rig.step("node 1's page shows node 2's daemon as the requester");
    let ns1 = ns.replace("n2", "n1");
    let dom1 = browse(&["ip", "netns", "exec", ns1.as_str()], url, Output::Dom)?;
    let _ = std::fs::write(out_dir().join("node1.html"), &dom1);
    ensure!(
        request_rows(&dom1)
            .iter()
            .any(|r| attr(r, "data-source") == Some("peer")),
        "node 1 shows no request from a peer"
    );
    Ok(())
}

/// Every layer of `image` has a row: containerd asked, the policy allowed, the bytes are the
/// layer's size and came from `served_from`.
fn check_layers(dom: &str, image: &Image, served_from: &str) -> Result<()> {
    let rows = request_rows(dom);
    ensure!(!rows.is_empty(), "no request rows:\n{dom}");
    for layer in image.layers() {
        let found = rows.iter().any(|r| {
            r.contains(&layer.digest)
                && r.contains(&image.repository)
                && attr(r, "data-source") == Some("containerd")
                && attr(r, "data-decision") == Some("allow")
                && attr(r, "data-served-from") == Some(served_from)
                && attr(r, "data-bytes") == Some(layer.size.to_string().as_str())
        });
        if !found {
            bail!(
                "no row for layer {} ({} bytes, from {served_from}) among {} rows:\n{}",
                layer.digest,
                layer.size,
                rows.len(),
                rows.join("\n")
            );
        }
    }
    Ok(())
}

/// Node 2's count of recorded requests (`/status/api` `recent.seen`).
fn seen(rig: &Rig) -> Result<u64> {
    let text = rig.call(&[
        "node_exec",
        "2",
        "curl",
        "-fsS",
        "--max-time",
        "5",
        "http://127.0.0.1:9402/status/api",
    ])?;
    let v: serde_json::Value = serde_json::from_str(&text).context("status api json")?;
    v["recent"]["seen"].as_u64().context("recent.seen missing")
}
