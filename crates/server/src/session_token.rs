//! Self-describing, authenticated `Mcp-Session-Id`s.
//!
//! A Streamable HTTP session id is a sealed token: `mgs1.` followed by the
//! base64url of a 4-byte key id, a 24-byte random nonce and the
//! XChaCha20-Poly1305 ciphertext of the session's [`SessionClaims`] (tenant,
//! principal, the client's `initialize` parameters, issue and expiry times).
//! Any gateway process holding the key can resume the session from the id
//! alone: after a restart, or on another replica. The AEAD keys are derived
//! once at start-up (HKDF-SHA256 from the configured secret) and reused for
//! every request; a random 192-bit nonce per token makes nonce reuse
//! negligible without any shared counter.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use meshgate_core::config::McpConfig;
use rmcp::model::InitializeRequestParams;
use serde::{Deserialize, Serialize};

/// Prefix of every sealed session id (format version 1).
pub const PREFIX: &str = "mgs1.";
const KID_LEN: usize = 4;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Largest session id accepted for opening (a generous bound on what
/// `initialize` parameters produce; anything longer is not ours).
pub const MAX_ID_LEN: usize = 16 * 1024;

/// What a session id carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionClaims {
    /// The session's id inside this process (rmcp's session manager key).
    pub sid: String,
    /// Tenant of the principal that opened it.
    pub ten: String,
    /// Subject (API key id or token subject) that opened it.
    pub sub: String,
    /// The client's `initialize` parameters: revision, capabilities, client info.
    pub init: InitializeRequestParams,
    /// Issued at, unix seconds.
    pub iat: u64,
    /// Expires at, unix seconds.
    pub exp: u64,
}

/// Why a session id was refused. Every message says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionIdError {
    /// Not in the sealed format at all.
    #[error(
        "the Mcp-Session-Id is not a session id issued by this gateway (expected `{PREFIX}` followed by base64url); send a new initialize without Mcp-Session-Id"
    )]
    Malformed,
    /// Sealed with a key this gateway does not hold.
    #[error(
        "the Mcp-Session-Id was sealed with a key this gateway does not hold (gateways that share sessions need the same mcp.session_key; or the key was rotated out of mcp.session_previous_keys); send a new initialize without Mcp-Session-Id"
    )]
    UnknownKey,
    /// The authentication tag did not match: altered or corrupted.
    #[error(
        "the Mcp-Session-Id failed authentication: it was altered or corrupted; send a new initialize without Mcp-Session-Id"
    )]
    Tampered,
    /// Past its expiry.
    #[error(
        "the session expired at unix time {expired_at} (sessions live mcp.session_ttl_secs after initialize); send a new initialize without Mcp-Session-Id"
    )]
    Expired {
        /// Expiry, unix seconds.
        expired_at: u64,
    },
}

impl SessionIdError {
    /// Short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            SessionIdError::Malformed => "malformed",
            SessionIdError::UnknownKey => "unknown_key",
            SessionIdError::Tampered => "tampered",
            SessionIdError::Expired { .. } => "expired",
        }
    }
}

struct SealKey {
    kid: [u8; KID_LEN],
    cipher: XChaCha20Poly1305,
}

impl SealKey {
    fn derive(secret: &[u8]) -> SealKey {
        let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(b"meshgate session id"), secret);
        let mut key = [0u8; 32];
        let mut kid = [0u8; KID_LEN];
        // Both lengths are far below HKDF-SHA256's limit (255 * 32 bytes),
        // so expansion cannot fail; a failure would leave zeroed output,
        // which is never reached.
        let _ = hk.expand(b"xchacha20poly1305 key v1", &mut key);
        let _ = hk.expand(b"key id v1", &mut kid);
        SealKey {
            kid,
            cipher: XChaCha20Poly1305::new(&key.into()),
        }
    }
}

/// The secret in `text` (trimmed), at least 32 characters; `source` and
/// `advice` complete the error message.
fn secret_of(text: &str, source: &str, advice: &str) -> anyhow::Result<Vec<u8>> {
    let text = text.trim();
    let n = text.chars().count();
    if n < 32 {
        anyhow::bail!(
            "{source} holds {n} characters; the session secret needs at least 32{advice}"
        );
    }
    Ok(text.as_bytes().to_vec())
}

/// Seals and opens session ids. Built once at start-up.
pub struct SessionSealer {
    current: SealKey,
    previous: Vec<SealKey>,
    ttl_secs: u64,
}

impl std::fmt::Debug for SessionSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionSealer")
            .field("previous_keys", &self.previous.len())
            .field("ttl_secs", &self.ttl_secs)
            .finish_non_exhaustive()
    }
}

fn aad(kid: &[u8; KID_LEN]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a[..4].copy_from_slice(b"mgs1");
    a[4..].copy_from_slice(kid);
    a
}

impl SessionSealer {
    /// A sealer over `secret` (and `previous` secrets accepted for opening).
    pub fn new(secret: &[u8], previous: &[&[u8]], ttl_secs: u64) -> SessionSealer {
        SessionSealer {
            current: SealKey::derive(secret),
            previous: previous.iter().map(|s| SealKey::derive(s)).collect(),
            ttl_secs,
        }
    }

    /// Builds the sealer from `[mcp]`: `session_key`, else
    /// `session_key_file`, else `session.key` in `data_dir`, created with 32
    /// random bytes (mode 0600) on first start.
    pub fn from_config(config: &McpConfig, data_dir: &Path) -> anyhow::Result<SessionSealer> {
        let secret = match (&config.session_key, &config.session_key_file) {
            (Some(k), _) => k.trim().as_bytes().to_vec(),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    anyhow::anyhow!(
                        "cannot read mcp.session_key_file {}: {e}; point it at a file holding the session secret",
                        path.display()
                    )
                })?;
                secret_of(
                    &text,
                    &format!("mcp.session_key_file {}", path.display()),
                    "",
                )?
            }
            (None, None) => {
                let path = data_dir.join("session.key");
                match std::fs::read_to_string(&path) {
                    Ok(text) => secret_of(
                        &text,
                        &path.display().to_string(),
                        "; delete it to make a new one (open sessions then end)",
                    )?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        let bytes = crate::auth::random_bytes().map_err(|e| anyhow::anyhow!(e))?;
                        let text = URL_SAFE_NO_PAD.encode(bytes);
                        crate::auth::write_secret_file(&path, &format!("{text}\n"))?;
                        tracing::info!(file = %path.display(), "created the session key");
                        text.into_bytes()
                    }
                    Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
                }
            }
        };
        let previous: Vec<&[u8]> = config
            .session_previous_keys
            .iter()
            .map(|k| k.trim().as_bytes())
            .collect();
        Ok(SessionSealer::new(
            &secret,
            &previous,
            config.session_ttl_secs,
        ))
    }

    /// Lifetime of new sessions, in seconds.
    pub fn ttl_secs(&self) -> u64 {
        self.ttl_secs
    }

    /// Claims for a session opened now.
    pub fn claims(
        &self,
        sid: &str,
        tenant: &str,
        subject: &str,
        init: InitializeRequestParams,
        now_secs: u64,
    ) -> SessionClaims {
        SessionClaims {
            sid: sid.to_owned(),
            ten: tenant.to_owned(),
            sub: subject.to_owned(),
            init,
            iat: now_secs,
            exp: now_secs.saturating_add(self.ttl_secs),
        }
    }

    /// Seals `claims` into a session id.
    pub fn seal(&self, claims: &SessionClaims) -> Result<String, String> {
        let plain = serde_json::to_vec(claims)
            .map_err(|e| format!("could not encode the session claims: {e}"))?;
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| format!("the system random source failed: {e}"))?;
        let aad = aad(&self.current.kid);
        let sealed = self
            .current
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: &aad,
                },
            )
            .map_err(|_| "could not seal the session id".to_owned())?;
        let mut raw = Vec::with_capacity(KID_LEN + NONCE_LEN + sealed.len());
        raw.extend_from_slice(&self.current.kid);
        raw.extend_from_slice(&nonce);
        raw.extend_from_slice(&sealed);
        let mut id = String::with_capacity(PREFIX.len() + raw.len() * 4 / 3 + 4);
        id.push_str(PREFIX);
        URL_SAFE_NO_PAD.encode_string(&raw, &mut id);
        Ok(id)
    }

    /// Opens a session id: format, key, authentication, then expiry.
    pub fn open(&self, id: &str, now_secs: u64) -> Result<SessionClaims, SessionIdError> {
        if id.len() > MAX_ID_LEN {
            return Err(SessionIdError::Malformed);
        }
        let body = id.strip_prefix(PREFIX).ok_or(SessionIdError::Malformed)?;
        let raw = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| SessionIdError::Malformed)?;
        if raw.len() < KID_LEN + NONCE_LEN + TAG_LEN {
            return Err(SessionIdError::Malformed);
        }
        let (kid, rest) = raw.split_at(KID_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let key = std::iter::once(&self.current)
            .chain(self.previous.iter())
            .find(|k| k.kid[..] == *kid)
            .ok_or(SessionIdError::UnknownKey)?;
        let plain = key
            .cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: &aad(&key.kid),
                },
            )
            .map_err(|_| SessionIdError::Tampered)?;
        // Authentic bytes that do not parse were sealed by an incompatible
        // build: as good as malformed.
        let claims: SessionClaims =
            serde_json::from_slice(&plain).map_err(|_| SessionIdError::Malformed)?;
        if now_secs >= claims.exp {
            return Err(SessionIdError::Expired {
                expired_at: claims.exp,
            });
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test";

    fn init() -> InitializeRequestParams {
        serde_json::from_value(serde_json::json!({
            "protocolVersion": "2025-06-18",
            "capabilities": {"elicitation": {}, "roots": {"listChanged": true}},
            "clientInfo": {"name": "test-client", "version": "1.2.3"}
        }))
        .unwrap()
    }

    fn sealer() -> SessionSealer {
        SessionSealer::new(SECRET, &[], 3600)
    }

    #[test]
    fn round_trips_everything_a_resume_needs() {
        let s = sealer();
        let claims = s.claims("abc-123", "acme", "key_1", init(), 1_000);
        let id = s.seal(&claims).unwrap();
        assert!(id.starts_with(PREFIX));
        assert!(
            id.bytes().all(|b| (0x21..=0x7e).contains(&b)),
            "visible ASCII only: {id}"
        );
        let back = s.open(&id, 1_001).unwrap();
        assert_eq!(back, claims);
        assert_eq!(back.exp, 4_600);
        assert_eq!(back.init.client_info.name, "test-client");
        // Two seals of the same claims differ (random nonce) and both open.
        let again = s.seal(&claims).unwrap();
        assert_ne!(id, again);
        assert_eq!(s.open(&again, 1_001).unwrap(), claims);
    }

    #[test]
    fn expiry_is_enforced() {
        let s = sealer();
        let id = s.seal(&s.claims("a", "t", "k", init(), 1_000)).unwrap();
        assert!(s.open(&id, 4_599).is_ok());
        let e = s.open(&id, 4_600).unwrap_err();
        assert_eq!(e, SessionIdError::Expired { expired_at: 4_600 });
        assert!(e.to_string().contains("expired at unix time 4600"), "{e}");
    }

    #[test]
    fn another_key_is_refused_and_rotation_keeps_old_ids() {
        let old = sealer();
        let id = old.seal(&old.claims("a", "t", "k", init(), 1_000)).unwrap();
        let other = SessionSealer::new(b"another secret of at least 32 characters!", &[], 3600);
        assert_eq!(other.open(&id, 1_001), Err(SessionIdError::UnknownKey));
        let rotated = SessionSealer::new(
            b"another secret of at least 32 characters!",
            &[SECRET],
            3600,
        );
        assert_eq!(rotated.open(&id, 1_001).unwrap().sid, "a");
    }

    #[test]
    fn malformed_ids_are_named() {
        let s = sealer();
        for bad in [
            "",
            "0f8e1f3c-uuid-like",
            "mgs1.",
            "mgs1.!!!!",
            "mgs1.AAAA",
            "mgs2.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert_eq!(s.open(bad, 0), Err(SessionIdError::Malformed), "{bad:?}");
        }
        let huge = format!("{PREFIX}{}", "A".repeat(MAX_ID_LEN));
        assert_eq!(s.open(&huge, 0), Err(SessionIdError::Malformed));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Changing any single character of an id never yields claims.
        #[test]
        fn any_tampering_is_detected(pos in 0usize..10_000, replacement in "[A-Za-z0-9_-]") {
            let s = sealer();
            let id = s.seal(&s.claims("sid-1", "acme", "key_1", init(), 1_000)).unwrap();
            let body_start = PREFIX.len();
            let i = body_start + pos % (id.len() - body_start);
            let mut chars: Vec<char> = id.chars().collect();
            let r = replacement.chars().next().unwrap();
            prop_assume!(chars[i] != r);
            chars[i] = r;
            let tampered: String = chars.into_iter().collect();
            let e = s.open(&tampered, 1_001).unwrap_err();
            prop_assert!(
                matches!(e, SessionIdError::Tampered | SessionIdError::UnknownKey | SessionIdError::Malformed),
                "{e:?}"
            );
        }

        /// Arbitrary text never panics and never opens.
        #[test]
        fn arbitrary_input_never_opens(s in ".{0,400}") {
            prop_assert!(sealer().open(&s, 0).is_err());
            let prefixed = format!("{PREFIX}{s}");
            prop_assert!(sealer().open(&prefixed, 0).is_err());
        }
    }
}
