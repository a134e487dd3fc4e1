//! JSON Web Tokens: keys (JWK sets, HMAC secrets), the compact serialisation, signature
//! checks (RS256, ES256, HS256) and the registered claims (`iss`, `aud`, `exp`, `nbf`).
//!
//! Everything here is pure: no host calls. Keys are parsed once, when the filter loads or a
//! JWK set is fetched; per token only base64url decoding, one JSON parse per part and the
//! signature check run.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use p256::ecdsa::signature::Verifier as _;
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::Sha256;

/// Longest token accepted (bytes): bounds the work an anonymous client can cause.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// A signature algorithm this filter verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alg {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
    /// ECDSA on P-256 with SHA-256.
    Es256,
    /// HMAC with SHA-256.
    Hs256,
}

impl Alg {
    /// Parses a JOSE `alg` name; only the three supported ones.
    pub fn parse(s: &str) -> Option<Alg> {
        match s {
            "RS256" => Some(Alg::Rs256),
            "ES256" => Some(Alg::Es256),
            "HS256" => Some(Alg::Hs256),
            _ => None,
        }
    }

    /// The JOSE name.
    pub fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Es256 => "ES256",
            Alg::Hs256 => "HS256",
        }
    }
}

impl fmt::Display for Alg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Key material, ready to verify with.
#[derive(Clone)]
enum Material {
    Rsa(rsa::pkcs1v15::VerifyingKey<Sha256>),
    Ec(p256::ecdsa::VerifyingKey),
    Hmac(Vec<u8>),
}

/// A verification key and the name (`kid`) tokens select it by.
#[derive(Clone)]
pub struct Key {
    /// The key id, if the key has one.
    pub kid: Option<String>,
    material: Material,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print HMAC secrets.
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg())
            .finish()
    }
}

/// Smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;
/// Smallest HMAC secret accepted, in bytes (RFC 7518 §3.2: at least the hash size).
pub const MIN_HMAC_BYTES: usize = 32;

impl Key {
    /// The algorithm this key verifies.
    pub fn alg(&self) -> Alg {
        match self.material {
            Material::Rsa(_) => Alg::Rs256,
            Material::Ec(_) => Alg::Es256,
            Material::Hmac(_) => Alg::Hs256,
        }
    }

    /// An HS256 secret.
    pub fn hmac(kid: Option<String>, secret: Vec<u8>) -> Result<Key, String> {
        if secret.len() < MIN_HMAC_BYTES {
            return Err(format!(
                "an HS256 secret must have at least {MIN_HMAC_BYTES} bytes, this one has {}",
                secret.len()
            ));
        }
        Ok(Key {
            kid,
            material: Material::Hmac(secret),
        })
    }

    /// Whether `signature` signs `input` under this key.
    fn verifies(&self, input: &[u8], signature: &[u8]) -> bool {
        match &self.material {
            Material::Rsa(k) => {
                rsa::pkcs1v15::Signature::try_from(signature).is_ok_and(|s| k.verify(input, &s).is_ok())
            }
            Material::Ec(k) => {
                p256::ecdsa::Signature::from_slice(signature).is_ok_and(|s| k.verify(input, &s).is_ok())
            }
            Material::Hmac(secret) => {
                let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
                    return false;
                };
                mac.update(input);
                // Constant time.
                mac.verify_slice(signature).is_ok()
            }
        }
    }
}

fn b64url(field: &str, s: &str) -> Result<Vec<u8>, String> {
    URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|e| format!("{field} is not base64url: {e}"))
}

/// One JWK as published, only the members used here.
#[derive(Deserialize)]
struct RawJwk {
    kty: Option<String>,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    crv: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x: Option<String>,
    y: Option<String>,
    k: Option<String>,
}

/// A parsed JWK set: the keys this filter can use, and why others were left out.
#[derive(Debug, Default)]
pub struct KeySet {
    /// Usable keys, in the set's order.
    pub keys: Vec<Key>,
    /// One line per key left out (encryption keys, other key types or curves).
    pub skipped: Vec<String>,
}

/// Parses a JWK set (`{"keys": [...]}`). Keys of a kind this filter does not verify with
/// (encryption keys, RSA-PSS, P-384, Ed25519, ...) are skipped and listed; a malformed key of
/// a supported kind is an error naming it.
pub fn parse_jwks(v: &Value) -> Result<KeySet, String> {
    parse_set(v, false)
}

/// As [`parse_jwks`] for a set fetched from an identity provider: a malformed key is skipped
/// and listed like an unsupported one, so one bad entry (a short RSA key, a point off the
/// curve) does not throw away the good keys beside it. A configured set stays strict: there a
/// broken key is a mistake to report.
pub fn parse_fetched_jwks(v: &Value) -> Result<KeySet, String> {
    parse_set(v, true)
}

fn parse_set(v: &Value, lenient: bool) -> Result<KeySet, String> {
    let keys = v
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("not a JWK set: no \"keys\" array")?;
    let mut set = KeySet::default();
    for (i, raw) in keys.iter().enumerate() {
        let jwk: RawJwk = match serde_json::from_value(raw.clone()) {
            Ok(j) => j,
            Err(e) if lenient => {
                set.skipped.push(format!("keys[{i}]: not a JWK: {e}"));
                continue;
            }
            Err(e) => return Err(format!("keys[{i}]: not a JWK: {e}")),
        };
        let at = match &jwk.kid {
            Some(kid) => format!("keys[{i}] (kid {kid:?})"),
            None => format!("keys[{i}]"),
        };
        match parse_jwk(&jwk) {
            Ok(Some(key)) => set.keys.push(key),
            Ok(None) => set.skipped.push(format!(
                "{at}: kty {:?}, alg {:?}, use {:?} is not used for RS256, ES256 or HS256",
                jwk.kty.as_deref().unwrap_or("-"),
                jwk.alg.as_deref().unwrap_or("-"),
                jwk.use_.as_deref().unwrap_or("-")
            )),
            Err(e) if lenient => set.skipped.push(format!("{at}: {e}")),
            Err(e) => return Err(format!("{at}: {e}")),
        }
    }
    Ok(set)
}

/// One JWK: `Ok(None)` when it is of a kind not used here.
fn parse_jwk(jwk: &RawJwk) -> Result<Option<Key>, String> {
    if jwk.use_.as_deref().is_some_and(|u| u != "sig") {
        return Ok(None);
    }
    let want = |alg: &str| jwk.alg.as_deref().is_none_or(|a| a == alg);
    let field = |name: &str, v: &Option<String>| -> Result<Vec<u8>, String> {
        let s = v.as_deref().ok_or_else(|| format!("{name} is missing"))?;
        b64url(name, s)
    };
    let material = match jwk.kty.as_deref() {
        Some("RSA") if want("RS256") => {
            let n = rsa::BigUint::from_bytes_be(&field("n", &jwk.n)?);
            let e = rsa::BigUint::from_bytes_be(&field("e", &jwk.e)?);
            let bits = n.bits();
            if bits < MIN_RSA_BITS {
                return Err(format!(
                    "RSA key of {bits} bits; at least {MIN_RSA_BITS} are needed"
                ));
            }
            let key = rsa::RsaPublicKey::new(n, e).map_err(|e| format!("invalid RSA key: {e}"))?;
            Material::Rsa(rsa::pkcs1v15::VerifyingKey::new(key))
        }
        Some("EC") if want("ES256") && jwk.crv.as_deref() == Some("P-256") => {
            let x = field("x", &jwk.x)?;
            let y = field("y", &jwk.y)?;
            if x.len() != 32 || y.len() != 32 {
                return Err("P-256 coordinates must have 32 bytes".into());
            }
            let point = p256::EncodedPoint::from_affine_coordinates(
                p256::FieldBytes::from_slice(&x),
                p256::FieldBytes::from_slice(&y),
                false,
            );
            Material::Ec(
                p256::ecdsa::VerifyingKey::from_encoded_point(&point)
                    .map_err(|_| "the point is not on P-256".to_string())?,
            )
        }
        Some("oct") if want("HS256") => {
            return Key::hmac(jwk.kid.clone(), field("k", &jwk.k)?).map(Some);
        }
        Some("RSA" | "EC" | "oct" | "OKP") => return Ok(None),
        Some(other) => return Err(format!("unknown kty {other:?}")),
        None => return Err("kty is missing".into()),
    };
    Ok(Some(Key {
        kid: jwk.kid.clone(),
        material,
    }))
}

/// Why a token was refused: the log says exactly this, the client only `invalid_token`.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenError {
    /// Not three base64url parts of JSON.
    Malformed(String),
    /// `alg: none` (an unsigned token).
    AlgNone,
    /// An algorithm not in `jwt.algorithms`.
    AlgNotAllowed(String),
    /// The header lists extensions (`crit`) this filter does not implement.
    Crit,
    /// No key has the token's `kid`.
    UnknownKid(String),
    /// The token names no `kid` and no key of its algorithm is configured.
    NoKey(Alg),
    /// No key verifies the signature.
    BadSignature,
    /// `exp` is past (beyond the leeway) by this many seconds.
    Expired {
        /// Seconds since `exp`.
        ago: u64,
        /// The leeway applied.
        leeway: u64,
    },
    /// `nbf` is in the future (beyond the leeway) by this many seconds.
    NotYetValid {
        /// Seconds until `nbf`.
        in_secs: u64,
        /// The leeway applied.
        leeway: u64,
    },
    /// `exp` is required and missing.
    MissingExp,
    /// `iss` differs.
    WrongIssuer(Option<String>),
    /// `aud` names none of the configured audiences.
    WrongAudience(Value),
    /// No keys could be had (the JWK set fetch failed).
    NoKeys(String),
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::Malformed(why) => write!(f, "malformed token: {why}"),
            TokenError::AlgNone => f.write_str("unsigned token (alg none) refused"),
            TokenError::AlgNotAllowed(a) => write!(f, "algorithm {a:?} is not allowed"),
            TokenError::Crit => f.write_str("the token's crit header names unsupported extensions"),
            TokenError::UnknownKid(k) => write!(f, "unknown kid {k:?}"),
            TokenError::NoKey(a) => write!(f, "no {a} key to verify a token without kid"),
            TokenError::BadSignature => f.write_str("bad signature"),
            TokenError::Expired { ago, leeway } => {
                write!(f, "expired {ago} s ago (leeway {leeway} s)")
            }
            TokenError::NotYetValid { in_secs, leeway } => {
                write!(
                    f,
                    "not valid before {in_secs} s from now (nbf; leeway {leeway} s)"
                )
            }
            TokenError::MissingExp => f.write_str("no exp claim, and jwt.require_exp is set"),
            TokenError::WrongIssuer(Some(i)) => write!(f, "wrong issuer {i:?}"),
            TokenError::WrongIssuer(None) => f.write_str("no issuer (iss) claim"),
            TokenError::WrongAudience(Value::Null) => f.write_str("no audience (aud) claim"),
            TokenError::WrongAudience(a) => write!(f, "wrong audience {a}"),
            TokenError::NoKeys(why) => write!(f, "no keys to verify with: {why}"),
        }
    }
}

#[derive(Deserialize)]
struct RawHeader {
    alg: Option<String>,
    kid: Option<String>,
    crit: Option<Value>,
}

/// A token split and decoded, not yet verified.
#[derive(Debug)]
pub struct Token<'a> {
    /// The algorithm named by the header (already checked to be one of the three).
    pub alg: Alg,
    /// The header's key id.
    pub kid: Option<String>,
    signing_input: &'a str,
    payload: &'a str,
    signature: Vec<u8>,
}

/// Splits and decodes a compact JWS, checking its algorithm against `allowed`.
pub fn decode<'a>(token: &'a str, allowed: &[Alg]) -> Result<Token<'a>, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed(format!(
            "{} bytes, more than {MAX_TOKEN_LEN}",
            token.len()
        )));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(TokenError::Malformed("not three dot-separated parts".into()));
    };
    // Compact JWS is unpadded base64url: a padded variant is another spelling of the same
    // token, which would slip past anything keyed by the token's text.
    if token.contains('=') {
        return Err(TokenError::Malformed("padding ('=') in a compact JWS".into()));
    }
    let header = b64url("the header", h).map_err(TokenError::Malformed)?;
    let header: RawHeader = serde_json::from_slice(&header)
        .map_err(|e| TokenError::Malformed(format!("the header is not a JSON object: {e}")))?;
    let alg = header
        .alg
        .ok_or_else(|| TokenError::Malformed("the header has no alg".into()))?;
    if alg.eq_ignore_ascii_case("none") {
        return Err(TokenError::AlgNone);
    }
    let alg = match Alg::parse(&alg) {
        Some(a) if allowed.contains(&a) => a,
        _ => return Err(TokenError::AlgNotAllowed(alg)),
    };
    if header.crit.is_some() {
        return Err(TokenError::Crit);
    }
    let signature = b64url("the signature", s).map_err(TokenError::Malformed)?;
    Ok(Token {
        alg,
        kid: header.kid,
        signing_input: &token[..h.len() + 1 + p.len()],
        payload: p,
        signature,
    })
}

/// What a key lookup found for a token.
pub enum Lookup {
    /// A key verified the signature.
    Verified,
    /// Keys of the token's `kid` (or, without one, of its algorithm) exist; none verified.
    BadSignature,
    /// No key matched: the caller may fetch fresh keys and try again.
    NoMatch,
}

impl Token<'_> {
    /// Checks the signature against the candidate keys in `keys`: those with the token's
    /// `kid` (or every key when the token has none) whose algorithm is the token's.
    pub fn verify_with(&self, keys: &[Key]) -> Lookup {
        let mut any = false;
        for k in keys {
            if k.alg() != self.alg {
                continue;
            }
            if let Some(kid) = &self.kid {
                if k.kid.as_deref() != Some(kid.as_str()) {
                    continue;
                }
            }
            any = true;
            if k.verifies(self.signing_input.as_bytes(), &self.signature) {
                return Lookup::Verified;
            }
        }
        if any {
            Lookup::BadSignature
        } else {
            Lookup::NoMatch
        }
    }

    /// The error for a token no key matched.
    pub fn no_match(&self) -> TokenError {
        match &self.kid {
            Some(k) => TokenError::UnknownKid(k.clone()),
            None => TokenError::NoKey(self.alg),
        }
    }

    /// The claims (call after the signature verified).
    pub fn claims(&self) -> Result<Map<String, Value>, TokenError> {
        let bytes = b64url("the payload", self.payload).map_err(TokenError::Malformed)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| TokenError::Malformed(format!("the payload is not a JSON object: {e}")))
    }
}

/// The claim checks of `jwt`'s config.
#[derive(Debug, Clone)]
pub struct ClaimRules {
    /// Required `iss`.
    pub issuer: Option<String>,
    /// `aud` must name one of these (none: not checked).
    pub audiences: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway: u64,
    /// Refuse tokens without `exp`.
    pub require_exp: bool,
}

fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, TokenError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| TokenError::Malformed(format!("{name} is not a number"))),
    }
}

impl ClaimRules {
    /// Checks `exp`, `nbf`, `iss` and `aud` at `now` (seconds since the epoch).
    pub fn check(&self, claims: &Map<String, Value>, now: u64) -> Result<(), TokenError> {
        let now_f = now as f64;
        let leeway = self.leeway as f64;
        match numeric_date(claims, "exp")? {
            Some(exp) if now_f > exp + leeway => {
                return Err(TokenError::Expired {
                    ago: (now_f - exp) as u64,
                    leeway: self.leeway,
                })
            }
            None if self.require_exp => return Err(TokenError::MissingExp),
            _ => {}
        }
        if let Some(nbf) = numeric_date(claims, "nbf")? {
            if nbf > now_f + leeway {
                return Err(TokenError::NotYetValid {
                    in_secs: (nbf - now_f).ceil() as u64,
                    leeway: self.leeway,
                });
            }
        }
        if let Some(want) = &self.issuer {
            let iss = claims.get("iss").and_then(Value::as_str);
            if iss != Some(want.as_str()) {
                return Err(TokenError::WrongIssuer(
                    claims
                        .get("iss")
                        .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string)),
                ));
            }
        }
        if !self.audiences.is_empty() {
            let aud = claims.get("aud").cloned().unwrap_or(Value::Null);
            let ok = match &aud {
                Value::String(a) => self.audiences.iter().any(|w| w == a),
                Value::Array(list) => list
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|a| self.audiences.iter().any(|w| w == a)),
                _ => false,
            };
            if !ok {
                return Err(TokenError::WrongAudience(aud));
            }
        }
        Ok(())
    }
}

/// A claim as a header value: strings as they are, numbers and booleans as text, arrays
/// joined with `,`; objects as compact JSON. `path` may be dotted (`realm.role`).
pub fn claim_value(claims: &Map<String, Value>, path: &str) -> Option<String> {
    let mut parts = path.split('.');
    let mut v = claims.get(parts.next()?)?;
    for p in parts {
        v = v.get(p)?;
    }
    fn scalar(v: &Value) -> String {
        match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }
    match v {
        Value::Null => None,
        Value::Array(items) => Some(items.iter().map(scalar).collect::<Vec<_>>().join(",")),
        other => Some(scalar(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn jwk_sets_skip_what_they_cannot_use_and_refuse_what_is_broken() {
        let set = parse_jwks(&json!({"keys": [
            {"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"},
            {"kty": "OKP", "crv": "Ed25519", "x": "AA"},
            {"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA"},
            {"kty": "oct", "kid": "h", "k": URL_SAFE_NO_PAD.encode([7u8; 32])},
        ]}))
        .unwrap();
        assert_eq!(set.keys.len(), 1);
        assert_eq!(set.keys[0].alg(), Alg::Hs256);
        assert_eq!(set.skipped.len(), 3, "{:?}", set.skipped);

        let e = parse_jwks(&json!({"keys": [{"kty": "RSA", "kid": "small", "n": "AQAB", "e": "AQAB"}]}))
            .unwrap_err();
        assert!(e.contains("kid \"small\"") && e.contains("bits"), "{e}");
        let e =
            parse_jwks(&json!({"keys": [{"kty": "EC", "crv": "P-256", "x": "!!", "y": "AA"}]})).unwrap_err();
        assert!(e.contains("x is not base64url"), "{e}");
        let e = parse_jwks(&json!({"keys": [{"kty": "oct", "k": "c2hvcnQ"}]})).unwrap_err();
        assert!(e.contains("at least 32 bytes"), "{e}");
        assert!(parse_jwks(&json!({"nokeys": []})).unwrap_err().contains("keys"));
    }

    #[test]
    fn tokens_are_three_parts_with_a_known_algorithm() {
        let enc = |v: Value| URL_SAFE_NO_PAD.encode(v.to_string());
        let all = [Alg::Rs256, Alg::Es256, Alg::Hs256];
        let none = format!("{}.{}.", enc(json!({"alg": "none"})), enc(json!({"sub": "x"})));
        assert_eq!(decode(&none, &all).unwrap_err(), TokenError::AlgNone);
        let none = format!("{}.{}.", enc(json!({"alg": "NONE"})), enc(json!({})));
        assert_eq!(decode(&none, &all).unwrap_err(), TokenError::AlgNone);
        let hs = format!("{}.{}.c2ln", enc(json!({"alg": "HS256"})), enc(json!({})));
        assert_eq!(
            decode(&hs, &[Alg::Rs256]).unwrap_err(),
            TokenError::AlgNotAllowed("HS256".into())
        );
        let rs512 = format!("{}.{}.c2ln", enc(json!({"alg": "RS512"})), enc(json!({})));
        assert_eq!(
            decode(&rs512, &all).unwrap_err(),
            TokenError::AlgNotAllowed("RS512".into())
        );
        let crit = format!(
            "{}.{}.c2ln",
            enc(json!({"alg": "HS256", "crit": ["b64"]})),
            enc(json!({}))
        );
        assert_eq!(decode(&crit, &all).unwrap_err(), TokenError::Crit);
        assert!(matches!(decode("a.b", &all), Err(TokenError::Malformed(_))));
        assert!(matches!(decode("a.b.c.d", &all), Err(TokenError::Malformed(_))));
        assert!(matches!(decode("***.b.c", &all), Err(TokenError::Malformed(_))));
        let t = decode(&hs, &all).unwrap();
        assert_eq!((t.alg, t.kid.as_deref()), (Alg::Hs256, None));
    }

    #[test]
    fn claims_check_time_issuer_and_audience() {
        let rules = ClaimRules {
            issuer: Some("idp".into()),
            audiences: vec!["api".into(), "web".into()],
            leeway: 60,
            require_exp: true,
        };
        let claims = |v: Value| v.as_object().unwrap().clone();
        let now = 1_000_000;
        let ok = |extra: Value| {
            let mut c = claims(json!({"iss": "idp", "aud": "api", "exp": now + 10}));
            c.extend(claims(extra));
            rules.check(&c, now)
        };
        assert_eq!(ok(json!({})), Ok(()));
        assert_eq!(ok(json!({"exp": now - 59})), Ok(()), "within the leeway");
        assert_eq!(
            ok(json!({"exp": now - 75})),
            Err(TokenError::Expired { ago: 75, leeway: 60 })
        );
        assert_eq!(ok(json!({"nbf": now + 30})), Ok(()), "within the leeway");
        assert_eq!(
            ok(json!({"nbf": now + 300})),
            Err(TokenError::NotYetValid {
                in_secs: 300,
                leeway: 60
            })
        );
        assert_eq!(ok(json!({"aud": ["x", "web"]})), Ok(()));
        assert_eq!(
            ok(json!({"aud": ["x", "y"]})),
            Err(TokenError::WrongAudience(json!(["x", "y"])))
        );
        assert_eq!(
            ok(json!({"iss": "other"})),
            Err(TokenError::WrongIssuer(Some("other".into())))
        );
        assert!(matches!(
            ok(json!({"exp": "soon"})),
            Err(TokenError::Malformed(_))
        ));
        let mut c = claims(json!({"iss": "idp", "aud": "api"}));
        assert_eq!(rules.check(&c, now), Err(TokenError::MissingExp));
        c.insert("exp".into(), json!(now as f64 + 0.5));
        assert_eq!(rules.check(&c, now), Ok(()), "NumericDate may have a fraction");
    }

    #[test]
    fn claims_become_header_values() {
        let c =
            json!({"sub": "alice", "n": 7, "admin": true, "groups": ["a", "b"], "realm": {"role": "ops"}});
        let c = c.as_object().unwrap();
        assert_eq!(claim_value(c, "sub").as_deref(), Some("alice"));
        assert_eq!(claim_value(c, "n").as_deref(), Some("7"));
        assert_eq!(claim_value(c, "admin").as_deref(), Some("true"));
        assert_eq!(claim_value(c, "groups").as_deref(), Some("a,b"));
        assert_eq!(claim_value(c, "realm.role").as_deref(), Some("ops"));
        assert_eq!(claim_value(c, "missing"), None);
    }
}
