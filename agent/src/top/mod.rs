//! `wsgiscope top`: a terminal view of a running agent, read from its live API (`/api/active`
//! and `/api/routes`) every second. `client` reads, `render` draws one frame from plain values,
//! `sort` orders the routes, `text` makes names safe to print. This module runs the loop: read,
//! draw, wait for a key or the next refresh.
//!
//! Exit status: 0 when the user quits (`q`, Esc, Ctrl-C); 2 when the agent does not answer at
//! start, or stops answering for `--exit-after` seconds (a line on stderr says why, once the
//! terminal is restored); 1 for any other error.
pub mod client;
pub mod render;
pub mod sort;
pub mod text;

use std::{
    io::IsTerminal,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use ratatui::{
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    DefaultTerminal,
};

use self::{
    client::{Client, Snapshot},
    render::{Screen, Status},
    sort::Sort,
};
use crate::cli::TopArgs;

/// Exit status when the agent is not there, or went away.
pub const EXIT_UNREACHABLE: i32 = 2;

pub fn run(args: &TopArgs) -> Result<i32> {
    let client = Client::new(&args.url);
    // No agent at all: say so plainly, before taking over the terminal.
    let first = match client.snapshot() {
        Ok(s) => s,
        Err(err) => {
            eprintln!(
                "wsgiscope top: no agent answers at {}: {err:#}\n\
                 Is wsgiscope running? Start it (`wsgiscope attach --pid PID`, `run` or `daemon`) and \
                 pass its --listen address here: `wsgiscope top --url http://HOST:PORT`.",
                client.base
            );
            return Ok(EXIT_UNREACHABLE);
        }
    };
    if !std::io::stdout().is_terminal() {
        bail!(
            "wsgiscope top draws on a terminal, and its output is not one (for data, GET {}/api/routes)",
            client.base
        );
    }
    let refresh = Duration::from_secs_f64(args.interval);
    let give_up = (args.exit_after > 0.0).then(|| Duration::from_secs_f64(args.exit_after));
    let outcome = {
        let mut terminal = Terminal::open()?;
        let mut state = State::new(first);
        event_loop(&mut terminal.0, &client, &mut state, refresh, give_up)?
        // The terminal is restored here, before anything is printed.
    };
    match outcome {
        Outcome::Quit => Ok(0),
        Outcome::GaveUp(error) => {
            eprintln!(
                "wsgiscope top: the agent at {} stopped answering ({error}); gave up after {} s (--exit-after)",
                client.base, args.exit_after
            );
            Ok(EXIT_UNREACHABLE)
        }
    }
}

/// The terminal in raw mode on the alternate screen; restored on drop, whatever ends the loop.
struct Terminal(DefaultTerminal);

impl Terminal {
    fn open() -> Result<Terminal> {
        Ok(Terminal(ratatui::try_init()?))
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.0.show_cursor();
        ratatui::restore();
    }
}

enum Outcome {
    Quit,
    GaveUp(String),
}

/// What the loop knows between frames.
struct State {
    data: Snapshot,
    clock: String,
    sort: Sort,
    /// When the agent last answered.
    answered: Instant,
    /// Since when, and why, reads fail.
    failing: Option<(Instant, String)>,
}

impl State {
    fn new(data: Snapshot) -> State {
        let clock = clock(data.active.at);
        State { data, clock, sort: Sort::default(), answered: Instant::now(), failing: None }
    }

    fn read(&mut self, client: &Client) {
        match client.snapshot() {
            Ok(data) => {
                self.clock = clock(data.active.at);
                self.data = data;
                self.answered = Instant::now();
                self.failing = None;
            }
            Err(err) => {
                let since = self.failing.as_ref().map_or_else(Instant::now, |f| f.0);
                self.failing = Some((since, format!("{err:#}")));
            }
        }
    }

    fn screen<'a>(&'a self, url: &'a str, give_up: Option<Duration>) -> Screen<'a> {
        let status = match &self.failing {
            None => Status::Live,
            Some((since, error)) => Status::Unreachable {
                error: error.clone(),
                since: self.answered.elapsed().as_secs_f64(),
                exit_in: give_up.map(|g| g.saturating_sub(since.elapsed()).as_secs_f64()),
            },
        };
        Screen { url, data: Some(&self.data), status, sort: self.sort, clock: self.clock.clone() }
    }
}

fn event_loop(
    terminal: &mut DefaultTerminal,
    client: &Client,
    state: &mut State,
    refresh: Duration,
    give_up: Option<Duration>,
) -> Result<Outcome> {
    let mut next_read = Instant::now() + refresh;
    loop {
        terminal.draw(|frame| render::draw(frame, &state.screen(&client.base, give_up)))?;
        if let (Some((since, error)), Some(limit)) = (&state.failing, give_up) {
            if since.elapsed() >= limit {
                return Ok(Outcome::GaveUp(error.clone()));
            }
        }
        // Keys are answered at once; the data is read on its own beat.
        let wait = next_read.saturating_duration_since(Instant::now());
        if event::poll(wait)? {
            if let Event::Key(key) = event::read()? {
                if key.kind != KeyEventKind::Press {
                    continue;
                }
                match key.code {
                    KeyCode::Char('q') | KeyCode::Esc => return Ok(Outcome::Quit),
                    KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => return Ok(Outcome::Quit),
                    KeyCode::Char('s') => state.sort = state.sort.next(),
                    KeyCode::Char('S') => state.sort = state.sort.previous(),
                    KeyCode::Char('r') => next_read = Instant::now(),
                    _ => {}
                }
            }
            // A resize or a key: draw again, without waiting for the next read.
            continue;
        }
        state.read(client);
        next_read = Instant::now() + refresh;
    }
}

/// Unix time `at` as local `HH:MM:SS`.
fn clock(at: f64) -> String {
    let t = at as libc::time_t;
    // SAFETY: localtime_r writes only into `tm`, a plain C struct zeroed here.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return String::new();
    }
    format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
}
