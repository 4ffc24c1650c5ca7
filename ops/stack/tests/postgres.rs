//! The PostgreSQL fixture: a real cluster that starts, keeps data across a crash, and goes away.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use ferry_stack::PgServer;

fn psql(pg: &PgServer, sql: &str) -> String {
    let bin = ferry_stack::postgres::bin_dir().unwrap();
    let out = Command::new(bin.join("psql"))
        .args([pg.url().as_str(), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .unwrap();
    assert!(out.status.success(), "psql failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn cluster_survives_a_crash_and_is_removed_on_drop() {
    let mut pg = PgServer::start_temp().unwrap();
    let dir = pg.dir().to_path_buf();
    psql(&pg, "CREATE TABLE t (x int); INSERT INTO t VALUES (1), (2)");
    pg.kill();
    assert!(std::net::TcpStream::connect(("127.0.0.1", pg.port())).is_err(), "server still listening");
    pg.restart().unwrap();
    assert_eq!(psql(&pg, "SELECT sum(x) FROM t"), "3");
    assert_eq!(psql(&pg, "SHOW server_encoding"), "UTF8");
    drop(pg);
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[test]
fn password_is_required() {
    let pg = PgServer::start_temp().unwrap();
    let bin = ferry_stack::postgres::bin_dir().unwrap();
    let wrong = pg.url().replace(pg.password(), "not-the-password");
    let out = Command::new(bin.join("psql")).args([wrong.as_str(), "-c", "SELECT 1"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("password authentication failed"));
}
