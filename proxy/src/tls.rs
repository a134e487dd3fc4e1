//! TLS by rustls: listener configs (certificates by SNI, ALPN, optional mTLS), the peer
//! identity a verified client certificate carries, and client configs for upstream TLS.
//!
//! Only TLS 1.2 and 1.3 are enabled, with the `ring` provider's default cipher suites.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::{ClientAuth, ClusterTls, Config, ConfigIssue, ListenerTls, SYSTEM_CA_BUNDLES};

/// Errors building a TLS configuration; the message names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file holds no PEM item of the expected kind.
    #[error("{path}: no {what} found in PEM file")]
    Empty {
        /// The file.
        path: String,
        /// certificate or private key.
        what: &'static str,
    },
    /// rustls refused the material.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs the process-wide default crypto provider (ring); harmless if already installed.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Reads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let shown = path.display().to_string();
    let data = std::fs::read(path).map_err(|source| TlsError::Read {
        path: shown.clone(),
        source,
    })?;
    let certs = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: shown,
            what: "certificate",
        });
    }
    Ok(certs)
}

/// Reads the first private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let shown = path.display().to_string();
    let data = std::fs::read(path).map_err(|source| TlsError::Read {
        path: shown.clone(),
        source,
    })?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|e| TlsError::Invalid {
            path: shown.clone(),
            reason: e.to_string(),
        })?
        .ok_or(TlsError::Empty {
            path: shown,
            what: "private key",
        })
}

fn certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = load_certs(cert)?;
    let der = load_key(key)?;
    let signing = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| TlsError::Invalid {
            path: key.display().to_string(),
            reason: e.to_string(),
        })?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match().map_err(|e| TlsError::Invalid {
        path: key.display().to_string(),
        reason: format!("key does not match {}: {e}", cert.display()),
    })?;
    Ok(Arc::new(ck))
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for c in load_certs(path)? {
        store.add(c).map_err(|e| TlsError::Invalid {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
    }
    Ok(store)
}

/// Picks a certificate by SNI: exact names first, then `*.suffix` wildcards (one label),
/// then the listener's default certificate.
#[derive(Debug)]
struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else {
            return Some(self.default.clone());
        };
        let name = name.to_ascii_lowercase();
        if let Some(k) = self.exact.get(&name) {
            return Some(k.clone());
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(k) = self.wildcard.get(parent) {
                return Some(k.clone());
            }
        }
        Some(self.default.clone())
    }
}

/// Builds the rustls server config of a listener.
pub fn server_config(tls: &ListenerTls, config: &Config) -> Result<Arc<ServerConfig>, TlsError> {
    let default = certified_key(&config.resolve(&tls.cert), &config.resolve(&tls.key))?;
    let mut resolver = SniResolver {
        exact: HashMap::new(),
        wildcard: HashMap::new(),
        default,
    };
    for entry in &tls.sni {
        let key = certified_key(&config.resolve(&entry.cert), &config.resolve(&entry.key))?;
        for n in &entry.names {
            let n = n.to_ascii_lowercase();
            match n.strip_prefix("*.") {
                Some(suffix) => resolver.wildcard.insert(suffix.to_string(), key.clone()),
                None => resolver.exact.insert(n, key.clone()),
            };
        }
    }
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| TlsError::Invalid {
            path: "tls".into(),
            reason: e.to_string(),
        })?;
    let builder = match &tls.client_ca {
        Some(ca) => {
            let path = config.resolve(ca);
            let mut v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&path)?), provider());
            if tls.client_auth == ClientAuth::Optional {
                v = v.allow_unauthenticated();
            }
            let verifier = v.build().map_err(|e| TlsError::Invalid {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut sc = builder.with_cert_resolver(Arc::new(resolver));
    sc.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(sc))
}

/// Builds the rustls client config of a cluster (roots, optional client certificate, ALPN).
pub fn client_config(tls: &ClusterTls, config: &Config, h2: bool) -> Result<Arc<ClientConfig>, TlsError> {
    let ca = match &tls.ca {
        Some(ca) => config.resolve(ca),
        None => SYSTEM_CA_BUNDLES
            .iter()
            .map(Path::new)
            .find(|p| p.is_file())
            .ok_or_else(|| TlsError::Invalid {
                path: "tls.ca".into(),
                reason: "no system CA bundle".into(),
            })?
            .to_path_buf(),
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| TlsError::Invalid {
            path: "tls".into(),
            reason: e.to_string(),
        })?
        .with_root_certificates(roots(&ca)?);
    let mut cc = match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let (cert, key) = (config.resolve(cert), config.resolve(key));
            builder
                .with_client_auth_cert(load_certs(&cert)?, load_key(&key)?)
                .map_err(|e| TlsError::Invalid {
                    path: key.display().to_string(),
                    reason: e.to_string(),
                })?
        }
        _ => builder.with_no_client_auth(),
    };
    cc.alpn_protocols = if h2 {
        vec![b"h2".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(Arc::new(cc))
}

/// Checks every TLS file of a config parses and matches (called by config validation).
pub(crate) fn check_config(config: &Config) -> Vec<ConfigIssue> {
    let mut issues = Vec::new();
    for (i, l) in config.listeners.iter().enumerate() {
        if let Some(tls) = &l.tls {
            if let Err(e) = server_config(tls, config) {
                issues.push(ConfigIssue {
                    path: format!("listeners[{i}].tls"),
                    message: e.to_string(),
                });
            }
        }
    }
    for (name, c) in &config.clusters {
        if let Some(tls) = &c.tls {
            let h2 = c.protocol == crate::config::UpstreamProtocol::Http2;
            if let Err(e) = client_config(tls, config, h2) {
                issues.push(ConfigIssue {
                    path: format!("clusters.{name}.tls"),
                    message: e.to_string(),
                });
            }
        }
    }
    issues
}

/// The verified identity of a TLS client, kept with its connection for filters and logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The certificate subject, e.g. `CN=frontend,O=acme`.
    pub subject: String,
    /// URI SANs, e.g. `spiffe://cluster.local/ns/web/sa/frontend`.
    pub uri_sans: Vec<String>,
    /// DNS SANs.
    pub dns_sans: Vec<String>,
}

impl PeerIdentity {
    /// Reads the identity from a DER certificate.
    pub fn from_der(der: &[u8]) -> Option<PeerIdentity> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let mut id = PeerIdentity {
            subject: cert.subject().to_string(),
            ..Default::default()
        };
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    GeneralName::URI(u) => id.uri_sans.push(u.to_string()),
                    GeneralName::DNSName(d) => id.dns_sans.push(d.to_string()),
                    _ => {}
                }
            }
        }
        Some(id)
    }

    /// The identity a policy should use: the first URI SAN (SPIFFE ID) or else the subject.
    pub fn principal(&self) -> &str {
        self.uri_sans.first().map_or(&self.subject, String::as_str)
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.principal())
    }
}

/// What a TLS handshake told us about a downstream connection.
#[derive(Debug, Clone, Default)]
pub struct TlsInfo {
    /// SNI the client sent.
    pub sni: Option<String>,
    /// Negotiated ALPN protocol.
    pub alpn: Option<Vec<u8>>,
    /// The verified client certificate's identity (mTLS).
    pub peer: Option<PeerIdentity>,
}

impl TlsInfo {
    /// Extracts the handshake facts of an accepted connection.
    pub fn from_connection(conn: &rustls::ServerConnection) -> TlsInfo {
        TlsInfo {
            sni: conn.server_name().map(str::to_string),
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
            peer: conn
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| PeerIdentity::from_der(c)),
        }
    }
}

/// The name an upstream TLS connection sends as SNI and verifies.
pub fn upstream_server_name(tls: &ClusterTls, endpoint_host: &str) -> Result<ServerName<'static>, String> {
    let name = tls.server_name.as_deref().unwrap_or(endpoint_host);
    ServerName::try_from(name.to_string()).map_err(|e| format!("invalid server name {name:?}: {e}"))
}
