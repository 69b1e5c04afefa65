//! What every HTTP listener of Sluice shares: the API's errors and their one
//! mapping to HTTP ([`ApiError`]), and serving a router until shutdown. The
//! gateway (`/v1`) and the ops endpoints (`/healthz`, `/readyz`, `/metrics`)
//! both build on this module, not on each other.

mod error;

use axum::Router;
use tokio::net::TcpListener;

pub use error::ApiError;
pub(crate) use error::ErrorBody;

use crate::shutdown::Shutdown;

/// Serves `router` on `listener` until `shutdown` fires.
pub async fn serve(listener: TcpListener, router: Router, mut shutdown: Shutdown) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(async move { shutdown.wait().await }).await
}
