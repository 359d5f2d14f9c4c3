//! Readiness as a latch of named conditions: the daemon is ready when every part that
//! registered a condition has released it, and `/readyz` says which part is holding it.
//! (The linkerd2-proxy habit: each subsystem releases its own part of readiness.)

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Shared readiness state. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    // A std Mutex: held only to read or flip a flag, never across an `.await`.
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
    pub fn block(&self, part: &'static str, reason: impl Into<String>) {
        self.lock().insert(part, Some(reason.into()));
    }

    /// Marks `part` ready.
    pub fn release(&self, part: &'static str) {
        self.lock().insert(part, None);
    }

    /// True when no part holds readiness back.
    pub fn is_ready(&self) -> bool {
        self.lock().values().all(Option::is_none)
    }

    /// Sets (or, with `None`, clears) an informational line for `part` that does not affect
    /// readiness.
    pub fn note(&self, part: &'static str, text: Option<String>) {
        let mut notes = self.notes.lock().unwrap_or_else(|p| p.into_inner());
        match text {
            Some(t) => notes.insert(part, t),
            None => notes.remove(part),
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
    use super::*;

    #[test]
    fn ready_only_when_every_part_released() {
        let r = Readiness::new();
        assert!(r.is_ready(), "no conditions: ready");
        r.block("routing", "bootstrapping");
        r.block("listeners", "binding");
        assert!(!r.is_ready());
        r.release("routing");
        assert!(!r.is_ready());
        assert!(r.detail().contains("listeners: binding"));
        r.release("listeners");
        assert!(r.is_ready());
        r.block("shutdown", "draining");
        assert!(!r.is_ready());
    }
}
