//! `ferry replay --trace`: one event followed across every stream, each hop with its time since the first.

use std::time::Duration;

use anyhow::{bail, Context as _};
use async_nats::jetstream;
use chrono::{DateTime, Utc};
use ferry_schema::codec::{self, Encoding, DEFAULT_MAX_PAYLOAD};
use ferry_schema::topology::{DEADLETTER_STREAM, EVENTS_STREAM, REPLIES_STREAM, WORK_STREAM};
use ferry_schema::{headers, EventId};
use indicatif::ProgressBar;

use super::output::{handoff_output, reply_output};
use super::select::{read, Selection, Start};

/// Follows one event across the streams: every message that carries its id
/// (as `Nats-Msg-Id`, in its trace id, as the event a reply answers, or in a
/// dead letter), from a second before the event until `window` after it.
pub(super) async fn trace(client: &async_nats::Client, js: &jetstream::Context, id: &str, window: Duration) -> anyhow::Result<()> {
    let uuid: uuid::Uuid = id
        .parse()
        .with_context(|| format!("--trace {id:?}: expected an event id (a UUID) or a 32-digit trace id"))?;
    let event = EventId(uuid);
    let (secs, nanos) = uuid
        .get_timestamp()
        .map(|t| t.to_unix())
        .context("--trace: the id is not a UUIDv7, so it carries no time")?;
    let at = DateTime::from_timestamp(i64::try_from(secs).unwrap_or_default(), nanos).context("--trace: time out of range")?;
    let hex = uuid.simple().to_string();
    let until = at + chrono::Duration::from_std(window).context("--window is too long")?;
    let mut hops: Vec<(DateTime<Utc>, String, u64, String, String)> = Vec::new();
    for stream in [EVENTS_STREAM, WORK_STREAM, REPLIES_STREAM, DEADLETTER_STREAM] {
        let sel = Selection {
            stream: stream.to_string(),
            filter: String::new(),
            start: Start::Time(at - chrono::Duration::seconds(1)),
            to_seq: None,
            until: Some(until),
            limit: None,
        };
        read(client, js, &sel, &ProgressBar::hidden(), |m| {
            let h = m.headers.as_ref();
            let msg_id = h.and_then(|h| h.get(headers::MSG_ID)).map(|v| v.to_string());
            let traced = headers::traceparent(h).and_then(headers::trace_id) == Some(hex.as_str());
            let reply = reply_output(h, &m.payload);
            let answers = reply.as_ref().is_some_and(|(e, _, _)| *e == event);
            let enc = Encoding::of(h, &m.payload).unwrap_or(Encoding::MsgPack);
            let carries = codec::decode_event(&m.payload, enc, DEFAULT_MAX_PAYLOAD).is_ok_and(|e| e.id == event);
            if traced || answers || carries || msg_id.as_deref() == Some(id) {
                let what = match (stream, reply) {
                    (DEADLETTER_STREAM, _) => format!(
                        "dead letter ({}): {}",
                        h.and_then(|h| h.get(headers::DEAD_REASON_CODE)).map(|v| v.to_string()).unwrap_or_default(),
                        h.and_then(|h| h.get(headers::DEAD_REASON)).map(|v| v.to_string()).unwrap_or_default()
                    ),
                    (_, Some((_, _, out))) => out.to_string(),
                    (WORK_STREAM, _) => handoff_output(m.subject.as_str(), h).map(|(_, o)| o.to_string()).unwrap_or_default(),
                    _ => crate::tap::decode(h, &m.payload).to_string(),
                };
                hops.push((
                    m.time,
                    stream.to_string(),
                    m.seq,
                    m.subject.clone(),
                    what,
                ));
            }
            async { Ok(()) }
        })
        .await?;
    }
    if hops.is_empty() {
        bail!("no message of event {id} between {} and {until}", at - chrono::Duration::seconds(1));
    }
    hops.sort_by_key(|h| h.0);
    let t0 = hops[0].0;
    for (t, stream, seq, subj, what) in &hops {
        let ms = (*t - t0).num_microseconds().unwrap_or_default() as f64 / 1e3;
        println!("{t} +{ms:>9.1}ms  {stream:<10} seq {seq:<6} {subj}  {what}");
    }
    Ok(())
}
