//! The one decode step of every handler: a message's bytes to a typed event or reply, or the poison outcome that says why not.

use async_nats::jetstream::Message;
use ferry_schema::codec::{self, DecodeError, EventMessage, StreamPosition};
use ferry_schema::{Encoding, Envelope, Reply};

use super::Outcome;

impl From<DecodeError> for Outcome {
    fn from(e: DecodeError) -> Self {
        Outcome::Poison {
            code: e.reason(),
            reason: e.to_string(),
        }
    }
}

/// An event from an agent's subject (`events.<agent>.<kind>`), checked
/// against that subject; a JSON event typed by hand is completed from the
/// subject and the message's stream position (see
/// [`codec::decode_event_message`]).
pub fn event(msg: &Message, max_payload: usize) -> Result<EventMessage, Outcome> {
    Ok(codec::decode_event_message(
        msg.subject.as_str(),
        msg.headers.as_ref(),
        &msg.payload,
        max_payload,
        position(msg).as_ref(),
    )?)
}

/// Where JetStream says `msg` sits in its stream.
fn position(msg: &Message) -> Option<StreamPosition> {
    let info = msg.info().ok()?;
    let stored = chrono::DateTime::from_timestamp(info.published.unix_timestamp(), info.published.nanosecond())?;
    Some(StreamPosition {
        seq: info.stream_sequence,
        stored,
    })
}

/// An event handed over on a work queue: the agent's own bytes, which the
/// rules worker already checked against their subject.
pub fn handoff(msg: &Message, max_payload: usize) -> Result<(Envelope, Encoding), Outcome> {
    let enc = Encoding::of(msg.headers.as_ref(), &msg.payload)?;
    Ok((codec::decode_event(&msg.payload, enc, max_payload)?, enc))
}

/// A reply from `REPLIES`.
pub fn reply(msg: &Message, max_payload: usize) -> Result<Reply, Outcome> {
    let enc = Encoding::of(msg.headers.as_ref(), &msg.payload)?;
    Ok(codec::decode_reply(&msg.payload, enc, max_payload)?)
}
