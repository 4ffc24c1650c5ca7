//! Provisioning: creating the streams and consumers at the broker, or bringing them in line.

use async_nats::jetstream::{self, stream};

use super::diff::{consumer_diff, stream_diff};
use super::{agent_replies_consumer, agent_replies_consumer_name, all_streams, ConsumerDef, Role, StreamSettings};
use super::{EVENTS_STREAM, REPLIES_STREAM};
use crate::AgentId;

/// What provisioning did to one stream or consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// It did not exist and was created.
    Created,
    /// It existed with the wanted settings.
    Unchanged,
    /// It existed and these fields were updated (`field: old -> new`).
    Updated(Vec<String>),
}

/// One line of a provisioning report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provisioned {
    /// `stream EVENTS` or `consumer EVENTS/rules`.
    pub what: String,
    /// What happened to it.
    pub change: Change,
}

/// Why provisioning failed.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The broker refused or did not answer.
    #[error("{what}: {action} failed: {source}")]
    Broker {
        /// The stream or consumer.
        what: String,
        /// `create`, `update` or `look up`.
        action: &'static str,
        /// The broker's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The existing object differs in a way the broker will not update.
    #[error("{what} exists with different settings the broker would not update ({diff}): {source}; delete it (`{delete}`, which drops what it holds) and provision again, or restore the old settings")]
    Incompatible {
        /// The stream or consumer.
        what: String,
        /// The `nats` command that deletes it.
        delete: String,
        /// The differing fields.
        diff: String,
        /// The broker's refusal.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A broker error as the source of a [`ProvisionError`].
fn boxed<E: std::error::Error + Send + Sync + 'static>(
    e: E,
) -> Box<dyn std::error::Error + Send + Sync> {
    Box::new(e)
}

/// Creates `want` or brings an existing stream of that name in line with it.
pub async fn ensure_stream(
    js: &jetstream::Context,
    want: &stream::Config,
) -> Result<Provisioned, ProvisionError> {
    let what = format!("stream {}", want.name);
    let existing = match js.get_stream(&want.name).await {
        Ok(mut s) => Some(
            s.info()
                .await
                .map_err(|e| ProvisionError::Broker {
                    what: what.clone(),
                    action: "look up",
                    source: boxed(e),
                })?
                .config
                .clone(),
        ),
        Err(e) => match e.kind() {
            jetstream::context::GetStreamErrorKind::JetStream(js_err)
                if js_err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                None
            }
            _ => {
                return Err(ProvisionError::Broker {
                    what,
                    action: "look up",
                    source: boxed(e),
                })
            }
        },
    };
    let Some(have) = existing else {
        js.create_stream(want.clone())
            .await
            .map_err(|e| ProvisionError::Broker {
                what: what.clone(),
                action: "create",
                source: boxed(e),
            })?;
        return Ok(Provisioned {
            what,
            change: Change::Created,
        });
    };
    let diff = stream_diff(&have, want);
    if diff.is_empty() {
        return Ok(Provisioned {
            what,
            change: Change::Unchanged,
        });
    }
    js.update_stream(want.clone())
        .await
        .map_err(|e| ProvisionError::Incompatible {
            what: what.clone(),
            delete: format!("nats stream rm {} -f", want.name),
            diff: diff.join(", "),
            source: boxed(e),
        })?;
    Ok(Provisioned {
        what,
        change: Change::Updated(diff),
    })
}

/// Creates the consumer `def` or brings an existing one in line with it.
pub async fn ensure_consumer(
    js: &jetstream::Context,
    def: &ConsumerDef,
) -> Result<Provisioned, ProvisionError> {
    let what = format!("consumer {}/{}", def.stream, def.name());
    let stream = js
        .get_stream_no_info(def.stream)
        .await
        .map_err(|e| ProvisionError::Broker {
            what: what.clone(),
            action: "look up stream",
            source: boxed(e),
        })?;
    let existing = match stream.consumer_info(def.name()).await {
        Ok(info) => Some(info.config.clone()),
        Err(e) => match e.kind() {
            jetstream::context::ConsumerInfoErrorKind::NotFound => None,
            _ => {
                return Err(ProvisionError::Broker {
                    what,
                    action: "look up",
                    source: boxed(e),
                })
            }
        },
    };
    let change = match existing {
        None => Change::Created,
        Some(have) => {
            let diff = consumer_diff(&have, &def.config);
            if diff.is_empty() {
                return Ok(Provisioned {
                    what,
                    change: Change::Unchanged,
                });
            }
            Change::Updated(diff)
        }
    };
    let created = stream.create_consumer(def.config.clone()).await;
    match (created, change) {
        (Ok(_), change) => Ok(Provisioned { what, change }),
        (Err(e), Change::Updated(diff)) => Err(ProvisionError::Incompatible {
            what,
            delete: format!("nats consumer rm {} {} -f", def.stream, def.name()),
            diff: diff.join(", "),
            source: boxed(e),
        }),
        (Err(e), _) => Err(ProvisionError::Broker {
            what,
            action: "create",
            source: boxed(e),
        }),
    }
}

/// Deletes `agent`'s reply consumer (`REPLIES/agent-<id>`), with the replies
/// it still held for the agent; `Ok(false)` when it did not exist.
pub async fn remove_agent_consumer(
    js: &jetstream::Context,
    agent: &AgentId,
) -> Result<bool, ProvisionError> {
    let name = agent_replies_consumer_name(agent);
    let what = format!("consumer {REPLIES_STREAM}/{name}");
    let stream = js
        .get_stream_no_info(REPLIES_STREAM)
        .await
        .map_err(|e| ProvisionError::Broker {
            what: what.clone(),
            action: "look up stream",
            source: boxed(e),
        })?;
    match stream.delete_consumer(&name).await {
        Ok(_) => Ok(true),
        Err(e) => match e.kind() {
            jetstream::stream::ConsumerErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND =>
            {
                Ok(false)
            }
            _ => Err(ProvisionError::Broker {
                what,
                action: "delete",
                source: boxed(e),
            }),
        },
    }
}

/// Provisions every stream, every role's consumer, and the reply consumer of
/// each agent in `agents`. Safe to run any number of times. The per-agent
/// cap on `EVENTS` follows the version of the server `js` is connected to.
pub async fn provision(
    js: &jetstream::Context,
    settings: &StreamSettings,
    agents: &[AgentId],
) -> Result<Vec<Provisioned>, ProvisionError> {
    let mut report = Vec::new();
    let version = js.client().server_info().version;
    for mut s in all_streams(settings) {
        if s.name == EVENTS_STREAM {
            crate::quota::apply(&mut s, settings, &version);
        }
        report.push(ensure_stream(js, &s).await?);
    }
    for role in Role::ALL {
        for def in role.consumers() {
            report.push(ensure_consumer(js, &def).await?);
        }
    }
    for agent in agents {
        report.push(ensure_consumer(js, &agent_replies_consumer(agent)).await?);
    }
    Ok(report)
}
