//! The agent's live API, read over plain blocking HTTP: `top` draws between reads, so a read
//! that waits never has anything else to do.
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;

use crate::views::api::{Active, Routes, API_VERSION};

/// An answer weighs a few kB per worker and route; this bounds a confused server's.
const BODY_LIMIT: u64 = 64 << 20;

/// What one refresh reads.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub active: Active,
    pub routes: Routes,
}

pub struct Client {
    /// `http://host:port`, without a trailing slash.
    pub base: String,
    agent: ureq::Agent,
}

impl Client {
    /// `url` as given to `--url`: `http://127.0.0.1:9464`, or just `127.0.0.1:9464`.
    pub fn new(url: &str) -> Client {
        let url = url.trim().trim_end_matches('/');
        let base = if url.contains("://") { url.to_string() } else { format!("http://{url}") };
        // Short timeouts: an agent that does not answer within a refresh is shown as such.
        let agent = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_millis(500)))
            .timeout_global(Some(Duration::from_millis(900)))
            .build()
            .new_agent();
        Client { base, agent }
    }

    pub fn snapshot(&self) -> Result<Snapshot> {
        Ok(Snapshot { active: self.get("/api/active")?, routes: self.get("/api/routes")? })
    }

    fn get<T: DeserializeOwned + HasVersion>(&self, path: &str) -> Result<T> {
        let url = format!("{}{path}", self.base);
        let mut response = self.agent.get(&url).call().map_err(|e| match e {
            ureq::Error::StatusCode(404) => {
                anyhow::anyhow!("GET {url}: 404 (is this a wsgiscope agent with the live API /api/*?)")
            }
            e => anyhow::Error::new(e).context(format!("GET {url}")),
        })?;
        let body = response
            .body_mut()
            .with_config()
            .limit(BODY_LIMIT)
            .read_to_string()
            .with_context(|| format!("GET {url}: reading the answer"))?;
        let value: T = serde_json::from_str(&body).with_context(|| format!("GET {url}: not an API answer"))?;
        if value.version() != API_VERSION {
            bail!("GET {url}: API version {}, this top reads version {API_VERSION}", value.version());
        }
        Ok(value)
    }
}

/// The `api_version` every answer carries.
trait HasVersion {
    fn version(&self) -> u32;
}

impl HasVersion for Active {
    fn version(&self) -> u32 {
        self.api_version
    }
}

impl HasVersion for Routes {
    fn version(&self) -> u32 {
        self.api_version
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_take_a_scheme_and_lose_a_trailing_slash() {
        assert_eq!(Client::new("127.0.0.1:9464").base, "http://127.0.0.1:9464");
        assert_eq!(Client::new("http://[::1]:9464/").base, "http://[::1]:9464");
    }

    #[test]
    fn a_closed_port_is_an_error_naming_the_url() {
        // Bind then drop: a loopback port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let err = Client::new(&format!("127.0.0.1:{port}")).snapshot().unwrap_err();
        assert!(format!("{err:#}").contains(&format!("http://127.0.0.1:{port}/api/active")), "{err:#}");
    }
}
