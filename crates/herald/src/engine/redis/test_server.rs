//! A throwaway `redis-server` for tests: a free port on 127.0.0.1, its own data directory,
//! no persistence; killed (and its directory removed) when dropped. With [`RedisServer::start_tls`]
//! it speaks only TLS (Debian's `redis-server` is built with TLS).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    tls: Option<Tls>,
}

/// PEM files for a TLS server: its certificate and key, and the CA whose certificates it
/// accepts from clients.
#[derive(Debug, Clone)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl RedisServer {
    /// Starts one; fails when `redis-server` is not installed (`apt-get install -y
    /// redis-server`) or does not come up within 10 s.
    pub fn start() -> std::io::Result<Self> {
        Self::start_with(None::<fn(&std::path::Path) -> std::io::Result<Tls>>)
    }

    /// Starts one that accepts TLS only, on its port, and asks clients for a certificate
    /// signed by `tls.ca`. `pki` writes the PEM files into the server's directory (removed
    /// with it).
    pub fn start_tls(pki: impl FnOnce(&std::path::Path) -> std::io::Result<Tls>) -> std::io::Result<Self> {
        Self::start_with(Some(pki))
    }

    fn start_with(pki: Option<impl FnOnce(&std::path::Path) -> std::io::Result<Tls>>) -> std::io::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = std::env::temp_dir().join(format!("herald-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let tls = pki.map(|f| f(&dir)).transpose()?;
        let mut s = Self { port, dir, child: None, tls };
        s.resume()?;
        Ok(s)
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Kills the server (as a crash would).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port, empty.
    pub fn resume(&mut self) -> std::io::Result<()> {
        let port = self.port.to_string();
        let mut cmd = Command::new("redis-server");
        match &self.tls {
            None => cmd.args(["--port", &port]),
            Some(t) => cmd
                .args(["--port", "0", "--tls-port", &port])
                .arg("--tls-cert-file")
                .arg(&t.cert)
                .arg("--tls-key-file")
                .arg(&t.key)
                .arg("--tls-ca-cert-file")
                .arg(&t.ca),
        };
        let child = cmd
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                std::io::Error::new(e.kind(), format!("redis-server: {e} (apt-get install -y redis-server)"))
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            #[allow(clippy::disallowed_methods)] // a blocking test helper, not async code
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "redis-server did not start"))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
