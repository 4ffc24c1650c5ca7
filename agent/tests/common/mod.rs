//! Helpers the agent's integration tests share: agent ids, a chat event, a raw client with an agent's credentials.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // shared by several test files

use ferry_schema::event::{ChatMessage, ChatType, MessageType};
use ferry_schema::{subject, AgentId, Envelope, EventBody};
use ferry_stack::NatsServer;
use tokio::sync::mpsc;

/// `desk-<n>`, one of the demo agents.
pub fn desk(n: u8) -> AgentId {
    AgentId::new(format!("desk-{n}")).unwrap()
}

/// A direct chat from Bob to `agent`.
pub fn chat(agent: &AgentId, text: &str) -> Envelope {
    Envelope::new(
        agent.clone(),
        EventBody::Chat(ChatMessage {
            chat: "Bob".into(),
            chat_type: ChatType::Direct,
            sender: "Bob".into(),
            text: text.into(),
            msg_type: MessageType::Text,
        }),
    )
}

/// A raw client with `agent`'s credentials, as a hostile program on its PC
/// would use; the broker's complaints come out of the returned channel.
pub async fn raw_agent_client(nats: &NatsServer, agent: &AgentId) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
    let (tx, errors) = mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::new()
        .user_and_password(agent.to_string(), nats.secrets().agent(agent.as_str()).unwrap().into())
        .custom_inbox_prefix(subject::agent_inbox_prefix(agent))
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    let _ = tx.send(e.to_string());
                }
            }
        })
        .connect(nats.url())
        .await
        .unwrap();
    (client, errors)
}
