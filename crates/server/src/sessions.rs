//! Persists Streamable HTTP sessions in the store (rmcp's `SessionStore`), so
//! that a client keeps its `Mcp-Session-Id` across a gateway restart: a request
//! for a session this process does not hold is restored from the store by
//! replaying the client's `initialize`.

use std::sync::Arc;

use meshgate_store::{SessionRecord, Store, now_ms};
use rmcp::transport::streamable_http_server::session::{
    SessionState, SessionStore, SessionStoreError,
};

/// [`SessionStore`] over the gateway's [`Store`].
pub struct StoreSessions {
    store: Arc<dyn Store>,
}

impl StoreSessions {
    /// Wraps a store.
    pub fn new(store: Arc<dyn Store>) -> StoreSessions {
        StoreSessions { store }
    }
}

#[async_trait::async_trait]
impl SessionStore for StoreSessions {
    async fn load(&self, session_id: &str) -> Result<Option<SessionState>, SessionStoreError> {
        let Some(rec) = self.store.get_session(session_id).await? else {
            return Ok(None);
        };
        if rec.transport != "streamable_http" {
            return Ok(None);
        }
        let state: SessionState = serde_json::from_value(rec.state)?;
        Ok(Some(state))
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
