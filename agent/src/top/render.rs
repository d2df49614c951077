//! The screen, drawn from one `Screen` value and nothing else, so tests render fixed data into
//! a test terminal: a two-line header, the workers table, the routes table. Columns that do
//! not fit are dropped, least important first, rather than squeezed into garbage.
use ratatui::{
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Cell, Paragraph, Row, Table},
    Frame,
};

use super::{
    client::Snapshot,
    sort::Sort,
    text::{clean, fit, number, percent, secs},
};
use crate::views::api::{InFlight, RouteNow, WorkerNow};

/// Everything one frame shows.
pub struct Screen<'a> {
    pub url: &'a str,
    /// The last data read; `None` before the first answer.
    pub data: Option<&'a Snapshot>,
    pub status: Status,
    pub sort: Sort,
    /// Wall-clock time of the data shown (`HH:MM:SS`).
    pub clock: String,
}

pub enum Status {
    Live,
    /// The last reads failed: the data shown is old.
    Unreachable {
        error: String,
        /// Seconds since the last answer.
        since: f64,
        /// Seconds left before `top` gives up, if it will.
        exit_in: Option<f64>,
    },
}

impl Status {
    fn stale(&self) -> bool {
        matches!(self, Status::Unreachable { .. })
    }
}

/// A table column: its title, its width, and how much it matters (1 = kept longest).
struct Col {
    title: &'static str,
    width: u16,
    priority: u8,
    right: bool,
}

const fn col(title: &'static str, width: u16, priority: u8, right: bool) -> Col {
    Col { title, width, priority, right }
}

/// Workers table.
const WORKER_COLS: [Col; 11] = [
    col("SERVICE", 12, 4, false),
    col("SLOT", 4, 3, true),
    col("PID", 7, 1, true),
    col("STATE", 5, 1, false),
    col("METHOD", 6, 3, false),
    col("ROUTE", 10, 1, false),
    col("ELAPSED", 7, 1, true),
    col("CPU", 7, 3, true),
    col("DOING", 11, 2, false),
    col("FOR", 7, 3, true),
    col("WAITING ON", 30, 4, false),
];
/// ROUTE and WAITING ON share the width the others leave.
const WORKER_FLEX: &[usize] = &[5, 10];

/// Routes table. ROUTE (index 1) takes the width the others leave.
const ROUTE_COLS: [Col; 13] = [
    col("SERVICE", 12, 5, false),
    col("ROUTE", 12, 1, false),
    col("REQS", 6, 2, true),
    col("REQ/S", 7, 1, true),
    col("P50", 7, 2, true),
    col("P99", 7, 1, true),
    col("ERR%", 6, 1, true),
    col("BLOCKS", 7, 3, true),
    col("CPU%", 6, 3, true),
    col("DOWN%", 6, 3, true),
    col("GC%", 6, 4, true),
    col("WRITE%", 7, 4, true),
    col("TOTAL", 7, 1, true),
];
const ROUTE_FLEX: &[usize] = &[1];

/// The routes column a sort orders by.
fn sort_column(sort: Sort) -> usize {
    match sort {
        Sort::Route => 1,
        Sort::Rate => 3,
        Sort::P50 => 4,
        Sort::P99 => 5,
        Sort::Errors => 6,
        Sort::Blocks => 7,
        Sort::Cpu => 8,
        Sort::Downstream => 9,
        Sort::Gc => 10,
        Sort::Write => 11,
        Sort::Total => 12,
    }
}

pub fn draw(frame: &mut Frame, screen: &Screen) {
    let area = frame.area();
    let workers = screen.data.map(|d| worker_rows(&d.active.workers)).unwrap_or_default();
    let routes_count = screen.data.map_or(0, |d| d.routes.routes.len()) as u16;
    let [head, body] = Layout::vertical([Constraint::Length(2), Constraint::Min(0)]).areas(area);
    // Workers first, but at most half the body when the routes need the rest.
    let wanted = (workers.len() as u16).max(1) + 3;
    let routes_need = routes_count.max(1) + 3;
    let workers_h = wanted.min((body.height / 2).max(body.height.saturating_sub(routes_need)));
    let [workers_area, routes_area] = Layout::vertical([Constraint::Length(workers_h), Constraint::Min(0)]).areas(body);

    draw_header(frame, head, screen);
    draw_workers(frame, workers_area, screen, &workers);
    draw_routes(frame, routes_area, screen);
}

fn draw_header(frame: &mut Frame, area: Rect, screen: &Screen) {
    let services: Vec<String> = match screen.data {
        Some(d) => {
            let mut s: Vec<String> = d.active.workers.iter().map(|w| clean(&w.service)).collect();
            s.extend(d.routes.routes.iter().map(|r| clean(&r.service)));
            s.sort();
            s.dedup();
            s
        }
        None => vec![],
    };
    let services = if services.is_empty() { "none yet".to_string() } else { services.join(", ") };
    let title = Line::from(vec![
        Span::styled("wsgiscope top ", Style::new().add_modifier(Modifier::BOLD)),
        Span::raw(format!("{}  services: {services}  {}", clean(screen.url), screen.clock)),
    ]);
    let status = match &screen.status {
        Status::Live => {
            let (n, busy) = screen.data.map_or((0, 0), |d| {
                let w = &d.active.workers;
                (w.len(), w.iter().filter(|w| !w.requests.is_empty()).count())
            });
            Line::from(vec![
                Span::styled("live", Style::new().fg(Color::Green)),
                Span::raw(format!(" · {n} workers, {busy} busy · s: sort  q: quit")),
            ])
        }
        Status::Unreachable { error, since, exit_in } => {
            // The short facts first: the error may be cut at the right edge.
            let mut facts = format!("data {} old", secs(*since));
            if let Some(left) = exit_in {
                facts.push_str(&format!(", exiting in {:.0} s", left.max(0.0).ceil()));
            }
            let text = format!("agent unreachable at {} ({facts}): {}", clean(screen.url), clean(error));
            Line::from(Span::styled(text, Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)))
        }
    };
    frame.render_widget(Paragraph::new(vec![title, status]), area);
}

/// One row of the workers table: every column's text, before the narrow ones are dropped.
struct WorkerRow {
    cells: [String; 11],
    busy: bool,
    doing: String,
}

fn worker_rows(workers: &[WorkerNow]) -> Vec<WorkerRow> {
    let mut workers: Vec<&WorkerNow> = workers.iter().collect();
    workers.sort_by(|a, b| (&a.service, a.worker).cmp(&(&b.service, b.worker)));
    let mut rows = vec![];
    for w in workers {
        let who = [clean(&w.service), w.worker.to_string(), w.pid.to_string()];
        if w.requests.is_empty() {
            let [service, slot, pid] = who;
            let mut cells: [String; 11] = Default::default();
            [cells[0], cells[1], cells[2], cells[3]] = [service, slot, pid, "idle".into()];
            rows.push(WorkerRow { cells, busy: false, doing: String::new() });
            continue;
        }
        for (i, r) in w.requests.iter().enumerate() {
            // Further requests of one worker (threads, an event loop) leave its columns blank.
            let [service, slot, pid] = if i == 0 { who.clone() } else { Default::default() };
            let state = if i == 0 { "busy".into() } else { String::new() };
            rows.push(in_flight_row([service, slot, pid], state, r));
        }
    }
    rows
}

fn in_flight_row([service, slot, pid]: [String; 3], state: String, r: &InFlight) -> WorkerRow {
    let waiting = match (&r.wait, r.on_cpu) {
        (Some(w), _) => clean(&format!("{} {} {}", w.protocol, w.peer, w.operation)),
        // The application neither calls out nor collects: is it computing, or blocked?
        (None, Some(false)) if r.doing == "application" => "off CPU (sleeping or blocked)".into(),
        (None, Some(true)) if r.doing == "application" => "on CPU".into(),
        _ => String::new(),
    };
    let doing = clean(&r.doing);
    let cells = [
        service,
        slot,
        pid,
        state,
        clean(&r.method),
        clean(&r.route),
        secs(r.elapsed),
        r.cpu_time.map(secs).unwrap_or_default(),
        doing.clone(),
        r.doing_for.map(secs).unwrap_or_default(),
        waiting,
    ];
    WorkerRow { cells, busy: true, doing }
}

fn draw_workers(frame: &mut Frame, area: Rect, screen: &Screen, rows: &[WorkerRow]) {
    let busy = rows.iter().filter(|r| r.busy && !r.cells[3].is_empty()).count();
    let workers = rows.iter().filter(|r| !r.cells[3].is_empty()).count();
    let shown = area.height.saturating_sub(3) as usize;
    let mut title = format!(" Workers: {workers}, {busy} busy ");
    if rows.len() > shown {
        title.push_str(&format!("· {} more rows below ", rows.len() - shown));
    }
    let (picked, widths) = pick_columns(&WORKER_COLS, WORKER_FLEX, None, area.width.saturating_sub(2));
    let body: Vec<Row> = rows
        .iter()
        .map(|r| {
            let style = if r.busy { doing_style(&r.doing) } else { Style::new().fg(Color::Gray) };
            let cells = picked.iter().zip(&widths).map(|(&i, &w)| {
                let text = fit(&r.cells[i], w as usize);
                let cell = aligned(text, WORKER_COLS[i].right);
                // Colours say what is happening now: none on old data.
                if (i == 8 || i == 3) && !screen.status.stale() {
                    cell.style(style)
                } else {
                    cell
                }
            });
            Row::new(cells.collect::<Vec<_>>())
        })
        .collect();
    let empty = body.is_empty();
    frame.render_widget(table(&WORKER_COLS, &picked, &widths, None, body, block(title, screen)), area);
    if empty {
        draw_empty(frame, area, "no workers watched (yet)");
    }
}

fn doing_style(doing: &str) -> Style {
    match doing {
        "downstream" => Style::new().fg(Color::Magenta),
        "gc" => Style::new().fg(Color::Red),
        "writing" => Style::new().fg(Color::Cyan),
        "reading" => Style::new().fg(Color::Blue),
        _ => Style::new().fg(Color::Yellow),
    }
}

fn draw_routes(frame: &mut Frame, area: Rect, screen: &Screen) {
    let (window, mut routes): (f64, Vec<&RouteNow>) = match screen.data {
        Some(d) => (d.routes.window, d.routes.routes.iter().collect()),
        None => (0.0, vec![]),
    };
    screen.sort.apply(&mut routes);
    let sorted = sort_column(screen.sort);
    let arrow = if screen.sort == Sort::Route { "▲" } else { "▼" };
    let shown = area.height.saturating_sub(3) as usize;
    let mut title = format!(" Routes, last {:.0} s · sort: {} {arrow} (s) ", window, screen.sort.name());
    if routes.len() > shown {
        title.push_str(&format!("· {} more below ", routes.len() - shown));
    }
    let (picked, widths) = pick_columns(&ROUTE_COLS, ROUTE_FLEX, Some(sorted), area.width.saturating_sub(2));
    let body: Vec<Row> = routes
        .iter()
        .map(|r| {
            let cells = route_cells(r);
            let row =
                picked.iter().zip(&widths).map(|(&i, &w)| aligned(fit(&cells[i], w as usize), ROUTE_COLS[i].right));
            let row = Row::new(row.collect::<Vec<_>>());
            if r.error_ratio > 0.0 && !screen.status.stale() {
                row.style(Style::new().fg(Color::Red))
            } else {
                row
            }
        })
        .collect();
    let empty = body.is_empty();
    frame.render_widget(table(&ROUTE_COLS, &picked, &widths, Some((sorted, arrow)), body, block(title, screen)), area);
    if empty {
        draw_empty(frame, area, "no requests in the window");
    }
}

fn route_cells(r: &RouteNow) -> [String; 13] {
    [
        clean(&r.service),
        clean(&r.route),
        r.requests.to_string(),
        number(r.rate),
        secs(r.p50),
        secs(r.p99),
        percent(r.error_ratio),
        number(r.mean_blocks),
        percent(r.cpu_share),
        percent(r.downstream_share),
        percent(r.gc_share),
        percent(r.write_share),
        secs(r.total_time),
    ]
}

/// A bordered block titled `title`, greyed out when the data is old.
fn block(title: String, screen: &Screen) -> Block<'static> {
    let mut title = Line::from(title);
    if screen.status.stale() {
        title.push_span(Span::styled("[stale] ", Style::new().fg(Color::Red)));
    }
    let block = Block::bordered().title(title);
    if screen.status.stale() {
        block.style(Style::new().fg(Color::DarkGray))
    } else {
        block
    }
}

fn table<'a>(
    cols: &[Col],
    picked: &[usize],
    widths: &[u16],
    sorted: Option<(usize, &str)>,
    body: Vec<Row<'a>>,
    block: Block<'a>,
) -> Table<'a> {
    let header = picked.iter().map(|&i| {
        let c = &cols[i];
        match sorted {
            Some((s, arrow)) if s == i => {
                aligned(format!("{}{arrow}", c.title), c.right).style(Style::new().add_modifier(Modifier::UNDERLINED))
            }
            _ => aligned(c.title.to_string(), c.right),
        }
    });
    let widths: Vec<Constraint> = widths.iter().map(|&w| Constraint::Length(w)).collect();
    Table::new(body, widths)
        .header(Row::new(header.collect::<Vec<_>>()).style(Style::new().add_modifier(Modifier::BOLD)))
        .column_spacing(1)
        .block(block)
}

/// `message` on the first row of an empty table in `area`, under its header.
fn draw_empty(frame: &mut Frame, area: Rect, message: &str) {
    let inner = Block::bordered().inner(area);
    if inner.height >= 2 {
        let row = Rect { y: inner.y + 1, height: 1, ..inner };
        frame.render_widget(Paragraph::new(message), row);
    }
}

fn aligned(text: String, right: bool) -> Cell<'static> {
    let line = Line::from(text);
    Cell::from(if right { line.right_aligned() } else { line })
}

/// The columns that fit in `width`, most important first (the sorted one before all), in
/// their own order, with their widths: the flexible columns share what the others leave.
fn pick_columns(cols: &[Col], flex: &[usize], keep: Option<usize>, width: u16) -> (Vec<usize>, Vec<u16>) {
    let rank = |i: usize| if Some(i) == keep || i == flex[0] { 0 } else { cols[i].priority };
    let mut order: Vec<usize> = (0..cols.len()).collect();
    order.sort_by_key(|&i| (rank(i), i));
    let mut picked: Vec<usize> = vec![];
    let mut used: u16 = 0;
    for i in order {
        let add = cols[i].width + u16::from(!picked.is_empty());
        if used + add <= width {
            used += add;
            picked.push(i);
        }
    }
    picked.sort();
    let flexible: Vec<usize> = picked.iter().copied().filter(|i| flex.contains(i)).collect();
    let spare = width - used;
    let widths = picked
        .iter()
        .map(|&i| match flexible.iter().position(|&f| f == i) {
            // The first flexible column takes what an even split leaves over.
            Some(k) => {
                let n = flexible.len() as u16;
                cols[i].width + spare / n + if k == 0 { spare % n } else { 0 }
            }
            None => cols[i].width,
        })
        .collect();
    (picked, widths)
}

#[cfg(test)]
mod tests;
