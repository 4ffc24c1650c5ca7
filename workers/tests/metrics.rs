//! Prometheus metrics of a real rules worker after a known load (its own test binary: the metrics are process-wide).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{chat, publish, stack, RULES};
use ferry_schema::topology::{DEADLETTER_STREAM, REPLIES_STREAM};
use ferry_schema::{headers, subject, AgentId, Encoding};
use ferry_stack::inspect;
use ferry_workers::metrics;

fn scrape(addr: std::net::SocketAddr) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: test\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200"), "{out}");
    assert!(out.to_ascii_lowercase().contains("content-type: application/openmetrics-text"), "{out}");
    out
}

/// The value of the sample `name{labels}` in a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rules_worker_exports_what_it_did() {
    let server = metrics::serve("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = server.addr();
    let s = stack(RULES, Duration::from_secs(30)).await;

    let client = s.nats.role(ferry_schema::topology::Role::Rules, "test-rules").connect().await.unwrap();
    let mut cfg = ferry_workers::rules::RulesConfig::new(s.rules_file.path());
    cfg.consume.lag_every = Duration::from_millis(100);
    let stop = tokio_util::sync::CancellationToken::new();
    let token = stop.clone();
    let worker = tokio::spawn(async move { ferry_workers::rules::run(client, &cfg, token).await });

    // 20 chats answered, 3 malformed ones dead-lettered.
    for i in 0..20 {
        publish(&s.js, &chat("desk-1", &format!("hello {i}")), Encoding::MsgPack, true).await;
    }
    let agent = AgentId::new("desk-2").unwrap();
    for i in 0..3 {
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::CONTENT_TYPE, headers::CONTENT_TYPE_JSON);
        let body = format!("{{\"not\": \"an event {i}\"}}");
        s.js.publish_with_headers(subject::event(&agent, ferry_schema::EventKind::Chat), h, body.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    inspect::wait_for_count(&s.js, REPLIES_STREAM, 20, Duration::from_secs(60)).await.unwrap();
    inspect::wait_for_count(&s.js, DEADLETTER_STREAM, 3, Duration::from_secs(60)).await.unwrap();

    // The only replica in this test binary is replica 0; what the broker
    // says of the consumer carries no replica.
    let labels = r#"{role="rules",consumer="rules",replica="0""#;
    let consumer = r#"{role="rules",consumer="rules"}"#;
    let want = [
        (format!("{}_total{labels},outcome=\"done\"}}", metrics::MESSAGES), 20.0),
        (format!("{}_total{labels},outcome=\"poison\"}}", metrics::MESSAGES), 3.0),
        (format!("{}_count{labels}}}", metrics::HANDLING_SECONDS), 23.0),
        (format!("{}{labels}}}", metrics::IN_FLIGHT), 0.0),
        (format!("{}{consumer}", metrics::CONSUMER_PENDING), 0.0),
        (format!("{}{consumer}", metrics::CONSUMER_ACK_PENDING), 0.0),
    ];
    // Acks (and so the counters) follow the replies by a moment; the lag
    // gauges follow the broker every 100 ms. Poll until they agree.
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = tokio::task::spawn_blocking(move || scrape(addr)).await.unwrap();
        if want.iter().all(|(series, v)| sample(&text, series) == Some(*v)) || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (series, v) in &want {
        assert_eq!(sample(&text, series), Some(*v), "{series} in\n{text}");
    }
    assert_eq!(sample(&text, &format!("{}_total{labels},outcome=\"retry\"}}", metrics::MESSAGES)), Some(0.0));
    for name in [metrics::ACK_FAILURES, metrics::CONSUMER_REDELIVERED] {
        assert!(text.contains(&format!("# TYPE {name}")), "{name} missing in\n{text}");
    }

    // Anything but /metrics is a 404 that says where the metrics are.
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    assert!(out.contains("404") && out.contains("/metrics"), "{out}");

    // /health is 200 while the loop pulls, and 503 once it stopped.
    let health = get(addr, "/health");
    assert!(health.starts_with("HTTP/1.1 200") || health.starts_with("HTTP/1.0 200"), "{health}");
    for part in [r#""role":"rules""#, r#""consumer":"rules""#, r#""up":true"#] {
        assert!(health.contains(part), "{part} missing from {health}");
    }
    assert!(health.contains(r#""status":"ok""#), "{health}");
    assert_eq!(sample(&text, &format!("{}{labels}}}", metrics::LOOP_UP)), Some(1.0));
    // The micro service's status (and `nats micro stats`) names each loop too.
    let op = s.nats.operator("test-status").connect().await.unwrap();
    let status = op.request(ferry_schema::subject::service_status("rules"), "".into()).await.unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.payload).unwrap();
    assert_eq!(status["loops"], serde_json::json!([{"consumer": "rules", "up": true}]), "{status}");
    stop.cancel();
    worker.await.unwrap().unwrap();
    let health = get(addr, "/health");
    assert!(health.contains(" 503 ") && health.contains(r#""status":"degraded""#) && health.contains(r#""up":false"#), "{health}");
}

fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    out
}
