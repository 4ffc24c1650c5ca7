//! `ferry migrate` and `ferry kb import`: the database's schema and the knowledge base, from the command line.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use ferry_schema::db;
use ferry_stack::Secrets;
use ferry_workers::state::{self, kb};
use crate::data_dir::DataDir;

/// Default port of the PostgreSQL cluster `ferry up` runs (not 5432, so it
/// never collides with a system cluster).
pub const LOCAL_PG_PORT: u16 = 54320;

/// Which database: `--database-url`, or the local cluster of `ferry up`.
#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// PostgreSQL URL (postgres://user:password@host:port/database).
    /// Default: the local cluster `ferry up` runs, with the password from
    /// <data-dir>/secrets.env.
    #[arg(long = "database-url", env = "DATABASE_URL", hide_env_values = true)]
    pub url: Option<String>,
    /// `ferry up`'s data dir (for the local cluster's password).
    #[arg(long, default_value = crate::data_dir::DEFAULT)]
    pub data_dir: DataDir,
    /// Port of the local cluster.
    #[arg(long, default_value_t = LOCAL_PG_PORT)]
    pub pg_port: u16,
}

/// The URL of `ferry up`'s local cluster.
pub fn local_url(password: &str, port: u16) -> String {
    format!(
        "postgres://{}:{password}@127.0.0.1:{port}/{}",
        ferry_stack::postgres::DB_USER,
        ferry_stack::postgres::DB_NAME
    )
}

fn password_from(secrets: &Path) -> anyhow::Result<String> {
    let found = Secrets::load(secrets)?.with_context(|| {
        format!(
            "no --database-url (or DATABASE_URL) given, and no local cluster's password in {} (run `ferry up` first, or pass --database-url)",
            secrets.display()
        )
    })?;
    Ok(found.postgres)
}

impl DbArgs {
    /// The URL to connect to.
    pub fn resolve(&self) -> anyhow::Result<String> {
        match &self.url {
            Some(u) => Ok(u.clone()),
            None => Ok(local_url(&password_from(&self.data_dir.secrets())?, self.pg_port)),
        }
    }
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    db: DbArgs,
    /// Stop after this migration version (default: all).
    #[arg(long)]
    target: Option<i64>,
    /// Only show which migrations are applied and which are pending.
    #[arg(long)]
    status: bool,
    /// Check the database URL and --target, print what would be applied
    /// at most, and connect to nothing.
    #[arg(long)]
    check: bool,
}

/// `migrate --check`: the URL parses and the target is a known migration.
fn check_migrate(url: &str, target: Option<i64>) -> anyhow::Result<String> {
    let pg = state::parse_url(url)?;
    let all = db::migrations();
    if let Some(t) = target {
        if !all.iter().any(|m| m.version == t) {
            anyhow::bail!(
                "--target {t}: no such migration (known: {})",
                all.iter().map(|m| m.version.to_string()).collect::<Vec<_>>().join(", ")
            );
        }
    }
    Ok(format!(
        "ferry migrate: ok: {} migrations known (latest version {}) for database {:?} of user {:?}",
        all.len(),
        db::latest_version(),
        pg.get_dbname().unwrap_or_default(),
        pg.get_user().unwrap_or_default()
    ))
}

/// Applies pending migrations under an advisory lock and prints each one.
pub async fn migrate(url: &str, target: Option<i64>) -> anyhow::Result<Vec<db::MigrationName>> {
    let mut client = state::connect_one(url).await?;
    Ok(db::migrate(&mut client, target).await?)
}

pub async fn run_migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let url = args.db.resolve()?;
    if args.check {
        println!("{}", check_migrate(&url, args.target)?);
        return Ok(());
    }
    if args.status {
        let client = state::connect_one(&url).await?;
        let applied = db::applied(&client).await?;
        for m in db::migrations() {
            let state = if applied.contains(&m.version) { "applied" } else { "pending" };
            println!("{m}: {state}");
        }
        return Ok(());
    }
    let applied = migrate(&url, args.target).await?;
    if applied.is_empty() {
        println!("schema up to date (version {})", db::latest_version());
    }
    for m in applied {
        println!("{m}: applied");
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum KbCmd {
    /// Load articles into the knowledge base (idempotent: an article is
    /// replaced by one with the same slug).
    ///
    /// PATH is a .jsonl file ({"title", "body", "slug"?, "tags"?} per line),
    /// a .md file, or a folder of .md files (`# Title`, an optional
    /// `tags: a, b` line, then the body; the slug is the file name).
    ///
    /// Example: ferry kb import ops/demo/kb
    Import(KbImportArgs),
    /// Show the top articles for a question, as the inference worker sees them.
    ///
    /// Example: ferry kb search "退款多久到账"
    Search(KbSearchArgs),
}

#[derive(Debug, Args)]
pub struct KbImportArgs {
    /// A .jsonl file, a .md file, or a folder of .md files.
    path: PathBuf,
    #[command(flatten)]
    db: DbArgs,
}

#[derive(Debug, Args)]
pub struct KbSearchArgs {
    /// The question.
    query: String,
    /// How many articles.
    #[arg(short, default_value_t = 3)]
    k: usize,
    #[command(flatten)]
    db: DbArgs,
}

/// What an import did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Imported {
    pub created: usize,
    pub updated: usize,
    pub unchanged: usize,
}

/// Stores `articles`, reporting progress on stderr every 100.
pub async fn import(client: &tokio_postgres::Client, articles: &[kb::Article]) -> anyhow::Result<Imported> {
    let mut done = Imported::default();
    for (i, a) in articles.iter().enumerate() {
        match kb::upsert(client, a).await.with_context(|| format!("storing article {:?}", a.slug))? {
            kb::Upserted::Created => done.created += 1,
            kb::Upserted::Updated => done.updated += 1,
            kb::Upserted::Unchanged => done.unchanged += 1,
        }
        if (i + 1) % 100 == 0 {
            eprintln!("ferry: {} of {} articles stored", i + 1, articles.len());
        }
    }
    Ok(done)
}

pub async fn run_kb(cmd: KbCmd) -> anyhow::Result<()> {
    match cmd {
        KbCmd::Import(args) => {
            let articles = kb::load_path(&args.path)?;
            let client = state::connect_one(&args.db.resolve()?).await?;
            db::check(&client, None).await?;
            let done = import(&client, &articles).await?;
            println!(
                "{} articles from {}: {} created, {} updated, {} unchanged",
                articles.len(),
                args.path.display(),
                done.created,
                done.updated,
                done.unchanged
            );
        }
        KbCmd::Search(args) => {
            let client = state::connect_one(&args.db.resolve()?).await?;
            let hits = kb::search(&client, &args.query, args.k).await?;
            if hits.is_empty() {
                println!("no article matches");
            }
            for h in hits {
                println!("{:>5.1}  {:>3.0}%  {}  {}", h.score, h.coverage * 100.0, h.slug, h.title);
            }
        }
    }
    Ok(())
}
