//! Data-driven tests of the rules file and engine: one `check` per case.

use ferry_schema::event::{Activity, ChatMessage, ChatType, Heartbeat, MessageType};
use ferry_schema::{AgentId, Envelope, EventBody};

use super::config::parse;
use super::engine::Decision;

fn chat(agent: &str, sender: &str, text: &str) -> Envelope {
    Envelope::new(
        AgentId::new(agent).unwrap(),
        EventBody::Chat(ChatMessage {
            chat: sender.into(),
            chat_type: ChatType::Direct,
            sender: sender.into(),
            text: text.into(),
            msg_type: MessageType::Text,
        }),
    )
}

fn activity(app: &str, title: &str) -> Envelope {
    Envelope::new(
        AgentId::new("desk-1").unwrap(),
        EventBody::Activity(Activity {
            app: app.into(),
            title: title.into(),
            exe: None,
            pid: None,
            site: None,
            afk: false,
            duration_ms: 1000,
        }),
    )
}

const DEMO: &str = include_str!("../../../ops/demo/rules.toml");

#[track_caller]
fn check(rules: &str, env: Envelope, expect: Decision) {
    check_tagged(rules, env, &[], expect);
}

#[track_caller]
fn check_tagged(rules: &str, env: Envelope, tags: &[&str], expect: Decision) {
    let set = parse(rules, "test.toml").unwrap();
    let tags: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
    assert_eq!(set.decide(&env, &tags), expect);
}

fn reply(rule: &str, text: &str, confidence: f32) -> Decision {
    Decision::Reply {
        rule: rule.into(),
        text: text.into(),
        confidence,
    }
}

#[test]
fn demo_rules_decide() {
    check(DEMO, chat("desk-1", "Alice", "Hello there"), reply("greeting", "Hello Alice! This is the desk-1 desk, how can I help?", 0.95));
    check(DEMO, chat("desk-2", "王芳", "你好，我想问一下"), reply("greeting", "Hello 王芳! This is the desk-2 desk, how can I help?", 0.95));
    // Not in the support group: greeting does not apply; the model answers.
    check(DEMO, chat("desk-9", "Zed", "hello"), Decision::Infer { rule: "default".into() });
    check(DEMO, chat("desk-1", "Erin", "Can you ship to Shenzhen?"), Decision::Infer { rule: "default".into() });
    check(
        DEMO,
        chat("desk-1", "Bob", "I want a REFUND now"),
        Decision::Escalate {
            rule: "refund".into(),
            reason: Some("Refund request from Bob: a person will take over.".into()),
            confidence: 0.9,
        },
    );
    check(DEMO, chat("desk-1", "Li", "我要退款"), Decision::Escalate {
        rule: "refund".into(),
        reason: Some("Refund request from Li: a person will take over.".into()),
        confidence: 0.9,
    });
    check(DEMO, chat("desk-1", "Eve", "Crypto Giveaway inside"), Decision::Ignore { rule: "spam".into() });
    check(
        DEMO,
        activity("steam.exe", "Steam - Store"),
        Decision::Alert {
            rule: "no-games".into(),
            message: "steam.exe is not allowed on the desk-1 desk (Steam - Store).".into(),
        },
    );
    check(DEMO, activity("excel.exe", "Q3.xlsx"), Decision::Nothing);
    let quiet = "[[rule]]\nname = \"q\"\nkinds = [\"activity\"]\naction = \"ignore\"\n";
    check(quiet, activity("excel.exe", "Q3.xlsx"), Decision::Nothing);
}

#[test]
fn unmatched_chat_default_and_skipped_kinds() {
    let rules = "[[rule]]\nname = \"x\"\nkeywords = [\"zzz\"]\naction = \"ignore\"\n";
    check(rules, chat("desk-1", "A", "hi"), Decision::Infer { rule: "default".into() });
    let ignore = format!("[defaults]\nunmatched_chat = \"ignore\"\n{rules}");
    check(&ignore, chat("desk-1", "A", "hi"), Decision::Ignore { rule: "default".into() });
    let hb = Envelope::new(
        AgentId::new("desk-1").unwrap(),
        EventBody::Heartbeat(Heartbeat {
            version: "0".into(),
            cpu_percent: 0.0,
            rss_bytes: 0,
            spool_depth: 0,
            oldest_unsent_ms: None,
            components: vec![],
        }),
    );
    check(rules, hb, Decision::Nothing);
}

#[test]
fn regex_and_keywords_must_both_match() {
    let rules = r#"
[[rule]]
name = "order"
keywords = ["order"]
regex = "\\d{4}"
action = "reply"
template = "Order noted: {text}"
"#;
    check(rules, chat("desk-1", "A", "order 1234"), reply("order", "Order noted: order 1234", 1.0));
    check(rules, chat("desk-1", "A", "order please"), Decision::Infer { rule: "default".into() });
}

#[test]
fn customer_tags_must_match_one() {
    let rules = r#"
[[rule]]
name = "vip"
customer_tags = ["vip", "gold"]
action = "reply"
template = "Welcome back, {sender}."
"#;
    let set = parse(rules, "t").unwrap();
    assert!(set.needs_customers());
    assert!(!parse(DEMO, "t").unwrap().needs_customers(), "the demo runs without a database");
    check_tagged(rules, chat("desk-1", "A", "hi"), &["gold"], reply("vip", "Welcome back, A.", 1.0));
    check_tagged(rules, chat("desk-1", "A", "hi"), &["new"], Decision::Infer { rule: "default".into() });
    check_tagged(rules, chat("desk-1", "A", "hi"), &[], Decision::Infer { rule: "default".into() });
}

#[test]
fn template_braces() {
    let rules = "[[rule]]\nname = \"b\"\naction = \"reply\"\ntemplate = \"{{literal}} {sender}\"\n";
    check(rules, chat("desk-1", "A", "x"), reply("b", "{literal} A", 1.0));
}

#[track_caller]
fn check_err(rules: &str, expect: &str) {
    let err = parse(rules, "rules.toml").unwrap_err().to_string();
    assert!(err.contains(expect), "error {err:?} does not contain {expect:?}");
}

#[test]
fn config_errors_name_rule_and_field() {
    check_err("[[rule]]\nname = \"a\"\naction = \"reply\"\n", r#"rules file rules.toml: rule 1 ("a"): field `template`: is required"#);
    check_err("[[rule]]\nname = \"a\"\naction = \"shout\"\n", "unknown variant `shout`, expected one of `reply`, `escalate`, `ignore`, `infer`, `alert`");
    check_err("[[rule]]\nname = \"a\"\nkeywrods = [\"x\"]\naction = \"ignore\"\n", "unknown field `keywrods`");
    check_err("[[rule]]\nname = \"a\"\nregex = \"(\"\naction = \"ignore\"\n", r#"rule 1 ("a"): field `regex`: invalid regex"#);
    check_err("[[rule]]\nname = \"a\"\ngroups = [\"vip\"]\naction = \"ignore\"\n", r#"field `groups`: group "vip" is not defined in [groups]"#);
    check_err("[[rule]]\nname = \"a\"\nkinds = [\"heartbeat\"]\naction = \"ignore\"\n", r#"field `kinds`: "heartbeat" is not a kind rules apply to"#);
    check_err("[[rule]]\nname = \"a\"\nkinds = [\"activity\"]\naction = \"reply\"\ntemplate = \"x\"\n", "applies to chat events only");
    check_err("[[rule]]\nname = \"a\"\naction = \"alert\"\ntemplate = \"x\"\n", "\"alert\" applies to activity events only");
    check_err("[[rule]]\nname = \"a\"\nkinds = [\"activity\"]\naction = \"escalate\"\n", "\"escalate\" applies to chat events only");
    check_err("[[rule]]\nname = \"a\"\naction = \"reply\"\ntemplate = \"{nope}\"\n", "unknown placeholder {nope}");
    check_err("[[rule]]\nname = \"a\"\naction = \"reply\"\ntemplate = \"{title}\"\n", "placeholder {title} exists only for activity events");
    check_err("[[rule]]\nname = \"a\"\naction = \"ignore\"\nconfidence = 2.0\n", "field `confidence`: 2 is outside 0.0..=1.0");
    check_err("[[rule]]\nname = \"a\"\naction = \"ignore\"\n[[rule]]\nname = \"a\"\naction = \"ignore\"\n", r#"rule 2 ("a"): field `name`: another rule already has this name"#);
    check_err("[groups]\nvip = [\"desk 1\"]\n", r#"[groups] "vip": agent id "desk 1""#);
    check_err("[[rule]]\nname = \"a\"\nagents = [\"a.b\"]\naction = \"ignore\"\n", r#"field `agents`: agent id "a.b""#);
    check_err("[[rule]]\nname = \"a\"\nkinds = [\"activity\"]\ncustomer_tags = [\"vip\"]\naction = \"ignore\"\n", "field `customer_tags`: applies to chat events only");
    check_err("[[rule]]\nname = \"a\"\ncustomer_tags = [\" \"]\naction = \"ignore\"\n", "field `customer_tags`: \" \": a tag must not be empty");
    check_err("this is = not toml", "rules file rules.toml: TOML parse error at line 1");
}

#[test]
fn a_groups_file_adds_agents_to_groups() {
    // As `ferry agent add desk-7 --group support` leaves it in groups.toml.
    let extra = std::collections::BTreeMap::from([("support".to_string(), vec!["desk-7".to_string()])]);
    let rules = "[[rule]]\nname = \"support-hello\"\ngroups = [\"support\"]\nkeywords = [\"hello\"]\naction = \"reply\"\ntemplate = \"Hi\"\n";
    let set = super::config::parse_with_groups(rules, "test.toml", &extra).unwrap();
    assert_eq!(set.decide(&chat("desk-7", "Bob", "hello"), &[]), reply("support-hello", "Hi", 1.0));
    assert_ne!(set.decide(&chat("desk-8", "Bob", "hello"), &[]), reply("support-hello", "Hi", 1.0));
    // The demo's own [groups] keeps its members and gains desk-7.
    let set = super::config::parse_with_groups(DEMO, "demo.toml", &extra).unwrap();
    assert!(matches!(set.decide(&chat("desk-7", "Bob", "hello"), &[]), Decision::Reply { rule, .. } if rule == "greeting"));
    assert!(matches!(set.decide(&chat("desk-1", "Bob", "hello"), &[]), Decision::Reply { rule, .. } if rule == "greeting"));
}

/// Hostile input to the rules: whatever a chat says, and whatever a rules
/// file holds, the engine decides or refuses; it never panics.
mod hostile {
    use proptest::prelude::*;

    use super::{activity, chat, parse, DEMO};
    use crate::rules::engine::Decision;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Any sender and text, with template placeholders and control
        /// characters in them: the demo rules decide, and a reply's text
        /// is the template filled in, never the raw placeholder syntax of
        /// the input expanded again.
        #[test]
        fn any_chat_gets_a_decision(sender in "\\PC{0,64}|\\{sender\\}|\\{text\\}", text in "\\PC{0,1024}") {
            let set = parse(DEMO, "demo").unwrap();
            let d = set.decide(&chat("desk-1", &sender, &text), &["vip".to_string()]);
            if let Decision::Reply { text: reply, .. } = &d {
                prop_assert!(reply.len() <= 4 * (sender.len() + text.len()) + 4096, "{reply}");
            }
            let _ = set.decide(&activity(&sender, &text), &[]);
        }

        /// Any text as a rules file: parsed or refused with a message.
        #[test]
        fn any_rules_file_parses_or_is_refused(text in "\\PC{0,512}") {
            if let Err(e) = parse(&text, "fuzz") {
                prop_assert!(!e.to_string().is_empty());
            }
        }

        /// Rules files shaped like real ones, with arbitrary values: parsed
        /// or refused with a message that names the file.
        #[test]
        fn rule_shaped_files_parse_or_are_refused(
            name in "\\PC{0,16}", action in "reply|escalate|ignore|infer|\\PC{0,8}",
            keyword in "\\PC{0,16}", pattern in "\\PC{0,24}", template in "\\PC{0,64}",
        ) {
            let file = format!(
                "[[rule]]\nname = {name:?}\nkeywords = [{keyword:?}]\npattern = {pattern:?}\naction = {action:?}\ntemplate = {template:?}\n"
            );
            match parse(&file, "fuzz.toml") {
                Ok(set) => { let _ = set.decide(&chat("desk-1", "Bob", &keyword), &[]); }
                Err(e) => prop_assert!(e.to_string().contains("fuzz.toml"), "{e}"),
            }
        }
    }
}
