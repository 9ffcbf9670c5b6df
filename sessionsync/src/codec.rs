//! The wire format: one frame is a protocol-version byte followed by a MessagePack [`Batch`].
//!
//! Untrusted bytes enter only through [`decode`]: it checks the length cap and the version
//! before it hands anything to the MessagePack decoder, and it never panics. The length prefix
//! that delimits frames on a QUIC stream belongs to the driver, which checks the same cap before
//! it allocates.

use dataplane::SessionRecord;
use serde::{Deserialize, Serialize};

/// The protocol version this build speaks. A frame of any other version is dropped and counted:
/// a change to [`Batch`] or [`Entry`] bumps it.
pub const VERSION: u8 = 3;

/// Bytes of a frame at most (version byte included); larger frames are dropped undecoded.
pub const MAX_FRAME: usize = 1 << 20;

/// Entries one batch may carry; a decoded batch with more is dropped as malformed.
pub const MAX_BATCH_ENTRIES: usize = 4096;

/// What one node sends another: a run of session updates plus the table-stream control fields,
/// stamped so the receiver can reject stale and replayed batches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// The sending node.
    pub from: String,
    /// The node this batch is for: a batch replayed towards another node is refused.
    pub to: String,
    /// The sender's incarnation: higher after every restart.
    pub epoch: u64,
    /// Per (sender epoch, receiver) sequence number, one more for each batch sent.
    pub seq: u64,
    /// A table stream (bulk answer, resync or refresh) of the sender begins here, under this
    /// id, before this batch's entries: every update the sender sends from here on is no older
    /// than the table the stream carries.
    pub table_start: Option<u64>,
    /// Only the newest state of each flow.
    pub entries: Vec<Entry>,
    /// The sender asks the receiver for its whole table.
    pub bulk_request: Option<BulkRequest>,
    /// A table stream ends with this batch's entries.
    pub table_end: Option<TableEnd>,
}

/// A request for the receiver's whole table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkRequest {
    pub id: u64,
    /// Also hand back the copies of flows on the requester's own LIPs: it restarted and lost
    /// them.
    pub own_flows: bool,
}

/// The end of a table stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableEnd {
    /// The id its start carried.
    pub stream: u64,
    /// The stream held every flow on the sender's LIPs that the sender has: the receiver drops
    /// its copies of the sender's flows that neither the stream nor an update since its start
    /// confirmed.
    pub complete: bool,
    /// The bulk request the stream answers.
    pub request: Option<u64>,
}

/// The newest state of one flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub record: SessionRecord,
    /// The flow ended on the sender: remove it.
    pub closed: bool,
    /// Microseconds from the event on the sender to the batch leaving it; none for table
    /// entries (bulk sync and refresh), which do not stand for an event.
    pub age_us: Option<u32>,
}

/// Why a frame was not decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("a frame of {0} bytes is over the cap")]
    Oversized(usize),
    #[error("empty frame")]
    Empty,
    #[error("protocol version {0}, expected {VERSION}")]
    Version(u8),
    #[error("undecodable frame")]
    Malformed,
    #[error("a batch of {0} entries is over the cap")]
    TooManyEntries(usize),
}

/// Why a batch could not be encoded (it would not fit a frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("the batch does not fit a frame ({0} bytes)")]
    Oversized(usize),
    #[error("the batch cannot be serialised")]
    Serialize,
}

/// The frame of `batch`: the version byte, then compact MessagePack (fields by position; the
/// version byte makes that safe to evolve).
pub fn encode(batch: &Batch) -> Result<Vec<u8>, EncodeError> {
    let mut frame = Vec::with_capacity(64 + batch.entries.len() * 96);
    frame.push(VERSION);
    rmp_serde::encode::write(&mut frame, batch).map_err(|_| EncodeError::Serialize)?;
    if frame.len() > MAX_FRAME {
        return Err(EncodeError::Oversized(frame.len()));
    }
    Ok(frame)
}

/// Decodes a frame; the cap and the version are checked first.
pub fn decode(frame: &[u8]) -> Result<Batch, DecodeError> {
    if frame.len() > MAX_FRAME {
        return Err(DecodeError::Oversized(frame.len()));
    }
    let (&version, body) = frame.split_first().ok_or(DecodeError::Empty)?;
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    let batch: Batch = rmp_serde::from_slice(body).map_err(|_| DecodeError::Malformed)?;
    if batch.entries.len() > MAX_BATCH_ENTRIES {
        return Err(DecodeError::TooManyEntries(batch.entries.len()));
    }
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use dataplane::{FlowState, L4Proto, TcpState};

    use super::*;

    fn batch(n: usize) -> Batch {
        let record = SessionRecord {
            proto: L4Proto::Tcp,
            client: "198.18.1.1:40000".parse().unwrap(),
            vip: "198.18.100.1:80".parse().unwrap(),
            local: "198.19.200.1:1024".parse().unwrap(),
            backend: "198.18.3.10:8080".parse().unwrap(),
            state: FlowState::Tcp(TcpState::Established),
            window: Default::default(),
            expires_in_secs: 900,
            synced: false,
            syn_proxy: None,
        };
        Batch {
            from: "a".into(),
            to: "b".into(),
            epoch: 7,
            seq: 3,
            table_start: Some(4),
            entries: vec![
                Entry {
                    record,
                    closed: false,
                    age_us: Some(12),
                };
                n
            ],
            bulk_request: Some(BulkRequest {
                id: 1,
                own_flows: true,
            }),
            table_end: Some(TableEnd {
                stream: 4,
                complete: true,
                request: Some(2),
            }),
        }
    }

    #[test]
    fn test_round_trip() {
        let b = batch(3);
        assert_eq!(decode(&encode(&b).unwrap()), Ok(b));
    }

    #[test]
    fn test_version_checked_before_body() {
        let mut frame = encode(&batch(1)).unwrap();
        frame[0] = VERSION + 1;
        assert_eq!(decode(&frame), Err(DecodeError::Version(VERSION + 1)));
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
    }

    #[test]
    fn test_oversized_refused_undecoded() {
        // Valid version byte, then garbage: the length alone decides.
        let mut frame = vec![0xff; MAX_FRAME + 1];
        frame[0] = VERSION;
        assert_eq!(decode(&frame), Err(DecodeError::Oversized(MAX_FRAME + 1)));
    }

    #[test]
    fn test_malformed_and_truncated() {
        let frame = encode(&batch(2)).unwrap();
        for cut in 1..frame.len() {
            assert!(decode(&frame[..cut]).is_err(), "cut at {cut}");
        }
        assert_eq!(decode(&[VERSION, 0xc1]), Err(DecodeError::Malformed));
        // An array header claiming four billion entries allocates nothing up front.
        assert_eq!(
            decode(&[
                VERSION, 0x98, 0xa1, b'a', 0xa1, b'b', 1, 1, 0xc0, 0xdd, 0xff, 0xff, 0xff, 0xff
            ]),
            Err(DecodeError::Malformed)
        );
    }

    #[test]
    fn test_too_many_entries() {
        let frame = encode(&batch(MAX_BATCH_ENTRIES + 1)).unwrap();
        assert_eq!(
            decode(&frame),
            Err(DecodeError::TooManyEntries(MAX_BATCH_ENTRIES + 1))
        );
    }
}
