//! A raw deflate (RFC 1951) decoder that also records the stream's LZ77 tokens: every literal
//! and every match with the output position where it starts. The tokens of an old file's stream
//! are what the encoder replays when it compresses the new file's content again.
//!
//! It accepts exactly the streams zlib accepts: over-subscribed codes are errors, and so are
//! incomplete ones except a literal/length or distance code with a single code of one bit. It
//! never reads past its input, never looks before the start of its output, and never writes
//! more than the limit it is given.
//!
//! Huffman codes are decoded with a table indexed by the next [`FAST_BITS`] bits of the stream;
//! the few longer codes are decoded bit by bit from their lengths' counts, as zlib's `puff.c`
//! does.

/// One symbol of a deflate stream: a literal byte (`dist == 0`, `len == 1`) or a match of `len`
/// bytes (3 to 258) copied from `dist` bytes back (1 to 32768), starting at output position `pos`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Token {
    pub pos: u32,
    pub len: u16,
    pub dist: u16,
}

/// [`inflate_tokens_at_most`] with no bound on the tokens.
#[cfg(test)]
pub(super) fn inflate_tokens(input: &[u8], limit: u64) -> Option<(Vec<u8>, Vec<Token>, usize)> {
    inflate_tokens_at_most(input, limit, usize::MAX)
}

/// The decompressed content of the deflate stream at the start of `input` and its tokens, and
/// how many bytes of `input` the stream took (up to and including the byte holding its last
/// bit). `None` when the stream is invalid (any error: bad block type, bad code lengths,
/// incomplete or over-subscribed Huffman codes as zlib rejects them, a distance beyond the
/// output so far, truncated input, a stored block whose LEN and NLEN disagree), when its
/// content is longer than `limit` bytes (or than `u32::MAX`, so that positions fit a `u32`), or
/// when it has more than `max_tokens` tokens (each takes 8 bytes).
pub(super) fn inflate_tokens_at_most(
    input: &[u8],
    limit: u64,
    max_tokens: usize,
) -> Option<(Vec<u8>, Vec<Token>, usize)> {
    // Positions are u32, so no content may be longer than u32::MAX bytes.
    let limit = usize::try_from(limit.min(u64::from(u32::MAX))).unwrap_or(usize::MAX);
    let mut inflater = Inflater {
        bits: Bits::new(input),
        out: Vec::with_capacity(limit.min(MAX_GUESS).min(input.len().saturating_mul(4))),
        tokens: Vec::with_capacity(limit.min(MAX_GUESS).min(input.len()).min(max_tokens)),
        limit,
        max_tokens,
        fixed: None,
    };
    loop {
        let last = inflater.bits.take(1);
        match inflater.bits.take(2) {
            0 => inflater.stored()?,
            1 => {
                let fixed = match inflater.fixed.take() {
                    Some(fixed) => fixed,
                    None => Box::new(fixed_codes()?),
                };
                inflater.codes(&fixed.0, &fixed.1)?;
                inflater.fixed = Some(fixed);
            }
            2 => {
                let (lit, dist) = inflater.bits.dynamic_codes()?;
                inflater.codes(&lit, &dist)?;
            }
            _ => return None,
        }
        if last == 1 {
            break;
        }
    }
    let used = inflater.bits.used()?;
    Some((inflater.out, inflater.tokens, used))
}

/// Most bytes of output (and tokens) reserved before the stream shows how long it is.
const MAX_GUESS: usize = 16 << 20;
/// Bits of the first-level decoding table.
const FAST_BITS: u32 = 10;
const FAST_MASK: u64 = (1 << FAST_BITS) - 1;
/// Longest Huffman code deflate allows.
const MAX_BITS: usize = 15;
/// Literal/length symbols of the fixed code (286 and 287 take part in the code but are invalid).
const FIXED_LITERALS: usize = 288;
/// Most literal/length and distance codes a dynamic block may declare.
const MAX_LITERALS: usize = 286;
const MAX_DISTANCES: usize = 30;
const END_OF_BLOCK: u16 = 256;

/// Base length and extra bits of the length symbols 257 to 285.
const LENGTH_BASE: [u16; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131,
    163, 195, 227, 258,
];
const LENGTH_EXTRA: [u8; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
/// Base distance and extra bits of the distance symbols 0 to 29.
const DIST_BASE: [u16; 30] = [
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
    2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
];
const DIST_EXTRA: [u8; 30] = [
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13,
    13,
];
/// The order in which the code length code's lengths are sent (RFC 1951, 3.2.7).
const CODE_LENGTH_ORDER: [usize; 19] = [
    16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
];

/// The decoder's state: the input, the content so far and its tokens.
struct Inflater<'a> {
    bits: Bits<'a>,
    out: Vec<u8>,
    tokens: Vec<Token>,
    limit: usize,
    max_tokens: usize,
    /// The fixed codes, built at the first fixed block.
    fixed: Option<Box<(Huffman, Huffman)>>,
}

impl Inflater<'_> {
    /// A stored block: LEN, NLEN and LEN bytes, from the next byte boundary.
    fn stored(&mut self) -> Option<()> {
        let start = self.bits.byte_boundary()?;
        let input = self.bits.input;
        let &[len_0, len_1, nlen_0, nlen_1] = input.get(start..)?.first_chunk::<4>()?;
        let len = u16::from_le_bytes([len_0, len_1]);
        let nlen = u16::from_le_bytes([nlen_0, nlen_1]);
        if len != !nlen {
            return None;
        }
        let from = start + 4;
        let to = from + usize::from(len);
        let data = input.get(from..to)?;
        if data.len() > self.limit - self.out.len()
            || data.len() > self.max_tokens - self.tokens.len()
        {
            return None;
        }
        let pos = self.out.len();
        self.out.extend_from_slice(data);
        self.tokens.extend((pos..pos + data.len()).map(|pos| Token {
            pos: pos as u32,
            len: 1,
            dist: 0,
        }));
        self.bits.restart_at(to);
        Some(())
    }

    /// The symbols of a compressed block, up to and including its end of block.
    fn codes(&mut self, lit: &Huffman, dist: &Huffman) -> Option<()> {
        loop {
            // One refill holds at least 56 bits; a length and a distance take at most 48.
            self.bits.refill();
            let sym = self.bits.decode(lit)?;
            if sym < 256 {
                if self.bits.overrun()
                    || self.out.len() >= self.limit
                    || self.tokens.len() >= self.max_tokens
                {
                    return None;
                }
                self.tokens.push(Token {
                    pos: self.out.len() as u32,
                    len: 1,
                    dist: 0,
                });
                self.out.push(sym as u8);
                continue;
            }
            if sym == END_OF_BLOCK {
                return (!self.bits.overrun()).then_some(());
            }
            let index = usize::from(sym - 257);
            let len =
                LENGTH_BASE.get(index)? + self.bits.take(u32::from(*LENGTH_EXTRA.get(index)?));
            let index = usize::from(self.bits.decode(dist)?);
            let distance =
                DIST_BASE.get(index)? + self.bits.take(u32::from(*DIST_EXTRA.get(index)?));
            if self.bits.overrun()
                || usize::from(len) > self.limit - self.out.len()
                || self.tokens.len() >= self.max_tokens
            {
                return None;
            }
            let pos = self.out.len();
            let start = pos.checked_sub(usize::from(distance))?;
            copy_match(&mut self.out, start, usize::from(len));
            self.tokens.push(Token {
                pos: pos as u32,
                len,
                dist: distance,
            });
        }
    }
}

/// Appends the `len` bytes that start at `start` of `out`, which may run into the bytes being
/// appended (a distance shorter than the length repeats the last `distance` bytes).
fn copy_match(out: &mut Vec<u8>, start: usize, len: usize) {
    let mut left = len;
    while left > 0 {
        // Every byte from `start` to the end is already there and the pattern repeats with the
        // period of the distance, so each round copies twice as much as the one before.
        let chunk = left.min(out.len() - start);
        out.extend_from_within(start..start + chunk);
        left -= chunk;
    }
}

/// The stream's bits, least significant first. Past the end of the input the reader supplies
/// zero bits, and [`Bits::overrun`] tells whether any of them was consumed.
struct Bits<'a> {
    input: &'a [u8],
    /// Next byte of `input` to load (beyond its end when zero bytes were loaded).
    pos: usize,
    /// The next `count` bits of the stream, in the low bits (higher ones may hold more).
    buf: u64,
    count: u32,
}

impl<'a> Bits<'a> {
    fn new(input: &'a [u8]) -> Self {
        Bits {
            input,
            pos: 0,
            buf: 0,
            count: 0,
        }
    }

    /// Loads bytes until at least 56 bits are held.
    #[inline(always)]
    fn refill(&mut self) {
        let word = self
            .input
            .get(self.pos..)
            .and_then(|rest| rest.first_chunk::<8>());
        if let Some(word) = word {
            // Loads as many whole bytes as fit; the partial one is loaded again next time.
            self.buf |= u64::from_le_bytes(*word) << self.count;
            self.pos += ((63 - self.count) >> 3) as usize;
            self.count |= 56;
        } else {
            while self.count <= 56 {
                let byte = self.input.get(self.pos).copied().unwrap_or(0);
                self.buf |= u64::from(byte) << self.count;
                self.pos += 1;
                self.count += 8;
            }
        }
    }

    /// Drops `n` bits, which must be held.
    #[inline(always)]
    fn consume(&mut self, n: u32) {
        self.buf >>= n;
        self.count -= n;
    }

    /// The next `n` bits (at most 16) as a number, loading them first when needed.
    #[inline(always)]
    fn take(&mut self, n: u32) -> u16 {
        if self.count < n {
            self.refill();
        }
        let value = (self.buf & ((1 << n) - 1)) as u16;
        self.consume(n);
        value
    }

    /// Whether bits beyond the end of the input were consumed.
    #[inline(always)]
    fn overrun(&self) -> bool {
        self.pos > self.input.len() && (self.pos - self.input.len()) * 8 > self.count as usize
    }

    /// Bits consumed so far.
    fn consumed(&self) -> Option<u64> {
        (self.pos as u64)
            .checked_mul(8)?
            .checked_sub(u64::from(self.count))
    }

    /// The number of input bytes up to and including the one that holds the last bit consumed,
    /// or `None` when that is past the end of the input.
    fn used(&self) -> Option<usize> {
        let used = usize::try_from(self.consumed()?.div_ceil(8)).ok()?;
        (used <= self.input.len()).then_some(used)
    }

    /// Skips to the next byte boundary and returns its offset in the input.
    fn byte_boundary(&mut self) -> Option<usize> {
        self.used()
    }

    /// Continues reading at byte `pos` of the input.
    fn restart_at(&mut self, pos: usize) {
        self.pos = pos;
        self.buf = 0;
        self.count = 0;
    }

    /// The next symbol of code `code`; needs 15 bits held.
    #[inline(always)]
    fn decode(&mut self, code: &Huffman) -> Option<u16> {
        let entry = code
            .fast
            .get((self.buf & FAST_MASK) as usize)
            .copied()
            .unwrap_or(0);
        let len = u32::from(entry >> 9);
        if len != 0 {
            self.consume(len);
            return Some(entry & 0x1ff);
        }
        self.decode_slow(code)
    }

    /// A code longer than [`FAST_BITS`] (or none): walks the canonical code one bit at a time.
    /// Codes of each length are consecutive numbers, the first one twice one past the last of
    /// the length before.
    fn decode_slow(&mut self, code: &Huffman) -> Option<u16> {
        let mut value: u32 = 0;
        let mut first: u32 = 0;
        let mut index: u32 = 0;
        for len in 1..=MAX_BITS as u32 {
            value |= ((self.buf >> (len - 1)) & 1) as u32;
            let count = u32::from(*code.counts.get(len as usize)?);
            if value < first + count {
                let symbol = *code.symbols.get((index + value - first) as usize)?;
                self.consume(len);
                return Some(symbol);
            }
            index += count;
            first = (first + count) << 1;
            value <<= 1;
        }
        None
    }

    /// The header of a dynamic block and the two codes it declares.
    fn dynamic_codes(&mut self) -> Option<(Huffman, Huffman)> {
        let literals = usize::from(self.take(5)) + 257;
        let distances = usize::from(self.take(5)) + 1;
        let code_lengths = usize::from(self.take(4)) + 4;
        if literals > MAX_LITERALS || distances > MAX_DISTANCES {
            return None;
        }
        let mut lengths = [0u8; 19];
        for &symbol in CODE_LENGTH_ORDER.iter().take(code_lengths) {
            *lengths.get_mut(symbol)? = self.take(3) as u8;
        }
        let code_length_code = Huffman::new(&lengths, false)?;

        let total = literals + distances;
        let mut lengths = [0u8; MAX_LITERALS + MAX_DISTANCES];
        let mut filled = 0;
        while filled < total {
            self.refill();
            let (value, repeat) = match self.decode(&code_length_code)? {
                len @ 0..=15 => (len as u8, 1),
                16 => (*lengths.get(filled.checked_sub(1)?)?, 3 + self.take(2)),
                17 => (0, 3 + self.take(3)),
                18 => (0, 11 + self.take(7)),
                _ => return None,
            };
            let end = filled + usize::from(repeat);
            lengths.get_mut(filled..end)?.fill(value);
            if end > total {
                return None;
            }
            filled = end;
        }
        if self.overrun() || lengths.get(usize::from(END_OF_BLOCK)) == Some(&0) {
            return None;
        }
        let lit = Huffman::new(lengths.get(..literals)?, true)?;
        let dist = Huffman::new(lengths.get(literals..total)?, true)?;
        Some((lit, dist))
    }
}

/// The literal/length and distance codes of fixed blocks (RFC 1951, 3.2.6).
fn fixed_codes() -> Option<(Huffman, Huffman)> {
    let mut lengths = [8u8; FIXED_LITERALS];
    lengths[144..256].fill(9);
    lengths[256..280].fill(7);
    // 32 distance codes make a complete code; 30 and 31 are invalid in the data.
    Some((
        Huffman::new(&lengths, false)?,
        Huffman::new(&[5; 32], false)?,
    ))
}

/// A canonical Huffman code, for decoding.
struct Huffman {
    /// By the next [`FAST_BITS`] bits: the symbol (low 9 bits) and its code length (the bits
    /// above), or 0 when the code is longer or there is none.
    fast: [u16; 1 << FAST_BITS],
    /// How many codes each length has (index 0 unused).
    counts: [u16; MAX_BITS + 1],
    /// The symbols by code length, then by value (which is the order of their codes).
    symbols: [u16; FIXED_LITERALS],
}

impl Huffman {
    /// The code of the symbols with these code lengths (0: symbol unused), or `None` when it
    /// is over-subscribed, or incomplete where zlib rejects that: an incomplete code is allowed
    /// only with `single_allowed` and only when it is a single code of one bit (or no code).
    fn new(lengths: &[u8], single_allowed: bool) -> Option<Self> {
        let mut counts = [0u16; MAX_BITS + 1];
        for &len in lengths {
            *counts.get_mut(usize::from(len))? += 1;
        }
        counts[0] = 0;
        let mut left: i32 = 1;
        for &count in &counts[1..] {
            left = (left << 1) - i32::from(count);
            if left < 0 {
                return None;
            }
        }
        let longest = counts.iter().rposition(|&count| count != 0).unwrap_or(0);
        if left > 0 && !(single_allowed && longest <= 1) {
            return None;
        }

        let mut offsets = [0u16; MAX_BITS + 2];
        for len in 1..=MAX_BITS {
            offsets[len + 1] = offsets[len] + counts[len];
        }
        let mut symbols = [0u16; FIXED_LITERALS];
        for (symbol, &len) in lengths.iter().enumerate() {
            if len != 0 {
                let offset = offsets.get_mut(usize::from(len))?;
                *symbols.get_mut(usize::from(*offset))? = symbol as u16;
                *offset += 1;
            }
        }

        let mut fast = [0u16; 1 << FAST_BITS];
        let mut code: u32 = 0;
        let mut index = 0usize;
        for len in 1..=FAST_BITS {
            for _ in 0..counts[len as usize] {
                let symbol = *symbols.get(index)?;
                let entry = symbol | (len as u16) << 9;
                // Codes are sent most significant bit first, so the table is indexed by the
                // reversed code, with every value of the bits that follow it.
                let reversed = (code.reverse_bits() >> (32 - len)) as usize;
                for slot in fast.iter_mut().skip(reversed).step_by(1 << len) {
                    *slot = entry;
                }
                code += 1;
                index += 1;
            }
            code <<= 1;
        }
        Some(Huffman {
            fast,
            counts,
            symbols,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::{noise, text};
    use proptest::prelude::*;
    use std::io::Write;

    fn flate2(data: &[u8], level: u32) -> Vec<u8> {
        let mut encoder =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::new(level));
        encoder.write_all(data).expect("write to a Vec");
        encoder.finish().expect("finish into a Vec")
    }

    /// Contents of every kind: empty, tiny, text-like, incompressible, long runs, and mixed.
    fn contents() -> Vec<Vec<u8>> {
        let mut mixed = text(3, 50_000);
        mixed.extend(noise(4, 20_000));
        mixed.extend(vec![0u8; 70_000]);
        mixed.extend(text(3, 50_000));
        vec![
            Vec::new(),
            b"a".to_vec(),
            b"abcabcabcabcabcabc".to_vec(),
            text(1, 200_000),
            noise(2, 100_000),
            vec![b'x'; 100_000],
            mixed,
        ]
    }

    /// Inflates `stream` followed by garbage and checks the content, the tokens and the length
    /// of the stream; and that a limit one byte short fails.
    fn check(stream: &[u8], data: &[u8]) {
        let mut input = stream.to_vec();
        input.extend_from_slice(b"\xff\x00garbage");
        let (content, tokens, used) =
            inflate_tokens(&input, data.len() as u64).expect("a valid stream");
        assert_eq!(content, data);
        assert_eq!(used, stream.len());
        let mut pos = 0usize;
        for token in &tokens {
            assert_eq!(token.pos as usize, pos);
            let len = usize::from(token.len);
            let dist = usize::from(token.dist);
            if dist == 0 {
                assert_eq!(len, 1);
            } else {
                assert!((3..=258).contains(&len) && dist <= 32768 && dist <= pos);
                for k in pos..pos + len {
                    assert_eq!(content[k], content[k - dist]);
                }
            }
            pos += len;
        }
        assert_eq!(pos, data.len());
        if !data.is_empty() {
            assert!(inflate_tokens(&input, data.len() as u64 - 1).is_none());
        }
    }

    #[test]
    fn flate2_streams_round_trip() {
        for data in contents() {
            for level in [0, 1, 6, 9] {
                check(&flate2(&data, level), &data);
            }
        }
    }

    /// A stream with more tokens than allowed is refused, whether its last ones are literals,
    /// matches or stored bytes.
    #[test]
    fn tokens_beyond_the_bound_are_refused() {
        let text: Vec<u8> = (0..20_000u32)
            .flat_map(|i| format!("line {} ", i % 977).into_bytes())
            .collect();
        let mut stored =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::none());
        std::io::Write::write_all(&mut stored, &text[..5000]).expect("write");
        let stored = stored.finish().expect("finish");
        for stream in [
            super::super::deflate::deflate(&text, 9).expect("level"),
            stored,
        ] {
            let (_, tokens, _) = inflate_tokens(&stream, u64::MAX).expect("valid");
            let n = tokens.len();
            assert!(inflate_tokens_at_most(&stream, u64::MAX, n).is_some());
            assert!(inflate_tokens_at_most(&stream, u64::MAX, n - 1).is_none());
        }
    }

    #[test]
    fn gzip_streams_round_trip() {
        for data in contents() {
            for level in super::super::deflate::LEVELS {
                let stream = super::super::deflate::deflate(&data, level).expect("a gzip level");
                check(&stream, &data);
            }
        }
    }

    #[test]
    fn truncated_streams_fail() {
        let data = text(5, 20_000);
        for stream in [flate2(&data, 9), flate2(&data, 0)] {
            for end in 0..stream.len() {
                assert!(
                    inflate_tokens(&stream[..end], u64::MAX).is_none(),
                    "{end} bytes"
                );
            }
        }
    }

    /// Bits written least significant first; Huffman codes most significant first.
    #[derive(Default)]
    struct Writer {
        bytes: Vec<u8>,
        acc: u64,
        count: u32,
    }

    impl Writer {
        fn put(&mut self, value: u32, bits: u32) -> &mut Self {
            self.acc |= u64::from(value) << self.count;
            self.count += bits;
            while self.count >= 8 {
                self.bytes.push(self.acc as u8);
                self.acc >>= 8;
                self.count -= 8;
            }
            self
        }

        fn code(&mut self, (code, len): (u32, u32)) -> &mut Self {
            self.put(code.reverse_bits() >> (32 - len), len)
        }

        /// The bytes, followed by zero bytes so that no stream here fails for being short.
        fn padded(&mut self) -> Vec<u8> {
            self.put(0, 32).put(0, 32);
            self.finish()
        }

        fn finish(&mut self) -> Vec<u8> {
            if self.count > 0 {
                self.bytes.push(self.acc as u8);
            }
            std::mem::take(&mut self.bytes)
        }
    }

    /// Huffman codes by symbol: (code, length).
    type Codes = Vec<(u32, u32)>;

    /// The canonical codes of these code lengths.
    fn canonical(lengths: &[u8]) -> Codes {
        let mut counts = [0u32; 16];
        for &len in lengths {
            counts[usize::from(len)] += 1;
        }
        counts[0] = 0;
        let mut next = [0u32; 16];
        for len in 1..16 {
            next[len] = (next[len - 1] + counts[len - 1]) << 1;
        }
        lengths
            .iter()
            .map(|&len| {
                let len = usize::from(len);
                let code = next[len];
                next[len] += 1;
                (code, len as u32)
            })
            .collect()
    }

    /// A final dynamic block's header: the code length code has a 4-bit code for each length
    /// 0 to 15 and no repeat codes. Returns the literal/length and distance codes.
    fn dynamic(w: &mut Writer, lit: &[u8], dist: &[u8]) -> (Codes, Codes) {
        w.put(1, 1).put(2, 2);
        w.put(lit.len() as u32 - 257, 5)
            .put(dist.len() as u32 - 1, 5)
            .put(15, 4);
        let mut cl = [4u8; 19];
        cl[16..].fill(0);
        for symbol in CODE_LENGTH_ORDER {
            w.put(u32::from(cl[symbol]), 3);
        }
        let cl = canonical(&cl);
        for &len in lit.iter().chain(dist) {
            w.code(cl[usize::from(len)]);
        }
        (canonical(lit), canonical(dist))
    }

    fn fixed_lit(symbol: usize) -> (u32, u32) {
        let mut lengths = [8u8; 288];
        lengths[144..256].fill(9);
        lengths[256..280].fill(7);
        canonical(&lengths)[symbol]
    }

    #[test]
    fn hand_made_streams_decode() {
        // Stored, fixed: "hello" and 'a' with a match of 3 at distance 1.
        let stored = [0x01, 0x05, 0x00, 0xfa, 0xff, b'h', b'e', b'l', b'l', b'o'];
        let (content, tokens, used) = inflate_tokens(&stored, 5).expect("stored");
        assert_eq!((&content[..], tokens.len(), used), (&b"hello"[..], 5, 10));
        let mut w = Writer::default();
        w.put(1, 1)
            .put(1, 2)
            .code(fixed_lit(97))
            .code(fixed_lit(257))
            .code((0, 5))
            .code(fixed_lit(256));
        let (content, tokens, _) = inflate_tokens(&w.finish(), 10).expect("fixed");
        assert_eq!(content, b"aaaa");
        let literal = Token {
            pos: 0,
            len: 1,
            dist: 0,
        };
        let matched = Token {
            pos: 1,
            len: 3,
            dist: 1,
        };
        assert_eq!(tokens, [literal, matched]);
        // Dynamic: literal 0 and end of block, one bit each; no distance code.
        let mut lit = [0u8; 257];
        lit[0] = 1;
        lit[256] = 1;
        let mut w = Writer::default();
        let (codes, _) = dynamic(&mut w, &lit, &[0]);
        w.code(codes[0]).code(codes[256]);
        let (content, _, _) = inflate_tokens(&w.finish(), 10).expect("dynamic");
        assert_eq!(content, [0]);
    }

    #[test]
    fn invalid_streams_fail() {
        // Block type 3.
        assert!(inflate_tokens(&[0x07, 0, 0, 0], 100).is_none());
        // Stored block whose NLEN is not the complement of LEN.
        assert!(inflate_tokens(&[0x01, 0x05, 0x00, 0xfb, 0xff, 1, 2, 3, 4, 5], 100).is_none());
        // A distance of 2 after one byte.
        let mut w = Writer::default();
        w.put(1, 1)
            .put(1, 2)
            .code(fixed_lit(97))
            .code(fixed_lit(257))
            .code((1, 5))
            .code(fixed_lit(256));
        assert!(inflate_tokens(&w.padded(), 100).is_none());
        // Length symbol 286 and distance code 30 of the fixed code.
        let mut w = Writer::default();
        w.put(1, 1)
            .put(1, 2)
            .code(fixed_lit(286))
            .code(fixed_lit(256));
        assert!(inflate_tokens(&w.padded(), 100).is_none());
        let mut w = Writer::default();
        w.put(1, 1)
            .put(1, 2)
            .code(fixed_lit(97))
            .code(fixed_lit(257))
            .code((30, 5))
            .code(fixed_lit(256));
        assert!(inflate_tokens(&w.padded(), 100).is_none());
        // Over-subscribed literal/length code: three codes of one bit.
        let mut lit = [0u8; 257];
        lit[0] = 1;
        lit[1] = 1;
        lit[256] = 1;
        let mut w = Writer::default();
        dynamic(&mut w, &lit, &[0]);
        assert!(inflate_tokens(&w.padded(), 100).is_none());
        // Over-subscribed code length code: 19 codes of one bit.
        let mut w = Writer::default();
        w.put(1, 1).put(2, 2).put(0, 5).put(0, 5).put(15, 4);
        for _ in 0..19 {
            w.put(1, 3);
        }
        assert!(inflate_tokens(&w.padded(), 100).is_none());
        // Repeat code 16 with no previous length: code lengths 0 and 16, one bit each.
        let mut w = Writer::default();
        w.put(1, 1).put(2, 2).put(0, 5).put(0, 5).put(0, 4);
        w.put(1, 3).put(0, 3).put(0, 3).put(1, 3).put(1, 1);
        assert!(inflate_tokens(&w.padded(), 100).is_none());
        // 287 literal/length codes.
        let mut w = Writer::default();
        w.put(1, 1)
            .put(2, 2)
            .put(30, 5)
            .put(0, 5)
            .put(15, 4)
            .put(0, 32);
        assert!(inflate_tokens(&w.padded(), 100).is_none());
    }

    #[test]
    fn incomplete_codes_follow_zlib() {
        // A single one-bit literal/length code (end of block only) is allowed.
        let mut lit = [0u8; 257];
        lit[256] = 1;
        let mut w = Writer::default();
        let (codes, _) = dynamic(&mut w, &lit, &[0]);
        w.code(codes[256]);
        assert_eq!(
            inflate_tokens(&w.finish(), 10).map(|r| r.0),
            Some(Vec::new())
        );
        // So is a single one-bit distance code, but not the unused bit pattern.
        let mut lit = [0u8; 258];
        lit[b'a' as usize] = 1;
        lit[256] = 2;
        lit[257] = 2;
        for (dist_code, expect) in [(0, Some(b"aaaa".to_vec())), (1, None)] {
            let mut w = Writer::default();
            let (codes, dists) = dynamic(&mut w, &lit, &[1]);
            w.code(codes[97])
                .code(codes[257])
                .code((dist_code, dists[0].1))
                .code(codes[256]);
            assert_eq!(inflate_tokens(&w.finish(), 10).map(|r| r.0), expect);
        }
        // Two codes of one and two bits are incomplete.
        let mut lit = [0u8; 257];
        lit[0] = 1;
        lit[256] = 2;
        let mut w = Writer::default();
        let (codes, _) = dynamic(&mut w, &lit, &[0]);
        w.code(codes[0]).code(codes[256]);
        assert!(inflate_tokens(&w.finish(), 10).is_none());
    }

    proptest! {
        #[test]
        fn arbitrary_input_is_safe(
            input in proptest::collection::vec(any::<u8>(), 0..2000),
            limit in 0u64..5000,
        ) {
            if let Some((content, tokens, used)) = inflate_tokens(&input, limit) {
                prop_assert!(content.len() as u64 <= limit);
                prop_assert!(tokens.len() <= content.len());
                prop_assert!(used <= input.len());
            }
        }

        #[test]
        fn flate2_streams_of_arbitrary_data_round_trip(
            data in proptest::collection::vec(0u8..8, 0..5000),
            level in 0u32..10,
        ) {
            check(&flate2(&data, level), &data);
        }
    }
}
