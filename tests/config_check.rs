//! `kaproxy check` on good and bad files: exit codes and the exact messages users see.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::bin;

fn check_file(path: &Path) -> Output {
    Command::new(bin())
        .args(["check", "-c"])
        .arg(path)
        .env_remove("KAPROXY_CONFIG")
        .output()
        .expect("run kaproxy check")
}

fn check_text(text: &str) -> (i32, String, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.toml");
    std::fs::write(&path, text).unwrap();
    let out = check_file(&path);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        path.display().to_string(),
    )
}

const ROUTE: &str = "[[route]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[route.upstream]\nservers = [\"127.0.0.1:9\"]\n";

/// Each case: config text, expected line, expected field, expected words of the problem.
const BAD: &[(&str, &str, usize, &str, &str)] = &[
    (
        "unknown key in keepalive",
        "[[route]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[route.client]\nkeepalive = { idel = \"5s\" }\n[route.upstream]\nservers = [\"a:1\"]\n",
        5,
        "route \"web\".client.keepalive.idel",
        "unknown field `idel`",
    ),
    ("unknown top-level table", "[admn]\nlisten = \"x\"\n", 1, "admn", "unknown field `admn`"),
    (
        "sub-second idle",
        "[defaults.client.keepalive]\nidle = \"1500ms\"\n",
        2,
        "defaults.client.keepalive.idle",
        "1s 500ms is not a whole number of seconds",
    ),
    (
        "idle over 32767 s",
        "[[route]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[route.upstream]\nservers = [\"a:1\"]\nkeepalive = { idle = \"40000s\" }\n",
        6,
        "route \"web\".upstream.keepalive.idle",
        "out of range",
    ),
    (
        "interval zero",
        "[defaults.upstream.keepalive]\ninterval = \"0s\"\n",
        2,
        "defaults.upstream.keepalive.interval",
        "out of range",
    ),
    ("probes zero", "[defaults.client.keepalive]\n\nprobes = 0\n", 3, "defaults.client.keepalive.probes", "0 probes is out of range"),
    ("probes 128", "[defaults.client.keepalive]\nprobes = 128\n", 2, "defaults.client.keepalive.probes", "128 probes is out of range"),
    (
        "user_timeout garbage",
        "[defaults.client.keepalive]\nuser_timeout = \"soon\"\n",
        2,
        "defaults.client.keepalive.user_timeout",
        "neither auto, off nor a duration",
    ),
    ("bad duration", "[defaults]\nhalf_close_timeout = \"ten seconds\"\n", 2, "defaults.half_close_timeout", "is not a duration"),
    ("bad on_peer_failure", "[defaults]\non_peer_failure = \"explode\"\n", 2, "defaults.on_peer_failure", "not a known action"),
    (
        "bad listen address",
        "[[route]]\nname = \"web\"\nlisten = \"localhost:80\"\n[route.upstream]\nservers = [\"a:1\"]\n",
        3,
        "route \"web\".listen",
        "not an IP:PORT address",
    ),
    (
        "server without port",
        "[[route]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[route.upstream]\nservers = [\"a:1\",\n  \"tomcat\"]\n",
        6,
        "route \"web\".upstream.servers",
        "has no port",
    ),
    (
        "server port out of range",
        "[[route]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[route.upstream]\nservers = [\"a:70000\"]\n",
        5,
        "route \"web\".upstream.servers",
        "invalid port",
    ),
    (
        "empty server list",
        "[[route]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[route.upstream]\nservers = []\n",
        5,
        "route \"web\".upstream.servers",
        "the server list is empty",
    ),
    (
        "no servers at all",
        "[[route]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n",
        1,
        "route \"web\".upstream.servers",
        "no upstream servers",
    ),
    (
        "duplicate route names",
        "[[route]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[route.upstream]\nservers = [\"a:1\"]\n[[route]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[route.upstream]\nservers = [\"a:1\"]\n",
        7,
        "route[1].name",
        "already used by the route at line 2",
    ),
    (
        "two routes on one listen address",
        "[[route]]\nname = \"a\"\nlisten = \"0.0.0.0:8000\"\n[route.upstream]\nservers = [\"a:1\"]\n[[route]]\nname = \"b\"\nlisten = \"127.0.0.1:8000\"\n[route.upstream]\nservers = [\"a:1\"]\n",
        8,
        "route \"b\".listen",
        "overlaps the listen address of route \"a\" (line 3)",
    ),
    ("no routes", "[defaults]\nidle_timeout = \"0s\"\n", 3, "route", "no [[route]] is defined"),
    ("route without name", "[[route]]\nlisten = \"127.0.0.1:0\"\n", 1, "route[0].name", "has no name"),
    (
        "wrong type",
        "[[route]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[route.upstream]\nservers = [\"a:1\"]\nkeepalive = { probes = \"three\" }\n",
        6,
        "route \"web\".upstream.keepalive.probes",
        "invalid type",
    ),
    (
        "bad balance mode",
        "[defaults.upstream]\nbalance = \"roundrobin\"\n",
        2,
        "defaults.upstream.balance",
        "\"roundrobin\" is not a balance mode",
    ),
    (
        "weight out of range",
        "[[route]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[route.upstream]\nservers = [\"a:1\",\n  { address = \"b:2\", weight = 0 }]\n",
        6,
        "route \"web\".upstream.servers.weight",
        "weight 0 is out of range",
    ),
    (
        "unknown key in a server table",
        "[[route]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[route.upstream]\nservers = [{ address = \"b:2\", wieght = 2 }]\n",
        5,
        "route \"web\".upstream.servers",
        "unknown key `wieght` in a server entry",
    ),
    (
        "health check both tcp and http",
        "[[route]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[route.upstream]\nservers = [\"a:1\"]\nhealth_check = { tcp = true, http = \"/health\" }\n",
        6,
        "route \"web\".upstream.health_check.tcp",
        "either tcp or http, not both",
    ),
    (
        "health check path",
        "[defaults.upstream.health_check]\nhttp = \"health\"\n",
        2,
        "defaults.upstream.health_check.http",
        "is not a request path",
    ),
    (
        "health check expect",
        "[defaults.upstream.health_check]\nhttp = \"/health\"\nexpect = \"7xx\"\n",
        3,
        "defaults.upstream.health_check.expect",
        "\"7xx\" is not a status class",
    ),
    ("rise zero", "[defaults.upstream.health_check]\ntcp = true\nrise = 0\n", 3, "defaults.upstream.health_check.rise", "0 is out of range"),
    (
        "ejection max below backoff",
        "[defaults.upstream.passive_ejection]\nbackoff = \"1m\"\nmax_backoff = \"10s\"\n",
        3,
        "defaults.upstream.passive_ejection.max_backoff",
        "max_backoff 10s is shorter than backoff 1m",
    ),
    ("retries too many", "[defaults.upstream]\nretries = 500\n", 2, "defaults.upstream.retries", "500 is out of range"),
    ("toml syntax", "[[route]\nname = 1\n", 1, "(top level)", "unclosed array table"),
    (
        "user_timeout past what TCP_USER_TIMEOUT can hold",
        "[defaults.client.keepalive]\nuser_timeout = \"30days\"\n",
        2,
        "defaults.client.keepalive.user_timeout",
        "30days is out of range",
    ),
    (
        "user_timeout auto computed past the range",
        "[[route]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[route.upstream]\nservers = [\"a:1\"]\nkeepalive = { idle = \"30000s\", interval = \"30000s\", probes = 100 }\n",
        1,
        "route \"web\".upstream.keepalive.user_timeout",
        "user_timeout auto = idle + interval × probes = 3030000s (about 35.1 days) is out of range",
    ),
    (
        "idle_timeout too long to add to a clock",
        "[defaults]\nidle_timeout = \"300000000000y\"\n",
        2,
        "defaults.idle_timeout",
        "longer than the longest supported duration, 365 days",
    ),
    (
        "half_close_timeout too long",
        "[[route]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nhalf_close_timeout = \"400d\"\n[route.upstream]\nservers = [\"a:1\"]\n",
        4,
        "route \"web\".half_close_timeout",
        "longer than the longest supported duration",
    ),
    (
        "stall_timeout finer than a millisecond",
        "[defaults.client.keepalive]\nstall_timeout = \"1ns\"\n",
        2,
        "defaults.client.keepalive.stall_timeout",
        "1ns is finer than a millisecond",
    ),
    (
        "stall_timeout not a duration",
        "[defaults.upstream.keepalive]\nstall_timeout = \"soon\"\n",
        2,
        "defaults.upstream.keepalive.stall_timeout",
        "\"soon\" is not a duration",
    ),
    (
        "path_idle_limit that is neither a duration nor a preset",
        "[defaults.client]\npath_idle_limit = \"aws-alb\"\n",
        2,
        "defaults.client.path_idle_limit",
        "\"aws-alb\" is neither a duration",
    ),
    (
        "path_idle_limit too short for any keepalive",
        "[[route]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[route.upstream]\nservers = [\"a:1\"]\npath_idle_limit = \"2s\"\n",
        6,
        "route \"web\".upstream.path_idle_limit",
        "2s is too short for any keepalive",
    ),
    (
        "negative max_connections",
        "[defaults]\nmax_connections = -5\n",
        2,
        "defaults.max_connections",
        "-5 is not a usable number of live pairs",
    ),
    (
        "unknown send_proxy version",
        "[[route]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[route.upstream]\nservers = [\"a:1\"]\nsend_proxy = \"v3\"\n",
        6,
        "route \"web\".upstream.send_proxy",
        "\"v3\" is not a PROXY protocol version",
    ),
    (
        "zero proxy_protocol_timeout",
        "[[route]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[route.client]\nproxy_protocol = true\nproxy_protocol_timeout = \"0s\"\n[route.upstream]\nservers = [\"a:1\"]\n",
        6,
        "route \"web\".client.proxy_protocol_timeout",
        "must be greater than zero",
    ),
    (
        "proxy_protocol not a boolean",
        "[defaults.client]\nproxy_protocol = \"yes\"\n",
        2,
        "defaults.client.proxy_protocol",
        "invalid type",
    ),
];

#[test]
fn every_invalid_config_is_refused_with_file_line_field_and_help() {
    assert!(BAD.len() >= 29, "the table of bad configs is not empty");
    for (what, text, line, field, problem) in BAD {
        let (code, stdout, stderr, path) = check_text(text);
        assert_eq!(code, 64, "{what}: exit code; stderr:\n{stderr}");
        assert!(stdout.is_empty(), "{what}: nothing on stdout, got {stdout}");
        let head = format!("error: {path}:{line}: {field}");
        assert!(
            stderr.starts_with(&head),
            "{what}: expected to start with {head:?}, got:\n{stderr}"
        );
        assert!(
            stderr.contains(problem),
            "{what}: expected {problem:?} in:\n{stderr}"
        );
        assert!(
            stderr.contains("\n  help: "),
            "{what}: a fix hint, got:\n{stderr}"
        );
    }
}

#[test]
fn missing_file_is_a_clear_error() {
    let out = check_file(Path::new("/nonexistent/kaproxy.toml"));
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/kaproxy.toml: cannot read the configuration file"),
        "{err}"
    );
}

#[test]
fn example_config_is_accepted_and_described() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/kaproxy.toml");
    assert!(path.is_file(), "conf/kaproxy.toml exists");
    let out = check_file(&path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ok, 2 route(s)"), "{stdout}");
    assert!(stdout.contains("route \"tomcat-http\""), "{stdout}");
    assert!(
        stdout.contains("listen             = 0.0.0.0:8000"),
        "{stdout}"
    );
    assert!(
        stdout.contains("servers            = 127.0.0.1:8080"),
        "{stdout}"
    );
    assert!(stdout.contains("route \"tomcat-ajp\""), "{stdout}");
    assert!(
        stdout.contains("servers            = 127.0.0.1:8009"),
        "{stdout}"
    );
}

#[test]
fn check_prints_inherited_settings_and_detection_time_per_side() {
    let text = format!(
        "[defaults]\nidle_timeout = \"5m\"\n[defaults.client.keepalive]\nidle = \"20s\"\ninterval = \"5s\"\nprobes = 4\n[defaults.upstream]\nkeepalive = {{ enabled = false }}\n{ROUTE}[route.client]\nkeepalive = {{ probes = 2, user_timeout = \"2500ms\", stall_timeout = \"5m\" }}\n"
    );
    let (code, stdout, stderr, _) = check_text(&text);
    assert_eq!(code, 0, "{stderr}");
    // Route overrides probes and user_timeout; idle and interval come from [defaults].
    assert!(
        stdout
            .contains("client   keepalive  = idle 20s interval 5s probes 2 user_timeout 2s 500ms stall_timeout 5m"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "client   dead peer  = idle peer within 30s (keepalive probes); peer with data in flight within 2s 500ms of its last ACK"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("upstream keepalive  = off, user_timeout off (auto, keepalive off)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("client   slow peer  = a live peer that accepts no data is closed after 5m (stall_timeout), never called dead"),
        "{stdout}"
    );
    assert!(
        stdout.contains("upstream dead peer  = idle peer never (keepalive off); peer with data in flight only by kernel retransmission limits"),
        "{stdout}"
    );
    assert!(
        stdout.contains("upstream slow peer  = a live peer that accepts no data is left alone (stall_timeout off)"),
        "{stdout}"
    );
    assert!(stdout.contains("idle_timeout       = 5m"), "{stdout}");
    assert!(stdout.contains("half_close_timeout = 1m"), "{stdout}");
}

#[test]
fn run_refuses_a_bad_config_before_listening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.toml");
    std::fs::write(&path, "[defaults.client.keepalive]\nprobes = 0\n").unwrap();
    let out = Command::new(bin())
        .args(["run", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains(":2: defaults.client.keepalive.probes"));
}

#[test]
fn keepalive_not_safely_below_path_idle_limit_fails_check_and_start() {
    // The limit comes from [defaults], the keepalive from the route.
    let text = format!(
        "[defaults.client]\npath_idle_limit = \"azure-lb\"\n{ROUTE}[route.client]\nkeepalive = {{ idle = \"230s\", interval = \"10s\" }}\n"
    );
    let (code, stdout, stderr, path) = check_text(&text);
    assert_eq!(code, 64, "{stderr}");
    assert!(stdout.is_empty());
    assert_eq!(
        stderr,
        format!(
            "error: {path}:3: route \"web\".client.keepalive: keepalive idle 3m 50s + interval 10s = 4m is not safely below path_idle_limit 4m (azure-lb): it must be at most 3m 36s (90% of the limit), so that a flow whose first probe is lost is probed again before the path drops it\n  help: set client.keepalive.idle to at most 3m 26s with interval 10s, e.g. keepalive = {{ idle = \"206s\", interval = \"10s\", probes = 3 }}, or correct path_idle_limit if the path allows longer\n"
        )
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("k.toml");
    std::fs::write(&file, &text).unwrap();
    let out = Command::new(bin())
        .args(["run", "-c"])
        .arg(&file)
        .env_remove("KAPROXY_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("not safely below path_idle_limit 4m (azure-lb)"));

    // Keepalive off with a known limit: every idle flow would be dropped.
    let off =
        format!("{ROUTE}path_idle_limit = \"gcp-cloud-nat\"\nkeepalive = {{ enabled = false }}\n");
    let (code, _, stderr, _) = check_text(&off);
    assert_eq!(code, 64);
    assert!(
        stderr.contains("route \"web\".upstream.keepalive: keepalive is off, so the path drops every flow idle for longer than path_idle_limit 20m (gcp-cloud-nat)"),
        "{stderr}"
    );
}

#[test]
fn check_prints_the_margin_below_each_path_idle_limit() {
    let text = format!(
        "{ROUTE}path_idle_limit = \"gcp-vpc\"\n[route.client]\npath_idle_limit = \"300s\"\nkeepalive = {{ idle = \"240s\", interval = \"10s\" }}\n"
    );
    let (code, stdout, stderr, _) = check_text(&text);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("  client   path limit = 5m: idle + interval = 4m 10s, margin 50s below the limit (at most 4m 30s allowed, 90%)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  upstream path limit = 10m (gcp-vpc): idle + interval = 1m 10s, margin 8m 50s below the limit (at most 9m allowed, 90%)"),
        "{stdout}"
    );
    // No limit, no line.
    let (_, stdout, _, _) = check_text(ROUTE);
    assert!(!stdout.contains("path limit"), "{stdout}");
}

#[test]
fn config_path_falls_back_to_kaproxy_config_env() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/kaproxy.toml");
    let out = Command::new(bin())
        .arg("check")
        .env("KAPROXY_CONFIG", &path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("kaproxy.toml: ok"));
}

#[test]
fn usage_errors_exit_64() {
    let out = Command::new(bin())
        .args([
            "forward",
            "127.0.0.1:0",
            "a:1",
            "--client-keepalive",
            "1s/1s/0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("0 probes is out of range"));
}

#[test]
fn check_prints_the_pool_of_each_route() {
    let text = "[defaults.upstream]\nhealth_check = { http = \"/health\", interval = \"2s\" }\npassive_ejection = { failures = 5 }\n[[route]]\nname = \"tomcat\"\nlisten = \"127.0.0.1:0\"\n[route.upstream]\nservers = [\"tomcat-1:8080\", { address = \"tomcat-2:8080\", weight = 3 }]\nbalance = \"least-connections\"\nretries = 1\nhealth_check = { expect = \"200-399\", fall = 4 }\n";
    let (code, stdout, stderr, _) = check_text(text);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("servers            = tomcat-1:8080, tomcat-2:8080 (weight 3)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("balance            = least-connections"),
        "{stdout}"
    );
    assert!(stdout.contains("retries            = 1"), "{stdout}");
    // Field by field: path and interval from [defaults], expect and fall from the route.
    assert!(
        stdout.contains("health_check       = http GET /health expecting 200-399 every 2s (timeout 1s), up after 2 passes, down after 4 failures"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "passive_ejection   = after 5 connect failures in a row, for 10s doubling up to 5m"
        ),
        "{stdout}"
    );
}

fn check_env(path: &Path, env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(["check", "-c"])
        .arg(path)
        .env_remove("KAPROXY_CONFIG")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn environment_overrides_settings_of_the_file() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/kaproxy.toml");
    let (code, stdout, stderr) = check_env(
        &path,
        &[
            (
                "KAPROXY_ROUTE__TOMCAT_HTTP__UPSTREAM__SERVERS",
                "tomcat-1:8080, tomcat-2:8080",
            ),
            ("KAPROXY_ROUTE__TOMCAT_AJP__CLIENT__KEEPALIVE__PROBES", "6"),
            ("KAPROXY_DEFAULTS__CLIENT__KEEPALIVE__IDLE", "30s"),
            ("KAPROXY_ADMIN__LISTEN", "0.0.0.0:9901"),
            ("KAPROXY_SHUTDOWN_GRACE", "10s"),
            ("KAPROXY_LOG", "debug"),
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains(
            "overridden by the environment: KAPROXY_ROUTE__TOMCAT_HTTP__UPSTREAM__SERVERS"
        ),
        "{stdout}"
    );
    assert!(
        !stdout.contains("KAPROXY_LOG"),
        "KAPROXY_LOG is not a setting: {stdout}"
    );
    assert!(
        stdout.contains("servers            = tomcat-1:8080, tomcat-2:8080"),
        "{stdout}"
    );
    assert!(stdout.contains("admin          = 0.0.0.0:9901"), "{stdout}");
    assert!(stdout.contains("shutdown_grace = 10s"), "{stdout}");
    // tomcat-http inherits the overridden default; tomcat-ajp keeps its own idle, gets 6 probes.
    assert!(
        stdout.contains("client   keepalive  = idle 30s interval 10s probes 3"),
        "{stdout}"
    );
    assert!(
        stdout.contains("client   keepalive  = idle 30s interval 10s probes 6"),
        "{stdout}"
    );
}

#[test]
fn a_bad_override_names_its_variable() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/kaproxy.toml");
    let cases: &[(&str, &str, &str)] = &[
        (
            "KAPROXY_DEFAULTS__CLIENT__KEEPALIVE__IDLE",
            "1500ms",
            "defaults.client.keepalive.idle: 1s 500ms is not a whole number of seconds",
        ),
        (
            "KAPROXY_DEFAULTS__CLIENT__KEEPALIVE__IDEL",
            "1s",
            "unknown field `idel`",
        ),
        (
            "KAPROXY_ROUTE__TOMCAT__LISTEN",
            "0.0.0.0:1",
            "no route is named TOMCAT (routes: TOMCAT_HTTP, TOMCAT_AJP)",
        ),
        (
            "KAPROXY_ROUTE__TOMCAT_HTTP__UPSTREAM__SERVERS",
            "tomcat",
            "has no port",
        ),
        (
            "KAPROXY_DEFAULTS__UPSTREAM__RETRIES",
            "many",
            "invalid type",
        ),
    ];
    for (var, value, words) in cases {
        let (code, _, stderr) = check_env(&path, &[(var, value)]);
        assert_eq!(code, 64, "{var}={value}: {stderr}");
        assert!(
            stderr.contains(&format!("environment variable {var}")),
            "{var}={value}: {stderr}"
        );
        assert!(
            stderr.contains(words),
            "{var}={value}: expected {words:?} in {stderr}"
        );
    }
}

/// Every depth, as a table header, a key and an inline table: the path names
/// the route (by name, else by index) and every level down to the bad key.
#[test]
fn unknown_keys_and_tables_are_named_by_their_full_path_at_every_depth() {
    let up = "[route.upstream]\nservers = [\"127.0.0.1:9\"]\n";
    let cases: Vec<(String, usize, &str)> = vec![
        ("bogus = 1\n".into(), 1, "bogus"),
        ("[admin]\nlistn = \"x\"\n".into(), 2, "admin.listn"),
        ("[defaults]\nidle = \"1s\"\n".into(), 2, "defaults.idle"),
        ("[defaults.clint]\n".into(), 1, "defaults.clint"),
        ("[defaults.client.keepalive]\nidel = \"1s\"\n".into(), 2, "defaults.client.keepalive.idel"),
        ("[defaults.upstream.health_check]\nintervl = \"1s\"\n".into(), 2, "defaults.upstream.health_check.intervl"),
        ("[defaults.upstream]\npassive_ejection = { after = 3 }\n".into(), 2, "defaults.upstream.passive_ejection.after"),
        (format!("[[route]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\ncolour = 1\n{up}"), 4, "route \"web\".colour"),
        (format!("[[route]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[route.client.tlz]\nx = 1\n{up}"), 4, "route \"web\".client.tlz"),
        (format!("[[route]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[route.client.keepalive]\nprobs = 3\n{up}"), 5, "route \"web\".client.keepalive.probs"),
        (format!("[[route]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n{up}[route.upstream.health_check]\npth = \"/\"\n"), 7, "route \"web\".upstream.health_check.pth"),
        ("[[route]]\nname = \"a\"\nupstream = { servers = [\"1.2.3.4:5\"], keepalive = { idle = \"1s\", bad = 2 } }\n".into(), 3, "route \"a\".upstream.keepalive.bad"),
        // The second route, and a route without a name, by index.
        (format!("[[route]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\n{up}[[route]]\nname = \"b\"\n[route.upstreem]\n"), 8, "route \"b\".upstreem"),
        (format!("[[route]]\nname = \"a\"\nlisten = \"127.0.0.1:0\"\n{up}[[route]]\nlisten = \"127.0.0.1:0\"\n[route.client]\nx = 1\n"), 9, "route[1].client.x"),
        // A value of the wrong type inside an inline table.
        (format!("[[route]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n{up}health_check = {{ path = \"/\", interval = 5 }}\n"), 6, "route \"web\".upstream.health_check.interval"),
    ];
    for (text, line, field) in cases {
        let (code, _, stderr, path) = check_text(&text);
        assert_eq!(code, 64, "{text}\n{stderr}");
        let want = format!("error: {path}:{line}: {field}: ");
        assert!(
            stderr.starts_with(&want),
            "{text}\nexpected to start with {want:?}, got:\n{stderr}"
        );
    }
}
