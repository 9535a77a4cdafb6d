//! Line framing and the DATA transparency procedure (RFC 5321 §4.5.2).
//!
//! Inbound, [`DataDecoder`] removes dot-stuffing and finds the end of data;
//! for BDAT chunks ([`DataDecoder::chunks`]) it only checks the lines.
//! Only `CRLF . CRLF` ends it: a bare LF or CR anywhere, alone or around a
//! dot (`LF.LF`, `CRLF.LF`, `LF.CRLF`), is a fault that rejects the message
//! but never ends the data early. That closes the SMTP smuggling hole where
//! two servers disagree on where a message ends.
//!
//! Outbound, [`dot_stuff`] doubles every leading dot and adds the end marker.

use std::fmt;

/// Longest text line (RFC 5321 §4.5.3.1.6): 998 octets plus CRLF.
pub const MAX_TEXT_LINE: usize = 998;

/// Why a message received in DATA cannot be accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataFault {
    /// An LF not preceded by CR.
    BareLf,
    /// A CR not followed by LF.
    BareCr,
    /// A NUL octet.
    Nul,
    /// A line longer than 998 octets.
    LineTooLong,
    /// More octets than the size limit.
    TooBig,
}

impl fmt::Display for DataFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DataFault::BareLf => "bare LF in message data",
            DataFault::BareCr => "bare CR in message data",
            DataFault::Nul => "NUL octet in message data",
            DataFault::LineTooLong => "line longer than 998 octets",
            DataFault::TooBig => "message exceeds the size limit",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// At the start of a line (after CRLF, or at the start of DATA).
    LineStart,
    /// A dot at the start of a line.
    Dot,
    /// `CRLF . CR`: one LF more ends the data.
    DotCr,
    /// Inside a line.
    InLine,
    /// A CR inside a line; LF must follow.
    Cr,
}

/// What one octet did to the state machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Taken; on to the next.
    Next,
    /// Not taken: the same octet again, in the new state.
    Again,
    /// It ended the data.
    End,
}

/// Incremental DATA reader: feed it what the socket gives, in any pieces.
#[derive(Debug)]
pub struct DataDecoder {
    /// DATA: dot-stuffed, ended by `CRLF . CRLF`. Not for BDAT chunks.
    dots: bool,
    state: State,
    line_len: usize,
    max_size: usize,
    out: Vec<u8>,
    fault: Option<DataFault>,
}

impl DataDecoder {
    /// A decoder that refuses messages over `max_size` octets (after
    /// unstuffing) without holding more than that in memory.
    pub fn new(max_size: usize) -> DataDecoder {
        DataDecoder::reusing(max_size, Vec::new())
    }

    /// As [`DataDecoder::new`], writing the message into `buf` (emptied
    /// first): a buffer kept from an earlier message is not allocated
    /// again, and grows only past its capacity.
    pub fn reusing(max_size: usize, mut buf: Vec<u8>) -> DataDecoder {
        buf.clear();
        if buf.capacity() == 0 {
            buf = Vec::with_capacity(max_size.min(16 * 1024));
        }
        DataDecoder {
            dots: true,
            state: State::LineStart,
            line_len: 0,
            max_size,
            out: buf,
            fault: None,
        }
    }

    /// A decoder for a message sent in BDAT chunks (RFC 3030): the octets
    /// are the message as it is, with no dot-stuffing and no end marker,
    /// held to the same rules (CRLF lines of at most 998 octets, no NUL,
    /// at most `max_size`). [`DataDecoder::feed`] then never finds an end.
    pub fn chunks(max_size: usize) -> DataDecoder {
        DataDecoder::chunks_reusing(max_size, Vec::new())
    }

    /// As [`DataDecoder::chunks`], into `buf` as [`DataDecoder::reusing`].
    pub fn chunks_reusing(max_size: usize, buf: Vec<u8>) -> DataDecoder {
        DataDecoder {
            dots: false,
            ..DataDecoder::reusing(max_size, buf)
        }
    }

    /// Takes bytes of the DATA stream. Returns `Some(n)` when the end
    /// marker was found and ends at `input[n - 1]` (later bytes belong to the
    /// next command), or `None` when all of `input` was taken.
    pub fn feed(&mut self, input: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < input.len() {
            if matches!(self.state, State::LineStart | State::InLine) {
                i += self.lines(&input[i..]);
                if i == input.len() {
                    break;
                }
            }
            let b = input[i];
            i += 1;
            match self.step(b) {
                Step::End => return Some(i),
                Step::Again => i -= 1,
                Step::Next => {}
            }
        }
        None
    }

    /// The state machine, one octet `b` at a time.
    fn step(&mut self, b: u8) -> Step {
        match (self.state, b) {
            (State::LineStart, b'.') if self.dots => self.state = State::Dot,
            (State::Dot, b'\r') => self.state = State::DotCr,
            (State::DotCr, b'\n') => return Step::End,
            (State::DotCr, _) => {
                // `CRLF . CR x`: the line was ".", then a bare CR.
                self.fail(DataFault::BareCr);
                self.state = State::InLine;
                return Step::Again;
            }
            (State::LineStart | State::InLine, b'\r') => self.state = State::Cr,
            (State::Cr, b'\n') => {
                self.push(b"\r\n");
                self.line_len = 0;
                self.state = State::LineStart;
            }
            (State::Cr, _) => {
                self.fail(DataFault::BareCr);
                self.state = State::InLine;
                return Step::Again;
            }
            (_, b'\n') => {
                // Bare LF: fault, and stay inside the line so that no
                // dot after it can end the data.
                self.fail(DataFault::BareLf);
                self.state = State::InLine;
            }
            (_, 0) => {
                self.fail(DataFault::Nul);
                self.state = State::InLine;
            }
            // A leading dot is dropped (unstuffing); the octet after it
            // is ordinary text.
            (State::LineStart | State::Dot | State::InLine, _) => {
                self.push(&[b]);
                self.state = State::InLine;
            }
        }
        Step::Next
    }

    /// The fast path, at the start of a line or inside one: takes whole
    /// lines and text up to the next octet that needs the state machine (a
    /// dot that starts a line, a CR whose LF is not in `input`, a bare LF,
    /// a NUL), found with `memchr`, checked as [`DataDecoder::push`] would
    /// check each piece and copied in one go. Returns how many octets of
    /// `input` it took.
    fn lines(&mut self, input: &[u8]) -> usize {
        let mut start = self.state == State::LineStart;
        let mut size = self.out.len();
        let mut taken = 0;
        loop {
            let rest = &input[taken..];
            let Some(&first) = rest.first() else { break };
            if start {
                match first {
                    b'\r' if rest.get(1) == Some(&b'\n') => {
                        self.count(&mut size, 2, false);
                        taken += 2;
                    }
                    b'\r' | b'\n' | 0 => break,
                    b'.' if self.dots => break,
                    _ => {
                        self.count(&mut size, 1, true);
                        taken += 1;
                        start = false;
                    }
                }
                continue;
            }
            match memchr::memchr3(b'\r', b'\n', 0, rest) {
                Some(p) if rest[p] == b'\r' && rest.get(p + 1) == Some(&b'\n') => {
                    self.count(&mut size, p, true);
                    self.count(&mut size, 2, false);
                    self.line_len = 0;
                    taken += p + 2;
                    start = true;
                }
                found => {
                    let p = found.unwrap_or(rest.len());
                    self.count(&mut size, p, true);
                    taken += p;
                    break;
                }
            }
        }
        self.state = if start {
            State::LineStart
        } else {
            State::InLine
        };
        if self.fault.is_none() {
            self.out.extend_from_slice(&input[..taken]);
        }
        taken
    }

    /// The first fault found so far, if any.
    pub fn fault(&self) -> Option<DataFault> {
        self.fault
    }

    /// The message once the end marker was seen (or, for chunks, after the
    /// last one), or the first fault.
    pub fn finish(mut self) -> Result<Vec<u8>, DataFault> {
        if self.state == State::Cr {
            // Chunks that end between a CR and its LF.
            self.fail(DataFault::BareCr);
        }
        match self.fault {
            Some(f) => Err(f),
            None => Ok(self.out),
        }
    }

    /// Takes a piece of the message: text, or a line's CRLF.
    fn push(&mut self, bytes: &[u8]) {
        let mut size = self.out.len();
        self.count(&mut size, bytes.len(), bytes != b"\r\n");
        if self.fault.is_none() {
            self.out.extend_from_slice(bytes);
        }
    }

    /// Checks a piece of `len` octets (`text`, or a CRLF) that would take
    /// the message to `size + len` octets: the line's length, then the
    /// size limit; counts it in `size` if it passes.
    fn count(&mut self, size: &mut usize, len: usize, text: bool) {
        if text {
            self.line_len += len;
            if self.line_len > MAX_TEXT_LINE {
                self.fail(DataFault::LineTooLong);
            }
        }
        if self.fault.is_some() {
            return;
        }
        if *size + len > self.max_size {
            self.fail(DataFault::TooBig);
            return;
        }
        *size += len;
    }

    fn fail(&mut self, fault: DataFault) {
        if self.fault.is_none() {
            self.fault = Some(fault);
            // Nothing more will be used; give the memory back.
            self.out = Vec::new();
        }
    }
}

/// Appends `data` dot-stuffed, with a final CRLF if it lacks one, and the
/// `.` CRLF end marker.
pub fn dot_stuff(data: &[u8], out: &mut Vec<u8>) {
    out.reserve(data.len() + 16);
    let mut rest = data;
    while !rest.is_empty() {
        if rest[0] == b'.' {
            out.push(b'.');
        }
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .map_or(rest.len(), |p| p + 1);
        out.extend_from_slice(&rest[..end]);
        rest = &rest[end..];
    }
    if !data.is_empty() && !data.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_in_pieces(wire: &[u8], cut: usize) -> (Option<usize>, Result<Vec<u8>, DataFault>) {
        let mut d = DataDecoder::new(1 << 20);
        let mut end = d.feed(&wire[..cut]);
        if end.is_none() {
            end = d.feed(&wire[cut..]).map(|n| n + cut);
        }
        (end, d.finish())
    }

    #[test]
    fn unstuffs_and_finds_end_at_every_cut() {
        let wire = b"a\r\n..b\r\n.\r\nMAIL";
        for cut in 0..=wire.len() {
            let (end, body) = decode_in_pieces(wire, cut);
            assert_eq!(end, Some(wire.len() - 4), "cut {cut}");
            assert_eq!(body.unwrap(), b"a\r\n.b\r\n", "cut {cut}");
        }
    }

    #[test]
    fn stuff_then_decode_is_identity() {
        let bodies: [&[u8]; 5] = [
            b"",
            b".\r\n",
            b"..\r\n.QUIT\r\nMAIL FROM:<x>\r\n.\r\n",
            b"x\r\n.y",
            b"line\r\n\r\n",
        ];
        for body in bodies {
            let mut wire = Vec::new();
            dot_stuff(body, &mut wire);
            for cut in 0..=wire.len() {
                let (end, got) = decode_in_pieces(&wire, cut);
                assert_eq!(end, Some(wire.len()));
                let mut want = body.to_vec();
                if !want.is_empty() && !want.ends_with(b"\r\n") {
                    want.extend_from_slice(b"\r\n");
                }
                assert_eq!(got.unwrap(), want, "body {body:?} cut {cut}");
            }
        }
    }

    #[test]
    fn smuggling_sequences_do_not_end_data() {
        for evil in [
            &b"a\n.\nMAIL"[..],
            b"a\r\n.\nMAIL",
            b"a\n.\r\nMAIL",
            b"a\r.\r\nMAIL",
        ] {
            let mut d = DataDecoder::new(1 << 20);
            assert_eq!(d.feed(evil), None, "{evil:?}");
            assert_eq!(d.feed(b"\r\n.\r\n"), Some(5));
            assert!(d.finish().is_err());
        }
    }

    #[test]
    fn reports_faults() {
        let cases: [(&[u8], DataFault); 4] = [
            (b"a\0b\r\n.\r\n", DataFault::Nul),
            (b"a\nb\r\n.\r\n", DataFault::BareLf),
            (b"a\rb\r\n.\r\n", DataFault::BareCr),
            (b"0123456789\r\n.\r\n", DataFault::TooBig),
        ];
        for (wire, fault) in cases {
            let mut d = DataDecoder::new(8);
            assert_eq!(d.feed(wire), Some(wire.len()));
            assert_eq!(d.finish(), Err(fault));
        }
        let mut long = vec![b'x'; MAX_TEXT_LINE + 1];
        long.extend_from_slice(b"\r\n.\r\n");
        let mut d = DataDecoder::new(1 << 20);
        assert_eq!(d.feed(&long), Some(long.len()));
        assert_eq!(d.finish(), Err(DataFault::LineTooLong));
        let mut ok = vec![b'x'; MAX_TEXT_LINE];
        ok.extend_from_slice(b"\r\n.\r\n");
        let mut d = DataDecoder::new(1 << 20);
        assert_eq!(d.feed(&ok), Some(ok.len()));
        assert!(d.finish().is_ok());
    }

    #[test]
    fn chunks_are_taken_as_they_are_and_checked_like_data() {
        // A dot line is text, not an end, in any cut.
        let wire = b"a\r\n.\r\n..b\r\n";
        for cut in 0..=wire.len() {
            let mut d = DataDecoder::chunks(1 << 20);
            assert_eq!(d.feed(&wire[..cut]), None);
            assert_eq!(d.feed(&wire[cut..]), None);
            assert_eq!(d.finish().unwrap(), wire, "cut {cut}");
        }
        let cases: [(&[u8], DataFault); 5] = [
            (b"a\0b\r\n", DataFault::Nul),
            (b"a\nb\r\n", DataFault::BareLf),
            (b"a\rb\r\n", DataFault::BareCr),
            (b"ab\r", DataFault::BareCr),
            (b"0123456789\r\n", DataFault::TooBig),
        ];
        for (wire, fault) in cases {
            let mut d = DataDecoder::chunks(8);
            assert_eq!(d.feed(wire), None);
            assert_eq!(d.finish(), Err(fault), "{wire:?}");
        }
        let mut d = DataDecoder::chunks(8);
        d.feed(b"no CRLF");
        assert_eq!(d.finish().unwrap(), b"no CRLF");
    }

    /// The decoder as it was before `memchr` and whole lines: the same
    /// state machine, but for runs of text inside a line scanned octet by
    /// octet. The fast path must agree with it on every input, cut
    /// anywhere.
    struct Reference(DataDecoder);

    impl Reference {
        fn feed(&mut self, input: &[u8]) -> Option<usize> {
            let d = &mut self.0;
            let mut i = 0;
            while i < input.len() {
                if d.state == State::InLine {
                    let run = input[i..]
                        .iter()
                        .position(|&b| b == b'\r' || b == b'\n' || b == 0)
                        .unwrap_or(input.len() - i);
                    d.push(&input[i..i + run]);
                    i += run;
                    if i == input.len() {
                        break;
                    }
                }
                let b = input[i];
                i += 1;
                match d.step(b) {
                    Step::End => return Some(i),
                    Step::Again => i -= 1,
                    Step::Next => {}
                }
            }
            None
        }
    }

    #[test]
    fn the_fast_path_agrees_with_the_octet_by_octet_decoder() {
        // xorshift: the same cases at every run.
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for case in 0..20_000 {
            let mut wire = Vec::new();
            for _ in 0..next(40) {
                match next(12) {
                    // Lines near the length limit, and texts between them.
                    0 => wire.extend(std::iter::repeat_n(b'x', MAX_TEXT_LINE - 2 + next(5))),
                    1 | 2 => wire.extend_from_slice(b"\r\n"),
                    3 => wire.extend_from_slice(b"\r\n.\r\n"),
                    4 => wire.push(b'.'),
                    5 => wire.push(b'\r'),
                    6 => wire.push(b'\n'),
                    7 => wire.push(0),
                    _ => wire.extend(std::iter::repeat_n(b'a' + next(26) as u8, 1 + next(30))),
                }
            }
            let dots = case % 3 != 0;
            let max_size = [8, 100, 1000, 3000, 1 << 20][next(5)];
            let mut fast = if dots {
                DataDecoder::new(max_size)
            } else {
                DataDecoder::chunks(max_size)
            };
            let mut slow = Reference(if dots {
                DataDecoder::new(max_size)
            } else {
                DataDecoder::chunks(max_size)
            });
            // Fed in up to three pieces, as the socket may give them.
            let (a, b) = (next(wire.len() + 1), next(wire.len() + 1));
            let (a, b) = (a.min(b), a.max(b));
            for piece in [&wire[..a], &wire[a..b], &wire[b..]] {
                let (f, r) = (fast.feed(piece), slow.feed(piece));
                assert_eq!(f, r, "case {case}: {wire:?}");
                if f.is_some() {
                    break;
                }
            }
            assert_eq!(
                fast.finish(),
                slow.0.finish(),
                "case {case}: {wire:?} max {max_size}"
            );
        }
    }

    #[test]
    fn stuffs() {
        let mut out = Vec::new();
        dot_stuff(b".a\r\nb\r\n.\r\n", &mut out);
        assert_eq!(out, b"..a\r\nb\r\n..\r\n.\r\n");
    }
}
