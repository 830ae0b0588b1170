//! One long job at a time: a migration or a rebalance. A second one is refused with 409 naming
//! the one that runs, rather than queued behind it or interleaved with it (a table added while
//! rows move would have no change capture).

use crate::error::{ProxyError, ProxyResult};
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
pub struct JobSlot {
    running: Arc<Mutex<Option<String>>>,
}

/// Holds the slot; dropping it (or [`JobGuard::finish`]) frees the slot.
#[must_use = "the job slot is freed when the guard drops"]
pub struct JobGuard {
    /// `None` once [`JobGuard::finish`] freed the slot.
    running: Option<Arc<Mutex<Option<String>>>>,
}

impl JobSlot {
    /// Takes the slot for `what` (e.g. "a migration to version 3"), or says what holds it.
    pub fn begin(&self, what: impl Into<String>) -> ProxyResult<JobGuard> {
        let mut running = self.running.lock().expect("job lock is never poisoned");
        if let Some(current) = running.as_ref() {
            return Err(ProxyError::Conflict(format!(
                "{current} is running; wait for it to finish and try again"
            )));
        }
        *running = Some(what.into());
        Ok(JobGuard {
            running: Some(self.running.clone()),
        })
    }

    /// What runs now, if anything.
    pub fn current(&self) -> Option<String> {
        self.running
            .lock()
            .expect("job lock is never poisoned")
            .clone()
    }
}

impl JobGuard {
    /// Ends the job: runs `outcome` (which makes the job's end visible) under the slot's lock,
    /// then frees the slot. Whoever sees the end can start the next job at once, and no one
    /// can start one before the end is visible.
    pub fn finish(mut self, outcome: impl FnOnce()) {
        if let Some(running) = self.running.take() {
            let mut running = running.lock().expect("job lock is never poisoned");
            outcome();
            *running = None;
        }
    }
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            *running.lock().expect("job lock is never poisoned") = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_job_is_refused_until_the_first_ends() {
        let slot = JobSlot::default();
        let first = slot.begin("a migration to version 2").unwrap();
        let refused = slot.begin("a rebalance").err().unwrap();
        assert!(
            refused
                .to_string()
                .contains("a migration to version 2 is running")
        );
        assert_eq!(refused.status(), http::StatusCode::CONFLICT);
        drop(first);
        assert!(slot.begin("a rebalance").is_ok());
    }

    #[test]
    fn a_finished_job_frees_its_slot_only_after_its_end_is_visible() {
        let slot = JobSlot::default();
        let guard = slot.begin("a rebalance").unwrap();
        let during = std::cell::Cell::new(None);
        guard.finish(|| during.set(Some(slot.running.try_lock().is_err())));
        assert_eq!(
            during.get(),
            Some(true),
            "the slot's lock is held meanwhile"
        );
        assert_eq!(slot.current(), None);
        let next = slot.begin("the next rebalance").unwrap();
        assert_eq!(slot.current().as_deref(), Some("the next rebalance"));
        drop(next);
        assert_eq!(slot.current(), None);
    }
}
