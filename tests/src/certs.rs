//! Certificates for TLS tests, generated per test with rcgen: a CA, a server certificate for
//! localhost/127.0.0.1, and client certificates (mutual TLS) with a given common name.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};

/// A CA able to sign certificates.
pub struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pub cert_pem: PathBuf,
}

/// A certificate and its key, as PEM files.
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Ca {
    pub fn new(dir: &Path, name: &str) -> Ca {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
        let cert = params.self_signed(&key).expect("self-signed CA");
        let cert_pem = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&cert_pem, cert.pem()).expect("write CA");
        Ca { params, key, cert_pem }
    }

    fn sign(&self, dir: &Path, file: &str, mut params: CertificateParams, cn: &str) -> Pair {
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().expect("key");
        let issuer = Issuer::new(self.params.clone(), &self.key);
        let cert = params.signed_by(&key, &issuer).expect("sign");
        let pair = Pair { cert: dir.join(format!("{file}.pem")), key: dir.join(format!("{file}-key.pem")) };
        std::fs::write(&pair.cert, cert.pem()).expect("write cert");
        std::fs::write(&pair.key, key.serialize_pem()).expect("write key");
        pair
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self, dir: &Path, file: &str) -> Pair {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params.subject_alt_names.push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
        self.sign(dir, file, params, "localhost")
    }

    /// A client certificate with this common name.
    pub fn client(&self, dir: &Path, file: &str, cn: &str) -> Pair {
        let params = CertificateParams::new(Vec::<String>::new()).expect("params");
        self.sign(dir, file, params, cn)
    }
}
