//! TLS settings of a `rediss://` store: which certificate authorities to trust, and a client
//! certificate for mutual TLS. Server names are always checked.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use fred::rustls;
use fred::rustls::pki_types::pem::PemObject;
use fred::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::Error;

/// TLS settings for a `rediss://` (or `rediss-cluster://`, `rediss-sentinel://`) store.
///
/// Without any, the system's trusted roots are used (what `rediss://` alone gives). With CA
/// certificates, **only** those are trusted: the way to reach a Redis whose certificate a
/// private CA signed, without trusting that CA for anything else in the process. The server's
/// name (the URL's host) is always checked against its certificate.
///
/// ```no_run
/// use tollgate_redis::{RedisStore, RedisTls};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let tls = RedisTls::new()
///     .with_ca_file("/etc/tollgate/redis-ca.pem")?
///     // Only for servers started with `tls-auth-clients yes`:
///     .with_client_cert_files("/etc/tollgate/client.pem", "/etc/tollgate/client.key")?;
/// let store = RedisStore::builder("rediss://tollgate:secret@redis.internal:6380")?
///     .tls(tls)
///     .build()?;
/// # let _ = store;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Default)]
#[must_use]
pub struct RedisTls {
    ca: Vec<CertificateDer<'static>>,
    client: Option<(Vec<CertificateDer<'static>>, Arc<PrivateKeyDer<'static>>)>,
    error: Option<String>,
}

impl RedisTls {
    /// No settings: the system's roots, no client certificate.
    pub fn new() -> Self {
        RedisTls::default()
    }

    /// Trusts the CA certificates in `pem` (one or more `BEGIN CERTIFICATE` blocks), and only
    /// them. A PEM without a certificate is an error when the store is built.
    pub fn with_ca_pem(mut self, pem: impl AsRef<[u8]>) -> Self {
        match certificates(pem.as_ref(), "the CA certificates") {
            Ok(certs) => self.ca.extend(certs),
            Err(e) => self.error = self.error.or(Some(e)),
        }
        self
    }

    /// Trusts the CA certificates in the PEM file at `path`, and only them.
    ///
    /// # Errors
    ///
    /// [`Error::Tls`] naming the file when it cannot be read.
    pub fn with_ca_file(self, path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let pem = read(path, "CA certificate")?;
        Ok(self.with_ca_pem(pem))
    }

    /// Presents this client certificate (its chain, leaf first) and private key, for servers
    /// that require one (`tls-auth-clients yes`).
    pub fn with_client_cert_pem(
        mut self,
        cert_chain: impl AsRef<[u8]>,
        key: impl AsRef<[u8]>,
    ) -> Self {
        let chain = certificates(cert_chain.as_ref(), "the client certificate");
        let key = PrivateKeyDer::from_pem_slice(key.as_ref()).map_err(|e| {
            format!("the client key is not a PEM private key (PKCS#8, PKCS#1 or SEC1): {e}")
        });
        match (chain, key) {
            (Ok(chain), Ok(key)) => self.client = Some((chain, Arc::new(key))),
            (Err(e), _) | (_, Err(e)) => self.error = self.error.or(Some(e)),
        }
        self
    }

    /// Presents the client certificate and key in these PEM files.
    ///
    /// # Errors
    ///
    /// [`Error::Tls`] naming the file that cannot be read.
    pub fn with_client_cert_files(
        self,
        cert_chain: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self, Error> {
        let chain = read(cert_chain.as_ref(), "client certificate")?;
        let key = read(key.as_ref(), "client key")?;
        Ok(self.with_client_cert_pem(chain, key))
    }

    /// The rustls configuration these settings make.
    pub(crate) fn client_config(&self) -> Result<rustls::ClientConfig, Error> {
        if let Some(e) = &self.error {
            return Err(Error::Tls(e.clone()));
        }
        let mut roots = rustls::RootCertStore::empty();
        if self.ca.is_empty() {
            let native = fred::rustls_native_certs::load_native_certs();
            for cert in native.certs {
                // A system root rustls cannot use is skipped, as browsers do.
                let _ = roots.add(cert);
            }
        } else {
            for cert in &self.ca {
                roots
                    .add(cert.clone())
                    .map_err(|e| Error::Tls(format!("a CA certificate is not usable: {e}")))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_root_certificates(roots);
        match &self.client {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .map_err(|e| {
                    Error::Tls(format!(
                        "the client certificate and key do not go together: {e}"
                    ))
                }),
            None => Ok(builder.with_no_client_auth()),
        }
    }
}

fn certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{what}: not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{what}: no BEGIN CERTIFICATE block in the PEM"));
    }
    Ok(certs)
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| {
        Error::Tls(format!(
            "cannot read the {what} file {}: {e}",
            path.display()
        ))
    })
}

impl fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("RedisTls")
            .field("ca_certificates", &self.ca.len())
            .field("client_certificate", &self.client.is_some())
            .finish_non_exhaustive()
    }
}
