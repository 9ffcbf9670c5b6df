//! The CLI's side of the admin API: one GET over the node's unix socket, its JSON body
//! deserialised into the API type the daemon serialised.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

/// Why the CLI got no answer it could use.
#[derive(Debug)]
pub(crate) enum ClientError {
    /// Nothing answers on the socket: the node is not running, or the path is wrong.
    Unreachable(anyhow::Error),
    /// The node answered, but not with what was asked for.
    Failed(anyhow::Error),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Unreachable(e) | ClientError::Failed(e) => write!(f, "{e:#}"),
        }
    }
}

impl std::error::Error for ClientError {}

/// `GET path_and_query` on the admin socket.
pub(crate) fn get<T: DeserializeOwned>(
    socket: &Path,
    path_and_query: &str,
) -> Result<T, ClientError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ClientError::Failed(anyhow!(e).context("starting the async runtime")))?;
    runtime.block_on(async {
        let stream = UnixStream::connect(socket).await.map_err(|e| {
            ClientError::Unreachable(anyhow!(e).context(format!(
                "cannot reach the node on {} (is `lbcluster run` running?)",
                socket.display()
            )))
        })?;
        fetch(stream, path_and_query)
            .await
            .map_err(ClientError::Failed)
    })
}

async fn fetch<T: DeserializeOwned>(stream: UnixStream, path_and_query: &str) -> Result<T> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("admin API handshake")?;
    let request = hyper::Request::get(path_and_query)
        .header(hyper::header::HOST, "lbcluster")
        .body(Empty::<Bytes>::new())
        .context("building the request")?;
    // The connection task ends with the CLI's runtime.
    tokio::spawn(conn);
    let response = sender
        .send_request(request)
        .await
        .context("admin API request")?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .context("reading the admin API answer")?
        .to_bytes();
    if !status.is_success() {
        bail!(
            "the node answered {path_and_query} with {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    serde_json::from_slice(&body)
        .with_context(|| format!("decoding the answer to {path_and_query}"))
}
