//! `ferry certs`: a local CA, the broker's server certificate and clients' certificates for NATS over TLS.

use std::path::PathBuf;

use clap::Args;
use ferry_stack::tls::{Ca, SERVER_CERT, SERVER_KEY};

/// Make the TLS files of a Ferry broker: a certificate authority (made once
/// in DIR and kept: what it signed stays valid), the broker's certificate
/// for the names and addresses clients use to reach it, and, for a broker
/// that verifies clients (`verify_and_map`), client certificates.
///
/// Copy DIR/server.pem, DIR/server-key.pem and DIR/ca.pem to the broker
/// (see the `tls` block in nats.conf); give clients DIR/ca.pem
/// (`--tls-ca`, `tls_ca = ...` in the agent's config). Keep DIR/ca-key.pem
/// off the servers.
///
/// Examples:
///   ferry certs --dir /etc/ferry/tls --name nats.example.com --ip 10.0.0.5
///   ferry certs --dir ./tls --client desk-7 --client rules   # client certificates only
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct CertsArgs {
    /// Where the CA and the certificates are (created when missing).
    #[arg(long, default_value = ".ferry/tls")]
    dir: PathBuf,
    /// A host name clients use to reach the broker (repeatable);
    /// `localhost` is always included.
    #[arg(long = "name")]
    names: Vec<String>,
    /// An IP address clients use to reach the broker (repeatable);
    /// 127.0.0.1 is always included.
    #[arg(long = "ip")]
    ips: Vec<std::net::IpAddr>,
    /// Make a client certificate with this common name (repeatable). With
    /// only --client, the server certificate is left as it is.
    #[arg(long = "client")]
    clients: Vec<String>,
}

pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    let ca = Ca::open_or_create(&args.dir)?;
    println!("CA: {}", ca.cert_path().display());
    let server_wanted = !args.names.is_empty() || !args.ips.is_empty() || args.clients.is_empty();
    if server_wanted {
        let names: Vec<String> = args.names.iter().cloned().chain(args.ips.iter().map(ToString::to_string)).collect();
        let cert = ca.server(&names)?;
        println!(
            "server: {} and {} (localhost, 127.0.0.1{})",
            cert.display(),
            args.dir.join(SERVER_KEY).display(),
            names.iter().map(|n| format!(", {n}")).collect::<String>()
        );
    } else if !args.dir.join(SERVER_CERT).is_file() {
        println!("(no server certificate: add --name or --ip to make one)");
    }
    for name in &args.clients {
        let (cert, key) = ca.client(name)?;
        println!("client {name}: {} and {}", cert.display(), key.display());
    }
    Ok(())
}
