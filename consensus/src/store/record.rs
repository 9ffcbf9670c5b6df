//! Record framing: `[payload length: u32 LE][CRC-32 of the payload: u32 LE][payload]`, the
//! payload being MessagePack (rmp-serde, with field names so fields can be added later).
//!
//! Reading stops at the first record that is cut short or whose checksum does not match: that is
//! what a write interrupted by a crash leaves behind, and it was never acknowledged.

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

/// The payloads of the intact records at the start of a buffer.
#[derive(Debug)]
pub(super) struct Records<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Records<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Records { buf, pos: 0 }
    }

    /// Bytes taken by the records returned so far; the start of the next record.
    pub(super) fn valid_len(&self) -> usize {
        self.pos
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let rest = &self.buf[self.pos..];
        let header = rest.get(..HEADER_LEN)?;
        let (len, crc) = header.split_at(4);
        let len = u32::from_le_bytes(len.try_into().ok()?) as usize;
        let crc = u32::from_le_bytes(crc.try_into().ok()?);
        let payload = rest.get(HEADER_LEN..HEADER_LEN.checked_add(len)?)?;
        if crc32fast::hash(payload) != crc {
            return None;
        }
        self.pos += HEADER_LEN + len;
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

    fn decoded(buf: &[u8]) -> (Vec<String>, usize) {
        let mut records = Records::new(buf);
        let values = records
            .by_ref()
            .map(|p| rmp_serde::from_slice(p).unwrap())
            .collect();
        (values, records.valid_len())
    }

    #[test]
    fn test_round_trip() {
        let buf = framed(&["a", "bc"]);
        assert_eq!(
            decoded(&buf),
            (vec!["a".to_owned(), "bc".to_owned()], buf.len())
        );
    }

    #[test]
    fn test_torn_tail_is_dropped() {
        let whole = framed(&["a", "bc"]);
        let first = framed(&["a"]).len();
        for cut in first..whole.len() {
            assert_eq!(
                decoded(&whole[..cut]),
                (vec!["a".to_owned()], first),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn test_checksum_mismatch_stops_reading() {
        let mut buf = framed(&["a", "bc", "d"]);
        let first = framed(&["a"]).len();
        buf[first + HEADER_LEN] ^= 0x01;
        assert_eq!(decoded(&buf), (vec!["a".to_owned()], first));
    }

    #[test]
    fn test_huge_length_is_torn_not_a_panic() {
        let mut buf = framed(&["a"]);
        buf[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decoded(&buf), (vec![], 0));
    }
}
