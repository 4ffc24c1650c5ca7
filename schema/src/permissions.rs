//! What the broker lets each user do, generated from the topology: the allow-lists of agents and worker roles in `nats.conf`.
//!
//! `ferry agent add` writes an agent's entry from [`agent_permissions`];
//! the role users in the committed `nats.conf` are checked against
//! [`role_permissions`] by this module's test, so neither can drift from the
//! consumers and subjects in [`crate::topology`] and [`crate::subject`].

use crate::topology::{agent_replies_consumer_name, Role, ALERTS_STREAM, DEADLETTER_STREAM, EVENTS_STREAM, REPLIES_STREAM};
use crate::{subject, AgentId};

/// What the broker lets one user do: the allow-lists of its entry in
/// `nats.conf`. Everything else is denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    /// Subjects it may publish to.
    pub publish: Vec<String>,
    /// Subjects it may subscribe to.
    pub subscribe: Vec<String>,
    /// It may also answer each request it received, once, on the
    /// request's reply subject (`allow_responses`): how a worker's micro
    /// service answers `nats micro` and `ferry stats` without being allowed
    /// to publish on every inbox.
    pub allow_responses: bool,
}

impl Permissions {
    /// This user's entry in `nats.conf`, each line after `indent`: `{`,
    /// the `credential` line (`user: desk-1, password: $VAR` or
    /// `nkey: U...`), the allow-lists, `}`. The one writer of agent entries
    /// (`ferry agent add`, and the demo agents of `ferry up` and the tests).
    pub fn conf_entry(&self, credential: &str, indent: &str) -> String {
        let quote = |v: &[String]| v.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>();
        let mut lines = vec![
            "{".to_string(),
            format!("  {credential}"),
            "  permissions: {".to_string(),
            "    publish: { allow: [".to_string(),
            format!("      {}", quote(&self.publish).join(",\n      ")),
            "    ] }".to_string(),
            format!("    subscribe: {{ allow: [{}] }}", quote(&self.subscribe).join(", ")),
        ];
        if self.allow_responses {
            lines.push("    allow_responses: true".to_string());
        }
        lines.extend(["  }".to_string(), "}".to_string()]);
        lines.iter().flat_map(|block| block.lines()).map(|l| format!("{indent}{l}\n")).collect()
    }
}

/// The name of agent slot `slot`'s account in `nats.conf` (`AGENT_0007`):
/// each agent has one of its own, so the account's limits bound that agent
/// alone.
pub fn agent_account(slot: u32) -> String {
    format!("AGENT_{slot:04}")
}

/// The slot of an agent account named `name` (`AGENT_0007` is 7); `None`
/// for any other name.
pub fn agent_slot(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("AGENT_")?;
    (digits.len() >= 4 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok()).flatten()
}

/// An agent account `account` as `nats.conf` holds it, each line after
/// `indent`: with the shared limits and imports (`$AGENT_LIMITS`,
/// `$AGENT_IMPORTS`, defined at the top of `nats.conf`), and the user
/// `(credential, permissions)` when the slot is taken. An empty slot is
/// one line.
pub fn agent_account_conf(account: &str, user: Option<(&str, &Permissions)>, indent: &str) -> String {
    let shared = "limits: $AGENT_LIMITS, imports: $AGENT_IMPORTS";
    match user {
        None => format!("{indent}{account} {{ {shared} }}\n"),
        Some((credential, permissions)) => format!(
            "{indent}{account} {{\n{indent}  limits: $AGENT_LIMITS\n{indent}  imports: $AGENT_IMPORTS\n{indent}  users: [\n{}{indent}  ]\n{indent}}}\n",
            permissions.conf_entry(credential, &format!("{indent}    "))
        ),
    }
}

/// The permissions of `agent`'s user in its own account: publish only
/// `events.<id>.<kind>` for the five kinds (so the per-subject cap of
/// [`crate::quota`] bounds the agent), read (through [`subject::AGENT_JS_API_PREFIX`]) and ack
/// only its consumer `agent-<id>` on `REPLIES`, and receive only on
/// `_INBOX.<id>.>` (the prefix [`subject::agent_inbox_prefix`] sets) and
/// its own live replies `live.replies.<id>`.
pub fn agent_permissions(agent: &AgentId) -> Permissions {
    let consumer = agent_replies_consumer_name(agent);
    Permissions {
        publish: crate::quota::agent_event_subjects(agent)
            .into_iter()
            .chain([
            format!("{}.CONSUMER.INFO.{REPLIES_STREAM}.{consumer}", subject::AGENT_JS_API_PREFIX),
            format!("{}.CONSUMER.MSG.NEXT.{REPLIES_STREAM}.{consumer}", subject::AGENT_JS_API_PREFIX),
            format!("$JS.ACK.{REPLIES_STREAM}.{consumer}.>"),
            ])
            .collect(),
        subscribe: vec![
            format!("{}.>", subject::agent_inbox_prefix(agent)),
            subject::live_reply(agent).to_string(),
        ],
        allow_responses: false,
    }
}

/// The permissions of `role`'s user (`rules`, `inference`, `archiver` in
/// `nats.conf`), from its consumers: read, ack and (should it have been
/// deleted) re-create only its own consumers; dead-letter only on their
/// dead-letter subjects, hear only their max-deliveries advisories and read
/// back only from their streams the messages those advisories name;
/// publish what the role produces (replies, hand-offs); receive only on its
/// own inbox prefix `_INBOX.<role>` ([`subject::role_inbox_prefix`]); serve
/// its micro service. No role can touch an agent's reply consumer.
pub fn role_permissions(role: Role) -> Permissions {
    let mut publish = Vec::new();
    let mut subscribe = vec![
        format!("{}.>", subject::role_inbox_prefix(role.as_str())),
        "$SRV.*".to_string(),
        format!("$SRV.*.{}", subject::service_name(role.as_str())),
        format!("$SRV.*.{}.>", subject::service_name(role.as_str())),
        subject::service_status(role.as_str()).to_string(),
    ];
    let mut streams: Vec<&str> = Vec::new();
    for def in role.consumers() {
        let (stream, name) = (def.stream, def.name());
        publish.extend([
            format!("$JS.API.CONSUMER.INFO.{stream}.{name}"),
            format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}"),
            format!("$JS.API.CONSUMER.CREATE.{stream}.{name}"),
            format!("$JS.API.CONSUMER.CREATE.{stream}.{name}.>"),
            format!("$JS.ACK.{stream}.{name}.>"),
            subject::dead_letter(stream, name).to_string(),
        ]);
        subscribe.push(subject::max_deliveries_advisory(stream, name).to_string());
        if !streams.contains(&stream) {
            streams.push(stream);
        }
    }
    publish.extend(streams.iter().map(|s| format!("$JS.API.STREAM.MSG.GET.{s}")));
    match role {
        Role::Rules => publish.extend([
            subject::all_replies().to_string(),
            subject::WorkQueue::InferenceChat.subject().to_string(),
        ]),
        Role::Inference => publish.push(subject::all_replies().to_string()),
        // The rules' readers: ephemeral ordered consumers of EVENTS,
        // REPLIES and DEADLETTER (the unnamed create cannot make or change
        // a durable one) and of ALERTS (each rule's last state), their
        // flow-control answers; and the alerts they raise.
        Role::Alerts => {
            publish.extend([
            subject::all_alerts().to_string(),
            subject::all_alert_deliveries().to_string(),
            format!("$JS.API.CONSUMER.CREATE.{EVENTS_STREAM}"),
            format!("$JS.API.CONSUMER.CREATE.{REPLIES_STREAM}"),
            format!("$JS.API.CONSUMER.CREATE.{ALERTS_STREAM}"),
            format!("$JS.API.CONSUMER.CREATE.{DEADLETTER_STREAM}"),
            format!("$JS.FC.{EVENTS_STREAM}.>"),
            format!("$JS.FC.{REPLIES_STREAM}.>"),
            format!("$JS.FC.{ALERTS_STREAM}.>"),
            format!("$JS.FC.{DEADLETTER_STREAM}.>"),
            ]);
            // Consumer-lag rules read every worker consumer's info.
            for def in crate::topology::worker_consumers() {
                let info = format!("$JS.API.CONSUMER.INFO.{}.{}", def.stream, def.name());
                if !publish.contains(&info) {
                    publish.push(info);
                }
            }
        }
        // The keeper (crate::quota) runs in the archiver.
        Role::Archiver => {
            for s in crate::quota::keeper_publish() {
                if !publish.contains(&s) {
                    publish.push(s);
                }
            }
        }
    }
    Permissions {
        publish,
        subscribe,
        allow_responses: true,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// An entry lists exactly the allow-lists, in order, and nats-server's
    /// syntax holds (checked against a real server by ops/cli's
    /// `added_agent_is_confined_and_revoke_locks_it_out_after_reload`).
    #[test]
    fn an_entry_carries_the_allow_lists_and_the_credential() {
        let p = agent_permissions(&AgentId::new("desk-9").unwrap());
        let entry = p.conf_entry("nkey: UABC", "  ");
        assert!(entry.lines().all(|l| l.starts_with("  ")), "{entry}");
        assert_eq!(entry.lines().nth(1), Some("    nkey: UABC"));
        let quoted: Vec<&str> = entry.split('"').skip(1).step_by(2).collect();
        let want: Vec<&str> = p.publish.iter().chain(&p.subscribe).map(String::as_str).collect();
        assert_eq!(quoted, want);
        assert!(!entry.contains("allow_responses"));
        assert!(role_permissions(Role::Rules).conf_entry("user: rules", "").contains("\n    allow_responses: true\n"));
    }

    #[test]
    fn an_agent_account_is_one_line_empty_and_holds_its_user_when_taken() {
        assert_eq!(agent_account(7), "AGENT_0007");
        assert_eq!(agent_slot("AGENT_0007"), Some(7));
        assert_eq!(agent_slot("AGENT_12345"), Some(12345));
        for other in ["AGENT_DEMO_1", "AGENT_07", "FERRY", "AGENT_"] {
            assert_eq!(agent_slot(other), None, "{other}");
        }
        assert_eq!(
            agent_account_conf("AGENT_0007", None, "  "),
            "  AGENT_0007 { limits: $AGENT_LIMITS, imports: $AGENT_IMPORTS }\n"
        );
        let p = agent_permissions(&AgentId::new("desk-9").unwrap());
        let taken = agent_account_conf("AGENT_0007", Some(("nkey: UABC", &p)), "  ");
        let want = format!(
            "  AGENT_0007 {{\n    limits: $AGENT_LIMITS\n    imports: $AGENT_IMPORTS\n    users: [\n{}    ]\n  }}\n",
            p.conf_entry("nkey: UABC", "      ")
        );
        assert_eq!(taken, want);
    }

    /// Each worker role's user in the committed `nats.conf` has exactly the
    /// permissions generated from its consumers and outputs.
    #[test]
    fn role_permissions_match_their_entries_in_nats_conf() {
        let conf = include_str!("../../nats.conf");
        for role in Role::ALL {
            let start = conf
                .find(&format!("user: {}, password:", role.as_str()))
                .unwrap_or_else(|| panic!("{} entry", role.as_str()));
            let entry = &conf[start..];
            let entry = &entry[..entry.find("\n      }").expect("end of entry")];
            let quoted: Vec<&str> = entry.split('"').skip(1).step_by(2).collect();
            let p = role_permissions(role);
            let want: Vec<&str> = p.publish.iter().chain(&p.subscribe).map(String::as_str).collect();
            assert_eq!(quoted, want, "{}", role.as_str());
            assert_eq!(entry.contains("allow_responses: true"), p.allow_responses, "{}", role.as_str());
        }
    }
}
