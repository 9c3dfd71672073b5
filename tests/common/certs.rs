//! Test certificates made with the `openssl` command: a CA of its own, a server certificate for
//! 127.0.0.1 and a client certificate, all signed by that CA, in a scratch directory removed on
//! drop.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct TestCerts {
    pub dir: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl is not installed: run ./scripts/test, which installs it");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A key and a certificate `<name>.key`/`<name>.pem` signed by the CA, with `extensions`.
fn signed(dir: &Path, name: &str, subject: &str, extensions: &str) {
    let (key, csr, pem, ext) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
        format!("{name}.cnf"),
    );
    #[rustfmt::skip]
    openssl(dir, &["req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", subject]);
    std::fs::write(dir.join(&ext), extensions).unwrap();
    #[rustfmt::skip]
    openssl(dir, &["x509", "-req", "-in", &csr, "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                   "-out", &pem, "-days", "2", "-extfile", &ext]);
}

impl TestCerts {
    pub fn generate() -> TestCerts {
        let dir = super::scratch_dir("certs");
        #[rustfmt::skip]
        openssl(&dir, &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
                        "-days", "2", "-subj", "/CN=waquota test CA"]);
        signed(
            &dir,
            "server",
            "/CN=127.0.0.1",
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        );
        signed(
            &dir,
            "client",
            "/CN=waquota operator",
            "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
        );
        TestCerts { dir }
    }

    pub fn path(&self, file: &str) -> String {
        self.dir.join(file).to_str().unwrap().to_owned()
    }

    pub fn read(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(file)).unwrap()
    }
}

impl Drop for TestCerts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
