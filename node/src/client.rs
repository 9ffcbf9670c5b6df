//! The CLI's side of the admin API: one request over the node's unix socket, its JSON body
//! deserialised into the API type the daemon serialised; an error answer's message is the error.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use http_body_util::{BodyExt, Full};
use hyper::Method;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use crate::api::ApiError;

/// Why the CLI got no answer it could use.
#[derive(Debug)]
pub(crate) enum ClientError {
    /// Nothing answers on the socket: the node is not running, or the path is wrong.
    Unreachable(anyhow::Error),
    /// The node did not answer properly (the connection broke, or the answer did not decode).
    Failed(anyhow::Error),
    /// The node answered and refused: the answer's message says why.
    Refused(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Unreachable(e) | ClientError::Failed(e) => write!(f, "{e:#}"),
            ClientError::Refused(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for ClientError {}

/// `GET path_and_query` on the admin socket.
pub(crate) fn get<T: DeserializeOwned>(
    socket: &Path,
    path_and_query: &str,
) -> Result<T, ClientError> {
    call(socket, Method::GET, path_and_query, None)
}

/// `POST path` with `body` as JSON.
pub(crate) fn post<B: Serialize, T: DeserializeOwned>(
    socket: &Path,
    path: &str,
    body: &B,
) -> Result<T, ClientError> {
    let body = serde_json::to_vec(body)
        .map_err(|e| ClientError::Failed(anyhow!(e).context("encoding the request")))?;
    call(socket, Method::POST, path, Some(body))
}

/// `DELETE path`.
pub(crate) fn delete<T: DeserializeOwned>(socket: &Path, path: &str) -> Result<T, ClientError> {
    call(socket, Method::DELETE, path, None)
}

fn call<T: DeserializeOwned>(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
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
        fetch(stream, method, path, body).await
    })
}

async fn fetch<T: DeserializeOwned>(
    stream: UnixStream,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<T, ClientError> {
    let (status, body) = exchange(stream, &method, path, body)
        .await
        .map_err(ClientError::Failed)?;
    if !status.is_success() {
        // The node explains itself in an `ApiError`; anything else is shown as it came.
        return Err(ClientError::Refused(
            match serde_json::from_slice::<ApiError>(&body) {
                Ok(e) => e.error,
                Err(_) => format!(
                    "the node answered {method} {path} with {status}: {}",
                    String::from_utf8_lossy(&body).trim()
                ),
            },
        ));
    }
    serde_json::from_slice(&body)
        .with_context(|| format!("decoding the answer to {method} {path}"))
        .map_err(ClientError::Failed)
}

/// One request and its answer's status and body.
async fn exchange(
    stream: UnixStream,
    method: &Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<(hyper::StatusCode, Bytes)> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("admin API handshake")?;
    let mut request = hyper::Request::builder()
        .method(method.clone())
        .uri(path)
        .header(hyper::header::HOST, "lbcluster");
    if body.is_some() {
        request = request.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let request = request
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
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
    Ok((status, body))
}
