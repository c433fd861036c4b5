//! Where configuration text comes from, for messages: the file and the
//! environment overlay, byte spans turned into file:line or the variable's
//! name, and the parsing of durations that every section shares.

use std::time::Duration;

use toml::Spanned;

use super::raw::SStr;
use super::{ConfigError, Location};

/// Longest duration any setting takes. Every timer is added to the current
/// time, and a year is far beyond any sensible timeout while keeping that sum
/// far from overflowing.
pub(super) const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

pub(super) const DURATION_HINT: &str = "write a duration such as \"90s\", \"1m30s\" or \"500ms\"";

/// Source text plus its name, to turn byte spans into line numbers.
pub(super) struct Ctx<'a> {
    pub(super) file: &'a str,
    pub(super) text: &'a str,
    /// The environment overrides as parsed (the file's length in spaces, a
    /// newline, then one line per variable), and the variable of each line.
    pub(super) env_text: String,
    pub(super) env_vars: Vec<String>,
}

impl Ctx<'_> {
    pub(super) fn location(&self, offset: usize) -> Location {
        if offset > self.text.len() && !self.env_vars.is_empty() {
            let start = self.text.len() + 1;
            let end = offset.clamp(start, self.env_text.len());
            let index = self.env_text.as_bytes()[start..end]
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            return Location {
                file: self.file.to_string(),
                line: 0,
                env: self.env_vars.get(index).map(|v| v.as_str().into()),
            };
        }
        Location {
            file: self.file.to_string(),
            line: self.line_of(offset),
            env: None,
        }
    }

    pub(super) fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    pub(super) fn err<T>(
        &self,
        span: std::ops::Range<usize>,
        field: &str,
        problem: impl Into<String>,
        hint: impl Into<String>,
    ) -> Result<T, ConfigError> {
        Err(ConfigError::Invalid {
            location: self.location(span.start),
            field: field.to_string(),
            problem: problem.into(),
            hint: hint.into(),
        })
    }
}

pub(super) fn toml_error(ctx: &Ctx<'_>, e: &toml::de::Error) -> ConfigError {
    let span = e.span().unwrap_or(0..0);
    let in_env = span.start > ctx.text.len() && !ctx.env_vars.is_empty();
    let source = if in_env {
        ctx.env_text.as_str()
    } else {
        ctx.text
    };
    let snippet = source.get(span.clone()).unwrap_or("").trim().to_string();
    let field =
        field_path(source, span.start).unwrap_or_else(|| field_at(source, span.start, &snippet));
    let message = e.message().trim().to_string();
    let hint = if message.starts_with("unknown field") {
        if in_env {
            "no such setting: the variable names the setting's path in the file, levels separated by __ (see README.md, Configuration from the environment)".to_string()
        } else {
            "remove or correct this key; see the configuration reference in README.md".to_string()
        }
    } else if message.contains("invalid type") {
        "check the value's type: durations and addresses are quoted strings, probes is an integer, enabled is true or false".to_string()
    } else {
        "fix the TOML syntax on this line".to_string()
    };
    ConfigError::Invalid {
        location: ctx.location(span.start),
        field,
        problem: message,
        hint,
    }
}

/// Dotted path of the key or value at `offset`, found in the parsed document
/// rather than guessed from the text, so that a table header, an inline table
/// and an array of tables are all named right. An element of `[[route]]` is
/// named by its `name` when it has one, else by its index; other array
/// elements by index. `None` when the text does not parse as TOML (a syntax
/// error): then only a guess from the text is possible.
pub(super) fn field_path(text: &str, offset: usize) -> Option<String> {
    let doc = toml::de::DeTable::parse(text).ok()?;
    let mut parts = Vec::new();
    in_table(doc.get_ref(), offset, &mut parts).then(|| parts.join("."))
}

fn in_table(table: &toml::de::DeTable<'_>, offset: usize, parts: &mut Vec<String>) -> bool {
    for (key, value) in table.iter() {
        let name = key.get_ref().to_string();
        if key.span().contains(&offset) {
            parts.push(name);
            return true;
        }
        parts.push(name);
        if in_value(value, offset, parts) {
            return true;
        }
        parts.pop();
    }
    false
}

fn in_value(
    value: &Spanned<toml::de::DeValue<'_>>,
    offset: usize,
    parts: &mut Vec<String>,
) -> bool {
    use toml::de::DeValue;
    match value.get_ref() {
        DeValue::Table(t) => in_table(t, offset, parts),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let Some(last) = parts.pop() else {
                    return false;
                };
                let named = match item.get_ref() {
                    DeValue::Table(t) if last == "route" => t
                        .get("name")
                        .and_then(|n| n.get_ref().as_str())
                        .map(|n| format!("route {n:?}")),
                    _ => None,
                };
                parts.push(named.unwrap_or_else(|| format!("{last}[{i}]")));
                if in_value(item, offset, parts) {
                    return true;
                }
                parts.pop();
                parts.push(last);
            }
            false
        }
        // Header-defined tables have no span of their own, so only a scalar's
        // span is trusted to hold the offset.
        _ => value.span().contains(&offset),
    }
}

/// Best-effort dotted name of the key at `offset`: the enclosing `[table]`
/// header, the key on that line, and the span's own key inside an inline table.
pub(super) fn field_at(text: &str, offset: usize, snippet: &str) -> String {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line = text[line_start..].lines().next().unwrap_or("");
    let header = before[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().to_string())
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    let mut parts: Vec<String> = Vec::new();
    if let Some(h) = header {
        parts.push(h);
    }
    if let Some(k) = key {
        parts.push(k);
        // Inside an inline table the span is at an inner key (unknown field) or
        // at an inner value (wrong type): name the inner key too.
        let prefix = &line[..(offset - line_start).min(line.len())];
        if let Some(brace) = prefix.find('{') {
            let segment = prefix[brace..].rsplit(['{', ',']).next().unwrap_or("");
            let inner = match segment.split_once('=') {
                Some((k, _)) => k.trim().to_string(),
                None => snippet.to_string(),
            };
            if !inner.is_empty() && !inner.contains([' ', '"', '=']) {
                parts.push(inner);
            }
        }
    } else if !snippet.is_empty() && !snippet.contains(['=', '{', ' ', '\n']) {
        parts.push(snippet.to_string());
    }
    if parts.is_empty() {
        "(top level)".to_string()
    } else {
        parts.join(".")
    }
}

pub(super) fn parse_duration(
    ctx: &Ctx<'_>,
    s: &SStr,
    field: &str,
) -> Result<Duration, ConfigError> {
    let v = s.get_ref().trim();
    let d = humantime::parse_duration(v).or_else(|e| {
        ctx.err(
            s.span(),
            field,
            format!("{v:?} is not a duration ({e})"),
            DURATION_HINT,
        )
    })?;
    if d > MAX_DURATION {
        return ctx.err(
            s.span(),
            field,
            format!("{v:?} is longer than the longest supported duration, 365 days"),
            "write at most \"365d\"; where a timer can be turned off, \"off\" means no limit",
        );
    }
    Ok(d)
}

/// `"0s"` or `"off"` turn the timer off.
pub(super) fn off_or_duration(
    ctx: &Ctx<'_>,
    s: &SStr,
    field: &str,
) -> Result<Option<Duration>, ConfigError> {
    if s.get_ref().trim() == "off" {
        return Ok(None);
    }
    let d = parse_duration(ctx, s, field)?;
    Ok((!d.is_zero()).then_some(d))
}

pub(super) fn positive_duration(
    ctx: &Ctx<'_>,
    s: &SStr,
    field: &str,
) -> Result<Duration, ConfigError> {
    let d = parse_duration(ctx, s, field)?;
    if d.is_zero() {
        return ctx.err(s.span(), field, "must be greater than zero", DURATION_HINT);
    }
    Ok(d)
}
