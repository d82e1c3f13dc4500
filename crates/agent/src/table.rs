//! The tasks this agent holds: accepted and running, or finished with a
//! result not yet delivered. It outlives connections, so a reconnect can list
//! them in `active_tasks` and their results can still be delivered.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

struct Entry {
    token: CancellationToken,
    /// The gateway cancelled it: nothing more is sent about it.
    cancelled_by_gateway: bool,
    /// Shutdown's grace ran out: the handler is (to be) aborted.
    aborted: bool,
    handler: Option<AbortHandle>,
    /// Its outcome was sent: the gateway frees its slot once it stores it.
    finishing: bool,
}

/// Why a task could not be added.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The task is already held (a repeated assignment).
    Duplicate,
    /// `max_concurrent_tasks` tasks are held.
    Full,
}

/// The held tasks, behind a lock taken only for single map operations.
pub(crate) struct TaskTable {
    entries: Mutex<HashMap<String, Entry>>,
    count: watch::Sender<usize>,
}

impl TaskTable {
    pub(crate) fn new() -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            count: watch::Sender::new(0),
        }
    }

    /// Holds a new task unless it is held already or the table is full;
    /// returns its cancellation token.
    pub(crate) fn try_insert(&self, id: &str, max: usize) -> Result<CancellationToken, Refusal> {
        let mut entries = self.lock();
        if entries.contains_key(id) {
            return Err(Refusal::Duplicate);
        }
        if entries.values().filter(|e| !e.finishing).count() >= max {
            return Err(Refusal::Full);
        }
        let token = CancellationToken::new();
        entries.insert(
            id.to_string(),
            Entry {
                token: token.clone(),
                cancelled_by_gateway: false,
                aborted: false,
                handler: None,
                finishing: false,
            },
        );
        self.count.send_replace(entries.len());
        Ok(token)
    }

    /// Its outcome is on its way: it no longer takes a slot.
    pub(crate) fn mark_finishing(&self, id: &str) {
        if let Some(e) = self.lock().get_mut(id) {
            e.finishing = true;
        }
    }

    /// Lets go of a task.
    pub(crate) fn remove(&self, id: &str) {
        let mut entries = self.lock();
        if entries.remove(id).is_some() {
            self.count.send_replace(entries.len());
        }
    }

    /// Records the gateway's cancellation and fires the task's token; false
    /// when the task is not held.
    pub(crate) fn cancel_by_gateway(&self, id: &str) -> bool {
        match self.lock().get_mut(id) {
            Some(entry) => {
                entry.cancelled_by_gateway = true;
                entry.token.cancel();
                true
            }
            None => false,
        }
    }

    /// Whether the gateway cancelled the task.
    pub(crate) fn was_cancelled_by_gateway(&self, id: &str) -> bool {
        self.lock().get(id).is_some_and(|e| e.cancelled_by_gateway)
    }

    /// Remembers how to abort the task's handler; aborts it at once if
    /// shutdown already gave up on the task.
    pub(crate) fn set_handler(&self, id: &str, handler: AbortHandle) {
        let mut entries = self.lock();
        match entries.get_mut(id) {
            Some(entry) if !entry.aborted => entry.handler = Some(handler),
            _ => handler.abort(),
        }
    }

    /// Fires every task's token and aborts every handler (the end of
    /// shutdown's grace, or the agent stopping).
    pub(crate) fn abort_all(&self) {
        for entry in self.lock().values_mut() {
            entry.aborted = true;
            entry.token.cancel();
            if let Some(handler) = entry.handler.take() {
                handler.abort();
            }
        }
    }

    /// The ids of the held tasks, sorted.
    pub(crate) fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// How many tasks are held.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Watches the number of held tasks.
    pub(crate) fn watch_len(&self) -> watch::Receiver<usize> {
        self.count.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // Every operation leaves the map consistent, so poison is ignored.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_and_duplicates_are_refused() {
        let table = TaskTable::new();
        assert!(table.try_insert("a", 2).is_ok());
        assert_eq!(table.try_insert("a", 2).err(), Some(Refusal::Duplicate));
        assert!(table.try_insert("b", 2).is_ok());
        assert_eq!(table.try_insert("c", 2).err(), Some(Refusal::Full));
        table.remove("a");
        assert!(table.try_insert("c", 2).is_ok());
        assert_eq!(table.ids(), ["b", "c"]);
    }

    #[test]
    fn gateway_cancel_fires_the_token_and_is_remembered() {
        let table = TaskTable::new();
        let token = table.try_insert("a", 1).unwrap_or_default();
        assert!(!table.cancel_by_gateway("missing"));
        assert!(table.cancel_by_gateway("a"));
        assert!(token.is_cancelled());
        assert!(table.was_cancelled_by_gateway("a"));
    }

    #[test]
    fn count_is_watched() {
        let table = TaskTable::new();
        let rx = table.watch_len();
        let _ = table.try_insert("a", 4);
        assert_eq!(*rx.borrow(), 1);
        table.remove("a");
        assert_eq!(*rx.borrow(), 0);
    }
}
