//! What a replay shows: the selected messages as decoded JSON lines on stdout, its progress bar and summary on stderr.

use std::time::Instant;

use async_nats::jetstream;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use super::select::{read, Ended, Selection};

/// A progress bar on stderr, or a hidden one with `quiet`.
pub(super) fn bar(quiet: bool, len: u64, what: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// The last line on stderr: what was done to how many messages, how fast, and whether Ctrl-C cut it short.
pub(super) fn summary(what: &str, n: u64, ended: Ended, started: Instant) {
    let secs = started.elapsed().as_secs_f64();
    let how = match ended {
        Ended::Done => "",
        Ended::Interrupted => " (stopped by Ctrl-C)",
    };
    eprintln!("ferry replay: {what} {n} messages in {secs:.1}s{how}");
}

fn header_map(h: Option<&async_nats::HeaderMap>) -> Value {
    let mut out = serde_json::Map::new();
    if let Some(h) = h {
        for (k, vs) in h.iter() {
            let vs: Vec<&str> = vs.iter().map(|v| v.as_str()).collect();
            out.insert(k.to_string(), json!(vs.join(", ")));
        }
    }
    Value::Object(out)
}

/// The default mode: every selected message as one JSON line (sequence,
/// time, subject, decoded data, and with `with_headers` its headers).
pub(super) async fn print(
    client: &async_nats::Client,
    js: &jetstream::Context,
    sel: &Selection,
    quiet: bool,
    with_headers: bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let pb = bar(quiet, 0, "reading");
    let (n, ended) = read(client, js, sel, &pb, |msg| {
        let mut line = json!({
            "seq": msg.seq,
            "time": msg.time,
            "subject": msg.subject,
            "data": crate::tap::decode(msg.headers.as_ref(), &msg.payload),
        });
        if with_headers {
            line["headers"] = header_map(msg.headers.as_ref());
        }
        pb.suspend(|| println!("{line}"));
        async { Ok(()) }
    })
    .await?;
    pb.finish_and_clear();
    summary("printed", n, ended, started);
    Ok(())
}
