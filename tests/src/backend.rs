//! The lab's real server and its clients (std threads, no runtime).
//!
//! The server answers, on one dual-stack socket per service:
//! * HTTP/1.1 (keep-alive) on [`HTTP_PORT`]: `GET /` → the backend's name and a newline,
//!   `GET /bytes/N` → N bytes, `GET /whoami` → two lines: the TCP peer address the server sees
//!   (under Full-NAT a LIP and port), e.g. `198.19.200.1:40001`, then the client address the
//!   connection's SYN carried in a TOA option (TCP option 254), e.g. `toa 198.18.1.10:51234`, or
//!   `toa none`.
//! * TCP echo on [`TCP_ECHO_PORT`] (echoes until the peer half-closes, then closes).
//! * UDP echo on [`UDP_ECHO_PORT`].
//!
//! It logs every TCP connection's peer address to stderr. The HTTP listener keeps every SYN
//! (`TCP_SAVE_SYN`); the TOA option is read from it with `TCP_SAVED_SYN`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket,
};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

/// HTTP port of every lab backend.
pub const HTTP_PORT: u16 = 8080;
/// TCP echo port of every lab backend.
pub const TCP_ECHO_PORT: u16 = 9000;
/// UDP echo port of every lab backend.
pub const UDP_ECHO_PORT: u16 = 5353;

/// The ports a [`Backend`] binds (0 = any free port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    pub http: u16,
    pub tcp_echo: u16,
    pub udp_echo: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Self {
            http: HTTP_PORT,
            tcp_echo: TCP_ECHO_PORT,
            udp_echo: UDP_ECHO_PORT,
        }
    }
}

/// A bound, not yet running, backend server.
#[derive(Debug)]
pub struct Backend {
    name: Arc<str>,
    http: TcpListener,
    tcp_echo: TcpListener,
    udp_echo: UdpSocket,
}

impl Backend {
    /// Binds all three services on `ip` (`::` is dual-stack: IPv4 and IPv6 at once).
    pub fn bind(name: &str, ip: IpAddr, ports: Ports) -> io::Result<Self> {
        let http = TcpListener::bind((ip, ports.http))?;
        save_syn(&http)?;
        Ok(Self {
            name: name.into(),
            http,
            tcp_echo: TcpListener::bind((ip, ports.tcp_echo))?,
            udp_echo: UdpSocket::bind((ip, ports.udp_echo))?,
        })
    }

    /// Binds the default ports on `::` (IPv4 and IPv6).
    pub fn bind_default(name: &str) -> io::Result<Self> {
        Self::bind(name, IpAddr::V6(Ipv6Addr::UNSPECIFIED), Ports::default())
    }

    /// The bound ports.
    pub fn ports(&self) -> io::Result<Ports> {
        Ok(Ports {
            http: self.http.local_addr()?.port(),
            tcp_echo: self.tcp_echo.local_addr()?.port(),
            udp_echo: self.udp_echo.local_addr()?.port(),
        })
    }

    /// Serves forever on background threads (one per service, one per TCP connection).
    pub fn start(self) {
        let Self {
            name,
            http,
            tcp_echo,
            udp_echo,
        } = self;
        let http_name = Arc::clone(&name);
        thread::spawn(move || accept_loop(&http, &http_name, serve_http));
        let echo_name = Arc::clone(&name);
        thread::spawn(move || accept_loop(&tcp_echo, &echo_name, serve_tcp_echo));
        thread::spawn(move || serve_udp_echo(&udp_echo, &name));
    }
}

/// IPv4-mapped IPv6 peers (seen on the dual-stack sockets) shown as plain IPv4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

fn accept_loop(
    listener: &TcpListener,
    name: &Arc<str>,
    serve: fn(TcpStream, &str) -> io::Result<()>,
) {
    let service = listener.local_addr().map(|a| a.port()).unwrap_or_default();
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                eprintln!("{name}: accept on port {service}: {e}");
                continue;
            }
        };
        let name = Arc::clone(name);
        thread::spawn(move || {
            let peer = stream.peer_addr().map(canonical);
            if let Ok(peer) = peer {
                eprintln!("{name}: tcp connection to port {service} from {peer}");
            }
            if let Err(e) = serve(stream, &name) {
                eprintln!("{name}: connection to port {service}: {e}");
            }
        });
    }
}

fn serve_tcp_echo(stream: TcpStream, _name: &str) -> io::Result<()> {
    let mut reader = stream.try_clone()?;
    let mut writer = stream;
    io::copy(&mut reader, &mut writer)?;
    writer.shutdown(Shutdown::Write)
}

fn serve_udp_echo(socket: &UdpSocket, name: &str) {
    let mut buf = vec![0u8; 65536];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((n, peer)) => {
                if let Err(e) = socket.send_to(&buf[..n], peer) {
                    eprintln!("{name}: udp echo to {}: {e}", canonical(peer));
                }
            }
            Err(e) => eprintln!("{name}: udp receive: {e}"),
        }
    }
}

/// Makes the kernel keep the SYN of every connection `listener` accepts (`TCP_SAVE_SYN`).
fn save_syn(listener: &TcpListener) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket descriptor, and a pointer to a c_int with its exact size.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_SAVE_SYN,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The IP and TCP headers of the SYN that opened `stream` (`TCP_SAVED_SYN`; the kernel hands
/// them out once).
fn saved_syn(stream: &TcpStream) -> io::Result<Vec<u8>> {
    // IPv6 header (40) + extension headers + TCP header (at most 60).
    let mut buf = vec![0u8; 512];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: a valid socket descriptor; `buf` is writable for `len` bytes and `len` is a
    // writable socklen_t the kernel sets to the length it wrote.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_SAVED_SYN,
            buf.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(len as usize);
    Ok(buf)
}

/// TCP option kind of TOA (the client's address in the SYN, inserted by the load balancer).
const TOA_KIND: u8 = 254;
/// TOA length with an IPv4 address: kind, length, port (2), address (4).
const TOA_LEN_V4: usize = 8;
/// TOA length with an IPv6 address: kind, length, port (2), address (16).
const TOA_LEN_V6: usize = 20;

/// The client address in the TOA option of a saved SYN (its IPv4 or IPv6 header, then its TCP
/// header); `None` when the SYN carries no TOA option. Errors describe malformed headers.
fn parse_toa(syn: &[u8]) -> Result<Option<SocketAddr>, String> {
    const IPPROTO_TCP: u8 = 6;
    let version = syn.first().ok_or("empty SYN")? >> 4;
    let (proto, tcp_start) = match version {
        4 => {
            let ihl = usize::from(syn[0] & 0x0f) * 4;
            ensure_len(syn, ihl.max(20), "IPv4 header")?;
            (syn[9], ihl)
        }
        6 => {
            ensure_len(syn, 40, "IPv6 header")?;
            (syn[6], 40)
        }
        v => return Err(format!("IP version {v}")),
    };
    if proto != IPPROTO_TCP {
        return Err(format!("next header {proto}, not TCP"));
    }
    let tcp = &syn[tcp_start..];
    ensure_len(tcp, 20, "TCP header")?;
    let header_len = usize::from(tcp[12] >> 4) * 4;
    ensure_len(tcp, header_len.max(20), "TCP options")?;
    let mut options = &tcp[20..header_len];
    while let Some(&kind) = options.first() {
        match kind {
            0 => break,
            1 => options = &options[1..],
            _ => {
                let len = usize::from(*options.get(1).ok_or("option without a length")?);
                if len < 2 || len > options.len() {
                    return Err(format!("option {kind} of length {len}"));
                }
                let (option, rest) = options.split_at(len);
                if kind == TOA_KIND {
                    let port = u16::from_be_bytes([option[2], option[3]]);
                    let ip = match len {
                        TOA_LEN_V4 => {
                            let mut octets = [0; 4];
                            octets.copy_from_slice(&option[4..]);
                            IpAddr::from(octets)
                        }
                        TOA_LEN_V6 => {
                            let mut octets = [0; 16];
                            octets.copy_from_slice(&option[4..]);
                            IpAddr::from(octets)
                        }
                        _ => return Err(format!("TOA option of length {len}")),
                    };
                    return Ok(Some(SocketAddr::new(ip, port)));
                }
                options = rest;
            }
        }
    }
    Ok(None)
}

fn ensure_len(bytes: &[u8], len: usize, what: &str) -> Result<(), String> {
    if bytes.len() < len {
        return Err(format!("{what} truncated: {} of {len} bytes", bytes.len()));
    }
    Ok(())
}

/// The `/whoami` line about TOA: `toa ADDR:PORT`, `toa none`, or why the SYN was unreadable.
fn toa_line(stream: &TcpStream) -> String {
    match saved_syn(stream)
        .map_err(|e| e.to_string())
        .and_then(|syn| parse_toa(&syn))
    {
        Ok(Some(client)) => format!("toa {client}"),
        Ok(None) => "toa none".to_owned(),
        Err(e) => format!("toa unreadable: {e}"),
    }
}

fn serve_http(stream: TcpStream, name: &str) -> io::Result<()> {
    let peer = canonical(stream.peer_addr()?);
    let toa = toa_line(&stream);
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut request = String::new();
        if reader.read_line(&mut request)? == 0 {
            return Ok(());
        }
        let mut parts = request.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let mut close = parts.next() != Some("HTTP/1.1");
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 {
                return Ok(());
            }
            let header = header.trim();
            if header.is_empty() {
                break;
            }
            if let Some((key, value)) = header.split_once(':')
                && key.trim().eq_ignore_ascii_case("connection")
                && value.trim().eq_ignore_ascii_case("close")
            {
                close = true;
            }
        }
        match (method, path) {
            ("GET", "/") => respond(&mut out, "200 OK", format!("{name}\n").as_bytes(), close)?,
            ("GET", "/whoami") => {
                let body = format!("{peer}\n{toa}\n");
                respond(&mut out, "200 OK", body.as_bytes(), close)?
            }
            ("GET", p) if p.starts_with("/bytes/") => match p["/bytes/".len()..].parse::<u64>() {
                Ok(n) => respond_bytes(&mut out, n, close)?,
                Err(_) => respond(&mut out, "400 Bad Request", b"bad byte count\n", close)?,
            },
            _ => respond(&mut out, "404 Not Found", b"not found\n", close)?,
        }
        if close {
            return Ok(());
        }
    }
}

fn head(out: &mut TcpStream, status: &str, len: u64, close: bool) -> io::Result<()> {
    let connection = if close { "Connection: close\r\n" } else { "" };
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len}\r\n{connection}\r\n"
    )
}

fn respond(out: &mut TcpStream, status: &str, body: &[u8], close: bool) -> io::Result<()> {
    head(out, status, body.len() as u64, close)?;
    out.write_all(body)
}

fn respond_bytes(out: &mut TcpStream, n: u64, close: bool) -> io::Result<()> {
    head(out, "200 OK", n, close)?;
    io::copy(&mut io::repeat(b'x').take(n), out)?;
    Ok(())
}

fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let stream =
        TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

/// `GET path` from `addr` (HTTP/1.1, `Connection: close`); the body of a 200 answer.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Vec<u8>> {
    let mut stream = connect(addr, timeout)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .with_context(|| format!("read answer from {addr}"))?;
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .with_context(|| format!("no HTTP header in the answer from {addr}"))?;
    let head = String::from_utf8_lossy(&answer[..split]).into_owned();
    let body = answer.split_off(split + 4);
    let status = head.lines().next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 200 ") {
        bail!("GET {path} from {addr}: {status}");
    }
    let header = |name: &str| {
        head.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
    };
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        return dechunk(&body).with_context(|| format!("GET {path} from {addr}"));
    }
    let length = header("content-length").and_then(|v| v.parse::<usize>().ok());
    ensure!(
        length == Some(body.len()),
        "GET {path} from {addr}: body of {} bytes, Content-Length {length:?}",
        body.len()
    );
    Ok(body)
}

/// The body of a `Transfer-Encoding: chunked` answer (Prometheus sends larger answers so);
/// fails on a malformed or truncated one.
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("chunk size line without its end")?;
        let line = String::from_utf8_lossy(&rest[..end]);
        let size = line.split(';').next().unwrap_or_default().trim();
        let size =
            usize::from_str_radix(size, 16).with_context(|| format!("bad chunk size {line:?}"))?;
        rest = &rest[end + 2..];
        if size == 0 {
            return Ok(body);
        }
        ensure!(
            rest.len() >= size + 2 && &rest[size..size + 2] == b"\r\n",
            "chunk of {size} bytes truncated"
        );
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// Sends `message` to the TCP echo server at `addr`, half-closes, and returns what came back.
pub fn tcp_echo(addr: SocketAddr, message: &[u8], timeout: Duration) -> Result<Vec<u8>> {
    let stream = connect(addr, timeout)?;
    exchange(&stream, message, true, |s| {
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).map(|_| answer)
    })
    .with_context(|| format!("tcp echo with {addr}"))
}

/// Writes `message` to `stream` from a second thread (then shuts the writing side down if
/// `half_close`) while `read` reads in this one: written first and read after, a message larger
/// than both socket buffers together would stall both ends.
fn exchange<T>(
    stream: &TcpStream,
    message: &[u8],
    half_close: bool,
    read: impl FnOnce(&mut TcpStream) -> io::Result<T>,
) -> io::Result<T> {
    let mut reader = stream.try_clone()?;
    let mut writer = stream.try_clone()?;
    thread::scope(|s| {
        let sent = s.spawn(move || {
            writer.write_all(message)?;
            if half_close {
                writer.shutdown(Shutdown::Write)?;
            }
            Ok(())
        });
        let read = read(&mut reader);
        let sent = sent
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("writer panicked")));
        sent.and(read)
    })
}

/// Sends [`pattern`]`(n)` through the TCP echo server at `addr`, checks it came back, then
/// aborts the connection: it closes with a RST (`SO_LINGER` 0), not a FIN.
pub fn tcp_echo_reset(addr: SocketAddr, n: usize, timeout: Duration) -> Result<()> {
    let stream = connect(addr, timeout)?;
    let sent = pattern(n);
    let echo = exchange(&stream, &sent, false, |s| {
        let mut echo = vec![0; n];
        s.read_exact(&mut echo).map(|_| echo)
    })
    .with_context(|| format!("tcp echo with {addr}"))?;
    ensure!(
        echo == sent,
        "the echo from {addr} differs from what was sent"
    );
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket descriptor, and a pointer to a linger struct with its exact size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    ensure!(rc == 0, "SO_LINGER: {}", io::Error::last_os_error());
    drop(stream);
    Ok(())
}

/// `n` bytes of a pattern that repeats only every 251 × 256 bytes (so that a lost, repeated or
/// reordered segment shows).
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8 ^ (i / 251) as u8).collect()
}

/// Sends [`pattern`]`(n)` through the TCP echo server at `addr` and checks that exactly it came
/// back.
pub fn tcp_echo_check(addr: SocketAddr, n: usize, timeout: Duration) -> Result<()> {
    let sent = pattern(n);
    let echo = tcp_echo(addr, &sent, timeout)?;
    if let Some(at) = sent.iter().zip(&echo).position(|(a, b)| a != b) {
        bail!("echo from {addr} differs from what was sent at byte {at}");
    }
    ensure!(
        echo.len() == n,
        "echo from {addr}: {} bytes back of {n} sent",
        echo.len()
    );
    Ok(())
}

/// Sends `message` to the UDP echo server at `addr`, again every 200 ms until an answer comes or
/// `timeout` passes (a first datagram can be lost while neighbours are resolved), and returns
/// the answer. A path-MTU report (EMSGSIZE: a router's "fragmentation needed" for a datagram
/// that left whole with DF) is taken like a loss: the kernel fragments the next send to the
/// path's MTU.
pub fn udp_echo(addr: SocketAddr, message: &[u8], timeout: Duration) -> Result<Vec<u8>> {
    const RESEND: Duration = Duration::from_millis(200);
    let local: IpAddr = match addr {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let socket = UdpSocket::bind((local, 0))?;
    socket.connect(addr)?;
    socket.set_read_timeout(Some(RESEND))?;
    let deadline = std::time::Instant::now() + timeout;
    let mut buf = vec![0u8; 65536];
    while std::time::Instant::now() < deadline {
        match socket.send(message) {
            // The answer's wait below paces the next try.
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => 0,
            sent => sent?,
        };
        match socket.recv(&mut buf) {
            Ok(n) => return Ok(buf[..n].to_vec()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) || e.raw_os_error() == Some(libc::EMSGSIZE) => {}
            Err(e) => return Err(e).with_context(|| format!("udp echo from {addr}")),
        }
    }
    bail!("no udp echo from {addr} within {timeout:?}")
}

/// For unit tests: a backend on loopback with free ports, running; its HTTP, TCP echo and UDP
/// echo addresses.
#[cfg(test)]
pub(crate) fn start_local(name: &str) -> (SocketAddr, SocketAddr, SocketAddr) {
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let backend = Backend::bind(
        name,
        ip,
        Ports {
            http: 0,
            tcp_echo: 0,
            udp_echo: 0,
        },
    )
    .unwrap();
    let ports = backend.ports().unwrap();
    backend.start();
    (
        SocketAddr::new(ip, ports.http),
        SocketAddr::new(ip, ports.tcp_echo),
        SocketAddr::new(ip, ports.udp_echo),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(3);

    #[test]
    fn test_dechunk() {
        assert_eq!(
            dechunk(b"4\r\nWiki\r\n6;ext=1\r\npedia \r\n0\r\n\r\n").unwrap(),
            b"Wikipedia "
        );
        assert!(dechunk(b"10\r\nshort\r\n").is_err());
        assert!(dechunk(b"zz\r\n").is_err());
        assert!(dechunk(b"4\r\nWiki").is_err());
    }

    fn start(name: &str) -> (SocketAddr, SocketAddr, SocketAddr) {
        start_local(name)
    }

    #[test]
    fn http_answers_name_bytes_whoami_and_404() {
        let (http, _, _) = start("b7");
        assert_eq!(http_get(http, "/", T).unwrap(), b"b7\n");
        let bytes = http_get(http, "/bytes/100000", T).unwrap();
        assert_eq!(bytes.len(), 100_000);
        assert!(bytes.iter().all(|&b| b == b'x'));
        assert_eq!(http_get(http, "/bytes/0", T).unwrap(), b"");
        let whoami = String::from_utf8(http_get(http, "/whoami", T).unwrap()).unwrap();
        let (peer, toa) = whoami.trim().split_once('\n').unwrap();
        let seen: SocketAddr = peer.parse().unwrap();
        assert_eq!(seen.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        // The SYN was saved and read: it has no TOA option.
        assert_eq!(toa, "toa none");
        let err = http_get(http, "/nothing", T).unwrap_err().to_string();
        assert!(err.contains("404"), "{err}");
        assert!(
            http_get(http, "/bytes/x", T)
                .unwrap_err()
                .to_string()
                .contains("400")
        );
    }

    #[test]
    fn http_keeps_the_connection_alive() {
        let (http, _, _) = start("b1");
        let mut stream = connect(http, T).unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /bytes/3 HTTP/1.1\r\n\r\n")
            .unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut all = String::new();
        stream.read_to_string(&mut all).unwrap();
        assert_eq!(all.matches("HTTP/1.1 200 OK").count(), 3, "{all}");
        assert!(all.ends_with("Connection: close\r\n\r\nb1\n"), "{all}");
        assert!(all.contains("\r\n\r\nxxx"), "{all}");
    }

    #[test]
    fn tcp_and_udp_echo() {
        let (_, echo, udp) = start("b2");
        assert_eq!(tcp_echo(echo, b"hello", T).unwrap(), b"hello");
        let big = vec![7u8; 300_000];
        assert_eq!(tcp_echo(echo, &big, T).unwrap(), big);
        assert_eq!(udp_echo(udp, b"ping", T).unwrap(), b"ping");
        tcp_echo_check(echo, 1_000_000, T).unwrap();
    }

    #[test]
    fn the_pattern_does_not_repeat_within_a_segment() {
        let p = pattern(64 * 1024);
        assert_eq!(p.len(), 64 * 1024);
        // Any window of one MSS shifted by less than 251 × 256 bytes differs.
        for shift in [1, 2, 251, 1448, 65_000] {
            assert_ne!(p[..256], p[shift..shift + 256], "shift {shift}");
        }
    }

    /// A SYN's IPv4 header (no options) followed by a TCP header with `options`.
    fn syn_v4(options: &[u8]) -> Vec<u8> {
        let mut syn = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 6, 0, 0];
        syn.extend_from_slice(&[198, 19, 200, 1, 198, 18, 3, 10]);
        syn.extend_from_slice(&tcp_header(options));
        syn
    }

    /// A SYN's IPv6 header followed by a TCP header with `options`.
    fn syn_v6(options: &[u8]) -> Vec<u8> {
        let tcp = tcp_header(options);
        let mut syn = vec![0x60, 0, 0, 0];
        syn.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
        syn.extend_from_slice(&[6, 64]);
        syn.extend_from_slice(&Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 1).octets());
        syn.extend_from_slice(&Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 0x10).octets());
        syn.extend_from_slice(&tcp);
        syn
    }

    fn tcp_header(options: &[u8]) -> Vec<u8> {
        assert_eq!(options.len() % 4, 0);
        let mut tcp = vec![0x9c, 0x41, 0x1f, 0x90, 0, 0, 0, 1, 0, 0, 0, 0];
        tcp.push((((20 + options.len()) / 4) << 4) as u8);
        tcp.extend_from_slice(&[0x02, 0xff, 0xff, 0, 0, 0, 0]);
        tcp.extend_from_slice(options);
        tcp
    }

    /// What Linux puts in a SYN: MSS, SACK permitted, timestamps, NOP, window scale.
    const LINUX_OPTIONS: [u8; 20] = [
        2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
    ];

    #[test]
    fn toa_is_read_from_an_ipv4_syn() {
        let mut options = LINUX_OPTIONS.to_vec();
        // TOA: port 51234, 198.18.1.10, after the kernel's options.
        options.extend_from_slice(&[254, 8, 0xc8, 0x22, 198, 18, 1, 10]);
        assert_eq!(
            parse_toa(&syn_v4(&options)),
            Ok(Some("198.18.1.10:51234".parse().unwrap()))
        );
        // NOPs and an unknown option before it are skipped.
        let options = [1, 1, 30, 6, 9, 9, 9, 9, 254, 8, 0, 80, 10, 0, 0, 1];
        assert_eq!(
            parse_toa(&syn_v4(&options)),
            Ok(Some("10.0.0.1:80".parse().unwrap()))
        );
    }

    #[test]
    fn toa_is_read_from_an_ipv6_syn() {
        let mut options = LINUX_OPTIONS.to_vec();
        options.extend_from_slice(&[254, 20, 0xc8, 0x22]);
        options.extend_from_slice(&Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10).octets());
        assert_eq!(
            parse_toa(&syn_v6(&options)),
            Ok(Some("[2001:db8:1::10]:51234".parse().unwrap()))
        );
    }

    #[test]
    fn no_toa_when_the_syn_has_none() {
        assert_eq!(parse_toa(&syn_v4(&LINUX_OPTIONS)), Ok(None));
        assert_eq!(parse_toa(&syn_v6(&LINUX_OPTIONS)), Ok(None));
        assert_eq!(parse_toa(&syn_v4(&[])), Ok(None));
        // End of options: what follows is padding, not an option.
        assert_eq!(
            parse_toa(&syn_v4(&[0, 0, 0, 0, 254, 8, 0, 80, 10, 0, 0, 1])),
            Ok(None)
        );
    }

    #[test]
    fn malformed_syns_are_errors_not_panics() {
        let good = {
            let mut options = LINUX_OPTIONS.to_vec();
            options.extend_from_slice(&[254, 8, 0xc8, 0x22, 198, 18, 1, 10]);
            syn_v4(&options)
        };
        for cut in 0..good.len() {
            assert!(parse_toa(&good[..cut]).is_err(), "cut at {cut}");
        }
        let bad_options: [&[u8]; 4] = [
            &[254, 12, 0, 80, 10, 0, 0, 1, 0, 0, 0, 0], // TOA of a wrong length
            &[2, 0, 0, 0],                              // length 0 would loop
            &[2, 9, 0, 0],                              // runs past the header
            &[1, 1, 1, 2],                              // no length byte
        ];
        for options in bad_options {
            assert!(parse_toa(&syn_v4(options)).is_err(), "{options:?}");
        }
        let mut udp = syn_v4(&[]);
        udp[9] = 17;
        assert!(parse_toa(&udp).is_err());
        let mut v5 = syn_v4(&[]);
        v5[0] = 0x55;
        assert!(parse_toa(&v5).is_err());
    }

    #[test]
    fn dual_stack_socket_reports_ipv4_peers_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:198.18.1.10]:4000".parse().unwrap();
        assert_eq!(
            canonical(mapped),
            "198.18.1.10:4000".parse::<SocketAddr>().unwrap()
        );
    }
}
