//! Token keys from a JWKS URL (`SOCKETS_JWT_JWKS_URL`, PROTOCOL §1 v1.1),
//! kept fresh as the identity provider rotates them.
//!
//! - Keys are cached per source and `kid`, never by `kid` alone: a `kid`
//!   that one issuer's endpoint published must not verify a token that
//!   names another (the lesson of Centrifugo's CVE-2026-49998). A source is
//!   one URL, serving the tokens of the configured issuer.
//! - Only signature keys of the RSA and EC families load; symmetric (`oct`)
//!   keys are ignored, so that a JWKS can never hand out an HMAC secret.
//! - An unknown `kid` refetches the set at most once per
//!   `SOCKETS_JWT_JWKS_REFETCH` (30 s), so a stream of forged `kid`s cannot turn the
//!   service into a load generator against the identity provider.
//! - The endpoint down (or answering garbage) keeps the cached keys.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

/// How often the set is fetched again while everything works.
pub const REFRESH_EVERY: Duration = Duration::from_secs(300);
/// How long one fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest set read, bytes, and the most keys taken from it.
const MAX_SET_BYTES: usize = 256 << 10;
const MAX_KEYS: usize = 64;

/// One verification key from the set.
#[derive(Clone)]
pub struct JwksKey {
    /// The key.
    pub key: DecodingKey,
    /// The one algorithm it verifies.
    pub algorithm: Algorithm,
}

/// Why a fetch did not replace the keys.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// The endpoint could not be reached or answered an error.
    #[error("JWKS endpoint: {0}")]
    Fetch(String),
    /// The answer was not a key set with a usable key.
    #[error("JWKS answer: {0}")]
    Invalid(String),
}

/// The keys of one JWKS source.
pub struct JwksKeys {
    url: String,
    /// The shortest time between two fetches caused by unknown `kid`s.
    refetch_after: Duration,
    client: reqwest::Client,
    keys: ArcSwap<HashMap<String, JwksKey>>,
    /// When the last fetch started, and whether any fetch ever succeeded.
    last_fetch: Mutex<Option<Instant>>,
    /// Serializes fetches: a burst of unknown `kid`s waits for one.
    fetching: tokio::sync::Mutex<()>,
    problem: Mutex<Option<String>>,
}

impl std::fmt::Debug for JwksKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksKeys")
            .field("url", &self.url)
            .field("keys", &self.keys.load().len())
            .finish_non_exhaustive()
    }
}

impl JwksKeys {
    /// Keys from `url`, none yet: call [`JwksKeys::refresh`]. Unknown
    /// `kid`s fetch the set again at most once per `refetch_after`.
    pub fn new(url: &str, refetch_after: Duration) -> Self {
        Self {
            url: url.to_owned(),
            refetch_after,
            client: reqwest::Client::builder()
                .timeout(FETCH_TIMEOUT)
                .redirect(reqwest::redirect::Policy::limited(3))
                .build()
                .unwrap_or_default(),
            keys: ArcSwap::from_pointee(HashMap::new()),
            last_fetch: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
            problem: Mutex::new(Some("not fetched yet".into())),
        }
    }

    /// The key published under `kid`, if any.
    pub fn get(&self, kid: &str) -> Option<JwksKey> {
        self.keys.load().get(kid).cloned()
    }

    /// Keys loaded now.
    pub fn len(&self) -> usize {
        self.keys.load().len()
    }

    /// Whether no key is loaded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Why the last fetch failed, if it did (for `/readyz`).
    pub fn problem(&self) -> Option<String> {
        self.problem
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Fetches the set and replaces the keys with it; on failure the keys
    /// stay as they were.
    pub async fn refresh(&self) -> Result<usize, JwksError> {
        let _one_at_a_time = self.fetching.lock().await;
        self.fetch_now().await
    }

    /// After a token named a `kid` that is not loaded: fetches the set
    /// again unless a fetch started less than `refetch_after` ago
    /// (or one is running: then waits for it). Returns whether `kid` is
    /// known afterwards.
    pub async fn refresh_for(&self, kid: &str) -> bool {
        let _one_at_a_time = self.fetching.lock().await;
        if self.get(kid).is_some() {
            return true;
        }
        let recent = self
            .last_fetch
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|at| at.elapsed() < self.refetch_after);
        if recent {
            return false;
        }
        let _ = self.fetch_now().await;
        self.get(kid).is_some()
    }

    async fn fetch_now(&self) -> Result<usize, JwksError> {
        *self
            .last_fetch
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        let result = self.fetch().await;
        let mut problem = self.problem.lock().unwrap_or_else(PoisonError::into_inner);
        match &result {
            Ok(count) => {
                *problem = None;
                tracing::info!(url = %self.url, keys = count, "JWKS keys loaded");
            }
            Err(err) => {
                *problem = Some(err.to_string());
                tracing::warn!(url = %self.url, keys = self.len(), "JWKS keys kept as they were: {err}");
            }
        }
        result
    }

    async fn fetch(&self) -> Result<usize, JwksError> {
        let fetch = |err: reqwest::Error| JwksError::Fetch(err.without_url().to_string());
        let mut response = self
            .client
            .get(&self.url)
            .send()
            .await
            .map_err(fetch)?
            .error_for_status()
            .map_err(fetch)?;
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(fetch)? {
            if body.len() + chunk.len() > MAX_SET_BYTES {
                return Err(JwksError::Invalid(format!(
                    "larger than {MAX_SET_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        let keys = parse_set(&body)?;
        let count = keys.len();
        self.keys.store(Arc::new(keys));
        Ok(count)
    }
}

/// Refreshes `keys` every [`REFRESH_EVERY`] until `shutdown` flips.
pub async fn keep_fresh(keys: Arc<JwksKeys>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(REFRESH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let _ = keys.refresh().await;
            }
            () = crate::intake::amqp::stopped(&mut shutdown) => return,
        }
    }
}

/// The usable keys of a JWKS document, by `kid`. Keys without a `kid`, of
/// another use or family, or that do not parse are skipped; a set with no
/// usable key is an error (it would lock every user out).
pub fn parse_set(body: &[u8]) -> Result<HashMap<String, JwksKey>, JwksError> {
    #[derive(serde::Deserialize)]
    struct RawSet {
        keys: Vec<serde_json::Value>,
    }
    let set: RawSet = serde_json::from_slice(body)
        .map_err(|err| JwksError::Invalid(format!("not a JWK set: {err}")))?;
    let mut keys = HashMap::new();
    for raw in set.keys.into_iter().take(MAX_KEYS) {
        let Ok(jwk) = serde_json::from_value::<Jwk>(raw) else {
            continue;
        };
        if let Some((kid, key)) = usable(&jwk) {
            keys.insert(kid, key);
        }
    }
    if keys.is_empty() {
        return Err(JwksError::Invalid(
            "no usable RSA or EC signature key with a kid".into(),
        ));
    }
    Ok(keys)
}

fn usable(jwk: &Jwk) -> Option<(String, JwksKey)> {
    let kid = jwk.common.key_id.clone().filter(|kid| !kid.is_empty())?;
    if matches!(
        jwk.common.public_key_use,
        Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
    ) {
        return None;
    }
    let declared = jwk.common.key_algorithm.and_then(signing_algorithm);
    let algorithm = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => match declared {
            Some(
                alg @ (Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512),
            ) => alg,
            None => Algorithm::RS256,
            Some(_) => return None,
        },
        AlgorithmParameters::EllipticCurve(params) => match (&params.curve, declared) {
            (EllipticCurve::P256, None | Some(Algorithm::ES256)) => Algorithm::ES256,
            (EllipticCurve::P384, None | Some(Algorithm::ES384)) => Algorithm::ES384,
            _ => return None,
        },
        // Symmetric keys never come from a key set; others are unsupported.
        _ => return None,
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some((kid, JwksKey { key, algorithm }))
}

fn signing_algorithm(alg: KeyAlgorithm) -> Option<Algorithm> {
    Some(match alg {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RSA: &str =
        r#"{"kty":"RSA","kid":"r1","use":"sig","n":"pKghPHDo3rnXERne0G3v","e":"AQAB"}"#;

    #[test]
    fn only_signature_keys_with_a_kid_of_the_rsa_and_ec_families_load() {
        let set = format!(
            r#"{{"keys":[{RSA},
                {{"kty":"oct","kid":"h1","k":"c2VjcmV0"}},
                {{"kty":"RSA","use":"enc","kid":"r2","n":"pKghPHDo3rnXERne0G3v","e":"AQAB"}},
                {{"kty":"RSA","n":"pKghPHDo3rnXERne0G3v","e":"AQAB"}},
                {{"kty":"RSA","kid":"r3","alg":"ES256","n":"pKghPHDo3rnXERne0G3v","e":"AQAB"}},
                {{"kty":"weird","kid":"w"}}]}}"#
        );
        let keys = parse_set(set.as_bytes()).unwrap();
        assert_eq!(keys.keys().collect::<Vec<_>>(), vec!["r1"]);
        assert_eq!(keys["r1"].algorithm, Algorithm::RS256);
    }

    #[test]
    fn a_set_without_a_usable_key_is_refused() {
        assert!(parse_set(br#"{"keys":[]}"#).is_err());
        assert!(parse_set(br#"{"keys":[{"kty":"oct","kid":"h","k":"c2VjcmV0"}]}"#).is_err());
        assert!(parse_set(b"<html>").is_err());
    }
}
