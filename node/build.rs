//! Builds the kernel fast path's eBPF program (`bpf/fastpath.c`, DESIGN §1 "Two tiers") from
//! source with clang for the `bpf` target; the object is embedded in the binary. Debian's
//! `clang` and `libbpf-dev` (for `bpf/bpf_helpers.h`) provide what it needs; `scripts/packages`
//! lists both. `CLANG` names another compiler.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let source = PathBuf::from("bpf/fastpath.c");
    println!("cargo::rerun-if-changed=bpf/fastpath.c");
    println!("cargo::rerun-if-changed=bpf/fastpath.h");
    println!("cargo::rerun-if-env-changed=CLANG");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("fastpath.o");
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    // <asm/types.h>, which the kernel's uapi headers include, lives under the multiarch
    // include directory on Debian.
    let multiarch = Command::new("gcc")
        .arg("-print-multiarch")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "x86_64-linux-gnu".to_owned());
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-I/usr/include/{multiarch}"))
        .arg("-c")
        .arg(&source)
        .arg("-o")
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{clang} could not compile {}: {s}", source.display()),
        Err(e) => panic!(
            "cannot run {clang} ({e}): the kernel fast path is built from source with clang; \
             install Debian's clang and libbpf-dev (scripts/lib/install-packages lab does)"
        ),
    }
}
