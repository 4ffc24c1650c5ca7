//! Turning events into prompts: chat replies and next-activity predictions (pure).

use ferry_schema::event::{ChatMessage, PredictRequest};

use super::config::InferenceSettings;
use crate::state::conversations::{self, Turn};
use crate::state::kb::Hit;

/// Longest article text put into a prompt, in characters: a small model's
/// context is short, and the first part of an article carries its answer.
const KB_EXCERPT_CHARS: usize = 600;

/// Who says a prompt message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaker {
    /// Instructions.
    System,
    /// The customer / the question.
    User,
    /// Earlier answers.
    Assistant,
}

/// One message of a prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptMessage {
    /// Who says it.
    pub speaker: Speaker,
    /// What is said.
    pub text: String,
}

fn msg(speaker: Speaker, text: impl Into<String>) -> PromptMessage {
    PromptMessage {
        speaker,
        text: text.into(),
    }
}

/// The prompt of a chat reply: the system prompt, then the message.
/// Conversation turns and knowledge-base articles join here once the
/// PostgreSQL state exists.
pub fn chat(settings: &InferenceSettings, chat: &ChatMessage, turns: &[Turn], kb: &[Hit]) -> Vec<PromptMessage> {
    let mut system = settings.system_prompt.clone();
    if !kb.is_empty() {
        system.push_str("\n\nKnowledge base (answer from it when it covers the question):");
        for (i, h) in kb.iter().enumerate() {
            let body: String = h.body.chars().take(KB_EXCERPT_CHARS).collect();
            system.push_str(&format!("\n[{}] {}: {}", i + 1, h.title, body.trim()));
        }
    }
    let mut out = vec![msg(Speaker::System, system)];
    out.extend(turns.iter().map(|t| match t.speaker {
        conversations::Speaker::Customer => msg(Speaker::User, t.text.clone()),
        conversations::Speaker::Agent => msg(Speaker::Assistant, t.text.clone()),
    }));
    out.push(msg(Speaker::User, chat.text.clone()));
    out
}

fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// The prompt of a prediction: recent activities, oldest first, one a line.
pub fn predict(settings: &InferenceSettings, req: &PredictRequest) -> Vec<PromptMessage> {
    let mut lines = String::from("Recent activity, oldest first:\n");
    for (i, a) in req.recent.iter().enumerate() {
        lines.push_str(&format!(
            "{}. {} {} \"{}\" for {}\n",
            i + 1,
            a.at.format("%H:%M"),
            a.app,
            a.title,
            duration(a.duration_ms)
        ));
    }
    lines.push_str("What will they do next?");
    vec![
        msg(Speaker::System, settings.predict_prompt.clone()),
        msg(Speaker::User, lines),
    ]
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use ferry_schema::event::{ChatType, MessageType, RecentActivity};

    fn settings() -> InferenceSettings {
        super::super::config::parse(
            "system_prompt = \"SYS\"\npredict_prompt = \"PRED\"\n[models.m]\npath = \"/m.gguf\"\n[[route]]\nmodel = \"m\"\nmax_tokens = 8\n",
            "t",
        )
        .unwrap()
    }

    #[test]
    fn chat_prompt() {
        let c = ChatMessage {
            chat: "Alice".into(),
            chat_type: ChatType::Direct,
            sender: "Alice".into(),
            text: "where is my order?".into(),
            msg_type: MessageType::Text,
        };
        assert_eq!(
            chat(&settings(), &c, &[], &[]),
            vec![msg(Speaker::System, "SYS"), msg(Speaker::User, "where is my order?")]
        );
        let at = "2026-11-22T10:00:00Z".parse().unwrap();
        let turns = [
            Turn { speaker: conversations::Speaker::Customer, text: "hi".into(), ts: at },
            Turn { speaker: conversations::Speaker::Agent, text: "hello!".into(), ts: at },
        ];
        let kb = [Hit {
            slug: "orders".into(),
            title: "Order status".into(),
            body: format!("  Track it on the site.{}", "x".repeat(700)),
            score: 3.0,
            coverage: 1.0,
        }];
        let p = chat(&settings(), &c, &turns, &kb);
        assert_eq!(p.len(), 4);
        assert_eq!(p[1..], [msg(Speaker::User, "hi"), msg(Speaker::Assistant, "hello!"), msg(Speaker::User, "where is my order?")]);
        let want = format!("SYS\n\nKnowledge base (answer from it when it covers the question):\n[1] Order status: Track it on the site.{}", "x".repeat(600 - 23));
        assert_eq!(p[0], msg(Speaker::System, want));
    }

    #[test]
    fn predict_prompt() {
        let at = |t: &str| format!("2026-11-22T{t}Z").parse().unwrap();
        let req = PredictRequest {
            recent: vec![
                RecentActivity { at: at("09:58:00"), app: "outlook.exe".into(), title: "Inbox".into(), duration_ms: 45_000 },
                RecentActivity { at: at("09:59:00"), app: "excel.exe".into(), title: "Q3.xlsx".into(), duration_ms: 330_000 },
                RecentActivity { at: at("10:05:00"), app: "chrome.exe".into(), title: "Orders".into(), duration_ms: 7_500_000 },
            ],
        };
        let p = predict(&settings(), &req);
        assert_eq!(p[0], msg(Speaker::System, "PRED"));
        assert_eq!(
            p[1].text,
            "Recent activity, oldest first:\n1. 09:58 outlook.exe \"Inbox\" for 45s\n2. 09:59 excel.exe \"Q3.xlsx\" for 5m30s\n3. 10:05 chrome.exe \"Orders\" for 2h05m\nWhat will they do next?"
        );
    }
}
