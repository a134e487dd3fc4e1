//! The `auth` filter end to end: JWTs signed at test time (RS256, ES256, HS256) checked against
//! a JWK set file and a JWK set served by a real identity-provider upstream, API keys, HTTP
//! basic (bcrypt and Argon2), and authorization rules on the mTLS peer identity.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use weir_tests::client::Client;
use weir_tests::jwt::{jwks, now, unsigned, JwtKey};
use weir_tests::pki::{client_config, Pki};
use weir_tests::proxy::{TestProxy, ADMIN};
use weir_tests::upstream::Upstream;

const AUTH: &str = env!("WEIR_FILTER_AUTH");

async fn send(c: &mut Client, method: &str, path: &str, headers: &[(&str, &str)]) -> http::Response<String> {
    c.send_text(method, path, "api.example.com", headers).await
}

fn challenges(r: &http::Response<String>) -> Vec<String> {
    r.headers()
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect()
}

/// One route to cluster `api` at `upstream` with the auth filter configured by `config`
/// (inline TOML), plus `extra` (clusters, listener TLS).
fn config(upstream: SocketAddr, filter: &str, listener_extra: &str, extra: &str) -> String {
    // TOML inline tables are one line.
    let filter = filter.replace('\n', " ");
    format!(
        "{ADMIN}\n[[listeners]]\nname = \"web\"\naddress = \"127.0.0.1:0\"\n{listener_extra}\n\
         [[routes]]\ncluster = \"api\"\nfilters = [{{ name = \"auth\", file = \"{AUTH}\", {filter} }}]\n\
         [clusters.api]\nendpoints = [\"{upstream}\"]\n{extra}\n"
    )
}

/// The value of the auth filter's `decisions` counter for a result and provider.
async fn decisions(proxy: &TestProxy, result: &str, provider: &str) -> u64 {
    let (_, m) = proxy.admin_get("/metrics").await;
    m.lines()
        .find(|l| {
            l.starts_with("weir_filter_auth_decisions_total{")
                && l.contains(&format!("result=\"{result}\""))
                && l.contains(&format!("provider=\"{provider}\""))
        })
        .map_or(0, |l| l.rsplit(' ').next().unwrap().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_are_checked_for_algorithm_key_issuer_audience_and_time() {
    let rsa = JwtKey::rsa("r1");
    let ec = JwtKey::ec("e1");
    let secret = b"0123456789abcdef0123456789abcdef";
    let hs = JwtKey::hmac("h1", secret);
    let impostor = JwtKey::rsa("r1");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("keys")).unwrap();
    std::fs::write(dir.path().join("keys/jwks.json"), jwks(&[&rsa, &ec])).unwrap();

    let up = Upstream::http1("api").start().await;
    let filter = r#"files = "keys", config = { realm = "orders", jwt = {
        issuer = "https://idp.test", audiences = ["orders"], algorithms = ["RS256", "ES256", "HS256"],
        jwks_file = "/files/jwks.json", secrets = [{ kid = "h1", secret = "0123456789abcdef0123456789abcdef" }],
        leeway = "5s", claim_to_headers = [{ claim = "sub", header = "x-user" }, { claim = "scope", header = "x-scope" }] } }"#;
    let proxy = TestProxy::start(&config(up.addr, filter, "", ""), dir.path()).await;
    let mut c = Client::h1(proxy.addr("web")).await;

    let t = now();
    let claims = |sub: &str| json!({"iss": "https://idp.test", "aud": "orders", "sub": sub, "exp": t + 300, "iat": t, "scope": "read write"});

    // Good tokens of each algorithm; the claims arrive as headers, forged ones are replaced,
    // and the token itself is not sent upstream.
    for (key, sub) in [(&rsa, "alice"), (&ec, "bob"), (&hs, "carol")] {
        let token = key.sign(&claims(sub));
        let r = send(
            &mut c,
            "GET",
            "/headers",
            &[("authorization", &format!("Bearer {token}")), ("x-user", "admin")],
        )
        .await;
        assert_eq!(r.status(), 200, "{} token: {}", key.alg(), r.body());
        assert!(r.body().contains(&format!("x-user: {sub}\n")), "{}", r.body());
        assert!(!r.body().contains("x-user: admin"), "{}", r.body());
        assert!(r.body().contains("x-scope: read write\n"), "{}", r.body());
        assert!(!r.body().contains("authorization"), "{}", r.body());
    }
    // An audience list containing ours, and an expiry within the leeway, pass.
    let mut cl = claims("dave");
    cl["aud"] = json!(["billing", "orders"]);
    // Expired 2 s ago when signed (not when the test began: signing in a debug build is slow).
    cl["exp"] = json!(now() - 2);
    let r = send(
        &mut c,
        "GET",
        "/",
        &[("authorization", &format!("Bearer {}", rsa.sign(&cl)))],
    )
    .await;
    assert_eq!(r.status(), 200, "{}", r.body());
    let allowed = up.hits();
    assert_eq!(allowed, 4);

    let good = rsa.sign(&claims("alice"));
    let tampered = {
        let parts: Vec<&str> = good.split('.').collect();
        let other = rsa.sign(&claims("root"));
        format!("{}.{}.{}", parts[0], other.split('.').nth(1).unwrap(), parts[2])
    };
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut cl = claims("mallory");
        f(&mut cl);
        rsa.sign(&cl)
    };
    // HS256 "signed" with the RSA public key, naming the RSA key: the algorithm confusion attack.
    let confused = {
        let public = serde_json::to_vec(&rsa.jwk()).unwrap();
        JwtKey::hmac("r1", &public).sign_with_header(
            &json!({"alg": "HS256", "typ": "JWT", "kid": "r1"}),
            &claims("mallory"),
        )
    };
    let bad: Vec<(&str, String)> = vec![
        ("expired", with(&|c| c["exp"] = json!(t - 60))),
        ("not yet valid", with(&|c| c["nbf"] = json!(t + 60))),
        ("wrong audience", with(&|c| c["aud"] = json!("billing"))),
        ("wrong issuer", with(&|c| c["iss"] = json!("https://evil.test"))),
        ("wrong key, same kid", impostor.sign(&claims("mallory"))),
        ("unknown kid", JwtKey::ec("e9").sign(&claims("mallory"))),
        ("alg none", unsigned(&claims("mallory"))),
        ("algorithm confusion", confused),
        ("tampered claims", tampered),
        (
            "wrong HMAC secret",
            JwtKey::hmac("h1", b"another secret of at least 32 bytes!").sign(&claims("mallory")),
        ),
        ("garbage", "not.a.token".into()),
    ];
    for (why, token) in &bad {
        let r = send(
            &mut c,
            "GET",
            "/",
            &[("authorization", &format!("Bearer {token}"))],
        )
        .await;
        assert_eq!(r.status(), 401, "{why}: {}", r.body());
        assert_eq!(
            challenges(&r),
            [r#"Bearer realm="orders", error="invalid_token""#],
            "{why}"
        );
        assert_eq!(r.body(), "unauthorized\n", "{why}: the client is told little");
    }
    let r = send(&mut c, "GET", "/", &[("x-user", "admin")]).await;
    assert_eq!(r.status(), 401);
    assert_eq!(challenges(&r), [r#"Bearer realm="orders""#]);
    assert_eq!(up.hits(), allowed, "nothing refused reached the upstream");

    assert_eq!(decisions(&proxy, "allowed", "jwt").await, 4);
    assert_eq!(
        decisions(&proxy, "unauthenticated", "jwt").await,
        bad.len() as u64
    );
    assert_eq!(decisions(&proxy, "unauthenticated", "none").await, 1);
}

/// An identity provider serving a JWK set that the test can rotate, counting fetches.
struct Idp {
    addr: SocketAddr,
    set: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Idp {
    async fn start(set: String) -> Idp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let set = Arc::new(Mutex::new(set));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (s, f) = (set.clone(), fetches.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (s, f) = (s.clone(), f.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (s, f) = (s.clone(), f.clone());
                        async move {
                            let mut r = if req.uri().path() == "/.well-known/jwks.json" {
                                f.fetch_add(1, Ordering::SeqCst);
                                http::Response::new(Full::new(Bytes::from(s.lock().unwrap().clone())))
                            } else {
                                let mut r = http::Response::new(Full::new(Bytes::from_static(b"not found")));
                                *r.status_mut() = http::StatusCode::NOT_FOUND;
                                r
                            };
                            r.headers_mut()
                                .insert("content-type", "application/json".parse().unwrap());
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Idp {
            addr,
            set,
            fetches,
            task,
        }
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_jwk_set_is_fetched_once_cached_and_refetched_for_a_new_key() {
    let r1 = JwtKey::rsa("r1");
    let e2 = JwtKey::ec("e2");
    let idp = Idp::start(jwks(&[&r1])).await;
    let up = Upstream::http1("api").start().await;
    let filter = r#"config = { jwt = { audiences = ["orders"], remote_jwks = {
        cluster = "idp", path = "/.well-known/jwks.json", cache_duration = "10m", refetch_interval = "1s" } } }"#;
    let extra = format!("[clusters.idp]\nendpoints = [\"{}\"]\n", idp.addr);
    let proxy = TestProxy::start(&config(up.addr, filter, "", &extra), Path::new(".")).await;
    let addr = proxy.addr("web");
    let t = now();
    let claims = json!({"aud": "orders", "sub": "svc", "exp": t + 600});

    assert_eq!(idp.fetches(), 0, "nothing is fetched before a token needs it");
    let token = format!("Bearer {}", r1.sign(&claims));
    let mut c = Client::h1(addr).await;
    assert_eq!(
        send(&mut c, "GET", "/", &[("authorization", &token)])
            .await
            .status(),
        200
    );
    // Many requests on several connections (so several filter instances): all served from
    // the one fetched copy the instances share.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::h1(addr).await;
            for _ in 0..15 {
                let r = send(&mut c, "GET", "/", &[("authorization", &token)]).await;
                assert_eq!(r.status(), 200, "{}", r.body());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(idp.fetches(), 1, "the JWK set was fetched once and cached");

    // Key rotation: a token signed by a key the cached set lacks makes the filter fetch again
    // (once the refetch interval since the last fetch has passed).
    *idp.set.lock().unwrap() = jwks(&[&r1, &e2]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let rotated = format!("Bearer {}", e2.sign(&claims));
    let r = send(&mut c, "GET", "/", &[("authorization", &rotated)]).await;
    assert_eq!(r.status(), 200, "{}", r.body());
    assert_eq!(idp.fetches(), 2);
    for _ in 0..10 {
        assert_eq!(
            send(&mut c, "GET", "/", &[("authorization", &rotated)])
                .await
                .status(),
            200
        );
    }
    assert_eq!(idp.fetches(), 2, "the new set is cached too");

    // Tokens naming unknown keys cannot make the filter hammer the identity provider: at
    // most one fetch per refetch interval.
    let stranger = format!("Bearer {}", JwtKey::ec("e9").sign(&claims));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let start = std::time::Instant::now();
    for _ in 0..20 {
        assert_eq!(
            send(&mut c, "GET", "/", &[("authorization", &stranger)])
                .await
                .status(),
            401
        );
    }
    // One fetch for the first stranger, then one more per whole interval the burst took (a
    // slow machine may take over a second for it).
    let allowed = 3 + start.elapsed().as_secs() as usize;
    assert!(
        idp.fetches() <= allowed,
        "{} fetches for 20 requests in {:?}",
        idp.fetches(),
        start.elapsed()
    );
    assert_eq!(
        send(&mut c, "GET", "/", &[("authorization", &token)])
            .await
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_identities_are_allowed_by_rule_and_denied_by_default() {
    let pki = Pki::new("mesh");
    let server = pki.issue("server", "proxy", &["proxy.test"], None);
    let frontend = pki.issue(
        "frontend",
        "frontend",
        &["frontend.test"],
        Some("spiffe://cluster.local/ns/web/sa/frontend"),
    );
    let batch = pki.issue(
        "batch",
        "batch",
        &["batch.test"],
        Some("spiffe://cluster.local/ns/batch/sa/worker"),
    );
    let ops = pki.issue(
        "ops",
        "ops",
        &["ops.test"],
        Some("spiffe://cluster.local/ns/ops/sa/admin"),
    );
    let up = Upstream::http1("api").start().await;
    let filter = r#"config = { rules = [
        { principals = ["spiffe://cluster.local/ns/web/sa/frontend"], methods = ["GET"], paths = ["/api/*"] },
        { principals = ["spiffe://cluster.local/ns/ops/*"] },
    ] }"#;
    let tls = format!(
        "tls = {{ cert = \"{}\", key = \"{}\", client_ca = \"{}\" }}",
        server.cert.display(),
        server.key.display(),
        pki.ca.display()
    );
    let proxy = TestProxy::start(&config(up.addr, filter, &tls, ""), pki.dir()).await;
    let addr = proxy.addr("web");
    let ca = pki.ca.clone();
    let client = |leaf: &weir_tests::pki::Leaf| {
        let cfg = client_config(&ca, &[b"h2"], Some(leaf));
        async move { Client::tls(addr, "proxy.test", cfg).await.unwrap() }
    };

    let mut c = client(&frontend).await;
    assert_eq!(send(&mut c, "GET", "/api/orders", &[]).await.status(), 200);
    for (method, path) in [("POST", "/api/orders"), ("GET", "/admin"), ("GET", "/apis")] {
        let r = send(&mut c, method, path, &[]).await;
        assert_eq!(r.status(), 403, "{method} {path}");
        assert!(
            challenges(&r).is_empty(),
            "a peer certificate is no credential to retry with"
        );
        assert_eq!(r.body(), "forbidden\n");
    }
    let mut c = client(&batch).await;
    assert_eq!(
        send(&mut c, "GET", "/api/orders", &[]).await.status(),
        403,
        "not the allowed identity"
    );
    let mut c = client(&ops).await;
    assert_eq!(
        send(&mut c, "DELETE", "/admin/cache", &[]).await.status(),
        200,
        "a namespace prefix rule"
    );
    assert_eq!(up.hits(), 2);
    assert_eq!(decisions(&proxy, "allowed", "mtls").await, 2);
    assert_eq!(decisions(&proxy, "forbidden", "mtls").await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_and_basic_credentials_good_and_bad() {
    use argon2::password_hash::{PasswordHasher as _, SaltString};
    use sha2::Digest as _;
    let key_hash: String = sha2::Sha256::digest(b"ci-key-7f3a")
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let bcrypt_hash = bcrypt::hash("s3cret", 5).unwrap();
    let argon_hash = argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon2::Params::new(1024, 1, 1, None).unwrap(),
    )
    .hash_password(b"read-only", &SaltString::generate(&mut rand::rngs::OsRng))
    .unwrap()
    .to_string();
    let up = Upstream::http1("api").start().await;
    let filter = format!(
        r#"config = {{ realm = "ops", api_keys = {{ name_header = "x-api-client", keys = [{{ name = "ci", sha256 = "{key_hash}" }}] }},
        basic = {{ user_header = "x-user", users = [{{ name = "ops", hash = "{bcrypt_hash}" }}, {{ name = "auditor", hash = "{argon_hash}" }}] }} }}"#
    );
    let proxy = TestProxy::start(&config(up.addr, &filter, "", ""), Path::new(".")).await;
    let mut c = Client::h1(proxy.addr("web")).await;
    let basic = |user: &str, pass: &str| {
        use base64::Engine as _;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        )
    };

    let r = send(
        &mut c,
        "GET",
        "/headers",
        &[("x-api-key", "ci-key-7f3a"), ("x-api-client", "admin")],
    )
    .await;
    assert_eq!(r.status(), 200, "{}", r.body());
    assert!(r.body().contains("x-api-client: ci\n"), "{}", r.body());
    assert!(
        !r.body().contains("x-api-key"),
        "the key is not sent upstream: {}",
        r.body()
    );
    let r = send(&mut c, "GET", "/", &[("x-api-key", "ci-key-7f3b")]).await;
    assert_eq!(r.status(), 401);
    assert_eq!(challenges(&r), [r#"ApiKey realm="ops", header="x-api-key""#]);

    for _ in 0..3 {
        // The first check runs bcrypt; the next ones hit the shared cache.
        let r = send(
            &mut c,
            "GET",
            "/headers",
            &[("authorization", &basic("ops", "s3cret"))],
        )
        .await;
        assert_eq!(r.status(), 200, "{}", r.body());
        assert!(r.body().contains("x-user: ops\n"), "{}", r.body());
        assert!(!r.body().contains("authorization"), "{}", r.body());
    }
    let r = send(
        &mut c,
        "GET",
        "/headers",
        &[("authorization", &basic("auditor", "read-only"))],
    )
    .await;
    assert_eq!(r.status(), 200, "argon2id: {}", r.body());
    assert!(r.body().contains("x-user: auditor\n"), "{}", r.body());
    for (user, pass) in [("ops", "wrong"), ("nobody", "s3cret"), ("auditor", "s3cret")] {
        let r = send(&mut c, "GET", "/", &[("authorization", &basic(user, pass))]).await;
        assert_eq!(r.status(), 401, "{user}:{pass}");
        assert_eq!(challenges(&r), [r#"Basic realm="ops", charset="UTF-8""#]);
    }
    let r = send(&mut c, "GET", "/", &[("authorization", "Basic !!notbase64")]).await;
    assert_eq!(r.status(), 401);

    let r = send(&mut c, "GET", "/", &[]).await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        challenges(&r),
        [
            r#"ApiKey realm="ops", header="x-api-key""#,
            r#"Basic realm="ops", charset="UTF-8""#
        ],
        "every way in is offered"
    );
    assert_eq!(up.hits(), 5);
    assert_eq!(decisions(&proxy, "allowed", "api_keys").await, 1);
    assert_eq!(decisions(&proxy, "allowed", "basic").await, 4);
    assert_eq!(decisions(&proxy, "unauthenticated", "basic").await, 4);
}
