//! The transport of the vSphere provider: HTTPS (HTTP/1.1 through hyper, TLS through rustls) and
//! the vSphere Web Services SOAP envelope, with the session cookie vCenter and ESXi hand out at
//! login.
//!
//! Everything that comes back is hostile: responses are read up to a bound, documents with a DTD
//! are refused before parsing, and texts are escaped by the callers before they are printed.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};

use hyperfarm_shared::text::{Esc, markup_escape};

/// Largest SOAP response read (an inventory's properties, a VM's devices).
pub const MAX_RESPONSE: usize = 64 << 20;
/// How long a connection may take to open (TCP and TLS).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long one SOAP call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Why talking to vSphere failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VsError {
    /// The server cannot be reached.
    #[error("{0}")]
    Connect(String),
    /// The server's certificate is not trusted (no retry helps).
    #[error("{0}")]
    Tls(String),
    /// The user name or password was refused.
    #[error("{0}")]
    Login(String),
    /// The server answered with a SOAP fault: its type (`InvalidPowerState`…) and text.
    #[error("{kind}: {message}")]
    Fault { kind: String, message: String },
    /// The server answered something that is not the vSphere API.
    #[error("{0}")]
    Protocol(String),
}

impl VsError {
    pub fn fault_kind(&self) -> Option<&str> {
        match self {
            VsError::Fault { kind, .. } => Some(kind),
            _ => None,
        }
    }
}

/// How the server's certificate is checked.
#[derive(Debug, Clone)]
pub enum Trust {
    /// The system's CA certificates.
    System,
    /// Only the CAs in this PEM file.
    CaFile(std::path::PathBuf),
    /// No check at all (`--insecure`).
    Insecure,
}

/// The certificate check `trust` asks for.
pub fn verifier(trust: &Trust) -> Result<Arc<dyn rustls::client::danger::ServerCertVerifier>, VsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = match trust {
        Trust::Insecure => return Ok(Arc::new(NoCheck(provider))),
        Trust::CaFile(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in read_pem_certs(path)? {
                roots.add(c).map_err(|e| VsError::Connect(format!("CA file {}: {e}", Esc(path))))?;
            }
            roots
        }
        Trust::System => {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(VsError::Connect(
                    "no CA certificates found on this system to check the vSphere server's certificate; give --ca-file FILE (the vCenter's CA), or --insecure".into(),
                ));
            }
            roots
        }
    };
    let v = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| VsError::Connect(format!("TLS: {e}")))?;
    Ok(v)
}

/// TLS whose certificate check is `v`.
fn config_with(v: Arc<dyn rustls::client::danger::ServerCertVerifier>) -> Result<Arc<rustls::ClientConfig>, VsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| VsError::Connect(format!("TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(v)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The TLS settings for `trust`, and its check (kept for the hosts a lease names).
pub fn tls_config(trust: &Trust) -> Result<Tls, VsError> {
    let v = verifier(trust)?;
    Ok(Tls { config: config_with(v.clone())?, verifier: v, insecure: matches!(trust, Trust::Insecure), pinned: false })
}

/// TLS settings and the certificate check they use.
#[derive(Clone)]
pub struct Tls {
    pub config: Arc<rustls::ClientConfig>,
    verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>,
    insecure: bool,
    /// Also accepts the certificate of a lease's `sslThumbprint`.
    pinned: bool,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("insecure", &self.insecure).field("pinned", &self.pinned).finish()
    }
}

impl Tls {
    /// For a host a lease names with the fingerprint of its certificate (`sslThumbprint`,
    /// received over the authenticated session: how vCenter tells its clients which ESXi
    /// certificate to expect): that certificate is accepted, and so is one the configured trust
    /// accepts (an ESXi certificate renewed since vCenter noted its fingerprint). `--insecure`
    /// checks nothing, as for the server.
    pub fn pinned(&self, thumbprint: &str) -> Result<Tls, VsError> {
        if self.insecure {
            return Ok(self.clone());
        }
        let want: Vec<u8> =
            thumbprint.split(':').map(|h| u8::from_str_radix(h.trim(), 16)).collect::<Result<_, _>>().map_err(
                |_| VsError::Protocol(format!("the lease's certificate thumbprint {} is not hex", Esc(thumbprint))),
            )?;
        if want.len() != 20 && want.len() != 32 {
            return Err(VsError::Protocol(format!(
                "the lease's certificate thumbprint {} is neither a SHA-1 nor a SHA-256 fingerprint",
                Esc(thumbprint)
            )));
        }
        let v: Arc<dyn rustls::client::danger::ServerCertVerifier> =
            Arc::new(Pinned { fingerprint: want, trust: self.verifier.clone() });
        Ok(Tls { config: config_with(v.clone())?, verifier: v, insecure: false, pinned: true })
    }
}

/// Accepts the certificate of the given fingerprint, or one `trust` accepts; handshake signatures
/// are checked by `trust`.
#[derive(Debug)]
struct Pinned {
    fingerprint: Vec<u8>,
    trust: Arc<dyn rustls::client::danger::ServerCertVerifier>,
}

impl rustls::client::danger::ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let der = end_entity.as_ref();
        let matches = if self.fingerprint.len() == 20 {
            use sha1::Digest;
            sha1::Sha1::digest(der).as_slice() == self.fingerprint.as_slice()
        } else {
            use sha2::Digest;
            sha2::Sha256::digest(der).as_slice() == self.fingerprint.as_slice()
        };
        if matches {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        }
        self.trust.verify_server_cert(end_entity, intermediates, name, ocsp, now).map_err(|e| {
            rustls::Error::General(format!(
                "the certificate is neither the one vSphere named for this host (sslThumbprint) nor trusted ({e})"
            ))
        })
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.trust.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.trust.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.trust.supported_verify_schemes()
    }
}

fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, VsError> {
    let bytes = hyperfarm_shared::fsx::read_bounded(path, 4 << 20)
        .map_err(|e| VsError::Connect(format!("CA file {}: {e}", Esc(path))))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| VsError::Connect(format!("CA file {}: {e}", Esc(path))))?;
    if certs.is_empty() {
        return Err(VsError::Connect(format!("CA file {}: no PEM certificate in it", Esc(path))));
    }
    Ok(certs)
}

/// `--insecure`: any certificate is accepted; signatures are still checked, so the session is
/// at least encrypted to whoever answered.
#[derive(Debug)]
struct NoCheck(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoCheck {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Where the server is.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    /// `/sdk`.
    pub path: String,
    pub tls: Tls,
}

impl Endpoint {
    /// `host:port`, as it goes into URLs and the `Host` header.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// A new HTTPS connection to the server.
    pub async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, VsError> {
        let open = async {
            let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| VsError::Connect(format!("cannot connect to {}: {e}", self.authority())))?;
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from(self.host.clone())
                .map_err(|e| VsError::Connect(format!("{}: {e}", Esc(&self.host))))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.config.clone()).connect(name, tcp).await.map_err(|e| {
                let m = e.to_string();
                if !m.contains("certificate") && !m.contains("sslThumbprint") {
                    return VsError::Connect(format!("TLS with {}: {e}", self.authority()));
                }
                let hint = if self.tls.pinned {
                    "; the host a vSphere export lease named presented another certificate than vSphere said: check that host (or give --ca-file with the CA that signed its certificate)"
                } else {
                    "; the server's certificate is not trusted: give --ca-file FILE with the CA that signed it (GOVC_TLS_CA_CERTS), or --insecure (GOVC_INSECURE=1) to skip the check"
                };
                VsError::Tls(format!("TLS with {}: {e}{hint}", self.authority()))
            })?;
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| VsError::Connect(format!("HTTP with {}: {e}", self.authority())))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(send)
        };
        tokio::time::timeout(CONNECT_TIMEOUT, open).await.map_err(|_| {
            VsError::Connect(format!("no answer from {} in {}s", self.authority(), CONNECT_TIMEOUT.as_secs()))
        })?
    }

    /// Where a URL the server gave (a lease's device URL) is: the endpoint to download it from,
    /// its path, and whether the session cookie goes with it. Host `*` (ESXi) or the server
    /// logged into: this endpoint, with the cookie. Another host (vCenter names the ESXi host that
    /// serves the disk): that host, its certificate pinned to the `thumbprint` vSphere gave (else
    /// checked like the server's), without the cookie (the URL's ticket is its authority).
    pub fn target(&self, url: &str, thumbprint: Option<&str>) -> Result<(Endpoint, String, bool), VsError> {
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| VsError::Protocol(format!("the device URL {} is not an https:// URL", Esc(url))))?;
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if path.is_empty() || !path.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(VsError::Protocol(format!("the device URL {} has no usable path", Esc(url))));
        }
        if authority.contains('@') {
            return Err(VsError::Protocol(format!("the device URL {} holds credentials; refused", Esc(url))));
        }
        let (host, port) = split_authority(authority)
            .ok_or_else(|| VsError::Protocol(format!("the device URL {} has no usable host", Esc(url))))?;
        if host == "*" || host.eq_ignore_ascii_case(&self.host) {
            let mut ep = self.clone();
            if host != "*" {
                ep.port = port.unwrap_or(self.port);
            }
            return Ok((ep, path.to_string(), true));
        }
        let tls = match thumbprint.filter(|t| !t.is_empty()) {
            Some(t) => self.tls.pinned(t)?,
            None => self.tls.clone(),
        };
        Ok((Endpoint { host, port: port.unwrap_or(443), path: self.path.clone(), tls }, path.to_string(), false))
    }
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`: the host (without brackets) and the port if given.
fn split_authority(a: &str) -> Option<(String, Option<u16>)> {
    let (host, port) = if let Some(r) = a.strip_prefix('[') {
        let (h, rest) = r.split_once(']')?;
        (h, rest.strip_prefix(':'))
    } else if a.matches(':').count() > 1 {
        return None;
    } else {
        match a.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (a, None),
        }
    };
    let port = match port {
        Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p > 0)?),
        None => None,
    };
    let ok = !host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:_*".contains(&b));
    ok.then(|| (host.to_string(), port))
}

/// A SOAP session: one kept-alive connection (re-opened when it breaks) and the session cookie.
pub struct Soap {
    pub ep: Endpoint,
    conn: tokio::sync::Mutex<Option<SendRequest<Full<Bytes>>>>,
    cookie: std::sync::Mutex<Option<String>>,
}

/// The vim25 namespace and the version the requests are written for (6.5: every call used here
/// exists there, and vCenter/ESXi 6.5 to 8 accept it).
const SOAP_ACTION: &str = "urn:vim25/6.5";

impl Soap {
    pub fn new(ep: Endpoint) -> Soap {
        Soap { ep, conn: tokio::sync::Mutex::new(None), cookie: std::sync::Mutex::new(None) }
    }

    /// The session cookie, for downloads.
    pub fn cookie(&self) -> Option<String> {
        self.cookie.lock().map(|c| c.clone()).unwrap_or(None)
    }

    /// Call one method: `body` is its element (`<Login xmlns="urn:vim25">…</Login>`). Returns the
    /// response document's text; a SOAP fault is an error with its type.
    pub async fn call(&self, body: &str) -> Result<String, VsError> {
        let envelope = format!(
            r#"<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>{body}</soapenv:Body></soapenv:Envelope>"#
        );
        tokio::time::timeout(CALL_TIMEOUT, self.exchange(envelope)).await.map_err(|_| {
            VsError::Connect(format!("{} did not answer a call in {}s", self.ep.authority(), CALL_TIMEOUT.as_secs()))
        })?
    }

    async fn exchange(&self, envelope: String) -> Result<String, VsError> {
        let mut guard = self.conn.lock().await;
        // One retry on a fresh connection when a kept-alive one was closed by the server.
        for attempt in 0..2 {
            let reused = guard.is_some();
            let send = match guard.as_mut() {
                Some(s) if !s.is_closed() => s,
                _ => guard.insert(self.ep.connect().await?),
            };
            if send.ready().await.is_err() {
                *guard = None;
                continue;
            }
            let mut req = hyper::Request::post(&self.ep.path)
                .header(hyper::header::HOST, self.ep.authority())
                .header(hyper::header::CONTENT_TYPE, "text/xml; charset=utf-8")
                .header("SOAPAction", SOAP_ACTION)
                .header(hyper::header::USER_AGENT, concat!("hyperexport/", env!("CARGO_PKG_VERSION")));
            if let Some(c) = self.cookie() {
                req = req.header(hyper::header::COOKIE, c);
            }
            let req = req
                .body(Full::new(Bytes::from(envelope.clone())))
                .map_err(|e| VsError::Protocol(format!("request: {e}")))?;
            let resp = match send.try_send_request(req).await {
                Ok(r) => r,
                // Sent again only when hyper says the request never left (a kept-alive connection
                // the server had closed): calls that change things (ExportVm, CreateSnapshot)
                // must not run twice.
                Err(mut e) => {
                    *guard = None;
                    if reused && attempt == 0 && e.take_message().is_some() {
                        tracing::debug!("vSphere connection closed ({}); reconnecting", e.error());
                        continue;
                    }
                    return Err(VsError::Connect(format!("{}: {}", self.ep.authority(), e.error())));
                }
            };
            for v in resp.headers().get_all(hyper::header::SET_COOKIE) {
                if let Ok(v) = v.to_str()
                    && let Some(pair) = v.split(';').next()
                    && pair.trim_start().starts_with("vmware_soap_session=")
                    && let Ok(mut c) = self.cookie.lock()
                {
                    *c = Some(pair.trim().to_string());
                }
            }
            let status = resp.status();
            let text = read_bounded(resp.into_body(), MAX_RESPONSE).await.inspect_err(|_| *guard = None)?;
            let text = String::from_utf8(text).map_err(|_| {
                VsError::Protocol(format!("{} answered with text that is not UTF-8", self.ep.authority()))
            })?;
            if let Some(fault) = parse_fault(&text) {
                return Err(fault);
            }
            if !status.is_success() {
                return Err(VsError::Protocol(format!(
                    "{} answered HTTP {status}: {}; is {} a vCenter or ESXi SDK endpoint?",
                    self.ep.authority(),
                    Esc(&hyperfarm_shared::text::bounded(&text, 200)),
                    self.ep.path
                )));
            }
            return Ok(text);
        }
        Err(VsError::Connect(format!("{}: the connection keeps closing", self.ep.authority())))
    }
}

/// Read a response body, at most `max` bytes.
pub async fn read_bounded(mut body: hyper::body::Incoming, max: usize) -> Result<Vec<u8>, VsError> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| VsError::Connect(format!("reading the answer: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > max {
                return Err(VsError::Protocol(format!("the answer is larger than {max} bytes")));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

/// Parse a response; documents with a DTD (entity tricks) are refused.
pub fn parse(text: &str) -> Result<roxmltree::Document<'_>, VsError> {
    if text.contains("<!DOCTYPE") || text.contains("<!ENTITY") {
        return Err(VsError::Protocol("the server's answer holds a DTD; refused".into()));
    }
    roxmltree::Document::parse(text).map_err(|e| VsError::Protocol(format!("the server's answer is not XML: {e}")))
}

fn parse_fault(text: &str) -> Option<VsError> {
    if !text.contains("Fault") {
        return None;
    }
    let doc = parse(text).ok()?;
    let fault = doc.descendants().find(|n| n.has_tag_name(("http://schemas.xmlsoap.org/soap/envelope/", "Fault")))?;
    let message = child_text(fault, "faultstring").unwrap_or_default().to_string();
    let kind = fault
        .children()
        .find(|n| n.tag_name().name() == "detail")
        .and_then(|d| d.children().find(|n| n.is_element()))
        .map(|n| {
            xsi_type(n).map(str::to_string).unwrap_or_else(|| n.tag_name().name().trim_end_matches("Fault").to_string())
        })
        .unwrap_or_else(|| "ServerFault".to_string());
    if kind == "InvalidLogin" {
        return Some(VsError::Login(message));
    }
    Some(VsError::Fault { kind, message })
}

/// The `xsi:type` of an element, without a namespace prefix.
pub fn xsi_type<'a>(n: roxmltree::Node<'a, '_>) -> Option<&'a str> {
    n.attribute(("http://www.w3.org/2001/XMLSchema-instance", "type")).map(|t| t.rsplit(':').next().unwrap_or(t))
}

/// The text of the first child element named `name`.
pub fn child_text<'a>(n: roxmltree::Node<'a, '_>, name: &str) -> Option<&'a str> {
    n.children().find(|c| c.is_element() && c.tag_name().name() == name).and_then(|c| c.text())
}

/// The first child element named `name`.
pub fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children().find(|c| c.is_element() && c.tag_name().name() == name)
}

/// The method's `returnval` elements.
pub fn returnvals<'a, 'i>(doc: &'a roxmltree::Document<'i>) -> impl Iterator<Item = roxmltree::Node<'a, 'i>> {
    doc.descendants().filter(|n| n.is_element() && n.tag_name().name() == "returnval")
}

/// A managed object reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MoRef {
    pub kind: String,
    pub value: String,
}

impl MoRef {
    pub fn new(kind: &str, value: &str) -> MoRef {
        MoRef { kind: kind.to_string(), value: value.to_string() }
    }
    /// From an element holding a reference (`<returnval type="VirtualMachine">vm-42</returnval>`).
    pub fn of(n: roxmltree::Node<'_, '_>) -> Option<MoRef> {
        // `type` without a namespace: not `xsi:type`, which a property's value also carries.
        let kind = n.attributes().find(|a| a.name() == "type" && a.namespace().is_none())?.value();
        Some(MoRef { kind: kind.to_string(), value: n.text()?.trim().to_string() })
    }
    /// The element `name` holding this reference, as a request argument.
    pub fn xml(&self, name: &str) -> String {
        format!(r#"<{name} type="{}">{}</{name}>"#, markup_escape(&self.kind), markup_escape(&self.value))
    }
}

impl std::fmt::Display for MoRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.kind, Esc(&self.value))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_typed() {
        let t = r#"<?xml version="1.0"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>Cannot complete login due to an incorrect user name or password.</faultstring><detail><InvalidLoginFault xmlns="urn:vim25" xsi:type="InvalidLogin"></InvalidLoginFault></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>"#;
        assert!(matches!(parse_fault(t), Some(VsError::Login(m)) if m.contains("incorrect")));
        let t = t.replace("xsi:type=\"InvalidLogin\"", "xsi:type=\"InvalidPowerState\"");
        assert_eq!(parse_fault(&t).unwrap().fault_kind(), Some("InvalidPowerState"));
        assert!(parse_fault("<x>no fault</x>").is_none());
    }

    #[test]
    fn references_take_the_plain_type_attribute() {
        let t = r#"<val xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:type="ManagedObjectReference" type="Folder">group-v3</val>"#;
        let doc = roxmltree::Document::parse(t).unwrap();
        assert_eq!(MoRef::of(doc.root_element()), Some(MoRef::new("Folder", "group-v3")));
    }

    #[test]
    fn dtds_are_refused() {
        let t = r#"<?xml version="1.0"?><!DOCTYPE a [<!ENTITY b "c">]><a>&b;</a>"#;
        assert!(matches!(parse(t), Err(VsError::Protocol(_))));
    }

    #[test]
    fn device_urls_stay_on_the_server() {
        let ep = Endpoint {
            host: "vc.example".into(),
            port: 443,
            path: "/sdk".into(),
            // The system's CAs (Debian's ca-certificates): a lease's thumbprint is checked.
            tls: tls_config(&Trust::System).unwrap(),
        };
        let (e, p, cookie) = ep.target("https://*/nfc/52a/disk-0.vmdk", None).unwrap();
        assert_eq!((e.host.as_str(), p.as_str(), cookie), ("vc.example", "/nfc/52a/disk-0.vmdk", true));
        let (_, p, cookie) = ep.target("https://VC.example:443/nfc/x/d.vmdk", None).unwrap();
        assert_eq!((p.as_str(), cookie), ("/nfc/x/d.vmdk", true));
        // vCenter names the ESXi host: that host, no cookie, its certificate pinned.
        let tp = "AB:".repeat(19) + "AB";
        let (e, _, cookie) = ep.target("https://esx01.example:902/nfc/t/d.vmdk", Some(&tp)).unwrap();
        assert_eq!((e.host.as_str(), e.port, cookie), ("esx01.example", 902, false));
        let (e, _, _) = ep.target("https://[fe80::1]/nfc/t/d.vmdk", None).unwrap();
        assert_eq!((e.host.as_str(), e.port), ("fe80::1", 443));
        assert!(ep.target("https://esx01/nfc/x", Some("zz")).is_err(), "a bad thumbprint");
        assert!(ep.target("ftp://*/x", None).is_err());
        assert!(ep.target("http://*/x", None).is_err());
        assert!(ep.target("https://*/a b", None).is_err());
        assert!(ep.target("https://u:p@host/x", None).is_err());
    }
}
