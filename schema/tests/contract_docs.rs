//! The contract as the docs state it: the dead-letter reason codes in docs/wire-format.md are exactly `ReasonCode::ALL`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::collections::BTreeSet;
use std::path::PathBuf;

use ferry_schema::deadletter::ReasonCode;
use ferry_schema::{EventId, ReplyId, Responder};

/// The checkout under test (cargo sets `CARGO_MANIFEST_DIR` when it runs
/// this test; a shared target dir can hold a binary built in another one).
fn workspace() -> PathBuf {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest.parent().unwrap().to_path_buf()
}

/// The codes in the first column of the reason-code table: rows that
/// start with a backticked word, after the line introducing the table.
fn documented_codes(doc: &str) -> BTreeSet<String> {
    let table = doc.split("Reason codes").nth(1).expect("docs/wire-format.md has a 'Reason codes' table");
    table
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| l.split('|').nth(1))
        .filter_map(|cell| cell.trim().strip_prefix('`')?.strip_suffix('`').map(str::to_string))
        .collect()
}

#[test]
fn the_docs_list_every_reason_code_and_no_other() {
    let doc = std::fs::read_to_string(workspace().join("docs/wire-format.md")).unwrap();
    let documented = documented_codes(&doc);
    let coded: BTreeSet<String> = ReasonCode::ALL.iter().map(|c| c.as_str().to_string()).collect();
    let missing: Vec<_> = coded.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&coded).collect();
    assert!(missing.is_empty() && unknown.is_empty(), "not in docs/wire-format.md: {missing:?}; in the docs but not a ReasonCode: {unknown:?}");
}

#[test]
fn the_table_parser_sees_a_changed_table() {
    let doc = "Reason codes:\n\n| code | why |\n|---|---|\n| `too_large` | big |\n| `new_code` | x |\n\nafter\n| `not_in_table` | |\n";
    let got = documented_codes(doc);
    assert_eq!(got, ["new_code", "too_large"].into_iter().map(String::from).collect());
}

#[test]
fn every_code_has_its_own_text() {
    let texts: BTreeSet<_> = ReasonCode::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(texts.len(), ReasonCode::ALL.len());
}

#[test]
fn reply_ids_depend_on_the_responder_names_which_are_contract() {
    // A renamed responder would give every redelivered event a second reply
    // under a new id; `ferry replay` derives recorded reply ids from these.
    assert_eq!(Responder::Rules.as_str(), "rules");
    assert_eq!(Responder::Inference.as_str(), "inference");
    let event = EventId(uuid::Uuid::nil());
    assert_ne!(ReplyId::for_event(event, Responder::Rules.as_str()), ReplyId::for_event(event, Responder::Inference.as_str()));
}
