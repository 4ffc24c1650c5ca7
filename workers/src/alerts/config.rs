//! The alerts file (TOML): rules, webhooks, and the seed's flat `alert_config.json` fields, parsed and checked with errors that name the field.
//!
//! ```toml
//! enabled = true                    # false: evaluate nothing, deliver nothing
//! alert_cooldown_minutes = 5        # every rule's cooldown unless it sets its own
//! webhook_url = "http://127.0.0.1:9000/alerts"
//! error_rate_threshold = 20         # percent of interactions failed, all scope
//! response_time_threshold = 5000    # ms, p95, all scope
//! consecutive_errors_threshold = 5  # failures in a row, all scope
//!
//! [[rule]]
//! name = "agent-errors"
//! check = "error_rate"              # error_rate | response_time | consecutive_errors | agent_offline | spool_backlog | dead_letters | consumer_lag
//! scope = "agent"                   # all | agent | model | intent | group (consumer: consumer_lag's only scope)
//! threshold = 50
//! window_seconds = 60
//! min_interactions = 10
//! source = "assistant"              # assistant | ferry (Ferry's own answers)
//!
//! [[rule]]
//! name = "backlog"
//! check = "consumer_lag"            # messages not yet acknowledged, per worker consumer
//! threshold = 1000
//! consumers = ["rules", "inference-chat"]   # default: every worker consumer
//!
//! [groups]                          # for scope = "group", with the --groups file
//! support = ["desk-1", "desk-2"]
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use ferry_schema::alert::{valid_rule_name, Check, ScopeKind};
use ferry_schema::topology;
use serde::Deserialize;

/// The window a rule uses unless it sets `window_seconds`.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(300);
/// The fewest interactions in a window before a rate or a time is judged.
pub const DEFAULT_MIN_INTERACTIONS: usize = 5;
/// The cooldown unless the file sets `alert_cooldown_minutes`.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(5 * 60);
/// The longest window a rule may have: a replica rebuilds its windows from
/// the stream at start, reading back twice this at most.
pub const MAX_WINDOW: Duration = Duration::from_secs(3600);
/// How far back a starting replica reads heartbeats for a spool-backlog
/// rule: three of an agent's heartbeats at its default 30 s, so it judges
/// every agent's latest before the next arrives.
pub const SPOOL_LOOKBACK: Duration = Duration::from_secs(90);
/// How long one webhook call may take unless it sets `timeout_seconds`.
pub const DEFAULT_WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// A response-time rule's statistic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Statistic {
    /// The 95th percentile (the default).
    P95,
    /// The mean.
    Mean,
}

/// Whose interactions a rule counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Interaction events that assistants report (`events.<agent>.interaction`); the default.
    Assistant,
    /// Ferry's own answers: each reply on `REPLIES` as an interaction
    /// (`Reply::as_interaction`: a fallback past the model is a failure).
    Ferry,
}

/// One rule, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Its name (a subject token).
    pub name: String,
    /// What it watches.
    pub check: Check,
    /// Per what it is evaluated.
    pub scope: ScopeKind,
    /// Percent, milliseconds, a count or seconds, by `check`.
    pub threshold: f64,
    /// The sliding window (rate and time checks).
    pub window: Duration,
    /// Fewest interactions in the window before it is judged.
    pub min_interactions: usize,
    /// After firing, no new firing of this rule in this scope for this long.
    pub cooldown: Duration,
    /// Mean or p95, for response-time rules.
    pub statistic: Statistic,
    /// Whose interactions it counts.
    pub source: Source,
    /// The worker consumers a consumer-lag rule watches, by durable name
    /// (empty for every other check).
    pub consumers: Vec<String>,
}

/// One webhook.
#[derive(Debug, Clone, PartialEq)]
pub struct Webhook {
    /// Where alerts are POSTed (http or https).
    pub url: String,
    /// How long one call may take.
    pub timeout: Duration,
}

/// The alerts file, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertsFile {
    /// Whether anything is evaluated.
    pub enabled: bool,
    /// The rules.
    pub rules: Vec<Rule>,
    /// The webhooks every alert goes to.
    pub webhooks: Vec<Webhook>,
    /// The agents' groups, for rules with scope `group`: the file's
    /// `[groups]` and the groups file's (`--groups`).
    pub groups: crate::groups::AgentGroups,
}

impl AlertsFile {
    /// The longest span a rule looks back: its window, or an offline
    /// rule's threshold.
    pub fn horizon(&self) -> Duration {
        self.rules
            .iter()
            .map(|r| match r.check {
                Check::AgentOffline => Duration::from_secs_f64(r.threshold),
                Check::SpoolBacklog => SPOOL_LOOKBACK,
                Check::ConsumerLag => Duration::ZERO,
                _ => r.window,
            })
            .max()
            .unwrap_or(Duration::ZERO)
    }
}

/// Why the alerts file is not usable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// It could not be read.
    #[error("cannot read alerts file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It is not valid TOML of the expected shape.
    #[error("alerts file {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message (with line and field).
        message: String,
    },
    /// The groups file (`--groups`) is unusable.
    #[error(transparent)]
    Groups(#[from] crate::groups::GroupsFileError),
    /// A value is out of range or unknown.
    #[error("alerts file {path}: {field}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// Which field (`rule[2].threshold`).
        field: String,
        /// What was expected.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default = "yes")]
    enabled: bool,
    alert_cooldown_minutes: Option<f64>,
    webhook_url: Option<String>,
    error_rate_threshold: Option<f64>,
    response_time_threshold: Option<f64>,
    consecutive_errors_threshold: Option<f64>,
    #[serde(default)]
    rule: Vec<RawRule>,
    #[serde(default)]
    webhook: Vec<RawWebhook>,
    #[serde(default)]
    groups: BTreeMap<String, Vec<String>>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    check: String,
    #[serde(default)]
    scope: Option<String>,
    threshold: f64,
    window_seconds: Option<f64>,
    min_interactions: Option<usize>,
    cooldown_minutes: Option<f64>,
    statistic: Option<Statistic>,
    source: Option<Source>,
    consumers: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: String,
    timeout_seconds: Option<f64>,
}

/// Reads and checks the alerts file at `path`, its `[groups]` completed
/// by the groups file `groups` (`--groups`) when given.
pub fn load(path: &Path, groups: Option<&Path>) -> Result<AlertsFile, ConfigError> {
    let extra = match groups {
        Some(g) => crate::groups::load_file(g)?,
        None => BTreeMap::new(),
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_with_groups(&text, &path.display().to_string(), extra)
}

/// Parses and checks an alerts file's text; `path` names it in errors.
pub fn parse(text: &str, path: &str) -> Result<AlertsFile, ConfigError> {
    parse_with_groups(text, path, BTreeMap::new())
}

/// [`parse`], with `extra` groups added to the file's `[groups]`.
pub fn parse_with_groups(text: &str, path: &str, extra: BTreeMap<String, Vec<String>>) -> Result<AlertsFile, ConfigError> {
    let raw: RawFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.into(),
        message: e.to_string(),
    })?;
    let invalid = |field: &str, message: String| ConfigError::Invalid {
        path: path.into(),
        field: field.into(),
        message,
    };
    let minutes = |field: &str, m: f64| -> Result<Duration, ConfigError> {
        if m.is_finite() && (0.0..=7.0 * 24.0 * 60.0).contains(&m) {
            Ok(Duration::from_secs_f64(m * 60.0))
        } else {
            Err(invalid(field, format!("expected minutes from 0 to 10080, got {m}")))
        }
    };
    let cooldown = match raw.alert_cooldown_minutes {
        Some(m) => minutes("alert_cooldown_minutes", m)?,
        None => DEFAULT_COOLDOWN,
    };
    let mut rules = Vec::new();
    // The seed's flat fields: one rule each over everything.
    let flat = [
        ("error_rate_threshold", Check::ErrorRate, raw.error_rate_threshold),
        ("response_time_threshold", Check::ResponseTime, raw.response_time_threshold),
        ("consecutive_errors_threshold", Check::ConsecutiveErrors, raw.consecutive_errors_threshold),
    ];
    for (field, check, value) in flat {
        if let Some(threshold) = value {
            check_threshold(check, threshold).map_err(|m| invalid(field, m))?;
            rules.push(Rule {
                name: check.as_str().into(),
                check,
                scope: ScopeKind::All,
                threshold,
                window: DEFAULT_WINDOW,
                min_interactions: DEFAULT_MIN_INTERACTIONS,
                cooldown,
                statistic: Statistic::P95,
                source: Source::Assistant,
                consumers: Vec::new(),
            });
        }
    }
    for (i, r) in raw.rule.into_iter().enumerate() {
        let at = |f: &str| format!("rule[{i}].{f}");
        if !valid_rule_name(&r.name) {
            return Err(invalid(&at("name"), format!("{:?}: expected 1 to 64 of a-z, 0-9, '_', '-'", r.name)));
        }
        if rules.iter().any(|x: &Rule| x.name == r.name) {
            return Err(invalid(&at("name"), format!("{:?} is used twice (the seed's flat fields make rules named after their check)", r.name)));
        }
        let check = Check::parse(&r.check).ok_or_else(|| {
            invalid(&at("check"), format!("{:?}: expected one of {}", r.check, Check::ALL.map(Check::as_str).join(", ")))
        })?;
        let scope = match r.scope.as_deref() {
            None if check == Check::ConsumerLag => ScopeKind::Consumer,
            None => if check.watches_heartbeats() { ScopeKind::Agent } else { ScopeKind::All },
            Some(s) => ScopeKind::parse(s).ok_or_else(|| {
                invalid(&at("scope"), format!("{s:?}: expected one of {}", ScopeKind::ALL.map(ScopeKind::as_str).join(", ")))
            })?,
        };
        if check == Check::DeadLetters && !matches!(scope, ScopeKind::All | ScopeKind::Agent) {
            return Err(invalid(&at("scope"), "a dead_letters rule counts all dead letters or each agent's: all or agent".into()));
        }
        if (check == Check::ConsumerLag) != (scope == ScopeKind::Consumer) {
            let m = if check == Check::ConsumerLag {
                "a consumer_lag rule is per worker consumer: leave scope out or write \"consumer\"".to_string()
            } else {
                format!("scope \"consumer\" is for consumer_lag rules, not {}", check.as_str())
            };
            return Err(invalid(&at("scope"), m));
        }
        if check.watches_heartbeats() && scope != ScopeKind::Agent {
            return Err(invalid(&at("scope"), format!("a {} rule is per agent: leave scope out or write \"agent\"", check.as_str())));
        }
        check_threshold(check, r.threshold).map_err(|m| invalid(&at("threshold"), m))?;
        let window = match r.window_seconds {
            None => DEFAULT_WINDOW,
            Some(w) if w.is_finite() && w >= 1.0 && w <= MAX_WINDOW.as_secs_f64() => Duration::from_secs_f64(w),
            Some(w) => return Err(invalid(&at("window_seconds"), format!("expected 1 to {}, got {w}", MAX_WINDOW.as_secs()))),
        };
        let min_interactions = r.min_interactions.unwrap_or(DEFAULT_MIN_INTERACTIONS);
        if min_interactions == 0 {
            return Err(invalid(&at("min_interactions"), "expected at least 1".into()));
        }
        let cooldown = match r.cooldown_minutes {
            Some(m) => minutes(&at("cooldown_minutes"), m)?,
            None => cooldown,
        };
        let consumers = match (check, r.consumers) {
            (Check::ConsumerLag, None) => topology::worker_consumers().iter().map(|d| d.name().to_string()).collect(),
            (Check::ConsumerLag, Some(names)) => {
                let known: Vec<String> = topology::worker_consumers().iter().map(|d| d.name().to_string()).collect();
                if names.is_empty() {
                    return Err(invalid(&at("consumers"), format!("expected at least one of {}, or leave it out for all", known.join(", "))));
                }
                if let Some(bad) = names.iter().find(|n| !known.contains(n)) {
                    return Err(invalid(&at("consumers"), format!("{bad:?}: expected worker consumers among {}", known.join(", "))));
                }
                names
            }
            (_, Some(_)) => return Err(invalid(&at("consumers"), "only a consumer_lag rule watches consumers".into())),
            (_, None) => Vec::new(),
        };
        if r.source.is_some() && check == Check::ConsumerLag {
            return Err(invalid(&at("source"), "a consumer_lag rule watches consumers: leave source out".into()));
        }
        if r.source.is_some() && check == Check::DeadLetters {
            return Err(invalid(&at("source"), "a dead_letters rule counts dead letters: leave source out".into()));
        }
        if r.source.is_some() && check.watches_heartbeats() {
            return Err(invalid(&at("source"), format!("a {} rule watches heartbeats: leave source out", check.as_str())));
        }
        if r.statistic.is_some() && check != Check::ResponseTime {
            return Err(invalid(&at("statistic"), "only a response_time rule has a statistic".into()));
        }
        rules.push(Rule {
            name: r.name,
            check,
            scope,
            threshold: r.threshold,
            window,
            min_interactions,
            cooldown,
            statistic: r.statistic.unwrap_or(Statistic::P95),
            source: r.source.unwrap_or(Source::Assistant),
            consumers,
        });
    }
    let mut webhooks = Vec::new();
    let listed = raw.webhook_url.map(|url| ("webhook_url".to_string(), RawWebhook { url, timeout_seconds: None }));
    for (field, w) in listed.into_iter().chain(raw.webhook.into_iter().enumerate().map(|(i, w)| (format!("webhook[{i}]"), w))) {
        let parsed = reqwest::Url::parse(&w.url).map_err(|e| invalid(&field, format!("{:?}: not a URL ({e})", w.url)))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(invalid(&field, format!("{:?}: expected an http:// or https:// URL", w.url)));
        }
        let timeout = match w.timeout_seconds {
            None => DEFAULT_WEBHOOK_TIMEOUT,
            Some(t) if t.is_finite() && (0.1..=60.0).contains(&t) => Duration::from_secs_f64(t),
            Some(t) => return Err(invalid(&format!("{field}.timeout_seconds"), format!("expected 0.1 to 60, got {t}"))),
        };
        webhooks.push(Webhook { url: w.url, timeout });
    }
    let mut table = raw.groups;
    for (group, members) in extra {
        table.entry(group).or_default().extend(members);
    }
    let groups = crate::groups::AgentGroups::parse(&table).map_err(|e| invalid("groups", e.to_string()))?;
    let file = AlertsFile {
        enabled: raw.enabled,
        rules,
        webhooks,
        groups,
    };
    if file.enabled && file.rules.is_empty() {
        return Err(invalid("rule", "no rules: add a [[rule]] or one of the seed's *_threshold fields, or set enabled = false".into()));
    }
    Ok(file)
}

fn check_threshold(check: Check, t: f64) -> Result<(), String> {
    let (ok, expected) = match check {
        Check::ErrorRate => (t > 0.0 && t < 100.0, "a percentage above 0 and below 100 (10 for 10%)"),
        Check::ResponseTime => (t > 0.0 && t.is_finite(), "milliseconds above 0"),
        Check::ConsecutiveErrors => (t >= 1.0 && t.fract() == 0.0 && t <= 1e6, "a whole number of failures, at least 1"),
        Check::AgentOffline => (t >= 1.0 && t <= MAX_WINDOW.as_secs_f64(), "seconds from 1 to 3600"),
        Check::SpoolBacklog => (t >= 0.0 && t.fract() == 0.0 && t <= 1e12, "a whole number of events, 0 or more"),
        Check::DeadLetters => (t >= 0.0 && t.is_finite(), "dead letters a minute, 0 or more"),
        Check::ConsumerLag => (t >= 0.0 && t.fract() == 0.0 && t <= 1e12, "a whole number of messages, 0 or more"),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("expected {expected}, got {t}"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_fields_map_to_rules_over_everything() {
        let f = parse(
            "enabled = true\nalert_cooldown_minutes = 2\nwebhook_url = \"http://127.0.0.1:9/x\"\n\
             error_rate_threshold = 10\nresponse_time_threshold = 3000\nconsecutive_errors_threshold = 4\n",
            "a.toml",
        )
        .unwrap();
        let names: Vec<_> = f.rules.iter().map(|r| (r.name.as_str(), r.check, r.threshold)).collect();
        assert_eq!(
            names,
            [
                ("error_rate", Check::ErrorRate, 10.0),
                ("response_time", Check::ResponseTime, 3000.0),
                ("consecutive_errors", Check::ConsecutiveErrors, 4.0)
            ]
        );
        assert!(f.rules.iter().all(|r| r.cooldown == Duration::from_secs(120) && r.scope == ScopeKind::All));
        assert_eq!(f.webhooks[0].url, "http://127.0.0.1:9/x");
    }

    #[test]
    fn errors_name_the_field_and_what_was_expected() {
        let cases = [
            ("error_rate_threshold = 0.1\nerror_rate_threshold = 2", "duplicate"),
            ("[[rule]]\nname = \"a\"\ncheck = \"latency\"\nthreshold = 1", "rule[0].check: \"latency\": expected one of error_rate"),
            ("[[rule]]\nname = \"a\"\ncheck = \"error_rate\"\nthreshold = 150", "rule[0].threshold: expected a percentage"),
            ("[[rule]]\nname = \"A b\"\ncheck = \"error_rate\"\nthreshold = 5", "rule[0].name"),
            ("[[rule]]\nname = \"a\"\ncheck = \"agent_offline\"\nscope = \"all\"\nthreshold = 60", "rule[0].scope"),
            ("webhook_url = \"ftp://x\"\nconsecutive_errors_threshold = 3", "webhook_url: \"ftp://x\": expected an http"),
            ("enabled = true", "no rules"),
            ("treshold = 3", "unknown field `treshold`"),
            ("[[rule]]\nname = \"a\"\ncheck = \"dead_letters\"\nscope = \"group\"\nthreshold = 1", "rule[0].scope: a dead_letters rule"),
            ("[[rule]]\nname = \"a\"\ncheck = \"spool_backlog\"\nscope = \"group\"\nthreshold = 1", "rule[0].scope"),
            ("consecutive_errors_threshold = 3\n[groups]\nsupport = [\"desk 1\"]", "a.toml: groups: [groups] \"support\""),
            ("[[rule]]\nname = \"a\"\ncheck = \"consumer_lag\"\nscope = \"all\"\nthreshold = 1", "rule[0].scope: a consumer_lag rule"),
            ("[[rule]]\nname = \"a\"\ncheck = \"error_rate\"\nscope = \"consumer\"\nthreshold = 1", "rule[0].scope: scope \"consumer\" is for"),
            ("[[rule]]\nname = \"a\"\ncheck = \"consumer_lag\"\nthreshold = 1\nconsumers = [\"rulez\"]", "rule[0].consumers: \"rulez\": expected worker consumers among rules,"),
            ("[[rule]]\nname = \"a\"\ncheck = \"error_rate\"\nthreshold = 1\nconsumers = [\"rules\"]", "rule[0].consumers: only a consumer_lag"),
            ("[[rule]]\nname = \"a\"\ncheck = \"consumer_lag\"\nthreshold = 1.5", "rule[0].threshold: expected a whole number of messages"),
        ];
        for (text, want) in cases {
            let e = parse(text, "a.toml").unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        assert!(parse("enabled = false", "a.toml").unwrap().rules.is_empty());
    }

    #[test]
    fn a_consumer_lag_rule_watches_every_worker_consumer_unless_it_names_some() {
        let f = parse("[[rule]]\nname = \"lag\"\ncheck = \"consumer_lag\"\nthreshold = 100\n", "a.toml").unwrap();
        let all: Vec<String> = topology::worker_consumers().iter().map(|d| d.name().to_string()).collect();
        assert_eq!(f.rules[0].scope, ScopeKind::Consumer);
        assert_eq!(f.rules[0].consumers, all);
        assert!(all.contains(&"rules".to_string()) && all.contains(&"inference-chat".to_string()), "{all:?}");
        let f = parse("[[rule]]\nname = \"lag\"\ncheck = \"consumer_lag\"\nthreshold = 0\nconsumers = [\"rules\"]\n", "a.toml").unwrap();
        assert_eq!(f.rules[0].consumers, ["rules"]);
    }
}
