//! The services of a standalone node (no `[cluster]` in its file): the config file, read again
//! on SIGHUP. The daemon hears of every new [`ServiceSet`] through a watch channel, the same way
//! a cluster member hears of each committed configuration (`crate::cluster`).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use tokio::sync::watch;

use crate::config::{self, Config, ServiceSet};

/// The standalone config file. It is read again on [`ConfigFileSource::reload`] (SIGHUP); a
/// changed service set is published under the next version, while changes to `[node]` or
/// `[admin]` take a restart and are refused.
#[derive(Debug)]
pub(crate) struct ConfigFileSource {
    path: PathBuf,
    running: Config,
    tx: watch::Sender<Arc<ServiceSet>>,
}

/// What a reload did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reloaded {
    Unchanged,
    Services { version: u64 },
}

impl ConfigFileSource {
    /// A source that starts with an already loaded config.
    pub(crate) fn new(path: PathBuf, config: Config) -> Self {
        let (tx, _) = watch::channel(Arc::new(config.services.clone()));
        ConfigFileSource {
            path,
            running: config,
            tx,
        }
    }

    /// The current service set; `changed()` on the receiver reports each new one.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<ServiceSet>> {
        self.tx.subscribe()
    }

    /// Reads the file again and publishes its services if they changed. An invalid file, or one
    /// that changes what only a restart can, leaves the running services as they are.
    pub(crate) fn reload(&mut self) -> Result<Reloaded> {
        let version = self.running.services.version + 1;
        let mut fresh = config::load(&self.path, version)?;
        anyhow::ensure!(
            fresh.node == self.running.node
                && fresh.admin == self.running.admin
                && fresh.cluster == self.running.cluster,
            "{}: [node], [admin] or [cluster] changed; they take a restart, services were not reloaded",
            self.path.display()
        );
        fresh.services.version = self.running.services.version;
        if fresh.services == self.running.services {
            return Ok(Reloaded::Unchanged);
        }
        fresh.services.version = version;
        self.tx.send_replace(Arc::new(fresh.services.clone()));
        self.running = fresh;
        Ok(Reloaded::Services { version })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: &str = "[node]\nname = \"n1\"\nlocal_addrs = [\"198.19.200.1\"]\n";
    const SVC: &str = "[[service]]\nvip = \"198.18.100.1:80\"\nproto = \"tcp\"\n\
                       [[service.backend]]\naddr = \"198.18.3.10:80\"\n";

    #[test]
    fn test_reload_publishes_changed_services_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, format!("{NODE}{SVC}")).unwrap();
        let mut source = ConfigFileSource::new(path.clone(), config::load(&path, 1).unwrap());
        let mut rx = source.subscribe();
        rx.borrow_and_update();

        assert_eq!(source.reload().unwrap(), Reloaded::Unchanged);
        assert!(!rx.has_changed().unwrap());

        std::fs::write(&path, format!("{NODE}{SVC}weight = 5\n")).unwrap();
        assert_eq!(source.reload().unwrap(), Reloaded::Services { version: 2 });
        let set = rx.borrow_and_update().clone();
        assert_eq!(
            (set.version, set.services[0].config.backends[0].weight),
            (2, 5)
        );

        std::fs::write(&path, format!("{}{SVC}", NODE.replace("n1", "n2"))).unwrap();
        let e = source.reload().unwrap_err().to_string();
        assert!(
            e.ends_with(
                "[node], [admin] or [cluster] changed; they take a restart, services were not reloaded"
            ),
            "{e}"
        );
        assert!(!rx.has_changed().unwrap());
    }
}
