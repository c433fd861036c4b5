//! The deployment examples in conf/: YAML well-formed, the kaproxy configuration
//! inside each accepted by `kaproxy check`, and the grace periods consistent.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::bin;
use serde::Deserialize;
use serde_yaml::Value;

fn conf(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("conf").join(rel)
}

/// Runs `kaproxy check` on config text with these environment overrides; returns stdout.
fn check(toml: &str, env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kaproxy.toml");
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(bin())
        .args(["check", "-c"])
        .arg(&path)
        .env_remove("KAPROXY_CONFIG")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kaproxy check refused the example:\n{}\n{toml}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn shutdown_grace(described: &str) -> Duration {
    let line = described
        .lines()
        .find_map(|l| l.strip_prefix("shutdown_grace = "))
        .expect("check prints shutdown_grace");
    humantime::parse_duration(line.trim()).unwrap()
}

#[test]
fn compose_example_is_valid_and_drains_before_sigkill() {
    let text = std::fs::read_to_string(conf("compose.yaml")).unwrap();
    let doc: Value = serde_yaml::from_str(&text).expect("compose.yaml is YAML");
    let services = doc["services"].as_mapping().expect("services");
    for name in ["tomcat-1", "tomcat-2", "kaproxy"] {
        assert!(services.contains_key(name), "service {name}");
    }
    assert_eq!(
        doc["services"]["tomcat-2"]["image"], doc["services"]["tomcat-1"]["image"],
        "the YAML anchor resolved"
    );
    let kaproxy = &doc["services"]["kaproxy"];
    let env: Vec<(String, String)> = kaproxy["environment"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().unwrap().to_string(),
                v.as_str().unwrap().to_string(),
            )
        })
        .collect();
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let toml = doc["configs"]["kaproxy"]["content"]
        .as_str()
        .expect("inline kaproxy config");
    let described = check(toml, &env_refs);
    assert!(
        described.contains("admin          = 0.0.0.0:9901"),
        "{described}"
    );
    assert!(
        described.contains("servers            = tomcat-1:8080, tomcat-2:8080"),
        "{described}"
    );
    // Client keepalive below the 350 s load balancer idle timeout.
    assert!(
        described.contains("client   keepalive  = idle 2m interval 15s probes 4"),
        "{described}"
    );
    assert!(described.contains("http GET /health"), "{described}");
    let stop = humantime::parse_duration(kaproxy["stop_grace_period"].as_str().unwrap()).unwrap();
    assert!(
        stop > shutdown_grace(&described),
        "stop_grace_period {stop:?} must exceed shutdown_grace"
    );
    assert_eq!(kaproxy["configs"][0]["target"], "/etc/kaproxy/kaproxy.toml");
}

#[test]
fn kubernetes_example_is_valid_and_probes_the_admin_endpoint() {
    let dir = conf("kubernetes");
    let files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    assert!(!files.is_empty(), "conf/kubernetes has manifests");
    let mut docs = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for d in serde_yaml::Deserializer::from_str(&text) {
            docs.push(Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", f.display())));
        }
    }
    let kind = |k: &str| {
        docs.iter()
            .find(|d| d["kind"] == k)
            .unwrap_or_else(|| panic!("a {k}"))
    };
    let toml = kind("ConfigMap")["data"]["kaproxy.toml"]
        .as_str()
        .expect("kaproxy.toml in the ConfigMap");
    let described = check(toml, &[]);

    let pod = &kind("Deployment")["spec"]["template"]["spec"];
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        Duration::from_secs(grace) > shutdown_grace(&described),
        "terminationGracePeriodSeconds {grace} must exceed shutdown_grace"
    );
    let containers = pod["containers"].as_sequence().unwrap();
    let sidecar = containers
        .iter()
        .find(|c| c["name"] == "kaproxy")
        .expect("kaproxy container");
    assert!(
        containers.iter().any(|c| c["name"] == "tomcat"),
        "tomcat container"
    );
    assert_eq!(sidecar["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(sidecar["livenessProbe"]["httpGet"]["path"], "/healthz");
    let admin_port = sidecar["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "admin")
        .unwrap()["containerPort"]
        .as_u64()
        .unwrap();
    assert!(
        described.contains(&format!("admin          = 0.0.0.0:{admin_port}")),
        "probes reach the admin endpoint: {described}"
    );
    assert_eq!(sidecar["volumeMounts"][0]["mountPath"], "/etc/kaproxy");
    // It watches the mounted ConfigMap, and the binary takes those arguments.
    let args: Vec<&str> = sidecar["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(args.contains(&"--watch"), "{args:?}");
    let parsed = std::process::Command::new(common::bin())
        .args(&args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        parsed.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&parsed.stderr)
    );
    assert!(
        described.contains("servers            = 127.0.0.1:8080"),
        "{described}"
    );
    let service = kind("Service");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");
}
