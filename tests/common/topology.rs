//! Production topologies for the fault tests, built from the files that ship: nginx
//! (`deploy/nginx.conf`) in front of a fleet of `waquota serve` processes, Redis Sentinel
//! (`deploy/sentinel.conf`) over a primary and a replica, and a Redis Cluster with replicas,
//! plus the faults the tests inject (kill -9, failover, moving one slot).
//!
//! The deploy files are used as they are, with the few textual substitutions each documents at
//! its top (addresses, ports, scratch paths), so the tests exercise the configuration that is
//! deployed.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::ops::Pki;
use super::{
    RedisCluster, RedisServer, WaquotaProcess, free_port, raw_command, scratch_dir, signal,
    spawn_killed_with_parent, spawn_signalled_with_parent, wait_until,
};

/// The text of `deploy/<name>`.
fn deploy_file(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Waits up to `limit` for `ready`; false if it never was.
fn within(limit: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ready() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

// ------------------------------------------------------------------------------------ nginx

/// The nginx binary: on PATH, or Debian's /usr/sbin/nginx (not on a non-root PATH).
fn nginx_binary() -> PathBuf {
    let on_path = Command::new("nginx").arg("-v").output().is_ok();
    let path = if on_path {
        PathBuf::from("nginx")
    } else {
        PathBuf::from("/usr/sbin/nginx")
    };
    assert!(
        on_path || path.exists(),
        "nginx is not installed: run ./scripts/test, which installs it"
    );
    path
}

/// `deploy/nginx.conf` for the tests (the substitutions its header documents): one copy of the
/// first marked server line per upstream, the listener on loopback `port`, and temp paths in
/// the prefix (the scratch directory).
pub fn nginx_conf(template: &str, upstreams: &[SocketAddr], port: u16) -> String {
    const SHIPPED: &str = "waquota-1:50051";
    let (mut out, mut in_block, mut servers, mut listens) = (Vec::new(), false, 0, 0);
    for line in template.lines() {
        let t = line.trim();
        if t == "# END upstream servers" {
            in_block = false;
        } else if in_block {
            if servers == 0 {
                assert!(line.contains(SHIPPED), "first upstream line: {line}");
                for a in upstreams {
                    out.push(line.replace(SHIPPED, &a.to_string()));
                }
            }
            servers += 1;
            continue;
        }
        in_block |= t == "# BEGIN upstream servers";
        if t.starts_with("listen 50051") {
            listens += 1;
            out.push(line.replacen("listen 50051", &format!("listen 127.0.0.1:{port}"), 1));
            continue;
        }
        out.push(line.to_owned());
        if t == "http {" {
            for (directive, dir) in [
                ("client_body_temp_path", "body"),
                ("proxy_temp_path", "proxy"),
                ("fastcgi_temp_path", "fastcgi"),
                ("uwsgi_temp_path", "uwsgi"),
                ("scgi_temp_path", "scgi"),
            ] {
                out.push(format!("    {directive} temp/{dir};"));
            }
        }
    }
    assert!(
        servers > 0 && listens == 1,
        "deploy/nginx.conf lost its markers"
    );
    out.join("\n") + "\n"
}

/// nginx running `deploy/nginx.conf` on a free loopback port, balancing over `upstreams`.
///
/// Run as root, nginx's workers switch to `nobody`; they only need the temp directories, which
/// the master creates and hands to them, so the shipped file needs no `user` line for the tests.
pub struct Nginx {
    pub addr: SocketAddr,
    child: Child,
    dir: PathBuf,
}

impl Nginx {
    pub fn start(upstreams: &[SocketAddr]) -> Nginx {
        let template = deploy_file("nginx.conf");
        let binary = nginx_binary();
        for _ in 0..5 {
            let port = free_port(false);
            let dir = scratch_dir("nginx");
            std::fs::create_dir_all(dir.join("temp")).unwrap();
            let conf = dir.join("nginx.conf");
            std::fs::write(&conf, nginx_conf(&template, upstreams, port)).unwrap();
            let log = dir.join("error.log");
            let globals = format!(
                "daemon off; pid {}; error_log {} notice;",
                dir.join("nginx.pid").display(),
                log.display()
            );
            let mut cmd = Command::new(&binary);
            cmd.arg("-p").arg(&dir).arg("-e").arg(&log);
            cmd.arg("-c").arg(&conf).arg("-g").arg(globals);
            // SIGTERM, not SIGKILL, if the test dies: the master then stops its workers.
            let mut child = spawn_signalled_with_parent(&mut cmd, libc::SIGTERM).expect("nginx");
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let up = within(Duration::from_secs(5), || {
                matches!(child.try_wait(), Ok(None)) && TcpStream::connect(addr).is_ok()
            });
            if up {
                return Nginx { addr, child, dir };
            }
            eprintln!(
                "nginx did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            stop_gracefully(&mut child);
        }
        panic!("could not start nginx");
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What nginx logged (upstream failures show here).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

/// SIGTERM (nginx's fast shutdown, which stops the workers too), then SIGKILL after 5 s.
fn stop_gracefully(child: &mut Child) {
    if matches!(child.try_wait(), Ok(None)) {
        signal(child, libc::SIGTERM);
        if !within(Duration::from_secs(5), || {
            !matches!(child.try_wait(), Ok(None))
        }) {
            let _ = child.kill();
        }
    }
    let _ = child.wait();
}

impl Drop for Nginx {
    fn drop(&mut self) {
        stop_gracefully(&mut self.child);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ------------------------------------------------------------------------------------ fleet

/// `n` `waquota serve` processes with the same arguments; one can be killed and restarted on
/// its port, so a balancer's upstream list stays valid.
pub struct Fleet {
    pub instances: Vec<WaquotaProcess>,
    args: Vec<String>,
}

impl Fleet {
    pub fn start(n: usize, args: &[&str]) -> Fleet {
        Fleet {
            instances: (0..n).map(|_| WaquotaProcess::start(args)).collect(),
            args: args.iter().map(|a| a.to_string()).collect(),
        }
    }

    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.instances.iter().map(|p| p.addr).collect()
    }

    pub fn endpoint(&self, i: usize) -> String {
        self.instances[i].endpoint()
    }

    /// Kills instance `i` with SIGKILL: its calls in flight are cut off, nothing drains.
    pub fn kill9(&mut self, i: usize) {
        self.instances[i].kill9();
    }

    /// Starts instance `i` again, on the same address and arguments.
    pub fn restart(&mut self, i: usize) {
        self.kill9(i);
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.instances[i] = WaquotaProcess::start_on(self.instances[i].addr, &args);
    }
}

// --------------------------------------------------------------------------------- sentinel

/// The master name in `deploy/sentinel.conf`.
pub const SENTINEL_MASTER: &str = "waquota";

/// `deploy/sentinel.conf` for one test sentinel (the substitutions its header documents):
/// its port, the primary's address, and `bind`/`dir` plus `extra` lines appended.
pub fn sentinel_conf(
    template: &str,
    port: u16,
    primary: u16,
    dir: &Path,
    extra: &[&str],
) -> String {
    let mut conf = String::new();
    for line in template.lines() {
        let line = if line.trim() == "port 26379" {
            format!("port {port}")
        } else {
            line.replace("redis-primary 6379", &format!("127.0.0.1 {primary}"))
        };
        conf.push_str(&line);
        conf.push('\n');
    }
    assert!(
        conf.contains(&format!("127.0.0.1 {primary} 2")),
        "monitor line"
    );
    conf.push_str(&format!("bind 127.0.0.1\ndir {}\n", dir.display()));
    for line in extra {
        conf.push_str(line);
        conf.push('\n');
    }
    conf
}

/// One `redis-sentinel` process on its own copy of the config.
struct Sentinel {
    port: u16,
    /// Its TLS port, in a TLS set.
    tls_port: Option<u16>,
    child: Child,
    dir: PathBuf,
}

impl Sentinel {
    /// `tls`: config lines (certificate, key, CA, ...) for a sentinel that also listens on a
    /// TLS port of its own; the plain port stays, for the harness's checks.
    fn start(template: &str, primary: u16, extra: &[&str], tls: Option<&[String]>) -> Sentinel {
        for _ in 0..5 {
            let (port, dir) = (free_port(false), scratch_dir("sentinel"));
            let tls_port = tls.map(|_| free_port(false));
            let mut lines: Vec<String> = extra.iter().map(|l| l.to_string()).collect();
            if let (Some(t), Some(tls)) = (tls_port, tls) {
                lines.push(format!("tls-port {t}"));
                lines.extend(tls.iter().cloned());
            }
            let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
            let conf = dir.join("sentinel.conf");
            std::fs::write(&conf, sentinel_conf(template, port, primary, &dir, &lines)).unwrap();
            let mut cmd = Command::new("redis-sentinel");
            cmd.arg(&conf);
            let Ok(mut child) = spawn_killed_with_parent(&mut cmd) else {
                panic!("redis-sentinel is not installed: run ./scripts/test, which installs it");
            };
            let up = within(Duration::from_secs(5), || {
                matches!(child.try_wait(), Ok(None))
                    && raw_command(port, "PING").is_some_and(|r| r.starts_with("+PONG"))
            });
            if up {
                return Sentinel {
                    port,
                    tls_port,
                    child,
                    dir,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_dir_all(&dir);
        }
        panic!("could not start redis-sentinel");
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A primary, one replica and three sentinels (quorum 2) watching them as master `waquota`.
pub struct SentinelSet {
    /// The data nodes, first started as primary and replica; which one is primary now is the
    /// sentinels' answer (`primary_port`). A restarted node comes back with its first
    /// arguments, as a primary: the sentinels turn it into a replica of the current primary
    /// eventually, or a test does at once with `REPLICAOF`.
    pub nodes: Vec<RedisServer>,
    /// The port each node (same order) is known by to the sentinels and its peers: its TLS
    /// port in a TLS set (`start_tls`), else its plain port.
    announced: Vec<u16>,
    sentinels: Vec<Sentinel>,
}

impl SentinelSet {
    pub fn start() -> SentinelSet {
        Self::start_with(&[], &[])
    }

    /// `redis_args` go to both data nodes (e.g. `--appendonly yes` or ACL flags), and
    /// `sentinel_lines` into every sentinel's config (e.g. `sentinel auth-pass waquota ...`).
    pub fn start_with(redis_args: &[&str], sentinel_lines: &[&str]) -> SentinelSet {
        Self::launch(redis_args, sentinel_lines, None)
    }

    /// TLS between everything but the harness: each data node and each sentinel also listens on
    /// a TLS port with `pki`'s server certificate (clients need no certificate), the replica
    /// replicates from the primary's TLS port, the nodes announce their TLS ports, and the
    /// sentinels monitor the primary's TLS port and reach the nodes and each other over TLS
    /// (`tls-replication yes`). The plain ports stay, for the harness's own checks; waquota's
    /// seeds are `sentinel_tls_urls`.
    pub fn start_tls(pki: &Pki) -> SentinelSet {
        let (cert, key, ca) = (pki.server_cert(), pki.server_key(), pki.ca());
        let files = [
            ("tls-cert-file", cert.to_str().unwrap()),
            ("tls-key-file", key.to_str().unwrap()),
            ("tls-ca-cert-file", ca.to_str().unwrap()),
            ("tls-auth-clients", "no"),
            ("tls-replication", "yes"),
        ];
        let tls = Tls {
            args: files
                .iter()
                .flat_map(|(k, v)| [format!("--{k}"), v.to_string()])
                .collect(),
            // Quoted: the paths may hold spaces.
            lines: files.iter().map(|(k, v)| format!("{k} \"{v}\"")).collect(),
        };
        Self::launch(&[], &[], Some(&tls))
    }

    fn launch(redis_args: &[&str], sentinel_lines: &[&str], tls: Option<&Tls>) -> SentinelSet {
        // A data node's arguments: `redis_args`, plus in a TLS set its TLS port (announced).
        let node_args = |tls_port: Option<u16>| -> Vec<String> {
            let mut args: Vec<String> = redis_args.iter().map(|a| a.to_string()).collect();
            if let (Some(tls), Some(p)) = (tls, tls_port) {
                args.extend(tls.args.iter().cloned());
                #[rustfmt::skip]
                args.extend(["--tls-port", &p.to_string(),
                             "--replica-announce-ip", "127.0.0.1",
                             "--replica-announce-port", &p.to_string()].map(String::from));
            }
            args
        };
        let start = |args: &[String]| {
            RedisServer::start_with(&args.iter().map(String::as_str).collect::<Vec<_>>())
        };
        let tls_ports = tls.map(|_| (free_port(false), free_port(false)));
        let primary = start(&node_args(tls_ports.map(|p| p.0)));
        let primary_announced = tls_ports.map_or(primary.port, |p| p.0);
        let mut replica_args = node_args(tls_ports.map(|p| p.1));
        replica_args
            .extend(["--replicaof", "127.0.0.1", &primary_announced.to_string()].map(String::from));
        let replica = start(&replica_args);
        wait_until("the replica's link to its primary", || {
            info(replica.port, "replication")
                .contains("master_link_status:up")
                .then_some(())
        });
        let template = deploy_file("sentinel.conf");
        let tls_lines = tls.map(|t| t.lines.as_slice());
        let sentinels = (0..3)
            .map(|_| Sentinel::start(&template, primary_announced, sentinel_lines, tls_lines))
            .collect();
        let announced = match tls_ports {
            Some((p, r)) => vec![p, r],
            None => vec![primary.port, replica.port],
        };
        let set = SentinelSet {
            nodes: vec![primary, replica],
            announced,
            sentinels,
        };
        // A failover needs each sentinel to know the replica and its two peers (hello messages
        // every 2 s): wait for that before a test relies on one.
        for s in &set.sentinels {
            wait_until("a sentinel that knows the replica and its peers", || {
                let state = info(s.port, "sentinel");
                (state.contains("status=ok,") && state.contains("slaves=1,sentinels=3"))
                    .then_some(())
            });
        }
        set
    }

    /// `redis://127.0.0.1:P,...`, one per sentinel: waquota's `--redis-sentinel`.
    pub fn sentinel_urls(&self) -> String {
        let urls: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("redis://127.0.0.1:{}", s.port))
            .collect();
        urls.join(",")
    }

    /// `rediss://127.0.0.1:T,...`, one per sentinel's TLS port (a set from `start_tls`).
    pub fn sentinel_tls_urls(&self) -> String {
        let urls: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| {
                let port = s.tls_port.expect("a SentinelSet started with start_tls");
                format!("rediss://127.0.0.1:{port}")
            })
            .collect();
        urls.join(",")
    }

    pub fn master_name(&self) -> &'static str {
        SENTINEL_MASTER
    }

    /// The ports of the three sentinels.
    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(|s| s.port).collect()
    }

    /// The TLS ports of the three sentinels (a set from `start_tls`).
    pub fn sentinel_tls_ports(&self) -> Vec<u16> {
        self.sentinels
            .iter()
            .map(|s| s.tls_port.expect("a SentinelSet started with start_tls"))
            .collect()
    }

    /// The port the sentinels know the data node on `port` by: its TLS port in a TLS set, else
    /// `port` itself.
    pub fn announced_port(&self, port: u16) -> u16 {
        let i = self.nodes.iter().position(|n| n.port == port);
        self.announced[i.unwrap_or_else(|| panic!("no data node on port {port}"))]
    }

    /// The plain port of the data node the sentinels know by `announced`.
    fn plain_port(&self, announced: u16) -> u16 {
        let i = self.announced.iter().position(|p| *p == announced);
        self.nodes[i.unwrap_or_else(|| panic!("no data node announced on port {announced}"))].port
    }

    /// The primary's (plain) port, as the first sentinel reports it.
    pub fn primary_port(&self) -> u16 {
        let named = reported_primary(self.sentinels[0].port).expect("a sentinel names the primary");
        self.plain_port(named)
    }

    /// The data node on `port`.
    pub fn node(&mut self, port: u16) -> &mut RedisServer {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no data node on port {port}"))
    }

    /// Kills the current primary with SIGKILL; returns its port.
    pub fn kill_primary(&mut self) -> u16 {
        let port = self.primary_port();
        self.node(port).kill();
        port
    }

    /// Waits until every sentinel names a primary other than `old` and that node answers ROLE
    /// as a master; returns its port (plain ports, as `primary_port`).
    pub fn wait_for_failover(&self, old: u16) -> u16 {
        wait_until(&format!("a failover away from port {old}"), || {
            let named: Vec<Option<u16>> = self
                .sentinels
                .iter()
                .map(|s| reported_primary(s.port).map(|p| self.plain_port(p)))
                .collect();
            let new = named[0].filter(|p| *p != old)?;
            (named.iter().all(|p| *p == Some(new)) && is_master(new)).then_some(new)
        })
    }

    /// Restarts the data node on `port` (it comes back as an empty primary) and makes it a
    /// replica of `primary` with REPLICAOF, as an operator would; the sentinels would do the
    /// same at a pace of their own. The command is sent again while the node does not follow
    /// `primary` (one lost to a node still starting, or undone by a sentinel's own
    /// reconfiguration racing it). With `linked`, returns only once its replication link is up.
    /// A failure prints what the two nodes and the sentinels reported.
    pub fn rejoin(&mut self, port: u16, primary: u16, linked: bool) {
        self.node(port).restart();
        let target = self.announced_port(primary);
        let follows = |repl: &str| {
            repl.contains("role:slave") && repl.contains(&format!("master_port:{target}\r\n"))
        };
        let done = within(super::WAIT_LIMIT, || {
            let repl = info(port, "replication");
            if !follows(&repl) {
                raw_command(port, &format!("REPLICAOF 127.0.0.1 {target}"));
                return false;
            }
            !linked || repl.contains("master_link_status:up")
        });
        if !done {
            let sentinels: Vec<Option<u16>> = self
                .sentinels
                .iter()
                .map(|s| reported_primary(s.port))
                .collect();
            panic!(
                "node {port} never followed {primary} (linked: {linked}); it reported\n{}\n\
                 {primary} reported\n{}\nthe sentinels name {sentinels:?}",
                info(port, "replication"),
                info(primary, "replication"),
            );
        }
    }
}

/// TLS settings for every process of a `SentinelSet` (`start_tls`).
struct Tls {
    /// redis-server arguments: `--tls-cert-file <path>`, ...
    args: Vec<String>,
    /// The same as sentinel config lines: `tls-cert-file <path>`, ...
    lines: Vec<String>,
}

/// `SENTINEL get-master-addr-by-name waquota` on the sentinel at `port`: the primary's port
/// (the one it monitors: the TLS port in a TLS set).
fn reported_primary(port: u16) -> Option<u16> {
    let reply = raw_command(
        port,
        &format!("SENTINEL get-master-addr-by-name {SENTINEL_MASTER}"),
    )?;
    reply.lines().rev().find_map(|l| l.trim().parse().ok())
}

/// Whether the node on `port` answers ROLE as a master.
fn is_master(port: u16) -> bool {
    raw_command(port, "ROLE").is_some_and(|r| r.contains("$6\r\nmaster\r\n"))
}

/// `INFO <section>` of the node on `port` ("" when it does not answer).
pub fn info(port: u16, section: &str) -> String {
    raw_command(port, &format!("INFO {section}")).unwrap_or_default()
}

// ---------------------------------------------------------------------------------- cluster

/// `redis-cli -p <port> <args>`: the reply as redis-cli prints it without a terminal; None when
/// the node does not answer or replies with an error.
pub fn redis_cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let failed = !out.status.success()
        || text.starts_with("ERR")
        || text.starts_with("Could not connect")
        || text.starts_with("(error)");
    (!failed).then_some(text)
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub struct ClusterNode {
    pub id: String,
    pub port: u16,
    pub flags: String,
    /// The master's id for a replica, "-" for a master.
    pub master: String,
    /// Slot ranges served (migration markers left out).
    pub slots: Vec<(u16, u16)>,
}

impl ClusterNode {
    fn parse(line: &str) -> Option<ClusterNode> {
        let f: Vec<&str> = line.split_whitespace().collect();
        let addr = f.get(1)?.split('@').next()?;
        let slots = f
            .iter()
            .skip(8)
            .filter(|s| !s.starts_with('['))
            .filter_map(|s| match s.split_once('-') {
                Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                None => s.parse().ok().map(|n| (n, n)),
            })
            .collect();
        Some(ClusterNode {
            id: f[0].to_owned(),
            port: addr.rsplit(':').next()?.parse().ok()?,
            flags: f.get(2)?.to_string(),
            master: f.get(3)?.to_string(),
            slots,
        })
    }

    /// A master not flagged as failing (`fail` or `fail?`).
    pub fn is_live_master(&self) -> bool {
        self.flags.contains("master") && !self.flags.contains("fail")
    }

    pub fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot))
    }
}

impl RedisCluster {
    /// `masters` masters with `replicas_per_master` replicas each (node timeout 2 s, so a
    /// failover takes a few seconds), once every replica has synced.
    pub fn start_with_replicas(masters: usize, replicas_per_master: usize) -> RedisCluster {
        let cluster = Self::create(masters, replicas_per_master, 2000);
        for n in &cluster.nodes {
            wait_until("replicas in sync", || {
                let repl = info(n.port, "replication");
                (repl.contains("role:master") || repl.contains("master_link_status:up"))
                    .then_some(())
            });
        }
        cluster
    }

    /// The cluster as the first node that answers sees it.
    pub fn view(&self) -> Vec<ClusterNode> {
        self.nodes
            .iter()
            .find_map(|n| redis_cli(n.port, &["CLUSTER", "NODES"]))
            .expect("a cluster node that answers")
            .lines()
            .filter_map(ClusterNode::parse)
            .collect()
    }

    /// The ports of the masters serving slots.
    pub fn masters(&self) -> Vec<u16> {
        let view = self.view();
        view.iter()
            .filter(|n| n.is_live_master() && !n.slots.is_empty())
            .map(|n| n.port)
            .collect()
    }

    pub fn node_id(&self, port: u16) -> String {
        self.view()
            .into_iter()
            .find(|n| n.port == port)
            .map(|n| n.id)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
    }

    /// The slot of `key` (`CLUSTER KEYSLOT`).
    pub fn key_slot(&self, key: &str) -> u16 {
        let reply = self
            .nodes
            .iter()
            .find_map(|n| redis_cli(n.port, &["CLUSTER", "KEYSLOT", key]))
            .expect("CLUSTER KEYSLOT");
        reply.trim().parse().expect("a slot number")
    }

    /// The port of the live master serving `slot`.
    pub fn master_of_key_slot(&self, slot: u16) -> u16 {
        self.view()
            .into_iter()
            .find(|n| n.is_live_master() && n.serves(slot))
            .map(|n| n.port)
            .unwrap_or_else(|| panic!("no live master serves slot {slot}"))
    }

    /// The node on `port`.
    pub fn node(&mut self, port: u16) -> &mut RedisServer {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
    }

    /// Kills the node on `port` with SIGKILL.
    pub fn kill(&mut self, port: u16) {
        self.node(port).kill();
    }

    /// Kills the master on `port` once its replicas hold every write it acknowledged: writes
    /// are paused (`CLIENT PAUSE WRITE`; commands arriving meanwhile wait and die with it,
    /// unexecuted) until the replicas' acknowledged offset reaches the master's. Replication is
    /// asynchronous, so a plain kill can lose the last acknowledged writes; this isolates the
    /// failover itself from that loss.
    pub fn kill_synced(&mut self, port: u16) {
        let paused = redis_cli(port, &["CLIENT", "PAUSE", "10000", "WRITE"]);
        assert!(paused.is_some(), "CLIENT PAUSE on {port}");
        wait_until("the replicas to acknowledge every write", || {
            let repl = info(port, "replication");
            let offset = |key: &str| {
                repl.lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            let master = offset("master_repl_offset:")?;
            let acked = repl
                .lines()
                .filter(|l| l.starts_with("slave"))
                .filter_map(|l| l.split("offset=").nth(1)?.split(',').next()?.parse().ok())
                .collect::<Vec<u64>>();
            (!acked.is_empty() && acked.iter().all(|a| *a >= master)).then_some(())
        });
        self.kill(port);
    }

    /// Waits until every live node reports `cluster_state:ok` with `slot` served by the same
    /// live master, other than `killed`; returns that master's port.
    pub fn wait_for_failover(&self, killed: u16, slot: u16) -> u16 {
        wait_until(
            &format!("slot {slot} served again after port {killed}"),
            || {
                let mut owner = None;
                for n in self.nodes.iter().filter(|n| n.port != killed) {
                    let state = raw_command(n.port, "CLUSTER INFO")?;
                    if !state.contains("cluster_state:ok") {
                        return None;
                    }
                    let view = redis_cli(n.port, &["CLUSTER", "NODES"])?;
                    let master = view
                        .lines()
                        .filter_map(ClusterNode::parse)
                        .find(|m| m.is_live_master() && m.serves(slot))?
                        .port;
                    if master == killed || owner.is_some_and(|o| o != master) {
                        return None;
                    }
                    owner = Some(master);
                }
                owner
            },
        )
    }

    /// Moves `slot` to the master on `to`, as `redis-cli --cluster reshard` does for each slot
    /// but for this one: `SETSLOT IMPORTING` on the target, `SETSLOT MIGRATING` on the source,
    /// `MIGRATE` of its keys in batches of `batch`, then `SETSLOT NODE` on every master. Clients
    /// meanwhile get ASK (keys moved) or TRYAGAIN (a multi-key call split across both nodes).
    pub fn reshard(&self, slot: u16, to: u16, batch: usize) {
        let from = self.master_of_key_slot(slot);
        if from == to {
            return;
        }
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        let s = slot.to_string();
        let ok = |port: u16, args: &[&str]| {
            let reply = redis_cli(port, args).unwrap_or_default();
            let reply = reply.trim();
            // NOKEY: the keys expired since they were listed.
            assert!(
                reply == "OK" || reply == "NOKEY",
                "{args:?} on {port}: {reply}"
            );
        };
        ok(to, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id]);
        ok(from, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id]);
        let to_port = to.to_string();
        let batch_size = batch.to_string();
        loop {
            let keys = redis_cli(from, &["CLUSTER", "GETKEYSINSLOT", &s, &batch_size])
                .expect("CLUSTER GETKEYSINSLOT");
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let mut args = vec!["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "KEYS"];
            args.extend(keys.iter().copied());
            ok(from, &args);
        }
        ok(to, &["CLUSTER", "SETSLOT", &s, "NODE", &to_id]);
        ok(from, &["CLUSTER", "SETSLOT", &s, "NODE", &to_id]);
        for m in self.masters() {
            if m != to && m != from {
                ok(m, &["CLUSTER", "SETSLOT", &s, "NODE", &to_id]);
            }
        }
    }
}
