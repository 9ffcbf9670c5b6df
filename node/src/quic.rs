//! The node's one QUIC endpoint (DESIGN §3, §4, §8): mutual TLS 1.3 with the cluster CA as the
//! only trust anchor, every protocol on its own ALPN, and peers identified by the node name in
//! their certificate.
//!
//! Both directions check the peer the same way:
//! 1. its certificate must chain to the cluster CA (no system roots) and be good for the role
//!    (client or server authentication); a dialled peer must also carry the name we dialled;
//! 2. the handshake must agree on one of our ALPNs;
//! 3. the membership callback must admit its node name for that ALPN (a current member; see
//!    `consensus`'s access rules for a node that has not joined a cluster yet).
//!
//! A peer refused at step 1 or 3 is logged and counted (`Counters`); step 3 closes the
//! connection with the refusal's code and reason. This is the check of a new connection only:
//! every Raft request is authorised again when it is served, and the connections of a node
//! removed from the cluster are closed by whoever serves them (`consensus::serve_connection`,
//! session sync when its peer set drops the node). `Endpoint::serve` accepts connections and
//! hands each one to the handler registered for its ALPN.

use std::collections::HashMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use consensus::Refusal;
use quinn::crypto::rustls::{HandshakeData, QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Incoming, TransportConfig, VarInt};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::tls;

/// The ALPN of Raft RPCs.
pub(crate) const ALPN_RAFT: &[u8] = consensus::transport::ALPN;
/// The ALPN of session sync.
pub(crate) const ALPN_SYNC: &[u8] = sessionsync::ALPN;
/// Every protocol a node serves.
pub(crate) const ALPNS: &[&[u8]] = &[ALPN_RAFT, ALPN_SYNC];

/// Application close code: the peer's certificate names no usable node.
pub(crate) const CLOSE_BAD_IDENTITY: VarInt = VarInt::from_u32(0x101);
/// Application close code: no handler serves the negotiated ALPN.
pub(crate) const CLOSE_NO_HANDLER: VarInt = VarInt::from_u32(0x102);
/// Application close code: the endpoint shuts down.
pub(crate) const CLOSE_SHUTDOWN: VarInt = VarInt::from_u32(0);

/// `self_check` gives up after this long.
const SELF_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// "May this node connect for this ALPN?" — asked with the peer's node name and the
/// negotiated ALPN after every handshake, in both directions.
pub(crate) type Membership = Arc<dyn Fn(&str, &[u8]) -> Result<(), Refusal> + Send + Sync>;

/// Takes an accepted connection of one ALPN; it must not block (spawn a task for the work).
pub(crate) type Handler = Arc<dyn Fn(PeerConnection) + Send + Sync>;

/// The node's TLS identity: its certificate and key, and the cluster CA it trusts.
pub(crate) struct NodeTls {
    name: String,
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
}

impl fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeTls")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl NodeTls {
    /// Loads the cluster CA certificate and the node's certificate (chain) and key, as written
    /// by `lbcluster tls`.
    pub(crate) fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self> {
        let mut roots = RootCertStore::empty();
        for der in CertificateDer::pem_file_iter(ca)
            .with_context(|| format!("reading {}", ca.display()))?
        {
            let der = der.with_context(|| format!("parsing {}", ca.display()))?;
            roots
                .add(der)
                .with_context(|| format!("{} is not a usable CA certificate", ca.display()))?;
        }
        if roots.is_empty() {
            bail!("{} holds no certificate", ca.display());
        }
        let certs = CertificateDer::pem_file_iter(cert)
            .with_context(|| format!("reading {}", cert.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing {}", cert.display()))?;
        let leaf = certs
            .first()
            .with_context(|| format!("{} holds no certificate", cert.display()))?;
        let name = tls::node_name(leaf).with_context(|| format!("{}", cert.display()))?;
        let key = PrivateKeyDer::from_pem_file(key)
            .with_context(|| format!("reading the private key {}", key.display()))?;
        Ok(Self {
            name,
            certs,
            key,
            roots: Arc::new(roots),
        })
    }

    /// The node name in the certificate.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }
}

/// Peers refused and accepted, in both directions.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    refused_untrusted_ca: AtomicU64,
    refused_not_member: AtomicU64,
    accepted: AtomicU64,
}

/// A copy of `Counters` at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct CounterValues {
    /// The peer's certificate was refused: not signed by the cluster CA, expired, not good for
    /// its role, or (for a peer we dialled) not for the node we dialled.
    pub(crate) refused_untrusted_ca: u64,
    /// The peer's certificate was good but the membership callback refused it (not a current
    /// member, or this node has not joined a cluster and has no join token), or it names no
    /// usable node.
    pub(crate) refused_not_member: u64,
    /// Connections whose peer passed every check.
    pub(crate) accepted: u64,
}

impl Counters {
    pub(crate) fn values(&self) -> CounterValues {
        CounterValues {
            refused_untrusted_ca: self.refused_untrusted_ca.load(Ordering::Relaxed),
            refused_not_member: self.refused_not_member.load(Ordering::Relaxed),
            accepted: self.accepted.load(Ordering::Relaxed),
        }
    }
}

/// A connection to a member, after every check.
#[derive(Debug)]
pub(crate) struct PeerConnection {
    /// The peer's node name, from its certificate.
    pub(crate) peer: String,
    /// The negotiated ALPN.
    pub(crate) alpn: Vec<u8>,
    pub(crate) connection: Connection,
}

/// What every connection task needs.
struct Shared {
    membership: Membership,
    counters: Arc<Counters>,
}

/// The node's QUIC endpoint.
pub(crate) struct Endpoint {
    endpoint: quinn::Endpoint,
    client: Arc<rustls::ClientConfig>,
    transport: Arc<TransportConfig>,
    shared: Arc<Shared>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("local_addr", &self.endpoint.local_addr().ok())
            .field("counters", &self.shared.counters.values())
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// Binds the endpoint to `listen`, serving (and dialling) the protocols in `alpns` with the
    /// node's certificate, trusting only the cluster CA, and admitting only peers `membership`
    /// approves. Must be called inside a tokio runtime.
    pub(crate) fn bind(
        listen: SocketAddr,
        tls: &NodeTls,
        alpns: &[&[u8]],
        membership: Membership,
    ) -> Result<Self> {
        if alpns.is_empty() {
            bail!("the QUIC endpoint needs at least one ALPN");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let counters = Arc::new(Counters::default());

        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(tls.roots.clone(), provider.clone())
                .build()
                .context("building the client certificate verifier")?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3 with the ring provider")?
            .with_client_cert_verifier(Arc::new(CountingClientVerifier {
                inner: client_verifier,
                counters: counters.clone(),
            }))
            .with_single_cert(tls.certs.clone(), tls.key.clone_key())
            .context("the node certificate and key do not fit together")?;
        server.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();

        let server_verifier =
            WebPkiServerVerifier::builder_with_provider(tls.roots.clone(), provider.clone())
                .build()
                .context("building the server certificate verifier")?;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3 with the ring provider")?
            .dangerous() // Only to install the counting wrapper around the WebPKI verifier.
            .with_custom_certificate_verifier(Arc::new(CountingServerVerifier {
                inner: server_verifier,
                counters: counters.clone(),
            }))
            .with_client_auth_cert(tls.certs.clone(), tls.key.clone_key())
            .context("the node certificate and key do not fit together")?;

        // Keep-alives, idle timeout and handshake resends short enough that a dead or cut-off
        // peer shows as disconnected within about a second, for Raft and sync alike.
        let transport = Arc::new(consensus::transport::quic_transport());

        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(
            QuicServerConfig::try_from(server).context("QUIC server TLS config")?,
        ));
        server_config.transport_config(transport.clone());
        let endpoint = quinn::Endpoint::server(server_config, listen)
            .with_context(|| format!("binding the QUIC endpoint to {listen}"))?;
        info!(
            node = %tls.name,
            addr = %endpoint.local_addr().map_or(listen, |a| a),
            "QUIC endpoint bound"
        );
        Ok(Self {
            endpoint,
            client: Arc::new(client),
            transport,
            shared: Arc::new(Shared {
                membership,
                counters,
            }),
        })
    }

    /// The address the endpoint listens on.
    pub(crate) fn local_addr(&self) -> Result<SocketAddr> {
        self.endpoint
            .local_addr()
            .context("the QUIC endpoint's address")
    }

    /// The refusal and acceptance counters so far.
    pub(crate) fn counters(&self) -> CounterValues {
        self.shared.counters.values()
    }

    /// Dials node `peer` at `addr` for protocol `alpn`. The peer's certificate must chain to the
    /// cluster CA and name `peer`, and `peer` must be a current member.
    pub(crate) async fn connect(
        &self,
        addr: SocketAddr,
        peer: &str,
        alpn: &[u8],
    ) -> Result<PeerConnection> {
        tls::validate_node_name(peer).map_err(|e| anyhow!(e))?;
        let mut crypto = (*self.client).clone();
        crypto.alpn_protocols = vec![alpn.to_vec()];
        let mut config = quinn::ClientConfig::new(Arc::new(
            QuicClientConfig::try_from(crypto).context("QUIC client TLS config")?,
        ));
        config.transport_config(self.transport.clone());
        let connection = self
            .endpoint
            .connect_with(config, addr, peer)
            .with_context(|| format!("connecting to {peer} at {addr}"))?
            .await
            .map_err(|e| {
                warn!(%peer, %addr, error = %e, "QUIC handshake failed");
                anyhow!(e).context(format!("connecting to {peer} at {addr}"))
            })?;
        self.shared
            .admit(connection)
            .with_context(|| format!("connecting to {peer} at {addr}"))
    }

    /// Accepts connections until the endpoint is closed, handing each to the handler of its
    /// ALPN. Handshakes run concurrently, one task each.
    pub(crate) async fn serve(&self, handlers: HashMap<Vec<u8>, Handler>) {
        let handlers = Arc::new(handlers);
        while let Some(incoming) = self.endpoint.accept().await {
            let shared = self.shared.clone();
            let handlers = handlers.clone();
            tokio::spawn(async move {
                if let Some(conn) = shared.accept(incoming).await {
                    match handlers.get(&conn.alpn) {
                        Some(handler) => handler(conn),
                        None => {
                            let alpn = String::from_utf8_lossy(&conn.alpn).into_owned();
                            warn!(peer = %conn.peer, %alpn, "no handler for ALPN; closing");
                            conn.connection.close(
                                CLOSE_NO_HANDLER,
                                format!("no handler for ALPN {alpn}").as_bytes(),
                            );
                        }
                    }
                }
            });
        }
        debug!("QUIC endpoint closed; accept loop ends");
    }

    /// Closes every connection and stops `serve`.
    pub(crate) fn close(&self) {
        self.endpoint.close(CLOSE_SHUTDOWN, b"node shutting down");
    }
}

impl Shared {
    async fn accept(&self, incoming: Incoming) -> Option<PeerConnection> {
        let remote = incoming.remote_address();
        let connection = match incoming.await {
            Ok(c) => c,
            Err(e) => {
                warn!(%remote, error = %e, "refused an incoming QUIC connection");
                return None;
            }
        };
        match self.admit(connection) {
            Ok(conn) => Some(conn),
            Err(e) => {
                warn!(%remote, error = %format!("{e:#}"), "refused an incoming QUIC connection");
                None
            }
        }
    }

    /// The checks after a completed handshake: the peer's node name and its membership.
    fn admit(&self, connection: Connection) -> Result<PeerConnection> {
        let alpn = connection
            .handshake_data()
            .and_then(|d| d.downcast::<HandshakeData>().ok())
            .and_then(|d| d.protocol)
            .context("the handshake agreed on no ALPN")?;
        let peer = connection
            .peer_identity()
            .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
            .and_then(|certs| certs.into_iter().next())
            .context("the peer presented no certificate")
            .and_then(|leaf| tls::node_name(&leaf));
        let peer = match peer {
            Ok(peer) => peer,
            Err(e) => {
                self.counters
                    .refused_not_member
                    .fetch_add(1, Ordering::Relaxed);
                let reason = format!("certificate names no node: {e:#}");
                connection.close(CLOSE_BAD_IDENTITY, reason.as_bytes());
                bail!(reason);
            }
        };
        if let Err(refusal) = (self.membership)(&peer, &alpn) {
            self.counters
                .refused_not_member
                .fetch_add(1, Ordering::Relaxed);
            let reason = refusal.to_string();
            connection.close(refusal.code(), reason.as_bytes());
            bail!(reason);
        }
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
        debug!(
            %peer,
            alpn = %String::from_utf8_lossy(&alpn),
            remote = %connection.remote_address(),
            "QUIC connection to member established"
        );
        Ok(PeerConnection {
            peer,
            alpn,
            connection,
        })
    }
}

/// Counts the client certificates the WebPKI verifier refuses.
#[derive(Debug)]
struct CountingClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    counters: Arc<Counters>,
}

impl ClientCertVerifier for CountingClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| refused_cert(&self.counters, "client", e))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Counts the server certificates the WebPKI verifier refuses.
#[derive(Debug)]
struct CountingServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    counters: Arc<Counters>,
}

impl ServerCertVerifier for CountingServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .inspect_err(|e| refused_cert(&self.counters, "server", e))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Proves that a node's TLS files work for the cluster's mutual TLS (`lbcluster tls cert
/// check`): binds an endpoint on loopback with them and connects it to itself on every ALPN in
/// `ALPNS`, both ends checking the other exactly as between two nodes; each end must see the
/// node's own name.
pub(crate) async fn self_check(tls: &NodeTls) -> Result<()> {
    let name = tls.name.clone();
    let me = name.clone();
    let endpoint = Arc::new(Endpoint::bind(
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        tls,
        ALPNS,
        Arc::new(move |peer: &str, _: &[u8]| {
            if peer == me {
                Ok(())
            } else {
                Err(Refusal::NotMember {
                    by: me.clone(),
                    peer: peer.to_owned(),
                })
            }
        }),
    )?);
    let (tx, mut served) = mpsc::unbounded_channel();
    let handler: Handler = Arc::new(move |conn: PeerConnection| {
        // The receiver outlives every connection of the check.
        let _ = tx.send((conn.alpn, conn.peer));
    });
    let handlers = ALPNS
        .iter()
        .map(|a| (a.to_vec(), handler.clone()))
        .collect();
    let serving = endpoint.clone();
    let server = tokio::spawn(async move { serving.serve(handlers).await });
    let addr = endpoint.local_addr()?;
    let checks = async {
        for alpn in ALPNS {
            let conn = endpoint.connect(addr, &name, alpn).await?;
            let (server_alpn, client) =
                served.recv().await.context("the accept loop ended early")?;
            if conn.peer != name || client != name || server_alpn != *alpn {
                bail!(
                    "the ends saw {:?} and {client:?} on {:?}, not {name:?} on {:?}",
                    conn.peer,
                    String::from_utf8_lossy(&server_alpn),
                    String::from_utf8_lossy(alpn)
                );
            }
            conn.connection.close(CLOSE_SHUTDOWN, b"check done");
        }
        Ok(())
    };
    let result = tokio::time::timeout(SELF_CHECK_TIMEOUT, checks)
        .await
        .unwrap_or_else(|_| Err(anyhow!("the handshake did not finish in time")));
    endpoint.close();
    server.await.context("the accept loop panicked")?;
    result?;
    let counters = endpoint.counters();
    let expected = CounterValues {
        accepted: 2 * ALPNS.len() as u64,
        ..CounterValues::default()
    };
    if counters != expected {
        bail!("unexpected connection counters {counters:?}");
    }
    Ok(())
}

fn refused_cert(counters: &Counters, role: &str, e: &rustls::Error) {
    counters
        .refused_untrusted_ca
        .fetch_add(1, Ordering::Relaxed);
    warn!(error = %e, "refused a peer's {role} certificate (not valid under the cluster CA)");
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use quinn::{ConnectionError, RecvStream, SendStream};

    use super::*;

    const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    /// A CA in `dir` and a certificate for each of `nodes`.
    fn certs(dir: &Path, ca: &str, nodes: &[&str]) {
        tls::create_ca(dir, ca, 30, false).unwrap();
        for node in nodes {
            tls::create_node_cert(dir, node, &[LOCALHOST], dir, 30, false).unwrap();
        }
    }

    /// Node `node`'s certificate from `cert_dir`, trusting the CA in `ca_dir`.
    fn identity(ca_dir: &Path, cert_dir: &Path, node: &str) -> NodeTls {
        NodeTls::load(
            &ca_dir.join(tls::CA_CERT_FILE),
            &cert_dir.join(format!("{node}.pem")),
            &cert_dir.join(format!("{node}.key")),
        )
        .unwrap()
    }

    /// Node `me` admits the nodes in `names`, for every ALPN.
    fn members(me: &'static str, names: &'static [&'static str]) -> Membership {
        Arc::new(move |name: &str, _: &[u8]| {
            if names.contains(&name) {
                Ok(())
            } else {
                Err(Refusal::NotMember {
                    by: me.to_owned(),
                    peer: name.to_owned(),
                })
            }
        })
    }

    struct Node {
        endpoint: Arc<Endpoint>,
        addr: SocketAddr,
        /// The peer of every connection handed to the Raft handler.
        seen: mpsc::UnboundedReceiver<String>,
    }

    /// Binds a node on loopback with ALPNs Raft and sync, serving only Raft: every stream gets
    /// "PEER:REQUEST" back, PEER being the name the node sees.
    fn start(tls: NodeTls, membership: Membership) -> Node {
        let endpoint = Arc::new(
            Endpoint::bind(SocketAddr::new(LOCALHOST, 0), &tls, ALPNS, membership).unwrap(),
        );
        let addr = endpoint.local_addr().unwrap();
        let (tx, seen) = mpsc::unbounded_channel();
        let raft: Handler = Arc::new(move |conn: PeerConnection| {
            tx.send(conn.peer.clone()).unwrap();
            tokio::spawn(async move {
                while let Ok((send, recv)) = conn.connection.accept_bi().await {
                    tokio::spawn(echo(conn.peer.clone(), send, recv));
                }
            });
        });
        let serving = endpoint.clone();
        tokio::spawn(async move {
            serving
                .serve(HashMap::from([(ALPN_RAFT.to_vec(), raft)]))
                .await;
        });
        Node {
            endpoint,
            addr,
            seen,
        }
    }

    async fn echo(peer: String, mut send: SendStream, mut recv: RecvStream) {
        let request = recv.read_to_end(1024).await.unwrap();
        let answer = format!("{peer}:{}", String::from_utf8_lossy(&request));
        send.write_all(answer.as_bytes()).await.unwrap();
        send.finish().unwrap();
    }

    async fn exchange(conn: &Connection, request: &str) -> Result<String> {
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(request.as_bytes()).await?;
        send.finish()?;
        Ok(String::from_utf8(recv.read_to_end(1024).await?)?)
    }

    /// The error of a connection attempt the other side refuses: the dial fails, or it succeeds
    /// (our side of the handshake was done) and the peer then closes the connection.
    async fn refusal(attempt: Result<PeerConnection>) -> String {
        match attempt {
            Err(e) => format!("{e:#}"),
            Ok(conn) => conn.connection.closed().await.to_string(),
        }
    }

    #[tokio::test]
    async fn test_members_connect_both_ways_and_see_each_other() {
        let dir = tempfile::tempdir().unwrap();
        certs(dir.path(), "cluster CA", &["a", "b"]);
        let mut a = start(
            identity(dir.path(), dir.path(), "a"),
            members("a", &["a", "b"]),
        );
        let mut b = start(
            identity(dir.path(), dir.path(), "b"),
            members("b", &["a", "b"]),
        );

        let to_b = a.endpoint.connect(b.addr, "b", ALPN_RAFT).await.unwrap();
        assert_eq!(to_b.peer, "b");
        assert_eq!(to_b.alpn, ALPN_RAFT);
        assert_eq!(exchange(&to_b.connection, "ping").await.unwrap(), "a:ping");
        assert_eq!(b.seen.recv().await.unwrap(), "a");

        let to_a = b.endpoint.connect(a.addr, "a", ALPN_RAFT).await.unwrap();
        assert_eq!(to_a.peer, "a");
        assert_eq!(exchange(&to_a.connection, "pong").await.unwrap(), "b:pong");
        assert_eq!(a.seen.recv().await.unwrap(), "b");

        for node in [&a, &b] {
            let expected = CounterValues {
                accepted: 2,
                ..CounterValues::default()
            };
            assert_eq!(node.endpoint.counters(), expected);
        }
        a.endpoint.close();
        b.endpoint.close();
    }

    #[tokio::test]
    async fn test_certificate_from_another_ca_is_refused() {
        let cluster = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        certs(cluster.path(), "cluster CA", &["a", "b"]);
        // A member's name, but signed by another CA.
        certs(other.path(), "other CA", &["b"]);
        let both = members("a", &["a", "b"]);
        let a = start(identity(cluster.path(), cluster.path(), "a"), both.clone());

        // An impostor that trusts the cluster CA but holds the other CA's certificate dials a.
        let impostor = start(identity(cluster.path(), other.path(), "b"), both.clone());
        let reason = refusal(impostor.endpoint.connect(a.addr, "a", ALPN_RAFT).await).await;
        assert!(reason.contains("UnknownIssuer"), "{reason}");
        assert_eq!(a.endpoint.counters().refused_untrusted_ca, 1);
        // The same for session sync: the check comes before any protocol.
        let reason = refusal(impostor.endpoint.connect(a.addr, "a", ALPN_SYNC).await).await;
        assert!(reason.contains("UnknownIssuer"), "{reason}");
        assert_eq!(a.endpoint.counters().refused_untrusted_ca, 2);

        // a dials a node of the other cluster: a refuses its server certificate.
        let foreign = start(identity(other.path(), other.path(), "b"), both);
        let err = a.endpoint.connect(foreign.addr, "b", ALPN_RAFT).await;
        assert!(err.is_err());
        assert_eq!(a.endpoint.counters().refused_untrusted_ca, 3);

        // A genuine member that is not the node a meant to dial is refused too.
        let b = start(
            identity(cluster.path(), cluster.path(), "b"),
            members("b", &["a", "b"]),
        );
        let err = a
            .endpoint
            .connect(b.addr, "a", ALPN_RAFT)
            .await
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("not valid for name \"a\""),
            "{err:#}"
        );
        assert_eq!(
            a.endpoint.counters(),
            CounterValues {
                refused_untrusted_ca: 4,
                ..CounterValues::default()
            }
        );
    }

    #[tokio::test]
    async fn test_non_member_is_refused_in_both_directions() {
        let dir = tempfile::tempdir().unwrap();
        certs(dir.path(), "cluster CA", &["a", "d"]);
        let a = start(
            identity(dir.path(), dir.path(), "a"),
            members("a", &["a", "b"]),
        );
        let d = start(
            identity(dir.path(), dir.path(), "d"),
            members("d", &["a", "d"]),
        );

        let attempt = d.endpoint.connect(a.addr, "a", ALPN_RAFT).await;
        let closed = match attempt {
            Ok(conn) => conn.connection.closed().await,
            Err(e) => panic!("d's side of the handshake should pass: {e:#}"),
        };
        match closed {
            ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.error_code, consensus::transport::CLOSE_NOT_MEMBER);
                assert_eq!(
                    &close.reason[..],
                    b"a refuses node d: it is not a member of a's cluster"
                );
            }
            other => panic!("unexpected close: {other}"),
        }
        assert_eq!(a.endpoint.counters().refused_not_member, 1);

        let err = a
            .endpoint
            .connect(d.addr, "d", ALPN_RAFT)
            .await
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("a refuses node d: it is not a member"),
            "{err:#}"
        );
        assert_eq!(
            a.endpoint.counters(),
            CounterValues {
                refused_not_member: 2,
                ..CounterValues::default()
            }
        );
    }

    #[tokio::test]
    async fn test_unknown_alpn_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        certs(dir.path(), "cluster CA", &["a", "b"]);
        let a = start(
            identity(dir.path(), dir.path(), "a"),
            members("a", &["a", "b"]),
        );
        let b = start(
            identity(dir.path(), dir.path(), "b"),
            members("b", &["a", "b"]),
        );

        // An ALPN a does not speak: the TLS handshake fails.
        let err = b.endpoint.connect(a.addr, "a", b"lbc-nope/1").await;
        let err = format!("{:#}", err.unwrap_err());
        assert!(err.contains("120"), "{err}"); // no_application_protocol

        // An ALPN a speaks but serves no handler for: closed with a reason.
        let conn = b.endpoint.connect(a.addr, "a", ALPN_SYNC).await.unwrap();
        match conn.connection.closed().await {
            ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.error_code, CLOSE_NO_HANDLER);
                assert_eq!(&close.reason[..], b"no handler for ALPN lbc-sync/3");
            }
            other => panic!("unexpected close: {other}"),
        }
    }
}
