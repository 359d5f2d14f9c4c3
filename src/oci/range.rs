//! Parsing of a single HTTP `Range: bytes=…` header (RFC 9110, section 14.1.2) against a
//! known content length.
//!
//! Only one range per request is supported: registries and containerd use single ranges to
//! resume blobs, and multipart/byteranges responses would cost complexity for no client.

/// An inclusive byte range `start..=end` within a blob of known size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

impl ByteRange {
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The `Content-Range` header value for this range of a blob of `size` bytes.
    pub fn content_range(&self, size: u64) -> String {
        format!("bytes {}-{}/{}", self.start, self.end, size)
    }
}

/// Why a `Range` header is refused (answered with 416).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("malformed range header")]
    Malformed,
    #[error("multiple ranges are not supported")]
    MultipleRanges,
    #[error("range not satisfiable")]
    Unsatisfiable,
}

/// Parses `header` for a blob of `size` bytes. Returns the clamped range to send.
pub fn parse_range(header: &str, size: u64) -> Result<ByteRange, RangeError> {
    let spec = header
        .trim()
        .strip_prefix("bytes=")
        .ok_or(RangeError::Malformed)?;
    if spec.contains(',') {
        return Err(RangeError::MultipleRanges);
    }
    let (first, last) = spec.trim().split_once('-').ok_or(RangeError::Malformed)?;
    let num = |s: &str| -> Result<u64, RangeError> {
        if s.is_empty() || s.len() > 20 || !s.bytes().all(|c| c.is_ascii_digit()) {
            return Err(RangeError::Malformed);
        }
        s.parse().map_err(|_| RangeError::Malformed)
    };
    let range = if first.is_empty() {
        // Suffix range: the last N bytes.
        let n = num(last)?;
        if n == 0 || size == 0 {
            return Err(RangeError::Unsatisfiable);
        }
        ByteRange {
            start: size.saturating_sub(n),
            end: size - 1,
        }
    } else {
        let start = num(first)?;
        let end = if last.is_empty() {
            u64::MAX
        } else {
            num(last)?
        };
        if end < start {
            return Err(RangeError::Malformed);
        }
        if start >= size {
            return Err(RangeError::Unsatisfiable);
        }
        ByteRange {
            start,
            end: end.min(size - 1),
        }
    };
    Ok(range)
}

/// Parses a `Content-Range: bytes START-END/TOTAL` response header (RFC 9110, 14.4) into
/// `(START, END, TOTAL)`; TOTAL is `None` for `*`. `None` for anything else (an unsatisfied
/// `bytes */TOTAL`, an inverted range, another unit). The one parser of peer responses: the
/// mirror and the coalescer both check a resumed stream with it.
pub(crate) fn parse_content_range(v: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = v.strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (s, e) = range.split_once('-')?;
    let (start, end): (u64, u64) = (s.parse().ok()?, e.parse().ok()?);
    (end >= start).then_some((start, end, total.parse().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_table() {
        let r = |start, end| Ok(ByteRange { start, end });
        let cases = [
            ("open", "bytes=10-", 100, r(10, 99)),
            ("closed", "bytes=0-9", 100, r(0, 9)),
            ("clamped end", "bytes=90-200", 100, r(90, 99)),
            ("suffix", "bytes=-10", 100, r(90, 99)),
            ("suffix longer than blob", "bytes=-500", 100, r(0, 99)),
            ("whitespace", " bytes=1-2 ", 100, r(1, 2)),
            (
                "start past end",
                "bytes=100-",
                100,
                Err(RangeError::Unsatisfiable),
            ),
            ("empty blob", "bytes=0-", 0, Err(RangeError::Unsatisfiable)),
            (
                "zero suffix",
                "bytes=-0",
                100,
                Err(RangeError::Unsatisfiable),
            ),
            ("inverted", "bytes=9-1", 100, Err(RangeError::Malformed)),
            (
                "multi",
                "bytes=0-1,3-4",
                100,
                Err(RangeError::MultipleRanges),
            ),
            ("wrong unit", "items=0-1", 100, Err(RangeError::Malformed)),
            ("no dash", "bytes=5", 100, Err(RangeError::Malformed)),
            ("negative", "bytes=--5", 100, Err(RangeError::Malformed)),
            (
                "overflow",
                "bytes=0-99999999999999999999999",
                100,
                Err(RangeError::Malformed),
            ),
            ("plus sign", "bytes=+1-2", 100, Err(RangeError::Malformed)),
        ];
        for (name, header, size, want) in cases {
            assert_eq!(parse_range(header, size), want, "{name}");
        }
        assert_eq!(
            ByteRange { start: 90, end: 99 }.content_range(100),
            "bytes 90-99/100"
        );
        assert_eq!(ByteRange { start: 90, end: 99 }.len(), 10);
    }

    #[test]
    fn content_range_table() {
        let cases = [
            ("bytes 0-9/10", Some((0, 9, Some(10)))),
            ("bytes 5-5/*", Some((5, 5, None))),
            ("bytes 9-5/10", None),
            ("bytes */10", None),
            ("items 0-1/2", None),
            ("bytes 0-1", None),
        ];
        for (input, want) in cases {
            assert_eq!(parse_content_range(input), want, "{input}");
        }
    }
}
