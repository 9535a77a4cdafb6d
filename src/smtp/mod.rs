//! SMTP as protocol only (RFC 5321 with PIPELINING, SIZE, 8BITMIME and
//! ENHANCEDSTATUSCODES): replies, commands, DATA framing, and the server and
//! client state machines. Nothing here opens or reads a socket, and nothing
//! here uses another part; `inbound` and `peer` drive these machines over
//! TCP.

pub mod client;
pub mod codec;
pub mod command;
pub mod reply;
pub mod session;

pub use reply::Reply;
