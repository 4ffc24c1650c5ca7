//! Privacy rules: excluded apps and titles never leave the process, redacted
//! parts of titles are replaced before anything else sees them.

use regex::{Regex, RegexBuilder};
use serde::Deserialize;

use super::Sample;

/// The `[privacy]` section of the agent's config.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    /// Regexes matched (whole, ignoring case) against the executable's name,
    /// e.g. `"keepass\\.exe"`: while such an app is in front, nothing is
    /// recorded.
    pub exclude_apps: Vec<String>,
    /// Regexes searched in window titles: a matching window is not recorded.
    pub exclude_titles: Vec<String>,
    /// Regexes searched in window titles: each match is replaced by
    /// `redact_with` before the title is used.
    pub redact_titles: Vec<String>,
    /// Replacement for redacted text (default `[redacted]`).
    pub redact_with: Option<String>,
}

/// A privacy pattern that does not compile; names the setting and its index.
#[derive(Debug, thiserror::Error)]
#[error("privacy.{field}[{index}] = {pattern:?}: {message}")]
pub struct PrivacyError {
    /// The setting (`exclude_apps`, ...).
    pub field: &'static str,
    /// Position in the list.
    pub index: usize,
    /// The pattern.
    pub pattern: String,
    /// The regex compiler's message.
    pub message: String,
}

/// Compiled privacy rules.
#[derive(Debug, Clone, Default)]
pub struct Privacy {
    exclude_apps: Vec<Regex>,
    exclude_titles: Vec<Regex>,
    redact_titles: Vec<Regex>,
    redact_with: String,
}

/// What the rules did to a sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Recorded, possibly redacted.
    Keep(Sample),
    /// Not recorded: an excluded app or title is in front.
    Excluded,
}

impl Privacy {
    /// Compiles `cfg`, naming the first bad pattern.
    pub fn new(cfg: &PrivacyConfig) -> Result<Self, PrivacyError> {
        let compile = |field: &'static str, list: &[String], whole: bool| {
            list.iter()
                .enumerate()
                .map(|(index, p)| {
                    let src = if whole { format!("^(?:{p})$") } else { p.clone() };
                    RegexBuilder::new(&src)
                        .case_insensitive(true)
                        .build()
                        .map_err(|e| PrivacyError {
                            field,
                            index,
                            pattern: p.clone(),
                            message: e.to_string(),
                        })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Self {
            exclude_apps: compile("exclude_apps", &cfg.exclude_apps, true)?,
            exclude_titles: compile("exclude_titles", &cfg.exclude_titles, false)?,
            redact_titles: compile("redact_titles", &cfg.redact_titles, false)?,
            redact_with: cfg.redact_with.clone().unwrap_or_else(|| "[redacted]".into()),
        })
    }

    /// Applies the rules to a raw sample.
    pub fn apply(&self, mut sample: Sample) -> Verdict {
        if self.exclude_apps.iter().any(|r| r.is_match(&sample.app))
            || self.exclude_titles.iter().any(|r| r.is_match(&sample.title))
        {
            return Verdict::Excluded;
        }
        for r in &self.redact_titles {
            if r.is_match(&sample.title) {
                sample.title = r.replace_all(&sample.title, self.redact_with.as_str()).into_owned();
            }
        }
        Verdict::Keep(sample)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sample(app: &str, title: &str) -> Sample {
        Sample {
            app: app.into(),
            title: title.into(),
            ..Sample::default()
        }
    }

    #[test]
    fn exclude_and_redact() {
        let p = Privacy::new(&PrivacyConfig {
            exclude_apps: vec!["keepass\\.exe".into()],
            exclude_titles: vec!["(?i)private".into()],
            redact_titles: vec![r"\d{11}".into(), "客户[^ ]+".into()],
            redact_with: None,
        })
        .unwrap();
        assert_eq!(p.apply(sample("KeePass.exe", "db")), Verdict::Excluded);
        assert_eq!(p.apply(sample("notkeepass.exe2", "db")), Verdict::Keep(sample("notkeepass.exe2", "db")));
        assert_eq!(p.apply(sample("chrome.exe", "Private window")), Verdict::Excluded);
        assert_eq!(
            p.apply(sample("wechat.exe", "call 13800138000 客户张三 now")),
            Verdict::Keep(sample("wechat.exe", "call [redacted] [redacted] now"))
        );
    }

    #[test]
    fn bad_pattern_names_its_place() {
        let e = Privacy::new(&PrivacyConfig {
            redact_titles: vec!["ok".into(), "(".into()],
            ..PrivacyConfig::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("privacy.redact_titles[1] = \"(\": "), "{e}");
    }
}
