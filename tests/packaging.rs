//! What the Debian package ships, checked without building it (tests/deb/run.sh
//! builds and installs it): the systemd unit against systemd's own verifier and
//! against the packaged config's limits, the generated man pages and shell
//! completions against the command line, and `--version` against git.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use clap::CommandFactory;
use kaproxy::cli::{Cli, DEFAULT_CONFIG_PATH};
use kaproxy::config::Config;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Whether `tool` runs here; if not, says why the test is skipped, or fails under CI.
fn have(tool: &str, package: &str) -> bool {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        let msg = format!("{tool} is not installed (apt-get install {package})");
        assert!(!under_ci(), "{msg}; under CI=true this is a failure");
        eprintln!("skipped: {msg}");
    }
    ok
}

/// The unit's settings, `Key` → every value given to it, in order.
fn unit() -> BTreeMap<String, Vec<String>> {
    let text = std::fs::read_to_string(format!("{ROOT}/conf/systemd/kaproxy.service"))
        .expect("read the unit");
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with('[') || line.is_empty() {
            continue;
        }
        let (k, v) = line.split_once('=').expect("Key=value");
        out.entry(k.to_string()).or_default().push(v.to_string());
    }
    out
}

fn one<'a>(unit: &'a BTreeMap<String, Vec<String>>, key: &str) -> &'a str {
    match unit.get(key).map(Vec::as_slice) {
        Some([v]) => v,
        other => panic!("{key} should be set once, is {other:?}"),
    }
}

fn packaged_config() -> Config {
    Config::load(Path::new(&format!("{ROOT}/conf/kaproxy.toml")))
        .expect("the packaged config loads")
}

#[test]
fn unit_runs_the_packaged_config_hardened() {
    let u = unit();
    assert_eq!(one(&u, "Type"), "exec");
    assert_eq!(
        one(&u, "ExecStart"),
        format!("/usr/bin/kaproxy run -c {DEFAULT_CONFIG_PATH}")
    );
    // A reload first validates the file, then signals the running process.
    assert_eq!(
        u["ExecReload"],
        [
            format!("/usr/bin/kaproxy check -c {DEFAULT_CONFIG_PATH}"),
            "/bin/kill -HUP $MAINPID".to_string()
        ]
    );
    for (key, value) in [
        ("DynamicUser", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("NoNewPrivileges", "yes"),
        ("PrivateTmp", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("SystemCallFilter", "@system-service"),
        ("RestartPreventExitStatus", "64"),
        ("WantedBy", "multi-user.target"),
    ] {
        assert_eq!(one(&u, key), value, "{key}");
    }
    // The package installs the config where the unit and the binary look for it.
    let manifest = std::fs::read_to_string(format!("{ROOT}/Cargo.toml")).unwrap();
    assert!(
        manifest.contains(&format!(
            r#"["conf/kaproxy.toml", "{}", "644"]"#,
            DEFAULT_CONFIG_PATH.trim_start_matches('/')
        )),
        "Cargo.toml's deb assets do not install conf/kaproxy.toml at {DEFAULT_CONFIG_PATH}, 0644"
    );
}

#[test]
fn unit_limits_fit_the_packaged_config() {
    let u = unit();
    let cfg = packaged_config();

    // Descriptors for every route at max_connections, even at the most workers
    // --workers allows (each route listens once per worker).
    let nofile: u64 = one(&u, "LimitNOFILE")
        .parse()
        .expect("LimitNOFILE is a number");
    let budget = kaproxy::fdlimit::budget(&cfg, 1024).expect("budget");
    let needed = budget
        .needed
        .expect("every packaged route has a max_connections");
    assert!(
        nofile >= needed,
        "LimitNOFILE={nofile} is below the {needed} descriptors the packaged config needs"
    );

    // systemd's SIGKILL must not come before the drain ends.
    let stop = humantime::parse_duration(one(&u, "TimeoutStopSec")).expect("TimeoutStopSec");
    assert!(
        stop >= cfg.shutdown_grace + std::time::Duration::from_secs(5),
        "TimeoutStopSec {stop:?} is not comfortably longer than shutdown_grace {:?}",
        cfg.shutdown_grace
    );

    // The capability to bind below 1024 exactly when a route or the admin endpoint does.
    let low_ports: Vec<String> = cfg
        .routes
        .iter()
        .map(|r| r.listen)
        .chain(cfg.admin)
        .filter(|a| a.port() < 1024)
        .map(|a| a.to_string())
        .collect();
    let ambient = one(&u, "AmbientCapabilities");
    let bounding = one(&u, "CapabilityBoundingSet");
    if low_ports.is_empty() {
        assert_eq!(ambient, "", "no listen port below 1024, yet capabilities");
        assert_eq!(bounding, "");
    } else {
        assert_eq!(ambient, "CAP_NET_BIND_SERVICE", "{low_ports:?} need it");
        assert_eq!(bounding, "CAP_NET_BIND_SERVICE", "{low_ports:?} need it");
    }
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    if !have("systemd-analyze", "systemd") {
        return;
    }
    // verify loads the unit's dependencies and checks that ExecStart and
    // ExecReload's programs exist: a root with the system's own units, the
    // binary under test at /usr/bin/kaproxy, and kill.
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .find(|d| Path::new(d).join("sysinit.target").exists())
        .expect("systemd's units");
    std::fs::create_dir_all(r.join("usr/bin")).unwrap();
    std::fs::create_dir_all(r.join("bin")).unwrap();
    std::fs::create_dir_all(r.join("usr/lib/systemd")).unwrap();
    let ok = Command::new("cp")
        .args(["-a", units])
        .arg(r.join("usr/lib/systemd/system"))
        .status()
        .unwrap()
        .success();
    assert!(ok, "copy {units}");
    std::fs::copy(common::bin(), r.join("usr/bin/kaproxy")).unwrap();
    std::fs::copy("/bin/kill", r.join("bin/kill")).unwrap();
    std::fs::copy(
        format!("{ROOT}/conf/systemd/kaproxy.service"),
        r.join("usr/lib/systemd/system/kaproxy.service"),
    )
    .unwrap();

    // Any message at all is a failure: verify exits 0 on many warnings (an
    // unknown Type= only logs "ignoring").
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", r.display()))
        .arg("kaproxy.service")
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {:?}\n{said}",
        out.status
    );

    // systemd's own exposure score: hardening that a later edit weakens shows here.
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(format!("--root={}", r.display()))
        .arg(r.join("usr/lib/systemd/system/kaproxy.service"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for kaproxy.service:")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| {
            panic!(
                "no exposure level in:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(score <= 2.0, "exposure {score} > 2.0:\n{text}");
}

#[test]
fn man_pages_and_completions_are_generated_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let written = kaproxy::cli::generate::write_all(dir.path()).expect("generate");
    let cmd = Cli::command();
    let subcommands: Vec<&str> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .map(|s| s.get_name())
        .collect();
    assert!(subcommands.len() >= 6, "{subcommands:?}");
    // A page per subcommand, plus kaproxy.1, plus three completion scripts.
    assert_eq!(written.len(), subcommands.len() + 1 + 3, "{written:?}");

    let read = |p: &str| {
        std::fs::read_to_string(dir.path().join(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
    };
    let top = read("man/kaproxy.1");
    assert!(top.contains(".TH kaproxy 1"), "{top}");
    for section in ["ENVIRONMENT", "FILES", "EXIT STATUS", "SEE ALSO", "VERSION"] {
        assert!(
            top.contains(&format!(".SH \"{section}\"")) || top.contains(&format!(".SH {section}")),
            "kaproxy.1 has no {section} section"
        );
    }
    assert!(
        top.contains(kaproxy::cli::VERSION),
        "version not in kaproxy.1"
    );
    for sub in &subcommands {
        let page = read(&format!("man/kaproxy-{sub}.1"));
        assert!(page.contains(&format!(".TH kaproxy-{sub} 1")), "{page}");
        assert!(
            top.contains(&format!("kaproxy\\-{sub}(1)")),
            "kaproxy.1 does not list {sub}"
        );
    }
    // Every long option of forward, in its page and in each shell's script.
    let forward = cmd.find_subcommand("forward").unwrap();
    let longs: Vec<&str> = forward
        .get_arguments()
        .filter_map(|a| a.get_long())
        .collect();
    assert!(longs.contains(&"client-keepalive"), "{longs:?}");
    let forward_page = read("man/kaproxy-forward.1");
    let scripts = [
        read("completions/kaproxy.bash"),
        read("completions/_kaproxy"),
        read("completions/kaproxy.fish"),
    ];
    for long in &longs {
        assert!(
            forward_page.contains(&format!("\\-\\-{}", long.replace('-', "\\-"))),
            "--{long} missing from kaproxy-forward.1"
        );
        for s in &scripts {
            assert!(
                s.contains(long),
                "--{long} missing from a completion script"
            );
        }
    }
    for s in &scripts {
        for sub in &subcommands {
            assert!(s.contains(sub), "{sub} missing from a completion script");
        }
    }
    // The shells accept their scripts.
    for (shell, file, package) in [
        ("bash", "completions/kaproxy.bash", "bash"),
        ("zsh", "completions/_kaproxy", "zsh"),
        ("fish", "completions/kaproxy.fish", "fish"),
    ] {
        let present = Command::new("sh")
            .args(["-c", &format!("command -v {shell}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !present {
            // Only bash is required: zsh and fish are checked where installed.
            assert_ne!(
                shell, "bash",
                "bash is not installed (apt-get install {package})"
            );
            eprintln!("not checked: {shell} is not installed");
            continue;
        }
        let out = Command::new(shell)
            .arg("-n")
            .arg(dir.path().join(file))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{shell} -n {file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn version_names_the_git_commit() {
    let out = Command::new(common::bin())
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let rest = text
        .trim()
        .strip_prefix(&format!("kaproxy {} (commit ", env!("CARGO_PKG_VERSION")))
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("unexpected --version output: {text}"));
    // Built from this work tree, the commit is git's HEAD.
    let head = Command::new("git")
        .args(["-C", ROOT, "rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match head {
        Some(head) => assert_eq!(rest, head, "--version says {rest}, HEAD is {head}"),
        None => {
            assert!(
                !under_ci(),
                "CI builds from a git clone: git rev-parse failed"
            );
            assert!(
                rest == "unknown"
                    || (rest.len() >= 7 && rest.chars().all(|c| c.is_ascii_hexdigit())),
                "{rest}"
            );
        }
    }
}
