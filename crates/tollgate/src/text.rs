//! Short texts built on the stack and handed to a formatter in one write: a quota's id and an
//! IPv4 address, which the Redis store writes into every key it names. `write!` with integer
//! arguments costs a few hundred instructions per number (padding, the formatter's dispatch);
//! `itoa` and a copy cost a few dozen.

/// At most `N` bytes of ASCII text. Every writer of one knows the longest text it can write, so
/// nothing is ever cut; if something were, it would be cut, never a panic.
pub(crate) struct Text<const N: usize> {
    bytes: [u8; N],
    len: usize,
}

impl<const N: usize> Text<N> {
    pub(crate) fn new() -> Self {
        Text {
            bytes: [0; N],
            len: 0,
        }
    }

    pub(crate) fn push(&mut self, s: &str) {
        let n = s.len().min(N - self.len);
        debug_assert_eq!(n, s.len(), "a text longer than its room");
        self.bytes[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
    }

    pub(crate) fn int(&mut self, n: impl itoa::Integer) {
        self.push(itoa::Buffer::new().format(n));
    }

    pub(crate) fn as_str(&self) -> &str {
        // Only whole `str`s are pushed, and all of them ASCII where a cut could fall.
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_holds_what_was_pushed_and_never_more_than_its_room() {
        let mut t = Text::<8>::new();
        t.push("ab");
        t.int(12_345_u32);
        assert_eq!(t.as_str(), "ab12345");
        // Past the room, a debug build asserts (a writer got its bound wrong) and a release
        // build cuts the rest: never a panic on a request path.
        let pushed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| t.push("xyz")));
        if cfg!(debug_assertions) {
            assert!(pushed.is_err());
        } else {
            assert!(pushed.is_ok());
            assert_eq!(t.as_str(), "ab12345x");
        }
    }
}
