//! Environment overrides for containers: `KAPROXY_<PATH>=value`, where PATH is
//! the setting's path in the file with `__` between levels and a route named by
//! its name (upper case, `-` as `_`):
//!
//! ```text
//! KAPROXY_SHUTDOWN_GRACE=10s
//! KAPROXY_ADMIN__LISTEN=0.0.0.0:9901
//! KAPROXY_DEFAULTS__CLIENT__KEEPALIVE__IDLE=30s
//! KAPROXY_ROUTE__TOMCAT_HTTP__UPSTREAM__SERVERS=tomcat-1:8080,tomcat-2:8080
//! ```
//!
//! The overrides become a small TOML document of dotted keys, one line per
//! variable, parsed with the same serde layer as the file, so every value gets
//! the same checks and an error names the variable it came from.

use super::raw::RawOverlay;

/// Prefix of every override.
pub const PREFIX: &str = "KAPROXY_";

/// Top-level sections an override may address; other `KAPROXY_*` variables
/// (KAPROXY_CONFIG, KAPROXY_LOG, ...) are not settings and are left alone.
const SECTIONS: &[&str] = &["shutdown_grace", "admin", "defaults", "route"];

/// Keys whose values are integers, booleans, or a comma-separated server list.
const INTEGER_KEYS: &[&str] = &[
    "probes",
    "rise",
    "fall",
    "retries",
    "failures",
    "max_connections",
];
const BOOLEAN_KEYS: &[&str] = &["enabled", "tcp", "proxy_protocol"];

/// Overrides turned into TOML, ready to be parsed after the file's text.
#[derive(Debug, Default)]
pub struct EnvDocument {
    /// One `dotted.key = value` line per variable.
    pub text: String,
    /// The variable behind each line of `text`.
    pub vars: Vec<String>,
}

/// How a route is named in a variable: upper case, anything but letters and digits as `_`.
pub fn route_key(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Builds the override document from `vars`, given the route names of the file.
/// Errors name the variable and say what is wrong.
pub fn document(vars: &[(String, String)], route_names: &[String]) -> Result<EnvDocument, String> {
    let mut selected: Vec<&(String, String)> = vars
        .iter()
        .filter(|(k, _)| {
            k.strip_prefix(PREFIX)
                .and_then(|rest| rest.split("__").next())
                .is_some_and(|first| SECTIONS.contains(&first.to_ascii_lowercase().as_str()))
        })
        .collect();
    selected.sort();
    let mut doc = EnvDocument::default();
    for (var, value) in selected {
        let path: Vec<String> = var[PREFIX.len()..]
            .split("__")
            .map(|s| s.to_ascii_lowercase())
            .collect();
        if path.iter().any(|p| p.is_empty()) {
            return Err(format!("{var}: empty path segment; separate levels with a double underscore, e.g. KAPROXY_ROUTE__WEB__LISTEN"));
        }
        if value.contains('\n') {
            return Err(format!("{var}: the value spans several lines"));
        }
        let mut keys: Vec<String> = Vec::with_capacity(path.len());
        for (i, seg) in path.iter().enumerate() {
            if i == 1 && path[0] == "route" {
                let wanted = seg.to_ascii_uppercase();
                let matches: Vec<&String> = route_names
                    .iter()
                    .filter(|n| route_key(n) == wanted)
                    .collect();
                match matches.as_slice() {
                    [name] => keys.push(quote(name)),
                    [] => {
                        let known: Vec<String> = route_names.iter().map(|n| route_key(n)).collect();
                        return Err(format!("{var}: no route is named {wanted} (routes: {}); overrides change routes defined in the file", known.join(", ")));
                    }
                    _ => {
                        return Err(format!(
                        "{var}: several routes are named {wanted} once upper-cased with '-' as '_'"
                    ))
                    }
                }
            } else {
                keys.push(seg.clone());
            }
        }
        if path[0] == "route" && path.len() == 3 && path[2] == "name" {
            return Err(format!("{var}: a route's name cannot be overridden (it is how the variable finds the route)"));
        }
        if path[0] == "route" && path.len() < 3 {
            return Err(format!(
                "{var}: name a setting of the route, e.g. {PREFIX}ROUTE__{}__LISTEN",
                path.get(1)
                    .map(|s| s.to_ascii_uppercase())
                    .unwrap_or_else(|| "NAME".into())
            ));
        }
        let last = path.last().map(String::as_str).unwrap_or("");
        let typed = (INTEGER_KEYS.contains(&last) && value.trim().parse::<i64>().is_ok())
            || (BOOLEAN_KEYS.contains(&last) && matches!(value.trim(), "true" | "false"));
        let literal = if typed {
            value.trim().to_string()
        } else if last == "servers" {
            let items: Vec<String> = value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(quote)
                .collect();
            format!("[{}]", items.join(", "))
        } else {
            quote(value)
        };
        doc.text
            .push_str(&format!("{} = {literal}\n", keys.join(".")));
        doc.vars.push(var.clone());
    }
    Ok(doc)
}

/// Parses the override document. `padding` is the length of the file's text: the
/// document is parsed as if it followed the file, so its spans never collide with
/// the file's and an error can tell which of the two it is in.
pub fn parse(doc: &EnvDocument, padding: usize) -> Result<RawOverlay, toml::de::Error> {
    let mut text = " ".repeat(padding);
    text.push('\n');
    text.push_str(&doc.text);
    toml::from_str(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(vars: &[(&str, &str)], routes: &[&str]) -> Result<EnvDocument, String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let routes: Vec<String> = routes.iter().map(|s| s.to_string()).collect();
        document(&vars, &routes)
    }

    #[test]
    fn variables_become_typed_dotted_keys() {
        let d = doc(
            &[
                ("KAPROXY_ROUTE__TOMCAT_HTTP__UPSTREAM__SERVERS", "a:1, b:2"),
                ("KAPROXY_DEFAULTS__CLIENT__KEEPALIVE__PROBES", "5"),
                ("KAPROXY_ADMIN__ENABLED", "false"),
                ("KAPROXY_SHUTDOWN_GRACE", "10s"),
                ("KAPROXY_LOG", "debug"),
                ("KAPROXY_CONFIG", "/x"),
                ("PATH", "/bin"),
            ],
            &["tomcat-http"],
        )
        .unwrap();
        assert_eq!(
            d.text,
            "admin.enabled = false\ndefaults.client.keepalive.probes = 5\nroute.\"tomcat-http\".upstream.servers = [\"a:1\", \"b:2\"]\nshutdown_grace = \"10s\"\n"
        );
        assert_eq!(d.vars.len(), 4);
    }

    #[test]
    fn unknown_routes_and_names_are_errors() {
        assert!(doc(&[("KAPROXY_ROUTE__NOPE__LISTEN", "x")], &["web"])
            .unwrap_err()
            .contains("no route is named NOPE (routes: WEB)"));
        assert!(doc(&[("KAPROXY_ROUTE__WEB__NAME", "x")], &["web"])
            .unwrap_err()
            .contains("cannot be overridden"));
        assert!(doc(&[("KAPROXY_ROUTE__WEB", "x")], &["web"])
            .unwrap_err()
            .contains("name a setting"));
        assert!(doc(&[("KAPROXY_DEFAULTS____IDLE", "x")], &["web"])
            .unwrap_err()
            .contains("empty path segment"));
    }
}
