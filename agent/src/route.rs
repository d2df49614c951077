//! Routes: the label a request path is counted under. Paths are normalised with no
//! configuration (ids, UUIDs, hex and random tokens become `{id}`), or matched against route
//! templates (`--routes FILE`, e.g. `/users/{id}/posts`), which take precedence.
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

/// Route templates, in file order: the first match wins.
#[derive(Debug, Default, Clone)]
pub struct Templates(Vec<Vec<Segment>>);

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Literal(String),
    /// `{name}`: any one segment.
    Param(String),
}

impl Templates {
    /// One template per line; blank lines and `#` comments are skipped.
    pub fn parse(text: &str) -> Result<Self> {
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if !line.starts_with('/') {
                bail!("line {}: route template {line:?} must start with '/'", i + 1);
            }
            let segments = split(line).map(|s| segment(s).map_err(|e| anyhow!("line {}: {e}", i + 1))).collect::<Result<_>>()?;
            out.push(segments);
        }
        Ok(Templates(out))
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read route templates from {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    /// The template `path` matches, as written in the file.
    pub fn matching(&self, path: &str) -> Option<String> {
        let parts: Vec<&str> = split(path).collect();
        let t = self.0.iter().find(|t| {
            t.len() == parts.len()
                && t.iter().zip(&parts).all(|(seg, part)| match seg {
                    Segment::Param(_) => !part.is_empty(),
                    Segment::Literal(l) => l == part,
                })
        })?;
        Some(join(t.iter().map(|s| match s {
            Segment::Literal(l) | Segment::Param(l) => l.clone(),
        })))
    }
}

/// One segment of a template: `{name}` (a parameter) or literal text without braces.
fn segment(s: &str) -> Result<Segment> {
    if let Some(name) = s.strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            bail!("parameter {s:?} must be a name in braces, e.g. {{id}}");
        }
        return Ok(Segment::Param(s.to_string()));
    }
    if s.contains(['{', '}']) {
        bail!("segment {s:?} has an unbalanced or misplaced brace: a parameter is a whole segment, e.g. /users/{{id}}");
    }
    Ok(Segment::Literal(s.to_string()))
}

fn split(path: &str) -> impl Iterator<Item = &str> {
    path.strip_prefix('/').unwrap_or(path).split('/')
}

fn join(segments: impl Iterator<Item = String>) -> String {
    let mut out = String::new();
    for s in segments {
        out.push('/');
        out.push_str(&s);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// Does a path segment look like an identifier rather than a name?
fn is_id(s: &str) -> bool {
    let digits = s.bytes().filter(u8::is_ascii_digit).count();
    let hex = s.bytes().all(|c| c.is_ascii_hexdigit());
    let uuid = s.len() == 36
        && s.bytes().enumerate().all(|(i, c)| if [8, 13, 18, 23].contains(&i) { c == b'-' } else { c.is_ascii_hexdigit() });
    let token = s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_');
    !s.is_empty()
        && (digits == s.len()                              // 42
            || uuid                                        // 123e4567-e89b-12d3-a456-426614174000
            || (hex && s.len() >= 8 && digits > 0)         // deadbeef01, a git sha
            || (token && s.len() >= 16 && digits > 0 && digits < s.len())) // random tokens, base64url
}

/// The path with identifier-like segments replaced by `{id}`.
pub fn normalise(path: &str) -> String {
    join(split(path).map(|s| if is_id(s) { "{id}".to_string() } else { s.to_string() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The route of a path as the aggregator picks it, before the cap: a matching template,
    /// else the normalised path.
    fn route_of(path: &str, templates: &Templates) -> String {
        templates.matching(path).unwrap_or_else(|| normalise(path))
    }

    #[test]
    fn identifiers_become_id() {
        let none = Templates::default();
        assert_eq!(route_of("/users/42/posts", &none), "/users/{id}/posts");
        assert_eq!(route_of("/orders/123e4567-e89b-12d3-a456-426614174000", &none), "/orders/{id}");
        assert_eq!(route_of("/commits/9fceb02d0ae598e95dc970b74767f19372d61af8", &none), "/commits/{id}");
        assert_eq!(route_of("/reset/Xk3pQ9zLm2Vt8RwY4n", &none), "/reset/{id}");
        assert_eq!(route_of("/blog/2024/hello-world", &none), "/blog/{id}/hello-world");
    }

    #[test]
    fn names_stay() {
        let none = Templates::default();
        for p in ["/", "/hello", "/api/v2/users", "/static/app.css", "/deadbeef", "/cafe", "/a-very-long-page-name-here"] {
            assert_eq!(route_of(p, &none), p);
        }
    }

    #[test]
    fn templates_take_precedence() {
        let t = Templates::parse("# API\n/users/{user}/posts\n\n/files/{name}\n").unwrap();
        assert_eq!(route_of("/users/alice/posts", &t), "/users/{user}/posts");
        assert_eq!(route_of("/files/report.pdf", &t), "/files/{name}");
        assert_eq!(route_of("/files/a/b", &t), "/files/a/b");
        assert!(Templates::parse("users/{id}").is_err());
    }

    #[test]
    fn malformed_templates_are_refused() {
        for bad in ["/users/{id", "/users/id}", "/users/{}", "/users/x{id}", "/a/{i d}"] {
            let err = Templates::parse(&format!("/ok\n{bad}\n")).unwrap_err().to_string();
            assert!(err.contains("line 2"), "{bad}: {err}");
        }
    }
}
