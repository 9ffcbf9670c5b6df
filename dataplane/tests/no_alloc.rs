//! The established-flow path allocates nothing: a counting global allocator watches the engine
//! forward data, state changes and the close of a flow in both directions.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use dataplane::{Direction, Instant, L4Checksum, Packet, Verdict};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn test_established_path_does_not_allocate() {
    let (_, mut w) = engine();
    let now = Instant::from_secs(10);
    let syn = ip(
        CLIENT.into(),
        VIP.into(),
        &tcp(40000, 80, SYN, 1000, 0, b""),
    );
    run(&mut w, now, &syn);
    let lport = created(&mut w).local.port();
    // Every packet of the rest of the flow, prepared before counting.
    let mut packets: Vec<Vec<u8>> = vec![
        ip(
            RS1.into(),
            LIP.into(),
            &tcp(8080, lport, SYN | ACK, 5000, 1001, b""),
        ),
        ip(
            CLIENT.into(),
            VIP.into(),
            &tcp(40000, 80, ACK, 1001, 5001, b""),
        ),
    ];
    for i in 0..1000u32 {
        packets.push(ip(
            CLIENT.into(),
            VIP.into(),
            &tcp(40000, 80, ACK, 1001 + i * 100, 5001, &[1; 100]),
        ));
        packets.push(ip(
            RS1.into(),
            LIP.into(),
            &tcp(8080, lport, ACK, 5001, 1101 + i * 100, b""),
        ));
    }
    let end = 1001 + 1000 * 100;
    packets.push(ip(
        CLIENT.into(),
        VIP.into(),
        &tcp(40000, 80, FIN | ACK, end, 5001, b""),
    ));
    packets.push(ip(
        RS1.into(),
        LIP.into(),
        &tcp(8080, lport, FIN | ACK, 5001, end + 1, b""),
    ));
    packets.push(ip(
        CLIENT.into(),
        VIP.into(),
        &tcp(40000, 80, ACK, end + 1, 5002, b""),
    ));
    let mut buffers: Vec<Vec<u8>> = packets.clone();
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for (buf, p) in buffers.iter_mut().zip(&packets) {
        let mut pkt = Packet::new(buf, p.len(), L4Checksum::Verified);
        let v = w.process(now, &mut pkt);
        assert!(
            matches!(
                v,
                Verdict::Forward(Direction::Inbound | Direction::Outbound)
            ),
            "{v:?}"
        );
    }
    let after = ALLOCATIONS.load(Ordering::Relaxed);
    assert_eq!(after - before, 0, "allocations on the established path");
    // The state changes were reported without allocating.
    assert!(w.drain_events().count() >= 3);
}
