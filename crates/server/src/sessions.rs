//! Resuming Streamable HTTP sessions this process does not hold (rmcp's
//! `SessionStore`). The client's `Mcp-Session-Id` is a sealed token
//! ([`crate::session_token`]) that carries the session's `initialize`
//! parameters; the `/mcp` pre-check opens it and leaves the parameters here as
//! a *restore hint* for the duration of the request, and rmcp's restore path
//! reads them back through [`SessionStore::load`] and replays `initialize`.
//! So a session survives a restart, and moves between gateway processes that
//! share the session key, without any shared database.
//!
//! Sessions are still recorded in the store (for operators' counts), and
//! sessions ended with DELETE are remembered there until their id expires.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use meshgate_store::{SessionRecord, Store, now_ms};
use rmcp::model::InitializeRequestParams;
use rmcp::transport::streamable_http_server::session::{
    SessionState, SessionStore, SessionStoreError,
};

/// Restore hints: session id → the `initialize` parameters from its token.
#[derive(Default)]
pub struct RestoreHints {
    hints: Mutex<HashMap<String, (InitializeRequestParams, usize)>>,
}

/// Removes its hint when the request that placed it is done.
pub struct HintGuard {
    hints: Arc<RestoreHints>,
    sid: String,
}

impl Drop for HintGuard {
    fn drop(&mut self) {
        if let Ok(mut m) = self.hints.hints.lock()
            && let Some((_, users)) = m.get_mut(&self.sid)
        {
            *users -= 1;
            if *users == 0 {
                m.remove(&self.sid);
            }
        }
    }
}

impl RestoreHints {
    /// Leaves `init` for session `sid` until the guard drops (concurrent
    /// requests for one session share the hint).
    pub fn place(self: &Arc<Self>, sid: &str, init: InitializeRequestParams) -> HintGuard {
        if let Ok(mut m) = self.hints.lock() {
            m.entry(sid.to_owned()).or_insert((init, 0)).1 += 1;
        }
        HintGuard {
            hints: self.clone(),
            sid: sid.to_owned(),
        }
    }

    fn get(&self, sid: &str) -> Option<InitializeRequestParams> {
        self.hints
            .lock()
            .ok()
            .and_then(|m| m.get(sid).map(|(init, _)| init.clone()))
    }
}

/// [`SessionStore`] over the restore hints and the gateway's [`Store`].
pub struct StoreSessions {
    store: Arc<dyn Store>,
    hints: Arc<RestoreHints>,
}

impl StoreSessions {
    /// Wraps a store and the hints the `/mcp` pre-check places.
    pub fn new(store: Arc<dyn Store>, hints: Arc<RestoreHints>) -> StoreSessions {
        StoreSessions { store, hints }
    }
}

#[async_trait::async_trait]
impl SessionStore for StoreSessions {
    async fn load(&self, session_id: &str) -> Result<Option<SessionState>, SessionStoreError> {
        // Only a request that presented a valid sealed id for this session
        // placed a hint; anything else is not resumable.
        Ok(self.hints.get(session_id).map(SessionState::new))
    }

    async fn store(&self, session_id: &str, state: &SessionState) -> Result<(), SessionStoreError> {
        let now = now_ms();
        let params = &state.initialize_params;
        self.store
            .put_session(&SessionRecord {
                id: session_id.to_owned(),
                transport: "streamable_http".into(),
                protocol_version: params.protocol_version.to_string(),
                client_name: params.client_info.name.clone(),
                client_version: params.client_info.version.clone(),
                state: serde_json::to_value(state)?,
                created_at: now,
                last_seen_at: now,
            })
            .await?;
        Ok(())
    }

    async fn delete(&self, session_id: &str) -> Result<(), SessionStoreError> {
        self.store.delete_session(session_id).await?;
        Ok(())
    }
}
