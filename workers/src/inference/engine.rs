//! The models: loaded once per alias on mistral.rs, generating concurrently.
//!
//! Each alias gets its own mistral.rs engine, so requests to one alias are
//! batched by that engine's scheduler. Aliases are loaded separately (not
//! with one multi-model builder) so that a model that fails to load is
//! marked broken and the fallback chain moves past it, instead of taking
//! every other model down with it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mistralrs::{
    CustomLogitsProcessor, GgufModelBuilder, Model, RequestBuilder, Tensor, TextMessageRole,
    TokenSource,
};
use tokio::sync::Semaphore;

use super::config::{ModelSource, ModelSpec, Sampling};
use super::prompt::{PromptMessage, Speaker};

/// The engine's name in a reply's timings.
pub const ENGINE: &str = "mistral.rs";

/// The threads the engine's kernels use, as the engine itself reads them
/// (`ferry-worker inference --threads`; one per core unless set).
pub fn threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// What a model produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The text, trimmed.
    pub text: String,
    /// Tokens generated.
    pub tokens: u32,
    /// exp(mean log-probability) of the generated tokens, 0 to 1.
    pub confidence: f32,
    /// Time from asking to the answer: waiting, prompt and generation.
    pub elapsed: Duration,
    /// Tokens in the prompt (after the chat template).
    pub prompt_tokens: u32,
    /// Reading the prompt.
    pub prompt_time: Duration,
    /// Generating the tokens.
    pub generation_time: Duration,
    /// The weights' format as run (`Q8_0`, or `as-is`).
    pub format: String,
}

impl Generation {
    /// Its timings for a reply, the request having waited `queue_ms` in its
    /// stream; the wait for a model slot is what the prompt and the
    /// generation leave of the time asked.
    pub fn timings(&self, queue_ms: f64) -> ferry_schema::reply::Timings {
        let wait = self.elapsed.saturating_sub(self.prompt_time + self.generation_time);
        ferry_schema::reply::Timings {
            queue_ms,
            wait_ms: crate::runtime::publish::ms(wait),
            prompt_tokens: self.prompt_tokens,
            prompt_ms: crate::runtime::publish::ms(self.prompt_time),
            generated_tokens: self.tokens,
            generation_ms: crate::runtime::publish::ms(self.generation_time),
            engine: ENGINE.into(),
            format: self.format.clone(),
        }
    }
}

/// Why a model step produced nothing usable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GenerateError {
    /// The alias is not in the config.
    #[error("model {alias:?} is not configured")]
    Unknown {
        /// The alias.
        alias: String,
    },
    /// The model failed to load at start.
    #[error("model {alias:?} did not load: {reason}")]
    Broken {
        /// The alias.
        alias: String,
        /// Why.
        reason: String,
    },
    /// The step took longer than its limit.
    #[error("model {alias:?} timed out after {after:?}")]
    Timeout {
        /// The alias.
        alias: String,
        /// The limit.
        after: Duration,
    },
    /// mistral.rs returned an error.
    #[error("model {alias:?} failed: {message}")]
    Failed {
        /// The alias.
        alias: String,
        /// Its error.
        message: String,
    },
    /// The answer was empty.
    #[error("model {alias:?} returned no text")]
    Empty {
        /// The alias.
        alias: String,
    },
}

/// Something that generates text for a prompt; the engine, or a stand-in in
/// the fallback chain's unit tests.
pub trait Generate: Send + Sync {
    /// Generates with model `alias`, within `timeout`.
    fn generate(
        &self,
        alias: &str,
        prompt: &[PromptMessage],
        sampling: &Sampling,
        timeout: Duration,
    ) -> impl std::future::Future<Output = Result<Generation, GenerateError>> + Send;
}

enum Slot {
    /// Loaded, with the format its weights run in.
    Ready(Model, String),
    Broken(String),
}

/// Every configured model, loaded or marked broken.
pub struct Engine {
    slots: HashMap<String, Slot>,
    permits: Arc<Semaphore>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("models", &self.status()).finish()
    }
}

async fn load_one(spec: &ModelSpec, max_seqs: usize) -> Result<Model, String> {
    let builder = match &spec.source {
        ModelSource::File(path) => {
            if !path.is_file() {
                return Err(format!("model file {} does not exist", path.display()));
            }
            let (src, format) = (path.clone(), spec.format);
            let path = &tokio::task::spawn_blocking(move || super::weights::prepared(&src, format))
                .await
                .map_err(|e| format!("preparing the weights: {e}"))?
                .map_err(|e| e.to_string())?;
            let (Some(dir), Some(file)) = (path.parent(), path.file_name()) else {
                return Err(format!("model path {} has no file name", path.display()));
            };
            GgufModelBuilder::new(dir.to_string_lossy(), vec![file.to_string_lossy()])
                .with_token_source(TokenSource::None)
        }
        ModelSource::Hub { repo, files } => GgufModelBuilder::new(repo, files.clone()),
    };
    builder
        .with_max_num_seqs(max_seqs)
        .build()
        .await
        .map_err(|e| format!("{e:#}"))
}

impl Engine {
    /// Loads every model (one after another, to bound memory at start);
    /// `concurrency` generations run at once across all of them.
    pub async fn load(specs: &[ModelSpec], concurrency: usize) -> Self {
        let mut slots = HashMap::new();
        for spec in specs {
            let started = Instant::now();
            let slot = match load_one(spec, concurrency.max(1)).await {
                Ok(m) => {
                    tracing::info!(alias = %spec.alias, source = ?spec.source, secs = started.elapsed().as_secs_f32(), "model loaded");
                    Slot::Ready(m, spec.format.label().to_string())
                }
                Err(reason) => {
                    tracing::error!(alias = %spec.alias, source = ?spec.source, %reason, "model failed to load; the fallback chain will skip it");
                    Slot::Broken(reason)
                }
            };
            slots.insert(spec.alias.clone(), slot);
        }
        Self {
            slots,
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
        }
    }

    /// Each alias with `Ok` when loaded or its load error.
    pub fn status(&self) -> Vec<(String, Result<(), String>)> {
        let mut v: Vec<_> = self
            .slots
            .iter()
            .map(|(a, s)| {
                (
                    a.clone(),
                    match s {
                        Slot::Ready(..) => Ok(()),
                        Slot::Broken(r) => Err(r.clone()),
                    },
                )
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Aliases that loaded.
    pub fn loaded(&self) -> Vec<String> {
        self.status()
            .into_iter()
            .filter(|(_, s)| s.is_ok())
            .map(|(a, _)| a)
            .collect()
    }
}

/// Adds a fixed bias to the logits of some token ids.
struct LogitBias(Vec<(u32, f32)>);

impl CustomLogitsProcessor for LogitBias {
    fn apply(&self, logits: &Tensor, _context: &[u32]) -> mistralrs::Result<Tensor> {
        let mut v = logits.to_vec1::<f32>()?;
        for &(id, bias) in &self.0 {
            if let Some(x) = usize::try_from(id).ok().and_then(|i| v.get_mut(i)) {
                *x += bias;
            }
        }
        Tensor::from_vec(v, logits.shape(), logits.device())
    }
}

fn role(s: Speaker) -> TextMessageRole {
    match s {
        Speaker::System => TextMessageRole::System,
        Speaker::User => TextMessageRole::User,
        Speaker::Assistant => TextMessageRole::Assistant,
    }
}

impl Generate for Engine {
    async fn generate(
        &self,
        alias: &str,
        prompt: &[PromptMessage],
        sampling: &Sampling,
        timeout: Duration,
    ) -> Result<Generation, GenerateError> {
        let model = match self.slots.get(alias) {
            None => return Err(GenerateError::Unknown { alias: alias.into() }),
            Some(Slot::Broken(reason)) => {
                return Err(GenerateError::Broken {
                    alias: alias.into(),
                    reason: reason.clone(),
                })
            }
            Some(Slot::Ready(m, format)) => (m, format),
        };
        let (model, format) = model;
        let mut req = RequestBuilder::new()
            .set_sampler_temperature(sampling.temperature)
            .set_sampler_topp(sampling.top_p)
            .set_sampler_max_len(sampling.max_tokens)
            .return_logprobs(true);
        if !sampling.logit_bias.is_empty() {
            // mistral.rs 0.8.1 accepts `logits_bias` but its sampler never
            // applies it; a logits processor does.
            req = req.add_logits_processor(Arc::new(LogitBias(sampling.logit_bias.clone())));
        }
        for m in prompt {
            req = req.add_message(role(m.speaker), &m.text);
        }
        let started = Instant::now();
        let work = async {
            // The permit bounds generations across all models.
            let _permit = self.permits.acquire().await;
            model.send_chat_request(req).await
        };
        let resp = match tokio::time::timeout(timeout, work).await {
            Err(_) => {
                return Err(GenerateError::Timeout {
                    alias: alias.into(),
                    after: timeout,
                })
            }
            Ok(Err(e)) => {
                return Err(GenerateError::Failed {
                    alias: alias.into(),
                    message: e.to_string(),
                })
            }
            Ok(Ok(r)) => r,
        };
        let Some(choice) = resp.choices.first() else {
            return Err(GenerateError::Empty { alias: alias.into() });
        };
        let text = choice.message.content.clone().unwrap_or_default().trim().to_string();
        if text.is_empty() {
            return Err(GenerateError::Empty { alias: alias.into() });
        }
        let confidence = choice
            .logprobs
            .as_ref()
            .and_then(|l| l.content.as_ref())
            .filter(|c| !c.is_empty())
            .map(|c| (c.iter().map(|t| t.logprob).sum::<f32>() / c.len() as f32).exp())
            .unwrap_or(0.5);
        let secs = |s: f32| Duration::try_from_secs_f32(s).unwrap_or(Duration::ZERO);
        Ok(Generation {
            text,
            tokens: u32::try_from(resp.usage.completion_tokens).unwrap_or(u32::MAX),
            confidence: confidence.clamp(0.0, 1.0),
            elapsed: started.elapsed(),
            prompt_tokens: u32::try_from(resp.usage.prompt_tokens).unwrap_or(u32::MAX),
            prompt_time: secs(resp.usage.total_prompt_time_sec),
            generation_time: secs(resp.usage.total_completion_time_sec),
            format: format.clone(),
        })
    }
}
