//! Backend schedulers: pick the backend that takes a new flow.
//!
//! Five policies are offered, matching their IPVS namesakes where one exists: Maglev consistent
//! hashing (the default, so that every node of the cluster sends a flow to the same backend
//! without sharing state), round robin, weighted round robin, weighted least connections and
//! source hashing. A [`Scheduler`] is built once per backend set and then shared read-mostly by
//! the worker threads; a change of the backend set builds a new one.
//!
//! Weight 0 means "drain": such a backend takes no new flow under any policy, while the
//! connections it already holds are left to the session table.

pub mod maglev;
mod rr;
mod sh;
mod wlc;
mod wrr;

pub use maglev::Maglev;

use rr::Rr;
use sh::Sh;
use wlc::Wlc;
use wrr::Wrr;

/// The scheduling policy of a virtual service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchedulerKind {
    /// Maglev consistent hashing of the 5-tuple (stateless, identical on every node).
    #[default]
    Maglev,
    /// IPVS weighted round robin.
    Wrr,
    /// IPVS weighted least connections.
    Wlc,
    /// IPVS round robin over the backends of non-zero weight.
    Rr,
    /// IPVS source hashing on the client address.
    Sh,
}

/// One backend as the scheduler sees it. `name` is a stable identity (e.g. "198.18.3.10:80"),
/// the Maglev permutation is derived from it, so every node builds the same table.
#[derive(Debug, Clone)]
pub struct BackendSpec {
    /// Stable identity of the backend; equal names on two nodes mean the same backend.
    pub name: String,
    /// Relative share of new flows; 0 takes none.
    pub weight: u32,
}

/// Maglev table parameters. They must be identical on every node for the nodes to agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct MaglevParams {
    /// Seed of the hashes that derive each backend's permutation from its name.
    pub seed: u64,
    /// Lookup table size M; must be prime so that every skip yields a full permutation.
    pub table_size: u32,
}

impl MaglevParams {
    /// The paper's small table size: ample for a few hundred backends.
    pub const DEFAULT_TABLE_SIZE: u32 = 65537;
}

impl Default for MaglevParams {
    fn default() -> Self {
        Self {
            seed: 0,
            table_size: Self::DEFAULT_TABLE_SIZE,
        }
    }
}

/// Active (established) and inactive (other states) connection counts of a backend, for wlc.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnCounts {
    /// Connections in the established state.
    pub active: u32,
    /// Connections in any other state.
    pub inactive: u32,
}

/// Why a scheduler could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulerError {
    /// Maglev needs a prime table size for every skip to visit every slot.
    #[error("maglev table size {table_size} is not a prime number")]
    TableSizeNotPrime {
        /// The rejected size.
        table_size: u32,
    },
    /// Every backend must be able to own at least one slot.
    #[error("maglev table size {table_size} is smaller than the number of backends ({backends})")]
    TableSizeTooSmall {
        /// The rejected size.
        table_size: u32,
        /// How many backends were given.
        backends: usize,
    },
    /// Bounds the memory and build time a configuration can demand.
    #[error("maglev table size {table_size} exceeds the maximum of {max}")]
    TableSizeTooLarge {
        /// The rejected size.
        table_size: u32,
        /// The largest accepted size.
        max: u32,
    },
    /// A skip that is a multiple of the table size would revisit one slot forever.
    #[error(
        "maglev permutation {index} has skip {skip}, which is a multiple of the table size {table_size}"
    )]
    InvalidSkip {
        /// Position of the permutation in the given list.
        index: usize,
        /// The rejected skip.
        skip: u32,
        /// The table size.
        table_size: u32,
    },
}

/// A backend picker for one backend set. `Send + Sync`: shared by worker threads behind an `Arc`.
#[derive(Debug)]
pub struct Scheduler {
    policy: Policy,
}

#[derive(Debug)]
enum Policy {
    Maglev(Maglev),
    Wrr(Wrr),
    Wlc(Wlc),
    Rr(Rr),
    Sh(Sh),
}

impl Scheduler {
    /// Backends with weight 0 take no new flows (they are never picked). Returns an error for a
    /// Maglev table size that is not a prime or is smaller than the number of backends; the
    /// Maglev parameters are not checked for the other kinds, which do not use them.
    pub fn new(
        kind: SchedulerKind,
        backends: &[BackendSpec],
        maglev: MaglevParams,
    ) -> Result<Self, SchedulerError> {
        let weights = || backends.iter().map(|b| b.weight);
        let policy = match kind {
            SchedulerKind::Maglev => Policy::Maglev(Maglev::new(backends, maglev)?),
            SchedulerKind::Wrr => Policy::Wrr(Wrr::new(weights())),
            SchedulerKind::Wlc => Policy::Wlc(Wlc::new(weights())),
            SchedulerKind::Rr => Policy::Rr(Rr::new(weights())),
            SchedulerKind::Sh => Policy::Sh(Sh::new(weights())),
        };
        Ok(Self { policy })
    }

    /// Picks a backend index into the `backends` slice given to `new`, or None when no backend can
    /// take a flow. `flow_hash` is a hash of the whole 5-tuple (Maglev), `source_hash` a hash of the
    /// client address only (sh); `conns(i)` gives backend i's current counts (wlc).
    pub fn pick(
        &self,
        flow_hash: u64,
        source_hash: u64,
        conns: impl Fn(usize) -> ConnCounts,
    ) -> Option<usize> {
        match &self.policy {
            Policy::Maglev(m) => m.lookup(flow_hash),
            Policy::Wrr(w) => w.pick(),
            Policy::Wlc(w) => w.pick(conns),
            Policy::Rr(r) => r.pick(),
            Policy::Sh(s) => s.pick(source_hash),
        }
    }

    /// The policy this scheduler was built with.
    pub fn kind(&self) -> SchedulerKind {
        match self.policy {
            Policy::Maglev(_) => SchedulerKind::Maglev,
            Policy::Wrr(_) => SchedulerKind::Wrr,
            Policy::Wlc(_) => SchedulerKind::Wlc,
            Policy::Rr(_) => SchedulerKind::Rr,
            Policy::Sh(_) => SchedulerKind::Sh,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALL_KINDS: [SchedulerKind; 5] = [
        SchedulerKind::Maglev,
        SchedulerKind::Wrr,
        SchedulerKind::Wlc,
        SchedulerKind::Rr,
        SchedulerKind::Sh,
    ];

    fn specs(weights: &[u32]) -> Vec<BackendSpec> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| BackendSpec {
                name: format!("198.18.0.{i}:80"),
                weight,
            })
            .collect()
    }

    fn small_params() -> MaglevParams {
        MaglevParams {
            seed: 7,
            table_size: 251,
        }
    }

    #[test]
    fn scheduler_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Scheduler>();
    }

    #[test]
    fn kind_round_trips_and_serializes_lowercase() {
        for kind in ALL_KINDS {
            let s = Scheduler::new(kind, &specs(&[1, 2]), small_params()).unwrap();
            assert_eq!(s.kind(), kind);
        }
        assert_eq!(SchedulerKind::default(), SchedulerKind::Maglev);
        let params = MaglevParams::default();
        assert_eq!((params.seed, params.table_size), (0, 65537));
    }

    #[test]
    fn empty_and_all_zero_lists_build_and_pick_none() {
        for kind in ALL_KINDS {
            for weights in [&[][..], &[0, 0, 0][..]] {
                let s = Scheduler::new(kind, &specs(weights), MaglevParams::default()).unwrap();
                for h in 0..64u64 {
                    let h = h.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    assert_eq!(s.pick(h, h, |_| ConnCounts::default()), None, "{kind:?}");
                }
            }
        }
    }

    #[test]
    fn maglev_params_are_checked_only_for_maglev() {
        let bad = MaglevParams {
            seed: 0,
            table_size: 8,
        };
        assert_eq!(
            Scheduler::new(SchedulerKind::Maglev, &specs(&[1]), bad).unwrap_err(),
            SchedulerError::TableSizeNotPrime { table_size: 8 }
        );
        let too_small = MaglevParams {
            seed: 0,
            table_size: 2,
        };
        assert_eq!(
            Scheduler::new(SchedulerKind::Maglev, &specs(&[1, 1, 0]), too_small).unwrap_err(),
            SchedulerError::TableSizeTooSmall {
                table_size: 2,
                backends: 3
            }
        );
        for kind in [
            SchedulerKind::Wrr,
            SchedulerKind::Wlc,
            SchedulerKind::Rr,
            SchedulerKind::Sh,
        ] {
            assert!(Scheduler::new(kind, &specs(&[1]), bad).is_ok());
        }
    }

    #[test]
    fn errors_have_clear_messages() {
        let e = SchedulerError::TableSizeTooSmall {
            table_size: 7,
            backends: 9,
        };
        assert_eq!(
            e.to_string(),
            "maglev table size 7 is smaller than the number of backends (9)"
        );
    }

    #[test]
    fn params_deserialize_missing_fields_as_default() {
        // serde_json is not a dependency; the derive is checked through serde's own value type.
        use serde::Deserialize;
        use serde::de::IntoDeserializer;
        use serde::de::value::{Error, MapDeserializer};
        let map = MapDeserializer::<_, Error>::new(
            [("table_size", 251u32)]
                .into_iter()
                .map(|(k, v)| (k, v.into_deserializer())),
        );
        let p = MaglevParams::deserialize(map).unwrap();
        assert_eq!(
            p,
            MaglevParams {
                seed: 0,
                table_size: 251
            }
        );
        let de: serde::de::value::StrDeserializer<'_, Error> = "wlc".into_deserializer();
        let kind = SchedulerKind::deserialize(de).unwrap();
        assert_eq!(kind, SchedulerKind::Wlc);
    }

    fn weight_strategy() -> impl Strategy<Value = u32> {
        prop_oneof![
            3 => Just(0u32),
            4 => 1u32..10,
            1 => Just(u32::MAX),
            2 => any::<u32>(),
        ]
    }

    proptest! {
        #[test]
        fn pick_returns_none_or_a_backend_of_positive_weight(
            weights in prop::collection::vec(weight_strategy(), 0..40),
            table_size in prop_oneof![Just(7u32), Just(251), Just(65537)],
            seed in any::<u64>(),
            hashes in prop::collection::vec(any::<(u64, u64)>(), 1..32),
            conns in prop::collection::vec(any::<(u32, u32)>(), 40),
        ) {
            let backends = specs(&weights);
            let any_eligible = weights.iter().any(|&w| w > 0);
            let params = MaglevParams { seed, table_size };
            for kind in ALL_KINDS {
                let s = match Scheduler::new(kind, &backends, params) {
                    Ok(s) => s,
                    Err(e) => {
                        prop_assert_eq!(kind, SchedulerKind::Maglev);
                        prop_assert!(weights.len() > table_size as usize, "{}", e);
                        continue;
                    }
                };
                for &(flow, source) in &hashes {
                    let picked = s.pick(flow, source, |i| {
                        let (active, inactive) = conns[i];
                        ConnCounts { active, inactive }
                    });
                    match picked {
                        Some(i) => prop_assert!(weights[i] > 0, "{:?} picked weight 0", kind),
                        None => prop_assert!(!any_eligible, "{:?} picked none", kind),
                    }
                }
            }
        }
    }
}
