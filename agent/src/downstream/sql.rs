//! SQL templates: a statement with its literals and parameters replaced by `?`, so that
//! `... WHERE id = 1`, `... WHERE id = 2` and `... WHERE id = $1` count as one operation (a
//! metric label). A lexer, not a parser: it only needs to know where literals, comments and
//! quoted names begin and end. Keywords keep their case; whitespace runs become one space.

/// Max bytes of a template.
pub const MAX_TEMPLATE: usize = 200;

/// Ends a template that was cut, by the capture or by `MAX_TEMPLATE`.
const CUT: &str = "…";

/// How strings and comments are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// PostgreSQL (the SQL standard): `'...'` escapes only by `''`; `"..."` is a name.
    Standard,
    /// MySQL: `'...'` and `"..."` are strings with backslash escapes (what PyMySQL and
    /// mysqlclient write), `#` starts a comment.
    Mysql,
}

/// The template of a whole statement (PostgreSQL quoting).
pub fn normalise(sql: &str) -> String {
    normalise_with(sql, Dialect::Standard, false)
}

/// The template of `sql`. `cut`: `sql` is only the start of the statement (capture limit), so
/// a word running to its end is dropped (it may be partial) and the template ends with "…".
pub fn normalise_with(sql: &str, dialect: Dialect, cut: bool) -> String {
    let toks = collapse_values(collapse_lists(lex(sql, dialect, cut)));
    let mut out = String::new();
    for t in &toks {
        let text = match t {
            Tok::Space if out.is_empty() || out.ends_with(' ') => continue,
            Tok::Space => " ",
            Tok::Param => "?",
            Tok::Open => "(",
            Tok::Close => ")",
            Tok::Comma => ",",
            Tok::Text(s) => s,
        };
        out.push_str(text);
    }
    out.truncate(out.trim_end().len());
    if cut {
        out.push_str(CUT);
    }
    if out.len() > MAX_TEMPLATE {
        let mut at = MAX_TEMPLATE - CUT.len();
        while !out.is_char_boundary(at) {
            at -= 1;
        }
        out.truncate(at);
        out.truncate(out.trim_end().len());
        out.push_str(CUT);
    }
    out
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    /// Whitespace or a comment.
    Space,
    /// A literal or a parameter.
    Param,
    Open,
    Close,
    Comma,
    /// Kept verbatim: a word, a quoted name, an operator character.
    Text(String),
}

fn lex(sql: &str, dialect: Dialect, cut: bool) -> Vec<Tok> {
    let s = sql.as_bytes();
    let mysql = dialect == Dialect::Mysql;
    let mut toks: Vec<Tok> = Vec::new();
    let mut i = 0;
    // Every branch ends on an ASCII byte or at the end, so `sql[i..end]` is on char boundaries.
    while i < s.len() {
        let c = s[i];
        let next = s.get(i + 1).copied();
        let (tok, end) = if c.is_ascii_whitespace() {
            (Some(Tok::Space), i + 1)
        } else if (c == b'-' && next == Some(b'-')) || (c == b'#' && mysql) {
            let end = s[i..].iter().position(|&b| b == b'\n').map_or(s.len(), |n| i + n);
            (Some(Tok::Space), end)
        } else if c == b'/' && next == Some(b'*') {
            // Unterminated (cut): the rest is comment.
            match find(s, i + 2, b"*/") {
                Some(e) => (Some(Tok::Space), e + 2),
                None => (None, s.len()),
            }
        } else {
            match c {
                b'\'' => (Some(Tok::Param), string_end(s, i, mysql)),
                b'"' if mysql => (Some(Tok::Param), string_end(s, i, true)),
                b'"' | b'`' => {
                    let end = string_end(s, i, false);
                    (Some(Tok::Text(sql[i..end].to_string())), end)
                }
                b'?' => (Some(Tok::Param), i + 1),
                b'(' => (Some(Tok::Open), i + 1),
                b')' => (Some(Tok::Close), i + 1),
                b',' => (Some(Tok::Comma), i + 1),
                b'$' => dollar(sql, i),
                b'%' => percent(sql, i),
                b'0'..=b'9' => number(sql, i),
                b'.' if next.is_some_and(|b| b.is_ascii_digit()) => number(sql, i),
                _ if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => word(sql, i, mysql),
                _ => (Some(Tok::Text(sql[i..i + 1].to_string())), i + 1),
            }
        };
        // A name running into the cut may be partial: drop it rather than vary the template.
        let partial = cut && end == s.len() && matches!(tok, Some(Tok::Text(_))) && (is_ident(c) || c == b'"' || c == b'`');
        match tok {
            Some(Tok::Space) if matches!(toks.last(), None | Some(Tok::Space)) => {}
            Some(t) if !partial => toks.push(t),
            _ => {}
        }
        i = end;
    }
    toks
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

fn ident_end(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && is_ident(s[i]) {
        i += 1;
    }
    i
}

fn find(s: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    s.get(from..)?.windows(needle.len()).position(|w| w == needle).map(|n| from + n)
}

/// The end (after the closing quote) of the quoted text opening at `open`, a doubled quote
/// escaping it; the end of input when unterminated (cut).
fn string_end(s: &[u8], open: usize, backslash: bool) -> usize {
    let quote = s[open];
    let mut j = open + 1;
    while j < s.len() {
        let escape = (backslash && s[j] == b'\\') || (s[j] == quote && s.get(j + 1) == Some(&quote));
        if escape {
            j += 2;
        } else if s[j] == quote {
            return j + 1;
        } else {
            j += 1;
        }
    }
    s.len()
}

/// A word; `E'...'`, `N'...'`, `B'...'` and `X'...'` are literals.
fn word(sql: &str, i: usize, mysql: bool) -> (Option<Tok>, usize) {
    let s = sql.as_bytes();
    let end = ident_end(s, i);
    if end == i + 1 && s.get(end) == Some(&b'\'') && matches!(s[i].to_ascii_uppercase(), b'E' | b'N' | b'B' | b'X') {
        let backslash = mysql || s[i].eq_ignore_ascii_case(&b'E');
        return (Some(Tok::Param), string_end(s, end, backslash));
    }
    (Some(Tok::Text(sql[i..end].to_string())), end)
}

/// A number (integer, decimal, exponent, `0x` hex) is a literal; digits running into letters
/// (`1st`, MySQL allows such names) are a word.
fn number(sql: &str, i: usize) -> (Option<Tok>, usize) {
    let s = sql.as_bytes();
    let digits = |mut j: usize| {
        while j < s.len() && s[j].is_ascii_digit() {
            j += 1;
        }
        j
    };
    let mut end;
    if s[i] == b'0' && matches!(s.get(i + 1), Some(b'x' | b'X')) && s.get(i + 2).is_some_and(u8::is_ascii_hexdigit) {
        end = i + 2;
        while end < s.len() && s[end].is_ascii_hexdigit() {
            end += 1;
        }
    } else {
        end = digits(i);
        if s.get(end) == Some(&b'.') {
            end = digits(end + 1);
        }
        if matches!(s.get(end), Some(b'e' | b'E')) {
            let sign = usize::from(matches!(s.get(end + 1), Some(b'+' | b'-')));
            if s.get(end + 1 + sign).is_some_and(u8::is_ascii_digit) {
                end = digits(end + 1 + sign);
            }
        }
    }
    if s.get(end).is_some_and(|&b| is_ident(b)) {
        let end = ident_end(s, end);
        return (Some(Tok::Text(sql[i..end].to_string())), end);
    }
    (Some(Tok::Param), end)
}

/// `$1` is a parameter, `$tag$...$tag$` (or `$$...$$`) a literal; else `$` is kept.
fn dollar(sql: &str, i: usize) -> (Option<Tok>, usize) {
    let s = sql.as_bytes();
    if s.get(i + 1).is_some_and(u8::is_ascii_digit) {
        let mut end = i + 1;
        while end < s.len() && s[end].is_ascii_digit() {
            end += 1;
        }
        return (Some(Tok::Param), end);
    }
    let mut j = i + 1;
    while j < s.len() && is_ident(s[j]) && s[j] != b'$' {
        j += 1;
    }
    if s.get(j) == Some(&b'$') {
        let tag = &s[i..=j];
        let end = find(s, j + 1, tag).map_or(s.len(), |k| k + tag.len());
        return (Some(Tok::Param), end);
    }
    (Some(Tok::Text("$".into())), i + 1)
}

/// Python driver placeholders: `%s` and `%(name)s` are parameters; `%%` is a literal `%`.
fn percent(sql: &str, i: usize) -> (Option<Tok>, usize) {
    let s = sql.as_bytes();
    match s.get(i + 1) {
        Some(b's') if !s.get(i + 2).is_some_and(|&b| is_ident(b)) => (Some(Tok::Param), i + 2),
        Some(b'(') => {
            let j = ident_end(s, i + 2);
            if s.get(j..j + 2) == Some(b")s") {
                (Some(Tok::Param), j + 2)
            } else {
                (Some(Tok::Text("%".into())), i + 1)
            }
        }
        Some(b'%') => (Some(Tok::Text("%%".into())), i + 2),
        _ => (Some(Tok::Text("%".into())), i + 1),
    }
}

/// `(?, ?, ?)` → `(?)`: an IN list (or a VALUES row) of any length gives one template.
fn collapse_lists(toks: Vec<Tok>) -> Vec<Tok> {
    let mut out = Vec::with_capacity(toks.len());
    let mut i = 0;
    while i < toks.len() {
        if toks[i] == Tok::Open {
            if let Some(close) = param_list_end(&toks, i + 1) {
                out.extend([Tok::Open, Tok::Param]);
                if close < toks.len() {
                    out.push(Tok::Close);
                }
                i = close + 1;
                continue;
            }
        }
        out.push(toks[i].clone());
        i += 1;
    }
    out
}

/// Where the `)` of a list of only parameters starting at `i` is; the end of the tokens when the
/// list runs into the end (a cut statement).
fn param_list_end(toks: &[Tok], mut i: usize) -> Option<usize> {
    let (mut want_param, mut seen) = (true, false);
    loop {
        match toks.get(i) {
            Some(Tok::Space) => {}
            Some(Tok::Param) if want_param => (want_param, seen) = (false, true),
            Some(Tok::Comma) if !want_param => want_param = true,
            Some(Tok::Close) if !want_param => return Some(i),
            None if seen => return Some(i),
            _ => return None,
        }
        i += 1;
    }
}

/// `VALUES (...), (...)` → `VALUES (...)`: a multi-row INSERT gives one template, however many rows.
fn collapse_values(toks: Vec<Tok>) -> Vec<Tok> {
    let mut out = Vec::with_capacity(toks.len());
    let mut i = 0;
    while i < toks.len() {
        let values = matches!(&toks[i], Tok::Text(w) if w.eq_ignore_ascii_case("values"));
        out.push(toks[i].clone());
        i += 1;
        let open = skip_space(&toks, i);
        if !values || toks.get(open) != Some(&Tok::Open) {
            continue;
        }
        let first_end = group_end(&toks, open);
        out.extend_from_slice(&toks[i..first_end]);
        i = first_end;
        // Drop the further rows, and a trailing comma the cut left.
        loop {
            let comma = skip_space(&toks, i);
            if toks.get(comma) != Some(&Tok::Comma) {
                break;
            }
            let open = skip_space(&toks, comma + 1);
            match toks.get(open) {
                Some(Tok::Open) => i = group_end(&toks, open),
                None => i = open,
                Some(_) => break,
            }
        }
    }
    out
}

fn skip_space(toks: &[Tok], mut i: usize) -> usize {
    while toks.get(i) == Some(&Tok::Space) {
        i += 1;
    }
    i
}

/// Just after the `)` matching the `(` at `open`; the end when it is cut off.
fn group_end(toks: &[Tok], open: usize) -> usize {
    let mut depth = 0usize;
    for (i, t) in toks.iter().enumerate().skip(open) {
        match t {
            Tok::Open => depth += 1,
            Tok::Close => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
    }
    toks.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mysql(sql: &str) -> String {
        normalise_with(sql, Dialect::Mysql, false)
    }

    #[test]
    fn comments_are_stripped() {
        assert_eq!(normalise("SELECT a -- why\nFROM t /* hint */ WHERE b = 1"), "SELECT a FROM t WHERE b = ?");
        assert_eq!(
            normalise("SELECT 1 /*traceparent='00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'*/"),
            "SELECT ?"
        );
        assert_eq!(normalise("SELECT a/**/FROM t"), "SELECT a FROM t");
        assert_eq!(mysql("SELECT a # why\nFROM t"), "SELECT a FROM t");
        // `#` is an operator in PostgreSQL.
        assert_eq!(normalise("SELECT a # b FROM t"), "SELECT a # b FROM t");
    }

    #[test]
    fn string_literals_become_params() {
        assert_eq!(normalise("SELECT * FROM t WHERE name = 'O''Brien'"), "SELECT * FROM t WHERE name = ?");
        assert_eq!(normalise(r"SELECT E'it\'s', N'x', B'0101', X'ff', e'\\'"), "SELECT ?, ?, ?, ?, ?");
        // Standard strings: a backslash is just a character.
        assert_eq!(normalise(r"SELECT 'C:\' AS p"), "SELECT ? AS p");
        assert_eq!(normalise("SELECT $$it's$$, $fn$ a $$ b $fn$ FROM t"), "SELECT ?, ? FROM t");
    }

    #[test]
    fn mysql_strings_have_backslash_escapes() {
        assert_eq!(mysql(r"SELECT * FROM t WHERE name = 'O\'Brien' AND b = 1"), "SELECT * FROM t WHERE name = ? AND b = ?");
        assert_eq!(mysql(r#"SELECT "a\"b", `weird``name` FROM t"#), "SELECT ?, `weird``name` FROM t");
    }

    #[test]
    fn numbers_become_params_but_not_digits_in_names() {
        assert_eq!(normalise("SELECT 42, 3.14, .5, 1e10, 2.5E-3, 7., 0xFF"), "SELECT ?, ?, ?, ?, ?, ?, ?");
        assert_eq!(normalise("SELECT t1.col_2, x$1 FROM t1 WHERE c3 = 3"), "SELECT t1.col_2, x$1 FROM t1 WHERE c3 = ?");
        assert_eq!(mysql("SELECT 1st FROM t"), "SELECT 1st FROM t");
    }

    #[test]
    fn quoted_names_stay() {
        assert_eq!(normalise(r#"SELECT "Col 3", "a""b" FROM "T1" WHERE x = 'v'"#), r#"SELECT "Col 3", "a""b" FROM "T1" WHERE x = ?"#);
        assert_eq!(normalise("SELECT `col 1` FROM `t`"), "SELECT `col 1` FROM `t`");
    }

    #[test]
    fn placeholders_become_params() {
        assert_eq!(normalise("SELECT * FROM t WHERE a = $1 AND b = $12"), "SELECT * FROM t WHERE a = ? AND b = ?");
        assert_eq!(normalise("UPDATE t SET a = %s WHERE b = %(name)s"), "UPDATE t SET a = ? WHERE b = ?");
        assert_eq!(normalise("SELECT a FROM t WHERE b = ? AND c LIKE 'x%%'"), "SELECT a FROM t WHERE b = ? AND c LIKE ?");
        assert_eq!(normalise("SELECT a % b, c %% d"), "SELECT a % b, c %% d");
    }

    #[test]
    fn keywords_stay() {
        assert_eq!(normalise("select * from T where a is NULL or b = true or c = FALSE"), "select * from T where a is NULL or b = true or c = FALSE");
    }

    #[test]
    fn lists_collapse() {
        assert_eq!(normalise("SELECT * FROM t WHERE id IN (1, 2, 3)"), "SELECT * FROM t WHERE id IN (?)");
        assert_eq!(normalise("SELECT * FROM t WHERE id IN ($1,$2)"), "SELECT * FROM t WHERE id IN (?)");
        assert_eq!(normalise("SELECT * FROM t WHERE id IN ( 'a' , 'b' )"), "SELECT * FROM t WHERE id IN (?)");
        assert_eq!(normalise("SELECT coalesce(a, 1) FROM t"), "SELECT coalesce(a, ?) FROM t");
        assert_eq!(normalise("SELECT f(?, ?) FROM t"), "SELECT f(?) FROM t");
    }

    #[test]
    fn values_rows_collapse() {
        assert_eq!(normalise("INSERT INTO t (a, b) VALUES (1, 'x'), (2, 'y')"), "INSERT INTO t (a, b) VALUES (?)");
        assert_eq!(normalise("INSERT INTO t (a, b) VALUES ($1, $2)"), "INSERT INTO t (a, b) VALUES (?)");
        assert_eq!(
            normalise("INSERT INTO t VALUES (1, now()), (2, now()) ON CONFLICT DO NOTHING"),
            "INSERT INTO t VALUES (?, now()) ON CONFLICT DO NOTHING"
        );
        assert_eq!(mysql("insert into t values(1,'a'),(2,'b')"), "insert into t values(?)");
    }

    #[test]
    fn whitespace_folds() {
        assert_eq!(normalise("  SELECT\n\t a ,  b\r\nFROM   t  "), "SELECT a , b FROM t");
        assert_eq!(normalise("BEGIN; SELECT 1;\nCOMMIT"), "BEGIN; SELECT ?; COMMIT");
    }

    #[test]
    fn drivers_and_n_plus_one_share_a_template() {
        // psycopg 3 (server-side parameters).
        let pg = normalise("SELECT id, name FROM users WHERE id = $1");
        // PyMySQL / psycopg ClientCursor (literals interpolated by the client).
        let one = mysql("SELECT id, name FROM users WHERE id = 1");
        let two = mysql("SELECT id, name FROM users WHERE id = 2");
        assert_eq!(one, "SELECT id, name FROM users WHERE id = ?");
        assert_eq!(one, two);
        assert_eq!(one, pg);
        assert_eq!(
            normalise("SELECT * FROM t WHERE id = 42 AND name = 'O''Brien'"),
            normalise("SELECT * FROM t WHERE id = 7 AND name = 'Smith'")
        );
    }

    #[test]
    fn unterminated_text_ends_the_template() {
        assert_eq!(normalise("SELECT a FROM t WHERE b = 'abc"), "SELECT a FROM t WHERE b = ?");
        assert_eq!(normalise("SELECT a FROM t /* cut"), "SELECT a FROM t");
        assert_eq!(normalise("SELECT $$abc"), "SELECT ?");
        assert_eq!(normalise("SELECT \"abc"), "SELECT \"abc");
        assert_eq!(normalise("SELECT a, '"), "SELECT a, ?");
    }

    #[test]
    fn cut_statements_drop_the_partial_word() {
        let cut = |s: &str| normalise_with(s, Dialect::Standard, true);
        assert_eq!(cut("SELECT a, b FROM users WHERE na"), "SELECT a, b FROM users WHERE…");
        assert_eq!(cut("SELECT a FROM t WHERE b = 'abc"), "SELECT a FROM t WHERE b = ?…");
        assert_eq!(cut("INSERT INTO t VALUES (1, 2), (3, 4), (5,"), "INSERT INTO t VALUES (?)…");
        assert_eq!(cut("INSERT INTO t VALUES (1, 2), (3, 4), "), "INSERT INTO t VALUES (?)…");
        assert_eq!(cut("SELECT * FROM t WHERE id IN (1, 2, 3"), "SELECT * FROM t WHERE id IN (?…");
        assert_eq!(cut("SELECT * FROM t WHERE id = 12"), cut("SELECT * FROM t WHERE id = 1"));
    }

    #[test]
    fn long_templates_are_cut_on_a_char_boundary() {
        let cols: Vec<String> = (0..100).map(|i| format!("colonne_é{i}")).collect();
        let sql = format!("SELECT {} FROM t", cols.join(", "));
        let t = normalise(&sql);
        assert!(t.len() <= MAX_TEMPLATE, "{}", t.len());
        assert!(t.ends_with(CUT));
        assert!(t.starts_with("SELECT colonne_é0, colonne_é1"));
        for n in 190..=MAX_TEMPLATE {
            let t = normalise(&"é".repeat(n));
            assert!(t.len() <= MAX_TEMPLATE);
        }
        assert_eq!(normalise(&"a".repeat(MAX_TEMPLATE)).len(), MAX_TEMPLATE);
    }

    #[test]
    fn garbage_never_panics() {
        for s in ["", "'", "\"", "`", "$", "$a", "$a$", "%", "%(", "%(a", "--", "/*", "(", ")", "((", "))", "VALUES", "VALUES (", "VALUES (1),", "0x", "1e", "1e+", ".", "E'", "\u{fffd}'\u{fffd}"] {
            for dialect in [Dialect::Standard, Dialect::Mysql] {
                for cut in [false, true] {
                    assert!(normalise_with(s, dialect, cut).len() <= MAX_TEMPLATE);
                }
            }
        }
    }
}
