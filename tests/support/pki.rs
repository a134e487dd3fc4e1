//! A test PKI: a CA and leaf certificates, generated fresh for each test and written as PEM.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};

/// A certificate authority whose files live in a temp dir.
pub struct Pki {
    dir: tempfile::TempDir,
    ca_cert: rcgen::Certificate,
    ca_key: KeyPair,
    /// The CA certificate PEM file.
    pub ca: PathBuf,
}

/// A leaf certificate's files.
#[derive(Clone, Debug)]
pub struct Leaf {
    /// Certificate PEM file.
    pub cert: PathBuf,
    /// Private key PEM file.
    pub key: PathBuf,
}

impl Pki {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let ca_key = KeyPair::generate().expect("key");
        let ca_cert = params.self_signed(&ca_key).expect("self-signed CA");
        let ca = dir.path().join(format!("{name}-ca.pem"));
        std::fs::write(&ca, ca_cert.pem()).expect("write CA");
        Pki {
            dir,
            ca_cert,
            ca_key,
            ca,
        }
    }

    /// The directory the files are in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Issues a leaf for DNS/IP names, with a common name and optional URI SAN (SPIFFE ID).
    pub fn issue(&self, file: &str, cn: &str, names: &[&str], uri: Option<&str>) -> Leaf {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        if let Some(u) = uri {
            params
                .subject_alt_names
                .push(SanType::URI(u.try_into().expect("ia5")));
        }
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.ca_cert, &self.ca_key).expect("sign");
        let leaf = Leaf {
            cert: self.dir.path().join(format!("{file}.pem")),
            key: self.dir.path().join(format!("{file}.key")),
        };
        std::fs::write(&leaf.cert, cert.pem()).expect("write cert");
        std::fs::write(&leaf.key, key.serialize_pem()).expect("write key");
        leaf
    }
}

/// A rustls client config trusting `ca`, with ALPN and an optional client certificate.
pub fn client_config(
    ca: &Path,
    alpn: &[&[u8]],
    client: Option<&Leaf>,
) -> std::sync::Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in weir::tls::load_certs(ca).expect("ca") {
        roots.add(c).expect("add root");
    }
    let b = rustls::ClientConfig::builder().with_root_certificates(roots);
    let mut cfg = match client {
        Some(l) => b
            .with_client_auth_cert(
                weir::tls::load_certs(&l.cert).expect("cert"),
                weir::tls::load_key(&l.key).expect("key"),
            )
            .expect("client auth"),
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    std::sync::Arc::new(cfg)
}

/// A rustls server config for a test upstream, optionally requiring client certificates.
pub fn server_config(
    leaf: &Leaf,
    alpn: &[&[u8]],
    client_ca: Option<&Path>,
) -> std::sync::Arc<rustls::ServerConfig> {
    let b = rustls::ServerConfig::builder();
    let b = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in weir::tls::load_certs(ca).expect("ca") {
                roots.add(c).expect("add root");
            }
            let v = rustls::server::WebPkiClientVerifier::builder(std::sync::Arc::new(roots))
                .build()
                .expect("verifier");
            b.with_client_cert_verifier(v)
        }
        None => b.with_no_client_auth(),
    };
    let mut cfg = b
        .with_single_cert(
            weir::tls::load_certs(&leaf.cert).expect("cert"),
            weir::tls::load_key(&leaf.key).expect("key"),
        )
        .expect("server config");
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    std::sync::Arc::new(cfg)
}

/// The common name of the certificate a TLS server presented.
pub fn peer_cn(s: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> String {
    let der = s.get_ref().1.peer_certificates().expect("a server certificate")[0].clone();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("a parsable certificate");
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_string();
    cn
}
