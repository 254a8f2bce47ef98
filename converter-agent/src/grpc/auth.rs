//! Who may make control calls (CancelJob).
//!
//! A caller may control when any of these holds:
//! - it sends `authorization: Bearer <token>` matching the agent's `control_token_file`;
//! - it connected with a client certificate (mutual TLS) whose subject CN or a DNS SAN is listed
//!   in `control_clients`;
//! - it connected over loopback and `control_from_loopback` is true (the default): a local
//!   operator using `hyperctl` on the conversion host.
//!
//! Everyone who can connect may read (status, jobs, watch). Connecting beyond loopback already
//! needs TLS (and mutual TLS when `tls_client_ca` is set).

use std::path::Path;

use tonic::{Request, Status};

/// The control policy, loaded once at start-up.
#[derive(Debug, Clone, Default)]
pub struct ControlPolicy {
    token: Option<String>,
    clients: Vec<String>,
    from_loopback: bool,
}

impl ControlPolicy {
    pub fn load(token_file: Option<&Path>, clients: &[String], from_loopback: bool) -> Result<Self, String> {
        let token = match token_file {
            Some(p) => {
                let t = std::fs::read_to_string(p).map_err(|e| format!("control_token_file {}: {e}", p.display()))?;
                let t = t.trim().to_string();
                if t.len() < 16 {
                    return Err(format!(
                        "control_token_file {}: the token must be at least 16 characters",
                        p.display()
                    ));
                }
                Some(t)
            }
            None => None,
        };
        Ok(ControlPolicy { token, clients: clients.to_vec(), from_loopback })
    }

    /// Whether this request may control jobs, and if not, why.
    pub fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        if self.allows(req) {
            Ok(())
        } else {
            Err(Status::permission_denied(
                "this client may not control jobs: send `authorization: Bearer <token>` with the agent's control token, \
                 connect with a client certificate named in control_clients, or call from the agent's host (loopback)",
            ))
        }
    }

    pub fn allows<T>(&self, req: &Request<T>) -> bool {
        if let Some(token) = &self.token
            && let Some(v) = req.metadata().get("authorization").and_then(|v| v.to_str().ok())
            && let Some(given) = bearer(v)
            && constant_time_eq(given.as_bytes(), token.as_bytes())
        {
            return true;
        }
        if !self.clients.is_empty()
            && let Some(certs) = req.peer_certs()
            && let Some(leaf) = certs.first()
            && cert_names(leaf.as_ref()).iter().any(|n| self.clients.iter().any(|c| c == n))
        {
            return true;
        }
        // A dual-stack `[::]` listener sees 127.0.0.1 as ::ffff:127.0.0.1: still loopback.
        self.from_loopback && req.remote_addr().is_some_and(|a| super::conn::is_loopback(a.ip()))
    }
}

/// The token of an `Authorization: Bearer <token>` value; the scheme is case-insensitive (RFC 6750
/// via RFC 7235).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.trim().split_once(char::is_whitespace)?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// The subject CN and DNS SANs of a DER certificate.
pub fn cert_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else { return vec![] };
    let mut names: Vec<String> =
        cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok().map(str::to_string)).collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_string());
            }
        }
    }
    names
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_compared_exactly() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        let d = tempfile::tempdir().expect("tempdir");
        let f = d.path().join("t");
        std::fs::write(&f, "short").expect("write");
        assert!(ControlPolicy::load(Some(&f), &[], true).is_err());
        std::fs::write(&f, "0123456789abcdef0123\n").expect("write");
        let p = ControlPolicy::load(Some(&f), &[], false).expect("load");
        let mut req = Request::new(());
        assert!(!p.allows(&req));
        req.metadata_mut().insert("authorization", "Bearer 0123456789abcdef0123".parse().expect("ascii"));
        assert!(p.allows(&req));
        req.metadata_mut().insert("authorization", "Bearer wrong-token-wrong-token".parse().expect("ascii"));
        assert!(!p.allows(&req));
        for scheme in ["bearer", "BEARER", "BeArEr"] {
            req.metadata_mut()
                .insert("authorization", format!("{scheme} 0123456789abcdef0123").parse().expect("ascii"));
            assert!(p.allows(&req), "{scheme}");
        }
        req.metadata_mut().insert("authorization", "Basic 0123456789abcdef0123".parse().expect("ascii"));
        assert!(!p.allows(&req));
    }

    #[test]
    fn mapped_loopback_callers_may_control() {
        use tonic::transport::server::TcpConnectInfo;
        let p = ControlPolicy::load(None, &[], true).expect("load");
        let from = |addr: &str| {
            let mut req = Request::new(());
            req.extensions_mut()
                .insert(TcpConnectInfo { local_addr: None, remote_addr: Some(addr.parse().expect("addr")) });
            req
        };
        assert!(p.allows(&from("127.0.0.1:4000")));
        assert!(p.allows(&from("[::ffff:127.0.0.1]:4000")), "dual-stack listener, IPv4 loopback client");
        assert!(p.allows(&from("[::1]:4000")));
        assert!(!p.allows(&from("[::ffff:10.1.2.3]:4000")));
        assert!(!p.allows(&from("10.1.2.3:4000")));
    }
}
