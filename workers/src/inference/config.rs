//! The inference role's configuration: [`InferenceConfig`] and its TOML file (models, routes with sampling, fallback templates, apology).
//!
//! ```toml
//! system_prompt = "You are a helpful customer-service assistant. Answer briefly."
//! concurrency = 4            # generations at once (also the pull size)
//! step_timeout_secs = 60     # per fallback step
//! apology = "Sorry, we cannot answer right now. A colleague will get back to you."
//!
//! [models.smollm2]           # an alias; routes name aliases
//! path = "~/.cache/ferry/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
//! format = "q8_0"            # optional: run a Q8_0 copy, made once beside it (weights.rs)
//! [models.big]               # GPU nodes with network: a Hugging Face repo
//! hf = "bartowski/Qwen2.5-7B-Instruct-GGUF"
//! files = ["Qwen2.5-7B-Instruct-Q4_K_M.gguf"]
//!
//! [groups]
//! vip = ["desk-2"]
//!
//! [[route]]                  # first match wins; a route with no agents/groups matches all
//! tasks = ["chat"]           # chat | predict
//! groups = ["vip"]
//! model = "big"
//! backup = "smollm2"
//! temperature = 0.3
//! top_p = 0.9
//! max_tokens = 96            # required: every route bounds its generation
//! logit_bias = { "2" = -100.0 }  # optional: token id -> bias
//!
//! [[template]]               # template answers for the fallback chain (after KB articles)
//! keywords = ["ship", "delivery"]
//! answer = "We ship within two working days."
//!
//! [context]                  # used when the worker has --database-url
//! turns = 6                  # last turns of the conversation in the prompt
//! kb_articles = 3            # knowledge-base articles in the prompt
//! kb_template_coverage = 0.6 # template step: answer with the top article when it
//!                            # holds this share of the message's terms
//! conversation_idle_mins = 30
//! ```

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_schema::codec::DEFAULT_MAX_PAYLOAD;
use ferry_schema::AgentId;
use serde::Deserialize;

use crate::groups::AgentGroups;

/// What an inference worker replica needs.
#[derive(Debug, Clone)]
pub struct InferenceConfig {
    /// The inference config file.
    pub config_path: PathBuf,
    /// Largest event payload decoded.
    pub max_payload: usize,
    /// In-progress ack interval while generating (capped at a third of the
    /// consumer's ack_wait).
    pub progress_every: Duration,
    /// How long shutdown waits for generations in flight.
    pub shutdown_grace: Duration,
    /// PostgreSQL for conversation context and the knowledge base; without
    /// it prompts hold the message only.
    pub db: Option<crate::state::DbConfig>,
    /// A groups file completing the config's `[groups]` (`--groups`).
    pub groups_path: Option<PathBuf>,
}

impl InferenceConfig {
    /// Defaults for a config file.
    pub fn new(config_path: impl Into<PathBuf>) -> Self {
        Self {
            config_path: config_path.into(),
            max_payload: DEFAULT_MAX_PAYLOAD,
            progress_every: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(120),
            db: None,
            groups_path: None,
        }
    }
}

/// What a model is asked to do; routes are chosen per task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Task {
    /// Answer a chat message.
    Chat,
    /// Predict the next activity.
    Predict,
}

/// Where a model's weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A local GGUF file.
    File(PathBuf),
    /// A Hugging Face repository and the GGUF files in it (needs network).
    Hub {
        /// `org/name`.
        repo: String,
        /// GGUF file names.
        files: Vec<String>,
    },
}

/// One model under an alias.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    /// The alias routes use.
    pub alias: String,
    /// Its weights.
    pub source: ModelSource,
    /// The format they run in (a local `path` only).
    pub format: super::weights::Format,
}

/// Sampling settings of a route; `max_tokens` is always set.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// Temperature (0 = greedy).
    pub temperature: f64,
    /// Nucleus sampling threshold.
    pub top_p: f64,
    /// Most tokens generated.
    pub max_tokens: usize,
    /// Added to the logits of these token ids (e.g. -100 to forbid one).
    pub logit_bias: Vec<(u32, f32)>,
}

/// Which model answers which agents for which task.
#[derive(Debug, Clone)]
pub struct Route {
    /// Name for logs (`route 2` when not given).
    pub name: String,
    /// Tasks it serves.
    pub tasks: Vec<Task>,
    /// Only these agents (empty: any).
    pub agents: HashSet<AgentId>,
    /// Only these groups (empty: any).
    pub groups: Vec<String>,
    /// Primary model alias.
    pub model: String,
    /// Backup model alias.
    pub backup: Option<String>,
    /// Sampling.
    pub sampling: Sampling,
}

/// A knowledge-base template answer used by the fallback chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KbTemplate {
    /// Lower-cased keywords; any one matches.
    pub keywords: Vec<String>,
    /// The answer.
    pub answer: String,
}

/// A validated inference config.
#[derive(Debug, Clone)]
pub struct InferenceSettings {
    /// System prompt of chat replies.
    pub system_prompt: String,
    /// System prompt of predictions.
    pub predict_prompt: String,
    /// Generations at once.
    pub concurrency: usize,
    /// Time limit of each model step of the fallback chain.
    pub step_timeout: Duration,
    /// Last step of the fallback chain.
    pub apology: String,
    /// Every model, in file order.
    pub models: Vec<ModelSpec>,
    /// Routes, first match wins.
    pub routes: Vec<Route>,
    /// Template answers.
    pub templates: Vec<KbTemplate>,
    /// Conversation context and knowledge base (with a database).
    pub context: ContextSettings,
    agent_groups: AgentGroups,
}

/// How much of PostgreSQL's state goes into a chat prompt.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContextSettings {
    /// Last turns of the conversation in the prompt.
    pub turns: usize,
    /// Knowledge-base articles in the prompt.
    pub kb_articles: usize,
    /// The template step answers with the top article when it holds at least
    /// this share (0 to 1) of the message's terms.
    pub kb_template_coverage: f64,
    /// Idle minutes after which a chat starts a new conversation (keep it
    /// equal to the archiver's `--conversation-idle-mins`).
    pub conversation_idle_mins: u64,
}

impl Default for ContextSettings {
    fn default() -> Self {
        Self {
            turns: 6,
            kb_articles: 3,
            kb_template_coverage: 0.6,
            conversation_idle_mins: 30,
        }
    }
}

impl ContextSettings {
    /// The idle time as a duration.
    pub fn conversation_idle(&self) -> Duration {
        Duration::from_secs(self.conversation_idle_mins.saturating_mul(60))
    }
}

impl InferenceSettings {
    /// The route for `task` from `agent`: the first that matches.
    pub fn route(&self, task: Task, agent: &AgentId) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| r.tasks.contains(&task) && self.agent_groups.admits(agent, &r.agents, &r.groups))
    }

    /// The template answer for `text`, if any keyword matches.
    pub fn template_for(&self, text: &str) -> Option<&KbTemplate> {
        let text = text.to_lowercase();
        self.templates
            .iter()
            .find(|t| t.keywords.iter().any(|k| text.contains(k)))
    }
}

/// Why an inference config was rejected; names the file and field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read inference config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML, or a field has the wrong name or type.
    #[error("inference config {origin}: {message}")]
    Syntax {
        /// The file.
        origin: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A value makes no sense.
    #[error("inference config {origin}: {what}: {message}")]
    Invalid {
        /// The file.
        origin: String,
        /// Which table and field.
        what: String,
        /// What is wrong and what was expected.
        message: String,
    },
    /// The groups file (`--groups`) is unusable.
    #[error(transparent)]
    GroupsFile(#[from] crate::groups::GroupsFileError),
}

fn default_system() -> String {
    "You are a helpful customer-service assistant for a shop. Answer the customer's last message briefly and politely.".into()
}
fn default_predict() -> String {
    "You watch a desk worker's recent computer activity and predict what they will do next. Answer with one short line: the application and the task.".into()
}
fn default_concurrency() -> usize {
    4
}
fn default_timeout() -> u64 {
    60
}
fn default_apology() -> String {
    "Sorry, we cannot answer right now. A colleague will get back to you shortly.".into()
}
fn default_temperature() -> f64 {
    0.7
}
fn default_top_p() -> f64 {
    0.9
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default = "default_system")]
    system_prompt: String,
    #[serde(default = "default_predict")]
    predict_prompt: String,
    #[serde(default = "default_concurrency")]
    concurrency: usize,
    #[serde(default = "default_timeout")]
    step_timeout_secs: u64,
    #[serde(default = "default_apology")]
    apology: String,
    #[serde(default)]
    models: BTreeMap<String, ModelEntry>,
    #[serde(default)]
    groups: BTreeMap<String, Vec<String>>,
    #[serde(default, rename = "route")]
    routes: Vec<RouteEntry>,
    #[serde(default, rename = "template")]
    templates: Vec<TemplateEntry>,
    #[serde(default)]
    context: ContextSettings,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelEntry {
    path: Option<String>,
    hf: Option<String>,
    #[serde(default)]
    files: Vec<String>,
    format: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteEntry {
    name: Option<String>,
    #[serde(default)]
    tasks: Vec<String>,
    #[serde(default)]
    agents: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
    model: String,
    backup: Option<String>,
    #[serde(default = "default_temperature")]
    temperature: f64,
    #[serde(default = "default_top_p")]
    top_p: f64,
    max_tokens: usize,
    #[serde(default)]
    logit_bias: BTreeMap<String, f32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateEntry {
    keywords: Vec<String>,
    answer: String,
}

/// Expands a leading `~/` to `$HOME`.
pub fn expand_home(p: &str) -> PathBuf {
    match (p.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => Path::new(&home).join(rest),
        _ => PathBuf::from(p),
    }
}

/// Reads and validates an inference config file.
pub fn load(path: &Path) -> Result<InferenceSettings, ConfigError> {
    load_with_groups(path, None)
}

/// Reads and validates an inference config file, its `[groups]` completed
/// by the groups file `groups` (`--groups`, from `ferry agent add --group`).
pub fn load_with_groups(path: &Path, groups: Option<&Path>) -> Result<InferenceSettings, ConfigError> {
    let extra = match groups {
        Some(g) => crate::groups::load_file(g)?,
        None => BTreeMap::new(),
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_with_groups(&text, &path.display().to_string(), &extra)
}

/// Parses and validates an inference config; `origin` names it in errors.
pub fn parse(text: &str, origin: &str) -> Result<InferenceSettings, ConfigError> {
    parse_with_groups(text, origin, &BTreeMap::new())
}

/// [`parse`], with `extra` groups added to the file's `[groups]`.
pub fn parse_with_groups(
    text: &str,
    origin: &str,
    extra: &BTreeMap<String, Vec<String>>,
) -> Result<InferenceSettings, ConfigError> {
    let mut file: File = toml::from_str(text).map_err(|e| ConfigError::Syntax {
        origin: origin.to_string(),
        message: e.to_string().trim_end().to_string(),
    })?;
    crate::groups::merge(&mut file.groups, extra);
    let invalid = |what: String, message: String| ConfigError::Invalid {
        origin: origin.to_string(),
        what,
        message,
    };
    if file.concurrency == 0 {
        return Err(invalid("concurrency".into(), "must be at least 1".into()));
    }
    if file.step_timeout_secs == 0 {
        return Err(invalid("step_timeout_secs".into(), "must be at least 1".into()));
    }
    let mut models = Vec::new();
    for (alias, m) in &file.models {
        let what = format!("[models.{alias}]");
        let source = match (&m.path, &m.hf) {
            (Some(p), None) if m.files.is_empty() => ModelSource::File(expand_home(p)),
            (None, Some(repo)) if !m.files.is_empty() => ModelSource::Hub {
                repo: repo.clone(),
                files: m.files.clone(),
            },
            (None, Some(_)) => return Err(invalid(what, "`hf` needs `files` (the GGUF file names in the repository)".into())),
            _ => return Err(invalid(what, "give either `path` (a local GGUF file) or `hf` with `files`".into())),
        };
        let format = match m.format.as_deref() {
            None => super::weights::Format::AsIs,
            Some(name) => super::weights::Format::parse(name).ok_or_else(|| {
                invalid(format!("{what} format"), format!("{name:?} is not a format; expected one of {}", super::weights::Format::NAMES))
            })?,
        };
        if format != super::weights::Format::AsIs && matches!(source, ModelSource::Hub { .. }) {
            return Err(invalid(format!("{what} format"), "applies to a local `path` only".into()));
        }
        models.push(ModelSpec {
            alias: alias.clone(),
            source,
            format,
        });
    }
    let agent_groups = AgentGroups::parse(&file.groups)
        .map_err(|e| invalid(format!("[groups] {:?}", e.group), e.source.to_string()))?;
    let mut routes = Vec::new();
    for (i, r) in file.routes.into_iter().enumerate() {
        let name = r.name.clone().unwrap_or_else(|| format!("route {}", i + 1));
        let what = |field: &str| format!("[[route]] {} ({name:?}): field `{field}`", i + 1);
        let tasks = if r.tasks.is_empty() {
            vec![Task::Chat, Task::Predict]
        } else {
            r.tasks
                .iter()
                .map(|t| match t.as_str() {
                    "chat" => Ok(Task::Chat),
                    "predict" => Ok(Task::Predict),
                    other => Err(invalid(what("tasks"), format!("{other:?} is not a task; expected \"chat\" or \"predict\""))),
                })
                .collect::<Result<_, _>>()?
        };
        for (field, alias) in [("model", Some(&r.model)), ("backup", r.backup.as_ref())] {
            if let Some(alias) = alias {
                if !file.models.contains_key(alias) {
                    return Err(invalid(
                        what(field),
                        format!("model {alias:?} is not defined in [models] (defined: {})", file.models.keys().cloned().collect::<Vec<_>>().join(", ")),
                    ));
                }
            }
        }
        for g in &r.groups {
            if !file.groups.contains_key(g) {
                return Err(invalid(what("groups"), format!("group {g:?} is not defined in [groups]")));
            }
        }
        let agents = r
            .agents
            .iter()
            .map(|a| AgentId::new(a.as_str()).map_err(|e| invalid(what("agents"), e.to_string())))
            .collect::<Result<_, _>>()?;
        if r.max_tokens == 0 {
            return Err(invalid(what("max_tokens"), "must be at least 1".into()));
        }
        if !(0.0..=2.0).contains(&r.temperature) {
            return Err(invalid(what("temperature"), format!("{} is outside 0.0..=2.0", r.temperature)));
        }
        if !(r.top_p > 0.0 && r.top_p <= 1.0) {
            return Err(invalid(what("top_p"), format!("{} is outside (0.0, 1.0]", r.top_p)));
        }
        let logit_bias = r
            .logit_bias
            .iter()
            .map(|(k, v)| {
                k.parse::<u32>()
                    .map(|id| (id, *v))
                    .map_err(|_| invalid(what("logit_bias"), format!("key {k:?} is not a token id (a whole number)")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        routes.push(Route {
            name,
            tasks,
            agents,
            groups: r.groups,
            model: r.model,
            backup: r.backup,
            sampling: Sampling {
                temperature: r.temperature,
                top_p: r.top_p,
                max_tokens: r.max_tokens,
                logit_bias,
            },
        });
    }
    let templates = file
        .templates
        .into_iter()
        .map(|t| KbTemplate {
            keywords: t.keywords.iter().map(|k| k.to_lowercase()).collect(),
            answer: t.answer,
        })
        .collect();
    if !(0.0..=1.0).contains(&file.context.kb_template_coverage) {
        return Err(invalid(
            "[context] kb_template_coverage".into(),
            format!("{} is outside 0.0..=1.0", file.context.kb_template_coverage),
        ));
    }
    Ok(InferenceSettings {
        system_prompt: file.system_prompt,
        predict_prompt: file.predict_prompt,
        concurrency: file.concurrency,
        step_timeout: Duration::from_secs(file.step_timeout_secs),
        apology: file.apology,
        models,
        routes,
        templates,
        context: file.context,
        agent_groups,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const BASE: &str = "[models.m]\npath = \"/m.gguf\"\n";

    #[track_caller]
    fn check_err(text: &str, expect: &str) {
        let err = parse(text, "inference.toml").unwrap_err().to_string();
        assert!(err.contains(expect), "{err:?} does not contain {expect:?}");
    }

    #[test]
    fn errors_name_the_field() {
        check_err(
            "[models.m]\npath = \"/m.gguf\"\nformat = \"q5\"\n[[route]]\nmodel = \"m\"\nmax_tokens = 8\n",
            "inference.toml: [models.m] format: \"q5\" is not a format; expected one of \"as-is\", \"q8_0\", \"q4_0\"",
        );
        check_err(
            "[models.m]\nhf = \"o/m\"\nfiles = [\"m.gguf\"]\nformat = \"q8_0\"\n[[route]]\nmodel = \"m\"\nmax_tokens = 8\n",
            "applies to a local `path` only",
        );
        check_err(&format!("{BASE}[[route]]\nmodel = \"m\"\n"), "missing field `max_tokens`");
        check_err(&format!("{BASE}[[route]]\nmodel = \"x\"\nmax_tokens = 8\n"), "inference.toml: [[route]] 1 (\"route 1\"): field `model`: model \"x\" is not defined in [models] (defined: m)");
        check_err(&format!("{BASE}[[route]]\nmodel = \"m\"\nbackup = \"y\"\nmax_tokens = 8\n"), "field `backup`: model \"y\" is not defined");
        check_err(&format!("{BASE}[[route]]\nmodel = \"m\"\nmax_tokens = 0\n"), "field `max_tokens`: must be at least 1");
        check_err(&format!("{BASE}[[route]]\nmodel = \"m\"\nmax_tokens = 8\ntemperature = 3.0\n"), "field `temperature`: 3 is outside 0.0..=2.0");
        check_err(&format!("{BASE}[[route]]\nmodel = \"m\"\nmax_tokens = 8\ntasks = [\"dance\"]\n"), "\"dance\" is not a task");
        check_err(&format!("{BASE}[[route]]\nmodel = \"m\"\nmax_tokens = 8\ngroups = [\"vip\"]\n"), "group \"vip\" is not defined in [groups]");
        check_err("[models.m]\n", "[models.m]: give either `path` (a local GGUF file) or `hf` with `files`");
        check_err("[models.m]\nhf = \"org/x\"\n", "`hf` needs `files`");
        check_err(&format!("concurrency = 0\n{BASE}"), "concurrency: must be at least 1");
        check_err(&format!("{BASE}[[route]]\nmodel = \"m\"\nmax_tokens = 8\nmax_tokenz = 8\n"), "unknown field `max_tokenz`");
        check_err(&format!("{BASE}[[route]]\nmodel = \"m\"\nmax_tokens = 8\nlogit_bias = {{ \"eos\" = -100.0 }}\n"), "field `logit_bias`: key \"eos\" is not a token id");
    }

    #[test]
    fn routes_first_match_and_home_expansion() {
        let s = parse(
            "[models.a]\npath = \"~/m.gguf\"\n[models.b]\nhf = \"org/b\"\nfiles = [\"b.gguf\"]\n[groups]\nvip = [\"desk-2\"]\n[[route]]\ngroups = [\"vip\"]\nmodel = \"b\"\nmax_tokens = 8\n[[route]]\ntasks = [\"chat\"]\nmodel = \"a\"\nmax_tokens = 16\n",
            "t",
        )
        .unwrap();
        let d1 = AgentId::new("desk-1").unwrap();
        let d2 = AgentId::new("desk-2").unwrap();
        assert_eq!(s.route(Task::Chat, &d2).unwrap().model, "b");
        assert_eq!(s.route(Task::Chat, &d1).unwrap().model, "a");
        assert_eq!(s.route(Task::Chat, &d1).unwrap().sampling.max_tokens, 16);
        assert!(s.route(Task::Predict, &d1).is_none());
        assert_eq!(s.route(Task::Predict, &d2).unwrap().model, "b");
        if let Some(home) = std::env::var_os("HOME") {
            assert_eq!(s.models[0].source, ModelSource::File(Path::new(&home).join("m.gguf")));
        }
    }
}
