//! Gateway-issued tokens: short-lived JWT access tokens (HS256, secret in the
//! data directory) and opaque rotating refresh tokens (stored hashed, grouped
//! in families; reusing a used one revokes the family).

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use meshgate_core::AuthConfig;
use meshgate_core::auth::{Principal, hash_secret};
use meshgate_store::{ApiKeyRecord, RefreshTokenRecord, Store, now_ms};
use serde::{Deserialize, Serialize};

use super::{AuthError, new_id, random_bytes, rfc3339, write_secret_file};

/// `iss` and `aud` of gateway access tokens.
pub const ISSUER: &str = "meshgate";
/// Prefix of refresh tokens.
pub const REFRESH_PREFIX: &str = "mgr_";

/// Claims of a gateway access token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccessClaims {
    /// Issuer, always [`ISSUER`].
    pub iss: String,
    /// Audience, always [`ISSUER`].
    pub aud: String,
    /// The API key id it was issued for.
    pub sub: String,
    /// Tenant.
    pub tenant: String,
    /// Role.
    pub role: String,
    /// Space-separated scopes.
    pub scope: String,
    /// Issued at (unix s).
    pub iat: u64,
    /// Not before (unix s).
    pub nbf: u64,
    /// Expiry (unix s).
    pub exp: u64,
    /// Token id.
    pub jti: String,
    /// Refresh-token family.
    pub fam: String,
}

/// What `/api/v1/auth/token` and `/api/v1/auth/refresh` answer.
#[derive(Debug, Clone, Serialize)]
pub struct TokenPair {
    /// The JWT.
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: &'static str,
    /// Seconds the access token lives.
    pub expires_in: u64,
    /// The refresh token (use once).
    pub refresh_token: String,
    /// Seconds the refresh token lives.
    pub refresh_expires_in: u64,
    /// Space-separated scopes.
    pub scope: String,
}

/// Signs and verifies gateway access tokens.
pub struct TokenIssuer {
    encoding: EncodingKey,
    decoding: DecodingKey,
    access_ttl: u64,
    refresh_ttl: u64,
    leeway: u64,
}

impl TokenIssuer {
    /// Reads the signing secret from `token.key` in the data directory,
    /// creating it (32 random bytes, mode 0600) on first start.
    pub fn load_or_create(data_dir: &Path, config: &AuthConfig) -> anyhow::Result<TokenIssuer> {
        let path = data_dir.join("token.key");
        let secret = match std::fs::read_to_string(&path) {
            Ok(text) => URL_SAFE_NO_PAD.decode(text.trim()).map_err(|e| {
                anyhow::anyhow!(
                    "{} is not base64url ({e}); delete it to make a new one (every issued access token then becomes invalid)",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let bytes = random_bytes().map_err(|e| anyhow::anyhow!(e))?;
                write_secret_file(&path, &URL_SAFE_NO_PAD.encode(bytes))?;
                bytes.to_vec()
            }
            Err(e) => return Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
        };
        if secret.len() < 32 {
            anyhow::bail!(
                "{} holds {} bytes; the token secret needs at least 32; delete it to make a new one",
                path.display(),
                secret.len()
            );
        }
        Ok(TokenIssuer {
            encoding: EncodingKey::from_secret(&secret),
            decoding: DecodingKey::from_secret(&secret),
            access_ttl: config.access_token_ttl_secs,
            refresh_ttl: config.refresh_token_ttl_secs,
            leeway: config.clock_skew_secs,
        })
    }

    /// Signs an access token for `key` in token family `family`.
    pub fn sign(&self, key: &ApiKeyRecord, family: &str) -> Result<(String, u64), AuthError> {
        let now = (now_ms() / 1000) as u64;
        let claims = AccessClaims {
            iss: ISSUER.into(),
            aud: ISSUER.into(),
            sub: key.id.clone(),
            tenant: key.tenant.clone(),
            role: key.role.clone(),
            scope: key.scopes.join(" "),
            iat: now,
            nbf: now,
            exp: now + self.access_ttl,
            jti: new_id("at_").map_err(AuthError::Unavailable)?,
            fam: family.to_owned(),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|e| AuthError::Unavailable(format!("could not sign a token: {e}")))?;
        Ok((token, self.access_ttl))
    }

    /// Verifies a gateway access token: HS256 only, issuer, audience, expiry
    /// (with the configured clock skew).
    pub fn verify(&self, token: &str) -> Result<AccessClaims, AuthError> {
        let mut v = Validation::new(Algorithm::HS256);
        v.leeway = self.leeway;
        v.set_issuer(&[ISSUER]);
        v.set_audience(&[ISSUER]);
        v.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        v.validate_nbf = true;
        check_header_alg(token, &[Algorithm::HS256])?;
        jsonwebtoken::decode::<AccessClaims>(token, &self.decoding, &v)
            .map(|d| d.claims)
            .map_err(|e| explain_jwt_error(&e, token))
    }

    /// Exchanges a live API key for a new token pair in a new family.
    pub async fn issue(
        &self,
        store: &dyn Store,
        key: &ApiKeyRecord,
    ) -> Result<TokenPair, AuthError> {
        let family = new_id("fam_").map_err(AuthError::Unavailable)?;
        self.pair(store, key, &family).await
    }

    /// A new access token and refresh token in `family`.
    pub async fn pair(
        &self,
        store: &dyn Store,
        key: &ApiKeyRecord,
        family: &str,
    ) -> Result<TokenPair, AuthError> {
        let (access_token, expires_in) = self.sign(key, family)?;
        let refresh = format!(
            "{REFRESH_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(random_bytes().map_err(AuthError::Unavailable)?)
        );
        let now = now_ms();
        store
            .insert_refresh_token(&RefreshTokenRecord {
                id: new_id("rt_").map_err(AuthError::Unavailable)?,
                hash: hash_secret(&refresh),
                family: family.to_owned(),
                key_id: key.id.clone(),
                tenant: key.tenant.clone(),
                created_at: now,
                expires_at: now + (self.refresh_ttl * 1000) as i64,
                used_at: None,
                revoked_at: None,
            })
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        Ok(TokenPair {
            access_token,
            token_type: "Bearer",
            expires_in,
            refresh_token: refresh,
            refresh_expires_in: self.refresh_ttl,
            scope: key.scopes.join(" "),
        })
    }
}

/// What happened to a presented refresh token.
pub enum RefreshOutcome {
    /// Rotated: the new pair, and the key it belongs to.
    Rotated(TokenPair, Box<ApiKeyRecord>),
    /// It had been used before: the family is now revoked.
    Reused {
        /// The revoked family.
        family: String,
        /// Its tenant.
        tenant: String,
        /// Its key.
        key_id: String,
    },
}

/// Rotates a refresh token: the presented one is used up (atomically) and a
/// new pair in the same family is issued. A token presented a second time
/// revokes its whole family, since someone else has it too.
pub async fn rotate(auth: &super::Auth, presented: &str) -> Result<RefreshOutcome, AuthError> {
    if !presented.starts_with(REFRESH_PREFIX) || presented.len() != REFRESH_PREFIX.len() + 43 {
        return Err(AuthError::Malformed(
            "refresh_token must be the `mgr_…` value returned by /api/v1/auth/token or /api/v1/auth/refresh".into(),
        ));
    }
    let store = auth.store.as_ref();
    let unavailable = |e: meshgate_store::StoreError| AuthError::Unavailable(e.to_string());
    let record = store
        .find_refresh_token_by_hash(&hash_secret(presented))
        .await
        .map_err(unavailable)?
        .ok_or_else(|| {
            AuthError::InvalidToken(
                "unknown refresh token: it was never issued by this gateway".into(),
            )
        })?;
    let now = now_ms();
    if let Some(at) = record.revoked_at {
        return Err(AuthError::Revoked {
            what: "this refresh token".into(),
            when: format!("at {} (logout, key revocation or reuse)", rfc3339(at)),
        });
    }
    if record.expires_at <= now {
        return Err(AuthError::Expired {
            what: "this refresh token".into(),
            at: rfc3339(record.expires_at),
        });
    }
    let first_use = record.used_at.is_none()
        && store
            .mark_refresh_token_used(&record.id, now)
            .await
            .map_err(unavailable)?;
    if !first_use {
        store
            .revoke_refresh_family(&record.family, now)
            .await
            .map_err(unavailable)?;
        auth.revoke_families([record.family.clone()]);
        return Ok(RefreshOutcome::Reused {
            family: record.family,
            tenant: record.tenant,
            key_id: record.key_id,
        });
    }
    if auth.family_revoked(&record.family) {
        return Err(AuthError::Revoked {
            what: "this refresh token".into(),
            when: "with its login (logout, key revocation or reuse)".into(),
        });
    }
    let key = auth.live_key_by_id(&record.key_id).await?;
    let pair = auth.tokens.pair(store, &key, &record.family).await?;
    Ok(RefreshOutcome::Rotated(pair, Box::new(key)))
}

/// The `iss` claim of a JWT, read without verification, only to choose the
/// key to verify it with. Refuses `alg: none` and malformed tokens with the
/// precise reason.
pub fn unverified_issuer(token: &str) -> Result<Option<String>, AuthError> {
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return Err(AuthError::Malformed(format!(
            "the bearer token is neither an API key (`mg_…`) nor a JWT (three base64url parts separated by dots; got {})",
            parts.len()
        )));
    }
    let header = decode_json_part(parts[0], "header")?;
    match header.get("alg").and_then(|a| a.as_str()) {
        None => {
            return Err(AuthError::InvalidToken(
                "the token header has no `alg`".into(),
            ));
        }
        Some(alg) if alg.eq_ignore_ascii_case("none") => {
            return Err(AuthError::InvalidToken(
                "unsigned token (`alg: none`) refused: tokens must be signed".into(),
            ));
        }
        Some(_) => {}
    }
    let payload = decode_json_part(parts[1], "payload")?;
    if parts[2].is_empty() {
        return Err(AuthError::InvalidToken("the token has no signature".into()));
    }
    Ok(payload
        .get("iss")
        .and_then(|i| i.as_str())
        .map(str::to_owned))
}

fn decode_json_part(part: &str, what: &str) -> Result<serde_json::Value, AuthError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| AuthError::Malformed(format!("the token {what} is not base64url")))?;
    let v: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|_| AuthError::Malformed(format!("the token {what} is not JSON")))?;
    if v.is_object() {
        Ok(v)
    } else {
        Err(AuthError::Malformed(format!(
            "the token {what} is not a JSON object"
        )))
    }
}

/// Refuses a token whose header names an algorithm outside `allowed` (for
/// example an HS256 token presented where only RS256 is trusted, the classic
/// key-confusion attack).
pub fn check_header_alg(token: &str, allowed: &[Algorithm]) -> Result<Header, AuthError> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| explain_jwt_error(&e, token))?;
    if allowed.contains(&header.alg) {
        Ok(header)
    } else {
        Err(AuthError::InvalidToken(format!(
            "algorithm {:?} is not accepted here (accepted: {})",
            header.alg,
            allowed
                .iter()
                .map(|a| format!("{a:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }
}

/// Turns a JWT library error into a reason a user can act on, without
/// echoing the token.
pub fn explain_jwt_error(e: &jsonwebtoken::errors::Error, token: &str) -> AuthError {
    match e.kind() {
        ErrorKind::ExpiredSignature => {
            let exp = jsonwebtoken::dangerous::insecure_decode_claims::<serde_json::Value>(token)
                .ok()
                .and_then(|c| c.get("exp").and_then(|x| x.as_i64()));
            AuthError::Expired {
                what: "the access token".into(),
                at: exp
                    .map(|s| rfc3339(s * 1000))
                    .unwrap_or_else(|| "an earlier time".into()),
            }
        }
        ErrorKind::InvalidSignature => AuthError::InvalidToken(
            "signature does not verify: the token was altered or signed with another key".into(),
        ),
        ErrorKind::InvalidAudience => {
            let aud = jsonwebtoken::dangerous::insecure_decode_claims::<serde_json::Value>(token)
                .ok()
                .and_then(|c| c.get("aud").cloned())
                .map(|a| a.to_string())
                .unwrap_or_else(|| "none".into());
            AuthError::InvalidToken(format!("audience {aud} is not accepted by this gateway"))
        }
        ErrorKind::InvalidIssuer => AuthError::InvalidToken("issuer is not trusted".into()),
        ErrorKind::ImmatureSignature => AuthError::InvalidToken(
            "token is not valid yet (nbf in the future); check the clocks".into(),
        ),
        ErrorKind::MissingRequiredClaim(c) => {
            AuthError::InvalidToken(format!("required claim `{c}` is missing"))
        }
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::MissingAlgorithm => {
            AuthError::InvalidToken("the token's algorithm is not accepted here".into())
        }
        ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_)
        | ErrorKind::InvalidToken => {
            AuthError::Malformed("the token is not a well-formed JWT".into())
        }
        ErrorKind::InvalidClaimFormat(c) => {
            AuthError::InvalidToken(format!("claim `{c}` has the wrong type"))
        }
        _ => AuthError::InvalidToken("the token could not be verified".into()),
    }
}

/// A principal as `/api/v1/auth/whoami` shows it.
pub fn describe(p: &Principal) -> serde_json::Value {
    serde_json::json!({
        "subject": p.subject,
        "tenant": p.tenant,
        "role": p.role,
        "scopes": p.scopes,
        "key_id": p.key_id,
        "credential": p.kind.as_str(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn part(v: &serde_json::Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    #[test]
    fn unsigned_and_malformed_tokens_are_named() {
        let none = format!(
            "{}.{}.",
            part(&serde_json::json!({"alg": "none"})),
            part(&serde_json::json!({"iss": "x"}))
        );
        assert!(
            unverified_issuer(&none)
                .unwrap_err()
                .to_string()
                .contains("alg: none")
        );
        let none_upper = format!(
            "{}.{}.sig",
            part(&serde_json::json!({"alg": "NONE"})),
            part(&serde_json::json!({"iss": "x"}))
        );
        assert!(unverified_issuer(&none_upper).is_err());
        assert!(
            unverified_issuer("a.b")
                .unwrap_err()
                .to_string()
                .contains("got 2")
        );
        assert!(
            unverified_issuer("!!.!!.!!")
                .unwrap_err()
                .to_string()
                .contains("base64url")
        );
        let ok = format!(
            "{}.{}.sig",
            part(&serde_json::json!({"alg": "ES256"})),
            part(&serde_json::json!({"iss": "https://idp"}))
        );
        assert_eq!(
            unverified_issuer(&ok).unwrap().as_deref(),
            Some("https://idp")
        );
    }

    #[test]
    fn issued_tokens_verify_and_tampering_is_detected() {
        let dir = std::env::temp_dir().join(format!(
            "meshgate-tokens-{}-{}",
            std::process::id(),
            now_ms()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let issuer = TokenIssuer::load_or_create(&dir, &AuthConfig::default()).unwrap();
        let again = TokenIssuer::load_or_create(&dir, &AuthConfig::default()).unwrap();
        let key = ApiKeyRecord {
            id: "key_1".into(),
            hash: "h".into(),
            prefix: "mg_x".into(),
            name: "n".into(),
            tenant: "t".into(),
            role: "developer".into(),
            scopes: vec!["mcp:read".into()],
            created_at: 0,
            created_by: "test".into(),
            expires_at: None,
            revoked_at: None,
            rate_limit_per_minute: None,
            last_used_at: None,
        };
        let (token, ttl) = issuer.sign(&key, "fam_1").unwrap();
        assert_eq!(ttl, 900);
        let claims = again.verify(&token).expect("the secret file is reused");
        assert_eq!(
            (
                claims.sub.as_str(),
                claims.tenant.as_str(),
                claims.fam.as_str()
            ),
            ("key_1", "t", "fam_1")
        );
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = part(
            &serde_json::json!({"iss": "meshgate", "aud": "meshgate", "sub": "key_1", "tenant": "other", "role": "admin", "scope": "", "iat": 0, "nbf": 0, "exp": 4_000_000_000u64, "jti": "x", "fam": "f"}),
        );
        parts[1] = &forged;
        let err = issuer.verify(&parts.join(".")).unwrap_err();
        assert!(
            err.to_string().contains("signature does not verify"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    proptest! {
        #[test]
        fn any_bearer_string_gets_a_value_or_a_reason(s in ".{0,200}") {
            let _ = unverified_issuer(&s);
        }

        #[test]
        fn any_three_part_token_gets_a_value_or_a_reason(a in "[A-Za-z0-9_-]{0,60}", b in "[A-Za-z0-9_-]{0,60}", c in "[A-Za-z0-9_-]{0,20}") {
            let t = format!("{a}.{b}.{c}");
            let _ = unverified_issuer(&t);
            let _ = check_header_alg(&t, &[Algorithm::HS256]);
        }
    }
}
