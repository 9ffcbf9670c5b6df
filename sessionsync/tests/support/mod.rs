//! Loopback QUIC for session sync, shared by the QUIC tests and the QUIC benchmark: a dialled
//! connection pair between endpoints made with `testpki`.

use quinn::{Connection, Endpoint};

/// `from` (with its client config) dials `to`, whose certificate names `to_name`; returns the
/// dialled connection and the one `to` accepted.
pub(crate) async fn connect(
    from: &Endpoint,
    client: &quinn::ClientConfig,
    to: &Endpoint,
    to_name: &str,
) -> (Connection, Connection) {
    let accept = {
        let to = to.clone();
        tokio::spawn(async move {
            let incoming = to.accept().await.unwrap();
            incoming.await.unwrap()
        })
    };
    let dialled = from
        .connect_with(client.clone(), to.local_addr().unwrap(), to_name)
        .unwrap()
        .await
        .unwrap();
    (dialled, accept.await.unwrap())
}
