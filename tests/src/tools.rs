//! The programs the lab runs that this workspace does not build, and the Debian package of each.
//!
//! [`TOOLS`] is the one table of them. [`require`] names the packages of the programs that are
//! missing; `lbcluster-bench` installs its packages from it. `scripts/packages` is the list the
//! scripts install from (`scripts/lib/install-packages`); the unit tests at the bottom of this
//! file check that it lists every package of the table with its programs, and that every program
//! the tests crate's sources start is in the table: the first string literal of
//! `Command::new("…")`, of the command array of `exec(role, &["…", …])` and `spawn(role, &["…",
//! …])`, and after `"netns", "exec", NAMESPACE`. A program the lab starts without a line here
//! fails the suite instead of a fresh machine.
//!
//! Looking a program up runs nothing: it is searched for on `PATH` (a name with a `/` is taken as
//! a path), as `Command::new` finds it.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result, ensure};

/// A program the lab runs and the Debian package that installs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tool {
    /// What the lab runs: a name looked up on `PATH`, or an absolute path.
    pub program: &'static str,
    /// The Debian package that installs it.
    pub package: &'static str,
}

const fn tool(program: &'static str, package: &'static str) -> Tool {
    Tool { program, package }
}

/// Every program the lab runs that this workspace does not build.
pub const TOOLS: &[Tool] = &[
    tool("ip", "iproute2"),
    tool("ss", "iproute2"),
    tool("ethtool", "ethtool"),
    tool("sysctl", "procps"),
    tool("kill", "procps"),
    tool("nft", "nftables"),
    tool("bird", "bird2"),
    tool("birdc", "bird2"),
    tool("sleep", "coreutils"),
    tool("timeout", "coreutils"),
    tool("sh", "dash"),
    tool("/usr/sbin/sshd", "openssh-server"),
    tool("ssh", "openssh-client"),
    tool("ssh-keygen", "openssh-client"),
    // Not run by the lab itself: Ansible runs it over SSH on the node namespaces (the
    // inventory's `ansible_python_interpreter`).
    tool("/usr/bin/python3", "python3"),
    // Not run by the lab either: node/build.rs compiles the fast path's eBPF program with it.
    tool("clang", "clang"),
    tool("ping", "iputils-ping"),
    tool("prometheus", "prometheus"),
    tool("promtool", "prometheus"),
    tool("chromium", "chromium"),
    tool("iperf3", "iperf3"),
    tool("haproxy", "haproxy"),
];

/// The table's entry for `program`; an error when the table lacks it (add it there, and its
/// package to `scripts/packages`).
pub fn tool_of(program: &str) -> Result<&'static Tool> {
    TOOLS
        .iter()
        .find(|t| t.program == program)
        .with_context(|| format!("`{program}` is not in tests::tools::TOOLS"))
}

/// Whether `program` would start: an executable file at that path when it has a `/`, else in a
/// directory of `PATH`.
pub fn installed(program: &str) -> bool {
    let executable = |path: &Path| {
        path.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        return executable(Path::new(program));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| executable(&dir.join(program)))
}

/// The Debian packages of those of `programs` that are not installed, each once.
pub fn missing_packages(programs: &[&str]) -> Result<Vec<&'static str>> {
    let mut packages = Vec::new();
    for program in programs {
        let package = tool_of(program)?.package;
        if !installed(program) && !packages.contains(&package) {
            packages.push(package);
        }
    }
    Ok(packages)
}

/// Fails unless every one of `programs` is installed, naming the packages that have the missing
/// ones.
pub fn require(programs: &[&str]) -> Result<()> {
    let packages = missing_packages(programs)?;
    let missing: Vec<&str> = programs.iter().copied().filter(|p| !installed(p)).collect();
    ensure!(
        missing.is_empty(),
        "the lab needs {}: apt-get install -y {} (scripts/lib/install-packages installs the \
         packages of scripts/packages)",
        missing.join(", "),
        packages.join(" ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::PathBuf;

    use super::*;

    /// This workspace's binaries: cargo builds them, no package has them.
    const OWN_PROGRAMS: &[&str] = &[
        "lbcluster",
        "lab-backend",
        "lbcluster-lab",
        "lbcluster-bench",
    ];
    /// The installer `lbcluster-bench` runs to install the others: without it there would be
    /// nothing to install them with, so it cannot be one of them (Debian always has it).
    const INSTALLER: &str = "apt-get";

    fn repo_file(path: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
    }

    /// A line of `scripts/packages`: package, set, programs.
    #[derive(Debug)]
    struct Listed {
        package: String,
        set: String,
        programs: Vec<String>,
    }

    fn scripts_packages() -> Vec<Listed> {
        let path = repo_file("scripts/packages");
        let text = std::fs::read_to_string(&path).expect("read scripts/packages");
        text.lines()
            .filter_map(|line| {
                let line = line.split('#').next().unwrap_or_default();
                let mut words = line.split_whitespace().map(str::to_owned);
                let package = words.next()?;
                let set = words
                    .next()
                    .unwrap_or_else(|| panic!("scripts/packages: {package} has no set"));
                Some(Listed {
                    package,
                    set,
                    programs: words.collect(),
                })
            })
            .collect()
    }

    fn listed<'a>(list: &'a [Listed], program: &str) -> &'a Listed {
        let package = tool_of(program).unwrap().package;
        list.iter()
            .find(|l| l.package == package)
            .unwrap_or_else(|| panic!("scripts/packages has no line for {package} ({program})"))
    }

    #[test]
    fn the_table_names_each_program_once() {
        for (i, t) in TOOLS.iter().enumerate() {
            assert!(
                TOOLS[..i].iter().all(|u| u.program != t.program),
                "{} is in TOOLS twice",
                t.program
            );
        }
    }

    #[test]
    fn scripts_packages_lists_every_package_of_the_table_with_its_programs() {
        let list = scripts_packages();
        for l in &list {
            assert!(
                ["build", "lab", "deploy", "observe", "bench"].contains(&l.set.as_str()),
                "scripts/packages: {} has set {:?}",
                l.package,
                l.set
            );
            for program in &l.programs {
                assert_eq!(
                    tool_of(program).unwrap().package,
                    l.package,
                    "scripts/packages lists {program} under another package than TOOLS"
                );
            }
        }
        for t in TOOLS {
            let l = listed(&list, t.program);
            assert!(
                l.programs.iter().any(|p| p == t.program),
                "scripts/packages: the line of {} does not name {}",
                t.package,
                t.program
            );
        }
    }

    /// The issue this guards against: `scripts/demo` installs set `lab` only, and once lacked
    /// BIRD.
    #[test]
    fn the_scripts_install_what_the_lab_and_the_deployment_test_need() {
        let list = scripts_packages();
        for program in crate::lab::PROGRAMS
            .iter()
            .chain(crate::bgp::PROGRAMS)
            .chain(crate::cluster::PROGRAMS)
        {
            let l = listed(&list, program);
            assert_eq!(
                l.set, "lab",
                "{program}: scripts/demo does not install {}",
                l.package
            );
        }
        for program in crate::deploy::PROGRAMS
            .iter()
            .chain(crate::observe::PROGRAMS)
        {
            let l = listed(&list, program);
            assert!(
                ["lab", "deploy", "observe"].contains(&l.set.as_str()),
                "{program}: scripts/test does not install {}",
                l.package
            );
        }
    }

    #[test]
    fn every_program_the_lab_starts_is_in_the_table() {
        let krate = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut found: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for dir in ["src", "tests"] {
            for file in rust_files(&krate.join(dir)) {
                let text = std::fs::read_to_string(&file).unwrap();
                let name = file.strip_prefix(krate).unwrap_or(&file).display();
                for program in programs_started(&tokens(&text)) {
                    found.entry(program).or_default().insert(name.to_string());
                }
            }
        }
        // The scan sees the lab at all: these are started in several places.
        for program in [
            "ip",
            "ethtool",
            "bird",
            "birdc",
            "nft",
            "/usr/sbin/sshd",
            "ssh",
        ] {
            assert!(found.contains_key(program), "the scan missed {program}");
        }
        let unlisted: Vec<_> = found
            .iter()
            .filter(|(program, _)| {
                !OWN_PROGRAMS.contains(&program.as_str())
                    && program.as_str() != INSTALLER
                    && tool_of(program).is_err()
            })
            .collect();
        assert!(
            unlisted.is_empty(),
            "programs the lab runs that tests::tools::TOOLS does not list (add each with its \
             Debian package, and the package to scripts/packages): {unlisted:?}"
        );
    }

    fn rust_files(dir: &Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files.extend(rust_files(&path));
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
        files
    }

    /// Rust source as far as the scan needs it: comments dropped, string literals whole.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Token {
        Str(String),
        Word(String),
        Punct(char),
    }

    fn tokens(text: &str) -> Vec<Token> {
        let c: Vec<char> = text.chars().collect();
        let mut out = Vec::new();
        let mut i = 0;
        while i < c.len() {
            match c[i] {
                '/' if c.get(i + 1) == Some(&'/') => {
                    while i < c.len() && c[i] != '\n' {
                        i += 1;
                    }
                }
                '/' if c.get(i + 1) == Some(&'*') => {
                    let mut depth = 0;
                    while i < c.len() {
                        if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                            depth += 1;
                            i += 2;
                        } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                            depth -= 1;
                            i += 2;
                            if depth == 0 {
                                break;
                            }
                        } else {
                            i += 1;
                        }
                    }
                }
                '"' => {
                    let (s, next) = string(&c, i + 1);
                    out.push(Token::Str(s));
                    i = next;
                }
                '\'' => {
                    // A char literal ('x', '\n', '\''), else a lifetime or label.
                    if c.get(i + 1) == Some(&'\\') {
                        i += 3;
                        while i < c.len() && c[i] != '\'' {
                            i += 1;
                        }
                        i += 1;
                    } else if c.get(i + 2) == Some(&'\'') {
                        i += 3;
                    } else {
                        i += 1;
                    }
                }
                ch if ch.is_alphanumeric() || ch == '_' => {
                    let start = i;
                    while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                        i += 1;
                    }
                    let word: String = c[start..i].iter().collect();
                    let raw = matches!(word.as_str(), "r" | "br" | "cr")
                        && matches!(c.get(i), Some('"' | '#'));
                    if raw {
                        let hashes = c[i..].iter().take_while(|&&h| h == '#').count();
                        let body = i + hashes + 1;
                        let close: Vec<char> = std::iter::once('"')
                            .chain(std::iter::repeat_n('#', hashes))
                            .collect();
                        let end = (body..c.len())
                            .find(|&k| c[k..].starts_with(&close))
                            .unwrap_or(c.len());
                        out.push(Token::Str(c[body..end].iter().collect()));
                        i = end + close.len();
                    } else if matches!(word.as_str(), "b" | "c") && c.get(i) == Some(&'"') {
                        let (s, next) = string(&c, i + 1);
                        out.push(Token::Str(s));
                        i = next;
                    } else {
                        out.push(Token::Word(word));
                    }
                }
                ch if ch.is_whitespace() => i += 1,
                ch => {
                    out.push(Token::Punct(ch));
                    i += 1;
                }
            }
        }
        out
    }

    /// A string literal's text from `start` (after the opening quote) and the index after it.
    fn string(c: &[char], start: usize) -> (String, usize) {
        let mut s = String::new();
        let mut i = start;
        while i < c.len() && c[i] != '"' {
            if c[i] == '\\' {
                i += 1;
            }
            if let Some(&ch) = c.get(i) {
                s.push(ch);
            }
            i += 1;
        }
        (s, i + 1)
    }

    /// The index of the `,` or closing bracket that ends the expression starting at `start`.
    fn end_of_expression(t: &[Token], start: usize) -> usize {
        let mut depth = 0usize;
        for (k, token) in t.iter().enumerate().skip(start) {
            match token {
                Token::Punct('(' | '[' | '{') => depth += 1,
                Token::Punct(')' | ']' | '}') if depth == 0 => return k,
                Token::Punct(')' | ']' | '}') => depth -= 1,
                Token::Punct(',') if depth == 0 => return k,
                _ => {}
            }
        }
        t.len()
    }

    fn is(t: &[Token], k: usize, want: &Token) -> bool {
        t.get(k) == Some(want)
    }

    fn str_at(t: &[Token], k: usize) -> Option<String> {
        match t.get(k) {
            Some(Token::Str(s)) => Some(s.clone()),
            _ => None,
        }
    }

    /// The programs the code in `t` starts, where it names them with a string literal.
    fn programs_started(t: &[Token]) -> Vec<String> {
        let word = |s: &str| Token::Word(s.to_owned());
        let text = |s: &str| Token::Str(s.to_owned());
        let p = Token::Punct;
        let mut found = Vec::new();
        for i in 0..t.len() {
            // Command::new("PROGRAM")
            if is(t, i, &word("Command"))
                && is(t, i + 1, &p(':'))
                && is(t, i + 2, &p(':'))
                && is(t, i + 3, &word("new"))
                && is(t, i + 4, &p('('))
            {
                found.extend(str_at(t, i + 5));
            }
            // exec(ROLE, &["PROGRAM", ...]), spawn(...), spawn_with(...): not their definitions
            let call = ["exec", "spawn", "spawn_with"]
                .iter()
                .any(|name| is(t, i, &word(name)));
            if call && is(t, i + 1, &p('(')) && !(i > 0 && is(t, i - 1, &word("fn"))) {
                let k = end_of_expression(t, i + 2);
                if is(t, k, &p(',')) && is(t, k + 1, &p('&')) && is(t, k + 2, &p('[')) {
                    found.extend(str_at(t, k + 3));
                }
            }
            // "netns", "exec", NAMESPACE, "PROGRAM" or "netns", "exec", NAMESPACE]).args(["PROGRAM"
            if is(t, i, &text("netns")) && is(t, i + 1, &p(',')) && is(t, i + 2, &text("exec")) {
                let k = end_of_expression(t, i + 4);
                if is(t, k, &p(',')) {
                    found.extend(str_at(t, k + 1));
                } else if is(t, k, &p(']'))
                    && is(t, k + 1, &p(')'))
                    && is(t, k + 2, &p('.'))
                    && (is(t, k + 3, &word("args")) || is(t, k + 3, &word("arg")))
                    && is(t, k + 4, &p('('))
                {
                    let first = if is(t, k + 5, &p('[')) { k + 6 } else { k + 5 };
                    found.extend(str_at(t, first));
                }
            }
        }
        found
    }

    #[test]
    fn the_scan_finds_programs_named_by_a_literal() {
        let source = r##"
            // Command::new("commented") is not code
            let a = Command::new("ip").args(["netns", "exec", &ns, "ssh", "-i"]);
            let b = std::process::Command::new("birdc");
            lab.exec(&format!("n{k}", k = 1), &["nft", "-f", &path]);
            self.lab.spawn(
                "b1",
                &["iperf3", "-s"],
            );
            lab.spawn("b1", &[&bin, "serve"]);
            fn exec(&self, role: &str, cmd: &[&str]) {}
            Command::new("ip").args(["netns", "exec", &self.ns(role)]).args(["timeout", "5"]);
            Command::new("ip").args(["netns", "exec", &ns]).arg(venv.join("x"));
            let s = "Command::new(\"quoted\")";
            let r = r#"lab.exec("r", &["raw"])"#;
            let c = '"'; let d = '\''; let e: &'static str = "x";
            scope.spawn(move || { run(1, 2) });
            Command::new(lbcluster_bin()?);
        "##;
        assert_eq!(
            programs_started(&tokens(source)),
            ["ip", "ssh", "birdc", "nft", "iperf3", "ip", "timeout", "ip"]
        );
    }

    #[test]
    fn require_looks_up_programs_of_the_table() {
        assert!(require(&["sh"]).is_ok());
        assert!(installed("sh") && !installed("/nonexistent/sh"));
        assert!(require(&["no-such-program"]).is_err());
        assert!(tool_of("bird").is_ok_and(|t| t.package == "bird2"));
    }
}
