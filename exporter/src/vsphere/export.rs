//! Exporting a VM's disks through the vSphere API, the way vSphere clients do: `ExportVm` (or
//! `ExportSnapshot` of a snapshot taken for it) gives an `HttpNfcLease`; once it is ready, each
//! disk is downloaded over HTTPS from the lease's device URLs, while `HttpNfcLeaseProgress` keeps
//! the lease alive; `HttpNfcLeaseComplete` ends it, `HttpNfcLeaseAbort` releases it on failure or
//! cancel.
//!
//! Each disk is written to a new file and hashed (blake3) as its bytes arrive. A transfer that
//! breaks is resumed with an HTTP `Range` request from the first byte not yet written (the file
//! and the hash state already hold exactly the bytes before it), at most `retries` times; a server
//! that does not resume (answers 200) starts the disk over.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::sync::watch;

use hyperfarm_shared::text::Esc;

use super::inventory::{self, ServiceContent, VmFacts};
use super::soap::{self, MoRef, Soap, VsError, child, child_text, returnvals};
use crate::copy::Control;

/// How an export runs.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// How often the lease is renewed with its progress.
    pub keepalive: Duration,
    /// How many times a broken transfer is resumed.
    pub retries: u32,
    /// Largest disk accepted (bytes downloaded).
    pub max_disk: u64,
    /// How long a transfer may stay silent.
    pub stall: Duration,
}

/// A device URL of a lease.
#[derive(Debug, Clone)]
pub struct DeviceUrl {
    pub key: String,
    pub url: String,
    pub target: String,
    pub size: Option<u64>,
    /// SHA-1 fingerprint of the certificate of the host the URL names (vCenter's leases).
    pub thumbprint: Option<String>,
}

/// A disk written to a file.
#[derive(Debug, Clone)]
pub struct Downloaded {
    pub path: PathBuf,
    pub bytes: u64,
    pub blake3: [u8; 32],
    /// Transfers resumed after a break.
    pub resumed: u32,
}

/// Why an export stopped.
#[derive(Debug)]
pub enum ExportFailure {
    Vs(VsError),
    /// Writing the file failed.
    Io(String),
    /// The disk is larger than `--max-disk-size`.
    TooLarge(String),
    /// The lease ended (expired, aborted by someone else) under the download.
    Lease(String),
    /// Ctrl-C / SIGTERM / cancel.
    Cancelled,
}

impl From<VsError> for ExportFailure {
    fn from(e: VsError) -> Self {
        ExportFailure::Vs(e)
    }
}

/// A lease in use.
pub struct Lease {
    pub moref: MoRef,
    pub urls: Vec<DeviceUrl>,
    /// How long vSphere keeps the lease without progress.
    pub timeout: Option<Duration>,
}

/// Ask for the export lease of `entity` (the VM, or a snapshot of it) and wait until it is ready.
/// Once vSphere has given the lease, every way out but success releases it.
pub async fn open_lease(s: &Soap, sc: &ServiceContent, entity: &MoRef, ctl: &Control) -> Result<Lease, ExportFailure> {
    let method = if entity.kind == "VirtualMachineSnapshot" { "ExportSnapshot" } else { "ExportVm" };
    let text = s.call(&format!(r#"<{method} xmlns="urn:vim25">{}</{method}>"#, entity.xml("_this"))).await?;
    let moref = returnvals(&soap::parse(&text)?)
        .next()
        .and_then(MoRef::of)
        .ok_or_else(|| VsError::Protocol(format!("{method} gave no lease")))?;
    let r = wait_ready(s, sc, &moref, ctl).await;
    if r.is_err() {
        abort(s, &moref).await;
    }
    r
}

async fn wait_ready(s: &Soap, sc: &ServiceContent, moref: &MoRef, ctl: &Control) -> Result<Lease, ExportFailure> {
    let began = Instant::now();
    loop {
        if ctl.cancel.load(Ordering::Relaxed) {
            return Err(ExportFailure::Cancelled);
        }
        let (state, doc_text) = lease_state(s, sc, moref).await?;
        match state.as_str() {
            "ready" => {
                let doc = soap::parse(&doc_text)?;
                let urls = doc
                    .descendants()
                    .filter(|n| n.is_element() && n.tag_name().name() == "deviceUrl")
                    .filter(|n| child_text(*n, "disk") == Some("true"))
                    .map(|n| DeviceUrl {
                        key: child_text(n, "key").unwrap_or("").to_string(),
                        url: child_text(n, "url").unwrap_or("").to_string(),
                        target: child_text(n, "targetId").unwrap_or("").to_string(),
                        size: child_text(n, "fileSize").and_then(|t| t.trim().parse().ok()).filter(|s| *s > 0),
                        thumbprint: child_text(n, "sslThumbprint").map(str::to_string).filter(|t| !t.is_empty()),
                    })
                    .collect();
                let timeout = doc
                    .descendants()
                    .find(|n| n.tag_name().name() == "leaseTimeout")
                    .and_then(|n| n.text())
                    .and_then(|t| t.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                return Ok(Lease { moref: moref.clone(), urls, timeout });
            }
            "error" => {
                let doc = soap::parse(&doc_text)?;
                let why = doc
                    .descendants()
                    .find(|n| n.tag_name().name() == "localizedMessage")
                    .and_then(|n| n.text())
                    .unwrap_or("no reason given");
                return Err(VsError::Fault { kind: "HttpNfcLeaseError".into(), message: why.to_string() }.into());
            }
            _ if began.elapsed() > Duration::from_secs(600) => {
                return Err(VsError::Protocol("the export lease did not become ready in 10 minutes".into()).into());
            }
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// The lease's state (`initializing`, `ready`, `done`, `error`) and the answer holding its info.
pub async fn lease_state(s: &Soap, sc: &ServiceContent, lease: &MoRef) -> Result<(String, String), VsError> {
    let spec = format!(
        "<propSet><type>HttpNfcLease</type><pathSet>state</pathSet><pathSet>info</pathSet><pathSet>error</pathSet></propSet><objectSet>{}<skip>false</skip></objectSet>",
        lease.xml("obj")
    );
    let pages = inventory::retrieve(s, sc, &spec).await?;
    let text = pages.into_iter().next().unwrap_or_default();
    let state = {
        let doc = soap::parse(&text)?;
        doc.descendants()
            .filter(|n| n.tag_name().name() == "propSet")
            .find(|n| child_text(*n, "name") == Some("state"))
            .and_then(|n| child(n, "val"))
            .and_then(|v| v.text())
            .unwrap_or("unknown")
            .to_string()
    };
    Ok((state, text))
}

pub async fn progress(s: &Soap, lease: &MoRef, percent: u32) -> Result<(), VsError> {
    s.call(&format!(
        r#"<HttpNfcLeaseProgress xmlns="urn:vim25">{}<percent>{}</percent></HttpNfcLeaseProgress>"#,
        lease.xml("_this"),
        percent.min(100)
    ))
    .await
    .map(|_| ())
}

pub async fn complete(s: &Soap, lease: &MoRef) -> Result<(), VsError> {
    s.call(&format!(r#"<HttpNfcLeaseComplete xmlns="urn:vim25">{}</HttpNfcLeaseComplete>"#, lease.xml("_this")))
        .await
        .map(|_| ())
}

/// Release the lease (best effort: a lease that already ended needs nothing).
pub async fn abort(s: &Soap, lease: &MoRef) {
    if let Err(e) =
        s.call(&format!(r#"<HttpNfcLeaseAbort xmlns="urn:vim25">{}</HttpNfcLeaseAbort>"#, lease.xml("_this"))).await
    {
        tracing::debug!("aborting the export lease: {}", Esc(&e.to_string()));
    }
}

/// Keep the lease alive while the disks download: its progress every `every`. A renewal the
/// server refuses (the lease expired or was aborted) is reported through the watch channel.
pub fn keep_alive(
    s: Arc<Soap>,
    lease: MoRef,
    every: Duration,
    done: Arc<AtomicU64>,
    total: u64,
) -> (tokio::task::JoinHandle<()>, watch::Receiver<Option<String>>) {
    let (tx, rx) = watch::channel(None);
    let task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let pct = (done.load(Ordering::Relaxed).saturating_mul(100) / total.max(1)).min(99) as u32;
            match progress(&s, &lease, pct).await {
                Ok(()) => {}
                Err(VsError::Connect(e)) => tracing::warn!("renewing the export lease: {e}; trying again"),
                Err(e) => {
                    let _ = tx.send(Some(format!("vSphere ended the export lease: {e}")));
                    return;
                }
            }
        }
    });
    (task, rx)
}

/// Download `url` into the new file `dst`.
#[allow(clippy::too_many_arguments)]
pub async fn download(
    s: &Soap,
    url: &DeviceUrl,
    dst: &Path,
    tuning: &Tuning,
    ctl: &Control,
    done_before: u64,
    total_done: &AtomicU64,
    lease_end: &mut watch::Receiver<Option<String>>,
) -> Result<Downloaded, ExportFailure> {
    let (ep, path, with_cookie) = s.ep.target(&url.url, url.thumbprint.as_deref())?;
    let cookie = if with_cookie { s.cookie() } else { None };
    let io = |e: std::io::Error| ExportFailure::Io(format!("{}: {e}", dst.display()));
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).open(dst).map_err(io)?;
    let mut hasher = blake3::Hasher::new();
    let mut have = 0u64;
    let mut resumed = 0u32;
    let mut failures = 0u32;
    loop {
        if ctl.cancel.load(Ordering::Relaxed) {
            return Err(ExportFailure::Cancelled);
        }
        if let Some(why) = lease_end.borrow().clone() {
            return Err(ExportFailure::Lease(why));
        }
        let fetch = Fetch { ep: &ep, path: &path, cookie: cookie.as_deref(), expect: url.size };
        let attempt =
            transfer(&fetch, have, tuning, ctl, &mut file, &mut hasher, done_before, total_done, lease_end).await;
        match attempt {
            Ok(Transfer::Complete(n)) => {
                have = n;
                break;
            }
            Ok(Transfer::Restarted) => {
                // The server sent the whole file again: start over.
                hasher = blake3::Hasher::new();
                have = 0;
                file.set_len(0).map_err(|e| ExportFailure::Io(format!("{}: {e}", dst.display())))?;
                use std::io::Seek;
                file.seek(std::io::SeekFrom::Start(0))
                    .map_err(|e| ExportFailure::Io(format!("{}: {e}", dst.display())))?;
                continue;
            }
            Err(TransferError::Broken { why, at }) => {
                // The file holds exactly `at` bytes, all hashed: put the write position there
                // (a failed write may have left part of a chunk after it).
                have = at;
                file.set_len(at).map_err(io)?;
                use std::io::Seek;
                file.seek(std::io::SeekFrom::Start(at)).map_err(io)?;
                failures += 1;
                if failures > tuning.retries {
                    return Err(ExportFailure::Vs(VsError::Connect(format!(
                        "downloading {}: {why}; gave up after {} attempts ({} of the disk received)",
                        Esc(&url.url),
                        failures,
                        hyperfarm_shared::human::bytes(have)
                    ))));
                }
                resumed += 1;
                let wait = Duration::from_secs(u64::from(failures.min(5)));
                tracing::warn!(
                    "the transfer of {} broke at byte {have} ({why}); resuming from there in {}s (attempt {} of {})",
                    Esc(&url.target),
                    wait.as_secs(),
                    failures + 1,
                    tuning.retries + 1
                );
                if cancellable(ctl, tokio::time::sleep(wait)).await.is_err() {
                    return Err(ExportFailure::Cancelled);
                }
            }
            Err(TransferError::Fatal(ExportFailure::Io(m))) => {
                return Err(ExportFailure::Io(format!("{}: {m}", dst.display())));
            }
            Err(TransferError::Fatal(f)) => return Err(f),
        }
    }
    file.sync_all().map_err(io)?;
    Ok(Downloaded { path: dst.to_path_buf(), bytes: have, blake3: *hasher.finalize().as_bytes(), resumed })
}

enum Transfer {
    Complete(u64),
    Restarted,
}

enum TransferError {
    /// The transfer broke after `at` bytes of the file: resume there.
    Broken {
        why: String,
        at: u64,
    },
    Fatal(ExportFailure),
}

/// Run `f`, giving up within 200 ms of a cancel (Ctrl-C/SIGTERM).
async fn cancellable<F: std::future::Future>(ctl: &Control, f: F) -> Result<F::Output, TransferError> {
    tokio::pin!(f);
    loop {
        tokio::select! {
            r = &mut f => return Ok(r),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if ctl.cancel.load(Ordering::Relaxed) {
                    return Err(TransferError::Fatal(ExportFailure::Cancelled));
                }
            }
        }
    }
}

/// Where one disk comes from.
struct Fetch<'a> {
    ep: &'a super::soap::Endpoint,
    path: &'a str,
    cookie: Option<&'a str>,
    /// Its size, when the lease said it.
    expect: Option<u64>,
}

/// One GET of the disk from byte `from`; bytes are appended to `file` and `hasher`.
#[allow(clippy::too_many_arguments)]
async fn transfer(
    f: &Fetch<'_>,
    from: u64,
    tuning: &Tuning,
    ctl: &Control,
    file: &mut std::fs::File,
    hasher: &mut blake3::Hasher,
    done_before: u64,
    total_done: &AtomicU64,
    lease_end: &mut watch::Receiver<Option<String>>,
) -> Result<Transfer, TransferError> {
    let broken = |why: String, at: u64| TransferError::Broken { why, at };
    let fatal = |e: VsError| TransferError::Fatal(ExportFailure::Vs(e));
    let mut send = match cancellable(ctl, f.ep.connect()).await? {
        Ok(c) => c,
        // A certificate no retry will change.
        Err(e @ VsError::Tls(_)) => return Err(fatal(e)),
        Err(e) => return Err(broken(e.to_string(), from)),
    };
    let mut req = hyper::Request::get(f.path)
        .header(hyper::header::HOST, f.ep.authority())
        .header(hyper::header::USER_AGENT, concat!("hyperexport/", env!("CARGO_PKG_VERSION")));
    if let Some(c) = f.cookie {
        req = req.header(hyper::header::COOKIE, c);
    }
    if from > 0 {
        req = req.header(hyper::header::RANGE, format!("bytes={from}-"));
    }
    let req = req.body(Full::new(Bytes::new())).map_err(|e| fatal(VsError::Protocol(e.to_string())))?;
    let resp = match cancellable(ctl, tokio::time::timeout(tuning.stall, send.send_request(req))).await? {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(broken(e.to_string(), from)),
        Err(_) => return Err(broken(format!("no answer in {}s", tuning.stall.as_secs()), from)),
    };
    let status = resp.status();
    let header =
        |name: hyper::header::HeaderName| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    // `bytes a-b/total` (206) or `bytes */total` (416).
    let range = header(hyper::header::CONTENT_RANGE).and_then(|v| {
        let v = v.strip_prefix("bytes ")?.to_string();
        let (span, total) = v.split_once('/')?;
        let total = total.trim().parse::<u64>().ok();
        let start = span.split('-').next().and_then(|a| a.trim().parse::<u64>().ok());
        Some((start, total))
    });
    let length = header(hyper::header::CONTENT_LENGTH).and_then(|v| v.trim().parse::<u64>().ok());
    // The disk's whole size, when anything says it: the response first (vSphere documents the
    // lease's fileSize for non-disk files only), else the lease.
    let total: Option<u64> = match status.as_u16() {
        200 if from > 0 => {
            tracing::warn!(
                "the server does not resume transfers (it sent the whole disk again): starting the disk over"
            );
            return Ok(Transfer::Restarted);
        }
        200 => length.or(f.expect),
        206 => {
            let Some((Some(start), t)) = range else {
                tracing::warn!("the server resumed without saying where: starting the disk over");
                return Ok(Transfer::Restarted);
            };
            if start != from {
                tracing::warn!("the server resumed at another byte than asked: starting the disk over");
                return Ok(Transfer::Restarted);
            }
            t.or(f.expect)
        }
        416 if from > 0 => {
            // The break came after the last byte: complete if the server says so.
            return match range.and_then(|(_, t)| t) {
                Some(t) if t == from => Ok(Transfer::Complete(from)),
                _ => Ok(Transfer::Restarted),
            };
        }
        404 | 403 | 410 => {
            // A lease that ended makes its URLs disappear: say so rather than "not found".
            let why = lease_end.borrow().clone().unwrap_or_else(|| {
                format!("the server answered HTTP {status} for the disk's URL: the export lease is no longer valid (expired or aborted)")
            });
            return Err(TransferError::Fatal(ExportFailure::Lease(why)));
        }
        _ if status.is_server_error() => return Err(broken(format!("HTTP {status}"), from)),
        _ => {
            return Err(fatal(VsError::Protocol(format!("the server answered HTTP {status} for {}", Esc(f.path)))));
        }
    };
    if let Some(t) = total
        && t > tuning.max_disk
    {
        return Err(TransferError::Fatal(ExportFailure::TooLarge(format!(
            "the disk is {} ({t} bytes), more than --max-disk-size {}; raise it if this is intended",
            hyperfarm_shared::human::bytes(t),
            hyperfarm_shared::human::bytes(tuning.max_disk)
        ))));
    }
    let mut body = resp.into_body();
    let mut at = from;
    let mut silent = Duration::ZERO;
    loop {
        if ctl.cancel.load(Ordering::Relaxed) {
            return Err(TransferError::Fatal(ExportFailure::Cancelled));
        }
        // Wait in slices of a second, so that a cancel or the lease's end is seen at once even
        // while the server sends nothing.
        let frame = tokio::select! {
            f = tokio::time::timeout(Duration::from_secs(1), body.frame()) => f,
            _ = lease_end.changed() => {
                let why = lease_end.borrow().clone().unwrap_or_else(|| "the export lease ended".into());
                return Err(TransferError::Fatal(ExportFailure::Lease(why)));
            }
        };
        let frame = match frame {
            Err(_) => {
                silent += Duration::from_secs(1);
                if silent >= tuning.stall {
                    return Err(broken(format!("no data for {}s", tuning.stall.as_secs()), at));
                }
                continue;
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(broken(e.to_string(), at)),
            Ok(Some(Ok(f))) => f,
        };
        silent = Duration::ZERO;
        let Ok(data) = frame.into_data() else { continue };
        if at + data.len() as u64 > tuning.max_disk {
            return Err(TransferError::Fatal(ExportFailure::TooLarge(format!(
                "the disk is larger than --max-disk-size {}; raise it if this is intended",
                hyperfarm_shared::human::bytes(tuning.max_disk)
            ))));
        }
        let written = tokio::task::block_in_place(|| -> std::io::Result<()> {
            file.write_all(&data)?;
            hasher.update(&data);
            Ok(())
        });
        if let Err(e) = written {
            let hint = if e.raw_os_error() == Some(libc::ENOSPC) { " (the file system is full)" } else { "" };
            return Err(TransferError::Fatal(ExportFailure::Io(format!("writing the disk: {e}{hint}"))));
        }
        at += data.len() as u64;
        ctl.done.store(at, Ordering::Relaxed);
        total_done.store(done_before + at, Ordering::Relaxed);
    }
    // A body that ended early without an error (a connection closed where no length was given)
    // is a break, not the end, when the size is known.
    match total {
        Some(t) if at < t => Err(broken(format!("the transfer ended after {at} of {t} bytes"), at)),
        Some(t) if at > t => Err(fatal(VsError::Protocol(format!("the server sent {at} bytes of a {t}-byte disk")))),
        _ => Ok(Transfer::Complete(at)),
    }
}

/// What to export: the VM itself, or (running VM) a snapshot taken for it.
pub async fn entity_for(
    s: &Soap,
    sc: &ServiceContent,
    vm: &VmFacts,
    allow_running: bool,
    snapshot_name: &str,
    ctl: &Control,
) -> Result<(MoRef, Option<MoRef>), VsError> {
    if vm.power == "poweredOff" || !allow_running {
        return Ok((vm.moref.clone(), None));
    }
    let snap = inventory::create_snapshot(s, sc, &vm.moref, snapshot_name, &ctl.cancel).await?;
    Ok((snap.clone(), Some(snap)))
}
