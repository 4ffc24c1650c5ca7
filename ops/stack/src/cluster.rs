//! A local 3-node `nats-server` cluster from the repository's own cluster files (ops/nats-cluster), on loopback ports, for tests and `ferry chaos`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, install, Secrets, StackError};

/// Nodes in the cluster.
pub const NODES: usize = 3;
/// What the nodes share (routes, TLS, store), as shipped.
pub const CLUSTER_CONF: &str = include_str!("../../nats-cluster/cluster.conf");
/// The shipped script that makes the routes' certificates.
pub const MAKE_CERTS: &str = include_str!("../../nats-cluster/make-certs.sh");
/// How long a node may take to answer `/healthz` after it starts.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The loopback ports of one node.
#[derive(Debug, Clone, Copy)]
pub struct NodePorts {
    /// Clients.
    pub client: u16,
    /// Monitoring (HTTP).
    pub monitor: u16,
    /// Routes to the other nodes.
    pub route: u16,
}

/// `cluster.conf` with the hosts, ports and paths of node `node` (0-based):
/// loopback ports for the shipped ones, `tls` for `/etc/ferry/nats/tls`,
/// `store` for the JetStream store. Fails when the shipped file no longer
/// holds a pattern it replaces, so a local cluster cannot drift from it.
pub fn node_conf(cluster_conf: &str, node: usize, ports: &[NodePorts; NODES], tls: &Path, store: &Path) -> Result<String, StackError> {
    let mut out = cluster_conf.to_string();
    let mut replace = |from: &str, to: &str| {
        if !out.contains(from) {
            return Err(StackError::Failed {
                what: "adapting cluster.conf to a local cluster".into(),
                command: format!("replace {from:?}"),
                status: "not found".into(),
                output_tail: "ops/nats-cluster/cluster.conf changed; update ferry_stack::cluster".into(),
            });
        }
        out = out.replace(from, to);
        Ok(())
    };
    let me = ports[node];
    replace("listen: 0.0.0.0:4222", &format!("listen: 127.0.0.1:{}", me.client))?;
    replace("http: 127.0.0.1:8222", &format!("http: 127.0.0.1:{}", me.monitor))?;
    replace("listen: 0.0.0.0:6222", &format!("listen: 127.0.0.1:{}", me.route))?;
    for (n, p) in ports.iter().enumerate() {
        replace(&format!("nats-{}.ferry.internal:6222", n + 1), &format!("127.0.0.1:{}", p.route))?;
    }
    replace("/etc/ferry/nats/tls/", &format!("{}/", tls.display()))?;
    replace("/var/lib/nats/jetstream", &store.display().to_string())?;
    Ok(out)
}

/// The shipped `node-N.conf` files: include nats.conf and cluster.conf, and name the server.
pub const NODE_FILES: [&str; NODES] = [
    include_str!("../../nats-cluster/node-1.conf"),
    include_str!("../../nats-cluster/node-2.conf"),
    include_str!("../../nats-cluster/node-3.conf"),
];

#[derive(Debug)]
struct Node {
    dir: PathBuf,
    ports: NodePorts,
    child: Option<Child>,
}

/// Three `nats-server` nodes with route TLS from the shipped
/// `make-certs.sh`, each started as `ferry-nats@.service` starts it
/// (`nats-server -c node-N.conf`); killed on drop.
#[derive(Debug)]
pub struct NatsCluster {
    binary: PathBuf,
    /// The cluster's CA: what clients trust (the nodes require TLS).
    ca: PathBuf,
    secrets: Secrets,
    nodes: Vec<Node>,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StackError {
    let what = what.into();
    move |source| StackError::Io { what, source }
}

impl NatsCluster {
    /// Starts the cluster in `dir` with `nats_conf` (Ferry's nats.conf,
    /// with whatever agent users it holds) and waits until every node is healthy.
    pub fn start(dir: &Path, nats_conf: &str, secrets: &Secrets) -> Result<Self, StackError> {
        let binary = crate::nats::server_binary()?;
        install::ensure("openssl", "openssl")?;
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        let dir = std::path::absolute(dir).map_err(io("resolve the cluster dir"))?;
        let script = dir.join("make-certs.sh");
        std::fs::write(&script, MAKE_CERTS).map_err(io(format!("write {}", script.display())))?;
        let certs = dir.join("certs");
        let out = Command::new("sh")
            .arg(&script)
            .arg(&certs)
            .arg("127.0.0.1")
            .output()
            .map_err(io("run make-certs.sh"))?;
        if !out.status.success() {
            return Err(StackError::Failed {
                what: "making the route certificates".into(),
                command: format!("sh {} {} 127.0.0.1", script.display(), certs.display()),
                status: out.status.to_string(),
                output_tail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        let tls = dir.join("tls");
        std::fs::create_dir_all(&tls).map_err(io("create the tls dir"))?;
        for (from, to) in [
            (certs.join("ca.pem"), "ca.pem"),
            (certs.join("127.0.0.1/route.pem"), "route.pem"),
            (certs.join("127.0.0.1/route-key.pem"), "route-key.pem"),
        ] {
            std::fs::copy(&from, tls.join(to)).map_err(io(format!("copy {}", from.display())))?;
        }
        let mut ports = [NodePorts { client: 0, monitor: 0, route: 0 }; NODES];
        for p in &mut ports {
            *p = NodePorts {
                client: free_port().map_err(io("find a free port"))?,
                monitor: free_port().map_err(io("find a free port"))?,
                route: free_port().map_err(io("find a free port"))?,
            };
        }
        let mut nodes = Vec::new();
        for (i, p) in ports.iter().enumerate() {
            let d = dir.join(format!("node-{}", i + 1));
            std::fs::create_dir_all(&d).map_err(io(format!("create {}", d.display())))?;
            let write = |name: &str, text: &str| {
                std::fs::write(d.join(name), text).map_err(io(format!("write {}", d.join(name).display())))
            };
            write("nats.conf", nats_conf)?;
            write("cluster.conf", &node_conf(CLUSTER_CONF, i, &ports, &tls, &d.join("store"))?)?;
            write(&format!("node-{}.conf", i + 1), NODE_FILES[i])?;
            nodes.push(Node { dir: d, ports: *p, child: None });
        }
        let mut cluster = Self { binary, ca: tls.join("ca.pem"), secrets: secrets.clone(), nodes };
        for i in 0..NODES {
            cluster.spawn(i)?;
        }
        for i in 0..NODES {
            cluster.wait_healthy(i)?;
        }
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize) -> Result<(), StackError> {
        let binary = self.binary.clone();
        let env = self.secrets.env();
        let node = &mut self.nodes[i];
        let log_path = node.dir.join("nats-server.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("open {}", log_path.display())))?;
        let log2 = log.try_clone().map_err(io("clone a log handle"))?;
        let child = Command::new(&binary)
            .arg("-c")
            .arg(node.dir.join(format!("node-{}.conf", i + 1)))
            .current_dir(&node.dir)
            .envs(env)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(io(format!("start {}", binary.display())))?;
        node.child = Some(child);
        Ok(())
    }

    fn wait_healthy(&mut self, i: usize) -> Result<(), StackError> {
        self.wait(i, |ports| http_ok(ports.monitor, "/healthz"))
    }

    /// Waits until `ready` holds for node `i`, failing when it exits or
    /// after [`READY_TIMEOUT`].
    fn wait(&mut self, i: usize, ready: impl Fn(NodePorts) -> bool) -> Result<(), StackError> {
        let start = Instant::now();
        loop {
            let node = &mut self.nodes[i];
            if let Some(Ok(Some(status))) = node.child.as_mut().map(Child::try_wait) {
                node.child = None;
                return Err(StackError::Exited {
                    program: format!("nats-server node {}", i + 1),
                    status: status.to_string(),
                    log_tail: self.log_tail(i, 20),
                });
            }
            if ready(node.ports) {
                return Ok(());
            }
            if start.elapsed() > READY_TIMEOUT {
                return Err(StackError::NotReady {
                    program: format!("nats-server node {}", i + 1),
                    waited: READY_TIMEOUT,
                    log_tail: self.log_tail(i, 20),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last `n` lines of node `i`'s log (0-based).
    pub fn log_tail(&self, i: usize, n: usize) -> String {
        let text = std::fs::read_to_string(self.nodes[i].dir.join("nats-server.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The CA file clients must trust: the nodes require TLS of clients.
    pub fn tls_ca(&self) -> &Path {
        &self.ca
    }

    /// Every node's client URL, comma separated, as clients are given them.
    pub fn urls(&self) -> String {
        self.nodes.iter().map(|n| format!("nats://127.0.0.1:{}", n.ports.client)).collect::<Vec<_>>().join(",")
    }

    /// The index of the node whose server name is `name` (`nats-2`).
    pub fn node_named(&self, name: &str) -> Option<usize> {
        let n: usize = name.strip_prefix("nats-")?.parse().ok()?;
        (1..=NODES).contains(&n).then(|| n - 1)
    }

    /// SIGKILLs node `i` (0-based), as a crash would; its store stays.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts node `i` again on its store and waits until it accepts
    /// clients. Not until `/healthz` is happy: nats-server 2.9 reports a
    /// restarted node unhealthy while any consumer replica on it is behind,
    /// and an idle consumer's replica stayed behind for minutes.
    pub fn restart(&mut self, i: usize) -> Result<(), StackError> {
        self.kill(i);
        self.spawn(i)?;
        self.wait(i, |ports| {
            std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], ports.client).into(), Duration::from_millis(200)).is_ok()
        })
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// An HTTP GET on a local monitoring port; true on 200.
pub fn http_ok(port: u16, path: &str) -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.starts_with("HTTP/1.1 200") || resp.starts_with("HTTP/1.0 200")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_pattern_is_replaced() {
        let ports = [
            NodePorts { client: 1, monitor: 2, route: 3 },
            NodePorts { client: 4, monitor: 5, route: 6 },
            NodePorts { client: 7, monitor: 8, route: 9 },
        ];
        let conf = node_conf(CLUSTER_CONF, 1, &ports, Path::new("/t/tls"), Path::new("/t/store")).unwrap();
        assert!(conf.contains("listen: 127.0.0.1:4\n") && conf.contains("listen: 127.0.0.1:6\n"), "{conf}");
        assert!(conf.contains("nats-route://127.0.0.1:9"), "{conf}");
        // Only the comments still name the production hosts and paths.
        let settings: Vec<&str> = conf.lines().filter(|l| !l.trim_start().starts_with('#')).collect();
        for gone in ["ferry.internal", "/etc/ferry", "/var/lib", "0.0.0.0"] {
            assert!(!settings.iter().any(|l| l.contains(gone)), "{gone} left in {conf}");
        }
        assert!(node_conf("listen: 0.0.0.0:4222", 0, &ports, Path::new("/"), Path::new("/")).is_err());
    }
}
