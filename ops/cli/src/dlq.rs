//! `ferry dlq`: list dead letters with their reasons, and re-drive them to their original subject after a fix.

use anyhow::Context as _;
use async_nats::jetstream;
use clap::{Args, Subcommand};
use ferry_schema::headers;
use ferry_schema::topology::DEADLETTER_STREAM;

use crate::ConnArgs;

#[derive(Debug, Subcommand)]
pub enum DlqCmd {
    /// List dead letters: sequence, reason code, where it failed, why.
    ///
    /// Example: ferry dlq list --code unstorable
    List(ListArgs),
    /// Publish dead letters again on their original subject (without their
    /// `Nats-Msg-Id`, so the stream stores them again; every worker is
    /// idempotent on the event id), then delete them from DEADLETTER.
    ///
    /// Examples:
    ///   ferry dlq redrive --seq 12 --seq 13
    ///   ferry dlq redrive --code max_deliver     # after the outage is over
    #[command(verbatim_doc_comment)]
    Redrive(RedriveArgs),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only dead letters with this reason code.
    #[arg(long)]
    code: Option<String>,
    #[command(flatten)]
    conn: ConnArgs,
}

#[derive(Debug, Args)]
pub struct RedriveArgs {
    /// DEADLETTER sequence to re-drive (repeatable).
    #[arg(long = "seq")]
    seqs: Vec<u64>,
    /// Re-drive every dead letter with this reason code.
    #[arg(long)]
    code: Option<String>,
    /// Show what would be re-driven, change nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    conn: ConnArgs,
}

/// One stored dead letter.
#[derive(Debug)]
pub struct Letter {
    pub seq: u64,
    pub code: String,
    pub reason: String,
    pub origin: String,
    pub subject: String,
    pub msg: async_nats::jetstream::message::StreamMessage,
}

fn header(m: &async_nats::jetstream::message::StreamMessage, name: &str) -> String {
    m.headers.get(name).map(|v| v.to_string()).unwrap_or_default()
}

/// Every dead letter in the stream, oldest first.
pub async fn letters(js: &jetstream::Context) -> anyhow::Result<Vec<Letter>> {
    let mut stream = js.get_stream(DEADLETTER_STREAM).await.context("looking up DEADLETTER (run `ferry provision`)")?;
    let state = stream.info().await?.state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return Ok(out);
    }
    for seq in state.first_sequence..=state.last_sequence {
        // Deleted sequences (re-driven letters) leave gaps.
        let Ok(msg) = stream.get_raw_message(seq).await else { continue };
        out.push(Letter {
            seq,
            code: header(&msg, headers::DEAD_REASON_CODE),
            reason: header(&msg, headers::DEAD_REASON),
            origin: format!("{}/{}", header(&msg, headers::DEAD_STREAM), header(&msg, headers::DEAD_CONSUMER)),
            subject: header(&msg, headers::DEAD_SUBJECT),
            msg,
        });
    }
    Ok(out)
}

/// The original body of dead letter `l`: its own body, or, when that is
/// only an excerpt, the original read back from its stream (which keeps
/// it for its `max_age`).
async fn whole_body(js: &jetstream::Context, l: &Letter) -> anyhow::Result<bytes::Bytes> {
    let size: Option<usize> = l.msg.headers.get(headers::DEAD_PAYLOAD_BYTES).and_then(|v| v.as_str().parse().ok());
    if size.is_none_or(|n| n <= l.msg.payload.len()) {
        return Ok(l.msg.payload.clone());
    }
    let stream = header(&l.msg, headers::DEAD_STREAM);
    let seq: u64 = header(&l.msg, headers::DEAD_SEQUENCE)
        .parse()
        .with_context(|| format!("dead letter {} holds an excerpt but no {} header", l.seq, headers::DEAD_SEQUENCE))?;
    let original = js
        .get_stream(&stream)
        .await
        .with_context(|| format!("looking up stream {stream}"))?
        .get_raw_message(seq)
        .await
        .with_context(|| {
            format!(
                "dead letter {} holds only the first {} bytes of its original, and {stream} no longer has it at sequence {seq}: it cannot be re-driven",
                l.seq,
                l.msg.payload.len()
            )
        })?;
    Ok(original.payload)
}

pub async fn run(cmd: DlqCmd) -> anyhow::Result<()> {
    match cmd {
        DlqCmd::List(args) => {
            let js = jetstream::new(args.conn.config("ferry dlq").connect().await?);
            let all = letters(&js).await?;
            let shown: Vec<&Letter> = all.iter().filter(|l| args.code.as_ref().is_none_or(|c| &l.code == c)).collect();
            if shown.is_empty() {
                println!("no dead letters");
            }
            for l in shown {
                println!("{:>6}  {:<20}  {:<28}  {:<24}  {}", l.seq, l.code, l.origin, l.subject, l.reason);
            }
        }
        DlqCmd::Redrive(args) => {
            anyhow::ensure!(
                !args.seqs.is_empty() || args.code.is_some(),
                "say which dead letters: --seq N (repeatable) or --code CODE (see `ferry dlq list`)"
            );
            let js = jetstream::new(args.conn.config("ferry dlq").connect().await?);
            let chosen: Vec<Letter> = letters(&js)
                .await?
                .into_iter()
                .filter(|l| args.seqs.contains(&l.seq) || args.code.as_ref().is_some_and(|c| &l.code == c))
                .collect();
            if let Some(missing) = args.seqs.iter().find(|s| !chosen.iter().any(|l| l.seq == **s)) {
                anyhow::bail!("DEADLETTER has no message {missing} (see `ferry dlq list`)");
            }
            let stream = js.get_stream(DEADLETTER_STREAM).await?;
            for l in &chosen {
                anyhow::ensure!(!l.subject.is_empty(), "dead letter {} has no {} header", l.seq, headers::DEAD_SUBJECT);
                if args.dry_run {
                    println!("would re-drive {} ({}) to {}", l.seq, l.code, l.subject);
                    continue;
                }
                let mut h = async_nats::HeaderMap::new();
                for (name, values) in l.msg.headers.iter() {
                    let n: &str = name.as_ref();
                    // The dead letter's own id and reason, and the original's
                    // broker headers (its old id would be de-duplicated away).
                    if n == headers::MSG_ID || headers::DEAD_HEADERS.contains(&n) || n.starts_with(headers::ORIGINAL_PREFIX) {
                        continue;
                    }
                    for v in values {
                        h.append(name.clone(), v.clone());
                    }
                }
                let payload = whole_body(&js, l).await?;
                js.publish_with_headers(l.subject.clone(), h, payload)
                    .await?
                    .await
                    .with_context(|| format!("re-driving {} to {}", l.seq, l.subject))?;
                stream.delete_message(l.seq).await.with_context(|| format!("deleting dead letter {}", l.seq))?;
                println!("re-drove {} ({}) to {}", l.seq, l.code, l.subject);
            }
        }
    }
    Ok(())
}
