//! `membrane istio webhook`: the mutating admission webhook over HTTPS. The judgement is
//! `membrane_istio::admission::review` (pure); this is only the server around it: TLS with a
//! certificate that is read again when its files change (cert-manager and the like rotate it in
//! place), HTTP/1.1, `POST /inject` and `GET /healthz`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use membrane_istio::Settings;
use membrane_istio::admission;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// The largest AdmissionReview read (the API server's objects stay far below).
const MAX_BODY: usize = 8 << 20;
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// Nor one that takes longer to send a request's head (also between keep-alive requests).
const HEAD_DEADLINE: Duration = Duration::from_secs(30);

/// The server's certificate chain and key (PEM files).
#[derive(Clone, Debug)]
pub struct CertFiles {
    /// The chain, leaf first.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// The certificate in use, and the files' modification times it was read at.
#[derive(Debug)]
struct Loaded {
    stamps: (Option<SystemTime>, Option<SystemTime>),
    key: Arc<CertifiedKey>,
}

/// Serves the certificate, reading it again when either file changes; a change that does not
/// load (a half-written file) keeps the previous one and is logged.
#[derive(Debug)]
struct ReloadingCert {
    files: CertFiles,
    provider: Arc<CryptoProvider>,
    loaded: Mutex<Loaded>,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl ReloadingCert {
    fn new(files: CertFiles, provider: Arc<CryptoProvider>) -> Result<ReloadingCert> {
        let stamps = (modified(&files.cert), modified(&files.key));
        let key = load(&files, &provider)?;
        Ok(ReloadingCert {
            files,
            provider,
            loaded: Mutex::new(Loaded { stamps, key }),
        })
    }

    fn current(&self) -> Arc<CertifiedKey> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        let stamps = (modified(&self.files.cert), modified(&self.files.key));
        if stamps != loaded.stamps {
            match load(&self.files, &self.provider) {
                Ok(key) => {
                    eprintln!(
                        "membrane istio webhook: certificate {} read again",
                        self.files.cert.display()
                    );
                    *loaded = Loaded { stamps, key };
                }
                Err(e) => {
                    eprintln!("membrane istio webhook: keeping the previous certificate: {e:#}");
                    // Try again when the files change once more.
                    loaded.stamps = stamps;
                }
            }
        }
        loaded.key.clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn load(files: &CertFiles, provider: &CryptoProvider) -> Result<Arc<CertifiedKey>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect())
        .map_err(|e| anyhow!("{}: {e}", files.cert.display()))?;
    if chain.is_empty() {
        return Err(anyhow!("{}: no certificate in it", files.cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| anyhow!("{}: {e}", files.key.display()))?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| anyhow!("{}: {e}", files.key.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| anyhow!("{} and {}: {e}", files.cert.display(), files.key.display()))?;
    Ok(Arc::new(certified))
}

/// The TLS side: TLS 1.2 and 1.3 with ring's safe defaults, HTTP/1.1 by ALPN.
fn acceptor(files: CertFiles) -> Result<TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let resolver = ReloadingCert::new(files, provider.clone())?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Binds `listen` and serves until the process ends. Fails at once on an unusable address or
/// certificate.
pub async fn serve(listen: SocketAddr, files: CertFiles, settings: Settings) -> Result<()> {
    settings.validate().map_err(|e| anyhow!("{e}"))?;
    let tls = acceptor(files)?;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    eprintln!(
        "membrane istio webhook: serving https://{}{}",
        listener.local_addr()?,
        admission::PATH
    );
    let settings = Arc::new(settings);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: pause rather than spin.
                eprintln!("membrane istio webhook: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (tls, settings) = (tls.clone(), settings.clone());
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_DEADLINE, tls.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return eprintln!("membrane istio webhook: {peer}: TLS: {e}"),
                Err(_) => {
                    return eprintln!("membrane istio webhook: {peer}: TLS handshake timed out");
                }
            };
            let service = hyper::service::service_fn(move |req| {
                let settings = settings.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(req, &settings).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_DEADLINE)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                eprintln!("membrane istio webhook: {peer}: {e}");
            }
        });
    }
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        content_type.parse().expect("a valid header value"),
    );
    r
}

fn text(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    reply(status, "text/plain", format!("{message}\n").into_bytes())
}

async fn handle(req: Request<Incoming>, settings: &Settings) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok"),
        (&Method::POST, admission::PATH) => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return text(StatusCode::BAD_REQUEST, &format!("body: {e}")),
            };
            let review: serde_json::Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return text(StatusCode::BAD_REQUEST, &format!("body: {e}")),
            };
            match admission::review(&review, settings) {
                Ok(answer) => reply(
                    StatusCode::OK,
                    "application/json",
                    serde_json::to_vec(&answer).unwrap_or_default(),
                ),
                Err(e) => text(StatusCode::BAD_REQUEST, &e),
            }
        }
        (_, "/healthz") | (_, admission::PATH) => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => text(StatusCode::NOT_FOUND, "not found"),
    }
}
