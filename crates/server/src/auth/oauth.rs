//! MCP authorization as an OAuth 2.1 resource server: tokens from configured
//! external issuers are verified against their JSON Web Key Sets (signature,
//! issuer, audience, expiry), and `/.well-known/oauth-protected-resource`
//! (RFC 9728) tells clients where to get one.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use meshgate_core::auth::{CredentialKind, Principal, resolve_scopes};
use meshgate_core::config::{OAuthConfig, OAuthIssuerConfig};
use serde::Deserialize;

use super::AuthError;
use super::tokens::{check_header_alg, explain_jwt_error};

/// Asymmetric algorithms accepted from external issuers. HMAC is never
/// accepted from them: a public key must not double as a shared secret.
const ASYMMETRIC: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// A fetched key set is refreshed at most this often when a token names an
/// unknown `kid` (key rotation), and a failed fetch is not retried sooner, so
/// garbage tokens or a down issuer cannot make us hammer it.
const REFETCH_AFTER: Duration = Duration::from_secs(60);
/// A fetched key set older than this is fetched again on next use, so keys
/// the issuer removed stop being trusted.
const MAX_AGE: Duration = Duration::from_secs(3600);

struct Issuer {
    config: OAuthIssuerConfig,
    keys: Mutex<Option<(JwkSet, Instant)>>,
    /// When the key set was last fetched (or tried), successful or not.
    last_attempt: Mutex<Option<Instant>>,
    /// Serializes fetches so concurrent requests wait for one.
    fetching: tokio::sync::Mutex<()>,
}

/// Verifies external issuers' tokens.
pub struct OAuthVerifier {
    issuers: Vec<Issuer>,
    leeway: u64,
    http: OnceLock<reqwest::Client>,
}

#[derive(Deserialize)]
struct ExternalClaims {
    sub: String,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    scp: Option<Scopes>,
}

/// `scp` is a list at some issuers and a space-separated string at others.
#[derive(Deserialize)]
#[serde(untagged)]
enum Scopes {
    List(Vec<String>),
    Text(String),
}

impl OAuthVerifier {
    /// Reads `jwks_file` key sets now (a bad file stops start-up with the
    /// reason); `jwks_url` sets are fetched on first use.
    pub fn new(config: &OAuthConfig, leeway: u64) -> anyhow::Result<OAuthVerifier> {
        let mut issuers = Vec::new();
        for (i, c) in config.issuers.iter().enumerate() {
            let keys = match &c.jwks_file {
                Some(path) => {
                    let text = std::fs::read_to_string(path).map_err(|e| {
                        anyhow::anyhow!("auth.oauth.issuers[{i}].jwks_file {}: {e}", path.display())
                    })?;
                    let set: JwkSet = serde_json::from_str(&text).map_err(|e| {
                        anyhow::anyhow!(
                            "auth.oauth.issuers[{i}].jwks_file {} is not a JSON Web Key Set ({e})",
                            path.display()
                        )
                    })?;
                    Some((set, Instant::now()))
                }
                None => None,
            };
            issuers.push(Issuer {
                config: c.clone(),
                keys: Mutex::new(keys),
                last_attempt: Mutex::new(None),
                fetching: tokio::sync::Mutex::new(()),
            });
        }
        Ok(OAuthVerifier {
            issuers,
            leeway,
            http: OnceLock::new(),
        })
    }

    /// Whether any issuer is configured.
    pub fn is_configured(&self) -> bool {
        !self.issuers.is_empty()
    }

    /// The issuers' URLs, for the protected-resource metadata.
    pub fn issuer_urls(&self) -> Vec<String> {
        self.issuers
            .iter()
            .map(|i| i.config.issuer.clone())
            .collect()
    }

    async fn fetch(&self, issuer: &Issuer) -> Result<JwkSet, AuthError> {
        let Some(url) = &issuer.config.jwks_url else {
            return Err(AuthError::InvalidToken(format!(
                "no key of issuer `{}` matches the token (jwks_file)",
                issuer.config.issuer
            )));
        };
        let _one_at_a_time = issuer.fetching.lock().await;
        let recent = issuer
            .last_attempt
            .lock()
            .ok()
            .and_then(|a| *a)
            .is_some_and(|at| at.elapsed() < REFETCH_AFTER);
        if recent {
            // Someone just fetched (or failed to): use what is there.
            let cached = issuer.keys.lock().ok().and_then(|k| k.clone());
            return cached.map(|(set, _)| set).ok_or_else(|| {
                AuthError::Unavailable(format!(
                    "the key set of issuer `{}` could not be fetched from {url} in the last minute; retry later",
                    issuer.config.issuer
                ))
            });
        }
        if let Ok(mut a) = issuer.last_attempt.lock() {
            *a = Some(Instant::now());
        }
        let http = self.http.get_or_init(reqwest::Client::new);
        let fetched = async {
            let r = http
                .get(url)
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if !r.status().is_success() {
                return Err(format!("HTTP {}", r.status()));
            }
            r.json::<JwkSet>().await.map_err(|e| e.to_string())
        }
        .await
        .map_err(|e| {
            AuthError::Unavailable(format!(
                "cannot fetch the key set of issuer `{}` from {url}: {e}",
                issuer.config.issuer
            ))
        })?;
        if let Ok(mut k) = issuer.keys.lock() {
            *k = Some((fetched.clone(), Instant::now()));
        }
        Ok(fetched)
    }

    async fn key_for(&self, issuer: &Issuer, kid: Option<&str>) -> Result<DecodingKey, AuthError> {
        let cached = issuer.keys.lock().ok().and_then(|k| k.clone());
        let pick = |set: &JwkSet| -> Option<DecodingKey> {
            let jwk = match kid {
                Some(kid) => set.find(kid),
                None if set.keys.len() == 1 => set.keys.first(),
                None => None,
            }?;
            DecodingKey::from_jwk(jwk).ok()
        };
        if let Some((set, at)) = &cached {
            let fresh = issuer.config.jwks_url.is_none() || at.elapsed() < MAX_AGE;
            if let Some(k) = pick(set).filter(|_| fresh) {
                return Ok(k);
            }
            if issuer.config.jwks_url.is_none() {
                return Err(AuthError::InvalidToken(format!(
                    "no key of issuer `{}` matches the token's kid {}",
                    issuer.config.issuer,
                    kid.map(|k| format!("`{k}`"))
                        .unwrap_or_else(|| "(none)".into())
                )));
            }
        }
        let set = self.fetch(issuer).await?;
        pick(&set).ok_or_else(|| {
            AuthError::InvalidToken(format!(
                "no key of issuer `{}` matches the token's kid {}",
                issuer.config.issuer,
                kid.map(|k| format!("`{k}`"))
                    .unwrap_or_else(|| "(none)".into())
            ))
        })
    }

    /// Verifies a token claiming to come from `iss`.
    pub async fn verify(&self, token: &str, iss: &str) -> Result<Principal, AuthError> {
        let Some(issuer) = self.issuers.iter().find(|i| i.config.issuer == iss) else {
            return Err(AuthError::InvalidToken(format!(
                "issuer `{iss}` is not trusted by this gateway (auth.oauth.issuers)"
            )));
        };
        let header = check_header_alg(token, ASYMMETRIC)?;
        let key = self.key_for(issuer, header.kid.as_deref()).await?;
        let mut v = Validation::new(header.alg);
        v.leeway = self.leeway;
        v.set_issuer(&[&issuer.config.issuer]);
        v.set_audience(&issuer.config.audience);
        v.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        v.validate_nbf = true;
        let claims = jsonwebtoken::decode::<ExternalClaims>(token, &key, &v)
            .map_err(|e| explain_jwt_error(&e, token))?
            .claims;
        let role = issuer.config.role;
        let offered: Vec<String> = claims
            .scope
            .map(|s| s.split_whitespace().map(str::to_owned).collect())
            .or(claims.scp.map(|s| match s {
                Scopes::List(l) => l,
                Scopes::Text(t) => t.split_whitespace().map(str::to_owned).collect(),
            }))
            .unwrap_or_default();
        // Only the role's own scopes: `tenants:*` is never granted by a token.
        let ours: Vec<String> = offered
            .into_iter()
            .filter(|s| role.default_scopes().contains(&s.as_str()))
            .collect();
        let scopes = if ours.is_empty() {
            resolve_scopes(role, None)
        } else {
            resolve_scopes(role, Some(&ours))
        }
        .map_err(AuthError::InvalidToken)?;
        Ok(Principal {
            subject: format!("{}#{}", issuer.config.issuer, claims.sub),
            tenant: issuer.config.tenant.clone(),
            role,
            scopes,
            key_id: None,
            kind: CredentialKind::OAuth,
            rate_limit_per_minute: None,
        })
    }
}
