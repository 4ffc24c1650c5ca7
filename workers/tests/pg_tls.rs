//! PostgreSQL over TLS: `sslmode=require` in `DATABASE_URL` is honoured, with the server's certificate verified.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use ferry_stack::{PgServer, PgServerOptions};
use ferry_workers::state::{self, DbConfig, ROOT_CERT_VAR};

/// One test in its own binary: it sets `PGSSLROOTCERT`, which is process-wide.
#[tokio::test]
async fn sslmode_require_connects_over_tls_and_verifies_the_server() {
    let certs = tempfile::tempdir().unwrap();
    let ca = ferry_stack::tls::Ca::open_or_create(certs.path()).unwrap();
    ca.server(&[]).unwrap();
    let pg = tokio::task::spawn_blocking({
        let dir = certs.path().to_path_buf();
        move || PgServer::start(PgServerOptions { unsafe_fast: true, tls: Some(dir), ..Default::default() })
    })
    .await
    .unwrap()
    .unwrap();
    let url = format!("{}?sslmode=require", pg.url());
    let ssl_in_use = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

    // Trusting the server's CA: one connection and a pool, both over TLS.
    std::env::set_var(ROOT_CERT_VAR, ca.cert_path());
    let c = state::connect_one(&url).await.unwrap();
    assert!(c.query_one(ssl_in_use, &[]).await.unwrap().get::<_, bool>(0));
    let pool = state::pool(&DbConfig::new(&url)).unwrap();
    assert!(pool.get().await.unwrap().query_one(ssl_in_use, &[]).await.unwrap().get::<_, bool>(0));

    // Without sslmode the connection stays plaintext, as before.
    let plain = state::connect_one(&pg.url()).await.unwrap();
    assert!(!plain.query_one(ssl_in_use, &[]).await.unwrap().get::<_, bool>(0));

    // Trusting another CA: refused, saying why.
    let other = tempfile::tempdir().unwrap();
    let other_ca = ferry_stack::tls::Ca::open_or_create(other.path()).unwrap();
    std::env::set_var(ROOT_CERT_VAR, other_ca.cert_path());
    let e = state::connect_one(&url).await.unwrap_err().to_string();
    assert!(e.contains("cannot connect to PostgreSQL"), "{e}");

    // A CA file that is not there: a clear error naming the variable.
    std::env::set_var(ROOT_CERT_VAR, certs.path().join("missing.pem"));
    let e = state::connect_one(&url).await.unwrap_err().to_string();
    assert!(e.starts_with("PGSSLROOTCERT="), "{e}");
}
