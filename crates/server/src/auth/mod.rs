//! Authentication and authorization: who is calling (API key, gateway access
//! token, or an external OAuth issuer's token), whether they may call this
//! route, lockout of clients that keep failing, and the audit log.
//!
//! The one HTTP entry point is [`middleware::authenticate`], layered over the
//! whole router in `http.rs`: it turns the request's credentials into a
//! [`Principal`] in the request extensions, or answers 401/403/429 itself.
//! MCP handlers read the principal from there for tenant visibility,
//! per-tool rules and audit.

pub mod api;
pub mod audit;
pub mod middleware;
pub mod oauth;
pub mod tokens;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use meshgate_core::auth::{
    CredentialKind, Lockout, Principal, Role, ToolPolicy, check_api_key_format, display_prefix,
    format_api_key, hash_secret, resolve_scopes,
};
use meshgate_core::{AuthConfig, Config, DEFAULT_TENANT};
use meshgate_store::{ApiKeyRecord, Store, StoreError, now_ms};
use subtle::ConstantTimeEq;

pub use audit::Audit;
pub use middleware::{RequestPrincipal, TraceId};

/// How long a key read from the store is trusted before it is read again, so
/// that a key revoked from the command line (another process) stops working
/// within this time. Revocation through the REST API takes effect at once.
const KEY_CACHE_TTL: Duration = Duration::from_secs(5);

/// Why a request was not authenticated or not authorized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credentials at all.
    #[error(
        "authentication required: send `Authorization: Bearer <API key or access token>` or `X-API-Key: <API key>`"
    )]
    Missing,
    /// Credentials that are not shaped like any credential.
    #[error("malformed credentials: {0}")]
    Malformed(String),
    /// A well-formed API key this gateway never issued.
    #[error(
        "unknown API key `{prefix}…`: it was never issued by this gateway, or it was deleted; create one with `meshgate keys create`"
    )]
    UnknownKey {
        /// The non-secret start of the key.
        prefix: String,
    },
    /// A revoked API key or token.
    #[error("{what} was revoked {when}; use another credential")]
    Revoked {
        /// What was revoked.
        what: String,
        /// When or why (`at 2026-…Z`, or the event that revoked it).
        when: String,
    },
    /// An expired API key or token.
    #[error("{what} expired at {at}; get a new one")]
    Expired {
        /// What expired.
        what: String,
        /// When (RFC 3339).
        at: String,
    },
    /// A token that fails verification (signature, algorithm, issuer, audience...).
    #[error("invalid token: {0}")]
    InvalidToken(String),
    /// The client failed too often and is locked out.
    #[error(
        "too many failed authentication attempts from {client}: locked out for {retry_after_secs} more seconds (auth.lockout); fix the credential and retry after that"
    )]
    LockedOut {
        /// The client address.
        client: String,
        /// Seconds until the lockout ends.
        retry_after_secs: u64,
    },
    /// Authenticated, but without the scope this route needs.
    #[error(
        "forbidden: this {route} needs scope `{scope}`, which the credential (role `{role}`) does not hold"
    )]
    MissingScope {
        /// What was asked for.
        route: String,
        /// The scope it needs.
        scope: String,
        /// The caller's role.
        role: String,
    },
    /// The store could not be asked.
    #[error("authentication is unavailable: the store did not answer ({0}); retry shortly")]
    Unavailable(String),
}

impl AuthError {
    /// A short machine-readable reason, also the `reason` label of `auth_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed(_) => "malformed",
            AuthError::UnknownKey { .. } => "unknown_key",
            AuthError::Revoked { .. } => "revoked",
            AuthError::Expired { .. } => "expired",
            AuthError::InvalidToken(_) => "invalid_token",
            AuthError::LockedOut { .. } => "locked_out",
            AuthError::MissingScope { .. } => "insufficient_scope",
            AuthError::Unavailable(_) => "unavailable",
        }
    }

    /// Whether this counts as a failed attempt towards lockout: presenting a
    /// bad credential does, presenting none (as OAuth discovery does) does not.
    pub fn counts_as_failure(&self) -> bool {
        matches!(
            self,
            AuthError::Malformed(_)
                | AuthError::UnknownKey { .. }
                | AuthError::Revoked { .. }
                | AuthError::Expired { .. }
                | AuthError::InvalidToken(_)
        )
    }
}

/// Unix ms as RFC 3339 (UTC, seconds).
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant), for a dependency-free UTC rendering.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// 32 bytes from the operating system's random source.
pub fn random_bytes() -> Result<[u8; 32], String> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| format!("the system random source failed: {e}"))?;
    Ok(b)
}

/// A new public id: `prefix` + 16 hex characters.
pub fn new_id(prefix: &str) -> Result<String, String> {
    let b = random_bytes()?;
    let mut s = String::with_capacity(prefix.len() + 16);
    s.push_str(prefix);
    for x in &b[..8] {
        s.push_str(&format!("{x:02x}"));
    }
    Ok(s)
}

/// What is needed to create an API key.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// Human name.
    pub name: String,
    /// Owning tenant.
    pub tenant: String,
    /// Role.
    pub role: Role,
    /// Scopes (`None`: the role's defaults).
    pub scopes: Option<Vec<String>>,
    /// Unix ms it expires at.
    pub expires_at: Option<i64>,
    /// Per-key rate limit, requests per minute.
    pub rate_limit_per_minute: Option<u32>,
    /// Who creates it.
    pub created_by: String,
}

/// Creates and stores an API key; returns the key (shown once) and its record.
/// Used by the REST API, the CLI and the first-start bootstrap.
pub async fn create_key(store: &dyn Store, new: NewKey) -> Result<(String, ApiKeyRecord), String> {
    if !meshgate_core::config::valid_tenant(&new.tenant) {
        return Err(format!(
            "tenant `{}` {}",
            new.tenant,
            meshgate_core::config::TENANT_RULE
        ));
    }
    let name = new.name.trim();
    if name.is_empty() || name.len() > 128 {
        return Err("name must be 1 to 128 characters".into());
    }
    let scopes = resolve_scopes(new.role, new.scopes.as_deref())?;
    let key = format_api_key(&random_bytes()?);
    let record = ApiKeyRecord {
        id: new_id("key_")?,
        hash: hash_secret(&key),
        prefix: display_prefix(&key),
        name: name.to_owned(),
        tenant: new.tenant,
        role: new.role.as_str().to_owned(),
        scopes,
        created_at: now_ms(),
        created_by: new.created_by,
        expires_at: new.expires_at,
        revoked_at: None,
        rate_limit_per_minute: new.rate_limit_per_minute,
        last_used_at: None,
    };
    store
        .insert_api_key(&record)
        .await
        .map_err(|e| format!("could not store the key: {e}"))?;
    Ok((key, record))
}

/// On first start with no key at all, creates an admin key of the default
/// tenant, writes it to `admin.key` (mode 0600) in the data directory and
/// returns it so the caller can print it once.
pub async fn bootstrap_admin_key(
    store: &dyn Store,
    data_dir: &Path,
) -> anyhow::Result<Option<String>> {
    if store.count_api_keys().await? > 0 {
        return Ok(None);
    }
    let (key, record) = create_key(
        store,
        NewKey {
            name: "bootstrap admin".into(),
            tenant: DEFAULT_TENANT.into(),
            role: Role::Admin,
            scopes: Some(
                Role::Admin
                    .default_scopes()
                    .iter()
                    .map(|s| (*s).to_owned())
                    .chain([meshgate_core::auth::scope::ALL_TENANTS.to_owned()])
                    .collect(),
            ),
            expires_at: None,
            rate_limit_per_minute: None,
            created_by: "bootstrap".into(),
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!(e))?;
    let path = data_dir.join("admin.key");
    write_secret_file(&path, &format!("{key}\n"))?;
    tracing::info!(key_id = %record.id, file = %path.display(), "created the first admin key");
    Ok(Some(key))
}

/// Writes a file readable only by its owner (0600 on Unix).
pub fn write_secret_file(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = f.set_permissions(std::fs::Permissions::from_mode(0o600));
    }
    f.write_all(contents.as_bytes())
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(())
}

#[derive(Clone)]
struct CachedKey {
    record: Option<ApiKeyRecord>,
    fetched: Instant,
}

/// The authentication state shared by every request.
pub struct Auth {
    /// The settings.
    pub config: AuthConfig,
    /// Where keys, tokens and audit entries live.
    pub store: Arc<dyn Store>,
    /// Per-tool rules.
    pub policy: ToolPolicy,
    /// Gateway access tokens.
    pub tokens: tokens::TokenIssuer,
    /// External issuers.
    pub oauth: oauth::OAuthVerifier,
    /// The audit log writer.
    pub audit: Audit,
    /// Keys by hash and by id (`h:`/`i:` prefixes), briefly cached.
    keys: Mutex<HashMap<String, CachedKey>>,
    /// Revoked token families (logout, reuse, key revocation).
    /// Revoked token families and when they were revoked (unix ms). An entry
    /// is needed only while an access token of the family can still be
    /// valid, so it is dropped after the access-token lifetime plus skew.
    revoked_families: RwLock<HashMap<String, i64>>,
    lockout: Mutex<Lockout>,
    /// Last `last_used_at` write per key, to write at most once a minute.
    touched: Mutex<HashMap<String, i64>>,
    /// The canonical resource URL (RFC 9728), when configured.
    pub resource: Option<String>,
    /// Who opened each MCP session: (tenant, subject), mirrored in the store.
    session_owners: Mutex<HashMap<String, (String, String)>>,
    /// Reverse proxies whose `X-Forwarded-For` is believed (lockout).
    pub trusted_proxies: Vec<std::net::IpAddr>,
}

impl Auth {
    /// Loads the token secret, the OAuth issuers' keys and the revoked
    /// families, and starts the audit writer.
    pub async fn start(
        config: &Config,
        store: Arc<dyn Store>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<Arc<Auth>> {
        let a = &config.auth;
        let policy = ToolPolicy::new(&a.tool_rules).map_err(|e| anyhow::anyhow!(e))?;
        let tokens = tokens::TokenIssuer::load_or_create(&config.data_dir, a)?;
        let oauth = oauth::OAuthVerifier::new(&a.oauth, a.clock_skew_secs)?;
        let now = now_ms();
        let revoked: HashMap<String, i64> = store
            .revoked_families(now)
            .await?
            .into_iter()
            .map(|f| (f, now))
            .collect();
        let audit = Audit::start(store.clone(), a.audit.clone(), shutdown);
        let lockout = Lockout::new(
            a.lockout.max_failures,
            (a.lockout.window_secs * 1000) as i64,
            (a.lockout.lockout_secs * 1000) as i64,
        );
        Ok(Arc::new(Auth {
            config: a.clone(),
            store,
            policy,
            tokens,
            oauth,
            audit,
            keys: Mutex::new(HashMap::new()),
            revoked_families: RwLock::new(revoked),
            lockout: Mutex::new(lockout),
            touched: Mutex::new(HashMap::new()),
            resource: a.oauth.resource.clone(),
            session_owners: Mutex::new(HashMap::new()),
            trusted_proxies: a
                .lockout
                .trusted_proxies
                .iter()
                .filter_map(|p| p.parse().ok())
                .collect(),
        }))
    }

    /// The principal of a request to a public endpoint that may carry
    /// credentials (`/health` shows details to `metrics:read`). Bad
    /// credentials count towards lockout like anywhere else.
    pub async fn optional_principal(
        &self,
        headers: &axum::http::HeaderMap,
        client: &str,
    ) -> Option<Principal> {
        if !self.enabled() {
            return Some(Principal::anonymous(DEFAULT_TENANT));
        }
        if self.check_lockout(client).is_err() {
            return None;
        }
        let token = middleware::presented(headers).ok().flatten()?;
        match self.authenticate_bearer(&token).await {
            Ok((p, _)) => Some(p),
            Err(e) => {
                self.record_failure(client, &e);
                None
            }
        }
    }

    /// Records that `principal` opened MCP session `id`.
    pub async fn remember_session_owner(&self, id: &str, principal: &Principal) {
        if let Ok(mut m) = self.session_owners.lock() {
            m.insert(
                id.to_owned(),
                (principal.tenant.clone(), principal.subject.clone()),
            );
        }
        if let Err(e) = self
            .store
            .set_session_owner(id, &principal.tenant, &principal.subject)
            .await
        {
            tracing::warn!(error = %e, "could not store the owner of a session; it will not survive a restart");
        }
    }

    /// Whether MCP session `id` was opened by `principal` (same tenant and
    /// subject). Sessions without a recorded owner belong to nobody.
    pub async fn session_owned_by(&self, id: &str, principal: &Principal) -> bool {
        let mine = |(t, s): &(String, String)| *t == principal.tenant && *s == principal.subject;
        if let Some(owner) = self
            .session_owners
            .lock()
            .ok()
            .and_then(|m| m.get(id).cloned())
        {
            return mine(&owner);
        }
        match self.store.session_owner(id).await {
            Ok(Some(owner)) => {
                let ok = mine(&owner);
                if let Ok(mut m) = self.session_owners.lock() {
                    m.insert(id.to_owned(), owner);
                }
                ok
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the owner of a session; refusing it");
                false
            }
        }
    }

    /// Forgets the owner of an ended session.
    pub fn forget_session(&self, id: &str) {
        if let Ok(mut m) = self.session_owners.lock() {
            m.remove(id);
        }
    }

    /// Whether credentials are required.
    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    /// When `client` is locked out, the error to answer with.
    pub fn check_lockout(&self, client: &str) -> Result<(), AuthError> {
        let now = now_ms();
        let until = self
            .lockout
            .lock()
            .ok()
            .and_then(|l| l.locked_until(client, now));
        match until {
            Some(until) => Err(AuthError::LockedOut {
                client: client.to_owned(),
                retry_after_secs: ((until - now) as u64).div_ceil(1000),
            }),
            None => Ok(()),
        }
    }

    /// Counts a failed attempt of `client`; starts a lockout past the threshold.
    pub fn record_failure(&self, client: &str, error: &AuthError) {
        metrics::counter!("auth_failures_total", "reason" => error.reason()).increment(1);
        if !error.counts_as_failure() {
            return;
        }
        let locked = self
            .lockout
            .lock()
            .ok()
            .and_then(|mut l| l.record_failure(client, now_ms()));
        if let Some(until) = locked {
            metrics::counter!("auth_lockouts_total").increment(1);
            tracing::warn!(client, until = %rfc3339(until), reason = error.reason(), "client locked out after repeated authentication failures");
            self.audit.record_system(
                DEFAULT_TENANT,
                "auth.lockout",
                client,
                "denied",
                serde_json::json!({"until": rfc3339(until), "last_reason": error.reason()}),
            );
        }
    }

    /// Forgets a client's failures after it authenticated.
    pub fn record_success(&self, client: &str) {
        if let Ok(mut l) = self.lockout.lock() {
            l.record_success(client);
        }
    }

    /// Whether a token family was revoked.
    pub fn family_revoked(&self, family: &str) -> bool {
        self.revoked_families
            .read()
            .map(|s| s.contains_key(family))
            .unwrap_or(true)
    }

    /// Marks families revoked for access-token checks.
    pub fn revoke_families(&self, families: impl IntoIterator<Item = String>) {
        let now = now_ms();
        let keep_ms =
            ((self.config.access_token_ttl_secs + self.config.clock_skew_secs) * 1000) as i64;
        if let Ok(mut s) = self.revoked_families.write() {
            s.retain(|_, at| now - *at <= keep_ms);
            s.extend(families.into_iter().map(|f| (f, now)));
        }
    }

    /// Drops cached copies of a key (after a change through the API).
    pub fn forget_key(&self, record: &ApiKeyRecord) {
        if let Ok(mut c) = self.keys.lock() {
            c.remove(&format!("h:{}", record.hash));
            c.remove(&format!("i:{}", record.id));
        }
    }

    async fn cached_key(
        &self,
        cache_key: String,
        by_hash: bool,
    ) -> Result<Option<ApiKeyRecord>, AuthError> {
        if let Ok(c) = self.keys.lock()
            && let Some(hit) = c.get(&cache_key)
            && hit.fetched.elapsed() < KEY_CACHE_TTL
        {
            return Ok(hit.record.clone());
        }
        let lookup = &cache_key[2..];
        let fetched = if by_hash {
            self.store.find_api_key_by_hash(lookup).await
        } else {
            self.store.get_api_key(lookup).await
        }
        .map_err(|e: StoreError| AuthError::Unavailable(e.to_string()))?;
        if let Ok(mut c) = self.keys.lock() {
            if c.len() > 10_000 {
                c.retain(|_, v| v.fetched.elapsed() < KEY_CACHE_TTL);
            }
            c.insert(
                cache_key,
                CachedKey {
                    record: fetched.clone(),
                    fetched: Instant::now(),
                },
            );
        }
        Ok(fetched)
    }

    /// The live key with this id (used to check that the key behind an access
    /// token is still valid).
    pub async fn live_key_by_id(&self, id: &str) -> Result<ApiKeyRecord, AuthError> {
        let record = self
            .cached_key(format!("i:{id}"), false)
            .await?
            .ok_or_else(|| {
                AuthError::InvalidToken(format!(
                    "the API key `{id}` this token was issued for no longer exists"
                ))
            })?;
        check_key_live(&record, now_ms())?;
        Ok(record)
    }

    /// Authenticates an API key. The key is looked up by its SHA-256, and the
    /// stored hash is compared with the computed one in constant time, so
    /// response timing says nothing about the key's characters.
    pub async fn authenticate_key(&self, key: &str) -> Result<Principal, AuthError> {
        check_api_key_format(key).map_err(AuthError::Malformed)?;
        let hash = hash_secret(key);
        let record = self
            .cached_key(format!("h:{hash}"), true)
            .await?
            .filter(|r| bool::from(r.hash.as_bytes().ct_eq(hash.as_bytes())))
            .ok_or_else(|| AuthError::UnknownKey {
                prefix: display_prefix(key),
            })?;
        check_key_live(&record, now_ms())?;
        self.touch(&record.id);
        principal_of(&record, CredentialKind::ApiKey)
    }

    fn touch(&self, key_id: &str) {
        let now = now_ms();
        let due = self.touched.lock().is_ok_and(|mut t| {
            let due = t.get(key_id).is_none_or(|last| now - last > 60_000);
            if due {
                t.insert(key_id.to_owned(), now);
            }
            due
        });
        if due {
            let store = self.store.clone();
            let id = key_id.to_owned();
            tokio::spawn(async move {
                if let Err(e) = store.touch_api_key(&id, now).await {
                    tracing::debug!(key_id = %id, error = %e, "could not record last use of key");
                }
            });
        }
    }

    /// Authenticates a bearer token: an API key, a gateway access token, or
    /// an external issuer's token. Returns the principal and, for gateway
    /// tokens, the token family.
    pub async fn authenticate_bearer(
        &self,
        token: &str,
    ) -> Result<(Principal, Option<String>), AuthError> {
        if token.starts_with(meshgate_core::auth::API_KEY_PREFIX) {
            return self.authenticate_key(token).await.map(|p| (p, None));
        }
        let issuer = tokens::unverified_issuer(token)?;
        if issuer.as_deref() == Some(tokens::ISSUER) {
            let claims = self.tokens.verify(token)?;
            if self.family_revoked(&claims.fam) {
                return Err(AuthError::Revoked {
                    what: "this access token".into(),
                    when: "with its login (logout, revocation of its key, or reuse of one of its refresh tokens)".into(),
                });
            }
            let key = self.live_key_by_id(&claims.sub).await?;
            self.touch(&key.id);
            let role = Role::parse(&claims.role).ok_or_else(|| {
                AuthError::InvalidToken(format!("unknown role `{}`", claims.role))
            })?;
            // A token never carries more than its key holds now.
            let scopes: Vec<String> = claims
                .scope
                .split_whitespace()
                .filter(|s| key.scopes.iter().any(|k| k == s))
                .map(str::to_owned)
                .collect();
            let principal = Principal {
                subject: key.id.clone(),
                tenant: key.tenant.clone(),
                role,
                scopes,
                key_id: Some(key.id.clone()),
                kind: CredentialKind::AccessToken,
                rate_limit_per_minute: key.rate_limit_per_minute,
            };
            return Ok((principal, Some(claims.fam)));
        }
        match issuer {
            Some(iss) => self.oauth.verify(token, &iss).await.map(|p| (p, None)),
            None => Err(AuthError::InvalidToken(
                "the token has no `iss` claim, so no trusted issuer can be chosen".into(),
            )),
        }
    }
}

/// Refuses revoked and expired keys.
pub fn check_key_live(record: &ApiKeyRecord, now: i64) -> Result<(), AuthError> {
    if let Some(at) = record.revoked_at {
        return Err(AuthError::Revoked {
            what: format!("API key `{}` ({})", record.id, record.name),
            when: format!("at {}", rfc3339(at)),
        });
    }
    if let Some(at) = record.expires_at
        && at <= now
    {
        return Err(AuthError::Expired {
            what: format!("API key `{}` ({})", record.id, record.name),
            at: rfc3339(at),
        });
    }
    Ok(())
}

/// The principal of a stored key.
pub fn principal_of(record: &ApiKeyRecord, kind: CredentialKind) -> Result<Principal, AuthError> {
    let role = Role::parse(&record.role).ok_or_else(|| {
        AuthError::Unavailable(format!(
            "stored key `{}` has unknown role `{}`",
            record.id, record.role
        ))
    })?;
    Ok(Principal {
        subject: record.id.clone(),
        tenant: record.tenant.clone(),
        role,
        scopes: record.scopes.clone(),
        key_id: Some(record.id.clone()),
        kind,
        rate_limit_per_minute: record.rate_limit_per_minute,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_renders_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
    }
}
