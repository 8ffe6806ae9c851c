//! The rate-limit script's reply: one MessagePack array of integers, packed by the `cmsgpack`
//! library that Redis bundles with its Lua (since 2.6; Valkey too).
//!
//! Read in place: an array of integers replied as such is a frame per number, each of which
//! redis-protocol and fred decode and convert one by one (about 3000 client instructions per
//! coalesced check, a quarter of all of them); one string is one frame. Only what `cmsgpack`
//! writes for an array of integers is read (an array header, then integers of any width); any
//! other value is not an integer (a number that is not a whole one too: cmsgpack packs it as a
//! float, where Redis's array reply truncated it silently), and a reply cut short ends in one,
//! as do bytes after the array: never a panic, never a guess.

/// The integers of a MessagePack array, in order.
pub(crate) struct Ints<'a> {
    rest: &'a [u8],
    left: usize,
}

impl<'a> Ints<'a> {
    /// The array at the start of `bytes`, or `None` if it does not start with an array header.
    pub(crate) fn new(bytes: &'a [u8]) -> Option<Self> {
        let (&marker, rest) = bytes.split_first()?;
        let (left, rest) = match marker {
            0x90..=0x9f => (usize::from(marker & 0x0f), rest),
            0xdc => {
                let (n, rest) = rest.split_first_chunk::<2>()?;
                (usize::from(u16::from_be_bytes(*n)), rest)
            }
            0xdd => {
                let (n, rest) = rest.split_first_chunk::<4>()?;
                (usize::try_from(u32::from_be_bytes(*n)).ok()?, rest)
            }
            _ => return None,
        };
        Some(Ints { rest, left })
    }

    /// Takes `N` bytes, or `None` when fewer are left.
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (taken, rest) = self.rest.split_first_chunk::<N>()?;
        self.rest = rest;
        Some(*taken)
    }

    /// The next element as an integer: `None` when it is not one (another type, a `u64` beyond
    /// `i64`, or the bytes ran out before it did).
    fn int(&mut self) -> Option<i64> {
        let [marker] = self.take::<1>()?;
        match marker {
            0x00..=0x7f => Some(i64::from(marker)),
            0xe0..=0xff => Some(i64::from(i8::from_be_bytes([marker]))),
            0xcc => self.take().map(|b| i64::from(u8::from_be_bytes(b))),
            0xcd => self.take().map(|b| i64::from(u16::from_be_bytes(b))),
            0xce => self.take().map(|b| i64::from(u32::from_be_bytes(b))),
            0xcf => self
                .take()
                .and_then(|b| i64::try_from(u64::from_be_bytes(b)).ok()),
            0xd0 => self.take().map(|b| i64::from(i8::from_be_bytes(b))),
            0xd1 => self.take().map(|b| i64::from(i16::from_be_bytes(b))),
            0xd2 => self.take().map(|b| i64::from(i32::from_be_bytes(b))),
            0xd3 => self.take().map(i64::from_be_bytes),
            _ => None,
        }
    }
}

impl Iterator for Ints<'_> {
    /// `None` inside: the element is not an integer.
    type Item = Option<i64>;

    fn next(&mut self) -> Option<Option<i64>> {
        if self.left == 0 {
            // Bytes after the array are one element that is not an integer, once.
            if self.rest.is_empty() {
                return None;
            }
            self.rest = &[];
            return Some(None);
        }
        self.left -= 1;
        Some(self.int())
    }
}

/// `numbers` as `cmsgpack` could pack them (an array of 64-bit integers; it writes the
/// shortest form, which [`Ints`] reads too), for tests of what reads a reply.
#[cfg(test)]
pub(crate) fn pack(numbers: &[i64]) -> Vec<u8> {
    let mut out = vec![0xdd];
    out.extend_from_slice(&u32::try_from(numbers.len()).unwrap().to_be_bytes());
    for n in numbers {
        out.push(0xd3);
        out.extend_from_slice(&n.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8]) -> Option<Vec<Option<i64>>> {
        Ints::new(bytes).map(Iterator::collect)
    }

    #[test]
    fn every_integer_form_reads_as_its_value() {
        // A fixarray of 14, one of each form cmsgpack writes an integer in.
        let bytes = [
            0x9e, // fixarray, 14 elements
            0x00, 0x7f, // positive fixints
            0xff, 0xe0, // negative fixints: -1, -32
            0xcc, 0xff, // uint8
            0xcd, 0x01, 0x00, // uint16
            0xce, 0x00, 0x01, 0x00, 0x00, // uint32
            0xcf, 0x00, 0x06, 0x45, 0x42, 0x16, 0x09, 0x32, 0x40, // uint64: a time in us
            0xd0, 0x80, // int8
            0xd1, 0xff, 0x00, // int16
            0xd2, 0x80, 0x00, 0x00, 0x00, // int32
            0xd3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe, // int64
            0xcf, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // uint64: i64::MAX
            0xd3, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // int64: i64::MIN
        ];
        let want = [
            0,
            127,
            -1,
            -32,
            255,
            256,
            65_536,
            1_765_000_000_123_456,
            -128,
            -256,
            i64::from(i32::MIN),
            -2,
            i64::MAX,
            i64::MIN,
        ];
        assert_eq!(read(&bytes), Some(want.map(Some).to_vec()));
        // The longer array headers, and what the tests' encoder writes.
        assert_eq!(read(&[0xdc, 0x00, 0x01, 0x05]), Some(vec![Some(5)]));
        assert_eq!(read(&[0xdd, 0, 0, 0, 0]), Some(vec![]));
        let numbers = [1_700_000_000_000_000, -1, 0, 4_000_000_000, i64::MIN];
        assert_eq!(read(&pack(&numbers)), Some(numbers.map(Some).to_vec()));
    }

    #[test]
    fn anything_else_is_not_an_integer_and_never_a_panic() {
        // Not an array at all: an integer, a string, a map, nothing, a header cut short.
        for bytes in [
            &[0x01][..],
            &[0xa1, b'x'],
            &[0x81, 1, 1],
            &[],
            &[0xdc, 0x00],
        ] {
            assert!(read(bytes).is_none(), "{bytes:x?}");
        }
        // Elements that are not integers: nil, a float, a string, a u64 beyond i64, a marker
        // no integer has; an integer cut short, and an array longer than its bytes.
        let cases: [&[u8]; 7] = [
            &[0x91, 0xc0],
            &[0x91, 0xcb, 0x3f, 0xf0, 0, 0, 0, 0, 0, 0],
            &[0x91, 0xa1, b'4'],
            &[0x91, 0xcf, 0x80, 0, 0, 0, 0, 0, 0, 0],
            &[0x91, 0xc1],
            &[0x91, 0xd2, 0x00, 0x01],
            &[0x93, 0x01],
        ];
        for bytes in cases {
            let read = read(bytes).expect("an array");
            assert_eq!(read.last(), Some(&None), "{bytes:x?}");
        }
        // Bytes after the array: one element that is not an integer.
        assert_eq!(read(&[0x91, 0x01, 0x02]), Some(vec![Some(1), None]));
        // A huge count in a short reply ends at its bytes' end, with nothing allocated for it.
        let mut ints = Ints::new(&[0xdd, 0xff, 0xff, 0xff, 0xff, 0x07]).expect("an array");
        assert_eq!(ints.next(), Some(Some(7)));
        assert_eq!(ints.next(), Some(None));
    }
}
