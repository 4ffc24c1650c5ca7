//! Consumer-lag rules: each worker consumer's unfinished messages against a threshold, with transitions named by the rule and scope's last alert in `ALERTS`.
//!
//! Lag is polled (consumer info), not read from a stream, so two replicas
//! never judge the very same input. What they share is `ALERTS`: each
//! follows it, and a transition is named by the stream sequence of the
//! rule and scope's alert before it (its generation, 0 for the first). Two
//! replicas that see the lag cross the threshold publish the same
//! [`Alert::dedup_key`] and the stream keeps one; a replica that starts
//! reads the last alert back before it judges anything. The state moves only
//! when an alert is stored ([`LagJudge::stored`]), never on a guess.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ferry_schema::alert::{Alert, AlertState, Check, Scope, ScopeKind};

use super::config::Rule;
use super::eval::alert;

/// The last stored alert of one rule and scope.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Last {
    /// Its `ALERTS` sequence: the next transition's generation.
    seq: u64,
    state: AlertState,
    trigger_seq: u64,
    fired_at: DateTime<Utc>,
}

/// The consumer-lag rules and each one's last stored alert per consumer.
#[derive(Debug, Default)]
pub struct LagJudge {
    rules: Vec<Rule>,
    last: HashMap<(String, Scope), Last>,
}

impl LagJudge {
    /// A judge of the consumer-lag rules among `rules`, with no alert seen.
    pub fn new(rules: &[Rule]) -> Self {
        let mut j = Self::default();
        j.set_rules(rules);
        j
    }

    /// Replaces the rules (a reloaded file), keeping what `ALERTS` said.
    pub fn set_rules(&mut self, rules: &[Rule]) {
        self.rules = rules.iter().filter(|r| r.check == Check::ConsumerLag).cloned().collect();
    }

    /// Whether any rule is a consumer-lag rule.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The consumers some rule watches, by durable name, each once.
    pub fn consumers(&self) -> Vec<String> {
        let mut v: Vec<String> = self.rules.iter().flat_map(|r| r.consumers.iter().cloned()).collect();
        v.sort();
        v.dedup();
        v
    }

    /// `a` is stored in `ALERTS` at `seq` (read back, or the answer to a
    /// publish, a duplicate's naming the copy kept). Anything but a
    /// consumer-lag alert, or an older one than known, changes nothing.
    pub fn stored(&mut self, seq: u64, a: &Alert) {
        if a.check != Check::ConsumerLag {
            return;
        }
        let last = Last {
            seq,
            state: a.state,
            trigger_seq: a.trigger_seq,
            fired_at: a.fired_at,
        };
        let slot = self.last.entry((a.rule.clone(), a.scope.clone())).or_insert(last);
        if seq >= slot.seq {
            *slot = last;
        }
    }

    /// The transitions that `lag` messages on `consumer` at `now` call for,
    /// to publish; the state changes once they are stored.
    pub fn observe(&self, now: DateTime<Utc>, consumer: &str, lag: u64) -> Vec<Alert> {
        let mut out = Vec::new();
        for rule in self.rules.iter().filter(|r| r.consumers.iter().any(|c| c == consumer)) {
            let scope = Scope {
                kind: ScopeKind::Consumer,
                value: consumer.to_string(),
            };
            let last = self.last.get(&(rule.name.clone(), scope.clone()));
            let value = lag as f64;
            let holds = value > rule.threshold;
            match last {
                Some(l) if l.state == AlertState::Firing => {
                    if !holds {
                        out.push(alert(rule, &scope, AlertState::Resolved, value, l.trigger_seq, now, l.fired_at));
                    }
                }
                _ if holds => {
                    let cooled = last.is_none_or(|l| (now - l.fired_at).to_std().unwrap_or(Duration::ZERO) >= rule.cooldown);
                    if cooled {
                        let generation = last.map_or(0, |l| l.seq);
                        out.push(alert(rule, &scope, AlertState::Firing, value, generation, now, now));
                    }
                }
                _ => {}
            }
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::alerts::config::parse;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn judge() -> LagJudge {
        let f = parse(
            "[[rule]]\nname = \"lag\"\ncheck = \"consumer_lag\"\nthreshold = 100\ncooldown_minutes = 1\nconsumers = [\"rules\"]\n\
             [[rule]]\nname = \"errors\"\ncheck = \"error_rate\"\nthreshold = 10\n",
            "t.toml",
        )
        .unwrap();
        LagJudge::new(&f.rules)
    }

    #[test]
    fn two_replicas_name_the_same_crossing_alike_though_they_polled_apart() {
        let (mut a, mut b) = (judge(), judge());
        assert_eq!(a.consumers(), ["rules"]);
        assert!(a.observe(t(0), "rules", 100).is_empty(), "at the threshold is not above it");
        assert!(a.observe(t(0), "inference-chat", 10_000).is_empty(), "not a watched consumer");
        let fa = a.observe(t(1), "rules", 150);
        let fb = b.observe(t(2), "rules", 170);
        assert_eq!((fa.len(), fb.len()), (1, 1));
        assert_eq!(fa[0].id, fb[0].id, "same rule, scope, state and generation");
        assert_eq!(fa[0].trigger_seq, 0);
        assert_eq!(fa[0].scope.to_string(), "consumer=rules");
        // The stream keeps a's; both learn it (b from its duplicate's answer).
        a.stored(7, &fa[0]);
        b.stored(7, &fa[0]);
        assert!(a.observe(t(3), "rules", 500).is_empty(), "firing already");
        let ra = a.observe(t(4), "rules", 0);
        let rb = b.observe(t(5), "rules", 3);
        assert_eq!(ra[0].state, AlertState::Resolved);
        assert_eq!(ra[0].id, rb[0].id);
        assert_eq!(ra[0].trigger_seq, 0, "a resolution carries its firing's trigger");
        assert_eq!(ra[0].fired_at, t(1));
        a.stored(9, &ra[0]);
        // Within the cooldown (a minute from the firing) nothing fires again.
        assert!(a.observe(t(30), "rules", 900).is_empty());
        let again = a.observe(t(61), "rules", 900);
        assert_eq!(again[0].trigger_seq, 9, "the next generation: the resolution's sequence");
        assert_ne!(again[0].id, fa[0].id);
    }

    #[test]
    fn an_older_alert_read_late_does_not_undo_a_newer_one() {
        let mut j = judge();
        let fire = j.observe(t(1), "rules", 150).remove(0);
        j.stored(7, &fire);
        let resolve = j.observe(t(2), "rules", 0).remove(0);
        j.stored(9, &resolve);
        j.stored(7, &fire);
        assert!(j.observe(t(3), "rules", 0).is_empty(), "resolved stays resolved");
        let mut other = fire.clone();
        other.check = Check::ErrorRate;
        j.stored(20, &other);
        assert!(j.observe(t(3), "rules", 0).is_empty());
    }
}
