//! Matching events against rules and rendering templates; pure logic, no I/O.

use std::collections::HashSet;

use ferry_schema::event::{Activity, ChatMessage};
use ferry_schema::{AgentId, Envelope, EventBody, EventKind};

use crate::groups::AgentGroups;

/// A compiled rule.
#[derive(Debug)]
pub struct Rule {
    /// Unique name; recorded in replies as who answered.
    pub name: String,
    /// Kinds the rule applies to.
    pub kinds: Vec<EventKind>,
    /// Only these agents (empty: any).
    pub agents: HashSet<AgentId>,
    /// Only agents in these groups (empty: any).
    pub groups: Vec<String>,
    /// Any of these, lower-cased (empty: no keyword condition).
    pub keywords: Vec<String>,
    /// Must match too, when set.
    pub regex: Option<regex::Regex>,
    /// The chat's customer must carry one of these tags (empty: any
    /// customer). Tags come from PostgreSQL (`customers.tags`).
    pub customer_tags: Vec<String>,
    /// What to do on a match.
    pub action: Action,
    /// Confidence recorded in the reply.
    pub confidence: f32,
}

/// What a rule does.
#[derive(Debug)]
pub enum Action {
    /// Reply with the rendered template.
    Reply(Template),
    /// Escalate to a person, with the rendered template as the reason.
    Escalate(Option<Template>),
    /// Answer "ignore".
    Ignore,
    /// Hand the chat to the inference worker.
    Infer,
    /// Raise an alert about an activity.
    Alert(Template),
}

/// What happens to a chat no rule matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnmatchedChat {
    /// Hand it to inference.
    Infer,
    /// Answer "ignore".
    Ignore,
    /// Escalate it to a person.
    Escalate,
}

/// Name recorded as the responder when no rule matched.
pub const DEFAULT_RULE: &str = "default";

/// A compiled rules file.
#[derive(Debug)]
pub struct RuleSet {
    rules: Vec<Rule>,
    agent_groups: AgentGroups,
    unmatched_chat: UnmatchedChat,
}

/// The rules' verdict on one event.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Send this text to the chat.
    Reply {
        /// Rule name.
        rule: String,
        /// Rendered text.
        text: String,
        /// Rule confidence.
        confidence: f32,
    },
    /// Hand to a person.
    Escalate {
        /// Rule name.
        rule: String,
        /// Rendered reason, if the rule has a template.
        reason: Option<String>,
        /// Rule confidence.
        confidence: f32,
    },
    /// Answer "ignore".
    Ignore {
        /// Rule name.
        rule: String,
    },
    /// Hand to inference.
    Infer {
        /// Rule name.
        rule: String,
    },
    /// Raise an alert.
    Alert {
        /// Rule name.
        rule: String,
        /// Rendered message.
        message: String,
    },
    /// Nothing to do (an activity no rule matched, or a kind rules skip).
    Nothing,
}

impl RuleSet {
    /// Builds a rule set from compiled parts (see [`super::config`]).
    pub fn new(
        rules: Vec<Rule>,
        agent_groups: AgentGroups,
        unmatched_chat: UnmatchedChat,
    ) -> Self {
        Self {
            rules,
            agent_groups,
            unmatched_chat,
        }
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// True when there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether some rule matches on customer tags, so the handler must look
    /// the chat's customer up before deciding.
    pub fn needs_customers(&self) -> bool {
        self.rules.iter().any(|r| !r.customer_tags.is_empty())
    }

    /// Decides what to do with `env`, whose customer (for chats) carries
    /// `customer_tags`: the first matching rule wins.
    pub fn decide(&self, env: &Envelope, customer_tags: &[String]) -> Decision {
        let haystack = match &env.body {
            EventBody::Chat(c) => c.text.to_lowercase(),
            EventBody::Activity(a) => activity_haystack(a),
            EventBody::Heartbeat(_) | EventBody::Predict(_) | EventBody::Interaction(_) => return Decision::Nothing,
        };
        let kind = env.kind();
        let matched = self.rules.iter().find(|r| {
            r.kinds.contains(&kind)
                && self.agent_groups.admits(&env.agent, &r.agents, &r.groups)
                && (r.keywords.is_empty() || r.keywords.iter().any(|k| haystack.contains(k)))
                && r.regex.as_ref().is_none_or(|re| re.is_match(original_text(&env.body)))
                && (r.customer_tags.is_empty() || r.customer_tags.iter().any(|t| customer_tags.contains(t)))
        });
        let Some(rule) = matched else {
            return match (&env.body, self.unmatched_chat) {
                (EventBody::Chat(_), UnmatchedChat::Infer) => Decision::Infer {
                    rule: DEFAULT_RULE.into(),
                },
                (EventBody::Chat(_), UnmatchedChat::Ignore) => Decision::Ignore {
                    rule: DEFAULT_RULE.into(),
                },
                (EventBody::Chat(_), UnmatchedChat::Escalate) => Decision::Escalate {
                    rule: DEFAULT_RULE.into(),
                    reason: None,
                    confidence: 0.0,
                },
                _ => Decision::Nothing,
            };
        };
        let name = rule.name.clone();
        let render = |t: &Template| t.render(env, &rule.name);
        match &rule.action {
            Action::Reply(t) => Decision::Reply {
                rule: name,
                text: render(t),
                confidence: rule.confidence,
            },
            Action::Escalate(t) => Decision::Escalate {
                rule: name,
                reason: t.as_ref().map(render),
                confidence: rule.confidence,
            },
            // Ignoring an activity means sending nothing at all.
            Action::Ignore if kind == EventKind::Activity => Decision::Nothing,
            Action::Ignore => Decision::Ignore { rule: name },
            Action::Infer => Decision::Infer { rule: name },
            Action::Alert(t) => Decision::Alert {
                rule: name,
                message: render(t),
            },
        }
    }
}

fn activity_haystack(a: &Activity) -> String {
    let mut s = format!("{}\n{}", a.app, a.title);
    if let Some(site) = &a.site {
        s.push('\n');
        s.push_str(site);
    }
    s.to_lowercase()
}

/// The text a regex is matched against (original case, so the rule's own
/// flags decide case sensitivity).
fn original_text(body: &EventBody) -> &str {
    match body {
        EventBody::Chat(ChatMessage { text, .. }) => text,
        EventBody::Activity(Activity { title, .. }) => title,
        _ => "",
    }
}

/// A reply template with `{placeholder}`s; `{{` and `}}` are literal braces.
#[derive(Debug, Clone, PartialEq)]
pub struct Template(Vec<Piece>);

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Lit(String),
    Var(Var),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Var {
    Agent,
    Rule,
    Sender,
    Chat,
    Text,
    App,
    Title,
    Site,
}

impl Var {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "agent" => Self::Agent,
            "rule" => Self::Rule,
            "sender" => Self::Sender,
            "chat" => Self::Chat,
            "text" => Self::Text,
            "app" => Self::App,
            "title" => Self::Title,
            "site" => Self::Site,
            _ => return None,
        })
    }

    fn kind(self) -> Option<EventKind> {
        match self {
            Self::Agent | Self::Rule => None,
            Self::Sender | Self::Chat | Self::Text => Some(EventKind::Chat),
            Self::App | Self::Title | Self::Site => Some(EventKind::Activity),
        }
    }
}

impl Template {
    /// Parses `text`, checking every placeholder exists for all of `kinds`.
    pub fn parse(text: &str, kinds: &[EventKind]) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let name: String = chars.by_ref().take_while(|&c| c != '}').collect();
                    let var = Var::parse(&name).ok_or_else(|| {
                        format!("unknown placeholder {{{name}}}; expected one of {{agent}}, {{rule}}, {{sender}}, {{chat}}, {{text}} (chat), {{app}}, {{title}}, {{site}} (activity)")
                    })?;
                    if let Some(k) = var.kind() {
                        if let Some(other) = kinds.iter().find(|&&kind| kind != k) {
                            return Err(format!(
                                "placeholder {{{name}}} exists only for {k} events, but the rule also applies to {other} events"
                            ));
                        }
                    }
                    if !lit.is_empty() {
                        pieces.push(Piece::Lit(std::mem::take(&mut lit)));
                    }
                    pieces.push(Piece::Var(var));
                }
                '}' => return Err("unmatched '}'; write '}}' for a literal brace".into()),
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            pieces.push(Piece::Lit(lit));
        }
        Ok(Self(pieces))
    }

    /// Renders the template for `env`, answered by `rule`.
    pub fn render(&self, env: &Envelope, rule: &str) -> String {
        let mut out = String::new();
        for p in &self.0 {
            match p {
                Piece::Lit(s) => out.push_str(s),
                Piece::Var(v) => out.push_str(match (v, &env.body) {
                    (Var::Agent, _) => env.agent.as_str(),
                    (Var::Rule, _) => rule,
                    (Var::Sender, EventBody::Chat(c)) => &c.sender,
                    (Var::Chat, EventBody::Chat(c)) => &c.chat,
                    (Var::Text, EventBody::Chat(c)) => &c.text,
                    (Var::App, EventBody::Activity(a)) => &a.app,
                    (Var::Title, EventBody::Activity(a)) => &a.title,
                    (Var::Site, EventBody::Activity(a)) => a.site.as_deref().unwrap_or(""),
                    _ => "",
                }),
            }
        }
        out
    }
}
