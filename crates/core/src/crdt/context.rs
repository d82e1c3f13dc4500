//! Dots and the causal context: which events a replica has seen.
//!
//! The context is a version vector (replica → highest counter of the gap-free
//! prefix it has seen) plus a dot cloud (dots seen beyond that prefix, as
//! deltas can arrive out of order). It is compacted after every change, so two
//! contexts that know the same dots are equal in representation too.

use std::collections::{BTreeMap, BTreeSet};

/// One event: the `counter`-th write of `replica`. Dots start at 1.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dot {
    /// The replica that made the write.
    pub replica: String,
    /// Its sequence number at that replica, 1-based.
    pub counter: u64,
}

impl Dot {
    /// The dot `replica:counter`.
    pub fn new(replica: impl Into<String>, counter: u64) -> Dot {
        Dot {
            replica: replica.into(),
            counter,
        }
    }
}

impl std::fmt::Display for Dot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.replica, self.counter)
    }
}

/// The set of dots a state has seen: version vector plus dot cloud, always
/// compacted.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CausalContext {
    /// Replica → highest counter such that every dot 1..=counter was seen.
    /// Never holds 0.
    vv: BTreeMap<String, u64>,
    /// Dots seen beyond their replica's contiguous prefix (never adjacent to
    /// it, never inside it).
    cloud: BTreeSet<Dot>,
}

impl CausalContext {
    /// The empty context.
    pub fn new() -> CausalContext {
        CausalContext::default()
    }

    /// Whether `dot` was seen.
    pub fn contains(&self, dot: &Dot) -> bool {
        self.vv
            .get(dot.replica.as_str())
            .is_some_and(|&n| dot.counter <= n)
            || self.cloud.contains(dot)
    }

    /// The version vector: the contiguous part.
    pub fn vv(&self) -> &BTreeMap<String, u64> {
        &self.vv
    }

    /// The dot cloud: dots seen beyond the contiguous part, sorted.
    pub fn cloud(&self) -> &BTreeSet<Dot> {
        &self.cloud
    }

    /// The dot `replica` writes next: one past the highest dot of it seen
    /// here, `None` once its counter is exhausted.
    pub fn next_dot(&self, replica: &str) -> Option<Dot> {
        let prefix = self.vv.get(replica).copied().unwrap_or(0);
        let beyond = self
            .cloud
            .range(Dot::new(replica, 0)..=Dot::new(replica, u64::MAX))
            .next_back()
            .map_or(0, |d| d.counter);
        let counter = prefix.max(beyond).checked_add(1)?;
        Some(Dot::new(replica, counter))
    }

    /// Records one dot as seen.
    pub fn insert(&mut self, dot: Dot) {
        if dot.counter == 0 || self.contains(&dot) {
            return;
        }
        self.cloud.insert(dot);
        self.compact();
    }

    /// Records every dot `replica:1..=counter` as seen.
    pub fn insert_prefix(&mut self, replica: &str, counter: u64) {
        if counter == 0 {
            return;
        }
        let mine = self.vv.entry(replica.to_owned()).or_insert(0);
        *mine = (*mine).max(counter);
        self.compact();
    }

    /// Joins another context into this one.
    pub fn join(&mut self, other: &CausalContext) {
        for (replica, &n) in &other.vv {
            let mine = self.vv.entry(replica.clone()).or_insert(0);
            *mine = (*mine).max(n);
        }
        for dot in &other.cloud {
            if !self.contains(dot) {
                self.cloud.insert(dot.clone());
            }
        }
        self.compact();
    }

    /// Moves cloud dots that continue a replica's prefix into the version
    /// vector and drops those inside it. The cloud is walked in (replica,
    /// counter) order, so one pass suffices and the result depends only on
    /// the set of dots known.
    fn compact(&mut self) {
        let cloud = std::mem::take(&mut self.cloud);
        for dot in cloud {
            let prefix = self.vv.get(dot.replica.as_str()).copied().unwrap_or(0);
            if dot.counter <= prefix {
                continue;
            }
            if prefix.checked_add(1) == Some(dot.counter) {
                self.vv.insert(dot.replica, dot.counter);
            } else {
                self.cloud.insert(dot);
            }
        }
        self.vv.retain(|_, n| *n > 0);
    }
}

#[cfg(test)]
mod tests {
    use super::{CausalContext, Dot};

    #[test]
    fn out_of_order_dots_wait_in_the_cloud_until_the_gap_closes() {
        let mut c = CausalContext::new();
        c.insert(Dot::new("a", 3));
        c.insert(Dot::new("a", 1));
        assert_eq!(c.vv().get("a"), Some(&1));
        assert_eq!(c.cloud().len(), 1);
        assert!(c.contains(&Dot::new("a", 3)));
        assert!(!c.contains(&Dot::new("a", 2)));
        c.insert(Dot::new("a", 2));
        assert_eq!(c.vv().get("a"), Some(&3));
        assert!(c.cloud().is_empty());
        assert_eq!(c.next_dot("a"), Some(Dot::new("a", 4)));
        assert_eq!(c.next_dot("b"), Some(Dot::new("b", 1)));
    }

    #[test]
    fn next_dot_goes_past_the_cloud() {
        let mut c = CausalContext::new();
        c.insert(Dot::new("a", 5));
        assert_eq!(c.next_dot("a"), Some(Dot::new("a", 6)));
    }

    #[test]
    fn equal_knowledge_has_equal_representation_whatever_the_order() {
        let dots = [("a", 2), ("b", 1), ("a", 1), ("a", 4), ("b", 3), ("b", 2)];
        let mut x = CausalContext::new();
        for (r, n) in dots {
            x.insert(Dot::new(r, n));
        }
        let mut y = CausalContext::new();
        let mut z = CausalContext::new();
        for (r, n) in dots.iter().rev() {
            z.insert(Dot::new(*r, *n));
        }
        y.join(&z);
        assert_eq!(x, y);
        x.join(&y);
        assert_eq!(x, y);
    }

    #[test]
    fn an_exhausted_counter_yields_no_dot() {
        let mut c = CausalContext::new();
        for n in 1..=2 {
            c.insert(Dot::new("a", n));
        }
        c.insert(Dot::new("a", u64::MAX));
        assert_eq!(c.next_dot("a"), None);
    }
}
