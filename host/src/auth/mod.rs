//! Token verification and minting: the only module that knows JWT
//! (PROTOCOL.md §1). Tokens are never logged, and error messages never
//! contain them.

pub mod jwks;

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::JwtConfig;
use jwks::JwksKeys;

/// The role given to tokens without a `role` claim.
pub const DEFAULT_ROLE: &str = "user";

/// The latest `exp` taken as given (9999-12-31T23:59:59Z): a later one is
/// clamped to it, so that no expiry arithmetic (a `SystemTime`, a timer, an
/// RFC 3339 date) can overflow on a value a token chose.
pub const MAX_EXP: u64 = 253_402_300_799;

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The user (or service) id.
    pub sub: String,
    /// The role; `user` when the token has none.
    pub role: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
}

impl Claims {
    /// The moment the token stops being accepted (expiry plus leeway).
    pub fn expires_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.exp)
    }
}

/// Why a request is not authenticated.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    /// No token was presented.
    #[error("missing token")]
    Missing,
    /// The `Authorization` header is not `Bearer <token>`.
    #[error("the Authorization header must be `Bearer <token>`")]
    NotBearer,
    /// The token was rejected.
    #[error("invalid token: {0}")]
    Invalid(&'static str),
    /// The token names a `kid` the JWKS does not have (yet).
    #[error("invalid token: unknown signing key")]
    UnknownKey,
}

/// Why the authenticator could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    /// An algorithm name is unknown or `none`.
    #[error("unknown JWT algorithm `{0}`")]
    UnknownAlgorithm(String),
    /// The PEM public key could not be parsed.
    #[error("invalid PEM public key: {0}")]
    BadPublicKey(String),
    /// An allowed algorithm has no key to verify it with.
    #[error("JWT algorithm {0:?} is allowed but no key for it is configured")]
    NoKey(Algorithm),
}

#[derive(Deserialize)]
struct RawClaims {
    sub: Option<serde_json::Value>,
    role: Option<serde_json::Value>,
    exp: serde_json::Number,
}

#[derive(Serialize)]
struct MintedClaims<'a> {
    sub: &'a str,
    role: &'a str,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// Verifies tokens against the configured keys, algorithms and claims.
pub struct Authenticator {
    secret: Option<(DecodingKey, EncodingKey)>,
    public_key: Option<DecodingKey>,
    jwks: Option<Arc<JwksKeys>>,
    algorithms: Vec<Algorithm>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: Duration,
    max_sub_bytes: usize,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys stay out of debug output.
        f.debug_struct("Authenticator")
            .field("algorithms", &self.algorithms)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

fn is_ec(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::ES256 | Algorithm::ES384)
}

impl Authenticator {
    /// Builds the verifier. The default allow-list is HS256 (when a secret is
    /// set) plus what the public key implies (RS256 for RSA, ES256 for EC),
    /// plus RS256 and ES256 with a JWKS URL. JWKS keys are fetched by
    /// [`jwks::JwksKeys::refresh`], not here.
    pub fn new(config: &JwtConfig) -> Result<Self, AuthSetupError> {
        let jwks = config
            .jwks_url
            .as_deref()
            .map(|url| Arc::new(JwksKeys::new(url, config.jwks_refetch)));
        let secret = config.secret.as_deref().map(|secret| {
            (
                DecodingKey::from_secret(secret.as_bytes()),
                EncodingKey::from_secret(secret.as_bytes()),
            )
        });
        let (public_key, implied) = match config.public_key_pem.as_deref() {
            None => (None, None),
            Some(pem) => match DecodingKey::from_rsa_pem(pem.as_bytes()) {
                Ok(key) => (Some(key), Some(Algorithm::RS256)),
                Err(_) => {
                    let key = DecodingKey::from_ec_pem(pem.as_bytes())
                        .map_err(|err| AuthSetupError::BadPublicKey(err.to_string()))?;
                    (Some(key), Some(Algorithm::ES256))
                }
            },
        };
        let algorithms = match &config.algorithms {
            Some(names) => names
                .iter()
                .map(|name| {
                    Algorithm::from_str(name)
                        .map_err(|_| AuthSetupError::UnknownAlgorithm(name.clone()))
                })
                .collect::<Result<Vec<_>, _>>()?,
            None => {
                let mut algorithms: Vec<Algorithm> = secret
                    .as_ref()
                    .map(|_| Algorithm::HS256)
                    .into_iter()
                    .chain(implied)
                    .collect();
                if jwks.is_some() {
                    for alg in [Algorithm::RS256, Algorithm::ES256] {
                        if !algorithms.contains(&alg) {
                            algorithms.push(alg);
                        }
                    }
                }
                algorithms
            }
        };
        for &alg in &algorithms {
            let has_key = if is_hmac(alg) {
                secret.is_some()
            } else {
                public_key.is_some() || jwks.is_some()
            };
            if !has_key {
                return Err(AuthSetupError::NoKey(alg));
            }
        }
        Ok(Self {
            secret,
            public_key,
            jwks,
            algorithms,
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            leeway: config.leeway,
            max_sub_bytes: config.max_sub_bytes,
        })
    }

    /// The clock leeway applied to `exp` and `nbf`.
    pub fn leeway(&self) -> Duration {
        self.leeway
    }

    /// Verifies a token: allowed algorithm, signature, `exp` (required),
    /// `nbf`, `iss`/`aud` when configured, a non-empty string `sub`.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::Invalid("malformed token or unsupported algorithm"))?;
        if !self.algorithms.contains(&header.alg) {
            return Err(AuthError::Invalid("algorithm not allowed"));
        }
        let from_jwks;
        let key = if is_hmac(header.alg) {
            self.secret.as_ref().map(|(decoding, _)| decoding)
        } else if let (Some(jwks), Some(kid)) = (&self.jwks, &header.kid) {
            // A token naming a key is verified with that key of the set,
            // and only with the algorithm the set gives it.
            from_jwks = jwks.get(kid).ok_or(AuthError::UnknownKey)?;
            if from_jwks.algorithm != header.alg {
                return Err(AuthError::Invalid("algorithm does not match the key"));
            }
            Some(&from_jwks.key)
        } else if is_ec(header.alg) || self.public_key.is_some() {
            self.public_key.as_ref()
        } else {
            None
        }
        .ok_or(AuthError::Invalid("algorithm not allowed"))?;

        let mut validation = Validation::new(header.alg);
        validation.leeway = self.leeway.as_secs();
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        match &self.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);

        let data = jsonwebtoken::decode::<RawClaims>(token, key, &validation)
            .map_err(|err| AuthError::Invalid(reason(err.kind())))?;
        let claims = data.claims;
        let sub = match claims.sub {
            Some(serde_json::Value::String(sub)) if !sub.is_empty() => sub,
            _ => return Err(AuthError::Invalid("`sub` must be a non-empty string")),
        };
        if sub.len() > self.max_sub_bytes {
            return Err(AuthError::Invalid("`sub` is longer than the user id limit"));
        }
        let role = match claims.role {
            None | Some(serde_json::Value::Null) => DEFAULT_ROLE.to_owned(),
            Some(serde_json::Value::String(role)) if !role.is_empty() => role,
            Some(_) => return Err(AuthError::Invalid("`role` must be a non-empty string")),
        };
        let exp = claims
            .exp
            .as_u64()
            .or_else(|| claims.exp.as_f64().map(|secs| secs.max(0.0) as u64))
            .ok_or(AuthError::Invalid("`exp` must be a number"))?
            .min(MAX_EXP);
        Ok(Claims { sub, role, exp })
    }

    /// Like [`Authenticator::verify`], but a token naming a key the JWKS
    /// does not have yet makes it fetch the set again (at most once per
    /// `SOCKETS_JWT_JWKS_REFETCH`) before the token is judged: a key the
    /// identity provider has just rotated in works at once.
    pub async fn verify_fresh(&self, token: &str) -> Result<Claims, AuthError> {
        match self.verify(token) {
            Err(AuthError::UnknownKey) => {
                let kid = jsonwebtoken::decode_header(token)
                    .ok()
                    .and_then(|header| header.kid);
                match (&self.jwks, kid) {
                    (Some(jwks), Some(kid)) if jwks.refresh_for(&kid).await => self.verify(token),
                    _ => Err(AuthError::UnknownKey),
                }
            }
            verdict => verdict,
        }
    }

    /// Verifies the `Authorization` header value (`Bearer <token>`, scheme
    /// case-insensitive).
    pub fn verify_bearer(&self, header: &str) -> Result<Claims, AuthError> {
        self.verify(bearer_token(header)?)
    }

    /// [`Authenticator::verify_bearer`] with [`Authenticator::verify_fresh`].
    pub async fn verify_bearer_fresh(&self, header: &str) -> Result<Claims, AuthError> {
        self.verify_fresh(bearer_token(header)?).await
    }

    /// The JWKS keys, when a JWKS URL is configured.
    pub fn jwks(&self) -> Option<&Arc<JwksKeys>> {
        self.jwks.as_ref()
    }

    /// Mints an HS256 token (development and tests), with `iss`/`aud` when
    /// configured.
    pub fn mint(&self, sub: &str, role: &str, ttl: Duration) -> Option<String> {
        let (_, encoding) = self.secret.as_ref()?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let claims = MintedClaims {
            sub,
            role,
            iat: now,
            exp: now.saturating_add(ttl.as_secs()).min(MAX_EXP),
            iss: self.issuer.as_deref(),
            aud: self.audience.as_deref(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, encoding).ok()
    }
}

fn bearer_token(header: &str) -> Result<&str, AuthError> {
    let (scheme, token) = header.split_once(' ').ok_or(AuthError::NotBearer)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(AuthError::NotBearer);
    }
    Ok(token.trim())
}

fn reason(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ExpiredSignature => "token expired",
        ErrorKind::ImmatureSignature => "token not valid yet (nbf)",
        ErrorKind::InvalidSignature => "bad signature",
        ErrorKind::InvalidAudience => "wrong audience",
        ErrorKind::InvalidIssuer => "wrong issuer",
        ErrorKind::MissingRequiredClaim(_) => "a required claim is missing",
        ErrorKind::InvalidAlgorithm => "algorithm not allowed",
        _ => "malformed token",
    }
}

/// Parses `30s`, `15m`, `1h`, `7d` (the `token --ttl` syntax).
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{text}` needs a unit: s, m, h or d"))?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` must start with a number"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("unknown unit `{unit}`: use s, m, h or d")),
    };
    number
        .checked_mul(seconds)
        .filter(|&secs| secs <= MAX_EXP)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("`{text}` is too long a lifetime"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> JwtConfig {
        JwtConfig::with_secret("test-secret")
    }

    #[test]
    fn minted_tokens_verify() {
        let auth = Authenticator::new(&config()).unwrap();
        let token = auth
            .mint("s_1", "student", Duration::from_secs(60))
            .unwrap();
        let claims = auth.verify(&token).unwrap();
        assert_eq!(
            (claims.sub.as_str(), claims.role.as_str()),
            ("s_1", "student")
        );
        assert!(auth.verify_bearer(&format!("bEaReR {token}")).is_ok());
        assert!(matches!(
            auth.verify_bearer(&format!("Basic {token}")),
            Err(AuthError::NotBearer)
        ));
    }

    #[test]
    fn ttl_syntax() {
        assert_eq!(parse_ttl("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_ttl("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_ttl("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_ttl("7d").unwrap(), Duration::from_secs(604_800));
        assert!(parse_ttl("7").is_err());
        assert!(parse_ttl("1w").is_err());
    }

    #[test]
    fn an_allowed_algorithm_without_a_key_is_a_setup_error() {
        let mut config = config();
        config.algorithms = Some(vec!["RS256".into()]);
        assert!(matches!(
            Authenticator::new(&config),
            Err(AuthSetupError::NoKey(_))
        ));
        config.algorithms = Some(vec!["none".into()]);
        assert!(matches!(
            Authenticator::new(&config),
            Err(AuthSetupError::UnknownAlgorithm(_))
        ));
    }
}
