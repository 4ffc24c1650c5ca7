//! The adapter protocol's tests: lines as documented, and a client talking to a server on loopback.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ferry_schema::event::{ChatType, EventBody};
use ferry_schema::{AgentId, EventId};
use tokio::io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::token::token_matches;
use super::{load_or_create_token, AdapterError, AdapterServer, FromClient, SendError, ToClient, TOKEN_FILE};
use crate::health::Health;
use crate::spool::Spool;

const TEST_TOKEN: &str = "test-token";

#[test]
fn lines_parse_as_documented() {
    let m: FromClient = serde_json::from_str(
        r#"{"type":"message","chat":"张三","chat_type":"group","sender":"李四","content":"你好","msg_type":"text","time":"2026-11-22T10:00:00+08:00","ref":"7"}"#,
    )
    .unwrap();
    let FromClient::Message { chat_type, time, reference, .. } = m else { panic!() };
    assert_eq!(chat_type, ChatType::Group);
    assert_eq!(time.unwrap().to_rfc3339(), "2026-11-22T02:00:00+00:00");
    assert_eq!(reference.as_deref(), Some("7"));
    let e = serde_json::from_str::<FromClient>(r#"{"type":"message","chat":"a","sender":"a"}"#).unwrap_err();
    assert!(e.to_string().contains("missing field `content`"), "{e}");
    let e = serde_json::from_str::<FromClient>(r#"{"type":"fax"}"#).unwrap_err();
    assert!(e.to_string().contains("unknown variant `fax`"), "{e}");
    let line = serde_json::to_string(&ToClient::Send {
        reply_id: "r".into(),
        event_id: EventId(uuid::Uuid::nil()),
        chat: "c".into(),
        text: "t".into(),
    })
    .unwrap();
    assert_eq!(
        line,
        r#"{"type":"send","reply_id":"r","event_id":"00000000-0000-0000-0000-000000000000","chat":"c","text":"t"}"#
    );
}

#[tokio::test]
async fn a_client_talks_the_protocol() {
    let server = AdapterServer::bind("127.0.0.1:0".parse().unwrap(), TEST_TOKEN).await.unwrap();
    let addr = server.local_addr().unwrap();
    let clients = server.clients();
    let spooled = server.spooled();
    let (tx, mut rx) = mpsc::channel(8);
    let stop = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(crate::spool::SpoolConfig::new(dir.path())).unwrap();
    tokio::spawn(server.run(AgentId::new("desk-1").unwrap(), spool, tx, Health::default(), stop.clone()));
    let stream = TcpStream::connect(addr).await.unwrap();
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r).lines();
    w.write_all(b"{\"type\":\"hello\",\"v\":1,\"token\":\"test-token\",\"name\":\"t\",\"sends\":true}\n").await.unwrap();
    assert!(r.next_line().await.unwrap().unwrap().contains("\"welcome\""));
    w.write_all(b"{\"type\":\"message\",\"chat\":\"A\",\"sender\":\"A\",\"content\":\"hi\",\"ref\":\"1\"}\nnot json\n")
        .await
        .unwrap();
    let env = rx.recv().await.unwrap();
    assert!(matches!(env.body, EventBody::Chat(ref c) if c.text == "hi" && c.chat == "A"));
    // No `accepted` before the spool's commit: the bad line's answer
    // comes first.
    assert!(r.next_line().await.unwrap().unwrap().contains("bad line"));
    // The same adapter offers it again on another connection before the
    // commit: it is the same event, not a second one.
    let again = TcpStream::connect(addr).await.unwrap();
    let (r2, mut w2) = again.into_split();
    let mut r2 = BufReader::new(r2).lines();
    w2.write_all(b"{\"type\":\"hello\",\"v\":1,\"token\":\"test-token\",\"name\":\"t\"}\n").await.unwrap();
    assert!(r2.next_line().await.unwrap().unwrap().contains("\"welcome\""));
    w2.write_all(b"{\"type\":\"message\",\"chat\":\"A\",\"sender\":\"A\",\"content\":\"hi\",\"ref\":\"1\"}\n{\"type\":\"ping\"}\n")
        .await
        .unwrap();
    assert!(r2.next_line().await.unwrap().unwrap().contains("\"pong\""));
    assert!(rx.try_recv().is_err(), "the message offered again was queued again");
    spooled.committed(std::slice::from_ref(&env));
    let accepted = r.next_line().await.unwrap().unwrap();
    assert!(accepted.contains("\"accepted\"") && accepted.contains(&env.id.to_string()) && accepted.contains("\"ref\":\"1\""), "{accepted}");
    let accepted = r2.next_line().await.unwrap().unwrap();
    assert!(accepted.contains("\"accepted\"") && accepted.contains(&env.id.to_string()), "{accepted}");
    drop((r2, w2));
    clients.wait_for_sender().await;
    let send = |reply_id: &'static str, within: Duration| {
        let clients = clients.clone();
        let line = ToClient::Send {
            reply_id: reply_id.into(),
            event_id: env.id,
            chat: "A".into(),
            text: format!("hello {reply_id}"),
        };
        tokio::spawn(async move { clients.send_confirmed(reply_id, line, within).await })
    };
    // `sent` confirms a send.
    let sending = send("r1", Duration::from_secs(30));
    assert!(r.next_line().await.unwrap().unwrap().contains("\"text\":\"hello r1\""));
    w.write_all(b"{\"type\":\"sent\",\"reply_id\":\"r1\"}\n").await.unwrap();
    sending.await.unwrap().unwrap();
    // `send_failed` says why.
    let sending = send("r2", Duration::from_secs(30));
    assert!(r.next_line().await.unwrap().unwrap().contains("hello r2"));
    w.write_all(b"{\"type\":\"send_failed\",\"reply_id\":\"r2\",\"error\":\"window closed\"}\n").await.unwrap();
    let failed = sending.await.unwrap();
    assert!(matches!(&failed, Err(SendError::Failed(e)) if e == "window closed"), "{failed:?}");
    // No answer in time.
    let sending = send("r3", Duration::from_millis(200));
    assert!(r.next_line().await.unwrap().unwrap().contains("hello r3"));
    assert!(matches!(sending.await.unwrap(), Err(SendError::Unconfirmed(_))));
    // A client that leaves fails the send waiting on it at once.
    let sending = send("r4", Duration::from_secs(60));
    assert!(r.next_line().await.unwrap().unwrap().contains("hello r4"));
    drop((r, w));
    let gone = tokio::time::timeout(Duration::from_secs(10), sending).await.unwrap().unwrap();
    assert!(matches!(gone, Err(SendError::Disconnected)), "{gone:?}");
    stop.cancel();
}

/// An assistant on the PC, connected as a listener, reports interactions:
/// each becomes an `interaction` event, `accepted` after the commit, and
/// offered again with its `ref` it is the same event.
#[tokio::test]
async fn a_listener_reports_interactions() {
    let server = AdapterServer::bind("127.0.0.1:0".parse().unwrap(), TEST_TOKEN).await.unwrap();
    let addr = server.local_addr().unwrap();
    let spooled = server.spooled();
    let (tx, mut rx) = mpsc::channel(8);
    let stop = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(crate::spool::SpoolConfig::new(dir.path())).unwrap();
    tokio::spawn(server.run(AgentId::new("desk-1").unwrap(), spool, tx, Health::default(), stop.clone()));
    let (r, mut w) = TcpStream::connect(addr).await.unwrap().into_split();
    let mut r = BufReader::new(r).lines();
    w.write_all(b"{\"type\":\"hello\",\"v\":1,\"token\":\"test-token\",\"name\":\"assistant\"}\n").await.unwrap();
    assert!(r.next_line().await.unwrap().unwrap().contains("\"welcome\""));
    let line = br#"{"type":"interaction","session_id":"s-9","user_input":"refund?","intent":"refund","tools_used":["orders.lookup"],"response_time_ms":840.5,"success":false,"error_type":"timeout","time":"2026-12-05T09:00:00Z","ref":"i-1"}"#;
    w.write_all(line).await.unwrap();
    w.write_all(b"\n{\"type\":\"interaction\",\"session_id\":\"s-9\"}\n").await.unwrap();
    let env = rx.recv().await.unwrap();
    let EventBody::Interaction(i) = &env.body else { panic!("{env:?}") };
    assert_eq!((i.session_id.as_str(), i.response_time_ms, i.success), ("s-9", 840.5, false));
    assert_eq!((i.intent.as_deref(), i.error_type.as_deref()), (Some("refund"), Some("timeout")));
    assert_eq!(i.tools_used, ["orders.lookup"]);
    assert_eq!(env.ts.to_rfc3339(), "2026-12-05T09:00:00+00:00");
    // A line without the required fields is refused with what is missing.
    let refused = r.next_line().await.unwrap().unwrap();
    assert!(refused.contains("\"error\"") && refused.contains("response_time_ms"), "{refused}");
    spooled.committed(std::slice::from_ref(&env));
    let accepted = r.next_line().await.unwrap().unwrap();
    assert!(accepted.contains("\"accepted\"") && accepted.contains(&env.id.to_string()) && accepted.contains("\"ref\":\"i-1\""), "{accepted}");
    stop.cancel();
}

#[tokio::test]
async fn wrong_version_and_non_loopback_are_refused() {
    assert!(matches!(
        AdapterServer::bind("0.0.0.0:0".parse().unwrap(), TEST_TOKEN).await,
        Err(AdapterError::NotLoopback(_))
    ));
    let server = AdapterServer::bind("127.0.0.1:0".parse().unwrap(), TEST_TOKEN).await.unwrap();
    let addr = server.local_addr().unwrap();
    let (tx, _rx) = mpsc::channel(8);
    let stop = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(crate::spool::SpoolConfig::new(dir.path())).unwrap();
    tokio::spawn(server.run(AgentId::new("desk-1").unwrap(), spool, tx, Health::default(), stop.clone()));
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"{\"type\":\"hello\",\"v\":2}\n").await.unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    assert!(text.contains("unsupported protocol version 2; this agent speaks 1"), "{text}");
    // Without the token, or with a wrong one: refused and closed.
    for hello in [
        &b"{\"type\":\"hello\",\"v\":1,\"name\":\"x\",\"sends\":true}\n"[..],
        &b"{\"type\":\"hello\",\"v\":1,\"token\":\"test-tokem\",\"sends\":true}\n"[..],
    ] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(hello).await.unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        assert!(text.contains("must carry the token") && !text.contains("welcome"), "{text}");
    }
    // With it: welcome; a second sender meanwhile is refused.
    let first = TcpStream::connect(addr).await.unwrap();
    let (r1, mut w1) = first.into_split();
    let mut r1 = BufReader::new(r1).lines();
    w1.write_all(b"{\"type\":\"hello\",\"v\":1,\"token\":\"test-token\",\"name\":\"a\",\"sends\":true}\n").await.unwrap();
    assert!(r1.next_line().await.unwrap().unwrap().contains("\"welcome\""));
    let mut second = TcpStream::connect(addr).await.unwrap();
    second.write_all(b"{\"type\":\"hello\",\"v\":1,\"token\":\"test-token\",\"name\":\"b\",\"sends\":true}\n").await.unwrap();
    let mut text = String::new();
    second.read_to_string(&mut text).await.unwrap();
    assert!(text.contains("another adapter") && text.contains("one at a time"), "{text}");
    stop.cancel();
}

/// The token file is made once, private to the user, and kept.
#[test]
fn the_token_is_made_once_and_private() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let t = load_or_create_token(dir.path()).unwrap();
    assert!(t.len() >= 32);
    assert_eq!(load_or_create_token(dir.path()).unwrap(), t);
    let mode = std::fs::metadata(dir.path().join(TOKEN_FILE)).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(token_matches(&t, &t) && !token_matches("x", &t));
}
