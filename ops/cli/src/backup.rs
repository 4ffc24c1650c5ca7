//! `ferry backup` and `ferry restore`: the streams (the broker's snapshot API) and the archive (`pg_dump`) into a dated folder, and back into a fresh stack.
//!
//! A backup is a folder `ferry-<UTC time>` holding `streams/<NAME>.json`
//! (the stream's config and state as the broker described them),
//! `streams/<NAME>.snap` (the broker's snapshot: the stream's store with
//! its consumers), `postgres.dump` (`pg_dump --format=custom`) and
//! `manifest.json` with each file's size and sha256. It is written under a
//! `.partial` name and renamed once complete, so a folder with a manifest
//! is a whole backup.
//!
//! The streams are saved before the database. Consumers then never stand
//! past what the dump holds: a restored consumer may deliver again an event
//! the restored archive already has (every consumer is idempotent on the
//! event id), but never skips one the archive lacks.

use std::io::{Read as _, Write as _};
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use bytes::Bytes;
use clap::Args;
use ferry_schema::connect::{Auth, NatsConfig};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Digest as _;

use crate::db::DbArgs;
use crate::ConnArgs;

/// The size of one snapshot or restore chunk (under the broker's
/// `max_payload`).
const CHUNK_BYTES: usize = 128 * 1024;
/// How long a snapshot may send nothing before it counts as stalled.
const STALL: Duration = Duration::from_secs(30);
/// How long the broker may take to build a stream from a restored snapshot.
const RESTORE_FINISH: Duration = Duration::from_secs(600);
/// The prefix of a backup folder's name.
const PREFIX: &str = "ferry-";
/// With `--every`, how soon a failed backup is tried again.
const RETRY_FAILED: Duration = Duration::from_secs(300);

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  ferry backup                                   # ferry up's stack, into .ferry/backups
  ferry backup --to /var/backups/ferry --keep 14 --server nats://broker:4222 \\
      --password \"$FERRY_OPERATOR_PASSWORD\" --database-url \"$DATABASE_URL\"
  ferry backup --every 24h --to /backups        # a backup now, then one a day (compose)")]
pub struct BackupArgs {
    /// Folder that holds the backups; each is a folder `ferry-<UTC time>`
    /// in it. Default: <data-dir>/backups.
    #[arg(long)]
    to: Option<PathBuf>,
    /// Keep this many backups in --to, deleting the oldest (0 keeps all).
    #[arg(long, default_value_t = 7)]
    keep: usize,
    /// Keep running: a backup now, then one every DUR (`24h`). A failed
    /// backup is tried again after `RETRY_FAILED` (or DUR, if shorter).
    #[arg(long, value_name = "DUR", value_parser = humantime::parse_duration)]
    every: Option<Duration>,
    /// Check the settings and that `pg_dump` runs; connect to nothing.
    #[arg(long)]
    check: bool,
    #[command(flatten)]
    conn: ConnArgs,
    #[command(flatten)]
    db: DbArgs,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  ferry restore .ferry/backups                   # the newest backup in the folder
  ferry restore .ferry/backups/ferry-20261205T030000Z --replace")]
pub struct RestoreArgs {
    /// A backup folder (`ferry-<time>`), or a folder of backups: then the
    /// newest in it.
    from: PathBuf,
    /// Replace streams and an archive that already hold data. Without it,
    /// restore refuses them; an empty stream (a fresh stack's) is replaced.
    #[arg(long)]
    replace: bool,
    #[command(flatten)]
    conn: ConnArgs,
    #[command(flatten)]
    db: DbArgs,
}

/// One file of a backup, as its manifest records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FileSum {
    /// Path inside the backup folder.
    path: String,
    bytes: u64,
    sha256: String,
}

/// One stream of a backup.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StreamEntry {
    name: String,
    messages: u64,
    /// Its config and state (`streams/<NAME>.json`).
    meta: FileSum,
    /// The snapshot (`streams/<NAME>.snap`).
    snapshot: FileSum,
}

/// `manifest.json`: what a whole backup holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Manifest {
    created: String,
    ferry_version: String,
    streams: Vec<StreamEntry>,
    postgres: FileSum,
}

/// Operator connection settings: the flags, or `ferry up`'s operator
/// password from <data-dir>/secrets.env when none were given.
fn operator(conn: &ConnArgs, db: &DbArgs, name: &str) -> anyhow::Result<NatsConfig> {
    conn.or_local_operator(&db.data_dir, name, "pass the operator's credentials")
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Size and sha256 of `dir/path`.
fn sum_of(dir: &Path, path: &str) -> anyhow::Result<FileSum> {
    let full = dir.join(path);
    let mut file = std::fs::File::open(&full).with_context(|| format!("opening {}", full.display()))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf).with_context(|| format!("reading {}", full.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FileSum { path: path.to_string(), bytes, sha256: hex(&hasher.finalize()) })
}

/// The broker's answer to an API request, or its error as an error.
fn api_answer(subject: &str, payload: &[u8]) -> anyhow::Result<Value> {
    let v: Value = serde_json::from_slice(payload)
        .with_context(|| format!("{subject} answered something that is not JSON: {:?}", String::from_utf8_lossy(payload)))?;
    if let Some(e) = v.get("error") {
        anyhow::bail!("{subject}: the broker refused: {}", e.get("description").and_then(Value::as_str).unwrap_or(&e.to_string()));
    }
    Ok(v)
}

/// Saves one stream's snapshot (with its consumers) and its config and
/// state into `dir/streams`.
async fn snapshot(client: &async_nats::Client, stream: &str, dir: &Path) -> anyhow::Result<StreamEntry> {
    let inbox = client.new_inbox();
    let mut chunks = client.subscribe(inbox.clone()).await?;
    let subject = format!("$JS.API.STREAM.SNAPSHOT.{stream}");
    let request = json!({ "deliver_subject": inbox, "chunk_size": CHUNK_BYTES });
    let answer = client.request(subject.clone(), serde_json::to_vec(&request)?.into()).await?;
    let v = api_answer(&subject, &answer.payload)?;
    let meta = json!({ "config": v["config"], "state": v["state"] });
    let messages = v["state"]["messages"].as_u64().unwrap_or(0);
    let meta_path = format!("streams/{stream}.json");
    let meta_bytes = serde_json::to_vec_pretty(&meta)?;
    std::fs::write(dir.join(&meta_path), &meta_bytes)?;
    let meta = FileSum {
        path: meta_path,
        bytes: meta_bytes.len() as u64,
        sha256: hex(&sha2::Sha256::digest(&meta_bytes)),
    };
    // The snapshot is summed as it is written, not read back.
    let snap_path = format!("streams/{stream}.snap");
    let mut file = std::io::BufWriter::new(std::fs::File::create(dir.join(&snap_path))?);
    let (mut hasher, mut bytes) = (sha2::Sha256::new(), 0u64);
    loop {
        let chunk = tokio::time::timeout(STALL, chunks.next())
            .await
            .with_context(|| format!("the snapshot of {stream} sent nothing for {}s", STALL.as_secs()))?
            .with_context(|| format!("the snapshot of {stream} ended without its last chunk"))?;
        if let Some(status) = chunk.status.filter(|s| *s != async_nats::StatusCode::OK) {
            anyhow::bail!("the snapshot of {stream} failed: status {status} {:?}", chunk.description);
        }
        // An empty chunk is the end.
        if chunk.payload.is_empty() {
            break;
        }
        file.write_all(&chunk.payload)?;
        hasher.update(&chunk.payload);
        bytes += chunk.payload.len() as u64;
        // The broker paces itself by these acks.
        if let Some(reply) = chunk.reply {
            client.publish(reply, Bytes::new()).await?;
        }
    }
    file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    let snapshot = FileSum { path: snap_path, bytes, sha256: hex(&hasher.finalize()) };
    Ok(StreamEntry { name: stream.to_string(), messages, meta, snapshot })
}

/// `pg_dump`, `pg_restore`, `psql`: the newest of Debian's
/// `/usr/lib/postgresql/<version>/bin` (a newer one reads an older
/// server), else from PATH. Installs nothing.
fn pg_tool(name: &str) -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let tool = e.path().join("bin").join(name);
            tool.is_file().then_some((version, tool))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p).unwrap_or_else(|| PathBuf::from(name))
}

/// The libpq flags and environment for `url`: host, port, user and
/// database as flags, the password in `PGPASSWORD` (never on a command
/// line), `sslmode` in `PGSSLMODE`.
fn pg_connection(url: &str) -> anyhow::Result<(Vec<String>, Vec<(&'static str, String)>)> {
    let pg = ferry_workers::state::parse_url(url)?;
    let mut args = Vec::new();
    if let Some(tokio_postgres::config::Host::Tcp(h)) = pg.get_hosts().first() {
        args.extend(["--host".to_string(), h.clone()]);
    }
    if let Some(p) = pg.get_ports().first() {
        args.extend(["--port".to_string(), p.to_string()]);
    }
    if let Some(u) = pg.get_user() {
        args.extend(["--username".to_string(), u.to_string()]);
    }
    args.extend(["--dbname".to_string(), pg.get_dbname().unwrap_or("postgres").to_string()]);
    let mut env = vec![("PGSSLMODE", match pg.get_ssl_mode() {
        tokio_postgres::config::SslMode::Disable => "disable".to_string(),
        tokio_postgres::config::SslMode::Require => "require".to_string(),
        _ => "prefer".to_string(),
    })];
    if let Some(p) = pg.get_password() {
        env.push(("PGPASSWORD", String::from_utf8_lossy(p).into_owned()));
    }
    Ok((args, env))
}

/// Runs a PostgreSQL tool; its stderr goes into the error.
fn run_pg(tool: &str, args: &[String], url: &str) -> anyhow::Result<()> {
    let (conn, env) = pg_connection(url)?;
    let bin = pg_tool(tool);
    let out = std::process::Command::new(&bin)
        .args(args)
        .args(&conn)
        .envs(env)
        .output()
        .with_context(|| format!("running {} (install PostgreSQL's client tools)", bin.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "{tool} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The UTC time as it names a backup: `20261205T030000Z`.
fn stamp(now: chrono::DateTime<chrono::Utc>) -> String {
    now.format("%Y%m%dT%H%M%SZ").to_string()
}

/// The whole backups in `folder` (with a manifest), oldest first.
fn backups_in(folder: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(folder) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(e).with_context(|| format!("reading {}", folder.display())),
    };
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with(PREFIX) && !name.ends_with(".partial") && path.join("manifest.json").is_file() {
            found.push(path);
        }
    }
    // The names are UTC times that sort as they read.
    found.sort();
    Ok(found)
}

pub async fn run_backup(args: BackupArgs) -> anyhow::Result<()> {
    if args.check {
        println!("{}", check(&args)?);
        return Ok(());
    }
    let Some(every) = args.every else {
        return backup_once(&args).await;
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let wait = match backup_once(&args).await {
            Ok(()) => every,
            Err(e) => {
                let wait = every.min(RETRY_FAILED);
                eprintln!("ferry backup: failed: {e:#}; trying again in {}", humantime::format_duration(wait));
                wait
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = term.recv() => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// `--check`: the credentials are there, the database URL parses and
/// `pg_dump` runs.
fn check(args: &BackupArgs) -> anyhow::Result<String> {
    let conn = operator(&args.conn, &args.db, "ferry backup --check")?;
    if let Auth::UserPassword { user, password } = &conn.auth {
        anyhow::ensure!(!password.is_empty(), "NATS_PASSWORD (--password) is empty: set it to the password of NATS user {user}");
    }
    let url = args.db.resolve()?;
    let pg = ferry_workers::state::parse_url(&url)?;
    let tool = pg_tool("pg_dump");
    let version = std::process::Command::new(&tool)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .with_context(|| format!("{} does not run: install PostgreSQL's client tools (postgresql-client)", tool.display()))?;
    let folder = args.to.clone().unwrap_or_else(|| args.db.data_dir.backups());
    let every = args.every.map(|d| format!(", every {}", humantime::format_duration(d))).unwrap_or_default();
    Ok(format!(
        "ferry backup: ok: streams of {} and database {:?} of user {:?} ({}) into {}, keeping {}{every}",
        conn.url,
        pg.get_dbname().unwrap_or_default(),
        pg.get_user().unwrap_or_default(),
        String::from_utf8_lossy(&version.stdout).trim(),
        folder.display(),
        args.keep
    ))
}

async fn backup_once(args: &BackupArgs) -> anyhow::Result<()> {
    let folder = args.to.clone().unwrap_or_else(|| args.db.data_dir.backups());
    let url = args.db.resolve()?;
    let client = operator(&args.conn, &args.db, "ferry backup")?.connect().await?;
    let js = jetstream::new(client.clone());
    let now = chrono::Utc::now();
    let name = format!("{PREFIX}{}", stamp(now));
    let partial = folder.join(format!("{name}.partial"));
    // It holds customers' chats: only the user who made it may read it.
    std::fs::create_dir_all(&folder).with_context(|| format!("creating {}", folder.display()))?;
    for d in [partial.clone(), partial.join("streams")] {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&d)
            .with_context(|| format!("creating {}", d.display()))?;
    }

    let mut names: Vec<String> = js.stream_names().collect::<Vec<_>>().await.into_iter().collect::<Result<_, _>>()?;
    names.sort();
    let mut streams = Vec::new();
    for stream in &names {
        let entry = snapshot(&client, stream, &partial).await.with_context(|| format!("saving stream {stream}"))?;
        eprintln!(
            "ferry backup: stream {stream}: {} messages, {} bytes",
            entry.messages, entry.snapshot.bytes
        );
        streams.push(entry);
    }
    run_pg(
        "pg_dump",
        &["--format=custom".to_string(), "--file".to_string(), partial.join("postgres.dump").display().to_string()],
        &url,
    )?;
    let postgres = sum_of(&partial, "postgres.dump")?;
    eprintln!("ferry backup: database: {} bytes (pg_dump, custom format)", postgres.bytes);
    let manifest = Manifest {
        created: crate::agent_registry::rfc3339(&now),
        ferry_version: env!("CARGO_PKG_VERSION").to_string(),
        streams,
        postgres,
    };
    let manifest_path = partial.join("manifest.json");
    std::fs::write(&manifest_path, serde_json::to_vec_pretty(&manifest)?)?;
    std::fs::File::open(&manifest_path)?.sync_all()?;
    let done = folder.join(&name);
    anyhow::ensure!(!done.exists(), "a backup named {} exists already; try again in a second", done.display());
    std::fs::rename(&partial, &done).with_context(|| format!("renaming {} to {}", partial.display(), done.display()))?;

    let all = backups_in(&folder)?;
    if args.keep > 0 && all.len() > args.keep {
        for old in &all[..all.len() - args.keep] {
            std::fs::remove_dir_all(old).with_context(|| format!("removing the old backup {}", old.display()))?;
            eprintln!("ferry backup: removed the old backup {} (--keep {})", old.display(), args.keep);
        }
    }
    println!("{}", done.display());
    Ok(())
}

/// The backup `from` names: itself, or the newest in it.
fn pick(from: &Path) -> anyhow::Result<PathBuf> {
    if from.join("manifest.json").is_file() {
        return Ok(from.to_path_buf());
    }
    backups_in(from)?.pop().with_context(|| {
        format!("{} is not a backup (no manifest.json) and holds none (no ferry-<time> folder with one)", from.display())
    })
}

/// Reads the manifest and checks every file it names against its sha256.
fn verified(dir: &Path) -> anyhow::Result<Manifest> {
    let text = std::fs::read(dir.join("manifest.json")).with_context(|| format!("reading {}/manifest.json", dir.display()))?;
    let manifest: Manifest = serde_json::from_slice(&text).with_context(|| format!("{}/manifest.json is not a Ferry manifest", dir.display()))?;
    let files = manifest.streams.iter().flat_map(|s| [&s.meta, &s.snapshot]).chain([&manifest.postgres]);
    for want in files {
        let got = sum_of(dir, &want.path)?;
        anyhow::ensure!(
            got.sha256 == want.sha256 && got.bytes == want.bytes,
            "{}/{} is damaged: {} bytes with sha256 {}, the manifest says {} bytes with {}",
            dir.display(),
            want.path,
            got.bytes,
            got.sha256,
            want.bytes,
            want.sha256
        );
    }
    Ok(manifest)
}

/// Sends a snapshot to the broker, which builds the stream (and its
/// consumers) from it.
async fn restore_stream(client: &async_nats::Client, dir: &Path, entry: &StreamEntry) -> anyhow::Result<u64> {
    let meta: Value = serde_json::from_slice(&std::fs::read(dir.join(&entry.meta.path))?)?;
    let subject = format!("$JS.API.STREAM.RESTORE.{}", entry.name);
    let answer = client.request(subject.clone(), serde_json::to_vec(&meta)?.into()).await?;
    let v = api_answer(&subject, &answer.payload)?;
    let deliver = v["deliver_subject"]
        .as_str()
        .with_context(|| format!("{subject} named no subject to send the snapshot to: {v}"))?
        .to_string();
    let mut file = std::fs::File::open(dir.join(&entry.snapshot.path))?;
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let ack = client.request(deliver.clone(), Bytes::copy_from_slice(&buf[..n])).await?;
        anyhow::ensure!(ack.payload.is_empty(), "the broker refused a chunk: {}", String::from_utf8_lossy(&ack.payload));
    }
    // The empty chunk ends it; the answer comes once the stream is built.
    let request = async_nats::Request::new().payload(Bytes::new()).timeout(Some(RESTORE_FINISH));
    let done = client.send_request(deliver, request).await?;
    let v = api_answer(&subject, &done.payload)?;
    Ok(v["state"]["messages"].as_u64().unwrap_or(0))
}

/// Events in the archive (0 when it has no `events` table yet).
async fn archived_events(url: &str) -> anyhow::Result<i64> {
    let client = ferry_workers::state::connect_one(url).await?;
    let exists: bool = client.query_one("SELECT to_regclass('events') IS NOT NULL", &[]).await?.get(0);
    if !exists {
        return Ok(0);
    }
    Ok(client.query_one("SELECT count(*) FROM events", &[]).await?.get(0))
}

pub async fn run_restore(args: RestoreArgs) -> anyhow::Result<()> {
    let dir = pick(&args.from)?;
    let manifest = verified(&dir)?;
    eprintln!("ferry restore: {} (made {}), every file checked by sha256", dir.display(), manifest.created);
    let url = args.db.resolve()?;
    let client = operator(&args.conn, &args.db, "ferry restore")?.connect().await?;
    let js = jetstream::new(client.clone());

    // Refuse before changing anything.
    let mut existing = Vec::new();
    for entry in &manifest.streams {
        if let Ok(mut stream) = js.get_stream(&entry.name).await {
            let messages = stream.info().await?.state.messages;
            anyhow::ensure!(
                messages == 0 || args.replace,
                "stream {} exists with {messages} messages; restore into a fresh stack, or pass --replace to delete it",
                entry.name
            );
            existing.push(entry.name.clone());
        }
    }
    let events = archived_events(&url).await?;
    anyhow::ensure!(
        events == 0 || args.replace,
        "the archive already holds {events} events; restore into a fresh stack, or pass --replace to overwrite it"
    );

    for entry in &manifest.streams {
        if existing.contains(&entry.name) {
            js.delete_stream(&entry.name).await.with_context(|| format!("deleting stream {}", entry.name))?;
        }
        let messages = restore_stream(&client, &dir, entry).await.with_context(|| format!("restoring stream {}", entry.name))?;
        eprintln!("ferry restore: stream {}: {messages} messages, with its consumers", entry.name);
    }
    // `pg_restore --clean` cannot drop the constraints a partition
    // inherits (the day partitions of V7): the archive's schema is
    // replaced whole instead, and the dump restored into it, in one
    // transaction, so the stack's running workers see the old archive or
    // the restored one, never neither.
    // A private temporary folder (0700): the script holds the archive.
    let scratch = tempfile::tempdir().context("a temporary folder for the restore script")?;
    let script = scratch.path().join("restore.sql");
    let tool = pg_tool("pg_restore");
    let out = std::process::Command::new(&tool)
        .args(["--no-owner", "--file"])
        .arg(&script)
        .arg(dir.join(&manifest.postgres.path))
        .output()
        .with_context(|| format!("running {} (install PostgreSQL's client tools)", tool.display()))?;
    anyhow::ensure!(out.status.success(), "pg_restore failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    let restored = run_pg(
        "psql",
        &[
            "--no-psqlrc".to_string(),
            "--quiet".to_string(),
            "--single-transaction".to_string(),
            "--set=ON_ERROR_STOP=1".to_string(),
            "--command=DROP SCHEMA public CASCADE; CREATE SCHEMA public;".to_string(),
            format!("--file={}", script.display()),
        ],
        &url,
    );
    drop(scratch);
    restored?;
    eprintln!("ferry restore: database: {} events", archived_events(&url).await?);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn backups_are_named_by_a_time_that_sorts_and_only_whole_ones_count() {
        let t = chrono::DateTime::parse_from_rfc3339("2026-12-05T03:00:09Z").unwrap().to_utc();
        assert_eq!(stamp(t), "20261205T030009Z");
        let dir = tempfile::tempdir().unwrap();
        for name in ["ferry-20261205T030009Z", "ferry-20261204T030000Z", "ferry-20261206T030000Z.partial", "other"] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
            std::fs::write(dir.path().join(name).join("manifest.json"), "{}").unwrap();
        }
        std::fs::create_dir(dir.path().join("ferry-20261207T030000Z")).unwrap(); // no manifest
        let found: Vec<String> = backups_in(dir.path())
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(found, ["ferry-20261204T030000Z", "ferry-20261205T030009Z"]);
        assert_eq!(pick(dir.path()).unwrap(), dir.path().join("ferry-20261205T030009Z"));
        assert!(pick(&dir.path().join("other")).is_ok(), "a folder with a manifest is a backup itself");
        let e = pick(&dir.path().join("ferry-20261207T030000Z")).unwrap_err().to_string();
        assert!(e.contains("is not a backup (no manifest.json)"), "{e}");
    }

    #[test]
    fn the_password_goes_into_the_environment_not_the_command_line() {
        let (args, env) = pg_connection("postgres://ferry:s3cret@127.0.0.1:54320/ferry?sslmode=require").unwrap();
        assert_eq!(args, ["--host", "127.0.0.1", "--port", "54320", "--username", "ferry", "--dbname", "ferry"]);
        assert!(!args.iter().any(|a| a.contains("s3cret")));
        assert!(env.contains(&("PGPASSWORD", "s3cret".to_string())));
        assert!(env.contains(&("PGSSLMODE", "require".to_string())));
    }

    #[test]
    fn a_damaged_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("postgres.dump"), b"dump").unwrap();
        let manifest = Manifest {
            created: "2026-12-05T03:00:00Z".into(),
            ferry_version: "0".into(),
            streams: vec![],
            postgres: sum_of(dir.path(), "postgres.dump").unwrap(),
        };
        std::fs::write(dir.path().join("manifest.json"), serde_json::to_vec(&manifest).unwrap()).unwrap();
        verified(dir.path()).unwrap();
        std::fs::write(dir.path().join("postgres.dump"), b"dumb").unwrap();
        let e = verified(dir.path()).unwrap_err().to_string();
        assert!(e.contains("postgres.dump is damaged"), "{e}");
    }
}
