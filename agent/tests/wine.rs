//! The agent's Windows side under Wine: the probe, and the real `ferry-agent.exe run` (activity, privacy, AFK, chat adapter) against a real broker.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use ferry_schema::codec::decode_event;
use ferry_schema::event::Activity;
use ferry_schema::topology::{self, StreamSettings, EVENTS_STREAM};
use ferry_schema::{AgentId, Encoding, EventBody};
use ferry_stack::{inspect, NatsServer};
use ferry_workers::rules::{self, RulesConfig};
use tokio_util::sync::CancellationToken;

use ferry_harness::cargo::target_dir_of;
use ferry_harness::wine::{build_windows_agent, run_checked};
use ferry_harness::Wine;
use serde_json::Value;

/// The target dir this test was built in: the cross build goes there too,
/// so it is incremental from one run to the next.
fn target_dir() -> PathBuf {
    target_dir_of(Path::new(env!("CARGO_BIN_EXE_ferry-agent")))
        .expect("the agent binary lies in <target>/<profile>/")
        .to_path_buf()
}

/// Runs `ferry-agent.exe` with `args` under Wine; its stdout as JSON lines.
fn agent(wine: &Wine, exe: &Path, args: &[&str]) -> Vec<Value> {
    let mut cmd = wine.command(exe).unwrap();
    cmd.args(args);
    let out = run_checked(&mut cmd, "ferry-agent.exe under Wine", Duration::from_secs(60)).unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

/// Whether a probe sample names a window of `exe_name` (case-insensitive).
fn names(sample: &Value, exe_name: &str) -> bool {
    sample["exe"]
        .as_str()
        .is_some_and(|e| e.to_ascii_lowercase().ends_with(&exe_name.to_ascii_lowercase()))
}

/// Probes until the window in front belongs to `exe_name`; that sample.
/// The deadline is generous: with the suite's other tests building and
/// running beside it, Wine once took over 30 s to bring a new window up.
fn wait_for_front(wine: &Wine, exe: &Path, exe_name: &str) -> Value {
    let mut last = Vec::new();
    wine.wait_for(&format!("a window of {exe_name} in front"), Duration::from_secs(90), || {
        last = agent(wine, exe, &["probe"]);
        last.first().filter(|s| names(s, exe_name)).cloned()
    })
    .unwrap_or_else(|e| panic!("{e}; the last probe printed {last:?}"))
}

/// Puts the CA certificate `ca_pem` into the prefix's machine Root store
/// (HKLM\...\SystemCertificates\Root, as `certutil -addstore Root` would):
/// a `reg import` of the serialized certificate, named by its SHA-1.
fn import_root_ca(wine: &Wine, ca_pem: &Path, dir: &Path) {
    let openssl = ferry_stack::install::ensure("openssl", "openssl").unwrap();
    let der_path = dir.join("root-ca.der");
    run_checked(
        std::process::Command::new(&openssl).args(["x509", "-outform", "DER", "-in"]).arg(ca_pem).arg("-out").arg(&der_path),
        "openssl x509",
        Duration::from_secs(30),
    )
    .unwrap();
    let digest = run_checked(
        std::process::Command::new(&openssl).args(["dgst", "-sha1", "-r"]).arg(&der_path),
        "openssl dgst",
        Duration::from_secs(30),
    )
    .unwrap();
    let sha1 = String::from_utf8_lossy(&digest.stdout).split_whitespace().next().unwrap().to_ascii_uppercase();
    let der = std::fs::read(&der_path).unwrap();
    // One property: CERT_CERT_PROP_ID (32), then 1, the length, the DER.
    let mut blob = Vec::new();
    for n in [32u32, 1, der.len() as u32] {
        blob.extend(n.to_le_bytes());
    }
    blob.extend(&der);
    let hex: Vec<String> = blob.iter().map(|b| format!("{b:02x}")).collect();
    let reg = dir.join("root-ca.reg");
    std::fs::write(
        &reg,
        format!(
            "Windows Registry Editor Version 5.00\r\n\r\n[HKEY_LOCAL_MACHINE\\Software\\Microsoft\\SystemCertificates\\Root\\Certificates\\{sha1}]\r\n\"Blob\"=hex:{}\r\n",
            hex.join(",")
        ),
    )
    .unwrap();
    let mut import = wine.builtin("reg");
    import.args(["import", &format!("Z:{}", reg.display())]);
    run_checked(&mut import, "reg import of the CA", Duration::from_secs(60)).unwrap();
}

#[test]
fn probe_names_the_window_in_front_under_wine() {
    let start = Instant::now();
    let exe = build_windows_agent(&target_dir()).unwrap();
    let built = start.elapsed();
    let work = tempfile::tempdir().unwrap();
    // Run a copy, so the ProcessPrng stand-in placed beside it never lands
    // in the build output.
    let exe = {
        let copy = work.path().join("ferry-agent.exe");
        std::fs::copy(&exe, &copy).unwrap();
        copy
    };
    let wine = Wine::start(work.path()).unwrap();
    eprintln!(
        "timings: cross build {built:.1?}, wineboot {:.1?}, ProcessPrng stand-in {:.1?}",
        wine.timings().wineboot,
        wine.timings().shim
    );

    // The platform layer's other parts first: DPAPI and the process's usage.
    let dpapi = agent(&wine, &exe, &["probe", "--dpapi-roundtrip"]);
    assert_eq!(dpapi.len(), 1, "{dpapi:?}");
    assert_eq!(dpapi[0]["roundtrip"], true, "{dpapi:?}");
    assert!(dpapi[0]["protected_len"].as_u64().unwrap() > 32, "{dpapi:?}");
    let usage = agent(&wine, &exe, &["probe", "--usage"]);
    assert!(usage[0]["rss_bytes"].as_u64().unwrap() > 1024 * 1024, "{usage:?}");

    let notepad = wine.spawn_program("notepad", &[]).unwrap();
    let first = wait_for_front(&wine, &exe, "notepad.exe");
    assert_eq!(first["title"], "Untitled - Notepad", "{first}");
    assert!(first["pid"].as_u64().unwrap() > 0, "{first}");

    let samples = agent(&wine, &exe, &["probe", "--samples", "3", "--every-ms", "500"]);
    assert_eq!(samples.len(), 3, "{samples:?}");
    for s in &samples {
        assert!(names(s, "notepad.exe"), "{s}");
        assert_eq!(s["title"], "Untitled - Notepad", "{s}");
    }
    // Nobody types under Xvfb: idle time only grows, by about the interval.
    let idle: Vec<u64> = samples.iter().map(|s| s["idle_ms"].as_u64().unwrap()).collect();
    assert!(idle.windows(2).all(|w| w[1] >= w[0] + 400), "{idle:?}");

    // A second program takes the foreground.
    let winver = wine.spawn_program("winver", &[]).unwrap();
    let second = wait_for_front(&wine, &exe, "winver.exe");
    assert_ne!(second["pid"], first["pid"], "{second}");
    assert!(second["title"].as_str().unwrap().contains("Wine"), "{second}");

    drop((winver, notepad));
    eprintln!("whole test: {:.1?}", start.elapsed());
}

/// The activity events desk-1 published, in stream order.
async fn activities(js: &async_nats::jetstream::Context) -> Vec<Activity> {
    inspect::read_all(js, EVENTS_STREAM, "events.desk-1.activity")
        .await
        .unwrap()
        .iter()
        .map(|m| {
            let enc = Encoding::from_headers(m.headers.as_ref()).unwrap();
            match decode_event(&m.payload, enc, 1 << 20).unwrap().body {
                EventBody::Activity(a) => a,
                other => panic!("not an activity: {other:?}"),
            }
        })
        .collect()
}

fn is_app(a: &Activity, exe_name: &str) -> bool {
    a.app.eq_ignore_ascii_case(exe_name)
}

/// `ferry-agent.exe run` with the desktop collector and a chat adapter port,
/// against a real broker and rules worker on this machine: activity events
/// name the windows in front (merged, redacted, excluded as configured), the
/// scripted adapter's chats get their replies through the .exe, and an AFK
/// span left open by a killed agent is sent by the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exe_collects_activity_and_serves_a_chat_adapter_under_wine() {
    let started = Instant::now();
    let nats = NatsServer::start_temp().unwrap();
    let js = async_nats::jetstream::new(nats.operator("test").connect().await.unwrap());
    let desk = AgentId::new("desk-1").unwrap();
    topology::provision(&js, &StreamSettings::default(), std::slice::from_ref(&desk))
        .await
        .unwrap();
    let rules_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(rules_file.path(), include_str!("../../ops/demo/rules.toml")).unwrap();
    let rules_stop = CancellationToken::new();
    {
        let client = nats.role(ferry_schema::topology::Role::Rules, "test-rules").connect().await.unwrap();
        let cfg = RulesConfig::new(rules_file.path());
        let stop = rules_stop.clone();
        tokio::spawn(async move { rules::run(client, &cfg, stop).await });
    }

    let work = tempfile::tempdir().unwrap();
    let exe = {
        let target = target_dir();
        let built = tokio::task::spawn_blocking(move || build_windows_agent(&target)).await.unwrap().unwrap();
        let copy = work.path().join("ferry-agent.exe");
        std::fs::copy(&built, &copy).unwrap();
        copy
    };
    let wine = {
        let dir = work.path().to_path_buf();
        std::sync::Arc::new(tokio::task::spawn_blocking(move || Wine::start(&dir)).await.unwrap().unwrap())
    };
    let adapter_port = ferry_stack::free_port().unwrap();
    let config = |idle_timeout: &str| {
        format!(
            "id = \"desk-1\"\nserver = \"{}\"\npassword = \"{}\"\n\n[spool]\ndir = 'Z:{}'\n\n[collect]\ndesktop = true\npoll = \"300ms\"\npulsetime = \"2s\"\nidle_timeout = \"{idle_timeout}\"\n\n[privacy]\nexclude_apps = ['regedit\\.exe']\nredact_titles = ['Untitled']\n\n[adapter]\nlisten = \"127.0.0.1:{adapter_port}\"\n\n[timers]\nheartbeat = \"2s\"\nprediction = \"3s\"\n",
            nats.url(),
            nats.secrets().agent("desk-1").unwrap(),
            work.path().join("spool").display(),
        )
    };
    let conf_path = work.path().join("ferry-agent.toml");
    std::fs::write(&conf_path, config("1h")).unwrap();
    let conf_arg = format!("Z:{}", conf_path.display());

    // `check` under Wine: config, spool, desktop, adapter port, broker, permissions.
    let check = {
        let mut c = wine.command(&exe).unwrap();
        c.args(["--config", &conf_arg, "check"]);
        tokio::task::spawn_blocking(move || run_checked(&mut c, "ferry-agent.exe check", Duration::from_secs(60)))
            .await
            .unwrap()
            .unwrap()
    };
    let report = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(!report.contains("PROBLEM"), "{report}");
    assert!(report.contains("ok      permissions"), "{report}");

    // The Windows system store: given a tls:// URL and no CA, the agent
    // trusts what Windows trusts. Refused while the prefix does not know
    // the broker's CA; in once the CA is in the machine's Root store.
    let certs = tempfile::tempdir().unwrap();
    let ca = ferry_stack::tls::Ca::open_or_create(certs.path()).unwrap();
    ca.server(&[]).unwrap();
    let tls_nats = NatsServer::start(ferry_stack::NatsServerOptions {
        tls: Some(certs.path().to_path_buf()),
        ..Default::default()
    })
    .unwrap();
    let tls_js = async_nats::jetstream::new(tls_nats.operator("test").connect().await.unwrap());
    topology::provision(&tls_js, &StreamSettings::default(), std::slice::from_ref(&desk)).await.unwrap();
    let tls_conf = work.path().join("ferry-agent-tls.toml");
    std::fs::write(
        &tls_conf,
        format!(
            "id = \"desk-1\"\nserver = \"tls://127.0.0.1:{}\"\npassword = \"{}\"\n\n[spool]\ndir = 'Z:{}'\n",
            tls_nats.port(),
            tls_nats.secrets().agent("desk-1").unwrap(),
            work.path().join("spool-tls").display(),
        ),
    )
    .unwrap();
    let tls_check = || {
        let mut c = wine.command(&exe).unwrap();
        c.args(["--config", &format!("Z:{}", tls_conf.display()), "check"]);
        async move {
            let out = tokio::task::spawn_blocking(move || {
                c.stdout(Stdio::piped()).stderr(Stdio::piped()).output().unwrap()
            })
            .await
            .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    let unknown = tls_check().await;
    assert!(unknown.contains("PROBLEM broker"), "the prefix trusted a CA it was never given: {unknown}");
    {
        let (wine, ca_pem, dir) = (wine.clone(), ca.cert_path(), work.path().to_path_buf());
        tokio::task::spawn_blocking(move || import_root_ca(&wine, &ca_pem, &dir)).await.unwrap();
    }
    let trusted = tls_check().await;
    assert!(trusted.contains("ok      broker") && trusted.contains("ok      permissions"), "{trusted}");
    drop(tls_nats);

    // install / uninstall: the per-user Run key, written and removed.
    let run_exe = |args: Vec<String>| {
        let mut c = wine.command(&exe).unwrap();
        c.args(args);
        async move {
            let out = tokio::task::spawn_blocking(move || run_checked(&mut c, "ferry-agent.exe", Duration::from_secs(60)))
                .await
                .unwrap()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    let installed = run_exe(vec!["--config".into(), conf_arg.clone(), "install".into()]).await;
    assert!(
        installed.contains(r"HKCU\Software\Microsoft\Windows\CurrentVersion\Run\FerryAgent") && installed.contains(" run"),
        "{installed}"
    );
    let removed = run_exe(vec!["uninstall".into()]).await;
    assert!(removed.contains("removed the logon entry"), "{removed}");
    let again = run_exe(vec!["uninstall".into()]).await;
    assert!(again.contains("no logon entry was installed"), "{again}");

    let notepad = wine.spawn_program("notepad", &[]).unwrap();
    {
        let (wine, exe) = (wine.clone(), exe.clone());
        tokio::task::spawn_blocking(move || wait_for_front(&wine, &exe, "notepad.exe")).await.unwrap();
    }
    let mut agent = {
        let mut c = wine.command(&exe).unwrap();
        c.args(["--config", &conf_arg, "run"]).stdout(Stdio::null()).stderr(Stdio::null());
        c.spawn().unwrap()
    };
    // Notepad stays in front for a while: one merged event.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let winver = wine.spawn_program("winver", &[]).unwrap();
    {
        let (wine, exe) = (wine.clone(), exe.clone());
        tokio::task::spawn_blocking(move || wait_for_front(&wine, &exe, "winver.exe")).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // An excluded program in front closes winver's span and records nothing.
    let regedit = wine.spawn_program("regedit", &[]).unwrap();
    {
        let (wine, exe) = (wine.clone(), exe.clone());
        tokio::task::spawn_blocking(move || wait_for_front(&wine, &exe, "regedit.exe")).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The scripted adapter (Linux Python) talks to the .exe over loopback.
    let script = work.path().join("chats.jsonl");
    std::fs::write(
        &script,
        "{\"chat\":\"Alice\",\"sender\":\"Alice\",\"content\":\"Hello, is anyone there?\"}\n\
         {\"chat\":\"Bob\",\"sender\":\"Bob\",\"content\":\"I want my money back for order 1234\"}\n",
    )
    .unwrap();
    let out = tokio::process::Command::new("python3")
        .arg(ferry_harness::cargo::workspace_root().unwrap().join("agent/adapters/scripted_adapter.py"))
        .args(["--port", &adapter_port.to_string(), "--timeout", "60", "--script"])
        .arg(&script)
        .arg("--token-file")
        .arg(work.path().join("spool").join(ferry_agent::adapter::TOKEN_FILE))
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.iter().any(|l| l["type"] == "send" && l["chat"] == "Alice"), "{lines:#?}");
    assert!(lines.iter().any(|l| l["type"] == "escalation" && l["chat"] == "Bob"), "{lines:#?}");

    let acts = activities(&js).await;
    let notepads: Vec<&Activity> = acts.iter().filter(|a| is_app(a, "notepad.exe")).collect();
    assert_eq!(notepads.len(), 1, "one merged event for the unchanged window: {acts:#?}");
    assert_eq!(notepads[0].title, "[redacted] - Notepad", "{acts:#?}");
    assert!(notepads[0].duration_ms >= 3_000, "the merged span grew: {acts:#?}");
    assert!(notepads[0].exe.as_deref().unwrap().to_ascii_lowercase().ends_with("notepad.exe"));
    let winvers: Vec<&Activity> = acts.iter().filter(|a| is_app(a, "winver.exe")).collect();
    assert_eq!(winvers.len(), 1, "{acts:#?}");
    assert!(winvers[0].title.contains("Wine"), "{acts:#?}");
    assert!(
        acts.iter().position(|a| is_app(a, "notepad.exe")) < acts.iter().position(|a| is_app(a, "winver.exe")),
        "{acts:#?}"
    );
    assert!(!acts.iter().any(|a| is_app(a, "regedit.exe")), "excluded app recorded: {acts:#?}");
    // Heartbeats (every 2 s here) report the process and its parts; the
    // prediction request (every 3 s) carries the recent activities.
    let events: Vec<EventBody> = inspect::read_all(&js, EVENTS_STREAM, "events.desk-1.>")
        .await
        .unwrap()
        .iter()
        .map(|m| decode_event(&m.payload, Encoding::from_headers(m.headers.as_ref()).unwrap(), 1 << 20).unwrap().body)
        .collect();
    let beat = events
        .iter()
        .rev()
        .find_map(|b| match b {
            EventBody::Heartbeat(h) => Some(h.clone()),
            _ => None,
        })
        .expect("a heartbeat");
    assert!(beat.rss_bytes > 1024 * 1024 && !beat.version.is_empty(), "{beat:?}");
    let ok = |name: &str| beat.components.iter().any(|c| c.name == name && c.ok);
    assert!(ok("desktop") && ok("broker") && ok("spool"), "{beat:?}");
    // The scripted adapter has left by now, and the heartbeat says so.
    let adapter = beat.components.iter().find(|c| c.name == "chat-adapter").expect("adapter state");
    assert!(!adapter.ok && adapter.detail.as_deref() == Some("no adapter connected"), "{beat:?}");
    let recent = events
        .iter()
        .filter_map(|b| match b {
            EventBody::Predict(p) => Some(p.recent.clone()),
            _ => None,
        })
        .next_back()
        .expect("a prediction request");
    assert!(recent.iter().any(|r| r.app.eq_ignore_ascii_case("notepad.exe")), "{recent:?}");
    let _ = agent.kill();
    let _ = agent.wait();
    drop(regedit);

    // Idle: nobody types under Xvfb, so with a 1 s timeout the agent sees
    // AFK at once. It is killed with the AFK span open; the next start
    // sends that span.
    std::fs::write(&conf_path, config("1s")).unwrap();
    let before = acts.len();
    for _ in 0..2 {
        let mut c = wine.command(&exe).unwrap();
        c.args(["--config", &conf_arg, "run"]).stdout(Stdio::null()).stderr(Stdio::null());
        let mut agent = c.spawn().unwrap();
        tokio::time::sleep(Duration::from_secs(4)).await;
        let _ = agent.kill();
        let _ = agent.wait();
    }
    let start = Instant::now();
    let afk = loop {
        let acts = activities(&js).await;
        if let Some(a) = acts[before..].iter().find(|a| a.afk) {
            break a.clone();
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no AFK event: {:#?}", &acts[before..]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(afk.app.is_empty() && afk.duration_ms >= 1_000, "{afk:?}");
    drop((winver, notepad));
    rules_stop.cancel();
    eprintln!("whole test: {:.1?}", started.elapsed());
}
