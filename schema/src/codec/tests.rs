//! Data-driven codec tests: round trips, hand-typed JSON, and every decode error.

use super::*;
use crate::event::{
    Activity, ChatMessage, ChatType, ComponentStatus, Heartbeat, Interaction, MessageType, PredictRequest,
    RecentActivity,
};
use crate::reply::{ChatReply, PredictionReply};
use crate::reply::{AnsweredBy, ChatAction, ResponderKind};
use serde_json::json;

const LIMIT: usize = DEFAULT_MAX_PAYLOAD;

fn agent() -> AgentId {
    AgentId::new("desk-7").unwrap()
}

fn ts() -> DateTime<Utc> {
    "2026-11-22T10:00:00.123Z".parse().unwrap()
}

fn sample_events() -> Vec<Envelope> {
    let bodies = vec![
        EventBody::Chat(ChatMessage {
            chat: "Alice 李".into(),
            chat_type: ChatType::Group,
            sender: "Alice".into(),
            text: "你好, where is my order?".into(),
            msg_type: MessageType::Text,
        }),
        EventBody::Activity(Activity {
            app: "chrome.exe".into(),
            title: "Orders - Admin".into(),
            exe: Some(r"C:\Program Files\Google\Chrome\chrome.exe".into()),
            pid: Some(4242),
            site: Some("admin.example".into()),
            afk: false,
            duration_ms: 61_000,
        }),
        EventBody::Heartbeat(Heartbeat {
            version: "0.1.0".into(),
            cpu_percent: 0.4,
            rss_bytes: 9_000_000,
            spool_depth: 3,
            oldest_unsent_ms: Some(1200),
            components: vec![ComponentStatus {
                name: "foreground".into(),
                ok: true,
                detail: None,
            }],
        }),
        EventBody::Predict(PredictRequest {
            recent: vec![RecentActivity {
                at: ts(),
                app: "excel.exe".into(),
                title: "Q3.xlsx".into(),
                duration_ms: 5000,
            }],
        }),
        EventBody::Interaction(Interaction {
            session_id: "s-81".into(),
            user_input: "where is my refund?".into(),
            intent: Some("refund_status".into()),
            tools_used: vec!["orders.lookup".into(), "kb.search".into()],
            response_time_ms: 812.5,
            success: false,
            error_type: Some("tool_error".into()),
            model: Some("smollm2".into()),
            tokens: Some(57),
        }),
    ];
    bodies
        .into_iter()
        .map(|body| Envelope {
            id: EventId::new(),
            agent: agent(),
            ts: ts(),
            body,
        })
        .collect()
}

#[test]
fn events_round_trip_in_both_encodings() {
    for enc in [Encoding::MsgPack, Encoding::Json] {
        for env in sample_events() {
            let bytes = encode_event(&env, enc).unwrap();
            let back = decode_event(&bytes, enc, LIMIT).unwrap();
            assert_eq!(back, env, "{enc:?} {:?}", env.kind());
        }
    }
}

/// A reply body of each kind but chat.
fn prediction_and_alert() -> [ReplyBody; 2] {
    [
        ReplyBody::Prediction(PredictionReply {
            prediction: "open Outlook".into(),
            confidence: 0.5,
            model: "smollm2".into(),
            processing_ms: 812.0,
            timings: Some(crate::reply::Timings {
                queue_ms: 3.5,
                wait_ms: 0.25,
                prompt_tokens: 120,
                prompt_ms: 40.0,
                generated_tokens: 12,
                generation_ms: 250.0,
                engine: "mistral.rs".into(),
                format: "Q8_0".into(),
            }),
        }),
        ReplyBody::Alert(crate::reply::AlertReply {
            rule: "no-games".into(),
            message: "Games are not allowed at the desk".into(),
            processing_ms: 0.1,
        }),
    ]
}

#[test]
fn replies_round_trip_in_both_encodings() {
    let event = EventId::new();
    let bodies = [
        ReplyBody::Chat(ChatReply {
            chat: "Alice".into(),
            action: ChatAction::Reply,
            content: Some("您好！".into()),
            confidence: 0.9,
            answered_by: AnsweredBy {
                kind: ResponderKind::Rule,
                name: "greeting".into(),
            },
            processing_ms: 0.25,
            tokens: None,
            timings: None,
        }),
    ]
    .into_iter()
    .chain(prediction_and_alert())
    .collect::<Vec<_>>();
    for enc in [Encoding::MsgPack, Encoding::Json] {
        for body in bodies.clone() {
            let mut r = Reply::new("rules", event, agent(), body);
            r.ts = ts();
            let bytes = encode_reply(&r, enc).unwrap();
            assert_eq!(decode_reply(&bytes, enc, LIMIT).unwrap(), r);
        }
    }
}

#[test]
fn reply_ids_are_deterministic_per_responder() {
    let e = EventId::new();
    assert_eq!(
        ReplyId::for_event(e, "rules"),
        ReplyId::for_event(e, "rules")
    );
    assert_ne!(
        ReplyId::for_event(e, "rules"),
        ReplyId::for_event(e, "inference")
    );
    assert_ne!(
        ReplyId::for_event(e, "rules"),
        ReplyId::for_event(EventId::new(), "rules")
    );
}

#[test]
fn msgpack_uses_named_fields() {
    let env = &sample_events()[0];
    let bytes = encode_event(env, Encoding::MsgPack).unwrap();
    let doc: serde_json::Value = rmp_serde::from_slice(&bytes).unwrap();
    assert_eq!(doc["kind"], "chat");
    assert_eq!(doc["agent"], "desk-7");
    assert_eq!(doc["v"], 1);
    assert_eq!(doc["body"]["sender"], "Alice");
    assert_eq!(doc["id"], env.id.to_string());
}

/// JSON the way a person types it into `nats pub`: fields in any order,
/// optional fields left out, spaces and newlines.
#[test]
fn hand_typed_json() {
    let typed = r#"
        { "v": 1, "kind": "chat", "agent": "desk-7",
          "id": "0193f3a2-7c4e-7000-8000-000000000001",
          "ts": "2026-11-22T10:00:00Z",
          "body": { "sender": "Bob", "chat": "Bob", "text": "refund please" } }"#;
    let env = decode_event(typed.as_bytes(), Encoding::Json, LIMIT).unwrap();
    assert_eq!(env.id.to_string(), "0193f3a2-7c4e-7000-8000-000000000001");
    let EventBody::Chat(chat) = env.body else {
        panic!("not chat")
    };
    assert_eq!(chat.text, "refund please");
    assert_eq!(chat.chat_type, ChatType::Direct);
    assert_eq!(chat.msg_type, MessageType::Text);
}

#[test]
fn unknown_fields_are_ignored_in_both_encodings() {
    let doc = json!({
        "id": "0193f3a2-7c4e-7000-8000-000000000001", "agent": "desk-7", "kind": "chat",
        "ts": "2026-11-22T10:00:00Z", "v": 1, "future_field": [1, 2, 3],
        "body": {"chat": "c", "sender": "s", "text": "t", "emoji": "🙂"}
    });
    let json_bytes = serde_json::to_vec(&doc).unwrap();
    let mp_bytes = rmp_serde::to_vec_named(&doc).unwrap();
    let a = decode_event(&json_bytes, Encoding::Json, LIMIT).unwrap();
    let b = decode_event(&mp_bytes, Encoding::MsgPack, LIMIT).unwrap();
    assert_eq!(a, b);
}

fn valid_doc() -> serde_json::Value {
    json!({
        "id": "0193f3a2-7c4e-7000-8000-000000000001", "agent": "desk-7", "kind": "chat",
        "ts": "2026-11-22T10:00:00Z", "v": 1,
        "body": {"chat": "c", "sender": "s", "text": "t"}
    })
}

fn with(
    mut doc: serde_json::Value,
    path: &[&str],
    value: Option<serde_json::Value>,
) -> serde_json::Value {
    let (last, parents) = path.split_last().unwrap();
    let mut node = &mut doc;
    for p in parents {
        node = &mut node[*p];
    }
    let map = node.as_object_mut().unwrap();
    match value {
        Some(v) => map.insert(last.to_string(), v),
        None => map.remove(*last),
    };
    doc
}

/// One decode failure: the document (as JSON and as MessagePack) and the
/// error code and message expected for both.
#[track_caller]
fn check_err(doc: &serde_json::Value, code: &str, message: &str) {
    for (enc, bytes) in [
        (Encoding::Json, serde_json::to_vec(doc).unwrap()),
        (Encoding::MsgPack, rmp_serde::to_vec_named(doc).unwrap()),
    ] {
        let err = decode_event(&bytes, enc, LIMIT).unwrap_err();
        assert_eq!(err.code(), code, "{enc:?}: {err}");
        assert!(
            err.to_string().contains(message),
            "{enc:?}: {err:?} does not contain {message:?}"
        );
    }
}

#[test]
fn decode_errors_are_typed() {
    let d = valid_doc;
    check_err(
        &with(d(), &["body", "text"], None),
        "missing_field",
        "required field `body.text` is missing",
    );
    check_err(
        &with(d(), &["id"], None),
        "missing_field",
        "required field `id` is missing",
    );
    check_err(
        &with(d(), &["body"], None),
        "missing_field",
        "required field `body` is missing",
    );
    check_err(
        &with(d(), &["v"], None),
        "missing_field",
        "required field `v` is missing",
    );
    check_err(
        &with(d(), &["v"], Some(json!(99))),
        "unsupported_version",
        "schema version 99 is not supported (this build reads version 1)",
    );
    // An unknown version wins over a changed shape.
    check_err(
        &with(with(d(), &["v"], Some(json!(2))), &["body"], None),
        "unsupported_version",
        "schema version 2",
    );
    check_err(
        &with(d(), &["kind"], Some(json!("fax"))),
        "unknown_kind",
        r#"unknown kind "fax": expected one of chat, activity, heartbeat, predict, interaction"#,
    );
    check_err(
        &with(d(), &["agent"], Some(json!("desk 7"))),
        "invalid_agent_id",
        r#"agent id "desk 7" is not a valid subject token (whitespace ' ' at byte 4"#,
    );
    check_err(
        &with(d(), &["id"], Some(json!("nope"))),
        "invalid_field",
        r#"id "nope" is not a UUID"#,
    );
    check_err(
        &with(d(), &["ts"], Some(json!("yesterday"))),
        "invalid_field",
        "invalid field in head",
    );
    check_err(
        &with(d(), &["body", "text"], Some(json!(5))),
        "invalid_field",
        "invalid field in body",
    );
}

#[test]
fn garbage_and_size() {
    for enc in [Encoding::Json, Encoding::MsgPack] {
        for garbage in [
            &b"\xc1\xc1\xc1 not a document"[..],
            b"",
            b"[1,2,3]",
            b"\x93\x01\x02\x03",
        ] {
            let err = decode_event(garbage, enc, LIMIT).unwrap_err();
            assert_eq!(err.code(), "malformed", "{enc:?} {garbage:?}: {err}");
        }
        let big = vec![b' '; LIMIT + 1];
        let err = decode_event(&big, enc, LIMIT).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "payload of {} bytes exceeds the {LIMIT}-byte limit",
                LIMIT + 1
            )
        );
    }
}

#[test]
fn content_type_selects_encoding() {
    let mut h = HeaderMap::new();
    assert_eq!(Encoding::from_headers(None), Ok(Encoding::MsgPack));
    assert_eq!(Encoding::from_headers(Some(&h)), Ok(Encoding::MsgPack));
    h.insert("Content-Type", "application/json; charset=utf-8");
    assert_eq!(Encoding::from_headers(Some(&h)), Ok(Encoding::Json));
    h.insert("Content-Type", "Application/MsgPack");
    assert_eq!(Encoding::from_headers(Some(&h)), Ok(Encoding::MsgPack));
    h.insert("Content-Type", "text/xml");
    assert_eq!(
        Encoding::from_headers(Some(&h)).unwrap_err().code(),
        "content_type"
    );
}

#[test]
fn subject_must_match_body() {
    let env = &sample_events()[0];
    let bytes = encode_event(env, Encoding::MsgPack).unwrap();
    assert!(decode_event_message("events.desk-7.chat", None, &bytes, LIMIT, None).is_ok());
    let err = decode_event_message("events.desk-8.chat", None, &bytes, LIMIT, None).unwrap_err();
    assert_eq!(err.code(), "subject_mismatch");
    assert_eq!(
        err.to_string(),
        r#"agent in body is "desk-7" but the subject "events.desk-8.chat" says "desk-8""#
    );
    let err = decode_event_message("events.desk-7.activity", None, &bytes, LIMIT, None).unwrap_err();
    assert_eq!(err.code(), "subject_mismatch");
    let err = decode_event_message("events.desk-7", None, &bytes, LIMIT, None).unwrap_err();
    assert_eq!(err.code(), "bad_subject");
}

/// Documents in Ferry's own field order (`v` and `kind` before `body`), so
/// the body is decoded directly instead of buffered: same errors.
#[test]
fn errors_are_the_same_when_the_body_is_decoded_directly() {
    #[derive(serde::Serialize)]
    struct Ordered {
        id: &'static str,
        agent: &'static str,
        kind: &'static str,
        ts: &'static str,
        v: u16,
        body: serde_json::Value,
    }
    let doc = |v: u16, body: serde_json::Value| Ordered {
        id: "0193f3a2-7c4e-7000-8000-000000000001",
        agent: "desk-7",
        kind: "chat",
        ts: "2026-11-22T10:00:00Z",
        v,
        body,
    };
    let cases = [
        (doc(1, json!({"chat": "c", "sender": "s"})), "missing_field", "required field `body.text` is missing"),
        (doc(1, json!({"chat": "c", "sender": "s", "text": 5})), "invalid_field", "invalid field in body"),
        (doc(1, json!([1, 2])), "invalid_field", "invalid field in body"),
        (doc(7, json!({"anything": "else"})), "unsupported_version", "schema version 7"),
    ];
    for (d, code, message) in &cases {
        for (enc, bytes) in [
            (Encoding::Json, serde_json::to_vec(d).unwrap()),
            (Encoding::MsgPack, rmp_serde::to_vec_named(d).unwrap()),
        ] {
            let err = decode_event(&bytes, enc, LIMIT).unwrap_err();
            assert_eq!(err.code(), *code, "{enc:?}: {err}");
            assert!(err.to_string().contains(message), "{enc:?}: {err}");
        }
    }
    let ok = doc(1, json!({"chat": "c", "sender": "s", "text": "t"}));
    let env = decode_event(&rmp_serde::to_vec_named(&ok).unwrap(), Encoding::MsgPack, LIMIT).unwrap();
    assert_eq!(env.agent.as_str(), "desk-7");
}

/// Events for comparing the fast path with the general one: every kind,
/// optional fields present and absent, strings in each of MessagePack's
/// length classes, timestamps with 0, 3, 6 and 9 fraction digits, agent ids
/// of 1 to 64 bytes.
fn varied_events() -> Vec<Envelope> {
    let times = [
        "2026-11-22T10:00:00Z",
        "2026-11-22T10:00:00.123Z",
        "2026-11-22T10:00:00.123456Z",
        "2026-11-22T10:00:00.123456789Z",
        "0001-01-01T00:00:00Z",
    ];
    let agents = ["d", "desk-7", &"a".repeat(31), &"b".repeat(32), &"c".repeat(64)].map(|a| AgentId::new(a).unwrap());
    let mut bodies: Vec<EventBody> = sample_events().into_iter().map(|e| e.body).collect();
    for text in ["", "x", &"字".repeat(11), &"y".repeat(300), &"z".repeat(70_000)] {
        bodies.push(EventBody::Chat(ChatMessage {
            chat: text.chars().take(40).collect(),
            chat_type: ChatType::Direct,
            sender: "s".into(),
            text: text.into(),
            msg_type: MessageType::Image,
        }));
    }
    bodies.push(EventBody::Activity(Activity {
        app: "a".into(),
        title: String::new(),
        exe: None,
        pid: None,
        site: None,
        afk: true,
        duration_ms: u64::MAX,
    }));
    let mut out = Vec::new();
    for (i, body) in bodies.into_iter().enumerate() {
        out.push(Envelope {
            id: EventId::new(),
            agent: agents[i % agents.len()].clone(),
            ts: times[i % times.len()].parse().unwrap(),
            body,
        });
    }
    out
}

fn varied_replies() -> Vec<Reply> {
    let chat = |content: Option<&str>, tokens: Option<u32>| {
        ReplyBody::Chat(ChatReply {
            chat: "Alice".into(),
            action: ChatAction::Escalate,
            content: content.map(str::to_string),
            confidence: 0.25,
            answered_by: AnsweredBy {
                kind: ResponderKind::Model,
                name: "smollm2".into(),
            },
            processing_ms: 1234.567,
            tokens,
            timings: None,
        })
    };
    let bodies = [
        chat(None, None),
        chat(Some("您好！"), Some(17)),
        chat(Some(&"w".repeat(40_000)), Some(u32::MAX)),
    ]
    .into_iter()
    .chain(prediction_and_alert())
    .collect::<Vec<_>>();
    varied_events()
        .into_iter()
        .zip(bodies.into_iter().cycle())
        .map(|(e, body)| {
            let mut r = Reply::new("rules", e.id, e.agent, body);
            r.ts = e.ts;
            r
        })
        .collect()
}

#[test]
fn the_fast_writers_write_the_general_paths_bytes() {
    for env in varied_events() {
        let general = encode_event_by(&env, Encoding::MsgPack, Route::General).unwrap();
        assert_eq!(encode_event_by(&env, Encoding::MsgPack, Route::Fast).unwrap(), general, "{env:?}");
        // The fast path took it (the only head it leaves is a year past 9999).
        let EventBody::Chat(body) = &env.body else { continue };
        assert_eq!(super::fast::write_event(&env, body, 0).unwrap().unwrap(), general);
    }
    for r in varied_replies() {
        let general = encode_reply_by(&r, Encoding::MsgPack, Route::General).unwrap();
        assert_eq!(encode_reply_by(&r, Encoding::MsgPack, Route::Fast).unwrap(), general, "{r:?}");
        let ReplyBody::Chat(body) = &r.body else { continue };
        assert_eq!(super::fast::write_reply(&r, body, 0).unwrap().unwrap(), general);
    }
}

/// Every copy of `bytes` cut short at each length, with each byte
/// replaced in four ways, and with a byte after its end.
fn damaged(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = (0..bytes.len()).map(|n| bytes[..n].to_vec()).collect();
    for extra in [0x00, 0xc1] {
        out.push([bytes, &[extra]].concat());
    }
    for i in 0..bytes.len() {
        for b in [0x00, 0xff, bytes[i] ^ 0x01, bytes[i].wrapping_add(0x20)] {
            let mut copy = bytes.to_vec();
            copy[i] = b;
            out.push(copy);
        }
    }
    out
}

/// Counts of what [`check_readers`] saw.
#[derive(Default)]
struct Agreement {
    /// Damaged copies the fast path still read (a changed letter in a text).
    fast_reads: usize,
    /// Damaged copies the general path refused.
    errors: usize,
}

/// Checks one valid document (`bytes`, decoding to `expected`) and every
/// damaged copy of it if it is short, through `fast` (the fast reader
/// alone) and `by` (the decoder on a route).
fn check_readers<T: PartialEq + std::fmt::Debug>(
    bytes: &[u8],
    expected: &T,
    fast: impl Fn(&[u8]) -> Option<T>,
    by: impl Fn(&[u8], Route) -> Result<T, DecodeError>,
    seen: &mut Agreement,
) {
    assert_eq!(fast(bytes).as_ref(), Some(expected), "not on the fast path");
    let copies = if bytes.len() < 400 { damaged(bytes) } else { Vec::new() };
    for copy in copies {
        let general = by(&copy, Route::General);
        // Compared as text: a damaged float may read as NaN, never equal to itself.
        let both = by(&copy, Route::Fast);
        assert_eq!(format!("{both:?}"), format!("{general:?}"), "{copy:x?}");
        seen.fast_reads += usize::from(fast(&copy).is_some());
        seen.errors += usize::from(general.is_err());
    }
}

/// The fast readers' contract: what they read, the general path reads the
/// same; what they leave, the general path decides (errors included). Each
/// valid document and every damaged copy of the short ones go through both.
#[test]
fn the_fast_readers_agree_with_the_general_path_on_every_damaged_copy() {
    let mut seen = Agreement::default();
    for env in varied_events() {
        let bytes = encode_event_by(&env, Encoding::MsgPack, Route::General).unwrap();
        let by = |b: &[u8], route| decode_event_by(b, Encoding::MsgPack, LIMIT, route);
        check_readers(&bytes, &env, super::fast::read_event, by, &mut seen);
    }
    for r in varied_replies() {
        let bytes = encode_reply_by(&r, Encoding::MsgPack, Route::General).unwrap();
        let by = |b: &[u8], route| decode_reply_by(b, Encoding::MsgPack, LIMIT, route);
        check_readers(&bytes, &r, super::fast::read_reply, by, &mut seen);
    }
    // Both sides of the contract were exercised.
    let Agreement { fast_reads, errors } = seen;
    assert!(fast_reads > 100 && errors > 1000, "fast reads {fast_reads}, errors {errors}");
}

/// Fields in another order, or one more field, are valid and read by the
/// general path alone.
#[test]
fn other_field_orders_take_the_general_path() {
    #[derive(serde::Serialize)]
    struct AgentFirst<'a> {
        agent: &'a str,
        id: String,
        kind: &'a str,
        ts: &'a str,
        v: u16,
        body: &'a ChatMessage,
    }
    #[derive(serde::Serialize)]
    struct OneMore<'a> {
        id: String,
        agent: &'a str,
        kind: &'a str,
        ts: &'a str,
        v: u16,
        body: &'a ChatMessage,
        note: &'a str,
    }
    let env = &sample_events()[0];
    let EventBody::Chat(body) = &env.body else { unreachable!() };
    let ts = "2026-11-22T10:00:00.123Z";
    let docs = [
        rmp_serde::to_vec_named(&AgentFirst { agent: "desk-7", id: env.id.text(), kind: "chat", ts, v: 1, body }),
        rmp_serde::to_vec_named(&OneMore { id: env.id.text(), agent: "desk-7", kind: "chat", ts, v: 1, body, note: "newer" }),
    ];
    for bytes in docs {
        let bytes = bytes.unwrap();
        assert!(super::fast::read_event(&bytes).is_none());
        assert_eq!(&decode_event(&bytes, Encoding::MsgPack, LIMIT).unwrap(), env);
    }
}

#[test]
fn ids_as_text_are_what_display_writes() {
    for _ in 0..100 {
        let e = EventId::new();
        assert_eq!(e.text(), e.to_string());
        let r = ReplyId::for_event(e, "rules");
        assert_eq!(r.text(), r.to_string());
    }
}

fn position(seq: u64) -> StreamPosition {
    StreamPosition {
        seq,
        stored: "2026-12-05T01:02:03.456789Z".parse().unwrap(),
    }
}

#[test]
fn a_document_without_content_type_is_json_when_it_starts_with_a_brace() {
    assert_eq!(Encoding::of(None, b"  \n{\"body\":{}}").unwrap(), Encoding::Json);
    assert_eq!(Encoding::of(None, b"").unwrap(), Encoding::MsgPack);
    let env = &sample_events()[0];
    assert_eq!(Encoding::of(None, &encode_event(env, Encoding::MsgPack).unwrap()).unwrap(), Encoding::MsgPack);
    // A header wins over the first byte.
    let mut h = HeaderMap::new();
    h.insert(headers::CONTENT_TYPE_NAME, headers::CONTENT_TYPE_MSGPACK);
    assert_eq!(Encoding::of(Some(&h), b"{}").unwrap(), Encoding::MsgPack);
    // The brace is never the first byte of a Ferry MessagePack event.
    for env in sample_events() {
        assert_ne!(encode_event(&env, Encoding::MsgPack).unwrap()[0], b'{');
    }
}

#[test]
fn a_json_event_typed_by_hand_needs_only_its_body() {
    // What `nats pub events.desk-7.chat '...'` sends: no headers, no head.
    let typed = br#"{"body": {"chat": "Ann", "sender": "Ann", "text": "hello"}}"#;
    let at = position(42);
    let m = decode_event_message("events.desk-7.chat", None, typed, LIMIT, Some(&at)).unwrap();
    assert_eq!((m.enc, m.filled_in), (Encoding::Json, true));
    assert_eq!(m.env.agent, agent());
    assert_eq!(m.env.kind(), EventKind::Chat);
    assert_eq!(m.env.ts, at.stored);
    assert_eq!(m.env.id, at.event_id());
    // The id is a UUIDv7 of the stored time, the same for every consumer
    // and redelivery, and another position gives another id.
    assert_eq!(m.env.id.0.get_version_num(), 7);
    let (secs, nanos) = m.env.id.0.get_timestamp().unwrap().to_unix();
    assert_eq!(secs * 1000 + u64::from(nanos) / 1_000_000, 1_796_432_523_456);
    let again = decode_event_message("events.desk-7.chat", None, typed, LIMIT, Some(&at)).unwrap();
    assert_eq!(again.env.id, m.env.id);
    assert_ne!(position(43).event_id(), at.event_id());
    assert!(at.event_id() < position(43).event_id(), "ids of one millisecond sort by sequence");
    // An interaction, with only its required fields.
    let typed = br#"{"body": {"session_id": "s-1", "response_time_ms": 950, "success": false, "error_type": "timeout"}}"#;
    let m = decode_event_message("events.desk-7.interaction", None, typed, LIMIT, Some(&at)).unwrap();
    let EventBody::Interaction(i) = &m.env.body else { panic!("{m:?}") };
    assert_eq!((i.session_id.as_str(), i.response_time_ms, i.success), ("s-1", 950.0, false));
    assert_eq!(i.error_type.as_deref(), Some("timeout"));
    assert!(i.tools_used.is_empty() && i.intent.is_none());
}

#[test]
fn what_a_hand_typed_event_cannot_leave_out() {
    let typed = br#"{"body": {"chat": "Ann", "sender": "Ann", "text": "hello"}}"#;
    // Without a stream position there is nothing to make the time and id from.
    let err = decode_event_message("events.desk-7.chat", None, typed, LIMIT, None).unwrap_err();
    assert_eq!(err.to_string(), "required field `ts` is missing");
    // Fields it gives are kept, and still checked against the subject.
    let typed = br#"{"agent": "desk-8", "body": {"chat": "Ann", "sender": "Ann", "text": "hello"}}"#;
    let err = decode_event_message("events.desk-7.chat", None, typed, LIMIT, Some(&position(1))).unwrap_err();
    assert_eq!(err.code(), "subject_mismatch");
    // The body must still be a body of the subject's kind.
    let typed = br#"{"body": {"chat": "Ann"}}"#;
    let err = decode_event_message("events.desk-7.chat", None, typed, LIMIT, Some(&position(1))).unwrap_err();
    assert!(err.to_string().contains("sender"), "{err}");
    // A whole JSON event is taken as it is.
    let env = &sample_events()[0];
    let whole = encode_event(env, Encoding::Json).unwrap();
    let m = decode_event_message("events.desk-7.chat", None, &whole, LIMIT, Some(&position(1))).unwrap();
    assert_eq!((&m.env, m.filled_in), (env, false));
}
