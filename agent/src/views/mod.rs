//! Views: the live side of the agent, beside /metrics — the most recent requests of every
//! service (X-View), what every worker is doing now (Active Service) and per-route figures over
//! the last minute, served as JSON (`api`) and as a page at `/`.
pub mod api;
