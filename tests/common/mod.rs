//! Test harness: real `redis-server` processes on free ports (standalone and a 3-master
//! Cluster), and a waquota server per test, in process or as a child process. `topology` builds
//! the production shapes (nginx, Sentinel, a Cluster with replicas) for the fault tests.
//!
//! Every child process is killed when its handle drops, and also when the test process dies
//! (PR_SET_PDEATHSIG), so no Redis outlives a test run.

#![allow(dead_code)]

pub mod certs;
pub mod dsl;
pub mod ops;
pub mod topology;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
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
    spawn_signalled_with_parent(cmd, libc::SIGKILL)
}

/// Spawns `cmd`, which gets `signal` when the parent thread exits (SIGTERM for a process that
/// must stop its own children, as an nginx master its workers).
fn spawn_signalled_with_parent(cmd: &mut Command, signal: i32) -> std::io::Result<Child> {
    // SAFETY: prctl is async-signal-safe; it only asks the kernel to signal the child when the
    // parent thread exits, so no Redis outlives a test process.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, signal);
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

/// Any free port on loopback, bound by the server itself (see `TestServer::metrics`).
#[allow(dead_code)]
pub const ANY_PORT: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

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

/// The longest a test waits for something that must happen (a process listening, health
/// turning, a store coming back). It only turns a hang into a failure: nothing is timed.
pub const WAIT_LIMIT: Duration = Duration::from_secs(60);
/// Most attempts a test makes at a call that fails while its store fails over or restarts, with
/// [`RETRY_PAUSE`] between them: a hang guard counted in attempts, not a timing.
pub const MAX_ATTEMPTS: usize = 1500;
pub const RETRY_PAUSE: Duration = Duration::from_millis(20);
const POLL: Duration = Duration::from_millis(20);

/// Polls `ready` until it yields a value (blocking: for processes and raw sockets).
pub fn wait_until<T>(what: &str, mut ready: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = ready() {
            return v;
        }
        assert!(
            start.elapsed() < WAIT_LIMIT,
            "still waiting for {what} after {WAIT_LIMIT:?}"
        );
        std::thread::sleep(POLL);
    }
}

/// Polls `ready` until it yields a value (async: for gRPC calls).
pub async fn eventually<T, F, Fut>(what: &str, mut ready: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = ready().await {
            return v;
        }
        assert!(
            start.elapsed() < WAIT_LIMIT,
            "still waiting for {what} after {WAIT_LIMIT:?}"
        );
        tokio::time::sleep(POLL).await;
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

/// One `redis-server` on a free loopback port, with no persistence unless `extra` asks for it.
pub struct RedisServer {
    pub port: u16,
    child: Child,
    dir: PathBuf,
    extra: Vec<String>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> RedisServer {
        Self::start_in("redis", extra, false)
    }

    /// Starts on a free port (with a free cluster-bus port too, for `bus`) and a scratch dir.
    fn start_in(what: &str, extra: &[&str], bus: bool) -> RedisServer {
        require_redis();
        for _ in 0..5 {
            let (port, dir) = (free_port(bus), scratch_dir(what));
            if let Some(child) = Self::spawn(port, extra, &dir) {
                let extra = extra.iter().map(|a| a.to_string()).collect();
                return RedisServer {
                    port,
                    child,
                    dir,
                    extra,
                };
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
        panic!("could not start redis-server");
    }

    /// A redis-server on `port` in `dir`, once it answers PING; None when the port is taken
    /// meanwhile (or still closing after a kill).
    fn spawn(port: u16, extra: &[&str], dir: &Path) -> Option<Child> {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--dir", dir.to_str().unwrap()])
            .args(extra);
        let mut child = spawn_killed_with_parent(&mut cmd).ok()?;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = child.try_wait() {
                return None;
            }
            if raw_command(port, "PING").is_some_and(|r| r.starts_with("+PONG")) {
                return Some(child);
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

    /// Freezes the process (SIGSTOP): connections stay open and nothing answers, as on a
    /// stalled link or a host that stopped scheduling it. `resume` undoes it.
    pub fn freeze(&self) {
        signal(&self.child, libc::SIGSTOP);
    }

    /// Lets a frozen server run again (SIGCONT).
    pub fn resume(&self) {
        signal(&self.child, libc::SIGCONT);
    }

    /// Stops the server (as a crash would); `restart` brings it back on the same port.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port and directory (what it persisted, with
    /// `--appendonly yes` among its extra arguments, comes back), and waits until it answers.
    pub fn restart(&mut self) {
        self.kill();
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let (port, dir) = (self.port, &self.dir);
        let child = wait_until(&format!("redis-server back on port {port}"), || {
            Self::spawn(port, &extra, dir)
        });
        self.child = child;
    }
}

/// Sends `sig` to a child process that is still ours.
fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) with the pid of a child we have not reaped.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({}, {sig})", child.id());
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of three masters (no replicas), all slots assigned; `topology` adds one with
/// replicas (`start_with_replicas`).
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        Self::create(3, 0, 5000)
    }

    /// `masters` masters with `replicas` replicas each (`redis-cli --cluster create`), once every
    /// node sees `cluster_state:ok`.
    fn create(masters: usize, replicas: usize, node_timeout_ms: u32) -> RedisCluster {
        require_redis();
        // Each node has a directory of its own, so one config file name serves them all.
        let timeout = node_timeout_ms.to_string();
        let extra = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            &timeout,
        ];
        let nodes: Vec<RedisServer> = (0..masters * (1 + replicas))
            .map(|_| RedisServer::start_in("cluster", &extra, true))
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        for n in &nodes {
            wait_until("cluster_state:ok", || {
                raw_command(n.port, "CLUSTER INFO")
                    .is_some_and(|r| r.contains("cluster_state:ok"))
                    .then_some(())
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
    let what = format!("a connection to {endpoint}");
    eventually(&what, || async {
        Channel::from_shared(endpoint.to_owned())
            .unwrap()
            .connect()
            .await
            .ok()
    })
    .await
}

/// Each body once; one test per ledger (`memory::name`, `redis::name`, `cluster::name`): the
/// same behaviour on every backend, so the ledgers cannot drift.
#[allow(unused_macros)]
macro_rules! on_every_ledger {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $( #[tokio::test] async fn $name() { super::$name(super::Backend::Memory).await } )*
        }
        mod redis {
            $( #[tokio::test] async fn $name() { super::$name(super::Backend::Redis).await } )*
        }
        mod cluster {
            $( #[tokio::test] async fn $name() { super::$name(super::Backend::Cluster).await } )*
        }
    };
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
    /// The metrics and webhook listeners, where the settings asked for them.
    pub metrics: Option<SocketAddr>,
    pub webhook: Option<SocketAddr>,
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
        settings.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        tweak(&mut settings);
        // Bound here, so a test that sets `metrics_listen`/`webhook_listen` to port 0 learns
        // the port it got (no race for a port picked beforehand).
        let listeners = waquota::server::Listeners::bind(&settings)
            .await
            .expect("listeners");
        let bound = |l: &Option<tokio::net::TcpListener>| {
            l.as_ref().map(|l| l.local_addr().expect("bound address"))
        };
        let addr = listeners.grpc.local_addr().unwrap();
        let (metrics, webhook) = (bound(&listeners.metrics), bound(&listeners.webhook));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            waquota::server::serve(settings, listeners, async {
                let _ = stopped.await;
            })
            .await
            .expect("server");
        });
        TestServer {
            addr,
            metrics,
            webhook,
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
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port(false)));
            if let Some(child) = Self::spawn(addr, args, env) {
                return WaquotaProcess { addr, child };
            }
        }
        panic!("could not start waquota serve {args:?}");
    }

    /// Starts `waquota serve` on `addr` (a restart on the port a balancer knows), retrying
    /// while the port is still taken.
    pub fn start_on(addr: SocketAddr, args: &[&str]) -> WaquotaProcess {
        let child = wait_until(&format!("waquota serve on {addr}"), || {
            Self::spawn(addr, args, &[])
        });
        WaquotaProcess { addr, child }
    }

    /// `waquota serve` listening on `addr`; None if it exited or did not listen within 10 s.
    fn spawn(addr: SocketAddr, args: &[&str], env: &[(&str, &str)]) -> Option<Child> {
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
                return None;
            }
            if TcpStream::connect(addr).is_ok() {
                return Some(child);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Kills the process with SIGKILL (a crash: nothing drains) and reaps it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for WaquotaProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}
