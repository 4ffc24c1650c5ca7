//! The verdict of a chaos run: what the applications saw and the archive holds, against what the agents were given.

use std::collections::{BTreeMap, HashMap};

use super::app::{chat_number, Seen};

/// One archived event of a chaos agent.
#[derive(Debug, Clone)]
pub struct ArchivedEvent {
    /// Its id.
    pub id: String,
    /// `chat` or `activity`.
    pub kind: String,
    /// Its position in `EVENTS`: the order the broker stored it in.
    pub stream_seq: i64,
    /// The chat's text or the activity's title.
    pub text: String,
}

/// What one agent was given and what came of it.
#[derive(Debug, Clone, Default)]
pub struct AgentRun {
    /// What its application saw.
    pub seen: Seen,
    /// Activity events written to its input, numbered from 0.
    pub activities: u64,
    /// Its archived events.
    pub archived: Vec<ArchivedEvent>,
}

/// The title of activity `n`: the verdict finds it in the archive by this.
pub fn activity_title(n: u64) -> String {
    format!("chaos activity {n}")
}

fn activity_number(title: &str) -> Option<u64> {
    title.strip_prefix("chaos activity ")?.parse().ok()
}

/// The counts of a run; a run passes when `lost`, `doubled` and
/// `order_violations` are zero and it drained.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// Events the agents had: chats they accepted, activities given them.
    pub sent: u64,
    /// Chats answered at their application.
    pub answered: u64,
    /// Events found in the archive.
    pub archived: u64,
    /// Replies found in the archive for the chats.
    pub replies_archived: u64,
    /// Events missing from the archive, chats never answered, replies missing from the archive.
    pub lost: u64,
    /// Events archived twice, chats answered twice, replies archived twice.
    pub doubled: u64,
    /// Chats an adapter offered again on a new connection (the agent went
    /// away before their `accepted`). Each must still be one event with
    /// one answer: a second copy counts in `doubled`.
    pub offered_again: u64,
    /// Places where an agent's events reached the stream out of its order.
    pub order_violations: u64,
    /// Dead letters by reason code.
    pub dead_letters: BTreeMap<String, u64>,
    /// Why the run did not drain: a consumer still held messages, or a chat
    /// still waited, when nothing had moved for `--stall`.
    pub stalled: Option<String>,
    /// Examples of what went wrong, for the report.
    pub problems: Vec<String>,
}

const MAX_PROBLEMS: usize = 12;

impl Tally {
    /// Whether nothing was lost, doubled or reordered.
    pub fn passed(&self) -> bool {
        self.lost == 0 && self.doubled == 0 && self.order_violations == 0 && self.stalled.is_none()
    }

    fn problem(&mut self, what: String) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(what);
        }
    }

    /// The tally of agents' runs; `replies` counts the archived replies per
    /// event id they answer.
    pub fn of(agents: &BTreeMap<String, AgentRun>, replies: &HashMap<String, u64>, dead_letters: BTreeMap<String, u64>) -> Self {
        let mut t = Tally { dead_letters, ..Tally::default() };
        for (agent, run) in agents {
            t.add_agent(agent, run, replies);
        }
        t
    }

    fn add_agent(&mut self, agent: &str, run: &AgentRun, replies: &HashMap<String, u64>) {
        let mut chats: BTreeMap<u64, Vec<&ArchivedEvent>> = BTreeMap::new();
        let mut activities: BTreeMap<u64, Vec<&ArchivedEvent>> = BTreeMap::new();
        let mut in_order: Vec<&ArchivedEvent> = run.archived.iter().collect();
        in_order.sort_by_key(|e| e.stream_seq);
        let (mut last_chat, mut last_activity) = (None::<u64>, None::<u64>);
        for e in &in_order {
            let (number, seen, last) = match e.kind.as_str() {
                "chat" => (chat_number(&e.text), &mut chats, &mut last_chat),
                "activity" => (activity_number(&e.text), &mut activities, &mut last_activity),
                _ => continue,
            };
            let Some(n) = number else { continue };
            let copies = seen.entry(n).or_default();
            copies.push(e);
            // A second copy says nothing about order; it is counted below.
            if copies.len() == 1 {
                if last.is_some_and(|l| n < l) {
                    self.order_violations += 1;
                    self.problem(format!("{agent}: {} {n} stored after {} (EVENTS seq {})", e.kind, last.unwrap_or(0), e.stream_seq));
                }
                *last = Some(n);
            }
        }

        // Chats: every accepted one archived once, answered once, its reply archived once.
        self.offered_again += run.seen.reoffered.len() as u64;
        for (n, ids) in &run.seen.accepted {
            self.sent += 1;
            let copies = chats.get(n).map(Vec::as_slice).unwrap_or_default();
            match copies.len() {
                0 => {
                    self.lost += 1;
                    self.problem(format!("{agent}: chat {n} (accepted as {ids:?}) is not in the archive"));
                }
                1 => self.archived += 1,
                k => {
                    self.archived += 1;
                    self.doubled += (k - 1) as u64;
                    let again = if run.seen.reoffered.contains(n) { " (offered again and spooled again)" } else { "" };
                    self.problem(format!("{agent}: chat {n} archived {k} times{again}"));
                }
            }
            let mut answers = 0;
            for e in copies {
                let handed = run.seen.replies.get(&e.id).map_or(0, |r| r.len());
                answers += handed.min(1);
                if handed > 1 {
                    self.doubled += (handed - 1) as u64;
                    self.problem(format!("{agent}: chat {n} ({}) answered {handed} times at the application", e.id));
                }
                match replies.get(&e.id).copied().unwrap_or(0) {
                    0 => {
                        self.lost += 1;
                        self.problem(format!("{agent}: no archived reply for chat {n} ({})", e.id));
                    }
                    1 => self.replies_archived += 1,
                    k => {
                        self.replies_archived += 1;
                        self.doubled += k - 1;
                        self.problem(format!("{agent}: chat {n} ({}) has {k} archived replies", e.id));
                    }
                }
            }
            // An accepted id the archive lacks was answered under that id, if at all.
            let archived_ids: Vec<&str> = copies.iter().map(|e| e.id.as_str()).collect();
            for id in ids.iter().filter(|id| !archived_ids.contains(&id.as_str())) {
                answers += run.seen.replies.get(id).map_or(0, |r| r.len().min(1));
            }
            if answers == 0 {
                self.lost += 1;
                self.problem(format!("{agent}: chat {n} never answered at the application"));
            } else {
                self.answered += 1;
            }
        }

        // Activities: every one given archived once.
        for n in 0..run.activities {
            self.sent += 1;
            match activities.get(&n).map_or(0, Vec::len) {
                0 => {
                    self.lost += 1;
                    self.problem(format!("{agent}: activity {n} is not in the archive"));
                }
                1 => self.archived += 1,
                k => {
                    self.archived += 1;
                    self.doubled += (k - 1) as u64;
                    self.problem(format!("{agent}: activity {n} archived {k} times"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::app::chat_text;

    fn event(id: &str, kind: &str, seq: i64, text: String) -> ArchivedEvent {
        ArchivedEvent { id: id.into(), kind: kind.into(), stream_seq: seq, text }
    }

    /// Two chats and two activities, all archived and answered once.
    fn clean() -> (BTreeMap<String, AgentRun>, HashMap<String, u64>) {
        let mut seen = Seen::default();
        for (n, id) in [(0, "c0"), (1, "c1")] {
            seen.accepted.insert(n, vec![id.into()]);
            seen.replies.entry(id.into()).or_default().insert(format!("r{n}"));
        }
        let run = AgentRun {
            seen,
            activities: 2,
            archived: vec![
                event("c0", "chat", 1, chat_text(0, false)),
                event("a0", "activity", 2, activity_title(0)),
                event("c1", "chat", 3, chat_text(1, false)),
                event("a1", "activity", 4, activity_title(1)),
            ],
        };
        let replies = [("c0".to_string(), 1), ("c1".to_string(), 1)].into();
        ([("desk".to_string(), run)].into(), replies)
    }

    #[test]
    fn a_clean_run_passes() {
        let (agents, replies) = clean();
        let t = Tally::of(&agents, &replies, BTreeMap::new());
        assert!(t.passed(), "{t:?}");
        assert_eq!((t.sent, t.answered, t.archived, t.replies_archived), (4, 2, 4, 2));
    }

    #[test]
    fn a_missing_event_an_unanswered_chat_and_a_missing_reply_are_lost() {
        let (mut agents, mut replies) = clean();
        let run = agents.get_mut("desk").unwrap();
        run.archived.retain(|e| e.id != "a1");
        run.seen.replies.remove("c0");
        replies.remove("c1");
        let t = Tally::of(&agents, &replies, BTreeMap::new());
        assert_eq!(t.lost, 3, "{t:?}");
        assert!(!t.passed());
    }

    #[test]
    fn copies_and_second_answers_are_doubled() {
        let (mut agents, mut replies) = clean();
        let run = agents.get_mut("desk").unwrap();
        run.archived.push(event("a1b", "activity", 5, activity_title(1)));
        run.seen.replies.get_mut("c1").unwrap().insert("r1b".into());
        replies.insert("c0".into(), 2);
        let t = Tally::of(&agents, &replies, BTreeMap::new());
        assert_eq!((t.doubled, t.lost), (3, 0), "{t:?}");
    }

    #[test]
    fn a_chat_offered_again_and_spooled_twice_is_doubled() {
        let (mut agents, mut replies) = clean();
        let run = agents.get_mut("desk").unwrap();
        run.seen.reoffered.insert(1);
        let t = Tally::of(&agents, &replies, BTreeMap::new());
        assert!(t.passed(), "offered again, spooled once: {t:?}");
        assert_eq!(t.offered_again, 1);
        let run = agents.get_mut("desk").unwrap();
        run.archived.push(event("c1b", "chat", 5, chat_text(1, false)));
        run.seen.replies.entry("c1b".into()).or_default().insert("r1b".into());
        replies.insert("c1b".into(), 1);
        let t = Tally::of(&agents, &replies, BTreeMap::new());
        assert!(!t.passed());
        assert_eq!(t.doubled, 1, "{t:?}");
        assert!(t.problems[0].contains("offered again and spooled again"), "{t:?}");
    }

    #[test]
    fn events_stored_out_of_the_agents_order_are_violations() {
        let (mut agents, replies) = clean();
        let run = agents.get_mut("desk").unwrap();
        // Activity 1 stored before activity 0.
        run.archived[1].stream_seq = 10;
        let t = Tally::of(&agents, &replies, BTreeMap::new());
        assert_eq!(t.order_violations, 1, "{t:?}");
        assert!(!t.passed());
    }
}
