//! The control socket: a root-only Unix stream socket at `<state_dir>/<instance>.sock` carrying
//! one JSON request line and one JSON response line per connection.
//!
//! * [`protocol`] — the request and response types, their published schemas, the request
//!   parser.
//! * [`client`] — the CLI's typed client: one method per request.
//! * [`server`] — the agent's side: limits, peer check, dispatch to the services; the only place
//!   a response is built.

pub mod client;
pub mod protocol;
pub mod server;

pub use client::{Client, ClientError};
pub use protocol::{MAX_REQUEST_BYTES, Request, Response, StatusReport};
