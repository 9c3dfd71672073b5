//! Test harness: real `redis-server` processes on free ports (standalone and a 3-master
//! Cluster), and a waquota server per test, in process or as a child process.
//!
//! Every child process is killed when its handle drops, and also when the test process dies
//! (PR_SET_PDEATHSIG), so no Redis outlives a test run.

#![allow(dead_code)]

pub mod certs;
pub mod dsl;
pub mod ops;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use prost_types::Timestamp;
use tonic::transport::Channel;
use waquota::config::{Settings, Store};
use waquota::proto::admin_service_client::AdminServiceClient;
use waquota::proto::quota_service_client::QuotaServiceClient;

/// Midnight UTC of the test day D (2026-03-02).
pub const D: i64 = 1_772_409_600_000;
pub const HOUR: i64 = 3_600_000;
pub const MINUTE: i64 = 60_000;
pub const DAY: i64 = 24 * HOUR;

/// D + `h`:`m`:`s`.`ms`
pub fn at(h: i64, m: i64, s: i64, ms: i64) -> i64 {
    D + h * HOUR + m * MINUTE + s * 1000 + ms
}

pub fn ts(ms: i64) -> Timestamp {
    Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

pub fn ms_of(t: &Timestamp) -> i64 {
    t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
}

pub fn duration_ms(d: &prost_types::Duration) -> i64 {
    d.seconds * 1000 + i64::from(d.nanos) / 1_000_000
}

fn spawn_killed_with_parent(cmd: &mut Command) -> std::io::Result<Child> {
    // SAFETY: prctl is async-signal-safe; it only asks the kernel to signal the child when the
    // parent thread exits, so no Redis outlives a test process.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

static SEQ: AtomicU32 = AtomicU32::new(0);

pub fn scratch_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "waquota-test-{what}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// A free TCP port on loopback (and, with `bus`, port + 10000 free too, for cluster buses).
pub fn free_port(bus: bool) -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !bus {
            return port;
        }
        // Cluster bus ports are port + 10000: draw from a range where that stays valid.
        let base = 20_000 + (port % 20_000);
        if TcpListener::bind(("127.0.0.1", base)).is_ok()
            && TcpListener::bind(("127.0.0.1", base + 10_000)).is_ok()
        {
            return base;
        }
    }
}

/// Sends one inline command and returns the raw reply (enough for PING and CLUSTER INFO).
pub fn raw_command(port: u16, cmd: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    s.write_all(format!("{cmd}\r\n").as_bytes()).ok()?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = s.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn require_redis() {
    let found = Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok();
    assert!(
        found,
        "redis-server is not installed: run ./scripts/test, which installs it"
    );
}

/// One `redis-server` on a free loopback port, with no persistence.
pub struct RedisServer {
    pub port: u16,
    child: Child,
    dir: PathBuf,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> RedisServer {
        require_redis();
        for _ in 0..5 {
            let port = free_port(false);
            if let Some(s) = Self::try_start(port, extra, "redis") {
                return s;
            }
        }
        panic!("could not start redis-server");
    }

    fn try_start(port: u16, extra: &[&str], what: &str) -> Option<RedisServer> {
        let dir = scratch_dir(what);
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--dir", dir.to_str().unwrap()])
        .args(extra);
        let mut child = spawn_killed_with_parent(&mut cmd).ok()?;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = child.try_wait() {
                return None; // port taken in the meantime
            }
            if raw_command(port, "PING").is_some_and(|r| r.starts_with("+PONG")) {
                return Some(RedisServer { port, child, dir });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops the server (as a crash would); `restart` brings it back on the same port.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of three masters (no replicas), all slots assigned.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        require_redis();
        let mut nodes = Vec::new();
        while nodes.len() < 3 {
            let port = free_port(true);
            let conf = format!("nodes-{port}.conf");
            let extra = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &conf,
                "--cluster-node-timeout",
                "5000",
            ];
            if let Some(s) = RedisServer::try_start(port, &extra, "cluster") {
                nodes.push(s);
            }
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        for n in &nodes {
            wait_until("cluster_state:ok", Duration::from_secs(20), || {
                raw_command(n.port, "CLUSTER INFO").is_some_and(|r| r.contains("cluster_state:ok"))
            });
        }
        RedisCluster { nodes }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }
}

/// A channel to `endpoint`, retried while the server comes up.
pub async fn connect(endpoint: &str) -> Channel {
    let start = Instant::now();
    loop {
        match Channel::from_shared(endpoint.to_owned())
            .unwrap()
            .connect()
            .await
        {
            Ok(c) => return c,
            Err(e) if start.elapsed() > Duration::from_secs(10) => {
                panic!("cannot connect to {endpoint}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Which ledger a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Redis,
    Cluster,
}

enum Store_ {
    Memory,
    Redis(RedisServer),
    Cluster(RedisCluster),
}

/// A waquota server running in this test process, trusting the client clock.
pub struct TestServer {
    pub addr: SocketAddr,
    pub backend: Backend,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    store: Store_,
}

impl TestServer {
    pub async fn start(backend: Backend) -> TestServer {
        Self::start_with(backend, |_| {}).await
    }

    /// Starts a server; `tweak` may change the settings (defaults, batch size, ...).
    pub async fn start_with(backend: Backend, tweak: impl FnOnce(&mut Settings)) -> TestServer {
        let (store, config) = match backend {
            Backend::Memory => (Store_::Memory, Store::Memory),
            Backend::Redis => {
                let r = RedisServer::start();
                let url = r.url();
                (Store_::Redis(r), Store::Redis { url })
            }
            Backend::Cluster => {
                let c = RedisCluster::start();
                let nodes = c.urls();
                (Store_::Cluster(c), Store::Cluster { nodes })
            }
        };
        let mut settings = Settings {
            store: config,
            trust_client_clock: true,
            ..Settings::default()
        };
        // Quota scenarios send hundreds of messages at one instant of the trusted clock; the
        // default 80 messages/s would refuse most of them. Throughput tests set their own rate.
        settings.defaults.messages_per_second = 100_000;
        tweak(&mut settings);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            waquota::server::serve(settings, listener, async {
                let _ = stopped.await;
            })
            .await
            .expect("server");
        });
        TestServer {
            addr,
            backend,
            stop: Some(stop),
            task: Some(task),
            store,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn channel(&self) -> Channel {
        connect(&self.endpoint()).await
    }

    pub async fn quota(&self) -> QuotaServiceClient<Channel> {
        QuotaServiceClient::new(self.channel().await)
    }

    pub async fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.channel().await)
    }

    /// The Redis server behind this test server, if standalone.
    pub fn redis(&mut self) -> Option<&mut RedisServer> {
        match &mut self.store {
            Store_::Redis(r) => Some(r),
            _ => None,
        }
    }

    pub fn cluster(&self) -> Option<&RedisCluster> {
        match &self.store {
            Store_::Cluster(c) => Some(c),
            _ => None,
        }
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A `waquota serve` child process (the real binary) on a free port.
pub struct WaquotaProcess {
    pub addr: SocketAddr,
    child: Child,
}

impl WaquotaProcess {
    pub fn start(args: &[&str]) -> WaquotaProcess {
        Self::start_with_env(args, &[])
    }

    /// Starts `waquota serve` with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> WaquotaProcess {
        for _ in 0..5 {
            let port = free_port(false);
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_waquota"));
            cmd.arg("serve")
                .args(["--listen", &addr.to_string()])
                .args(args)
                .env("WAQUOTA_LOG", "warn")
                .envs(env.iter().copied());
            let mut child = spawn_killed_with_parent(&mut cmd).expect("spawn waquota");
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if TcpStream::connect(addr).is_ok() {
                    return WaquotaProcess { addr, child };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("could not start waquota serve {args:?}");
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for WaquotaProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
