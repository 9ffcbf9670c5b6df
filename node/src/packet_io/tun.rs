//! The multi-queue TUN backend: `IFF_TUN | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE` with
//! checksum and TSO offloads, so the kernel hands over (and takes back) up to 64 KB GSO
//! segments with a virtio-net header in front (TESTBED "TUN with virtio-net offloads").
//!
//! The device is not persistent: it vanishes when the last queue's fd closes, which is what
//! makes BIRD withdraw the routes it announces `via "lbc0"` when the process dies (DESIGN §5).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::vnet::{self, VNET_HDR_LEN, VnetHdr};
use super::{PacketIo, Received};

const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
/// Fail with `EBUSY` instead of attaching when a device of that name exists already.
const IFF_TUN_EXCL: libc::c_short = -0x8000; // 0x8000 as a C short

const TUN_F_CSUM: libc::c_ulong = 0x01;
const TUN_F_TSO4: libc::c_ulong = 0x02;
const TUN_F_TSO6: libc::c_ulong = 0x04;

// `_IOW('T', nr, int)` with the generic ioctl encoding (x86_64, arm64, riscv64; TESTBED verified
// the x86_64 values).
const fn iow_t_int(nr: libc::c_ulong) -> libc::c_ulong {
    (1 << 30) | (4 << 16) | ((b'T' as libc::c_ulong) << 8) | nr
}
const TUNSETIFF: libc::c_ulong = iow_t_int(202); // 0x400454ca
const TUNSETOFFLOAD: libc::c_ulong = iow_t_int(208); // 0x400454d0
const TUNSETVNETHDRSZ: libc::c_ulong = iow_t_int(216); // 0x400454d8

/// Largest packet the kernel hands over: a 64 KB GSO segment (`GSO_LEGACY_MAX_SIZE`).
const MAX_PACKET: usize = 65_536;
/// Room after the packet for the TOA option the engine may insert into a SYN.
const TAILROOM: usize = 64;
/// The buffer a worker needs for one packet of this backend.
pub(crate) const BUF_LEN: usize = VNET_HDR_LEN + MAX_PACKET + TAILROOM;

/// `struct ifreq` as far as `TUNSETIFF` uses it: the name and the flags.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// One queue (one fd) of the TUN device.
#[derive(Debug)]
pub(crate) struct TunQueue {
    fd: OwnedFd,
}

/// Creates the device `name` with `queues` queues, offloads on. Fails if a device of that name
/// exists already (another lbcluster, or anything else) rather than attaching to it.
pub(crate) fn create(name: &str, queues: usize) -> Result<Vec<TunQueue>> {
    if name.is_empty()
        || name.len() >= libc::IFNAMSIZ
        || name
            .bytes()
            .any(|b| b == b'/' || b.is_ascii_whitespace() || b == 0)
    {
        bail!("invalid TUN device name {name:?} (1 to 15 bytes, no '/' or whitespace)");
    }
    if queues == 0 {
        bail!("a TUN device needs at least one queue");
    }
    let mut out = Vec::with_capacity(queues);
    for i in 0..queues {
        // The first queue creates the device and must not attach to an existing one.
        let excl = if i == 0 { IFF_TUN_EXCL } else { 0 };
        let q = open_queue(name, excl).map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => {
                anyhow::anyhow!("TUN device {name} already exists (another lbcluster running?)")
            }
            Some(libc::EPERM) | Some(libc::EACCES) => anyhow::anyhow!(
                "creating TUN device {name} is not permitted: it needs CAP_NET_ADMIN \
                 (run as root or grant the capability): {e}"
            ),
            _ => anyhow::Error::new(e).context(format!(
                "creating TUN device {name} (queue {} of {queues})",
                i + 1
            )),
        })?;
        out.push(q);
    }
    // Offloads and the header size are per device: set once, through the first queue.
    let fd = out[0].fd.as_raw_fd();
    let hdr_sz = VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which is valid for the call.
    let r = unsafe { libc::ioctl(fd, TUNSETVNETHDRSZ, &hdr_sz as *const libc::c_int) };
    if r < 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("setting the vnet header size of {name}"));
    }
    // SAFETY: TUNSETOFFLOAD takes its flags by value; no memory is passed.
    let r = unsafe { libc::ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6) };
    if r < 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("enabling checksum and TSO offloads on {name}"));
    }
    Ok(out)
}

fn open_queue(name: &str, extra_flags: libc::c_short) -> io::Result<TunQueue> {
    let path = CString::new("/dev/net/tun").expect("no NUL in a literal");
    // SAFETY: `path` is a valid NUL-terminated string for the duration of the call.
    let raw = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a freshly opened fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TUN | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE | extra_flags,
        _pad: [0; 22],
    };
    for (d, s) in req.name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` has its layout (name, then the
    // flags at offset 16, 40 bytes in all) and lives across the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TunQueue { fd })
}

impl PacketIo for TunQueue {
    fn headroom(&self) -> usize {
        VNET_HDR_LEN
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<Received>> {
        loop {
            // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, which we borrow
            // mutably for the call.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                let n = n as usize;
                let hdr = match buf.first_chunk::<VNET_HDR_LEN>() {
                    Some(hdr) if n >= VNET_HDR_LEN => VnetHdr::parse(hdr),
                    _ => return Err(io::Error::other("TUN read shorter than the vnet header")),
                };
                return Ok(Some(Received {
                    len: n - VNET_HDR_LEN,
                    csum: hdr.checksum_state(),
                    gso: hdr.is_gso(),
                }));
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => return Ok(None),
                io::ErrorKind::Interrupted => continue,
                _ => return Err(e),
            }
        }
    }

    fn send(&mut self, buf: &mut [u8], received: &Received, len: usize) -> io::Result<()> {
        let Some(hdr) = buf.first_chunk_mut::<VNET_HDR_LEN>() else {
            return Err(io::Error::other("send buffer shorter than the vnet header"));
        };
        vnet::fix_after_rewrite(hdr, received.len, len);
        let out = &buf[..VNET_HDR_LEN + len];
        loop {
            // SAFETY: the kernel reads `out.len()` bytes from `out`, which is borrowed for the
            // call.
            let n = unsafe { libc::write(self.fd.as_raw_fd(), out.as_ptr().cast(), out.len()) };
            if n >= 0 {
                return if n as usize == out.len() {
                    Ok(())
                } else {
                    Err(io::Error::other("short write to the TUN device"))
                };
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn wait_readable(&mut self, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid `pollfd`, borrowed for the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            };
        }
        Ok(r > 0)
    }
}
