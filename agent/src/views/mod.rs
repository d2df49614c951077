//! Views: the live side of the agent, beside /metrics — the most recent requests of every
//! service (X-View, `requests`), what every worker is doing now (Active Service, `active`) and
//! per-route figures over the last minute (`routes`), served as JSON (`api`, by `export`) and
//! as the page at `/` (`page/`). The collector fills them; the HTTP server reads them.
pub mod active;
pub mod api;
pub mod requests;
pub mod routes;

use std::sync::Mutex;

use api::{Active, WorkerNow, API_VERSION};
use requests::{Interner, Kept, RequestLog};
use routes::{Sample, Window};

/// Now on CLOCK_MONOTONIC (the kernel's `bpf_ktime_get_ns`), in ns.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Unix time (s) of a CLOCK_MONOTONIC instant, by the clocks' offset now.
pub fn unix_of(mono_ns: u64) -> f64 {
    unix_clock()(mono_ns)
}

/// `unix_of` with the clocks' offset read once, for converting many instants.
pub fn unix_clock() -> impl Fn(u64) -> f64 {
    let offset = clock_ns(libc::CLOCK_REALTIME) as f64 - monotonic_ns() as f64;
    move |mono_ns| (mono_ns as f64 + offset) / 1e9
}

/// What the live views hold; shared by the collector (writes) and the HTTP server (reads).
pub struct Views {
    log: Mutex<RequestLog>,
    window: Mutex<Window>,
    active: Mutex<Active>,
    strings: Mutex<Interner>,
}

impl Views {
    /// `kept`: requests kept per service for `/api/requests`.
    pub fn new(kept: usize) -> Self {
        Views {
            log: Mutex::new(RequestLog::new(kept)),
            window: Mutex::new(Window::new(monotonic_ns())),
            active: Mutex::new(Active { api_version: API_VERSION, at: unix_of(monotonic_ns()), workers: Vec::new() }),
            strings: Mutex::new(Interner::default()),
        }
    }

    /// `f` with the shared strings (service, route, method as shared copies; peers and
    /// operations as ids): one lock for all the strings of a request.
    pub fn with_strings<T>(&self, f: impl FnOnce(&mut Interner) -> T) -> T {
        f(&mut self.strings.lock().expect("views lock"))
    }

    /// A request ended.
    pub fn request(&self, r: Kept) {
        let end_ns = r.start_ns + (r.duration * 1e9) as u64;
        let sample = Sample {
            route: r.route.clone(),
            end_ns,
            duration: r.duration as f32,
            cpu: r.cpu_time.unwrap_or(0.0) as f32,
            downstream: r.downstream_time as f32,
            gc: r.gc_time as f32,
            write: r.write_time as f32,
            blocks: r.blocks.min(u32::MAX as u64) as u32,
            bytes: r.bytes.min(u32::MAX as u64) as u32,
            error: matches!(r.outcome, "error" | "aborted" | "no_response"),
        };
        let service = r.service.clone();
        self.window.lock().expect("views lock").push(&service, sample);
        self.log.lock().expect("views lock").push(r);
    }

    /// The workers now (replacing the last scan's).
    pub fn set_active(&self, workers: Vec<WorkerNow>) {
        *self.active.lock().expect("views lock") = Active { api_version: API_VERSION, at: unix_of(monotonic_ns()), workers };
    }

    /// `/api/requests`, as JSON.
    pub fn requests_json(&self, since: u64, limit: usize) -> String {
        let strings = self.strings.lock().expect("views lock");
        self.log.lock().expect("views lock").page_json(since, limit, unix_clock(), &strings)
    }

    pub fn active(&self) -> Active {
        self.active.lock().expect("views lock").clone()
    }

    pub fn routes(&self) -> api::Routes {
        self.window.lock().expect("views lock").routes(monotonic_ns())
    }

    /// Requests held: in the ring, and in the minute window.
    pub fn sizes(&self) -> (usize, usize) {
        (self.log.lock().expect("views lock").len(), self.window.lock().expect("views lock").len())
    }
}
