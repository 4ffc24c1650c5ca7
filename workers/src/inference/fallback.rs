//! The fallback chain: primary model, backup model, knowledge-base template, apology.
//!
//! A model error or timeout moves to the next step; every answer records the
//! step that gave it. The chain always ends with an answer.

use ferry_schema::reply::{AnsweredBy, ResponderKind};

use super::config::{InferenceSettings, Route};
use super::engine::{Generate, Generation};
use super::prompt::PromptMessage;
use crate::state::kb::Hit;

/// The chain's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// What to send.
    pub text: String,
    /// Which step answered.
    pub by: AnsweredBy,
    /// Tokens generated (model steps only).
    pub tokens: Option<u32>,
    /// The model's generation (model steps only), for its timings.
    pub generation: Option<Generation>,
    /// Confidence, 0 to 1.
    pub confidence: f32,
    /// Why earlier steps were passed over, in order.
    pub skipped: Vec<String>,
}

/// Runs the model steps of `route` (primary, then backup) and returns the
/// first generation, or the reasons every step failed.
pub async fn models<G: Generate>(
    g: &G,
    settings: &InferenceSettings,
    route: Option<&Route>,
    prompt: &[PromptMessage],
) -> Result<(String, Generation), Vec<String>> {
    let mut skipped = Vec::new();
    let Some(route) = route else {
        skipped.push("no route matches".to_string());
        return Err(skipped);
    };
    for alias in std::iter::once(&route.model).chain(route.backup.as_ref()) {
        match g.generate(alias, prompt, &route.sampling, settings.step_timeout).await {
            Ok(gen) => return Ok((alias.clone(), gen)),
            Err(e) => {
                tracing::warn!(route = %route.name, alias = %alias, error = %e, "model step failed; falling back");
                skipped.push(e.to_string());
            }
        }
    }
    Err(skipped)
}

/// Answers a chat message through the whole chain.
pub async fn chat<G: Generate>(
    g: &G,
    settings: &InferenceSettings,
    route: Option<&Route>,
    prompt: &[PromptMessage],
    message: &str,
    kb: &[Hit],
) -> Answer {
    let skipped = match models(g, settings, route, prompt).await {
        Ok((alias, gen)) => {
            return Answer {
                by: AnsweredBy {
                    kind: ResponderKind::Model,
                    name: alias,
                },
                text: gen.text.clone(),
                tokens: Some(gen.tokens),
                confidence: gen.confidence,
                generation: Some(gen),
                skipped: Vec::new(),
            }
        }
        Err(skipped) => skipped,
    };
    if let Some(h) = kb.first().filter(|h| h.coverage >= settings.context.kb_template_coverage) {
        return Answer {
            text: h.body.clone(),
            by: AnsweredBy {
                kind: ResponderKind::KbTemplate,
                name: h.slug.clone(),
            },
            tokens: None,
            generation: None,
            confidence: h.coverage as f32,
            skipped,
        };
    }
    if let Some(t) = settings.template_for(message) {
        return Answer {
            text: t.answer.clone(),
            by: AnsweredBy {
                kind: ResponderKind::KbTemplate,
                name: t.keywords.first().cloned().unwrap_or_default(),
            },
            tokens: None,
            generation: None,
            confidence: 0.5,
            skipped,
        };
    }
    Answer {
        text: settings.apology.clone(),
        by: AnsweredBy {
            kind: ResponderKind::Apology,
            name: "apology".into(),
        },
        tokens: None,
        generation: None,
        confidence: 0.0,
        skipped,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    //! The chain's own logic, with a scripted stand-in for the models (the
    //! real engine is exercised by the integration tests).
    use std::collections::HashMap;
    use std::time::Duration;

    use super::*;
    use crate::inference::config::{parse, Sampling};
    use crate::inference::engine::GenerateError;
    use ferry_schema::AgentId;

    /// Alias -> scripted result.
    struct Script(HashMap<&'static str, Result<&'static str, GenerateError>>);

    impl Generate for Script {
        async fn generate(
            &self,
            alias: &str,
            _: &[PromptMessage],
            _: &Sampling,
            _: Duration,
        ) -> Result<Generation, GenerateError> {
            match self.0.get(alias) {
                Some(Ok(text)) => Ok(Generation {
                    text: text.to_string(),
                    tokens: 3,
                    confidence: 0.8,
                    elapsed: Duration::from_millis(50),
                    prompt_tokens: 20,
                    prompt_time: Duration::from_millis(10),
                    generation_time: Duration::from_millis(30),
                    format: "Q8_0".into(),
                }),
                Some(Err(e)) => Err(e.clone()),
                None => Err(GenerateError::Unknown { alias: alias.into() }),
            }
        }
    }

    const CONFIG: &str = r#"
apology = "sorry"
[models.a]
path = "/a.gguf"
[models.b]
path = "/b.gguf"
[[route]]
model = "a"
backup = "b"
max_tokens = 8
[[template]]
keywords = ["ship"]
answer = "two days"
"#;

    fn broken(alias: &str) -> Result<&'static str, GenerateError> {
        Err(GenerateError::Broken { alias: alias.into(), reason: "gone".into() })
    }

    #[track_caller]
    fn check(script: Vec<(&'static str, Result<&'static str, GenerateError>)>, message: &str, kind: ResponderKind, name: &str, text: &str) {
        check_kb(script, message, &[], kind, name, text)
    }

    #[track_caller]
    fn check_kb(script: Vec<(&'static str, Result<&'static str, GenerateError>)>, message: &str, kb: &[Hit], kind: ResponderKind, name: &str, text: &str) {
        let settings = parse(CONFIG, "t").unwrap();
        let route = settings.route(crate::inference::config::Task::Chat, &AgentId::new("desk-1").unwrap());
        let g = Script(script.into_iter().collect());
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let a = rt.block_on(chat(&g, &settings, route, &[], message, kb));
        assert_eq!((a.by.kind, a.by.name.as_str(), a.text.as_str()), (kind, name, text));
    }

    #[test]
    fn each_step_in_order() {
        check(vec![("a", Ok("from a")), ("b", Ok("from b"))], "hi", ResponderKind::Model, "a", "from a");
        check(vec![("a", broken("a")), ("b", Ok("from b"))], "hi", ResponderKind::Model, "b", "from b");
        let timeout = Err(GenerateError::Timeout { alias: "a".into(), after: Duration::from_secs(1) });
        check(vec![("a", timeout), ("b", Ok("from b"))], "hi", ResponderKind::Model, "b", "from b");
        check(vec![("a", broken("a")), ("b", broken("b"))], "do you SHIP to Paris?", ResponderKind::KbTemplate, "ship", "two days");
        check(vec![("a", broken("a")), ("b", broken("b"))], "hello", ResponderKind::Apology, "apology", "sorry");
    }

    /// A model's answer carries where its time went; a template's carries none.
    #[test]
    fn a_model_answer_carries_its_timings_and_a_template_none() {
        let settings = parse(CONFIG, "t").unwrap();
        let route = settings.route(crate::inference::config::Task::Chat, &AgentId::new("desk-1").unwrap());
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let g = Script([("a", Ok("from a"))].into_iter().collect());
        let a = rt.block_on(chat(&g, &settings, route, &[], "hi", &[]));
        let t = a.generation.unwrap().timings(4.5);
        assert_eq!((t.queue_ms, t.wait_ms, t.prompt_ms, t.generation_ms), (4.5, 10.0, 10.0, 30.0), "the wait is what prompt and generation leave");
        assert_eq!((t.prompt_tokens, t.generated_tokens, t.engine.as_str(), t.format.as_str()), (20, 3, "mistral.rs", "Q8_0"));
        let g = Script([("a", broken("a")), ("b", broken("b"))].into_iter().collect());
        assert!(rt.block_on(chat(&g, &settings, route, &[], "do you ship?", &[])).generation.is_none());
    }

    #[test]
    fn knowledge_base_article_before_config_templates() {
        let hit = |coverage: f64| Hit { slug: "shipping".into(), title: "Shipping".into(), body: "We ship in 48 hours.".into(), score: 2.0, coverage };
        let down = || vec![("a", broken("a")), ("b", broken("b"))];
        // Covers enough of the message (default 0.6): the article answers.
        check_kb(down(), "do you ship?", &[hit(0.75)], ResponderKind::KbTemplate, "shipping", "We ship in 48 hours.");
        // Too weak a match: the config's keyword template, then the apology.
        check_kb(down(), "do you ship?", &[hit(0.3)], ResponderKind::KbTemplate, "ship", "two days");
        check_kb(down(), "hello", &[hit(0.3)], ResponderKind::Apology, "apology", "sorry");
        // A working model still comes first.
        check_kb(vec![("a", Ok("from a"))], "do you ship?", &[hit(1.0)], ResponderKind::Model, "a", "from a");
    }
}
