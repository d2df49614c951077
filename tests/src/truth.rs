//! One line of the counting middleware's log (tests/apps/testapp.py), as the app saw its request.

/// One line of the counting middleware's log.
#[derive(Debug, Clone)]
pub struct Truth {
    pub route: String,
    pub status: u16,
    pub blocks: u64,
    pub bytes: u64,
    pub elapsed: f64,
    pub pid: u32,
    /// Seconds the process spent in garbage collection during the request (gc.callbacks).
    pub gc: f64,
    /// Collections the process ran during the request.
    pub gc_count: u64,
    /// Status line and headers as the app passed them to start_response.
    pub status_line: String,
    pub headers: Vec<(String, String)>,
}

impl Truth {
    pub(crate) fn from_json(line: &str) -> Self {
        let v: serde_json::Value = serde_json::from_str(line).expect("truth line is JSON");
        let num = |k: &str| v[k].as_u64().unwrap_or(0);
        Truth {
            route: v["route"].as_str().unwrap_or_default().to_string(),
            status: num("status") as u16,
            blocks: num("blocks"),
            bytes: num("bytes"),
            elapsed: v["elapsed"].as_f64().unwrap_or(0.0),
            pid: num("pid") as u32,
            gc: v["gc"].as_f64().unwrap_or(0.0),
            gc_count: num("gc_count"),
            status_line: v["status_line"].as_str().unwrap_or_default().to_string(),
            headers: v["headers"]
                .as_array()
                .map(|hs| hs.iter().map(|h| (h[0].as_str().unwrap_or("").into(), h[1].as_str().unwrap_or("").into())).collect())
                .unwrap_or_default(),
        }
    }

    /// Length of the head in CGI form (`Status: 200 OK\r\nName: value\r\n…\r\n`), as mod_wsgi
    /// daemons send it to Apache.
    pub fn cgi_head_len(&self) -> u64 {
        let fields: usize = self.headers.iter().map(|(k, v)| k.len() + 2 + v.len() + 2).sum();
        ("Status: ".len() + self.status_line.len() + 2 + fields + 2) as u64
    }
}
