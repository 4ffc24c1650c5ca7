//! Hostile input to the codec, as a flooding or broken agent would send it: no panic, and every refusal has its reason code.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use ferry_schema::codec::{
    decode_event, decode_event_message, decode_reply, encode_event, DecodeError, Encoding, DEFAULT_MAX_PAYLOAD,
};
use ferry_schema::event::{ChatMessage, ChatType, MessageType};
use ferry_schema::{AgentId, Envelope, EventBody};
use proptest::prelude::*;

const LIMIT: usize = DEFAULT_MAX_PAYLOAD;
const ENCODINGS: [Encoding; 2] = [Encoding::MsgPack, Encoding::Json];

/// Every reason code a refusal may carry (the dead-letter reasons).
const CODES: [&str; 10] = [
    "too_large",
    "content_type",
    "malformed",
    "missing_field",
    "invalid_field",
    "unsupported_version",
    "unknown_kind",
    "invalid_agent_id",
    "subject_mismatch",
    "bad_subject",
];

fn coded(e: &DecodeError) -> bool {
    CODES.contains(&e.code()) && !e.to_string().is_empty()
}

fn chat(agent: &str, chat: String, sender: String, text: String) -> Envelope {
    Envelope::new(
        AgentId::new(agent).unwrap(),
        EventBody::Chat(ChatMessage { chat, chat_type: ChatType::Direct, sender, text, msg_type: MessageType::Text }),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Arbitrary bytes: refused with a code, in both encodings, as an event
    /// and as a reply, and as a message on any subject.
    #[test]
    fn arbitrary_bytes_are_refused_with_a_code(bytes in proptest::collection::vec(any::<u8>(), 0..2048), subject in "\\PC{0,40}") {
        for enc in ENCODINGS {
            if let Err(e) = decode_event(&bytes, enc, LIMIT) { prop_assert!(coded(&e), "{e}"); }
            if let Err(e) = decode_reply(&bytes, enc, LIMIT) { prop_assert!(coded(&e), "{e}"); }
        }
        if let Err(e) = decode_event_message(&subject, None, &bytes, LIMIT, None) { prop_assert!(coded(&e), "{e}"); }
    }

    /// Any prefix of a valid event, and any single flipped byte in it: no
    /// panic, and what is refused has a code.
    #[test]
    fn truncated_and_corrupted_events_are_refused_with_a_code(
        chat_name in "\\PC{0,64}", sender in "\\PC{0,64}", text in "\\PC{0,512}",
        cut in any::<proptest::sample::Index>(), flip in any::<proptest::sample::Index>(), bit in 0u8..8,
    ) {
        let env = chat("desk-1", chat_name, sender, text);
        for enc in ENCODINGS {
            let bytes = encode_event(&env, enc).unwrap();
            let at = cut.index(bytes.len());
            if let Err(e) = decode_event(&bytes[..at], enc, LIMIT) { prop_assert!(coded(&e), "{e}"); }
            let mut bad = bytes.clone();
            let i = flip.index(bad.len());
            bad[i] ^= 1 << bit;
            if let Err(e) = decode_event(&bad, enc, LIMIT) { prop_assert!(coded(&e), "{e}"); }
        }
    }

    /// Every valid chat, whatever its text (any Unicode, up to the limit's
    /// neighbourhood), comes back as it went in.
    #[test]
    fn any_chat_round_trips(chat_name in "\\PC{0,64}", sender in "\\PC{0,64}", text in "\\PC{0,2048}") {
        let env = chat("desk-1", chat_name, sender, text);
        for enc in ENCODINGS {
            let bytes = encode_event(&env, enc).unwrap();
            prop_assert_eq!(&decode_event(&bytes, enc, LIMIT).unwrap(), &env);
        }
    }
}

/// Nesting far deeper than any event: refused, not a stack overflow.
#[test]
fn deep_nesting_is_refused() {
    for depth in [64usize, 1_000, 100_000] {
        let json = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let e = decode_event(json.as_bytes(), Encoding::Json, usize::MAX).unwrap_err();
        assert!(coded(&e), "{e}");
        // MessagePack: a one-element array, nested; and as the value of a
        // field the decoder skips (`x`), then of a field it reads (`kind`).
        let mut nested = vec![0x91u8; depth];
        nested.push(0xc0);
        let e = decode_event(&nested, Encoding::MsgPack, usize::MAX).unwrap_err();
        assert!(coded(&e), "{e}");
        for field in ["x", "kind", "body"] {
            let mut map = vec![0x81u8, 0xa0 | field.len() as u8];
            map.extend_from_slice(field.as_bytes());
            map.extend_from_slice(&nested);
            let e = decode_event(&map, Encoding::MsgPack, usize::MAX).unwrap_err();
            assert!(coded(&e), "{field} at depth {depth}: {e}");
        }
        let json_field = format!("{{\"x\":{}{}}}", "[".repeat(depth), "]".repeat(depth));
        let e = decode_event(json_field.as_bytes(), Encoding::Json, usize::MAX).unwrap_err();
        assert!(coded(&e), "{e}");
    }
}

/// Length prefixes that promise gigabytes a message does not have: refused
/// at once (no allocation of what was promised).
#[test]
fn huge_length_prefixes_are_refused() {
    // str32, bin32, array32, map32, each claiming 0xffff_fff0 items/bytes.
    for marker in [0xdbu8, 0xc6, 0xdd, 0xdf] {
        let mut bytes = vec![marker, 0xff, 0xff, 0xff, 0xf0];
        bytes.extend_from_slice(b"abc");
        let e = decode_event(&bytes, Encoding::MsgPack, LIMIT).unwrap_err();
        assert!(coded(&e), "{marker:#x}: {e}");
        // The same as a field's value inside a map.
        let mut map = vec![0x81u8, 0xa4];
        map.extend_from_slice(b"text");
        map.extend_from_slice(&bytes);
        let e = decode_event(&map, Encoding::MsgPack, LIMIT).unwrap_err();
        assert!(coded(&e), "{marker:#x} in a map: {e}");
    }
}

/// Invalid UTF-8 where text belongs: refused with a code, in both encodings.
#[test]
fn invalid_utf8_is_refused_with_a_code() {
    let env = chat("desk-1", "Alice".into(), "Alice".into(), "AAAA".into());
    for enc in ENCODINGS {
        let mut bytes = encode_event(&env, enc).unwrap();
        let at = bytes.windows(4).position(|w| w == b"AAAA").unwrap();
        bytes[at..at + 2].copy_from_slice(&[0xc3, 0x28]);
        let e = decode_event(&bytes, enc, LIMIT).unwrap_err();
        assert!(coded(&e) && ["malformed", "invalid_field"].contains(&e.code()), "{enc:?}: {e}");
    }
}

/// A payload exactly at the limit is read; one byte over is `too_large`.
#[test]
fn the_size_limit_is_exact() {
    let env = chat("desk-1", "Alice".into(), "Alice".into(), String::new());
    for enc in ENCODINGS {
        let base = encode_event(&env, enc).unwrap().len();
        let mut text = "x".repeat(LIMIT - base);
        let mut at_limit = encode_event(&chat("desk-1", "Alice".into(), "Alice".into(), text.clone()), enc).unwrap();
        // MessagePack's string header grows with the length: trim to fit.
        while at_limit.len() > LIMIT {
            text.pop();
            at_limit = encode_event(&chat("desk-1", "Alice".into(), "Alice".into(), text.clone()), enc).unwrap();
        }
        assert!(decode_event(&at_limit, enc, at_limit.len()).is_ok(), "{enc:?}");
        let e = decode_event(&at_limit, enc, at_limit.len() - 1).unwrap_err();
        assert_eq!(e.code(), "too_large");
    }
}
