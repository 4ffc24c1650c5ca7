//! Running the agent on a JSON-lines source: publish every line, print every reply.

use std::collections::HashSet;
use std::time::Duration;

use ferry_schema::{EventBody, EventId, Reply};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::publish::PublishError;
use crate::replies::RepliesError;
use crate::source::{parse_line, SourceError};
use crate::Agent;

/// How [`run_lines`] ends.
#[derive(Debug, Clone, Copy)]
pub enum Until {
    /// Run until shutdown (a real agent).
    Shutdown,
    /// Return once the input is exhausted and every chat and prediction
    /// request got a reply, or after this long without a new reply (demo and
    /// scripts).
    Answered {
        /// Give up waiting after this long without progress.
        idle_timeout: Duration,
    },
}

/// What a run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RunReport {
    /// Events JetStream acknowledged.
    pub published: u64,
    /// Replies handed on.
    pub replies: u64,
    /// Chat events and prediction requests still without a reply when the run ended.
    pub unanswered: usize,
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A line of the input is invalid.
    #[error("input {0}")]
    Source(#[from] SourceError),
    /// Reading the input failed.
    #[error("reading input: {0}")]
    Read(#[from] std::io::Error),
    /// Publishing failed.
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// Receiving replies failed.
    #[error(transparent)]
    Replies(#[from] RepliesError),
}

/// Bound of the queue between the input reader and the publisher.
const INPUT_QUEUE: usize = 1024;

/// Publishes every event of `input` and sends every reply to `out`, until
/// `until` says stop or `shutdown` is cancelled.
pub async fn run_lines<R>(
    agent: &Agent,
    input: R,
    until: Until,
    out: mpsc::Sender<Reply>,
    shutdown: CancellationToken,
) -> Result<RunReport, RunError>
where
    R: AsyncBufRead + Unpin + Send + 'static,
{
    let stop = shutdown.child_token();
    let (reply_tx, mut reply_rx) = mpsc::channel(agent.config().reply_batch.max(1));
    let receiver = {
        let agent = agent.clone();
        let stop = stop.clone();
        tokio::spawn(async move { agent.receive_replies(reply_tx, stop).await })
    };

    let (event_tx, event_rx) = mpsc::channel(INPUT_QUEUE);
    let reader = {
        let id = agent.config().agent.clone();
        tokio::spawn(async move {
            let mut lines = input.lines();
            let mut n = 0usize;
            while let Some(line) = lines.next_line().await? {
                n += 1;
                if let Some(env) = parse_line(&id, n, &line)? {
                    if event_tx.send(env).await.is_err() {
                        break;
                    }
                }
            }
            Ok::<_, RunError>(())
        })
    };

    let mut report = RunReport::default();
    let mut pending: HashSet<EventId> = HashSet::new();
    let mut answered_early: HashSet<EventId> = HashSet::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(EventId, bool)>();
    let publisher = {
        let agent = agent.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let events = tokio_stream_from(event_rx);
            agent
                .publish_all(events, &stop, |env, _| {
                    let _ = done_tx.send((env.id, expects_reply(&env.body)));
                })
                .await
        })
    };
    let mut publisher = Some(publisher);

    let idle = match until {
        Until::Answered { idle_timeout } => idle_timeout,
        Until::Shutdown => Duration::MAX,
    };
    let result = loop {
        let publishing = publisher.is_some();
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            Some((id, expects)) = done_rx.recv() => {
                report.published += 1;
                if expects && !answered_early.remove(&id) {
                    pending.insert(id);
                }
            }
            Some(reply) = reply_rx.recv() => {
                if !pending.remove(&reply.in_reply_to) {
                    answered_early.insert(reply.in_reply_to);
                }
                report.replies += 1;
                if out.send(reply).await.is_err() {
                    break Ok(());
                }
            }
            r = async {
                match publisher.as_mut() {
                    Some(p) => p.await,
                    None => std::future::pending().await,
                }
            }, if publishing => {
                publisher = None;
                match r {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => break Err(RunError::from(e)),
                    Err(join) => break Err(RunError::Read(std::io::Error::other(join.to_string()))),
                }
                // Drain acks reported just before the publisher finished.
                while let Ok((id, expects)) = done_rx.try_recv() {
                    report.published += 1;
                    if expects && !answered_early.remove(&id) {
                        pending.insert(id);
                    }
                }
            }
            _ = tokio::time::sleep(idle), if !publishing && matches!(until, Until::Answered { .. }) => break Ok(()),
        }
        if publisher.is_none() && matches!(until, Until::Answered { .. }) && pending.is_empty() {
            break Ok(());
        }
    };
    stop.cancel();
    // Input errors are reported even if publishing had stopped first.
    if let Ok(Err(e)) = reader.await {
        return Err(e);
    }
    if let Ok(Err(e)) = receiver.await {
        return Err(e.into());
    }
    result?;
    report.unanswered = pending.len();
    Ok(report)
}

/// Whether an event of this body is answered by a reply.
fn expects_reply(body: &EventBody) -> bool {
    matches!(body, EventBody::Chat(_) | EventBody::Predict(_))
}

fn tokio_stream_from<T: Send + 'static>(mut rx: mpsc::Receiver<T>) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
