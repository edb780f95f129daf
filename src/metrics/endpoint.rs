//! The `/metrics` HTTP endpoint on `metrics_listen`: `GET /metrics` answers
//! the text exposition format; other paths are 404, other methods 405.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

/// Renders the current series: content type and body.
pub type Render = Arc<dyn Fn() -> (&'static str, Vec<u8>) + Send + Sync>;

/// Serves `GET /metrics` on `listener` with what `render` returns, until
/// `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    render: Render,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let render = render.clone();
                async move {
                    // Rendering walks every series: off the async threads.
                    match tokio::task::spawn_blocking(move || render()).await {
                        Ok((content_type, body)) => {
                            ([(header::CONTENT_TYPE, content_type)], body).into_response()
                        }
                        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                    }
                }
            }),
        )
        .fallback(|| async { (StatusCode::NOT_FOUND, "try GET /metrics\n") });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
