//! Frames drawn from fixed data into ratatui's test terminal, read back as text.
use ratatui::{backend::TestBackend, style::Color, Terminal};

use super::*;
use crate::views::api::{Active, InFlight, RouteNow, Routes, Wait, WorkerNow, API_VERSION};

fn worker(slot: u32, pid: u32, requests: Vec<InFlight>) -> WorkerNow {
    let state = if requests.is_empty() { "idle" } else { "busy" };
    WorkerNow { service: "shop".into(), worker: slot, pid, state: state.into(), requests }
}

fn request(route: &str, doing: &str, elapsed: f64, wait: Option<Wait>) -> InFlight {
    let doing_for = (doing == "downstream").then_some(0.25);
    let (on_cpu, cpu_time) = (Some(doing == "application"), Some(elapsed / 10.0));
    InFlight {
        route: route.into(),
        method: "GET".into(),
        start: 0.0,
        elapsed,
        doing: doing.into(),
        doing_for,
        wait,
        on_cpu,
        cpu_time,
    }
}

fn route(route: &str, requests: u64, p99: f64, total_time: f64, error_ratio: f64) -> RouteNow {
    RouteNow {
        service: "shop".into(),
        route: route.into(),
        requests,
        rate: requests as f64 / 60.0,
        p50: p99 / 2.0,
        p99,
        total_time,
        error_ratio,
        mean_blocks: 1.0,
        mean_bytes: 100.0,
        cpu_share: 0.5,
        downstream_share: 0.25,
        gc_share: 0.01,
        write_share: 0.02,
    }
}

fn snapshot() -> Snapshot {
    let wait = Wait { protocol: "postgresql".into(), peer: "10.0.0.5:5432".into(), operation: "SELECT ?".into() };
    Snapshot {
        active: Active {
            api_version: API_VERSION,
            at: 0.0,
            workers: vec![
                worker(1, 4102, vec![request("/orders/{id}", "downstream", 1.5, Some(wait))]),
                worker(0, 4101, vec![]),
                worker(
                    2,
                    4103,
                    vec![request("/slow", "application", 0.2, None), request("/fast", "writing", 0.01, None)],
                ),
            ],
        },
        routes: Routes {
            api_version: API_VERSION,
            window: 60.0,
            routes: vec![
                // Most requests, least total time; largest p99; some errors.
                route("/hello", 600, 0.004, 1.2, 0.0),
                route("/report", 6, 2.5, 9.0, 0.0),
                route("/orders/{id}", 120, 0.3, 20.0, 0.0),
                route("/error", 3, 0.001, 0.003, 1.0),
            ],
        },
    }
}

fn render(screen: &Screen, width: u16, height: u16) -> Vec<String> {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
    terminal.draw(|frame| draw(frame, screen)).unwrap();
    text_of(terminal.backend().buffer())
}

/// The buffer's lines as a terminal shows them: a wide character's second cell is not a space.
fn text_of(buffer: &ratatui::buffer::Buffer) -> Vec<String> {
    let area = buffer.area;
    (0..area.height)
        .map(|y| {
            let mut line = String::new();
            let mut skip = 0;
            for x in 0..area.width {
                let symbol = buffer[(x, y)].symbol();
                if skip > 0 {
                    skip -= 1;
                    continue;
                }
                skip = unicode_width::UnicodeWidthStr::width(symbol).saturating_sub(1);
                line.push_str(symbol);
            }
            line
        })
        .collect()
}

fn screen<'a>(data: &'a Snapshot, sort: Sort) -> Screen<'a> {
    Screen { url: "http://127.0.0.1:9464", data: Some(data), status: Status::Live, sort, clock: "12:00:00".into() }
}

/// The line holding `needle`, or a panic showing the frame.
fn line_of<'a>(frame: &'a [String], needle: &str) -> &'a str {
    frame.iter().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("{needle:?} not in\n{}", frame.join("\n")))
}

/// Row index of each route in the routes table, top to bottom.
fn route_order(frame: &[String], routes: &[&str]) -> Vec<String> {
    let start = frame.iter().position(|l| l.contains("Routes")).unwrap();
    let mut rows: Vec<(usize, String)> = routes
        .iter()
        .map(|r| (frame[start..].iter().position(|l| l.contains(&format!(" {r} "))).unwrap(), r.to_string()))
        .collect();
    rows.sort();
    rows.into_iter().map(|(_, r)| r).collect()
}

#[test]
fn wide_frame_shows_every_column_workers_and_routes() {
    let data = snapshot();
    let frame = render(&screen(&data, Sort::Total), 160, 30);
    let text = frame.join("\n");
    assert!(frame[0].contains("wsgiscope top http://127.0.0.1:9464  services: shop  12:00:00"), "{text}");
    assert!(frame[1].contains("live · 3 workers, 2 busy"), "{text}");
    for title in ["SERVICE", "SLOT", "PID", "STATE", "METHOD", "ELAPSED", "CPU", "DOING", "FOR", "WAITING ON"] {
        assert!(line_of(&frame, "ELAPSED").contains(title), "workers column {title}: {text}");
    }
    for title in ["REQS", "REQ/S", "P50", "P99", "ERR%", "BLOCKS", "CPU%", "DOWN%", "GC%", "WRITE%", "TOTAL▼"] {
        assert!(line_of(&frame, "REQ/S").contains(title), "routes column {title}: {text}");
    }
    // Idle worker: one row; the downstream wait named; a second request of worker 2 below it.
    let idle = line_of(&frame, "4101");
    assert!(idle.contains("idle") && idle.contains("shop"), "{idle}");
    let waiting = line_of(&frame, "4102");
    for part in ["busy", "GET", "/orders/{id}", "1.50s", "downstream", "250ms", "postgresql 10.0.0.5:5432 SELECT ?"] {
        assert!(waiting.contains(part), "{part:?} in {waiting}");
    }
    let w2 = frame.iter().position(|l| l.contains("4103")).unwrap();
    assert!(frame[w2].contains("/slow") && frame[w2].contains("application") && frame[w2].contains("on CPU"), "{text}");
    assert!(frame[w2].contains("20.0ms"), "its CPU time: {}", frame[w2]);
    assert!(frame[w2 + 1].contains("/fast") && frame[w2 + 1].contains("writing") && !frame[w2 + 1].contains("4103"));
    // Slots in order.
    let rows: Vec<usize> =
        ["4101", "4102", "4103"].iter().map(|p| frame.iter().position(|l| l.contains(p)).unwrap()).collect();
    assert!(rows.windows(2).all(|w| w[0] < w[1]), "{text}");
    // Routes by total time, with their figures.
    assert!(line_of(&frame, "Routes, last 60 s · sort: total time ▼").contains('┌'));
    assert_eq!(
        route_order(&frame, &["/hello", "/report", "/orders/{id}", "/error"]),
        ["/orders/{id}", "/report", "/hello", "/error"]
    );
    let hello = line_of(&frame, " /hello ");
    for part in ["600", "10.0", "2.00ms", "4.00ms", "0.0%", "1.00", "50.0%", "25.0%", "1.0%", "2.0%", "1.20s"] {
        assert!(hello.contains(part), "{part:?} in {hello}");
    }
    assert!(line_of(&frame, " /error ").contains("100%"));
}

#[test]
fn sort_changes_the_title_and_the_row_order() {
    let data = snapshot();
    let routes = ["/hello", "/report", "/orders/{id}", "/error"];
    let cases = [
        (Sort::Rate, "rate ▼", "REQ/S▼", ["/hello", "/orders/{id}", "/report", "/error"]),
        (Sort::P99, "p99 ▼", "P99▼", ["/report", "/orders/{id}", "/hello", "/error"]),
        (Sort::Errors, "errors ▼", "ERR%▼", ["/error", "/hello", "/orders/{id}", "/report"]),
        (Sort::Route, "route ▲", "ROUTE▲", ["/error", "/hello", "/orders/{id}", "/report"]),
    ];
    for (sort, title, header, order) in cases {
        let frame = render(&screen(&data, sort), 160, 30);
        line_of(&frame, &format!("sort: {title}"));
        line_of(&frame, header);
        assert_eq!(route_order(&frame, &routes), order, "{sort:?}");
    }
}

#[test]
fn narrow_frame_drops_columns_but_keeps_workers_and_routes() {
    let data = snapshot();
    for (width, height) in [(60, 20), (40, 12), (80, 10)] {
        let frame = render(&screen(&data, Sort::Total), width, height);
        let text = frame.join("\n");
        assert!(frame.iter().all(|l| l.chars().count() == width as usize));
        // Borders intact: each table line starts and ends on its border.
        for l in frame.iter().skip(2).filter(|l| !l.trim().is_empty()) {
            assert!(l.starts_with(['│', '┌', '└']) && l.ends_with(['│', '┐', '┘']), "{width}x{height}: {l:?}\n{text}");
        }
        if height >= 20 {
            for pid in ["4101", "4102", "4103"] {
                assert!(text.contains(pid), "{width}x{height}: {pid}\n{text}");
            }
            assert!(text.contains("/hello") && text.contains("TOTAL"), "{text}");
        }
        if width <= 60 {
            assert!(!text.contains("WAITING ON") && !text.contains("WRITE%"), "dropped first: {text}");
        }
    }
    // The sorted column stays, even when it would be dropped first.
    let frame = render(&screen(&data, Sort::Write), 60, 20);
    line_of(&frame, "WRITE%▼");
}

#[test]
fn tiny_and_empty_frames_do_not_panic() {
    let data = snapshot();
    for (w, h) in [(1, 1), (10, 3), (20, 5), (200, 2)] {
        render(&screen(&data, Sort::Total), w, h);
    }
    let empty = Snapshot {
        active: Active { api_version: API_VERSION, at: 0.0, workers: vec![] },
        routes: Routes { api_version: API_VERSION, window: 3.0, routes: vec![] },
    };
    let frame = render(&screen(&empty, Sort::Total), 80, 15);
    line_of(&frame, "no workers watched (yet)");
    line_of(&frame, "no requests in the window");
    line_of(&frame, "services: none yet");
    let none = Screen { data: None, ..screen(&empty, Sort::Total) };
    render(&none, 80, 15);
}

#[test]
fn hostile_names_stay_on_their_row() {
    let mut data = snapshot();
    let long = format!("/{}", "x".repeat(5000));
    let hostile =
        ["/a\nb\r\n/c", "/\u{1b}[2J\u{1b}[31mred", "/tab\there\u{7}", &long, "/rtl\u{202e}evil", "/wide/日本語"];
    for (i, r) in hostile.iter().enumerate() {
        data.routes.routes.push(route(r, 1, 0.01, 0.5 - i as f64 * 0.01, 0.0));
    }
    data.active.workers[0].requests = vec![request(
        "/a\nb",
        "downstream",
        1.0,
        Some(Wait { protocol: "redis".into(), peer: "\u{1b}]0;title\u{7}".into(), operation: "GET\n".into() }),
    )];
    data.active.workers[0].service = "shop\u{1b}[H".into();
    for width in [160, 60] {
        let frame = render(&screen(&data, Sort::Total), width, 30);
        let text = frame.join("\n");
        assert!(frame.iter().all(|l| !l.chars().any(|c| c.is_control())), "{text}");
        assert!(frame.iter().all(|l| unicode_width::UnicodeWidthStr::width(l.as_str()) == width as usize), "{text}");
        // Each hostile route on one row, escaped (cut to the column when narrow).
        line_of(&frame, "/a\\nb\\r\\n/c");
        line_of(&frame, "/\\u{1b}[2J");
        line_of(&frame, if width > 60 { "/rtl\\u{202e}evil" } else { "/rtl\\u{202e" });
        assert!(line_of(&frame, "/xxxx").contains('…'), "a long route is cut: {text}");
        for l in frame.iter().skip(2) {
            assert!(l.starts_with(['│', '┌', '└']) && l.ends_with(['│', '┐', '┘']), "{width}: {l:?}\n{text}");
        }
    }
    let frame = render(&screen(&data, Sort::Total), 160, 30);
    line_of(&frame, "redis \\u{1b}]0;title\\u{7} GET\\n");
    line_of(&frame, "/wide/日本語");
}

#[test]
fn unreachable_agent_keeps_the_data_greyed_with_a_status_line() {
    let data = snapshot();
    let status = Status::Unreachable { error: "connection refused".into(), since: 2.0, exit_in: Some(3.0) };
    let s = Screen { status, ..screen(&data, Sort::Total) };
    let mut terminal = Terminal::new(TestBackend::new(160, 30)).unwrap();
    terminal.draw(|frame| draw(frame, &s)).unwrap();
    let buffer = terminal.backend().buffer().clone();
    let frame = text_of(&buffer);
    assert!(
        frame[1].contains(
            "agent unreachable at http://127.0.0.1:9464 (data 2.00s old, exiting in 3 s): connection refused"
        ),
        "{}",
        frame[1]
    );
    assert_eq!(buffer[(0, 1)].fg, Color::Red);
    // The last data is still there, marked and grey.
    let y = frame.iter().position(|l| l.contains("4101")).unwrap() as u16;
    let line = &frame[y as usize];
    let x = line[..line.find("4101").unwrap()].chars().count() as u16;
    assert_eq!(buffer[(x, y)].fg, Color::DarkGray);
    assert!(line_of(&frame, "Workers").contains("[stale]"));
    assert!(line_of(&frame, "Routes").contains("[stale]"));
}
