//! Text for the screen: names made safe to print, cut to a width, and numbers in few columns.
//! Routes, peers and operations come from the traffic, so anyone who can send a request can
//! choose them: a control character or escape sequence written as is could move the cursor or
//! break a row, so every name passes through `clean` first.
use unicode_width::UnicodeWidthChar;

/// Longest name kept before cutting it to a column: bounds the work for a hostile route.
const MAX_CHARS: usize = 512;

/// `s` with control and invisible formatting characters written as escapes (`\n`, `\u{1b}`,
/// `\u{202e}`), so one name stays one line of visible text.
pub fn clean(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_CHARS));
    for c in s.chars().take(MAX_CHARS) {
        if c.is_control() || is_invisible(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Zero-width and bidirectional formatting characters: printable to Rust, but they reorder or
/// hide what a terminal shows around them.
fn is_invisible(c: char) -> bool {
    matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}' | '\u{ad}')
}

/// `s` in at most `width` terminal columns, ending with `…` when cut.
pub fn fit(s: &str, width: usize) -> String {
    let total: usize = s.chars().map(|c| c.width().unwrap_or(0)).sum();
    if total <= width {
        return s.to_string();
    }
    if width == 0 {
        return String::new();
    }
    let mut out = String::new();
    let mut used = 0;
    for c in s.chars() {
        let w = c.width().unwrap_or(0);
        if used + w > width - 1 {
            break;
        }
        used += w;
        out.push(c);
    }
    out.push('…');
    out
}

/// A duration in seconds in three significant digits, at most 7 columns: `850µs`, `1.25ms`,
/// `12.3ms`, `1.25s`, `95.1s`, `1h02m`.
pub fn secs(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        return "-".into();
    }
    let ms = s * 1e3;
    if s < 1e-3 {
        format!("{:.0}µs", s * 1e6)
    } else if s < 0.01 {
        format!("{ms:.2}ms")
    } else if s < 0.1 {
        format!("{ms:.1}ms")
    } else if s < 1.0 {
        format!("{ms:.0}ms")
    } else if s < 10.0 {
        format!("{s:.2}s")
    } else if s < 100.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{s:.0}s")
    } else {
        format!("{}h{:02}m", (s / 3600.0) as u64, ((s % 3600.0) / 60.0) as u64)
    }
}

/// A share (0..1) as a percentage: `0.0%`, `12.5%`, `100%`.
pub fn percent(share: f64) -> String {
    if !share.is_finite() {
        return "-".into();
    }
    let p = share * 100.0;
    if p >= 99.95 {
        format!("{p:.0}%")
    } else {
        format!("{p:.1}%")
    }
}

/// A rate or a mean: three significant digits at most (`0.05`, `1.50`, `12.5`, `1234`).
pub fn number(x: f64) -> String {
    if !x.is_finite() {
        "-".into()
    } else if x < 10.0 {
        format!("{x:.2}")
    } else if x < 100.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_lose_their_control_characters() {
        assert_eq!(clean("/a\nb"), "/a\\nb");
        assert_eq!(clean("/\u{1b}[2J"), "/\\u{1b}[2J");
        assert_eq!(clean("/x\u{202e}y"), "/x\\u{202e}y");
        assert_eq!(clean("/café/日本"), "/café/日本");
        assert_eq!(clean(&"a".repeat(10_000)).len(), MAX_CHARS);
    }

    #[test]
    fn names_are_cut_to_their_column() {
        assert_eq!(fit("/users", 10), "/users");
        assert_eq!(fit("/users/list", 6), "/user…");
        // Wide characters count twice.
        assert_eq!(fit("日本語です", 5), "日本…");
        assert_eq!(fit("abc", 0), "");
    }

    #[test]
    fn numbers_stay_short() {
        assert_eq!(secs(0.000_85), "850µs");
        assert_eq!(secs(0.00134), "1.34ms");
        assert_eq!(secs(0.0123), "12.3ms");
        assert_eq!(secs(42.42), "42.4s");
        assert_eq!(secs(0.25), "250ms");
        assert_eq!(secs(1.25), "1.25s");
        assert_eq!(secs(3725.0), "1h02m");
        assert_eq!(secs(f64::NAN), "-");
        assert_eq!(percent(0.125), "12.5%");
        assert_eq!(percent(1.0), "100%");
        assert_eq!(number(0.05), "0.05");
        assert_eq!(number(1234.4), "1234");
    }
}
