//! The set of upstreams of a running gateway, which changes at run time
//! (managed upstreams, configuration reloads).
//!
//! Each upstream gets an id when it joins: its slot in a list that only
//! grows, so an id is never reused and a catalog route, a per-session
//! connection or a resource watch that names a removed upstream finds
//! nothing instead of its successor. Readers take a cheap snapshot (one
//! `Arc` clone under a read lock); writers copy the list, so readers never
//! wait for a change.

use std::sync::{Arc, RwLock};

use crate::gateway::Upstream;

/// The upstreams, by id.
#[derive(Default)]
pub struct UpstreamSet {
    slots: RwLock<Arc<Vec<Option<Arc<Upstream>>>>>,
}

impl UpstreamSet {
    fn slots(&self) -> Arc<Vec<Option<Arc<Upstream>>>> {
        self.slots.read().map(|s| s.clone()).unwrap_or_default()
    }

    /// The upstream with id `id`, unless it was removed.
    pub fn get(&self, id: usize) -> Option<Arc<Upstream>> {
        self.slots
            .read()
            .ok()
            .and_then(|s| s.get(id).cloned().flatten())
    }

    /// The upstream named `name`.
    pub fn named(&self, name: &str) -> Option<Arc<Upstream>> {
        self.slots()
            .iter()
            .flatten()
            .find(|u| u.config.name == name)
            .cloned()
    }

    /// Every current upstream, in the order they joined.
    pub fn iter(&self) -> std::vec::IntoIter<Arc<Upstream>> {
        self.slots()
            .iter()
            .flatten()
            .cloned()
            .collect::<Vec<_>>()
            .into_iter()
    }

    /// How many upstreams there are.
    pub fn len(&self) -> usize {
        self.slots().iter().flatten().count()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds the upstream `build` makes from its new id.
    pub(crate) fn add(&self, build: impl FnOnce(usize) -> Upstream) -> Arc<Upstream> {
        let mut slots = match self.slots.write() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut next: Vec<Option<Arc<Upstream>>> = (**slots).clone();
        let up = Arc::new(build(next.len()));
        next.push(Some(up.clone()));
        *slots = Arc::new(next);
        up
    }

    /// Removes upstream `id`; returns it.
    pub(crate) fn remove(&self, id: usize) -> Option<Arc<Upstream>> {
        let mut slots = match self.slots.write() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut next: Vec<Option<Arc<Upstream>>> = (**slots).clone();
        let gone = next.get_mut(id).and_then(Option::take);
        *slots = Arc::new(next);
        gone
    }
}

impl IntoIterator for &UpstreamSet {
    type Item = Arc<Upstream>;
    type IntoIter = std::vec::IntoIter<Arc<Upstream>>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}
