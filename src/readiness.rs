//! Readiness as a latch of named conditions: the daemon is ready when every part that
//! registered a condition has released it, and `/readyz` says which part is holding it.
//! (The linkerd2-proxy habit: each subsystem releases its own part of readiness.)
//!
//! The parts are the variants of [`Part`]; each variant's doc says who blocks it and who
//! releases it, so "what can hold `/readyz` back?" is answered here.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// One part of readiness, or one informational line of `/readyz`. The name `/readyz` prints is
/// [`Part::as_str`]; lines are printed in the order of those names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    /// The HTTP listeners. Blocked by `app::run` before it binds anything ("binding"),
    /// released once every listener is bound.
    Listeners,
    /// The DHT router. Blocked and released by `app`'s health loop (every 5 s) from
    /// `Router::ready`: blocked until the router's listener is bound.
    Routing,
    /// The store as seen by the advertiser (`routing::sync::Advertiser`). Blocked when the
    /// advertiser is built ("first reconcile pending") and whenever the store cannot be read;
    /// released by every reconcile that read the store.
    Store,
    /// The containerd connection. Blocked by `app`'s health loop when containerd does not answer
    /// `version`, released when it does. Never registered with `containerd.enabled: false`.
    Containerd,
    /// Shutdown. Blocked by `app::run` when SIGTERM (or a failed task) starts the shutdown, so
    /// load balancers stop sending pulls first; never released.
    Shutdown,
    /// The active policy: a note only (`Readiness::note`), set by `policy::reload` to the
    /// active bundle or the reason a bundle was rejected. Never holds readiness back: a bad
    /// bundle denies peer serving, it does not take the node out of service.
    Policy,
    /// What keeps containerd from using this node as a mirror: a note only, set by `app`'s
    /// containerd config check (`store::introspect`). Never holds readiness back.
    ContainerdConfig,
}

impl Part {
    /// Every part, for tests and tools that list them.
    pub const ALL: [Part; 7] = [
        Part::Listeners,
        Part::Routing,
        Part::Store,
        Part::Containerd,
        Part::Shutdown,
        Part::Policy,
        Part::ContainerdConfig,
    ];

    /// The name `/readyz` prints (stable: probes and operators read it).
    pub fn as_str(self) -> &'static str {
        match self {
            Part::Listeners => "listeners",
            Part::Routing => "routing",
            Part::Store => "store",
            Part::Containerd => "containerd",
            Part::Shutdown => "shutdown",
            Part::Policy => "policy",
            Part::ContainerdConfig => "containerd-config",
        }
    }
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Shared readiness state. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    // A std Mutex: held only to read or flip a flag, never across an `.await`. Keyed by
    // `Part::as_str`, so `/readyz` lists parts in the order of their names.
    conditions: Arc<Mutex<BTreeMap<&'static str, Option<String>>>>,
    // Informational lines shown by `/readyz` that never hold readiness back (e.g. "the new
    // policy bundle was rejected; the previous one is active").
    notes: Arc<Mutex<BTreeMap<&'static str, String>>>,
}

impl Readiness {
    pub fn new() -> Readiness {
        Readiness::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, Option<String>>> {
        self.conditions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks `part` not ready, with a reason shown by `/readyz`.
    pub fn block(&self, part: Part, reason: impl Into<String>) {
        self.lock().insert(part.as_str(), Some(reason.into()));
    }

    /// Marks `part` ready.
    pub fn release(&self, part: Part) {
        self.lock().insert(part.as_str(), None);
    }

    /// True when no part holds readiness back.
    pub fn is_ready(&self) -> bool {
        self.lock().values().all(Option::is_none)
    }

    /// Sets (or, with `None`, clears) an informational line for `part` that does not affect
    /// readiness.
    pub fn note(&self, part: Part, text: Option<String>) {
        let mut notes = self.notes.lock().unwrap_or_else(|p| p.into_inner());
        match text {
            Some(t) => notes.insert(part.as_str(), t),
            None => notes.remove(part.as_str()),
        };
    }

    /// One line per part: `part: ok` or `part: <reason>`, then the notes as `part: <note>`.
    pub fn detail(&self) -> String {
        let mut out: String = self
            .lock()
            .iter()
            .map(|(part, reason)| match reason {
                None => format!("{part}: ok\n"),
                Some(r) => format!("{part}: {r}\n"),
            })
            .collect();
        let notes = self.notes.lock().unwrap_or_else(|p| p.into_inner());
        for (part, text) in notes.iter() {
            out.push_str(&format!("{part}: {text}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn ready_only_when_every_part_released() {
        let r = Readiness::new();
        assert!(r.is_ready(), "no conditions: ready");
        r.block(Part::Routing, "bootstrapping");
        r.block(Part::Listeners, "binding");
        assert!(!r.is_ready());
        r.release(Part::Routing);
        assert!(!r.is_ready());
        assert!(r.detail().contains("listeners: binding"));
        r.release(Part::Listeners);
        assert!(r.is_ready());
        r.note(Part::Policy, Some("bundle rejected".into()));
        assert!(r.is_ready(), "a note never holds readiness back");
        r.block(Part::Shutdown, "draining");
        assert!(!r.is_ready());
    }

    #[test]
    fn every_part_has_its_own_name() {
        let names: HashSet<&str> = Part::ALL.iter().map(|p| p.as_str()).collect();
        assert_eq!(names.len(), Part::ALL.len(), "{names:?}");
        for p in Part::ALL {
            assert_eq!(p.to_string(), p.as_str());
        }
    }

    /// The `/readyz` body as it was when the parts were string keys (probes, the chart's
    /// readinessProbe and operators read it): one line per condition, sorted by name, then
    /// the notes, sorted by name.
    #[test]
    fn readyz_text_is_unchanged() {
        let r = Readiness::new();
        r.block(Part::Listeners, "binding");
        r.block(Part::Store, "first reconcile pending");
        r.block(Part::Routing, "listener not bound yet");
        r.note(
            Part::Policy,
            Some("built-in (allow all, resolve tags)".into()),
        );
        r.release(Part::Listeners);
        r.release(Part::Routing);
        r.block(Part::Containerd, "unreachable: connection refused");
        r.note(Part::ContainerdConfig, Some("hosts dir unknown".into()));
        r.block(Part::Shutdown, "shutting down");
        assert_eq!(
            r.detail(),
            "containerd: unreachable: connection refused\n\
             listeners: ok\n\
             routing: ok\n\
             shutdown: shutting down\n\
             store: first reconcile pending\n\
             containerd-config: hosts dir unknown\n\
             policy: built-in (allow all, resolve tags)\n"
        );
        r.note(Part::ContainerdConfig, None);
        assert!(
            !r.detail().contains("containerd-config"),
            "a cleared note is gone"
        );
    }
}
