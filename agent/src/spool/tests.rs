//! The spool's tests: durability, order, the full policies, sealing, the ledger and the span state.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use ferry_schema::codec::DEFAULT_MAX_PAYLOAD;
use ferry_schema::event::{Activity, EventBody};
use ferry_schema::{AgentId, Encoding, Envelope, EventKind, ReplyId};

use super::crypt::KEY_FILE;
use super::{FullPolicy, Spool, SpoolConfig, SpoolError, DB_FILE};

fn agent() -> AgentId {
    AgentId::new("desk-1").unwrap()
}

fn activity(title: &str) -> Envelope {
    Envelope::new(
        agent(),
        EventBody::Activity(Activity {
            app: "notepad.exe".into(),
            title: title.into(),
            exe: None,
            pid: None,
            site: None,
            afk: false,
            duration_ms: 1000,
        }),
    )
}

fn spool(dir: &Path, max_events: u64, when_full: FullPolicy) -> Spool {
    let mut cfg = SpoolConfig::new(dir);
    cfg.max_events = max_events;
    cfg.when_full = when_full;
    Spool::open(cfg).unwrap()
}

#[test]
fn events_survive_reopen_in_order_and_are_removed_after_ack() {
    let dir = tempfile::tempdir().unwrap();
    let envs: Vec<_> = (0..5).map(|i| activity(&format!("t{i}"))).collect();
    {
        let s = spool(dir.path(), 100, FullPolicy::Block);
        s.append(&envs[..3], Encoding::MsgPack).unwrap();
        s.append(&envs[3..], Encoding::Json).unwrap();
    }
    let s = spool(dir.path(), 100, FullPolicy::Block);
    assert_eq!(s.depth().events, 5);
    let recs = s.read_after(0, 100).unwrap();
    let ids: Vec<_> = recs.iter().map(|r| r.id).collect();
    assert_eq!(ids, envs.iter().map(|e| e.id).collect::<Vec<_>>());
    assert_eq!(recs[4].encoding, Encoding::Json);
    assert_eq!(recs[0].kind, EventKind::Activity);
    let back = ferry_schema::codec::decode_event(&recs[1].payload, Encoding::MsgPack, 1 << 20).unwrap();
    assert_eq!(back.id, envs[1].id);
    assert_eq!(s.depth().oldest_ts_ms, Some(envs[0].ts.timestamp_millis()));
    assert_eq!(s.remove_through(recs[2].seq).unwrap(), 3);
    assert_eq!(s.depth().events, 2);
    assert_eq!(s.depth().oldest_ts_ms, Some(envs[3].ts.timestamp_millis()));
    assert_eq!(s.read_after(0, 100).unwrap()[0].id, envs[3].id);
    // Sequence numbers keep growing after a reopen.
    drop(s);
    let s = spool(dir.path(), 100, FullPolicy::Block);
    s.append(&[activity("new")], Encoding::MsgPack).unwrap();
    let recs = s.read_after(0, 100).unwrap();
    assert!(recs.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(recs.len(), 3);
}

#[test]
fn an_event_the_broker_would_refuse_is_not_spooled() {
    // Over the codec's limit it could never be published: the broker
    // closes an agent's connection past the AGENTS account's
    // max_payload, and the drainer would retry it for ever.
    let dir = tempfile::tempdir().unwrap();
    let s = spool(dir.path(), 100, FullPolicy::Block);
    let big = activity(&"x".repeat(DEFAULT_MAX_PAYLOAD));
    match s.append(&[activity("ok"), big.clone()], Encoding::MsgPack) {
        Err(SpoolError::TooLarge { id, bytes, max }) => {
            assert_eq!((id, max), (big.id, DEFAULT_MAX_PAYLOAD));
            assert!(bytes > max);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(s.depth().events, 0, "the batch is refused whole; the writer retries it without the event");
}

#[test]
fn a_removal_racing_an_append_keeps_the_counters_right() {
    // The drainer may read, publish and remove an append's events while
    // the writer thread is descheduled between its commit and its
    // counting; that removal once underflowed the count (a panic in
    // the drainer, which then published nothing more).
    let dir = tempfile::tempdir().unwrap();
    let s = spool(dir.path(), 100, FullPolicy::Block);
    let (committed_tx, committed_rx) = std::sync::mpsc::channel::<()>();
    let (removed_tx, removed_rx) = std::sync::mpsc::channel::<()>();
    *s.inner.after_append_commit.lock().unwrap() = Some(Box::new(move || {
        committed_tx.send(()).unwrap();
        // Descheduled until the removal is done, or for a second when
        // the removal waits for this append.
        let _ = removed_rx.recv_timeout(std::time::Duration::from_secs(1));
    }));
    let remover = {
        let s = s.clone();
        std::thread::spawn(move || {
            committed_rx.recv().unwrap();
            let recs = s.read_after(0, 10).unwrap();
            let removed = s.remove_through(recs.last().unwrap().seq).unwrap();
            let _ = removed_tx.send(());
            removed
        })
    };
    s.append(&[activity("a"), activity("b")], Encoding::MsgPack).unwrap();
    assert_eq!(remover.join().expect("the removal panicked"), 2);
    assert_eq!(s.depth().events, 0);
    assert_eq!(s.depth().bytes, 0);
    s.append(&[activity("c")], Encoding::MsgPack).unwrap();
    assert_eq!(s.depth().events, 1);
}

#[test]
fn drop_oldest_counts_and_block_reports_no_room() {
    let dir = tempfile::tempdir().unwrap();
    let s = spool(dir.path(), 3, FullPolicy::DropOldest);
    let envs: Vec<_> = (0..5).map(|i| activity(&format!("t{i}"))).collect();
    let a = s.append(&envs, Encoding::MsgPack).unwrap();
    assert_eq!(a.dropped, 2);
    assert_eq!(s.depth().events, 3);
    assert_eq!(s.depth().dropped, 2);
    assert_eq!(s.read_after(0, 10).unwrap()[0].id, envs[2].id);
    drop(s);
    // The count of dropped events is durable.
    let s = spool(dir.path(), 3, FullPolicy::DropOldest);
    assert_eq!(s.depth().dropped, 2);

    let dir = tempfile::tempdir().unwrap();
    let s = spool(dir.path(), 3, FullPolicy::Block);
    assert!(s.has_room(3, 100));
    s.append(&envs[..3], Encoding::MsgPack).unwrap();
    assert!(!s.has_room(1, 100));
}

#[test]
fn nothing_readable_on_disk_and_a_wrong_key_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let s = spool(dir.path(), 100, FullPolicy::Block);
    s.append(&[activity("SECRET-TITLE-4711")], Encoding::Json).unwrap();
    s.put_state("span", Some(b"SECRET-SPAN-0815"), true).unwrap();
    s.sync().unwrap();
    drop(s);
    let raw = std::fs::read(dir.path().join(DB_FILE)).unwrap();
    let hay = String::from_utf8_lossy(&raw);
    assert!(!hay.contains("SECRET-TITLE-4711") && !hay.contains("SECRET-SPAN-0815"));
    // Without its key the spool is refused, saying how to recover ...
    let key = std::fs::read(dir.path().join(KEY_FILE)).unwrap();
    std::fs::remove_file(dir.path().join(KEY_FILE)).unwrap();
    let err = Spool::open(SpoolConfig::new(dir.path())).unwrap_err();
    assert!(matches!(err, SpoolError::KeyLost { .. }) && err.to_string().contains("move the spool directory aside"), "{err}");
    // ... and another key cannot read the records.
    let mut other = key.clone();
    let last = other.len() - 1;
    other[last] ^= 1;
    std::fs::write(dir.path().join(KEY_FILE), &other).unwrap();
    let err = Spool::open(SpoolConfig::new(dir.path())).unwrap_err();
    assert!(matches!(err, SpoolError::Corrupt { .. } | SpoolError::Key { .. }), "{err}");
    assert!(err.to_string().contains("spool"), "{err}");
}

#[test]
fn an_adapter_reference_names_its_event_across_reopen_and_unreadably() {
    let dir = tempfile::tempdir().unwrap();
    let e = activity("chat");
    {
        let s = spool(dir.path(), 100, FullPolicy::Block);
        let key = s.ref_key("wxauto", "MSG-REF-0042");
        assert_eq!(s.event_for_ref(key).unwrap(), None);
        s.append_with_refs(std::slice::from_ref(&e), Encoding::MsgPack, &[(key, e.id)]).unwrap();
        // The events go; the reference stays.
        s.remove_through(s.read_after(0, 1).unwrap()[0].seq).unwrap();
    }
    let s = spool(dir.path(), 100, FullPolicy::Block);
    assert_eq!(s.event_for_ref(s.ref_key("wxauto", "MSG-REF-0042")).unwrap(), Some(e.id));
    // Another adapter's reference 42 is another message.
    assert_eq!(s.event_for_ref(s.ref_key("other", "MSG-REF-0042")).unwrap(), None);
    assert_ne!(s.ref_key("wx", "auto1"), s.ref_key("wxauto", "1"));
    s.sync().unwrap();
    drop(s);
    let raw = std::fs::read(dir.path().join(DB_FILE)).unwrap();
    assert!(!String::from_utf8_lossy(&raw).contains("MSG-REF-0042"));
}

#[test]
fn acted_replies_are_remembered_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let id = ReplyId(uuid::Uuid::now_v7());
    {
        let s = spool(dir.path(), 10, FullPolicy::Block);
        assert!(s.mark_acted(id).unwrap());
        assert!(!s.mark_acted(id).unwrap());
    }
    let s = spool(dir.path(), 10, FullPolicy::Block);
    assert!(!s.mark_acted(id).unwrap());
    assert!(s.mark_acted(ReplyId(uuid::Uuid::now_v7())).unwrap());
    s.put_state("span", Some(b"abc"), false).unwrap();
    assert_eq!(s.get_state("span").unwrap().as_deref(), Some(&b"abc"[..]));
    s.put_state("span", None, false).unwrap();
    assert_eq!(s.get_state("span").unwrap(), None);
}

#[test]
#[cfg(unix)]
fn key_file_is_private() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let _s = spool(dir.path(), 10, FullPolicy::Block);
    let mode = std::fs::metadata(dir.path().join(KEY_FILE)).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}
