//! Where the node's services come from: the one seam between the daemon and its configuration.
//! The daemon reads the current [`ServiceSet`] and hears of every new one through a
//! [`ServiceSource`]; it never looks at where the set came from. The standalone config file is
//! the only source today; the replicated cluster configuration will be another.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use tokio::sync::watch;

use crate::config::{self, Config, ServiceSet};

/// A provider of the node's services.
pub(crate) trait ServiceSource: Send + Sync {
    /// The current service set; `changed()` on the receiver reports each new one.
    fn subscribe(&self) -> watch::Receiver<Arc<ServiceSet>>;
}

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

    /// Reads the file again and publishes its services if they changed. An invalid file, or one
    /// that changes what only a restart can, leaves the running services as they are.
    pub(crate) fn reload(&mut self) -> Result<Reloaded> {
        let version = self.running.services.version + 1;
        let mut fresh = config::load(&self.path, version)?;
        anyhow::ensure!(
            fresh.node == self.running.node && fresh.admin == self.running.admin,
            "{}: [node] or [admin] changed; they take a restart, services were not reloaded",
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

impl ServiceSource for ConfigFileSource {
    fn subscribe(&self) -> watch::Receiver<Arc<ServiceSet>> {
        self.tx.subscribe()
    }
}
