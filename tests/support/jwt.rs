//! JSON Web Tokens made at test time, signed the way an identity provider signs them: RS256
//! (RSA 2048, PKCS#1 v1.5), ES256 (P-256, `r || s`) and HS256, with the public JWK set a
//! provider would publish.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::Mac as _;
use rsa::signature::{SignatureEncoding as _, Signer as _};
use rsa::traits::PublicKeyParts as _;
use serde_json::{json, Value};

/// A signing key with its `kid`.
pub enum JwtKey {
    /// RS256.
    Rsa(String, Box<rsa::RsaPrivateKey>),
    /// ES256.
    Ec(String, p256::ecdsa::SigningKey),
    /// HS256.
    Hmac(String, Vec<u8>),
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

impl JwtKey {
    /// A fresh RSA 2048 key.
    pub fn rsa(kid: &str) -> JwtKey {
        let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).expect("RSA key");
        JwtKey::Rsa(kid.into(), Box::new(key))
    }

    /// A fresh P-256 key.
    pub fn ec(kid: &str) -> JwtKey {
        JwtKey::Ec(
            kid.into(),
            p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng),
        )
    }

    /// A shared secret.
    pub fn hmac(kid: &str, secret: &[u8]) -> JwtKey {
        JwtKey::Hmac(kid.into(), secret.to_vec())
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        match self {
            JwtKey::Rsa(k, _) | JwtKey::Ec(k, _) | JwtKey::Hmac(k, _) => k,
        }
    }

    /// The algorithm name.
    pub fn alg(&self) -> &'static str {
        match self {
            JwtKey::Rsa(..) => "RS256",
            JwtKey::Ec(..) => "ES256",
            JwtKey::Hmac(..) => "HS256",
        }
    }

    /// The public JWK (HMAC keys are not published; this panics for them).
    pub fn jwk(&self) -> Value {
        match self {
            JwtKey::Rsa(kid, k) => json!({
                "kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig",
                "n": b64(&k.n().to_bytes_be()), "e": b64(&k.e().to_bytes_be()),
            }),
            JwtKey::Ec(kid, k) => {
                let p = k.verifying_key().to_encoded_point(false);
                json!({
                    "kty": "EC", "kid": kid, "alg": "ES256", "use": "sig", "crv": "P-256",
                    "x": b64(p.x().unwrap()), "y": b64(p.y().unwrap()),
                })
            }
            JwtKey::Hmac(..) => panic!("HMAC secrets are not published in a JWK set"),
        }
    }

    /// `claims` signed, with the header `{"alg", "typ": "JWT", "kid"}`.
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_with_header(
            &json!({"alg": self.alg(), "typ": "JWT", "kid": self.kid()}),
            claims,
        )
    }

    /// `claims` signed by this key under any header (for tokens that lie about their key).
    pub fn sign_with_header(&self, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = match self {
            JwtKey::Rsa(_, k) => rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new((**k).clone())
                .sign(input.as_bytes())
                .to_vec(),
            JwtKey::Ec(_, k) => {
                let s: p256::ecdsa::Signature = k.sign(input.as_bytes());
                s.to_bytes().to_vec()
            }
            JwtKey::Hmac(_, secret) => {
                let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
                m.update(input.as_bytes());
                m.finalize().into_bytes().to_vec()
            }
        };
        format!("{input}.{}", b64(&sig))
    }
}

/// The JWK set publishing these keys.
pub fn jwks(keys: &[&JwtKey]) -> String {
    json!({ "keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>() }).to_string()
}

/// An unsigned token (`alg: none`), which every verifier must refuse.
pub fn unsigned(claims: &Value) -> String {
    format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"}).to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    )
}
