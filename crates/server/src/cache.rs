//! Result caching for `tools/call`: an upstream's `cache_ttl_secs` names the
//! tools (by the upstream's own names) whose successful results are kept for
//! that many seconds, per tenant, keyed by upstream, tool and the canonical
//! JSON of the arguments. Off unless configured; bounded by `[tools]
//! cache_max_entries` and `cache_max_bytes` (the oldest inserts go first).
//!
//! The handler asks [`ResultCache::lookup`] after authorization, tool rules
//! and rate limits (a hit is still a call for those and for the audit log),
//! and hands a miss's [`Ticket`] to [`ResultCache::store`] with the result.
//! A tool with annotations is cached only when they say `readOnlyHint:
//! true` (MCP's default is `false`) and not `destructiveHint: true`,
//! whatever the configuration; a tool without annotations at all is cached
//! when the operator set a TTL (the operator vouches that it reads). Errors
//! (`isError: true`, JSON-RPC errors), input requests and task results are
//! never stored. All entries of an upstream are dropped when its tool list
//! changes.
//!
//! One `std::sync::Mutex` guards the map: every operation is a few map
//! steps with no await under the lock. Expired entries are dropped when
//! looked up, and by a sweep at most once a second when storing. A call in
//! flight across an invalidation that covers its upstream and tenant does
//! not store; invalidations of other upstreams or tenants do not stop it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use rmcp::model::{CallToolResult, JsonObject, MetaObject, Tool};
use sha2::{Digest, Sha256};

use crate::gateway::Upstream;
use crate::resilience::mono_now;

/// `_meta` key of a result served from the cache; its value is `"hit"`.
pub const META_CACHE: &str = "meshgate.io/cache";
/// `_meta` key of a cached result's age, in whole seconds.
pub const META_AGE: &str = "meshgate.io/cache_age_secs";

/// Least time between two sweeps of expired entries.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Bytes counted per entry on top of its serialized result (key, names,
/// bookkeeping), so many tiny results still respect `cache_max_bytes`.
const ENTRY_OVERHEAD: usize = 128;

/// SHA-256 of upstream, tool, tenant and canonical arguments.
type Key = [u8; 32];

/// The shared result cache of the gateway.
pub struct ResultCache {
    max_entries: usize,
    max_bytes: usize,
    inner: Mutex<Inner>,
    /// Exposed names of tools whose configured TTL was refused, so the
    /// warning is logged once per tool.
    warned: Mutex<HashSet<String>>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Key, Entry>,
    /// Insertion order (sequence number to key), oldest first.
    order: BTreeMap<u64, Key>,
    next_seq: u64,
    bytes: usize,
    last_sweep: Duration,
    /// When each scope was last invalidated: a call that was in flight
    /// across an invalidation of its upstream or tenant must not store what
    /// it got from before it.
    cuts: Cuts,
}

/// The invalidation clock and, per scope, the clock at its last
/// invalidation. Kept per scope so that one upstream's list change or one
/// tenant's flush does not stop every other in-flight result from being
/// stored. The maps grow only by upstream and tenant names that were
/// invalidated, which configuration and the admin API bound.
#[derive(Default)]
struct Cuts {
    /// Advanced by every invalidation; a ticket remembers its value.
    clock: u64,
    /// Every upstream, every tenant (`DELETE /admin/cache` by `tenants:*`).
    all: u64,
    /// One upstream, every tenant.
    upstream: HashMap<String, u64>,
    /// Every upstream, one tenant.
    tenant: HashMap<String, u64>,
    /// One upstream, one tenant.
    pair: HashMap<(String, String), u64>,
}

impl Cuts {
    /// Records an invalidation of `upstream` (all when `None`) for `tenant`
    /// (all when `None`).
    fn cut(&mut self, upstream: Option<&str>, tenant: Option<&str>) {
        self.clock += 1;
        let now = self.clock;
        match (upstream, tenant) {
            (None, None) => self.all = now,
            (Some(u), None) => {
                self.upstream.insert(u.to_owned(), now);
            }
            (None, Some(t)) => {
                self.tenant.insert(t.to_owned(), now);
            }
            (Some(u), Some(t)) => {
                self.pair.insert((u.to_owned(), t.to_owned()), now);
            }
        }
    }

    /// Whether an invalidation covering `upstream` and `tenant` happened
    /// after the clock read `issued`.
    fn stale(&self, upstream: &str, tenant: &str, issued: u64) -> bool {
        let last = [
            Some(self.all),
            self.upstream.get(upstream).copied(),
            self.tenant.get(tenant).copied(),
            self.pair
                .get(&(upstream.to_owned(), tenant.to_owned()))
                .copied(),
        ];
        last.into_iter().flatten().any(|at| at > issued)
    }
}

struct Entry {
    upstream: String,
    tenant: String,
    result: CallToolResult,
    bytes: usize,
    stored: Duration,
    expires: Duration,
    seq: u64,
}

/// A cacheable call that missed: where to store its result.
#[derive(Debug)]
pub struct Ticket {
    key: Key,
    upstream: String,
    tenant: String,
    ttl: Duration,
    /// The invalidation clock when the lookup missed.
    issued: u64,
}

/// What [`ResultCache::lookup`] found.
#[derive(Debug)]
pub enum Lookup {
    /// The tool is not cached (no TTL configured, or refused).
    Uncached,
    /// A fresh result, marked in `_meta` as served from the cache.
    Hit(CallToolResult),
    /// Cacheable but absent: call upstream, then [`ResultCache::store`].
    Miss(Ticket),
}

/// Why a configured TTL is not honoured for `tool`, if it is not: the
/// annotation that says the tool may not be read-only. A tool with
/// annotations that do not say `readOnlyHint: true` is taken at MCP's
/// default (`false`); a tool with no annotations at all is the operator's
/// call, so it is cached as configured.
pub fn refusal(tool: Option<&Tool>) -> Option<&'static str> {
    let a = tool?.annotations.as_ref()?;
    match a.read_only_hint {
        Some(false) => Some("readOnlyHint: false"),
        None => Some("without readOnlyHint: true (MCP's default is false)"),
        Some(true) if a.destructive_hint == Some(true) => Some("destructiveHint: true"),
        Some(true) => None,
    }
}

/// The cache key: length-prefixed fields, so no two different tuples
/// hash alike, and the arguments as the audit log's canonical hash (object
/// keys sorted), so key order does not matter.
fn key(upstream: &str, tool: &str, tenant: &str, arguments: Option<&JsonObject>) -> Key {
    let mut h = Sha256::new();
    for part in [
        upstream,
        tool,
        tenant,
        &meshgate_core::auth::arguments_hash(arguments),
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().into()
}

impl ResultCache {
    /// An empty cache holding at most `max_entries` results and
    /// `max_bytes` bytes of them.
    pub fn new(max_entries: usize, max_bytes: usize) -> ResultCache {
        ResultCache {
            max_entries: max_entries.max(1),
            max_bytes,
            inner: Mutex::new(Inner::default()),
            warned: Mutex::new(HashSet::new()),
        }
    }

    /// Looks up a call of `tool` (the upstream's own name; `exposed` is the
    /// name the client used) with `arguments`, for a caller of `tenant`.
    pub fn lookup(
        &self,
        up: &Upstream,
        tool: &str,
        exposed: &str,
        tenant: &str,
        arguments: Option<&JsonObject>,
    ) -> Lookup {
        let Some(&ttl) = up.config.cache_ttl_secs.get(tool) else {
            return Lookup::Uncached;
        };
        let listing = up.listing();
        if let Some(why) = refusal(listing.tools.iter().find(|t| t.name == tool)) {
            self.refuse(&up.config.name, tool, exposed, why);
            return Lookup::Uncached;
        }
        let upstream = &up.config.name;
        let k = key(upstream, tool, tenant, arguments);
        match self.get(&k, mono_now()) {
            Ok(result) => {
                metrics::counter!("gateway_cache_hits_total", "upstream" => upstream.clone(), "tool" => tool.to_owned()).increment(1);
                Lookup::Hit(result)
            }
            Err(issued) => {
                metrics::counter!("gateway_cache_misses_total", "upstream" => upstream.clone(), "tool" => tool.to_owned()).increment(1);
                Lookup::Miss(Ticket {
                    key: k,
                    upstream: upstream.clone(),
                    tenant: tenant.to_owned(),
                    ttl: Duration::from_secs(ttl),
                    issued,
                })
            }
        }
    }

    /// Stores the result of a call that missed, unless it is an error.
    pub fn store(&self, ticket: Ticket, result: &CallToolResult) {
        self.put(ticket, result, mono_now());
    }

    /// Drops every entry of `upstream` (its tools changed, it was updated
    /// or removed); returns how many.
    pub fn invalidate_upstream(&self, upstream: &str, reason: &'static str) -> usize {
        self.invalidate(Some(upstream), None, reason)
    }

    /// Drops the entries of `upstream` (all when `None`) cached for
    /// `tenant` (all when `None`); returns how many.
    pub fn invalidate(
        &self,
        upstream: Option<&str>,
        tenant: Option<&str>,
        reason: &'static str,
    ) -> usize {
        let Ok(mut inner) = self.inner.lock() else {
            return 0;
        };
        inner.cuts.cut(upstream, tenant);
        let dropped = inner.remove_where(|e| {
            upstream.is_none_or(|u| e.upstream == u) && tenant.is_none_or(|t| e.tenant == t)
        });
        count_dropped(&dropped, reason);
        publish(&inner);
        dropped.len()
    }

    /// Number of entries and their bytes.
    pub fn usage(&self) -> (usize, usize) {
        self.inner
            .lock()
            .map(|i| (i.entries.len(), i.bytes))
            .unwrap_or_default()
    }

    fn refuse(&self, upstream: &str, tool: &str, exposed: &str, why: &'static str) {
        metrics::counter!("gateway_cache_refused_total", "tool" => exposed.to_owned()).increment(1);
        let first = self
            .warned
            .lock()
            .is_ok_and(|mut w| w.insert(exposed.to_owned()));
        if first {
            tracing::warn!(
                upstream,
                tool,
                annotation = why,
                "not caching results of tool `{tool}` although upstream `{upstream}` sets cache_ttl_secs.{tool}: the tool is annotated {why}, so its calls may change something; remove the setting, or have the upstream annotate the tool readOnlyHint: true if it only reads"
            );
        }
    }

    /// The fresh result under `k`, marked as a hit; `Err` with the
    /// invalidation clock when absent or expired (an expired entry is
    /// dropped).
    fn get(&self, k: &Key, now: Duration) -> Result<CallToolResult, u64> {
        let Ok(mut inner) = self.inner.lock() else {
            // Poisoned: `put` cannot lock either, so nothing is stored.
            return Err(0);
        };
        let issued = inner.cuts.clock;
        let (fresh, seq) = match inner.entries.get(k) {
            None => return Err(issued),
            Some(e) => (now < e.expires, e.seq),
        };
        if !fresh {
            if let Some(e) = inner.remove(k, seq) {
                count_dropped(&[e.upstream], "expired");
            }
            publish(&inner);
            return Err(issued);
        }
        let e = &inner.entries[k];
        let mut result = e.result.clone();
        let age = now.saturating_sub(e.stored).as_secs();
        let meta = result.meta.get_or_insert_with(MetaObject::new);
        meta.0.insert(META_CACHE.into(), "hit".into());
        meta.0.insert(META_AGE.into(), age.into());
        Ok(result)
    }

    fn put(&self, ticket: Ticket, result: &CallToolResult, now: Duration) {
        if result.is_error == Some(true) {
            return;
        }
        let bytes = serde_json::to_vec(result)
            .map_or(usize::MAX, |v| v.len())
            .saturating_add(ENTRY_OVERHEAD)
            .saturating_add(ticket.upstream.len() + ticket.tenant.len());
        if bytes > self.max_bytes {
            return;
        }
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if inner
            .cuts
            .stale(&ticket.upstream, &ticket.tenant, ticket.issued)
        {
            return;
        }
        if now.saturating_sub(inner.last_sweep) >= SWEEP_EVERY {
            inner.last_sweep = now;
            let expired = inner.remove_where(|e| now >= e.expires);
            count_dropped(&expired, "expired");
        }
        if let Some(seq) = inner.entries.get(&ticket.key).map(|e| e.seq) {
            inner.remove(&ticket.key, seq);
        }
        let seq = inner.next_seq;
        inner.next_seq += 1;
        inner.order.insert(seq, ticket.key);
        inner.bytes += bytes;
        inner.entries.insert(
            ticket.key,
            Entry {
                upstream: ticket.upstream,
                tenant: ticket.tenant,
                result: result.clone(),
                bytes,
                stored: now,
                expires: now.saturating_add(ticket.ttl),
                seq,
            },
        );
        let mut evicted = Vec::new();
        while inner.entries.len() > self.max_entries || inner.bytes > self.max_bytes {
            let Some((&oldest, &k)) = inner.order.iter().next() else {
                break;
            };
            match inner.remove(&k, oldest) {
                Some(e) => evicted.push(e.upstream),
                None => {
                    inner.order.remove(&oldest);
                }
            }
        }
        count_dropped(&evicted, "evicted");
        publish(&inner);
    }
}

impl Inner {
    /// Removes the entry under `k` inserted as `seq`.
    fn remove(&mut self, k: &Key, seq: u64) -> Option<Entry> {
        self.order.remove(&seq);
        let e = self.entries.remove(k)?;
        self.bytes = self.bytes.saturating_sub(e.bytes);
        Some(e)
    }

    /// Removes every entry `drop` picks; returns their upstreams.
    fn remove_where(&mut self, drop: impl Fn(&Entry) -> bool) -> Vec<String> {
        let doomed: Vec<(Key, u64)> = self
            .entries
            .iter()
            .filter(|(_, e)| drop(e))
            .map(|(k, e)| (*k, e.seq))
            .collect();
        doomed
            .into_iter()
            .filter_map(|(k, seq)| self.remove(&k, seq).map(|e| e.upstream))
            .collect()
    }
}

/// Counts dropped entries in `gateway_cache_invalidations_total`, per upstream.
fn count_dropped(upstreams: &[String], reason: &'static str) {
    let mut per: BTreeMap<&str, u64> = BTreeMap::new();
    for u in upstreams {
        *per.entry(u.as_str()).or_default() += 1;
    }
    for (u, n) in per {
        metrics::counter!("gateway_cache_invalidations_total", "upstream" => u.to_owned(), "reason" => reason).increment(n);
    }
}

fn publish(inner: &Inner) {
    metrics::gauge!("gateway_cache_entries").set(inner.entries.len() as f64);
    metrics::gauge!("gateway_cache_bytes").set(inner.bytes as f64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmcp::model::{ContentBlock, ToolAnnotations};
    use serde_json::json;

    fn args(v: serde_json::Value) -> JsonObject {
        match v {
            serde_json::Value::Object(m) => m,
            _ => unreachable!("an object"),
        }
    }

    fn text(s: &str) -> CallToolResult {
        CallToolResult::success(vec![ContentBlock::text(s)])
    }

    fn ticket(c: &ResultCache, upstream: &str, tenant: &str, a: &str, ttl: u64) -> Ticket {
        let k = key(upstream, "t", tenant, Some(&args(json!({ "a": a }))));
        let issued = c.get(&k, Duration::ZERO).expect_err("not cached yet");
        Ticket {
            key: k,
            upstream: upstream.into(),
            tenant: tenant.into(),
            ttl: Duration::from_secs(ttl),
            issued,
        }
    }

    fn body(r: &CallToolResult) -> String {
        r.content
            .iter()
            .filter_map(|c| c.as_text())
            .map(|t| t.text.clone())
            .collect()
    }

    #[test]
    fn argument_key_order_does_not_matter_but_values_tenants_and_tools_do() {
        let ab = args(json!({"a": 1, "b": {"x": [1, 2], "y": null}}));
        let ba = args(json!({"b": {"y": null, "x": [1, 2]}, "a": 1}));
        assert_eq!(
            key("u", "t", "ten", Some(&ab)),
            key("u", "t", "ten", Some(&ba))
        );
        assert_ne!(
            key("u", "t", "ten", Some(&ab)),
            key("u", "t", "other", Some(&ab))
        );
        assert_ne!(
            key("u", "t", "ten", Some(&ab)),
            key("u", "t2", "ten", Some(&ab))
        );
        assert_ne!(
            key("u", "t", "ten", Some(&ab)),
            key("v", "t", "ten", Some(&ab))
        );
        assert_ne!(
            key("u", "t", "ten", Some(&ab)),
            key(
                "u",
                "t",
                "ten",
                Some(&args(json!({"a": 2, "b": {"x": [1, 2], "y": null}})))
            )
        );
        assert_ne!(key("u", "t", "ten", None), key("u", "t", "ten", Some(&ab)));
        // Field boundaries are part of the key.
        assert_ne!(key("ab", "c", "t", None), key("a", "bc", "t", None));
    }

    #[test]
    fn hit_returns_the_stored_result_marked_with_its_age() {
        let c = ResultCache::new(10, 1 << 20);
        let t = ticket(&c, "u", "ten", "1", 60);
        let k = t.key;
        c.put(t, &text("one"), Duration::from_secs(5));
        let hit = c.get(&k, Duration::from_secs(8)).expect("a hit");
        assert_eq!(body(&hit), "one");
        let meta = hit.meta.expect("marked");
        assert_eq!(meta.0[META_CACHE], "hit");
        assert_eq!(meta.0[META_AGE], 3);
        // The stored copy stays unmarked: a second hit shows its own age.
        let again = c.get(&k, Duration::from_secs(10)).expect("a hit");
        assert_eq!(again.meta.expect("marked").0[META_AGE], 5);
    }

    #[test]
    fn tenants_do_not_share_entries() {
        let c = ResultCache::new(10, 1 << 20);
        let t = ticket(&c, "u", "a", "1", 60);
        c.put(t, &text("for a"), Duration::ZERO);
        let other = key("u", "t", "b", Some(&args(json!({"a": "1"}))));
        assert!(c.get(&other, Duration::ZERO).is_err());
    }

    #[test]
    fn entries_expire_after_their_ttl() {
        let c = ResultCache::new(10, 1 << 20);
        let t = ticket(&c, "u", "ten", "1", 2);
        let k = t.key;
        c.put(t, &text("x"), Duration::from_secs(10));
        assert!(c.get(&k, Duration::from_millis(11_999)).is_ok());
        assert!(c.get(&k, Duration::from_secs(12)).is_err());
        assert_eq!(c.usage(), (0, 0), "the expired entry is dropped");
    }

    #[test]
    fn storing_sweeps_out_expired_entries() {
        let c = ResultCache::new(10, 1 << 20);
        let t = ticket(&c, "u", "ten", "short", 1);
        c.put(t, &text("x"), Duration::from_secs(10));
        let t = ticket(&c, "u", "ten", "long", 100);
        c.put(t, &text("y"), Duration::from_secs(20));
        assert_eq!(c.usage().0, 1);
    }

    #[test]
    fn errors_are_never_stored() {
        let c = ResultCache::new(10, 1 << 20);
        let t = ticket(&c, "u", "ten", "1", 60);
        let k = t.key;
        c.put(
            t,
            &CallToolResult::error(vec![ContentBlock::text("no")]),
            Duration::ZERO,
        );
        assert!(c.get(&k, Duration::ZERO).is_err());
    }

    #[test]
    fn the_oldest_inserts_are_evicted_beyond_the_entry_bound() {
        let c = ResultCache::new(3, 1 << 20);
        let keys: Vec<Key> = (0..5)
            .map(|i| {
                let t = ticket(&c, "u", "ten", &i.to_string(), 60);
                let k = t.key;
                c.put(t, &text("x"), Duration::from_millis(i));
                k
            })
            .collect();
        assert_eq!(c.usage().0, 3);
        assert!(c.get(&keys[0], Duration::ZERO).is_err());
        assert!(c.get(&keys[1], Duration::ZERO).is_err());
        assert!(keys[2..].iter().all(|k| c.get(k, Duration::ZERO).is_ok()));
    }

    #[test]
    fn the_byte_bound_holds_and_oversized_results_are_skipped() {
        let max = 4 * 1024;
        let c = ResultCache::new(1000, max);
        let big = "x".repeat(1000);
        for i in 0..20 {
            let t = ticket(&c, "u", "ten", &i.to_string(), 60);
            c.put(t, &text(&big), Duration::ZERO);
            assert!(c.usage().1 <= max, "bytes {} over {max}", c.usage().1);
        }
        assert!(c.usage().0 >= 3, "{:?}", c.usage());
        let t = ticket(&c, "u", "ten", "huge", 60);
        let k = t.key;
        c.put(t, &text(&"y".repeat(max)), Duration::ZERO);
        assert!(c.get(&k, Duration::ZERO).is_err());
    }

    #[test]
    fn invalidation_drops_one_upstream_or_one_tenant() {
        let c = ResultCache::new(10, 1 << 20);
        for (u, ten) in [("u", "a"), ("u", "b"), ("v", "a")] {
            let t = ticket(&c, u, ten, "1", 60);
            c.put(t, &text("x"), Duration::ZERO);
        }
        assert_eq!(c.invalidate_upstream("u", "tools_changed"), 2);
        assert_eq!(c.usage().0, 1);
        let t = ticket(&c, "u", "a", "1", 60);
        c.put(t, &text("x"), Duration::ZERO);
        assert_eq!(c.invalidate(None, Some("a"), "admin"), 2);
        assert_eq!(c.usage(), (0, 0));
    }

    #[test]
    fn a_call_in_flight_across_an_invalidation_does_not_store() {
        let c = ResultCache::new(10, 1 << 20);
        let t = ticket(&c, "u", "a", "1", 60);
        let k = t.key;
        c.invalidate_upstream("u", "tools_changed");
        c.put(t, &text("stale"), Duration::ZERO);
        assert!(c.get(&k, Duration::ZERO).is_err());
    }

    #[test]
    fn an_invalidation_stops_only_the_calls_it_covers() {
        let c = ResultCache::new(10, 1 << 20);
        // Each case: the invalidation, and which in-flight calls
        // (upstream, tenant) may still store.
        type Case = (Option<&'static str>, Option<&'static str>, [bool; 4]);
        let cases: [Case; 4] = [
            (Some("u"), None, [false, false, true, true]),
            (None, Some("a"), [false, true, false, true]),
            (Some("u"), Some("a"), [false, true, true, true]),
            (None, None, [false, false, false, false]),
        ];
        for (n, (upstream, tenant, stores)) in cases.into_iter().enumerate() {
            let calls = [("u", "a"), ("u", "b"), ("v", "a"), ("v", "b")];
            let arg = format!("case {n}");
            let tickets: Vec<Ticket> = calls
                .iter()
                .map(|(u, t)| ticket(&c, u, t, &arg, 60))
                .collect();
            c.invalidate(upstream, tenant, "admin");
            for ((t, call), stores) in tickets.into_iter().zip(calls).zip(stores) {
                let k = t.key;
                c.put(t, &text("x"), Duration::ZERO);
                assert_eq!(
                    c.get(&k, Duration::ZERO).is_ok(),
                    stores,
                    "{call:?} after invalidating {upstream:?}/{tenant:?}"
                );
            }
        }
    }

    #[test]
    fn only_tools_annotated_read_only_or_not_annotated_are_cached() {
        let mut tool = Tool::new("t", "d", std::sync::Arc::new(JsonObject::new()));
        assert_eq!(refusal(None), None);
        assert_eq!(refusal(Some(&tool)), None, "no annotations: cacheable");
        tool.annotations = Some(ToolAnnotations::new().read_only(true));
        assert_eq!(refusal(Some(&tool)), None);
        tool.annotations = Some(ToolAnnotations::new().read_only(false));
        assert_eq!(refusal(Some(&tool)), Some("readOnlyHint: false"));
        // Annotated, but silent on readOnlyHint: MCP's default is false.
        tool.annotations = Some(ToolAnnotations::new().open_world(false));
        assert_eq!(
            refusal(Some(&tool)),
            Some("without readOnlyHint: true (MCP's default is false)")
        );
        tool.annotations = Some(ToolAnnotations::new().destructive(true));
        assert!(refusal(Some(&tool)).is_some());
        tool.annotations = Some(ToolAnnotations::new().read_only(true).destructive(true));
        assert_eq!(refusal(Some(&tool)), Some("destructiveHint: true"));
    }
}
