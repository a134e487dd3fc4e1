//! Filters from OCI registries, as Istio's WasmPlugin pulls them: a chain entry names
//! `oci://HOST[:PORT]/REPO:TAG` or `oci://HOST[:PORT]/REPO@sha256:DIGEST`; Weir pulls the
//! artifact (Wasm OCI artifact media types), verifies its digests, keeps it on disk by digest,
//! and for a tag checks the registry every `registry.poll_interval`, reloading when the tag
//! moves. With the registry down, a reference pulled before starts from the disk cache.
//!
//! Cache layout under `registry.cache_dir`: `blobs/sha256/<hex>.wasm` (content, re-verified on
//! read) and `refs/<reference>.json` (the last manifest and layer digests seen for it).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use oci_client::client::{ClientConfig, ClientProtocol, ImageLayer};
use oci_client::manifest::{WASM_CONFIG_MEDIA_TYPE, WASM_LAYER_MEDIA_TYPE};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::config::{Config, RegistryConfig, RegistryHost};
use crate::filter::wasm::digest;
use crate::limits;

/// Layer media types taken as a Wasm component.
const WASM_MEDIA_TYPES: &[&str] = &[WASM_LAYER_MEDIA_TYPE, "application/wasm"];

/// A parsed `oci://` reference.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct OciRef {
    /// `host[:port]`.
    pub registry: String,
    /// The repository path.
    pub repository: String,
    /// The tag, when the reference follows one.
    pub tag: Option<String>,
    /// The pinned manifest digest (`sha256:...`), when the reference is pinned.
    pub digest: Option<String>,
}

impl fmt::Debug for OciRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for OciRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "oci://{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl OciRef {
    /// Parses `oci://HOST[:PORT]/REPO[:TAG][@sha256:HEX]`.
    pub fn parse(s: &str) -> Result<OciRef, String> {
        let bad = |why: &str| format!("invalid OCI reference {s:?}: {why}");
        let rest = s
            .strip_prefix("oci://")
            .ok_or_else(|| bad("must start with oci://"))?;
        let (registry, path) = rest.split_once('/').ok_or_else(|| bad("no repository"))?;
        if registry.is_empty()
            || !registry
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
        {
            return Err(bad("invalid registry host"));
        }
        let (path, digest) = match path.split_once('@') {
            Some((p, d)) => {
                let hex = d
                    .strip_prefix("sha256:")
                    .ok_or_else(|| bad("the digest must be sha256:<hex>"))?;
                if hex.len() != 64
                    || !hex
                        .chars()
                        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
                {
                    return Err(bad("the digest must be sha256: and 64 lower-case hex digits"));
                }
                (p, Some(d.to_string()))
            }
            None => (path, None),
        };
        let (repository, tag) = match path.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r, Some(t.to_string())),
            _ => (path, None),
        };
        if tag.is_none() && digest.is_none() {
            return Err(bad("name a tag (:TAG) or a digest (@sha256:...)"));
        }
        if repository.is_empty()
            || !repository
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/".contains(c))
        {
            return Err(bad(
                "the repository must be lower-case letters, digits, '.', '_', '-', '/'",
            ));
        }
        if let Some(t) = &tag {
            if t.is_empty()
                || t.len() > 128
                || !t.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            {
                return Err(bad("invalid tag"));
            }
        }
        Ok(OciRef {
            registry: registry.to_string(),
            repository: repository.to_string(),
            tag,
            digest,
        })
    }

    fn reference(&self) -> Reference {
        match (&self.tag, &self.digest) {
            (_, Some(d)) => Reference::with_digest(self.registry.clone(), self.repository.clone(), d.clone()),
            (Some(t), None) => Reference::with_tag(self.registry.clone(), self.repository.clone(), t.clone()),
            (None, None) => unreachable!("parse requires a tag or a digest"),
        }
    }

    /// A file name for the reference in the cache.
    fn cache_key(&self) -> String {
        self.to_string()
            .trim_start_matches("oci://")
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }
}

/// A pulled artifact.
#[derive(Clone)]
pub struct Artifact {
    /// The component bytes.
    pub bytes: Arc<[u8]>,
    /// Their sha256 (`sha256:...`).
    pub digest: String,
    /// The manifest digest they came from.
    pub manifest: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CachedRef {
    manifest: String,
    layer: String,
}

/// The registries of one config: clients per host and the artifacts pulled.
pub struct Registry {
    config: RegistryConfig,
    cache: PathBuf,
    ca: HashMap<String, Vec<u8>>,
    known: Mutex<HashMap<OciRef, Artifact>>,
}

impl Registry {
    /// The registry settings of `config` (paths resolved, CA files read).
    pub fn new(config: &Config) -> anyhow::Result<Registry> {
        let mut ca = HashMap::new();
        for (host, h) in &config.registry.hosts {
            if let Some(p) = &h.ca {
                let pem = std::fs::read(config.resolve(p))
                    .with_context(|| format!("registry.hosts.{host:?}.ca: cannot read {}", p.display()))?;
                ca.insert(host.clone(), pem);
            }
        }
        Ok(Registry {
            config: config.registry.clone(),
            cache: config.resolve(&config.registry.cache_dir),
            ca,
            known: Mutex::new(HashMap::new()),
        })
    }

    /// Whether `other` would build the same registry.
    pub fn same_settings(&self, config: &Config) -> bool {
        self.config == config.registry && self.cache == config.resolve(&config.registry.cache_dir)
    }

    /// How often tags are checked.
    pub fn poll_interval(&self) -> std::time::Duration {
        self.config.poll_interval
    }

    fn client(&self, host: &str) -> Client {
        client_for(
            host,
            self.config.hosts.get(host),
            self.ca.get(host).cloned(),
            self.config.timeout,
        )
    }

    fn auth(&self, host: &str) -> RegistryAuth {
        auth_for(self.config.hosts.get(host))
    }

    /// The digest of the artifact in service for `r`, if one was pulled (for reload
    /// fingerprints: no network).
    pub fn known_digest(&self, r: &OciRef) -> Option<String> {
        self.known
            .lock()
            .expect("known lock")
            .get(r)
            .map(|a| a.digest.clone())
    }

    /// Forgets artifacts of references no longer named (they stay in the disk cache).
    pub fn retain(&self, refs: &[OciRef]) {
        self.known
            .lock()
            .expect("known lock")
            .retain(|r, _| refs.contains(r));
    }

    /// The artifact for `r`: the one in service, else pulled now, else from the disk cache
    /// (registry down at start). The error names the reference.
    pub async fn resolve(&self, r: &OciRef) -> anyhow::Result<Artifact> {
        if let Some(a) = self.known.lock().expect("known lock").get(r).cloned() {
            return Ok(a);
        }
        let pulled = self.pull(r).await;
        let a = match pulled {
            Ok(a) => a,
            Err(e) => match self.cached(r) {
                Some(a) => {
                    tracing::warn!(reference = %r, error = %format!("{e:#}"), digest = %a.digest, "registry unreachable; starting from the cached copy");
                    a
                }
                None => return Err(e.context("cannot pull, and no cached copy")),
            },
        };
        self.known
            .lock()
            .expect("known lock")
            .insert(r.clone(), a.clone());
        Ok(a)
    }

    /// Checks a tag: pulls when its manifest moved. Returns whether the artifact in service
    /// changed (the caller reloads).
    pub async fn check(&self, r: &OciRef) -> anyhow::Result<bool> {
        let current = self.known.lock().expect("known lock").get(r).cloned();
        if r.digest.is_some() && current.is_some() {
            return Ok(false);
        }
        let client = self.client(&r.registry);
        let auth = self.auth(&r.registry);
        let manifest = tokio::time::timeout(
            self.config.timeout,
            client.fetch_manifest_digest(&r.reference(), &auth),
        )
        .await
        .map_err(|_| anyhow::anyhow!("registry did not answer within {:?}", self.config.timeout))?
        .context("cannot check the tag")?;
        if current.as_ref().is_some_and(|a| a.manifest == manifest) {
            return Ok(false);
        }
        let a = self.pull(r).await?;
        let changed = current.map(|c| c.digest) != Some(a.digest.clone());
        self.known.lock().expect("known lock").insert(r.clone(), a);
        Ok(changed)
    }

    async fn pull(&self, r: &OciRef) -> anyhow::Result<Artifact> {
        let client = self.client(&r.registry);
        let auth = self.auth(&r.registry);
        let image = tokio::time::timeout(
            self.config.timeout,
            client.pull(&r.reference(), &auth, WASM_MEDIA_TYPES.to_vec()),
        )
        .await
        .map_err(|_| anyhow::anyhow!("registry did not answer within {:?}", self.config.timeout))?
        .context("pull failed")?;
        let manifest = image.digest.clone().unwrap_or_default();
        if let Some(pinned) = &r.digest {
            if &manifest != pinned {
                anyhow::bail!("the registry served manifest {manifest}, not the pinned digest");
            }
        }
        let layers = image
            .manifest
            .as_ref()
            .map(|m| m.layers.clone())
            .unwrap_or_default();
        let (i, layer) = image
            .layers
            .iter()
            .enumerate()
            .find(|(_, l)| WASM_MEDIA_TYPES.contains(&l.media_type.as_str()))
            .ok_or_else(|| anyhow::anyhow!("no Wasm layer ({WASM_LAYER_MEDIA_TYPE}) in the artifact"))?;
        if layer.data.len() > limits::MAX_FILTER_ARTIFACT {
            anyhow::bail!(
                "the Wasm layer is larger than {} bytes",
                limits::MAX_FILTER_ARTIFACT
            );
        }
        let d = digest(&layer.data);
        if let Some(want) = layers.get(i).map(|l| &l.digest) {
            if *want != d {
                anyhow::bail!("layer digest mismatch: manifest says {want}, content is {d}");
            }
        }
        let a = Artifact {
            bytes: layer.data.to_vec().into(),
            digest: d,
            manifest,
        };
        if let Err(e) = self.store(r, &a) {
            tracing::warn!(reference = %r, error = %format!("{e:#}"), "cannot write the filter cache");
        }
        tracing::info!(reference = %r, digest = %a.digest, manifest = %a.manifest, "pulled filter");
        Ok(a)
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        self.cache
            .join("blobs/sha256")
            .join(format!("{}.wasm", digest.trim_start_matches("sha256:")))
    }

    fn store(&self, r: &OciRef, a: &Artifact) -> anyhow::Result<()> {
        let blob = self.blob_path(&a.digest);
        write_atomic(&blob, &a.bytes)?;
        let entry = serde_json::to_vec(&CachedRef {
            manifest: a.manifest.clone(),
            layer: a.digest.clone(),
        })?;
        write_atomic(
            &self.cache.join("refs").join(format!("{}.json", r.cache_key())),
            &entry,
        )
    }

    fn cached(&self, r: &OciRef) -> Option<Artifact> {
        let entry = std::fs::read(self.cache.join("refs").join(format!("{}.json", r.cache_key()))).ok()?;
        let entry: CachedRef = serde_json::from_slice(&entry).ok()?;
        let bytes = std::fs::read(self.blob_path(&entry.layer)).ok()?;
        // The cache is re-verified: a corrupted file is no copy at all.
        (digest(&bytes) == entry.layer).then(|| Artifact {
            bytes: bytes.into(),
            digest: entry.layer,
            manifest: entry.manifest,
        })
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = path.with_extension("part");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

fn client_for(
    host: &str,
    settings: Option<&RegistryHost>,
    ca: Option<Vec<u8>>,
    timeout: std::time::Duration,
) -> Client {
    crate::tls::install_default_provider();
    let insecure = settings.is_some_and(|h| h.insecure);
    let config = ClientConfig {
        // Plain HTTP only for a host that asked for it.
        protocol: if insecure {
            ClientProtocol::HttpsExcept(vec![host.to_string()])
        } else {
            ClientProtocol::Https
        },
        extra_root_certificates: ca
            .map(|data| {
                vec![oci_client::client::Certificate {
                    encoding: oci_client::client::CertificateEncoding::Pem,
                    data,
                }]
            })
            .unwrap_or_default(),
        connect_timeout: Some(timeout),
        read_timeout: Some(timeout),
        user_agent: concat!("weir/", env!("CARGO_PKG_VERSION")),
        ..ClientConfig::default()
    };
    Client::new(config)
}

fn auth_for(settings: Option<&RegistryHost>) -> RegistryAuth {
    let Some(h) = settings else {
        return RegistryAuth::Anonymous;
    };
    let env = |v: &Option<String>| v.as_ref().and_then(|v| std::env::var(v).ok());
    if let Some(token) = h.token.clone().or_else(|| env(&h.token_env)) {
        return RegistryAuth::Bearer(token);
    }
    match (&h.username, h.password.clone().or_else(|| env(&h.password_env))) {
        (Some(u), Some(p)) => RegistryAuth::Basic(u.clone(), p),
        _ => RegistryAuth::Anonymous,
    }
}

/// Options of `weir filter push`.
pub struct PushOptions {
    /// Plain HTTP to the registry.
    pub insecure: bool,
    /// CA bundle for the registry's certificate.
    pub ca: Option<PathBuf>,
    /// Basic auth user.
    pub username: Option<String>,
    /// Basic auth password.
    pub password: Option<String>,
    /// Bearer token.
    pub token: Option<String>,
}

/// Publishes a filter component as a Wasm OCI artifact; returns the manifest digest.
pub async fn push(file: &Path, reference: &str, opts: PushOptions) -> anyhow::Result<String> {
    let r = OciRef::parse(reference).map_err(anyhow::Error::msg)?;
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    crate::filter::wasm::check_header(&file.display().to_string(), &bytes)?;
    let ca = match &opts.ca {
        Some(p) => Some(std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?),
        None => None,
    };
    let host = RegistryHost {
        insecure: opts.insecure,
        username: opts.username.clone(),
        password: opts.password.clone(),
        token: opts.token.clone(),
        ..RegistryHost::default()
    };
    let timeout = limits::DEFAULT_REGISTRY_TIMEOUT;
    let client = client_for(&r.registry, Some(&host), ca, timeout);
    let auth = auth_for(Some(&host));
    let layer = ImageLayer::new(bytes, WASM_LAYER_MEDIA_TYPE.to_string(), None);
    let config = oci_client::client::Config::new(b"{}".to_vec(), WASM_CONFIG_MEDIA_TYPE.to_string(), None);
    let reference = r.reference();
    client
        .push(&reference, &[layer], config, &auth, None)
        .await
        .with_context(|| format!("{r}: push failed"))?;
    let d = client
        .fetch_manifest_digest(&reference, &auth)
        .await
        .with_context(|| format!("{r}: pushed, but cannot read the manifest back"))?;
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_and_print_back() {
        for s in [
            "oci://127.0.0.1:5000/weir/auth:v1",
            "oci://registry.example.com/team/filters/rate-limit:1.2.3",
            "oci://r.io/a@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert_eq!(OciRef::parse(s).unwrap().to_string(), s);
        }
        let r = OciRef::parse("oci://h:5000/a/b:t").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_deref()),
            ("h:5000", "a/b", Some("t"))
        );
    }

    #[test]
    fn bad_references_say_why() {
        for (s, why) in [
            ("http://h/a:t", "must start with oci://"),
            ("oci://h", "no repository"),
            ("oci://h/a", "name a tag"),
            ("oci://h/A:t", "lower-case"),
            ("oci://h/a@sha256:abc", "64 lower-case hex"),
            ("oci://h/a@md5:abc", "sha256:<hex>"),
        ] {
            let e = OciRef::parse(s).unwrap_err();
            assert!(e.contains(why), "{s}: {e}");
        }
    }
}
