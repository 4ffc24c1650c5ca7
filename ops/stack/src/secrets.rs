//! The passwords `nats.conf` reads from the environment, generated per stack.

use std::collections::BTreeMap;
use std::path::Path;

use rand::distributions::Alphanumeric;
use rand::Rng;

use ferry_schema::topology::Role;

use crate::StackError;

/// Agents with entries in the committed `nats.conf` (the demo agents).
pub const DEMO_AGENTS: &[&str] = &["desk-1", "desk-2"];

/// User name of operators in `nats.conf`.
pub const OPERATOR_USER: &str = "operator";

/// Passwords of every user in `nats.conf`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secrets {
    /// Password of each worker role's user, by role name (`rules`, …).
    pub roles: BTreeMap<String, String>,
    /// Password of the `operator` user.
    pub operator: String,
    /// Password of each agent user, by agent id.
    pub agents: BTreeMap<String, String>,
    /// Password of the `ferry` role in the local PostgreSQL cluster.
    pub postgres: String,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("agents", &self.agents.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// A random 32-character password. nats-server parses an environment
/// variable's value as a config token, so a value starting with a digit
/// would be read as a number: passwords always start with a letter.
pub fn generate_password() -> String {
    let mut rng = rand::thread_rng();
    let first = char::from(b'a' + rng.gen_range(0..26u8));
    std::iter::once(first)
        .chain(rng.sample_iter(&Alphanumeric).take(31).map(char::from))
        .collect()
}

/// Whether nats-server reads `p` back as the same string from the environment.
fn is_safe_password(p: &str) -> bool {
    p.len() >= 16
        && p.starts_with(|c: char| c.is_ascii_alphabetic())
        && p.chars().all(|c| c.is_ascii_alphanumeric())
        && !["true", "false", "yes", "no", "on", "off"].contains(&p.to_ascii_lowercase().as_str())
}

/// Environment variable (in `.ferry/secrets.env`) of the local PostgreSQL
/// cluster's `ferry` password.
pub const POSTGRES_ENV: &str = "FERRY_POSTGRES_PASSWORD";

/// Environment variable holding `role`'s password (`FERRY_RULES_PASSWORD`).
pub fn role_env_var(role: Role) -> String {
    format!("FERRY_{}_PASSWORD", role.as_str().to_ascii_uppercase())
}

/// Environment variable holding `agent`'s password (`FERRY_AGENT_DESK_1_PASSWORD`).
pub fn agent_env_var(agent: &str) -> String {
    format!(
        "FERRY_AGENT_{}_PASSWORD",
        agent.to_ascii_uppercase().replace('-', "_")
    )
}

impl Secrets {
    /// Fresh random passwords for every user.
    pub fn generate() -> Self {
        Self {
            roles: Role::ALL
                .iter()
                .map(|r| (r.as_str().to_string(), generate_password()))
                .collect(),
            operator: generate_password(),
            agents: DEMO_AGENTS
                .iter()
                .map(|a| (a.to_string(), generate_password()))
                .collect(),
            postgres: generate_password(),
        }
    }

    /// The environment `nats-server` needs for `nats.conf`.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = Role::ALL
            .iter()
            .filter_map(|r| Some((role_env_var(*r), self.roles.get(r.as_str())?.clone())))
            .collect();
        env.push(("FERRY_OPERATOR_PASSWORD".to_string(), self.operator.clone()));
        env.extend(
            self.agents
                .iter()
                .map(|(a, p)| (agent_env_var(a), p.clone())),
        );
        env.push((POSTGRES_ENV.to_string(), self.postgres.clone()));
        env
    }

    /// Password of `role`'s user.
    pub fn role(&self, role: Role) -> &str {
        self.roles.get(role.as_str()).map_or("", String::as_str)
    }

    /// Password of `agent`, if it has a user.
    pub fn agent(&self, agent: &str) -> Option<&str> {
        self.agents.get(agent).map(String::as_str)
    }

    /// Loads secrets from an existing env file, without creating or
    /// completing it. `Ok(None)` when the file does not exist; an error when
    /// it is unreadable, invalid, or lacks the PostgreSQL password.
    pub fn load(path: &Path) -> Result<Option<Self>, StackError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StackError::Io {
                    what: format!("read {}", path.display()),
                    source,
                })
            }
        };
        let invalid = |reason: String| StackError::Secrets {
            path: path.to_path_buf(),
            reason,
        };
        match Self::parse(&text).map_err(invalid)? {
            (s, true) => Ok(Some(s)),
            (_, false) => Err(invalid(format!("{POSTGRES_ENV} is missing; run `ferry up` once to add it"))),
        }
    }

    /// Loads secrets from an env file written by [`Secrets::save`], or
    /// generates and saves new ones (mode 0600) when it does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, StackError> {
        let io = |what: String| move |source| StackError::Io { what, source };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let (s, complete) = Self::parse(&text).map_err(|reason| StackError::Secrets {
                    path: path.to_path_buf(),
                    reason,
                })?;
                if !complete {
                    // A file from an older Ferry: keep its passwords, add the new ones.
                    let tmp = path.with_extension("env.new");
                    let _ = std::fs::remove_file(&tmp);
                    s.save(&tmp).map_err(io(format!("write {}", tmp.display())))?;
                    std::fs::rename(&tmp, path).map_err(io(format!("replace {}", path.display())))?;
                }
                Ok(s)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let s = Self::generate();
                s.save(path)
                    .map_err(io(format!("write {}", path.display())))?;
                Ok(s)
            }
            Err(e) => Err(io(format!("read {}", path.display()))(e)),
        }
    }

    fn save(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        writeln!(f, "# Passwords of the users in nats.conf and of the local PostgreSQL, generated by `ferry up`.")?;
        for (k, v) in self.env() {
            writeln!(f, "{k}={v}")?;
        }
        f.sync_all()
    }

    /// Parses an env file; the flag says whether it held every password
    /// (those an older file lacks, PostgreSQL's and the worker roles', are
    /// generated; an older file's shared `FERRY_WORKERS_PASSWORD` is dropped).
    fn parse(text: &str) -> Result<(Self, bool), String> {
        let mut vars = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| format!("line {}: expected NAME=value", n + 1))?;
            vars.insert(k.trim().to_string(), v.trim().to_string());
        }
        let has_postgres = vars.contains_key(POSTGRES_ENV);
        // A file from before a role existed gains that role's password
        // and keeps the others.
        let present: Vec<bool> = Role::ALL.iter().map(|r| vars.contains_key(&role_env_var(*r))).collect();
        let has_roles = present.iter().all(|p| *p);
        let mut take = |k: &str| {
            let v = vars.remove(k).ok_or_else(|| format!("{k} is missing"))?;
            if is_safe_password(&v) {
                Ok(v)
            } else {
                Err(format!(
                    "{k} must be at least 16 letters and digits, starting with a letter (nats-server reads other values as numbers or booleans)"
                ))
            }
        };
        let roles = Role::ALL
            .iter()
            .zip(&present)
            .map(|(r, present)| {
                let p = if *present { take(&role_env_var(*r))? } else { generate_password() };
                Ok((r.as_str().to_string(), p))
            })
            .collect::<Result<_, String>>()?;
        let operator = take("FERRY_OPERATOR_PASSWORD")?;
        let agents = DEMO_AGENTS
            .iter()
            .map(|a| take(&agent_env_var(a)).map(|p| (a.to_string(), p)))
            .collect::<Result<_, _>>()?;
        let (postgres, complete) = if has_postgres {
            (take(POSTGRES_ENV)?, true)
        } else {
            (generate_password(), false)
        };
        let complete = complete && has_roles;
        Ok((
            Self {
                roles,
                operator,
                agents,
                postgres,
            },
            complete,
        ))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn save_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.env");
        let a = Secrets::load_or_create(&path).unwrap();
        let b = Secrets::load_or_create(&path).unwrap();
        assert_eq!(a, b);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(agent_env_var("desk-1"), "FERRY_AGENT_DESK_1_PASSWORD");
    }

    #[test]
    fn generated_passwords_survive_nats_config_parsing() {
        for _ in 0..2000 {
            assert!(is_safe_password(&generate_password()));
        }
        assert!(!is_safe_password("7abcdefghijklmnopq"));
        assert!(!is_safe_password("short"));
    }

    #[test]
    fn broken_file_names_the_missing_variable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.env");
        std::fs::write(&path, "FERRY_RULES_PASSWORD=abcdefghijklmnopqrst\n").unwrap();
        let err = Secrets::load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains("FERRY_OPERATOR_PASSWORD is missing"), "{err}");
    }

    #[test]
    fn an_older_file_gains_the_postgres_password_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.env");
        let old = Secrets::generate();
        let text: String = old
            .env()
            .into_iter()
            .filter(|(k, _)| k != POSTGRES_ENV && !k.starts_with("FERRY_ALERTS"))
            .map(|(k, v)| format!("{k}={v}\n"))
            .collect();
        std::fs::write(&path, text).unwrap();
        let a = Secrets::load_or_create(&path).unwrap();
        assert_eq!((&a.operator, &a.agents), (&old.operator, &old.agents));
        assert!(is_safe_password(&a.postgres));
        assert!(a.roles.values().all(|p| is_safe_password(p)) && a.roles.len() == Role::ALL.len());
        for role in ["rules", "inference", "archiver"] {
            assert_eq!(a.roles[role], old.roles[role], "{role}'s password is kept");
        }
        assert_eq!(Secrets::load_or_create(&path).unwrap(), a, "the added password is saved");
    }
}
