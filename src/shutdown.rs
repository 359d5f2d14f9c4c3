//! A shutdown signal that many tasks can wait on and that remembers it fired, so a task that
//! starts waiting after the signal still sees it (as in mini-redis's `Shutdown`).

use tokio::sync::watch;

/// The sending half, held by the composition root.
#[derive(Debug, Clone)]
pub struct Trigger(watch::Sender<bool>);

/// A cloneable receiver; `wait().await` returns once shutdown has begun.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A connected trigger and receiver.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    /// Begins shutdown; every current and future `wait` returns.
    pub fn fire(&self) {
        self.0.send_replace(true);
    }

    /// A new receiver for this trigger.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }
}

impl Shutdown {
    /// True once shutdown has begun.
    pub fn is_fired(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once shutdown has begun (immediately if it already has, or if the trigger
    /// was dropped, which only happens when the whole daemon is going away).
    pub async fn wait(mut self) {
        let _ = self.0.wait_for(|fired| *fired).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn late_waiters_see_an_earlier_signal() {
        let (trigger, shutdown) = channel();
        assert!(!shutdown.is_fired());
        trigger.fire();
        let late = trigger.subscribe();
        tokio::time::timeout(std::time::Duration::from_secs(1), late.wait())
            .await
            .expect("a waiter after the signal returns at once");
        assert!(shutdown.is_fired());
    }
}
