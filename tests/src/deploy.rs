//! The deployment lab (issue 8, DESIGN §7): the lab's node namespaces as Ansible hosts. Each
//! node namespace runs Debian's `sshd` on its uplink address with a host key and an authorized
//! key made for the run, and has its own root directory for `/etc`-style paths
//! (`lbcluster_root`); the controller, `ansible-playbook` from the venv `deploy/ansible/check`
//! makes, runs in the router's namespace and reaches every node over SSH, exactly as in
//! production. Nothing runs on the nodes until a playbook starts it: the router's BIRD is the
//! lab's, the nodes' BIRDs and lbcluster daemons are Ansible's (`lbcluster_supervisor: process`).
//!
//! Everything the playbooks start lives in the node namespaces, so the lab's teardown kills it
//! by pid with the namespaces. Needs root, the programs of [`PROGRAMS`] and BGP's
//! ([`crate::tools`] names their packages), and the Ansible venv.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::bgp::{
    BFD_INTERVAL_MS, BFD_MULTIPLIER, Bgp, BgpOptions, HOLD_SECS, KEEPALIVE_SECS, NODE_AS, ROUTER_AS,
};
use crate::cluster::{CliOutput, DRAIN_WAIT_MS, QUIC_PORT, lip, lip6};
use crate::lab::{Lab, LabProcess, LabSpec};
use crate::site::{VIP, lbcluster_bin};

/// The programs the deployment lab runs besides every lab's and BGP's: sshd in the nodes, ssh and
/// ssh-keygen for the controller, and the Python Ansible runs on the nodes (checked by
/// [`DeployLab::start`]).
pub const PROGRAMS: &[&str] = &["/usr/sbin/sshd", "ssh", "ssh-keygen", "/usr/bin/python3"];

/// The node namespaces of the deployment lab: three in the first `site.yml`, a fourth for
/// `scale.yml`.
pub const NODES: usize = 4;
/// The TCP port of the echo service the long-lived streams use.
pub const ECHO_PORT: u16 = 9000;
/// How long sshd may take to accept a login.
const SSHD_START: Duration = Duration::from_secs(10);

/// The venv with `ansible-playbook` (made by `deploy/ansible/check`).
pub fn ansible_venv() -> PathBuf {
    std::env::var_os("ANSIBLE_VENV").map_or_else(
        || PathBuf::from("/tmp/lbcluster-ansible-venv"),
        PathBuf::from,
    )
}

/// `deploy/ansible` of this repository.
pub fn ansible_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/ansible")
}

/// One `ansible-playbook` run.
#[derive(Debug)]
pub struct PlaybookRun {
    /// Everything it printed (stdout and stderr).
    pub output: String,
    /// How long it took.
    pub took: Duration,
}

impl PlaybookRun {
    /// The `changed=N` count of each host in the PLAY RECAP.
    pub fn changed(&self) -> Result<Vec<(String, u64)>> {
        recap_changed(&self.output)
    }

    /// The hosts a task reported `changed` for, in the order they did.
    pub fn changed_hosts(&self, task: &str) -> Vec<String> {
        task_results(&self.output, task, "changed")
    }
}

/// The hosts reporting `status` (`ok`, `changed`) under every `TASK [...task]` header, in
/// order.
fn task_results(output: &str, task: &str, status: &str) -> Vec<String> {
    let header = format!("TASK [{task}]");
    let prefix = format!("{status}: [");
    let mut hosts = Vec::new();
    let mut inside = false;
    for line in output.lines() {
        if line.starts_with("TASK [") || line.starts_with("PLAY ") || line.starts_with("RUNNING ") {
            inside = line.starts_with(&header);
            continue;
        }
        if inside && let Some(rest) = line.strip_prefix(&prefix) {
            let host = rest.split([']', ' ']).next().unwrap_or_default();
            hosts.push(host.to_owned());
        }
    }
    hosts
}

/// The `changed=N` of each host line of the PLAY RECAP.
pub fn recap_changed(output: &str) -> Result<Vec<(String, u64)>> {
    let recap = output
        .rsplit_once("PLAY RECAP")
        .map(|(_, r)| r)
        .context("no PLAY RECAP in the output")?;
    let mut hosts = Vec::new();
    for line in recap.lines() {
        let Some((host, counts)) = line.split_once(" : ") else {
            continue;
        };
        let changed = counts
            .split_whitespace()
            .find_map(|c| c.strip_prefix("changed="))
            .with_context(|| format!("no changed= in {line:?}"))?
            .parse()
            .with_context(|| format!("changed= in {line:?}"))?;
        hosts.push((host.trim().to_owned(), changed));
    }
    ensure!(!hosts.is_empty(), "no host in the PLAY RECAP: {recap}");
    Ok(hosts)
}

/// The deployment lab: [`NODES`] node namespaces with sshd, two backends, the router's BIRD
/// (BFD on), and an inventory for them.
#[derive(Debug)]
pub struct DeployLab {
    pub lab: Lab,
    bgp: Bgp,
    sshd: Vec<LabProcess>,
    inventory: PathBuf,
    runs: u32,
}

impl DeployLab {
    /// Builds the lab, starts the router's BIRD and every node's sshd, and writes the
    /// inventory (every node, n4 included; `site.yml` runs with `--limit n1,n2,n3` first).
    pub fn start() -> Result<DeployLab> {
        crate::tools::require(PROGRAMS)?;
        let venv = ansible_venv();
        ensure!(
            venv.join("bin/ansible-playbook").is_file(),
            "no ansible-playbook in {} (deploy/ansible/check makes the venv)",
            venv.display()
        );
        let lab = Lab::up(LabSpec {
            nodes: NODES,
            backends: 2,
        })?;
        let bgp = Bgp::start_router(&lab, BgpOptions { bfd: true })?;
        let mut deploy = DeployLab {
            lab,
            bgp,
            sshd: Vec::new(),
            inventory: PathBuf::new(),
            runs: 0,
        };
        deploy.start_sshd()?;
        deploy.inventory = deploy.write_inventory()?;
        Ok(deploy)
    }

    fn ssh_dir(&self) -> PathBuf {
        self.lab.dir().join("ssh")
    }

    /// Node k's root directory (`lbcluster_root`).
    pub fn root(&self, k: usize) -> PathBuf {
        self.lab.dir().join(format!("root-n{k}"))
    }

    /// Node k's admin socket, where the role puts it.
    pub fn socket(&self, k: usize) -> PathBuf {
        self.root(k).join("run/lbcluster/lbcluster.sock")
    }

    /// Node k's installed binary.
    pub fn installed_bin(&self, k: usize) -> PathBuf {
        self.root(k).join("usr/local/bin/lbcluster")
    }

    /// The pid of node k's lbcluster daemon, from the process supervisor's pid file.
    pub fn daemon_pid(&self, k: usize) -> Result<u32> {
        let path = self.root(k).join("run/lbcluster/lbcluster.pid");
        let text = fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
        let pid = text.trim().parse()?;
        ensure!(
            crate::lab::alive(pid),
            "n{k}'s daemon (pid {pid}) is not running"
        );
        Ok(pid)
    }

    fn keygen(&self, path: &Path) -> Result<()> {
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "lbcluster-lab", "-f"])
            .arg(path)
            .stdin(Stdio::null())
            .output()
            .context("cannot run ssh-keygen")?;
        ensure!(
            out.status.success(),
            "ssh-keygen: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// One sshd per node namespace on its uplink address, root login with the run's key only.
    fn start_sshd(&mut self) -> Result<()> {
        let dir = self.ssh_dir();
        fs::create_dir_all(&dir)?;
        // sshd's privilege separation directory (made by systemd's tmpfiles on a booted host).
        fs::create_dir_all("/run/sshd")?;
        self.keygen(&dir.join("id"))?;
        for k in 1..=NODES {
            let host_key = dir.join(format!("n{k}-host"));
            self.keygen(&host_key)?;
            let config = dir.join(format!("n{k}-sshd_config"));
            fs::write(
                &config,
                format!(
                    "ListenAddress {addr}\n\
                     Port 22\n\
                     HostKey {host_key}\n\
                     AuthorizedKeysFile {dir}/id.pub\n\
                     PermitRootLogin prohibit-password\n\
                     PasswordAuthentication no\n\
                     KbdInteractiveAuthentication no\n\
                     UsePAM no\n\
                     StrictModes no\n\
                     PidFile {dir}/n{k}-sshd.pid\n\
                     Subsystem sftp /usr/lib/openssh/sftp-server\n",
                    addr = self.lab.node_uplink(k),
                    host_key = host_key.display(),
                    dir = dir.display(),
                ),
            )?;
            let sshd = self.lab.spawn(
                &format!("n{k}"),
                &[
                    "/usr/sbin/sshd",
                    "-D",
                    "-e",
                    "-f",
                    &config.to_string_lossy(),
                ],
            )?;
            self.sshd.push(sshd);
        }
        for k in 1..=NODES {
            self.wait_ssh(k)?;
        }
        Ok(())
    }

    fn ssh_options(&self) -> String {
        format!(
            "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR \
             -o ControlMaster=auto -o ControlPersist=60s -o ControlPath={}/cp-%C",
            self.ssh_dir().display()
        )
    }

    /// Waits until `ssh root@nK true` works from the router's namespace.
    fn wait_ssh(&self, k: usize) -> Result<()> {
        let deadline = Instant::now() + SSHD_START;
        let key = self.ssh_dir().join("id");
        let target = format!("root@{}", self.lab.node_uplink(k));
        loop {
            let sshd = &self.sshd[k - 1];
            ensure!(sshd.is_running(), "sshd in n{k} exited:\n{}", sshd.log());
            let out = Command::new("ip")
                .args(["netns", "exec", &self.lab.ns("router"), "ssh", "-i"])
                .arg(&key)
                .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=2"])
                .args([
                    "-o",
                    "StrictHostKeyChecking=no",
                    "-o",
                    "UserKnownHostsFile=/dev/null",
                ])
                .args([&target, "true"])
                .stdin(Stdio::null())
                .output()?;
            if out.status.success() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "no SSH login to n{k} within {SSHD_START:?}: {}\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    sshd.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The inventory: the lab's addresses, ASNs and timers, the two services (HTTP on VIP:80,
    /// TCP echo on VIP:9000) over both backends. JSON, which Ansible's YAML inventory reads.
    fn write_inventory(&self) -> Result<PathBuf> {
        let mut hosts = serde_json::Map::new();
        for k in 1..=NODES {
            hosts.insert(
                format!("n{k}"),
                json!({
                    "ansible_host": self.lab.node_uplink(k).to_string(),
                    "lbcluster_root": self.root(k).to_string_lossy(),
                    "lbcluster_listen_addr": self.lab.node_uplink(k).to_string(),
                    "lbcluster_lips": [lip(k).to_string(), lip6(k).to_string()],
                    "lbcluster_bgp_router_addr": self.lab.node_gateway(k).to_string(),
                }),
            );
        }
        let backends = |port: u16| -> Vec<Value> {
            (1..=2)
                .map(|j| json!({ "addr": format!("{}:{port}", self.lab.backend_addr(j)) }))
                .collect()
        };
        let vars = json!({
            "ansible_user": "root",
            "ansible_become_method": "su",
            "ansible_python_interpreter": "/usr/bin/python3",
            "ansible_ssh_private_key_file": self.ssh_dir().join("id").to_string_lossy(),
            "lbcluster_supervisor": "process",
            "lbcluster_manage_packages": false,
            "lbcluster_binary_src": lbcluster_bin()?.to_string_lossy(),
            "lbcluster_controller_tls_dir": self.lab.dir().join("tls").to_string_lossy(),
            "lbcluster_workers": 1,
            "lbcluster_quic_port": QUIC_PORT,
            "lbcluster_heartbeat_ms": 100,
            "lbcluster_election_timeout_ms": [400, 800],
            "lbcluster_wait_retries": 60,
            "lbcluster_wait_delay": 1,
            "lbcluster_upgrade_settle_secs": 1,
            "lbcluster_bgp_local_as": NODE_AS,
            "lbcluster_bgp_drain_wait_ms": DRAIN_WAIT_MS,
            "lbcluster_bgp_peers": [{
                "name": "router",
                "addr": "{{ lbcluster_bgp_router_addr }}",
                "remote_as": ROUTER_AS,
                "hold_secs": HOLD_SECS,
                "keepalive_secs": KEEPALIVE_SECS,
                "bfd": true,
                "bfd_interval_ms": BFD_INTERVAL_MS,
                "bfd_multiplier": BFD_MULTIPLIER,
            }],
            "lbcluster_services": [
                {
                    "vip": format!("{VIP}:80"),
                    "proto": "tcp",
                    "scheduler": "mh",
                    "check": "http",
                    "check_path": "/",
                    "check_status": 200,
                    "backends": backends(crate::lab::HTTP_PORT),
                },
                {
                    "vip": format!("{VIP}:{ECHO_PORT}"),
                    "proto": "tcp",
                    "scheduler": "mh",
                    "check": "tcp",
                    "backends": backends(crate::lab::TCP_ECHO_PORT),
                },
            ],
        });
        let inventory = json!({
            "all": { "children": { "lbcluster": { "hosts": hosts, "vars": vars } } }
        });
        let path = self.lab.dir().join("inventory.json");
        fs::write(&path, serde_json::to_string_pretty(&inventory)?)?;
        Ok(path)
    }

    /// Runs `ansible-playbook PLAYBOOK ARGS` from the router's namespace; its output, or an
    /// error with the output's end. The whole output is kept in the lab directory.
    pub fn playbook(&mut self, playbook: &str, args: &[&str]) -> Result<PlaybookRun> {
        self.runs += 1;
        let dir = ansible_dir();
        let venv = ansible_venv();
        let path = format!(
            "{}:{}",
            venv.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let started = Instant::now();
        let out = Command::new("ip")
            .args(["netns", "exec", &self.lab.ns("router")])
            .arg(venv.join("bin/ansible-playbook"))
            .arg("-i")
            .arg(&self.inventory)
            .arg(dir.join(playbook))
            .args(args)
            .current_dir(&dir)
            .env("PATH", path)
            .env("ANSIBLE_CONFIG", dir.join("ansible.cfg"))
            .env("ANSIBLE_HOME", self.lab.dir().join("ansible-home"))
            .env("ANSIBLE_SSH_ARGS", self.ssh_options())
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_FORCE_COLOR", "0")
            .stdin(Stdio::null())
            .output()
            .context("running ansible-playbook")?;
        let took = started.elapsed();
        let output = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let log = self
            .lab
            .dir()
            .join(format!("ansible-{}-{playbook}.log", self.runs));
        fs::write(&log, &output)?;
        if !out.status.success() {
            let tail: Vec<&str> = output.lines().rev().take(80).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "ansible-playbook {playbook} {args:?} failed ({}) after {took:?}:\n{}\n{}",
                out.status,
                tail.join("\n"),
                self.daemon_logs()
            );
        }
        Ok(PlaybookRun { output, took })
    }

    /// The end of every node's daemon log (what the process supervisor wrote).
    pub fn daemon_logs(&self) -> String {
        (1..=NODES)
            .map(|k| {
                let log = self.root(k).join("var/log/lbcluster/lbcluster.log");
                let text = fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- n{k}:\n{}\n", tail.join("\n"))
            })
            .collect()
    }

    /// `lbcluster ARGS --socket <node k's socket>`.
    pub fn cli(&self, k: usize, args: &[&str]) -> Result<CliOutput> {
        Ok(Command::new(lbcluster_bin()?)
            .args(args)
            .arg("--socket")
            .arg(self.socket(k))
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("lbcluster {args:?}"))?
            .into())
    }

    /// `lbcluster status -o json` on node k: its exit code and document.
    pub fn status(&self, k: usize) -> Result<(i32, Value)> {
        self.cli(k, &["status", "-o", "json"])?.status(k)
    }

    /// Waits up to `timeout` for `check` to hold, polling every 200 ms; the last error if it
    /// never does.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Self) -> Result<T>,
    ) -> Result<T> {
        crate::lab::wait_for(what, timeout, Duration::from_millis(200), || check(self))
    }

    /// Waits until `members` form a healthy cluster seen from node `via`: exit 0, exactly those
    /// nodes, all reachable voters, every one warm, and the router's VIP route over all of them.
    pub fn wait_healthy(&self, via: usize, members: &[usize], timeout: Duration) -> Result<()> {
        self.wait_for("a healthy cluster", timeout, |d| {
            let (code, st) = d.status(via)?;
            ensure!(code == 0, "status exit {code}: {}", st["cluster"]);
            let nodes = st["cluster"]["nodes"].as_array().context("no nodes")?;
            let mut names: Vec<&str> = nodes.iter().filter_map(|n| n["name"].as_str()).collect();
            names.sort_unstable();
            let expected: Vec<String> = members.iter().map(|k| format!("n{k}")).collect();
            ensure!(names == expected, "members {names:?}, not {expected:?}");
            for n in nodes {
                ensure!(n["reachable"] == true, "unreachable: {n}");
                ensure!(n["voter"] == true, "not a voter: {n}");
                ensure!(n["warm"] == true, "cold: {n}");
            }
            Ok(())
        })?;
        self.lab
            .wait_next_hops(IpAddr::V4(VIP), members, timeout)
            .map(drop)
    }

    /// The BIRD instances' router, for its log.
    pub fn router_bird_log(&self) -> String {
        self.bgp.router_log()
    }
}

#[cfg(test)]
mod tests {
    use super::{recap_changed, task_results};

    const OUTPUT: &str = "\
PLAY [Upgrade the nodes one at a time] *****

TASK [Replace the binary] *****
changed: [n2]

TASK [Undrain the node] *****
changed: [n2]

PLAY [Upgrade the nodes one at a time] *****

TASK [Replace the binary] *****
ok: [n3]
changed: [n1] => (item=x)

PLAY RECAP *********************************************************************
n1                         : ok=30   changed=2    unreachable=0    failed=0    skipped=12   rescued=0    ignored=0
n2                         : ok=28   changed=0    unreachable=0    failed=0    skipped=12   rescued=0    ignored=0
";

    #[test]
    fn recap_counts_per_host() {
        assert_eq!(
            recap_changed(OUTPUT).unwrap(),
            [("n1".to_owned(), 2), ("n2".to_owned(), 0)]
        );
        assert!(recap_changed("no recap").is_err());
        assert!(recap_changed("PLAY RECAP\nn1 : ok=1 changed=x\n").is_err());
    }

    #[test]
    fn hosts_per_task_in_order() {
        assert_eq!(
            task_results(OUTPUT, "Replace the binary", "changed"),
            ["n2", "n1"]
        );
        assert_eq!(task_results(OUTPUT, "Replace the binary", "ok"), ["n3"]);
        assert!(task_results(OUTPUT, "Nothing", "changed").is_empty());
    }
}
