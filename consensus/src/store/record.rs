//! Record framing: `[payload length: u32 LE][CRC-32 of the payload: u32 LE][payload]`, the
//! payload being MessagePack (rmp-serde, with field names so fields can be added later).
//!
//! Reading returns the intact records at the start of a buffer and then tells what follows them
//! ([`Tail`]):
//!
//! * A record is *damaged* when it is cut short, its checksum does not match, or its length is
//!   zero (MessagePack never encodes a value in zero bytes, and a filesystem may leave zeroed
//!   blocks behind a crash: eight zero bytes would otherwise pass as an empty record, the CRC-32
//!   of nothing being 0).
//! * A damaged record's length cannot be trusted (the damage may be in the length itself), so
//!   "the last record" is not found by following lengths. A damaged record is the last one when
//!   no intact record starts at any byte after its start: then it is a *torn tail*. When an
//!   intact record does start somewhere after it, the damaged one is *corrupt*.
//! * The writers make that test sound by writing exactly one record per write and syncing it
//!   before the next write starts (see the log's module). An interrupted write then damages
//!   only the last record, and an intact record after a damaged one was written, and synced,
//!   after the damaged one was complete: the damage came later, to data already acknowledged.
//!   Garbage in a torn tail passes as an intact record only if four of its bytes are a fitting
//!   length and the next four the CRC-32 of what follows (about 2^-32 per byte), and then the
//!   error is on the loud side: the file is called corrupt and nothing is cut.

use serde::Serialize;

const HEADER_LEN: usize = 8;

/// Appends one framed record holding `value` to `out`.
pub(super) fn encode<T: Serialize>(
    value: &T,
    out: &mut Vec<u8>,
) -> Result<(), rmp_serde::encode::Error> {
    let payload = rmp_serde::to_vec_named(value)?;
    let len = u32::try_from(payload.len()).map_err(|_| {
        rmp_serde::encode::Error::Syntax(format!(
            "a record of {} bytes is too large",
            payload.len()
        ))
    })?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(())
}

/// The payloads of the intact records at the start of a buffer; [`Records::tail`] then tells
/// what follows them.
#[derive(Debug)]
pub(super) struct Records<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// What follows the intact records at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tail {
    /// Nothing: the buffer is intact records only.
    Clean,
    /// A damaged record at byte `offset` with no intact record after it: a write that never
    /// completed (or, undetectably, damage to the very last record).
    Torn { offset: usize },
    /// A damaged record at byte `offset` and an intact one starting at byte `intact` after it:
    /// damage to records that were complete.
    Corrupt { offset: usize, intact: usize },
}

impl<'a> Records<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Records { buf, pos: 0 }
    }

    /// Bytes taken by the records returned so far; the start of the next record.
    pub(super) fn valid_len(&self) -> usize {
        self.pos
    }

    /// What follows the records returned so far; meant for after [`Iterator::next`] returned
    /// `None`, when the next record, if any, is damaged.
    pub(super) fn tail(&self) -> Tail {
        let offset = self.pos;
        if offset >= self.buf.len() {
            return Tail::Clean;
        }
        match (offset + 1..self.buf.len()).find(|&at| intact_at(self.buf, at).is_some()) {
            Some(intact) => Tail::Corrupt { offset, intact },
            None => Tail::Torn { offset },
        }
    }
}

/// The payload of the record starting at byte `at` of `buf`, if that record is intact.
fn intact_at(buf: &[u8], at: usize) -> Option<&[u8]> {
    let rest = buf.get(at..)?;
    let header = rest.get(..HEADER_LEN)?;
    let (len, crc) = header.split_at(4);
    let len = u32::from_le_bytes(len.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(crc.try_into().ok()?);
    if len == 0 {
        return None;
    }
    let payload = rest.get(HEADER_LEN..HEADER_LEN.checked_add(len)?)?;
    (crc32fast::hash(payload) == crc).then_some(payload)
}

impl<'a> Iterator for Records<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let payload = intact_at(self.buf, self.pos)?;
        self.pos += HEADER_LEN + payload.len();
        Some(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(values: &[&str]) -> Vec<u8> {
        let mut buf = Vec::new();
        for v in values {
            encode(v, &mut buf).unwrap();
        }
        buf
    }

    /// The values of the intact records at the start, and what follows them.
    fn decoded(buf: &[u8]) -> (Vec<String>, Tail) {
        let mut records = Records::new(buf);
        let values = records
            .by_ref()
            .map(|p| rmp_serde::from_slice(p).unwrap())
            .collect();
        (values, records.tail())
    }

    fn strings(values: &[&str]) -> Vec<String> {
        values.iter().map(|&v| v.to_owned()).collect()
    }

    #[test]
    fn test_round_trip() {
        let buf = framed(&["a", "bc"]);
        assert_eq!(decoded(&buf), (strings(&["a", "bc"]), Tail::Clean));
        assert_eq!(decoded(&[]), (vec![], Tail::Clean));
    }

    #[test]
    fn test_torn_tail_is_dropped() {
        let whole = framed(&["a", "bc"]);
        let first = framed(&["a"]).len();
        for cut in first + 1..whole.len() {
            assert_eq!(
                decoded(&whole[..cut]),
                (strings(&["a"]), Tail::Torn { offset: first }),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn test_damaged_last_record_is_torn() {
        let mut buf = framed(&["a", "bc"]);
        let first = framed(&["a"]).len();
        let last = buf.len() - 1;
        buf[last] ^= 0x01;
        assert_eq!(
            decoded(&buf),
            (strings(&["a"]), Tail::Torn { offset: first })
        );
    }

    #[test]
    fn test_zeroed_tail_is_torn() {
        // What a filesystem may show after a crash: the file grew, the data never landed.
        let records = framed(&["a", "bc"]);
        for zeros in [1, 8, 9, 4096] {
            let mut buf = records.clone();
            buf.resize(records.len() + zeros, 0);
            assert_eq!(
                decoded(&buf),
                (
                    strings(&["a", "bc"]),
                    Tail::Torn {
                        offset: records.len()
                    }
                ),
                "{zeros} zero bytes"
            );
        }
    }

    #[test]
    fn test_damaged_payload_in_the_middle_is_corrupt() {
        let mut buf = framed(&["a", "bc", "d"]);
        let first = framed(&["a"]).len();
        let third = framed(&["a", "bc"]).len();
        buf[first + HEADER_LEN] ^= 0x01;
        assert_eq!(
            decoded(&buf),
            (
                strings(&["a"]),
                Tail::Corrupt {
                    offset: first,
                    intact: third
                }
            )
        );
    }

    #[test]
    fn test_damaged_length_in_the_middle_is_corrupt() {
        // The length decides where the next record would start, so it cannot be followed: the
        // intact record after it is found wherever it starts.
        let clean = framed(&["a", "bc", "d"]);
        let first = framed(&["a"]).len();
        let third = framed(&["a", "bc"]).len();
        for len in [0, 1, 2, 1000, u32::MAX] {
            let mut buf = clean.clone();
            buf[first..first + 4].copy_from_slice(&len.to_le_bytes());
            assert_eq!(
                decoded(&buf),
                (
                    strings(&["a"]),
                    Tail::Corrupt {
                        offset: first,
                        intact: third
                    }
                ),
                "length {len}"
            );
        }
    }

    #[test]
    fn test_damaged_first_record_is_corrupt_when_more_follow() {
        let mut buf = framed(&["a", "bc"]);
        buf[HEADER_LEN] ^= 0x01;
        let second = framed(&["a"]).len();
        assert_eq!(
            decoded(&buf),
            (
                vec![],
                Tail::Corrupt {
                    offset: 0,
                    intact: second
                }
            )
        );
    }

    #[test]
    fn test_huge_length_is_torn_not_a_panic() {
        let mut buf = framed(&["a"]);
        buf[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decoded(&buf), (vec![], Tail::Torn { offset: 0 }));
    }
}
