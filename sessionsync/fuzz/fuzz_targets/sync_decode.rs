//! Fuzzes the frame decoder and the core's frame input: arbitrary bytes, as a frame from a
//! connected peer, and as the body of a current-version frame. Nothing may panic, and whatever
//! decodes must encode again.
#![no_main]

use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use sessionsync::{Config, Core, Output, codec};

fn core() -> &'static Mutex<Core> {
    static CORE: OnceLock<Mutex<Core>> = OnceLock::new();
    CORE.get_or_init(|| {
        let mut core = Core::new("b", 1, Config::default(), Instant::now()).unwrap();
        core.set_peers(&["a"]);
        core.peer_connected("a");
        Mutex::new(core)
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(batch) = codec::decode(data) {
        let _ = codec::encode(&batch);
    }
    let mut framed = Vec::with_capacity(data.len() + 1);
    framed.push(codec::VERSION);
    framed.extend_from_slice(data);
    let now = Instant::now();
    let mut core = core().lock().unwrap();
    core.handle_frame(now, "a", data);
    core.handle_frame(now, "a", &framed);
    while let Some(out) = core.poll_output(now) {
        if out == Output::TableWanted {
            core.handle_table(Vec::new());
        }
    }
    while core.poll_transmit(now, "a").is_some() {}
});
