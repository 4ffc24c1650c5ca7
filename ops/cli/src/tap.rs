//! `ferry tap`: live traffic on a subject, decoded to JSON lines (the companion of `nats sub`).

use anyhow::Context as _;
use clap::Args;
use ferry_schema::codec::{self, Encoding, DEFAULT_MAX_PAYLOAD};
use futures::StreamExt;
use serde_json::{json, Value};

use crate::ConnArgs;

/// Prints every message on SUBJECT as one JSON line: `{"subject", "data"}`
/// (and `"headers"` with --headers). Ferry events and replies are decoded
/// from either encoding and printed as their JSON encoding; other
/// MessagePack or JSON payloads are shown as JSON, anything else as text.
///
/// Examples:
///   ferry tap 'events.>'                      # every event, as JSON
///   ferry tap 'replies.desk-1' --headers      # one agent's replies, with headers
///   ferry tap 'deadletter.>' --count 10       # the next ten dead letters
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct TapArgs {
    /// Subject to watch; wildcards allowed.
    subject: String,
    /// Show each message's headers.
    #[arg(long)]
    headers: bool,
    /// Stop after this many messages.
    #[arg(long)]
    count: Option<usize>,
    #[command(flatten)]
    conn: ConnArgs,
}

/// A payload as JSON: a Ferry event or reply in its JSON form, else any
/// MessagePack or JSON value, else the text.
pub fn decode(headers: Option<&async_nats::HeaderMap>, payload: &[u8]) -> Value {
    let enc = Encoding::of(headers, payload).unwrap_or(Encoding::MsgPack);
    let as_json = |bytes: Result<Vec<u8>, codec::EncodeError>| {
        bytes.ok().and_then(|b| serde_json::from_slice::<Value>(&b).ok())
    };
    if let Ok(env) = codec::decode_event(payload, enc, DEFAULT_MAX_PAYLOAD) {
        if let Some(v) = as_json(codec::encode_event(&env, Encoding::Json)) {
            return v;
        }
    }
    if let Ok(r) = codec::decode_reply(payload, enc, DEFAULT_MAX_PAYLOAD) {
        if let Some(v) = as_json(codec::encode_reply(&r, Encoding::Json)) {
            return v;
        }
    }
    if let Ok(v) = serde_json::from_slice::<Value>(payload) {
        return v;
    }
    if let Ok(v) = rmp_serde::from_slice::<Value>(payload) {
        return v;
    }
    Value::String(String::from_utf8_lossy(payload).into_owned())
}

fn headers_json(h: &async_nats::HeaderMap) -> Value {
    let mut map = serde_json::Map::new();
    for (name, values) in h.iter() {
        let vs: Vec<Value> = values.iter().map(|v| Value::String(v.to_string())).collect();
        map.insert(name.to_string(), Value::Array(vs));
    }
    Value::Object(map)
}

pub async fn run(args: TapArgs) -> anyhow::Result<()> {
    let client = args.conn.config("ferry tap").connect().await?;
    let mut sub = client
        .subscribe(args.subject.clone())
        .await
        .with_context(|| format!("subscribing to {}", args.subject))?;
    client.flush().await.context("flushing the subscription")?;
    eprintln!("ferry: tapping {} (Ctrl-C stops)", args.subject);
    let mut seen = 0usize;
    loop {
        let msg = tokio::select! {
            m = sub.next() => match m { Some(m) => m, None => break },
            _ = tokio::signal::ctrl_c() => break,
        };
        let mut line = json!({ "subject": msg.subject.as_str(), "data": decode(msg.headers.as_ref(), &msg.payload) });
        if args.headers {
            if let (Some(h), Some(obj)) = (msg.headers.as_ref(), line.as_object_mut()) {
                obj.insert("headers".into(), headers_json(h));
            }
        }
        println!("{line}");
        seen += 1;
        if args.count.is_some_and(|n| seen >= n) {
            break;
        }
    }
    Ok(())
}
