//! Dialing an agent: the endpoint (URL, TLS, mutual TLS, control token) every client uses.

use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::v1 as pb;
use crate::v1::agent_service_client::AgentServiceClient;

/// How to reach an agent.
#[derive(Debug, Clone)]
pub struct AgentEndpoint {
    pub url: String,
    /// PEM CA that signed the agent's certificate.
    pub ca: Option<PathBuf>,
    /// PEM client certificate and key, for agents that require mutual TLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// TLS server name, when it differs from the URL's host.
    pub domain: Option<String>,
    pub connect_timeout: Duration,
    /// Bearer token sent with control calls.
    pub token: Option<String>,
}

/// The default address of a local agent.
pub const DEFAULT_AGENT_URL: &str = "http://127.0.0.1:50071";

impl AgentEndpoint {
    pub fn new(url: impl Into<String>) -> Self {
        AgentEndpoint {
            url: url.into(),
            ca: None,
            cert: None,
            key: None,
            domain: None,
            connect_timeout: Duration::from_secs(2),
            token: None,
        }
    }

    /// Connect (bounded by `connect_timeout`).
    pub async fn connect(&self) -> Result<AgentServiceClient<Channel>, String> {
        let mut ep = Endpoint::from_shared(self.url.clone())
            .map_err(|e| format!("agent URL {:?}: {e}", self.url))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        if self.url.starts_with("https://") || self.ca.is_some() {
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = &self.ca {
                let pem = std::fs::read(ca).map_err(|e| format!("agent CA {}: {e}", ca.display()))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            if let (Some(c), Some(k)) = (&self.cert, &self.key) {
                let cert = std::fs::read(c).map_err(|e| format!("client certificate {}: {e}", c.display()))?;
                let key = std::fs::read(k).map_err(|e| format!("client key {}: {e}", k.display()))?;
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            if let Some(d) = &self.domain {
                tls = tls.domain_name(d.clone());
            }
            ep = ep.tls_config(tls).map_err(|e| format!("TLS: {e}"))?;
        }
        let channel = tokio::time::timeout(self.connect_timeout, ep.connect())
            .await
            .map_err(|_| format!("no answer from {} within {:?}", self.url, self.connect_timeout))?
            .map_err(|e| format!("cannot connect to {}: {}", self.url, error_chain(&e)))?;
        Ok(AgentServiceClient::new(channel))
    }

    /// A request carrying the control token, if one is configured.
    pub fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(t) = &self.token
            && let Ok(v) = format!("Bearer {t}").parse()
        {
            req.metadata_mut().insert("authorization", v);
        }
        req.set_timeout(Duration::from_secs(30));
        req
    }

    /// The agent's status, or why it could not be had.
    pub async fn status(&self) -> Result<pb::AgentStatus, String> {
        let mut c = self.connect().await?;
        let mut req = self.request(pb::GetStatusRequest {});
        req.set_timeout(self.connect_timeout.max(Duration::from_secs(2)));
        c.get_status(req)
            .await
            .map(|r| r.into_inner())
            .map_err(|s| format!("{} answered {}: {}", self.url, s.code(), s.message()))
    }
}

/// An error with its sources, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}
