//! Downstream calls: what a worker asked of its database, cache or HTTP service, recognised from
//! the first bytes it wrote and read (`protocol`), with SQL reduced to a template (`sql`), and
//! joined to the request that made them (`calls`).
pub mod calls;
pub mod protocol;
pub mod sql;

pub use calls::{Attribution, Calls, DownCall, RequestCalls};
