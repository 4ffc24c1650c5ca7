//! `ferry dashboard`: a live web page of the pipeline (agents, traffic, reply latency, interactions, inference, lag, dead letters, alerts), pushed to the browser over server-sent events.
//!
//! # Layout
//!
//! - [`live`]: what the server has seen since it started, and the
//!   snapshot a page gets.
//! - [`history`]: what it reads from the archive (time ranges, an agent's
//!   recent events and replies, acknowledging an alert).
//!
//! The server watches the broker as the operator does (`events.*.<kind>`
//! for every kind but activity samples, `replies.>`, `alerts.>`,
//! `deadletter.>`, and each rule's last alert from `ALERTS` at start), asks
//! it every [`PIPELINE_EVERY`] for `EVENTS`' last sequence (the activity
//! samples are counted from it, not read), the worker consumers' lag (not
//! the agents' reply consumers: a thousand agents would make that a
//! thousand consumers' info every time) and the replicas online, folds it all into a [`live::Live`] state,
//! and once a second pushes a snapshot to every open page over SSE
//! (`/live`); the page never polls. With the archive's URL it also answers
//! the page's questions about the past (`/history`, `/agent`) and records
//! acknowledgements (`/alerts/ack`). A login (the operator's user and
//! password, as in the stack's secrets) guards every page but the login
//! form; the session is a random cookie. It binds to loopback unless told
//! otherwise.

pub mod history;
pub mod live;

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use clap::Args;
use ferry_schema::alert::Alert;
use ferry_schema::subject;
use ferry_schema::topology::EVENTS_STREAM;
use futures::StreamExt;
use sha2::Digest as _;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::data_dir::DataDir;
use crate::ConnArgs;

const PAGE: &str = include_str!("page.html");
const SCRIPT: &str = include_str!("app.js");
/// The cookie that carries a session.
const SESSION_COOKIE: &str = "ferry_session";
/// How often a snapshot goes to the pages.
pub const PUSH_EVERY: Duration = Duration::from_millis(500);
/// Sessions kept at once; the oldest go first beyond it.
const MAX_SESSIONS: usize = 1024;
/// How often the server asks the broker for the consumers' lag and the
/// replicas online.
pub const PIPELINE_EVERY: Duration = Duration::from_secs(2);
/// How long replicas get to answer that question.
const REPLICAS_WAIT: Duration = Duration::from_millis(300);

/// `ferry dashboard`.
#[derive(Debug, Args)]
pub struct DashboardArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Address to serve on. Loopback by default: the page shows customers'
    /// chats and alerts; put it behind a TLS proxy to open it further.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,
    /// Where `ferry up` keeps its secrets (the operator's password, when
    /// --password is not given).
    #[arg(long, default_value = crate::data_dir::DEFAULT)]
    pub data_dir: DataDir,
    /// The archive (PostgreSQL), for time ranges, an agent's recent events
    /// and replies, and acknowledging alerts. Without it the page shows
    /// what the server saw since it started.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
}

/// Who may log in: a user and the sha256 of `user:password`.
#[derive(Clone)]
pub struct Login {
    user: String,
    digest: [u8; 32],
}

impl Login {
    /// The login of `user` with `password`.
    pub fn new(user: &str, password: &str) -> Self {
        Self {
            user: user.to_string(),
            digest: digest(user, password),
        }
    }

    fn accepts(&self, user: &str, password: &str) -> bool {
        // Digests of equal length compared: nothing about the password
        // leaks through the time the comparison takes.
        user == self.user && digest(user, password) == self.digest
    }
}

fn digest(user: &str, password: &str) -> [u8; 32] {
    sha2::Sha256::digest(format!("{user}:{password}").as_bytes()).into()
}

#[derive(Clone)]
struct AppState {
    login: Login,
    sessions: Arc<Mutex<Vec<String>>>,
    snapshots: watch::Receiver<String>,
    live: Arc<Mutex<live::Live>>,
    archive: Option<Arc<history::Archive>>,
}

impl AppState {
    /// The archive for a signed-in page, or the answer why not.
    fn archive(&self, headers: &HeaderMap) -> Result<&history::Archive, Response> {
        if !self.signed_in(headers) {
            return Err((StatusCode::UNAUTHORIZED, "log in first").into_response());
        }
        self.archive.as_deref().ok_or_else(|| {
            (StatusCode::SERVICE_UNAVAILABLE, "no archive: start the dashboard with --database-url").into_response()
        })
    }

    fn signed_in(&self, headers: &HeaderMap) -> bool {
        let Some(cookie) = headers.get(header::COOKIE).and_then(|v| v.to_str().ok()) else { return false };
        let ids: HashSet<&str> = cookie
            .split(';')
            .filter_map(|c| c.trim().strip_prefix(SESSION_COOKIE)?.strip_prefix('='))
            .collect();
        let sessions = self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        sessions.iter().any(|s| ids.contains(s.as_str()))
    }
}

#[derive(serde::Deserialize)]
struct LoginForm {
    user: String,
    password: String,
}

/// The page's router.
fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/app.js", get(script))
        .route("/login", post(sign_in))
        .route("/live", get(live_stream))
        .route("/history", get(past))
        .route("/agent", get(agent_recent))
        .route("/alerts/ack", post(acknowledge))
        .with_state(state)
}

#[derive(serde::Deserialize)]
struct RangeQuery {
    range: String,
}

async fn past(State(s): State<AppState>, headers: HeaderMap, Query(q): Query<RangeQuery>) -> Response {
    let archive = match s.archive(&headers) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let Some(range) = history::Range::parse(&q.range) else {
        return (StatusCode::BAD_REQUEST, "range: expected 15m, 1h, 24h or 7d").into_response();
    };
    match archive.history(range, chrono::Utc::now()).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => archive_failed(&e),
    }
}

#[derive(serde::Deserialize)]
struct AgentQuery {
    id: String,
}

async fn agent_recent(State(s): State<AppState>, headers: HeaderMap, Query(q): Query<AgentQuery>) -> Response {
    let archive = match s.archive(&headers) {
        Ok(a) => a,
        Err(r) => return r,
    };
    match archive.agent(&q.id).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => archive_failed(&e),
    }
}

#[derive(serde::Deserialize)]
struct AckForm {
    id: uuid::Uuid,
}

async fn acknowledge(State(s): State<AppState>, headers: HeaderMap, Form(f): Form<AckForm>) -> Response {
    let archive = match s.archive(&headers) {
        Ok(a) => a,
        Err(r) => return r,
    };
    match archive.acknowledge(f.id, &s.login.user).await {
        Ok(Some((by, at))) => {
            tracing::info!(alert = %f.id, by = %by, "alert acknowledged");
            s.live.lock().unwrap_or_else(std::sync::PoisonError::into_inner).acknowledge(f.id, &by, at);
            Json(serde_json::json!({"acknowledged_by": by, "acknowledged_at": at})).into_response()
        }
        Ok(None) => (StatusCode::NOT_FOUND, "the archive does not hold this alert yet; try again in a moment").into_response(),
        Err(e) => archive_failed(&e),
    }
}

fn archive_failed(e: &anyhow::Error) -> Response {
    tracing::warn!(error = %format!("{e:#}"), "dashboard: archive query failed");
    (StatusCode::BAD_GATEWAY, format!("{e:#}")).into_response()
}

async fn index() -> Html<&'static str> {
    Html(PAGE)
}

async fn script() -> Response {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], SCRIPT).into_response()
}

async fn sign_in(State(s): State<AppState>, Form(f): Form<LoginForm>) -> Response {
    if !s.login.accepts(&f.user, &f.password) {
        tracing::warn!(user = %f.user, "dashboard login refused");
        return (StatusCode::UNAUTHORIZED, "wrong user or password").into_response();
    }
    let id = format!("{:032x}", rand::random::<u128>());
    {
        let mut sessions = s.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if sessions.len() >= MAX_SESSIONS {
            sessions.remove(0);
        }
        sessions.push(id.clone());
    }
    let cookie = format!("{SESSION_COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

async fn live_stream(State(s): State<AppState>, headers: HeaderMap) -> Response {
    if !s.signed_in(&headers) {
        return (StatusCode::UNAUTHORIZED, "log in first").into_response();
    }
    let mut rx = s.snapshots.clone();
    let first = rx.borrow_and_update().clone();
    let rest = futures::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        let snapshot = rx.borrow_and_update().clone();
        Some((snapshot, rx))
    });
    let events = futures::stream::once(async move { first })
        .chain(rest)
        .map(|data| Ok::<_, Infallible>(Event::default().data(data)));
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

/// Serves the dashboard on `listen` for the broker `client` reaches until
/// `stop`; returns the address it bound once it serves.
pub async fn serve(
    client: async_nats::Client,
    login: Login,
    listen: SocketAddr,
    database_url: Option<String>,
    stop: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the dashboard to {listen} (--listen)"))?;
    let bound = listener.local_addr()?;
    let state = Arc::new(Mutex::new(live::Live::default()));
    let archive = database_url.map(|url| Arc::new(history::Archive::new(url)));
    if let Some(archive) = &archive {
        match archive.acknowledged().await {
            Ok(acked) => {
                let mut live = state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                for (id, by, at) in acked {
                    live.acknowledge(id, &by, at);
                }
            }
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "dashboard: cannot read acknowledged alerts; going on without"),
        }
    }
    let (tx, rx) = watch::channel(String::from("{}"));
    let mut watchers = watch_broker(client.clone(), state.clone(), stop.clone()).await?;
    watchers.push(tokio::spawn(watch_pipeline(client, state.clone(), stop.clone())));
    watchers.push(tokio::spawn(take_in_gulps(stop.clone())));
    let pusher = {
        let (stop, state) = (stop.clone(), state.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PUSH_EVERY);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let snapshot = {
                    let mut live = state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    live.snapshot(chrono::Utc::now())
                };
                let _ = tx.send(snapshot.to_string());
            }
        })
    };
    let app = router(AppState {
        login,
        sessions: Arc::new(Mutex::new(Vec::new())),
        snapshots: rx,
        live: state,
        archive,
    });
    let server = tokio::spawn(async move {
        let shutdown = stop.clone();
        let served = axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await;
        stop.cancel();
        let _ = pusher.await;
        for w in watchers {
            let _ = w.await;
        }
        served.context("serving the dashboard")
    });
    Ok((bound, server))
}

/// The subscriptions that feed `state`: events, replies, alerts (after
/// each rule's last alert, read from `ALERTS`).
async fn watch_broker(
    client: async_nats::Client,
    state: Arc<Mutex<live::Live>>,
    stop: CancellationToken,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let js = jetstream::new(client.clone());
    let last_alerts = ferry_schema::alert::read_last(&js).await.context("run `ferry provision` if ALERTS is missing")?;
    {
        let mut live = state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for a in last_alerts {
            live.alert(a);
        }
    }
    let mut tasks = Vec::new();
    // Every event kind but the counted one (see live::READ_KINDS).
    let events = live::READ_KINDS.map(|k| (subject::events_of_kind(k).to_string(), Feed::Events));
    let rest = [
        (subject::all_replies().to_string(), Feed::Replies),
        (subject::all_alerts().to_string(), Feed::Alerts),
        (subject::all_dead_letters().to_string(), Feed::DeadLetters),
    ];
    for (subject, what) in events.into_iter().chain(rest) {
        let mut sub = client.subscribe(subject.clone()).await.with_context(|| format!("subscribing to {subject}"))?;
        let (state, stop) = (state.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = stop.cancelled() => return,
                    m = sub.next() => match m { Some(m) => m, None => return },
                };
                let mut live = state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                match what {
                    Feed::Events => live.event(msg.subject.as_str(), msg.headers.as_ref(), &msg.payload, chrono::Utc::now()),
                    Feed::Replies => live.reply(msg.headers.as_ref(), &msg.payload, chrono::Utc::now()),
                    Feed::Alerts => {
                        if let Ok(a) = Alert::from_json(&msg.payload) {
                            live.alert(a);
                        }
                    }
                    Feed::DeadLetters => live.dead_letter(msg.headers.as_ref()),
                }
            }
        }));
    }
    Ok(tasks)
}

#[derive(Debug, Clone, Copy)]
enum Feed {
    Events,
    Replies,
    Alerts,
    DeadLetters,
}

/// How long the dashboard's one thread rests between rounds of work.
pub const GULP: Duration = Duration::from_millis(25);

/// Makes the dashboard's thread (a current-thread runtime) rest [`GULP`]
/// between rounds: what the broker sends meanwhile waits in the socket and
/// is read, decoded and counted in one round, instead of each message
/// waking the thread on its own (a wake-up cost more than the message).
/// A page's request and a push wait at most that long.
async fn take_in_gulps(stop: CancellationToken) {
    while !stop.is_cancelled() {
        // Blocking on purpose: nothing else may run while it rests.
        std::thread::sleep(GULP);
        tokio::task::yield_now().await;
    }
}

/// Every [`PIPELINE_EVERY`], the consumers' lag and the replicas online
/// into `state`; a failed look is logged once and tried again.
async fn watch_pipeline(client: async_nats::Client, state: Arc<Mutex<live::Live>>, stop: CancellationToken) {
    let js = jetstream::new(client.clone());
    let mut failing = false;
    loop {
        let looked = async {
            let stored = js.get_stream(EVENTS_STREAM).await.context("looking up EVENTS")?.cached_info().state.last_sequence;
            let lags = crate::stats::worker_lags(&js).await?;
            let services = crate::stats::service_stats(&client, REPLICAS_WAIT).await?;
            anyhow::Ok((stored, lags, services))
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            r = looked => match r {
                Ok((stored, lags, services)) => {
                    failing = false;
                    let mut live = state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    live.stored_through(stored, chrono::Utc::now());
                    live.pipeline(lags, services.into_iter().map(|s| s.name));
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %format!("{e:#}"), "dashboard: cannot read the consumers' lag; trying again");
                    }
                    failing = true;
                }
            },
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PIPELINE_EVERY) => {}
        }
    }
}

/// `ferry dashboard`: serves until Ctrl-C.
pub async fn run(args: DashboardArgs) -> anyhow::Result<()> {
    let conn = args
        .conn
        .or_local_operator(&args.data_dir, "ferry dashboard", "pass the operator's --password")?;
    let login = match &conn.auth {
        ferry_schema::connect::Auth::UserPassword { user, password } => Login::new(user, password),
        _ => anyhow::bail!("the dashboard's login is the operator's user and password: pass --user and --password"),
    };
    let client = conn.connect().await.context("connecting to NATS")?;
    let stop = CancellationToken::new();
    let (bound, server) = serve(client, login, args.listen, args.database_url.clone(), stop.clone()).await?;
    eprintln!("ferry: dashboard on http://{bound}/ (log in as the operator; Ctrl-C stops)");
    let mut server = server;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => stop.cancel(),
        r = &mut server => return r?,
    }
    server.await?
}
