//! The set of upstreams of a running gateway, which changes at run time
//! (managed upstreams, configuration reloads).
//!
//! Each upstream gets an id when it joins, from a counter that only
//! grows, so an id is never reused and a catalog route, a per-session
//! connection or a resource watch that names a removed upstream finds
//! nothing instead of its successor. Readers take a cheap snapshot (one
//! `Arc` clone under a read lock); writers copy the map of current
//! upstreams (removed ones leave it), so readers never wait for a change
//! and churn does not make the set grow.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use crate::gateway::Upstream;

#[derive(Default, Clone)]
struct Slots {
    by_id: BTreeMap<usize, Arc<Upstream>>,
    next_id: usize,
}

/// The upstreams, by id.
#[derive(Default)]
pub struct UpstreamSet {
    slots: RwLock<Arc<Slots>>,
}

impl UpstreamSet {
    fn slots(&self) -> Arc<Slots> {
        self.slots.read().map(|s| s.clone()).unwrap_or_default()
    }

    /// The upstream with id `id`, unless it was removed.
    pub fn get(&self, id: usize) -> Option<Arc<Upstream>> {
        self.slots
            .read()
            .ok()
            .and_then(|s| s.by_id.get(&id).cloned())
    }

    /// The upstream named `name`.
    pub fn named(&self, name: &str) -> Option<Arc<Upstream>> {
        self.slots()
            .by_id
            .values()
            .find(|u| u.config.name == name)
            .cloned()
    }

    /// Every current upstream, in the order they joined.
    pub fn iter(&self) -> std::vec::IntoIter<Arc<Upstream>> {
        self.slots()
            .by_id
            .values()
            .cloned()
            .collect::<Vec<_>>()
            .into_iter()
    }

    /// How many upstreams there are.
    pub fn len(&self) -> usize {
        self.slots().by_id.len()
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
        let mut next = (**slots).clone();
        let id = next.next_id;
        next.next_id += 1;
        let up = Arc::new(build(id));
        next.by_id.insert(id, up.clone());
        *slots = Arc::new(next);
        up
    }

    /// Removes upstream `id`; returns it.
    pub(crate) fn remove(&self, id: usize) -> Option<Arc<Upstream>> {
        let mut slots = match self.slots.write() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut next = (**slots).clone();
        let gone = next.by_id.remove(&id);
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
