//! Headless Chromium (Debian's `chromium`) driven over the DevTools protocol: open a page, run JavaScript in it, wait for what it shows, take a screenshot.

use std::time::{Duration, Instant};

use futures::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// How long the browser gets to start, and one DevTools call to answer.
pub const WAIT: Duration = Duration::from_secs(60);

/// Why the browser could not be driven.
#[derive(Debug, thiserror::Error)]
pub enum BrowserError {
    /// Chromium is not installed and could not be.
    #[error(transparent)]
    Install(#[from] crate::StackError),
    /// Starting it, or a temporary profile, failed.
    #[error("starting chromium: {0}")]
    Start(#[from] std::io::Error),
    /// Its DevTools endpoint never answered.
    #[error("chromium's DevTools never answered on port {0}")]
    NoDevTools(u16),
    /// The DevTools WebSocket failed.
    #[error("DevTools WebSocket: {0}")]
    Socket(#[from] tokio_tungstenite::tungstenite::Error),
    /// A call went unanswered within [`WAIT`], or the socket closed.
    #[error("DevTools did not answer {0}")]
    NoAnswer(String),
    /// A call was refused, or a script threw.
    #[error("{method}: {detail}")]
    Refused {
        /// The method called (or the script evaluated).
        method: String,
        /// What DevTools said.
        detail: String,
    },
}

/// A child process killed when dropped.
#[derive(Debug)]
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One page of a headless Chromium of its own (its own profile), closed
/// when dropped.
#[derive(Debug)]
pub struct Page {
    ws: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    next_id: u64,
    browser: Killed,
    _profile: tempfile::TempDir,
}

/// `GET path` on 127.0.0.1:`port`, the body when it came whole.
async fn http_get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await.ok()?.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        let Some((head, body)) = text.split_once("\r\n\r\n") else { continue };
        let len: usize = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().ok()))??;
        if body.len() >= len {
            return Some(body[..len].to_string());
        }
    }
}

impl Page {
    /// Starts Chromium (installing Debian's package once) on `about:blank`
    /// with a window of `width` x `height`.
    pub async fn open(width: u32, height: u32) -> Result<Self, BrowserError> {
        let chromium = crate::install::ensure("chromium", "chromium")?;
        let profile = tempfile::tempdir()?;
        let port = ferry_stack::free_port()?;
        let browser = std::process::Command::new(chromium)
            .args(["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run"])
            .arg(format!("--window-size={width},{height}"))
            .arg(format!("--remote-debugging-port={port}"))
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let browser = Killed(browser);
        let deadline = Instant::now() + WAIT;
        let url = loop {
            let pages: Option<Value> = http_get(port, "/json/list").await.and_then(|b| serde_json::from_str(&b).ok());
            let found = pages.as_ref().and_then(|p| {
                p.as_array()?
                    .iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(String::from))
            });
            if let Some(u) = found {
                break u;
            }
            if Instant::now() >= deadline {
                return Err(BrowserError::NoDevTools(port));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str()).await?;
        Ok(Self {
            ws,
            next_id: 0,
            browser,
            _profile: profile,
        })
    }

    /// The browser's process id (for its CPU time).
    pub fn pid(&self) -> u32 {
        self.browser.0.id()
    }

    /// Calls DevTools `method` with `params`; its result.
    pub async fn call(&mut self, method: &str, params: Value) -> Result<Value, BrowserError> {
        self.next_id += 1;
        let id = self.next_id;
        self.ws.send(Message::text(json!({"id": id, "method": method, "params": params}).to_string())).await?;
        loop {
            let m = match tokio::time::timeout(WAIT, self.ws.next()).await {
                Ok(Some(m)) => m?,
                _ => return Err(BrowserError::NoAnswer(method.to_string())),
            };
            let Message::Text(t) = m else { continue };
            let Ok(v) = serde_json::from_str::<Value>(&t) else { continue };
            if v["id"] == id {
                if let Some(e) = v.get("error") {
                    return Err(BrowserError::Refused { method: method.to_string(), detail: e.to_string() });
                }
                return Ok(v["result"].clone());
            }
        }
    }

    /// Evaluates `expr` in the page (awaiting a promise); its value.
    pub async fn eval(&mut self, expr: &str) -> Result<Value, BrowserError> {
        let r = self
            .call("Runtime.evaluate", json!({"expression": expr, "awaitPromise": true, "returnByValue": true}))
            .await?;
        if let Some(e) = r.get("exceptionDetails") {
            return Err(BrowserError::Refused { method: expr.to_string(), detail: e.to_string() });
        }
        Ok(r["result"]["value"].clone())
    }

    /// Waits up to [`WAIT`] until `expr` is `true`; `Ok(Err(text))` with
    /// the page's text when it never became so.
    pub async fn wait_until(&mut self, expr: &str) -> Result<Result<(), String>, BrowserError> {
        let deadline = Instant::now() + WAIT;
        while self.eval(expr).await? != Value::Bool(true) {
            if Instant::now() >= deadline {
                let body = self.eval("document.body ? document.body.innerText : ''").await?;
                return Ok(Err(body.as_str().unwrap_or_default().to_string()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Ok(()))
    }

    /// A PNG of the whole page (the window grown to the page's height, at
    /// most 4000 pixels).
    pub async fn screenshot(&mut self, width: u32) -> Result<Vec<u8>, BrowserError> {
        let height = self.eval("document.documentElement.scrollHeight").await?.as_u64().unwrap_or(1000);
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height.clamp(600, 4000), "deviceScaleFactor": 1, "mobile": false}),
        )
        .await?;
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"})).await?;
        let data = shot["data"].as_str().unwrap_or_default();
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, data)
            .map_err(|e| BrowserError::Refused { method: "Page.captureScreenshot".into(), detail: e.to_string() })
    }
}
