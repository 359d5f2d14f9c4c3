//! Loading the configured bundle at start and reloading it when it changes.
//!
//! The directory is polled (`policy.reload_interval`): a ConfigMap update is an atomic symlink
//! swap, which inotify reports on the link's parent at best, while a poll that re-reads and
//! fingerprints the few bundle files always sees it. A changed bundle is read, its tests run,
//! and it is compiled; only then is it swapped in. A broken bundle is rejected, the previous one
//! stays active, and the rejection shows in a log line, `speculum_policy_reloads_total
//! {result="rejected"}` and the `policy` line of `/readyz` (a note: the daemon stays ready,
//! since it still decides with the previous bundle).
//!
//! A bundle that is broken at start leaves the gate denying everything (fail closed for P2P:
//! every pull goes upstream) until a good bundle appears.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::rego::{Bundle, load_tested};
use super::{Gate, PolicyConfig, PolicyMetrics, StaticPolicy};
use crate::readiness::Readiness;
use crate::shutdown::Shutdown;

const READINESS_PART: crate::readiness::Part = crate::readiness::Part::Policy;

/// Builds the gate for `config`: the built-in policy when no bundle is configured, else the
/// bundle (tested and compiled), else — broken at start — deny-all. Also returns the
/// fingerprint of the bundle looked at (for [`watch`]).
pub fn initial(
    config: &PolicyConfig,
    metrics: PolicyMetrics,
    readiness: &Readiness,
) -> (Gate, Option<String>) {
    let switches = config.switches();
    if config.bundle.is_empty() {
        let policy = Arc::new(StaticPolicy::default());
        readiness.note(
            READINESS_PART,
            Some("built-in (allow all, resolve tags)".to_owned()),
        );
        return (Gate::new(policy, switches, metrics), None);
    }
    let dir = PathBuf::from(&config.bundle);
    match load_tested(&dir, config.eval_timeout) {
        Ok(policy) => {
            let fingerprint = policy.fingerprint().to_owned();
            tracing::info!(bundle = %dir.display(), policy = %super::Policy::describe(&policy), "policy bundle loaded");
            metrics.reloaded(true);
            readiness.note(READINESS_PART, Some(super::Policy::describe(&policy)));
            (
                Gate::new(Arc::new(policy), switches, metrics),
                Some(fingerprint),
            )
        }
        Err(e) => {
            tracing::error!(bundle = %dir.display(), error = %e, "policy bundle rejected at start; nothing is served from peers until it is fixed");
            metrics.reloaded(false);
            readiness.note(
                READINESS_PART,
                Some(format!("bundle rejected, denying all P2P: {e}")),
            );
            let policy = Arc::new(StaticPolicy::deny_all("no-valid-bundle"));
            // Remember what was looked at, so the watcher reports this bundle once, not twice.
            let seen = Bundle::read(&dir).ok().map(|b| b.fingerprint());
            (Gate::new(policy, switches, metrics), seen)
        }
    }
}

/// Watches the configured bundle until `shutdown`. `loaded` is the fingerprint [`initial`]
/// returned (the bundle looked at last).
pub async fn watch(
    config: PolicyConfig,
    gate: Gate,
    readiness: Readiness,
    loaded: Option<String>,
    shutdown: Shutdown,
) {
    if config.bundle.is_empty() {
        return;
    }
    let dir = PathBuf::from(&config.bundle);
    let mut active = loaded;
    // The last fingerprint looked at, good or bad: a broken bundle is reported once, not on
    // every poll.
    let mut seen = active.clone();
    let mut tick = tokio::time::interval(config.reload_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => {}
        }
        let d = dir.clone();
        let timeout = config.eval_timeout;
        let previous = seen.clone();
        // Reading and compiling is blocking work; keep it off the serving threads.
        let step =
            tokio::task::spawn_blocking(move || check(&d, timeout, previous.as_deref())).await;
        let Ok(Some((fingerprint, outcome))) = step else {
            continue; // unchanged (or the blocking task died, which a later tick retries)
        };
        seen = Some(fingerprint);
        match outcome {
            Ok(policy) => {
                if Some(policy.fingerprint().to_owned()) == active {
                    continue;
                }
                let describe = super::Policy::describe(&policy);
                active = Some(policy.fingerprint().to_owned());
                gate.swap(Arc::new(policy));
                gate.metrics().reloaded(true);
                readiness.note(READINESS_PART, Some(describe.clone()));
                tracing::info!(bundle = %dir.display(), policy = %describe, "policy bundle reloaded");
            }
            Err(e) => {
                gate.metrics().reloaded(false);
                let current = super::Policy::describe(gate.active().as_ref());
                readiness.note(
                    READINESS_PART,
                    Some(format!("{current}; new bundle rejected: {e}")),
                );
                tracing::error!(bundle = %dir.display(), error = %e, active = %current, "policy bundle rejected; keeping the previous one");
            }
        }
    }
}

type Outcome = Result<super::RegoPolicy, super::PolicyError>;

/// `None` when the bundle on disk still has fingerprint `seen`; else its fingerprint (or, when
/// unreadable, the error text standing in for one, so it is reported once) and the result of
/// testing and compiling it.
fn check(
    dir: &std::path::Path,
    timeout: Duration,
    seen: Option<&str>,
) -> Option<(String, Outcome)> {
    match Bundle::read(dir) {
        Err(e) => {
            let fp = format!("unreadable: {e}");
            (seen != Some(fp.as_str())).then_some((fp, Err(e)))
        }
        Ok(bundle) => {
            let fp = bundle.fingerprint();
            (seen != Some(fp.as_str())).then(|| (fp, load_tested(dir, timeout)))
        }
    }
}
