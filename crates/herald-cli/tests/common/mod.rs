//! Helpers shared by the CLI's integration tests.

use std::process::Command;

/// The `herald` binary under test, without the developer's `HERALD_*` variables (they must
/// not leak into these runs).
pub(crate) fn herald() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_herald"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("HERALD_") {
            c.env_remove(k);
        }
    }
    c
}

/// TLS files for a test server, written as PEM in a directory: the server's certificate and
/// key, and what a client passes as `--ca-file` to trust it.
pub(crate) struct Pki {
    pub(crate) ca: std::path::PathBuf,
    pub(crate) cert: std::path::PathBuf,
    pub(crate) key: std::path::PathBuf,
}

impl Pki {
    /// A certificate for `localhost` and 127.0.0.1: self-signed (then it is its own
    /// `--ca-file`), or issued by a private CA (then the CA's certificate is).
    pub(crate) fn issue(dir: &std::path::Path, self_signed: bool) -> Self {
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let (cert, key, ca) = if self_signed {
            let certified = rcgen::generate_simple_self_signed(names).expect("self-signed certificate");
            let pem = certified.cert.pem();
            (pem.clone(), certified.key_pair.serialize_pem(), pem)
        } else {
            let ca_key = rcgen::KeyPair::generate().expect("ca key");
            let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            ca_params.distinguished_name.push(rcgen::DnType::CommonName, "Herald test CA");
            let ca = ca_params.self_signed(&ca_key).expect("ca certificate");
            let key = rcgen::KeyPair::generate().expect("key");
            let cert = rcgen::CertificateParams::new(names)
                .expect("params")
                .signed_by(&key, &ca, &ca_key)
                .expect("certificate");
            (cert.pem(), key.serialize_pem(), ca.pem())
        };
        let pki = Self { ca: dir.join("ca.pem"), cert: dir.join("cert.pem"), key: dir.join("key.pem") };
        std::fs::write(&pki.cert, cert).expect("write cert");
        std::fs::write(&pki.key, key).expect("write key");
        if !self_signed {
            std::fs::write(&pki.ca, ca).expect("write ca");
        } else {
            std::fs::copy(&pki.cert, &pki.ca).expect("copy cert");
        }
        pki
    }

    /// `--tls-cert CERT --tls-key KEY` for `herald serve`.
    pub(crate) fn serve_args(&self) -> Vec<String> {
        let path = |p: &std::path::Path| p.to_str().expect("utf-8 temp path").to_owned();
        vec!["--tls-cert".into(), path(&self.cert), "--tls-key".into(), path(&self.key)]
    }
}
