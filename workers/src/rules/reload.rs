//! Hot reload: the rule set in use, replaced whole when the rules or groups file changes and still validates.
//!
//! The reloader reads both files every `reload_every` (they are small) and
//! compares their bytes with what it last read, so an editor's
//! write-then-rename and a change inside the same mtime tick are both seen.
//! A changed pair of files is parsed and validated like at start; only a
//! valid set replaces the one in use, between two events (an event is
//! decided by one set from start to end). An invalid change is logged with
//! the validator's message (file, rule, field) and the rules in use stay.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::config;
use super::engine::RuleSet;

/// The rule set in use, shared by the handler and the reloader.
#[derive(Debug)]
pub struct LiveRules {
    current: RwLock<Arc<RuleSet>>,
}

impl LiveRules {
    /// Starts with `set`.
    pub fn new(set: Arc<RuleSet>) -> Self {
        Self {
            current: RwLock::new(set),
        }
    }

    /// The set in use now.
    pub fn current(&self) -> Arc<RuleSet> {
        // A writer only swaps an Arc, so a poisoned lock still holds a whole set.
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn replace(&self, set: Arc<RuleSet>) {
        match self.current.write() {
            Ok(mut g) => *g = set,
            Err(poisoned) => *poisoned.into_inner() = set,
        }
    }
}

/// What one look at the files found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reloaded {
    /// Same bytes as last time.
    Unchanged,
    /// A valid new set is in use; how many rules it has.
    Replaced(usize),
    /// The files changed but do not make a valid set; why. The set in use stays.
    Rejected(String),
}

/// Watches a rules file (and its groups file) for [`LiveRules`].
#[derive(Debug)]
pub struct Reloader {
    rules_path: PathBuf,
    groups_path: Option<PathBuf>,
    /// Rules with `customer_tags` need the handler's PostgreSQL pool;
    /// without one, a set that uses them is rejected.
    has_database: bool,
    last: Seen,
    live: Arc<LiveRules>,
}

/// The bytes of the rules and groups files (`None`: could not be read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen(Option<Vec<u8>>, Option<Vec<u8>>);

impl Seen {
    /// Reads both files now. Read this before loading the set `live` starts
    /// with, so an edit made while the worker starts is not missed.
    pub fn read(rules_path: &Path, groups_path: Option<&Path>) -> Self {
        let read = |p: &Path| std::fs::read(p).ok();
        Self(read(rules_path), groups_path.and_then(read))
    }
}

impl Reloader {
    /// A reloader for `live`, whose set was loaded from these files after
    /// they read as `seen`.
    pub fn new(rules_path: &Path, groups_path: Option<&Path>, has_database: bool, live: Arc<LiveRules>, seen: Seen) -> Self {
        Self {
            rules_path: rules_path.to_path_buf(),
            groups_path: groups_path.map(Path::to_path_buf),
            has_database,
            last: seen,
            live,
        }
    }

    /// Looks at the files once; replaces the set in use when they changed
    /// and validate.
    pub fn check(&mut self) -> Reloaded {
        let now = Seen::read(&self.rules_path, self.groups_path.as_deref());
        if now == self.last {
            return Reloaded::Unchanged;
        }
        self.last = now;
        match config::load_with_groups(&self.rules_path, self.groups_path.as_deref()) {
            Ok(set) if set.needs_customers() && !self.has_database => Reloaded::Rejected(format!(
                "{}: a rule uses `customer_tags`, which needs PostgreSQL, and this worker has no connection to it \
                 (it connects at start, with --database-url, when its rules use customer_tags): restart it with --database-url",
                self.rules_path.display()
            )),
            Ok(set) => {
                let n = set.len();
                self.live.replace(Arc::new(set));
                Reloaded::Replaced(n)
            }
            Err(e) => Reloaded::Rejected(e.to_string()),
        }
    }

    /// Checks every `every` until `shutdown`, logging what changed. The
    /// reading, parsing and regex compiling run on the blocking pool.
    pub async fn watch(mut self, every: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate; the files were just read
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let checked = tokio::task::spawn_blocking(move || {
                let outcome = self.check();
                (self, outcome)
            })
            .await;
            let outcome;
            (self, outcome) = match checked {
                Ok(done) => done,
                Err(error) => {
                    tracing::error!(%error, "the rules reload check failed; rules are no longer reloaded");
                    return;
                }
            };
            match outcome {
                Reloaded::Unchanged => {}
                Reloaded::Replaced(rules) => {
                    tracing::info!(rules, path = %self.rules_path.display(), "rules reloaded");
                }
                Reloaded::Rejected(error) => {
                    tracing::error!(%error, path = %self.rules_path.display(), "rules changed but do not validate; keeping the rules in use");
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const ONE: &str = "[[rule]]\nname = \"one\"\naction = \"reply\"\ntemplate = \"one\"\n";
    const TWO: &str = "[[rule]]\nname = \"one\"\naction = \"reply\"\ntemplate = \"one\"\n\n[[rule]]\nname = \"two\"\naction = \"ignore\"\n";

    fn setup(text: &str, groups: Option<&str>) -> (tempfile::TempDir, PathBuf, Option<PathBuf>) {
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("rules.toml");
        std::fs::write(&rules, text).unwrap();
        let groups = groups.map(|g| {
            let p = dir.path().join("groups.toml");
            std::fs::write(&p, g).unwrap();
            p
        });
        (dir, rules, groups)
    }

    fn live_from(rules: &Path, groups: Option<&Path>) -> Arc<LiveRules> {
        Arc::new(LiveRules::new(Arc::new(config::load_with_groups(rules, groups).unwrap())))
    }

    #[test]
    fn a_valid_change_replaces_the_set_and_an_invalid_one_keeps_it() {
        let (_dir, path, _) = setup(ONE, None);
        let seen = Seen::read(&path, None);
        let live = live_from(&path, None);
        let mut r = Reloader::new(&path, None, false, live.clone(), seen);
        assert_eq!(r.check(), Reloaded::Unchanged);
        assert_eq!(live.current().len(), 1);

        std::fs::write(&path, TWO).unwrap();
        assert_eq!(r.check(), Reloaded::Replaced(2));
        assert_eq!(live.current().len(), 2);
        assert_eq!(r.check(), Reloaded::Unchanged, "the same bytes are not reloaded twice");

        std::fs::write(&path, "[[rule]]\nname = \"broken\"\naction = \"reply\"\n").unwrap();
        let Reloaded::Rejected(why) = r.check() else { panic!("an invalid file was taken") };
        assert!(why.contains("broken"), "the error names the rule: {why}");
        assert_eq!(live.current().len(), 2, "the set in use stays");
        assert_eq!(r.check(), Reloaded::Unchanged, "an invalid file is reported once per change");

        std::fs::remove_file(&path).unwrap();
        assert!(matches!(r.check(), Reloaded::Rejected(_)), "a missing file is reported");
        assert_eq!(live.current().len(), 2);

        std::fs::write(&path, ONE).unwrap();
        assert_eq!(r.check(), Reloaded::Replaced(1), "a fixed file is taken again");
    }

    #[test]
    fn a_groups_change_reloads_and_customer_tags_need_a_database() {
        let rules = "[[rule]]\nname = \"vip\"\ngroups = [\"support\"]\naction = \"ignore\"\n";
        let (_dir, path, groups) = setup(rules, Some("[groups]\nsupport = [\"desk-1\"]\n"));
        let groups = groups.unwrap();
        let seen = Seen::read(&path, Some(&groups));
        let live = live_from(&path, Some(&groups));
        let mut r = Reloader::new(&path, Some(&groups), false, live.clone(), seen);
        std::fs::write(&groups, "[groups]\nsupport = [\"desk-1\", \"desk-2\"]\n").unwrap();
        assert_eq!(r.check(), Reloaded::Replaced(1));

        std::fs::write(&path, "[[rule]]\nname = \"tagged\"\ncustomer_tags = [\"vip\"]\naction = \"ignore\"\n").unwrap();
        let Reloaded::Rejected(why) = r.check() else { panic!("customer_tags without a database was taken") };
        assert!(why.contains("customer_tags"), "{why}");
        assert_eq!(live.current().len(), 1);
    }
}
