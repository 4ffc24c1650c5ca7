//! The evaluator: every rule's window, run of failures and firing state per scope, fed events in stream order, giving alert transitions.
//!
//! Pure and deterministic: the same events in the same order, and the same
//! restored state, give the same transitions with the same ids on every
//! replica (time is the events' stream time, except in [`Evaluator::tick`],
//! whose transitions still carry the id of the firing they belong to).

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use chrono::{DateTime, Utc};
use ferry_schema::alert::{Alert, AlertState, Check, Scope, ScopeKind};
use ferry_schema::event::Interaction;
use ferry_schema::AgentId;

use super::config::{Rule, Source, Statistic};
use crate::groups::AgentGroups;

/// Most interactions one window of one scope holds; beyond it the oldest
/// leave early (at 5,000 interactions a second into one scope, a window
/// covers the last two seconds).
pub const MAX_WINDOW_SAMPLES: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Sample {
    ts: DateTime<Utc>,
    ok: bool,
    ms: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Firing {
    trigger_seq: u64,
    at: DateTime<Utc>,
}

#[derive(Debug, Default)]
struct ScopeState {
    samples: VecDeque<Sample>,
    failures: usize,
    ms_sum: f64,
    run: u64,
    firing: Option<Firing>,
    last_fired: Option<DateTime<Utc>>,
    /// Events up to this sequence were judged by whoever raised the
    /// restored alert: read again, they rebuild the window but raise nothing.
    judged_through: u64,
}

#[derive(Debug, Default)]
struct Heartbeats {
    last_seq: u64,
    last: Option<DateTime<Utc>>,
}

/// Every rule's state, per scope.
#[derive(Debug, Default)]
pub struct Evaluator {
    rules: Vec<Rule>,
    state: HashMap<(String, Scope), ScopeState>,
    heartbeats: HashMap<AgentId, Heartbeats>,
    /// The agents' groups, for rules with scope `group`.
    groups: AgentGroups,
    /// Where the events seen begin (a replica that started rebuilds its
    /// windows from there): a rule judges nothing before it has seen one
    /// whole window after it.
    seen_from: Option<DateTime<Utc>>,
}

impl Evaluator {
    /// An evaluator of `rules` with nothing seen.
    pub fn new(rules: Vec<Rule>) -> Self {
        Self {
            rules,
            ..Self::default()
        }
    }

    /// The evaluator has seen no event before `t`: until a rule has seen a
    /// whole window (or run) after `t`, it updates its state but raises
    /// nothing, neither a firing on a partial window nor the resolution of
    /// a restored firing.
    pub fn seen_from(&mut self, t: DateTime<Utc>) {
        self.seen_from = Some(t);
    }

    /// Replaces the rules (a reloaded file). A rule whose definition
    /// changed starts over with an empty window, keeping its firing state
    /// and cooldown; a rule no longer there is forgotten.
    pub fn set_rules(&mut self, rules: Vec<Rule>) {
        let changed: Vec<String> = rules
            .iter()
            .filter(|r| !self.rules.contains(r))
            .map(|r| r.name.clone())
            .collect();
        self.state.retain(|(name, _), _| rules.iter().any(|r| &r.name == name));
        for ((name, _), st) in &mut self.state {
            if changed.contains(name) {
                st.samples.clear();
                st.failures = 0;
                st.ms_sum = 0.0;
                st.run = 0;
            }
        }
        self.rules = rules;
    }

    /// Replaces the agents' groups (a reloaded file): from then on an
    /// agent's interactions count in the groups it is in now.
    pub fn set_groups(&mut self, groups: AgentGroups) {
        self.groups = groups;
    }

    /// The rules in use.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Takes the last alert of a rule and scope as stored in `ALERTS`: a
    /// firing one is firing still, and either counts for the cooldown.
    /// Consumer-lag alerts are the [`super::lag::LagJudge`]'s.
    pub fn restore(&mut self, last: &Alert) {
        if last.check == Check::ConsumerLag || !self.rules.iter().any(|r| r.name == last.rule) {
            return;
        }
        let st = self.state.entry((last.rule.clone(), last.scope.clone())).or_default();
        st.last_fired = Some(last.fired_at);
        st.judged_through = last.trigger_seq;
        st.firing = (last.state == AlertState::Firing).then_some(Firing {
            trigger_seq: last.trigger_seq,
            at: last.fired_at,
        });
    }

    /// Scopes and rules that are firing now: `(rule, scope)`.
    pub fn firing(&self) -> Vec<(String, Scope)> {
        let mut v: Vec<_> = self
            .state
            .iter()
            .filter(|(_, s)| s.firing.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        v.sort();
        v
    }

    /// One interaction from `source` at `seq` of its stream, stored at
    /// `ts`, from (or for) `agent`. Each rule counts one source, so its
    /// state follows one stream's order.
    pub fn interaction(&mut self, source: Source, seq: u64, ts: DateTime<Utc>, agent: &AgentId, i: &Interaction) -> Vec<Alert> {
        let mut out = Vec::new();
        let sample = Sample {
            ts,
            ok: i.success,
            ms: i.response_time_ms,
        };
        for rule in &self.rules {
            if rule.check.watches_heartbeats() || matches!(rule.check, Check::DeadLetters | Check::ConsumerLag) || rule.source != source {
                continue;
            }
            let one = |v: &Option<String>| v.iter().cloned().collect::<Vec<_>>();
            let values = match rule.scope {
                ScopeKind::All => vec![String::new()],
                ScopeKind::Agent => vec![agent.as_str().to_string()],
                ScopeKind::Model => one(&i.model),
                ScopeKind::Intent => one(&i.intent),
                ScopeKind::Group => self.groups.of(agent).to_vec(),
                ScopeKind::Consumer => Vec::new(),
            };
            for value in values {
                let scope = Scope { kind: rule.scope, value };
                let st = self.state.entry((rule.name.clone(), scope.clone())).or_default();
                out.extend(st.observe(rule, &scope, sample, seq, self.seen_from));
            }
        }
        out
    }

    /// A dead letter at `seq` of `DEADLETTER`, stored at `ts`, of a message
    /// from `agent` when its subject names one.
    pub fn dead_letter(&mut self, seq: u64, ts: DateTime<Utc>, agent: Option<&AgentId>) -> Vec<Alert> {
        let mut out = Vec::new();
        let sample = Sample { ts, ok: false, ms: 0.0 };
        for rule in self.rules.iter().filter(|r| r.check == Check::DeadLetters) {
            let value = match (rule.scope, agent) {
                (ScopeKind::All, _) => String::new(),
                (ScopeKind::Agent, Some(a)) => a.as_str().to_string(),
                _ => continue,
            };
            let scope = Scope { kind: rule.scope, value };
            let st = self.state.entry((rule.name.clone(), scope.clone())).or_default();
            out.extend(st.observe(rule, &scope, sample, seq, self.seen_from));
        }
        out
    }

    /// A heartbeat at `seq`, stored at `ts`, from `agent`, reporting
    /// `spool_depth` events in its spool (`None`: it did not decode):
    /// resolves its offline alerts and judges its spool backlog.
    pub fn heartbeat(&mut self, seq: u64, ts: DateTime<Utc>, agent: &AgentId, spool_depth: Option<u64>) -> Vec<Alert> {
        let hb = self.heartbeats.entry(agent.clone()).or_default();
        hb.last_seq = seq;
        hb.last = Some(ts);
        let mut out = Vec::new();
        for rule in self.rules.iter().filter(|r| r.check.watches_heartbeats()) {
            let (holds, value) = match (rule.check, spool_depth) {
                (Check::SpoolBacklog, Some(depth)) => (depth as f64 > rule.threshold, depth as f64),
                (Check::SpoolBacklog, None) => continue,
                _ => (false, 0.0),
            };
            let scope = Scope {
                kind: ScopeKind::Agent,
                value: agent.as_str().to_string(),
            };
            let st = self.state.entry((rule.name.clone(), scope.clone())).or_default();
            if seq <= st.judged_through {
                continue;
            }
            if let Some(a) = transition(rule, &scope, st, holds, value, seq, ts) {
                out.push(a);
            }
        }
        out
    }

    /// What time alone changes at `now`: windows that emptied (their
    /// rules resolve) and agents whose last heartbeat is older than an
    /// offline rule's threshold (they fire, with the sequence of that
    /// heartbeat as their trigger, so every replica names them alike).
    pub fn tick(&mut self, now: DateTime<Utc>) -> Vec<Alert> {
        let mut out = Vec::new();
        for rule in &self.rules {
            if rule.check == Check::AgentOffline {
                for (agent, hb) in &self.heartbeats {
                    let Some(last) = hb.last else { continue };
                    let silent = (now - last).to_std().unwrap_or(Duration::ZERO).as_secs_f64();
                    let scope = Scope {
                        kind: ScopeKind::Agent,
                        value: agent.as_str().to_string(),
                    };
                    let st = self.state.entry((rule.name.clone(), scope.clone())).or_default();
                    // A firing restored for an older heartbeat is this one's too.
                    let holds = silent > rule.threshold;
                    if let Some(a) = transition(rule, &scope, st, holds, silent.floor(), hb.last_seq, now) {
                        out.push(a);
                    }
                }
                continue;
            }
            if rule.check == Check::ConsumerLag || self.seen_from.is_some_and(|from| now < from + rule.window) {
                continue;
            }
            for ((name, scope), st) in &mut self.state {
                // A run, or a backlog, changes only with the next message.
                if name != &rule.name || st.firing.is_none() || matches!(rule.check, Check::ConsecutiveErrors | Check::SpoolBacklog) {
                    continue;
                }
                st.evict(now - rule.window);
                let (holds, value) = st.judge(rule);
                if let Some(a) = transition(rule, scope, st, holds, value, 0, now) {
                    out.push(a);
                }
            }
        }
        out
    }
}

impl ScopeState {
    /// Takes `sample` (message `seq`) into `rule`'s window for `scope` and
    /// judges it, unless the message was judged already (by whoever raised
    /// a restored alert) or the window has not been seen whole since
    /// `seen_from`.
    fn observe(&mut self, rule: &Rule, scope: &Scope, sample: Sample, seq: u64, seen_from: Option<DateTime<Utc>>) -> Option<Alert> {
        self.push(sample);
        self.evict(sample.ts - rule.window);
        self.run = if sample.ok { 0 } else { self.run + 1 };
        if seq <= self.judged_through || seen_from.is_some_and(|from| sample.ts < from + rule.window) {
            return None;
        }
        let (holds, value) = self.judge(rule);
        transition(rule, scope, self, holds, value, seq, sample.ts)
    }

    fn push(&mut self, s: Sample) {
        if self.samples.len() == MAX_WINDOW_SAMPLES {
            self.pop();
        }
        self.failures += usize::from(!s.ok);
        self.ms_sum += s.ms;
        self.samples.push_back(s);
    }

    fn pop(&mut self) {
        if let Some(old) = self.samples.pop_front() {
            self.failures -= usize::from(!old.ok);
            self.ms_sum -= old.ms;
        }
    }

    fn evict(&mut self, before: DateTime<Utc>) {
        while self.samples.front().is_some_and(|s| s.ts < before) {
            self.pop();
        }
        if self.samples.is_empty() {
            self.ms_sum = 0.0;
        }
    }

    /// Whether `rule` holds now, and the value it judged.
    fn judge(&self, rule: &Rule) -> (bool, f64) {
        let n = self.samples.len();
        match rule.check {
            Check::DeadLetters => {
                let per_minute = n as f64 * 60.0 / rule.window.as_secs_f64().max(1.0);
                (per_minute > rule.threshold, per_minute)
            }
            Check::ConsecutiveErrors => (self.run as f64 >= rule.threshold, self.run as f64),
            _ if n < rule.min_interactions => (false, 0.0),
            Check::ErrorRate => {
                let rate = self.failures as f64 * 100.0 / n as f64;
                (rate > rule.threshold, rate)
            }
            Check::ResponseTime => {
                let v = match rule.statistic {
                    Statistic::Mean => self.ms_sum / n as f64,
                    Statistic::P95 => {
                        let mut ms: Vec<f64> = self.samples.iter().map(|s| s.ms).collect();
                        let k = ((n as f64 * 0.95).ceil() as usize).clamp(1, n) - 1;
                        let (_, v, _) = ms.select_nth_unstable_by(k, f64::total_cmp);
                        *v
                    }
                };
                (v > rule.threshold, v)
            }
            Check::AgentOffline | Check::SpoolBacklog | Check::ConsumerLag => (false, 0.0),
        }
    }
}

/// The alert, if any, when `holds` meets the state: firing when it starts
/// to hold and the cooldown since the last firing has passed; resolved when
/// it stops.
fn transition(rule: &Rule, scope: &Scope, st: &mut ScopeState, holds: bool, value: f64, seq: u64, ts: DateTime<Utc>) -> Option<Alert> {
    match (holds, st.firing) {
        (true, None) => {
            let cooled = st
                .last_fired
                .is_none_or(|t| (ts - t).to_std().unwrap_or(Duration::ZERO) >= rule.cooldown);
            if !cooled {
                return None;
            }
            st.firing = Some(Firing { trigger_seq: seq, at: ts });
            st.last_fired = Some(ts);
            Some(alert(rule, scope, AlertState::Firing, value, seq, ts, ts))
        }
        (false, Some(f)) => {
            st.firing = None;
            Some(alert(rule, scope, AlertState::Resolved, value, f.trigger_seq, ts, f.at))
        }
        _ => None,
    }
}

pub(super) fn alert(rule: &Rule, scope: &Scope, state: AlertState, value: f64, trigger_seq: u64, ts: DateTime<Utc>, fired_at: DateTime<Utc>) -> Alert {
    let what = match rule.check {
        Check::ErrorRate => format!("error rate {value:.1}% (threshold {}%) over {}s", rule.threshold, rule.window.as_secs()),
        Check::ResponseTime => {
            let stat = if rule.statistic == Statistic::Mean { "mean" } else { "p95" };
            format!("{stat} response time {value:.0} ms (threshold {} ms) over {}s", rule.threshold, rule.window.as_secs())
        }
        Check::ConsecutiveErrors => format!("{value:.0} failed interactions in a row (threshold {})", rule.threshold),
        Check::AgentOffline => format!("no heartbeat for {value:.0}s (threshold {}s)", rule.threshold),
        Check::SpoolBacklog => format!("{value:.0} events waiting in the spool (threshold {})", rule.threshold),
        Check::DeadLetters => format!("{value:.1} dead letters a minute (threshold {}) over {}s", rule.threshold, rule.window.as_secs()),
        Check::ConsumerLag => format!("{value:.0} messages not yet acknowledged (threshold {})", rule.threshold),
    };
    let mut a = Alert {
        id: uuid::Uuid::nil(),
        rule: rule.name.clone(),
        check: rule.check,
        scope: scope.clone(),
        state,
        ts,
        fired_at,
        value,
        threshold: rule.threshold,
        message: format!("{} [{scope}] {}: {what}", rule.name, state.as_str()),
        trigger_seq,
    };
    a.id = Alert::id_for(&a.dedup_key());
    a
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::alerts::config::parse;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn inter(ok: bool, ms: f64) -> Interaction {
        Interaction {
            session_id: "s".into(),
            user_input: String::new(),
            intent: Some("refund".into()),
            tools_used: vec![],
            response_time_ms: ms,
            success: ok,
            error_type: (!ok).then(|| "timeout".into()),
            model: Some("m".into()),
            tokens: None,
        }
    }

    fn eval(toml: &str) -> Evaluator {
        Evaluator::new(parse(toml, "t.toml").unwrap().rules)
    }

    fn states(v: &[Alert]) -> Vec<(&str, AlertState)> {
        v.iter().map(|a| (a.rule.as_str(), a.state)).collect()
    }

    #[test]
    fn a_burst_fires_once_the_cooldown_holds_the_next_and_recovery_resolves() {
        let mut e = eval("alert_cooldown_minutes = 10\n[[rule]]\nname = \"errors\"\ncheck = \"error_rate\"\nthreshold = 50\nwindow_seconds = 60\nmin_interactions = 4");
        let a = AgentId::new("desk-1").unwrap();
        let mut out = Vec::new();
        let mut seq = 0;
        let mut feed = |e: &mut Evaluator, at: i64, ok: bool, out: &mut Vec<Alert>| {
            seq += 1;
            out.extend(e.interaction(Source::Assistant, seq, t(at), &a, &inter(ok, 10.0)));
        };
        for s in 0..10 {
            feed(&mut e, s, false, &mut out);
        }
        assert_eq!(states(&out), [("errors", AlertState::Firing)]);
        assert_eq!(out[0].trigger_seq, 4, "fires at the fourth failure, the first judged");
        for s in 100..110 {
            feed(&mut e, s, true, &mut out);
        }
        assert_eq!(states(&out)[1..], [("errors", AlertState::Resolved)]);
        assert_eq!(out[1].trigger_seq, 4, "a resolved alert names its firing");
        for s in 200..210 {
            feed(&mut e, s, false, &mut out);
        }
        assert_eq!(out.len(), 2, "cooldown of 10 minutes holds the second burst: {out:?}");
        for s in 700..710 {
            feed(&mut e, s, false, &mut out);
        }
        assert_eq!(states(&out)[2..], [("errors", AlertState::Firing)], "past the cooldown it fires again");
    }

    #[test]
    fn a_group_rule_counts_each_agent_in_every_group_it_is_in() {
        let file = parse(
            "[[rule]]\nname = \"team\"\ncheck = \"consecutive_errors\"\nscope = \"group\"\nthreshold = 3\n[groups]\nsupport = [\"desk-1\", \"desk-2\"]\nvip = [\"desk-2\"]",
            "t.toml",
        )
        .unwrap();
        let mut e = Evaluator::new(file.rules);
        e.set_groups(file.groups);
        let (d1, d2, d3) = (AgentId::new("desk-1").unwrap(), AgentId::new("desk-2").unwrap(), AgentId::new("desk-3").unwrap());
        let mut out = Vec::new();
        // Failures from two members make a run in their group; desk-3 is
        // in none and counts nowhere.
        for (seq, a) in [(1, &d1), (2, &d3), (3, &d3), (4, &d2), (5, &d1)] {
            out.extend(e.interaction(Source::Assistant, seq, t(seq as i64), a, &inter(false, 10.0)));
        }
        let fired: Vec<(String, u64)> = out.iter().map(|a| (a.scope.to_string(), a.trigger_seq)).collect();
        assert_eq!(fired, [("group=support".to_string(), 5)], "{out:?}");
        // desk-2 is in both groups: its failures run on in vip too.
        for seq in 6..8 {
            out.extend(e.interaction(Source::Assistant, seq, t(seq as i64), &d2, &inter(false, 10.0)));
        }
        assert_eq!(out.last().map(|a| (a.scope.to_string(), a.trigger_seq)), Some(("group=vip".to_string(), 7)));
        // With no groups, a group rule watches nothing.
        e.set_groups(AgentGroups::default());
        let before = out.len();
        for seq in 8..20 {
            out.extend(e.interaction(Source::Assistant, seq, t(seq as i64), &d1, &inter(false, 10.0)));
        }
        assert_eq!(out.len(), before);
    }

    #[test]
    fn the_same_events_give_the_same_alerts_and_a_restored_firing_is_not_raised_again() {
        let cfg = "consecutive_errors_threshold = 3\n[[rule]]\nname = \"slow\"\ncheck = \"response_time\"\nscope = \"model\"\nthreshold = 100\nmin_interactions = 2\nstatistic = \"mean\"";
        let a = AgentId::new("desk-1").unwrap();
        let run = |e: &mut Evaluator| {
            let mut out = Vec::new();
            for s in 0..5u64 {
                out.extend(e.interaction(Source::Assistant, s + 1, t(s as i64), &a, &inter(s % 5 == 0, 500.0)));
            }
            out
        };
        let (mut x, mut y) = (eval(cfg), eval(cfg));
        let (ax, ay) = (run(&mut x), run(&mut y));
        assert_eq!(ax, ay);
        assert_eq!(states(&ax), [("slow", AlertState::Firing), ("consecutive_errors", AlertState::Firing)]);
        assert_eq!(ax[0].scope.to_string(), "model=m");
        // A replica that starts restores what is firing and reads the
        // events again: the ones up to each firing's trigger were judged
        // already, so nothing is raised twice and no restored firing is
        // resolved by the events that led to it.
        let mut y = eval(cfg);
        for al in &ax {
            y.restore(al);
        }
        assert!(run(&mut y).is_empty(), "read again after a restore, the same events raise nothing");
        // Nor, having seen no event before t(0), on a window not seen whole.
        let mut z = eval(cfg);
        z.seen_from(t(0));
        for al in &ax {
            z.restore(al);
        }
        assert!(run(&mut z).is_empty(), "restored firing states raise nothing again");
        assert_eq!(z.firing().len(), 2);
        // Once it has seen a whole window, it judges again.
        let later = z.interaction(Source::Assistant, 99, t(400), &a, &inter(true, 1.0));
        assert_eq!(states(&later), [("consecutive_errors", AlertState::Resolved), ("slow", AlertState::Resolved)]);
        assert_eq!((later[0].trigger_seq, later[1].trigger_seq), (ax[1].trigger_seq, ax[0].trigger_seq));
    }

    #[test]
    fn a_silent_agent_goes_offline_once_and_its_heartbeat_resolves_it() {
        let mut e = eval("[[rule]]\nname = \"offline\"\ncheck = \"agent_offline\"\nthreshold = 30");
        let a = AgentId::new("desk-2").unwrap();
        assert!(e.heartbeat(7, t(0), &a, Some(0)).is_empty());
        assert!(e.tick(t(20)).is_empty());
        let fired = e.tick(t(31));
        assert_eq!(states(&fired), [("offline", AlertState::Firing)]);
        assert_eq!((fired[0].trigger_seq, fired[0].scope.value.as_str()), (7, "desk-2"));
        assert!(e.tick(t(40)).is_empty(), "fires once");
        let back = e.heartbeat(9, t(41), &a, None);
        assert_eq!(states(&back), [("offline", AlertState::Resolved)]);
        assert_eq!(back[0].trigger_seq, 7, "the resolved alert names the heartbeat it fired on");
    }

    #[test]
    fn an_emptied_window_resolves_on_a_tick() {
        let mut e = eval("[[rule]]\nname = \"errors\"\ncheck = \"error_rate\"\nthreshold = 10\nwindow_seconds = 60\nmin_interactions = 2");
        let a = AgentId::new("desk-1").unwrap();
        let mut out = e.interaction(Source::Assistant, 1, t(0), &a, &inter(false, 1.0));
        out.extend(e.interaction(Source::Assistant, 2, t(1), &a, &inter(false, 1.0)));
        assert!(e.interaction(Source::Ferry, 3, t(1), &a, &inter(false, 1.0)).is_empty(), "a rule counts only its source");
        assert_eq!(states(&out), [("errors", AlertState::Firing)]);
        assert!(e.tick(t(30)).is_empty());
        assert_eq!(states(&e.tick(t(62))), [("errors", AlertState::Resolved)]);
        assert!(e.firing().is_empty());
    }

    #[test]
    fn a_spool_backlog_fires_on_the_heartbeat_that_reports_it_and_resolves_on_the_one_that_clears_it() {
        let mut e = eval("[[rule]]\nname = \"backlog\"\ncheck = \"spool_backlog\"\nthreshold = 100");
        let a = AgentId::new("desk-3").unwrap();
        assert!(e.heartbeat(1, t(0), &a, Some(100)).is_empty(), "at the threshold is not above it");
        let fired = e.heartbeat(2, t(30), &a, Some(5000));
        assert_eq!(states(&fired), [("backlog", AlertState::Firing)]);
        assert_eq!((fired[0].trigger_seq, fired[0].value, fired[0].scope.to_string().as_str()), (2, 5000.0, "agent=desk-3"));
        assert!(e.heartbeat(3, t(60), &a, Some(7000)).is_empty(), "fires once");
        assert!(e.tick(t(3600)).is_empty(), "time alone does not clear a spool");
        assert!(e.heartbeat(4, t(3601), &a, None).is_empty(), "a heartbeat that did not decode judges nothing");
        let back = e.heartbeat(5, t(3630), &a, Some(3));
        assert_eq!(states(&back), [("backlog", AlertState::Resolved)]);
        assert_eq!(back[0].trigger_seq, 2);
        // A replica that restored the firing reads the same heartbeats again: nothing new.
        let mut r = eval("[[rule]]\nname = \"backlog\"\ncheck = \"spool_backlog\"\nthreshold = 100");
        r.restore(&fired[0]);
        assert!(r.heartbeat(2, t(30), &a, Some(5000)).is_empty());
        assert!(r.heartbeat(3, t(60), &a, Some(7000)).is_empty());
    }

    #[test]
    fn dead_letters_a_minute_fire_over_the_window_and_an_emptied_window_resolves() {
        let mut e = eval("[[rule]]\nname = \"dead\"\ncheck = \"dead_letters\"\nthreshold = 2\nwindow_seconds = 60\n[[rule]]\nname = \"dead-agent\"\ncheck = \"dead_letters\"\nscope = \"agent\"\nthreshold = 5\nwindow_seconds = 60");
        let a = AgentId::new("desk-1").unwrap();
        let mut out = Vec::new();
        for s in 0..2 {
            out.extend(e.dead_letter(s + 1, t(s as i64), Some(&a)));
        }
        assert!(out.is_empty(), "2 a minute is not above 2");
        out.extend(e.dead_letter(3, t(3), None));
        assert_eq!(states(&out), [("dead", AlertState::Firing)], "an agent's rule counts only dead letters that name it");
        assert_eq!((out[0].value, out[0].trigger_seq), (3.0, 3));
        assert!(e.interaction(Source::Assistant, 9, t(4), &a, &inter(false, 1.0)).is_empty(), "interactions are not dead letters");
        assert_eq!(states(&e.tick(t(70))), [("dead", AlertState::Resolved)]);
    }

    #[test]
    fn a_dead_letters_rule_takes_all_or_agent_and_no_source() {
        let bad = |toml: &str| parse(toml, "t.toml").unwrap_err().to_string();
        assert!(bad("[[rule]]\nname = \"d\"\ncheck = \"dead_letters\"\nscope = \"model\"\nthreshold = 1").contains("rule[0].scope"));
        assert!(bad("[[rule]]\nname = \"d\"\ncheck = \"dead_letters\"\nsource = \"ferry\"\nthreshold = 1").contains("rule[0].source"));
    }
}
