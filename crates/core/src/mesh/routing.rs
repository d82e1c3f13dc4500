//! Routing: which agents may take a task, and which of them gets it.

use serde::{Deserialize, Serialize};

use super::agent::{Capability, satisfies};

/// How a task picks among eligible agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Highest confidence in the required capabilities, plus a bonus for
    /// other capabilities relevant to the task type.
    #[default]
    CapabilityMatch,
    /// Lowest share of its task limit in use.
    LeastLoaded,
    /// In turn: the agent assigned least recently.
    RoundRobin,
    /// Best recorded success rate, speed and availability.
    PerformanceBased,
    /// Lowest `cost_per_task` in the agent's configuration.
    CostOptimized,
}

impl Strategy {
    /// Every strategy.
    pub const ALL: [Strategy; 5] = [
        Strategy::CapabilityMatch,
        Strategy::LeastLoaded,
        Strategy::RoundRobin,
        Strategy::PerformanceBased,
        Strategy::CostOptimized,
    ];
    /// Accepted spellings.
    pub const ALLOWED: &'static str =
        "capability_match, least_loaded, round_robin, performance_based, cost_optimized";

    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::CapabilityMatch => "capability_match",
            Strategy::LeastLoaded => "least_loaded",
            Strategy::RoundRobin => "round_robin",
            Strategy::PerformanceBased => "performance_based",
            Strategy::CostOptimized => "cost_optimized",
        }
    }

    /// Parses the API spelling.
    pub fn parse(s: &str) -> Option<Strategy> {
        Strategy::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// Recorded history of an agent, for `performance_based`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentStats {
    /// Tasks assigned to it.
    pub assigned: u64,
    /// Tasks it completed.
    pub completed: u64,
    /// Tasks it failed.
    pub failed: u64,
    /// Tasks it rejected.
    pub rejected: u64,
    /// Tasks that timed out with it.
    pub timeouts: u64,
    /// Summed time from assignment to completion, ms.
    pub busy_ms: u64,
}

impl AgentStats {
    /// Completed share of finished attempts, smoothed (no history: 0.5).
    pub fn success_rate(&self) -> f64 {
        let bad = self.failed + self.rejected + self.timeouts;
        (self.completed as f64 + 1.0) / ((self.completed + bad) as f64 + 2.0)
    }

    /// Mean time to complete, ms, if it completed anything.
    pub fn mean_ms(&self) -> Option<f64> {
        (self.completed > 0).then(|| self.busy_ms as f64 / self.completed as f64)
    }
}

/// What routing needs to know of one online agent.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// Agent id.
    pub id: &'a str,
    /// Its capabilities.
    pub capabilities: &'a [Capability],
    /// Tasks it holds now.
    pub active: u32,
    /// Its task limit.
    pub limit: u32,
    /// Its history.
    pub stats: &'a AgentStats,
    /// `cost_per_task` from its configuration.
    pub cost: Option<f64>,
    /// Sequence number of its last assignment (0: never), for fair ties.
    pub last_assigned: u64,
}

/// What routing needs to know of the task.
#[derive(Debug, Clone, Copy)]
pub struct Need<'a> {
    /// Task type.
    pub task_type: &'a str,
    /// Required capabilities.
    pub required: &'a [String],
    /// Agents that rejected it.
    pub rejected_by: &'a [String],
}

/// Mean confidence over the requirements (1.0 with none), or `None` if one
/// is unmet.
pub fn match_confidence(caps: &[Capability], required: &[String]) -> Option<f64> {
    let mut sum = 0.0;
    for r in required {
        sum += satisfies(caps, r)?;
    }
    Some(if required.is_empty() {
        1.0
    } else {
        sum / required.len() as f64
    })
}

fn relevance(caps: &[Capability], need: &Need<'_>) -> f64 {
    let relevant = caps
        .iter()
        .filter(|c| {
            c.task_types
                .iter()
                .any(|t| t.eq_ignore_ascii_case(need.task_type))
                && !need
                    .required
                    .iter()
                    .any(|r| r.eq_ignore_ascii_case(&c.name))
        })
        .count();
    (relevant as f64 * 0.05).min(0.25)
}

/// Picks an agent for `need` among `candidates` (all online and of the
/// task's tenant). Returns the index, or `None` when nobody is eligible.
/// Agents that rejected the task are avoided while others are eligible;
/// equal scores go to the agent assigned least recently.
pub fn choose(strategy: Strategy, need: &Need<'_>, candidates: &[Candidate<'_>]) -> Option<usize> {
    let eligible: Vec<(usize, f64)> = candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.active < c.limit)
        .filter_map(|(i, c)| match_confidence(c.capabilities, need.required).map(|m| (i, m)))
        .collect();
    let fresh: Vec<(usize, f64)> = eligible
        .iter()
        .copied()
        .filter(|(i, _)| !need.rejected_by.iter().any(|r| r == candidates[*i].id))
        .collect();
    let pool = if fresh.is_empty() { eligible } else { fresh };
    if pool.is_empty() {
        return None;
    }
    let fastest = pool
        .iter()
        .filter_map(|(i, _)| candidates[*i].stats.mean_ms())
        .filter(|ms| *ms > 0.0)
        .fold(f64::INFINITY, f64::min);
    let score = |i: usize, m: f64| -> f64 {
        let c = &candidates[i];
        let load = f64::from(c.active) / f64::from(c.limit.max(1));
        match strategy {
            Strategy::CapabilityMatch => m + relevance(c.capabilities, need),
            Strategy::LeastLoaded => -load,
            Strategy::RoundRobin => 0.0,
            Strategy::PerformanceBased => {
                let speed = match c.stats.mean_ms() {
                    Some(ms) if fastest.is_finite() && ms > 0.0 => (fastest / ms).min(1.0),
                    Some(_) => 1.0,
                    None => 0.5,
                };
                0.5 * c.stats.success_rate() + 0.3 * speed + 0.2 * (1.0 - load)
            }
            Strategy::CostOptimized => -c.cost.unwrap_or(f64::MAX),
        }
    };
    let mut best: Option<(usize, f64)> = None;
    for (i, m) in pool {
        let s = score(i, m);
        best = match best {
            None => Some((i, s)),
            Some((b, bs)) => {
                let better = s > bs + 1e-9
                    || ((s - bs).abs() <= 1e-9 && {
                        let (ci, cb) = (&candidates[i], &candidates[b]);
                        (ci.last_assigned, ci.id) < (cb.last_assigned, cb.id)
                    });
                if better { Some((i, s)) } else { Some((b, bs)) }
            }
        };
    }
    best.map(|(i, _)| i)
}

/// Why a task cannot be assigned now, in words for its status.
pub fn waiting_reason(tenant: &str, need: &Need<'_>, candidates: &[Candidate<'_>]) -> String {
    if candidates.is_empty() {
        return format!("no agent of tenant `{tenant}` is online");
    }
    let capable: Vec<&Candidate<'_>> = candidates
        .iter()
        .filter(|c| match_confidence(c.capabilities, need.required).is_some())
        .collect();
    if capable.is_empty() {
        let missing: Vec<&str> = need
            .required
            .iter()
            .filter(|r| {
                !candidates
                    .iter()
                    .any(|c| satisfies(c.capabilities, r).is_some())
            })
            .map(String::as_str)
            .collect();
        return if missing.is_empty() {
            format!(
                "no online agent of tenant `{tenant}` has all of {} at once",
                need.required.join(", ")
            )
        } else {
            format!(
                "no online agent of tenant `{tenant}` has capability {}",
                missing
                    .iter()
                    .map(|m| format!("`{m}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
    }
    format!(
        "all {} capable agent(s) are at their task limit",
        capable.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::{prop_assert, proptest};

    fn cap(name: &str, confidence: f64) -> Capability {
        Capability {
            name: name.into(),
            confidence,
            task_types: vec![],
            languages: vec![],
            specialties: vec![],
        }
    }

    struct A {
        id: String,
        caps: Vec<Capability>,
        active: u32,
        limit: u32,
        stats: AgentStats,
        cost: Option<f64>,
        last: u64,
    }

    fn agent(id: &str, caps: Vec<Capability>) -> A {
        A {
            id: id.into(),
            caps,
            active: 0,
            limit: 4,
            stats: AgentStats::default(),
            cost: None,
            last: 0,
        }
    }

    fn cands(v: &[A]) -> Vec<Candidate<'_>> {
        v.iter()
            .map(|a| Candidate {
                id: &a.id,
                capabilities: &a.caps,
                active: a.active,
                limit: a.limit,
                stats: &a.stats,
                cost: a.cost,
                last_assigned: a.last,
            })
            .collect()
    }

    fn need<'a>(req: &'a [String], rejected: &'a [String]) -> Need<'a> {
        Need {
            task_type: "t",
            required: req,
            rejected_by: rejected,
        }
    }

    #[test]
    fn capability_match_prefers_confidence_and_requires_everything() {
        let agents = vec![
            agent("a", vec![cap("py", 0.5)]),
            agent("b", vec![cap("py", 0.9)]),
            agent("c", vec![cap("rust", 1.0)]),
        ];
        let req = vec!["py".to_string()];
        assert_eq!(
            choose(Strategy::CapabilityMatch, &need(&req, &[]), &cands(&agents)),
            Some(1)
        );
        let req = vec!["go".to_string()];
        assert_eq!(
            choose(Strategy::CapabilityMatch, &need(&req, &[]), &cands(&agents)),
            None
        );
        let reason = waiting_reason("default", &need(&req, &[]), &cands(&agents));
        assert!(reason.contains("`go`"), "{reason}");
    }

    #[test]
    fn full_agents_are_not_eligible() {
        let mut agents = vec![
            agent("a", vec![cap("py", 1.0)]),
            agent("b", vec![cap("py", 0.1)]),
        ];
        agents[0].active = 4;
        let req = vec!["py".to_string()];
        assert_eq!(
            choose(Strategy::CapabilityMatch, &need(&req, &[]), &cands(&agents)),
            Some(1)
        );
        agents[1].active = 4;
        assert_eq!(
            choose(Strategy::CapabilityMatch, &need(&req, &[]), &cands(&agents)),
            None
        );
        let reason = waiting_reason("default", &need(&req, &[]), &cands(&agents));
        assert!(reason.contains("task limit"), "{reason}");
    }

    #[test]
    fn least_loaded_cost_and_performance() {
        let mut agents = vec![
            agent("a", vec![cap("x", 1.0)]),
            agent("b", vec![cap("x", 1.0)]),
        ];
        agents[0].active = 2;
        agents[0].cost = Some(0.1);
        agents[1].cost = Some(0.5);
        agents[1].stats = AgentStats {
            completed: 1,
            failed: 9,
            busy_ms: 5000,
            ..AgentStats::default()
        };
        agents[0].stats = AgentStats {
            completed: 10,
            busy_ms: 1000,
            ..AgentStats::default()
        };
        let n = need(&[], &[]);
        assert_eq!(choose(Strategy::LeastLoaded, &n, &cands(&agents)), Some(1));
        assert_eq!(
            choose(Strategy::CostOptimized, &n, &cands(&agents)),
            Some(0)
        );
        assert_eq!(
            choose(Strategy::PerformanceBased, &n, &cands(&agents)),
            Some(0)
        );
    }

    #[test]
    fn rejecting_agents_are_avoided_while_others_can_take_it() {
        let agents = vec![
            agent("a", vec![cap("x", 1.0)]),
            agent("b", vec![cap("x", 0.2)]),
        ];
        let rejected = vec!["a".to_string()];
        assert_eq!(
            choose(
                Strategy::CapabilityMatch,
                &need(&[], &rejected),
                &cands(&agents[..1])
            ),
            Some(0)
        );
        assert_eq!(
            choose(
                Strategy::CapabilityMatch,
                &need(&[], &rejected),
                &cands(&agents)
            ),
            Some(1)
        );
    }

    proptest! {
        /// Round robin with equal agents visits every agent once per round.
        #[test]
        fn round_robin_is_fair(n in 1usize..8, rounds in 1usize..5) {
            let mut agents: Vec<A> = (0..n).map(|i| agent(&format!("a{i}"), vec![cap("x", 1.0)])).collect();
            let mut counts = vec![0usize; n];
            for seq in 1..=(n * rounds) as u64 {
                let pick = choose(Strategy::RoundRobin, &need(&[], &[]), &cands(&agents));
                prop_assert!(pick.is_some());
                let i = pick.unwrap_or(0);
                counts[i] += 1;
                agents[i].last = seq;
            }
            prop_assert!(counts.iter().all(|c| *c == rounds));
        }

        /// Whatever the strategy, the chosen agent is eligible.
        #[test]
        fn choice_is_always_eligible(
            confs in proptest::collection::vec((0.0f64..1.0, 0u32..4, proptest::bool::ANY), 0..8),
            s in 0usize..5,
        ) {
            let agents: Vec<A> = confs.iter().enumerate().map(|(i, (c, active, has))| {
                let mut a = agent(&format!("a{i}"), vec![cap(if *has { "x" } else { "y" }, *c)]);
                a.active = *active;
                a.limit = 3;
                a
            }).collect();
            let req = vec!["x".to_string()];
            if let Some(i) = choose(Strategy::ALL[s], &need(&req, &[]), &cands(&agents)) {
                prop_assert!(agents[i].active < agents[i].limit);
                prop_assert!(agents[i].caps[0].name == "x");
            } else {
                prop_assert!(agents.iter().all(|a| a.active >= a.limit || a.caps[0].name != "x"));
            }
        }
    }
}
