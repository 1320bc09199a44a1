//! A deflate compressor that makes, byte for byte, the stream GNU gzip writes at levels 4 to 9
//! (`gzip -9n` is how Debian compresses every changelog and manual page).
//!
//! Deflate leaves the compressor free to choose its matches and its blocks, so rebuilding a
//! compressed file from its content needs the very algorithm that wrote it. GNU gzip's is the
//! ancestor of zlib's lazy matcher (same hash, chains, configuration table and Huffman tree
//! construction) with three differences that matter for the output: a 32 Ki-symbol block buffer,
//! a 15-bit hash whatever the level, and a check every 4,096 symbols that ends a block early
//! when it compresses well. Levels 1 to 3 (gzip's separate fast matcher) are not supported.
//!
//! Only the bytes matter here, not speed: the encoder runs once per candidate file at build
//! time and once per file on apply, on files of at most a few MiB.

use super::inflate::Token;

/// Window size: matches reach back at most this far (less `MIN_LOOKAHEAD`).
const WSIZE: usize = 0x8000;
const WMASK: usize = WSIZE - 1;
/// Input is read into a window twice `WSIZE` and slid down by `WSIZE` when the upper half fills.
const WINDOW_SIZE: usize = 2 * WSIZE;
const MIN_MATCH: usize = 3;
const MAX_MATCH: usize = 258;
const MIN_LOOKAHEAD: usize = MAX_MATCH + MIN_MATCH + 1;
const MAX_DIST: usize = WSIZE - MIN_LOOKAHEAD;
const HASH_BITS: u32 = 15;
const HASH_SIZE: usize = 1 << HASH_BITS;
const HASH_MASK: usize = HASH_SIZE - 1;
const H_SHIFT: u32 = HASH_BITS.div_ceil(MIN_MATCH as u32);
/// A match of length 3 farther than this is not worth its distance code.
const TOO_FAR: usize = 4096;
/// A block ends when it holds this many symbols less one, or this many matches.
const LIT_BUFSIZE: usize = 0x8000;

const MAX_BITS: usize = 15;
const MAX_BL_BITS: usize = 7;
const LENGTH_CODES: usize = 29;
const LITERALS: usize = 256;
const END_BLOCK: usize = 256;
const L_CODES: usize = LITERALS + 1 + LENGTH_CODES;
const D_CODES: usize = 30;
const BL_CODES: usize = 19;
const HEAP_SIZE: usize = 2 * L_CODES + 1;
const REP_3_6: usize = 16;
const REPZ_3_10: usize = 17;
const REPZ_11_138: usize = 18;

const EXTRA_LBITS: [u8; LENGTH_CODES] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
const EXTRA_DBITS: [u8; D_CODES] = [
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13,
    13,
];
const EXTRA_BLBITS: [u8; BL_CODES] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 3, 7];
/// The order in which bit-length code lengths are sent (RFC 1951, 3.2.7).
const BL_ORDER: [usize; BL_CODES] = [
    16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
];

/// Matcher parameters of one level: a match this long shortens the chain search to a quarter
/// (`good`), is not looked past lazily (`lazy`), stops the search (`nice`); `chain` bounds it.
struct Config {
    good: usize,
    lazy: usize,
    nice: usize,
    chain: usize,
}

/// gzip's configuration table, levels 4 to 9 (good, lazy, nice, chain).
static CONFIGS: [Config; 6] = [
    config(4, 4, 16, 16),
    config(8, 16, 32, 32),
    config(8, 16, 128, 128),
    config(8, 32, 128, 256),
    config(32, 128, 258, 1024),
    config(32, 258, 258, 4096),
];

const fn config(good: usize, lazy: usize, nice: usize, chain: usize) -> Config {
    Config {
        good,
        lazy,
        nice,
        chain,
    }
}

/// Levels [`deflate_replaying`] supports.
pub const LEVELS: std::ops::RangeInclusive<u8> = 4..=9;

/// [`deflate_replaying`] without replay: GNU gzip's stream, searched in full.
#[cfg(test)]
pub fn deflate(data: &[u8], level: u8) -> Option<Vec<u8>> {
    deflate_replaying(data, level, None)
}

/// A piece of the new content that is a piece of the old one: `new[new_from..new_from + len]`
/// is `old[old_from..old_from + len]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub new_from: u64,
    pub old_from: u64,
    pub len: u64,
}

/// What [`deflate_replaying`] replays: the pieces of the new content that are the old one's,
/// in order and apart, and the tokens of the old content's stream.
#[derive(Debug, Clone, Copy)]
pub struct Replay<'a> {
    pub pieces: &'a [Piece],
    pub tokens: &'a [Token],
}

/// A token is replayed only this far (32 KiB) into its piece: gzip's choices at a position
/// depend on the 32 KiB before it (the matches it may take, the hash chains that find them)...
const REPLAY_FROM: u64 = WSIZE as u64;
/// ... and on the bytes after it, up to a match and a lazy match on (and the lookahead kept), so
/// a token replayed ends this far before its piece does.
const REPLAY_UNTIL: u64 = (2 * MAX_MATCH + MIN_LOOKAHEAD) as u64;

/// The raw deflate stream GNU gzip writes for `data` at `level` (4 to 9; `None` for another
/// level), taking the old stream's tokens over the pieces of `replay` instead of searching for
/// matches there. Tokens are taken from a position
/// - right after a match, where gzip's lazy matcher holds no pending match,
/// - at least [`REPLAY_FROM`] bytes into a piece,
/// - where the old stream has a token starting right after one of its own matches,
///
/// up to the last of the old tokens that is a match and ends at least [`REPLAY_UNTIL`] bytes
/// before the piece does. The hash chains take every position as they would, so that the
/// search resumes after as it would have. This is most of the cost of gzip -9 saved on a
/// changelog that gained a few entries.
///
/// What it writes is gzip's stream as long as the old stream was gzip's at the same level and
/// its choices did not depend on where its window started (a hash chain that met the window's
/// first position, which gzip takes as the chain's end); the encoder checks that it is.
/// Pieces and tokens that do not fit the content (a hostile payload) give `None`.
pub fn deflate_replaying(data: &[u8], level: u8, replay: Option<Replay<'_>>) -> Option<Vec<u8>> {
    if !LEVELS.contains(&level) {
        return None;
    }
    let config = &CONFIGS[usize::from(level - 4)];
    let mut d = Deflater::new(data, config);
    let mut replay = match replay {
        Some(replay) => Some(Replayer::new(replay, data.len() as u64)?),
        None => None,
    };
    d.run(replay.as_mut())?;
    Some(d.out.finish())
}

/// Where [`deflate_replaying`] stands in its pieces.
struct Replayer<'a> {
    replay: Replay<'a>,
    /// The first piece that does not end before the current position.
    piece: usize,
}

impl<'a> Replayer<'a> {
    /// `None` when the pieces are not in order, overlap or run past the new content's end.
    fn new(replay: Replay<'a>, new_len: u64) -> Option<Self> {
        let mut end = 0u64;
        for piece in replay.pieces {
            let piece_end = piece.new_from.checked_add(piece.len)?;
            piece.old_from.checked_add(piece.len)?;
            if piece.new_from < end || piece_end > new_len {
                return None;
            }
            end = piece_end;
        }
        Some(Replayer { replay, piece: 0 })
    }

    /// The old tokens to replay from new position `at`, where gzip holds no pending match, and
    /// the offset that takes their positions to the new content's; `None` where there are none.
    fn at(&mut self, at: u64) -> Option<(&'a [Token], i64)> {
        let pieces = self.replay.pieces;
        while pieces
            .get(self.piece)
            .is_some_and(|p| p.new_from + p.len <= at)
        {
            self.piece += 1;
        }
        let piece = pieces.get(self.piece)?;
        let zone_end = (piece.new_from + piece.len).checked_sub(REPLAY_UNTIL)?;
        if at < piece.new_from + REPLAY_FROM || at >= zone_end {
            return None;
        }
        let old_at = at - piece.new_from + piece.old_from;
        let tokens = self.replay.tokens;
        let first = tokens.partition_point(|t| u64::from(t.pos) < old_at);
        // The old stream must be where this one is: a token starting there, right after a match.
        if tokens.get(first).is_none_or(|t| u64::from(t.pos) != old_at)
            || first
                .checked_sub(1)
                .is_some_and(|before| tokens[before].dist == 0)
        {
            return None;
        }
        let old_end = zone_end - piece.new_from + piece.old_from;
        let fits = tokens[first..]
            .iter()
            .take_while(|t| u64::from(t.pos) + u64::from(t.len) <= old_end)
            .count();
        let last_match = tokens[first..first + fits]
            .iter()
            .rposition(|t| t.dist != 0)?;
        let offset = piece.new_from as i64 - piece.old_from as i64;
        Some((&tokens[first..=first + last_match], offset))
    }
}

/// Static tables of the format, computed once per stream (they are small).
struct Tables {
    length_code: [u8; MAX_MATCH - MIN_MATCH + 1],
    dist_code: [u8; 512],
    base_length: [u16; LENGTH_CODES],
    base_dist: [u16; D_CODES],
    static_ltree: [Code; L_CODES + 2],
    static_dtree: [Code; D_CODES],
}

#[derive(Clone, Copy, Default)]
struct Code {
    code: u16,
    len: u16,
}

impl Tables {
    fn new() -> Tables {
        let mut t = Tables {
            length_code: [0; MAX_MATCH - MIN_MATCH + 1],
            dist_code: [0; 512],
            base_length: [0; LENGTH_CODES],
            base_dist: [0; D_CODES],
            static_ltree: [Code::default(); L_CODES + 2],
            static_dtree: [Code::default(); D_CODES],
        };
        let mut length = 0usize;
        for (code, extra) in EXTRA_LBITS.iter().enumerate().take(LENGTH_CODES - 1) {
            t.base_length[code] = length as u16;
            for _ in 0..1 << extra {
                t.length_code[length] = code as u8;
                length += 1;
            }
        }
        // Length 258 has its own code, overriding the last one of code 27's range.
        t.length_code[length - 1] = (LENGTH_CODES - 1) as u8;
        let mut dist = 0usize;
        for (code, extra) in EXTRA_DBITS.iter().enumerate().take(16) {
            t.base_dist[code] = dist as u16;
            for _ in 0..1 << extra {
                t.dist_code[dist] = code as u8;
                dist += 1;
            }
        }
        dist >>= 7;
        // Distances beyond 256 are looked up by their value divided by 128.
        for (code, extra) in EXTRA_DBITS.iter().enumerate().skip(16) {
            t.base_dist[code] = (dist << 7) as u16;
            for _ in 0..1 << (extra - 7) {
                t.dist_code[256 + dist] = code as u8;
                dist += 1;
            }
        }
        let mut bl_count = [0u16; MAX_BITS + 1];
        for (n, c) in t.static_ltree.iter_mut().enumerate() {
            c.len = match n {
                0..=143 => 8,
                144..=255 => 9,
                256..=279 => 7,
                _ => 8,
            };
            bl_count[usize::from(c.len)] += 1;
        }
        let lens: Vec<u16> = t.static_ltree.iter().map(|c| c.len).collect();
        for (c, code) in t.static_ltree.iter_mut().zip(gen_codes(&lens, &bl_count)) {
            c.code = code;
        }
        for (n, c) in t.static_dtree.iter_mut().enumerate() {
            *c = Code {
                code: reverse_bits(n as u16, 5),
                len: 5,
            };
        }
        t
    }

    fn d_code(&self, dist: usize) -> usize {
        usize::from(if dist < 256 {
            self.dist_code[dist]
        } else {
            self.dist_code[256 + (dist >> 7)]
        })
    }
}

/// The codes of a tree from its code lengths (RFC 1951, 3.2.2), bit-reversed for sending.
fn gen_codes(lens: &[u16], bl_count: &[u16; MAX_BITS + 1]) -> Vec<u16> {
    let mut next_code = [0u16; MAX_BITS + 1];
    let mut code = 0u16;
    for bits in 1..=MAX_BITS {
        code = code.wrapping_add(bl_count[bits - 1]) << 1;
        next_code[bits] = code;
    }
    lens.iter()
        .map(|&len| {
            if len == 0 {
                return 0;
            }
            let c = next_code[usize::from(len)];
            next_code[usize::from(len)] = c.wrapping_add(1);
            reverse_bits(c, u32::from(len))
        })
        .collect()
}

fn reverse_bits(code: u16, len: u32) -> u16 {
    code.reverse_bits() >> (16 - len)
}

/// One tree being built: frequencies, lengths, parents and depths of leaves and inner nodes.
struct Tree {
    freq: Vec<u32>,
    len: Vec<u16>,
    dad: Vec<u16>,
    code: Vec<u16>,
    /// Number of leaves (symbols of the alphabet).
    elems: usize,
    /// Largest leaf with a non-zero frequency (after `build`).
    max_code: usize,
    max_length: usize,
    extra: &'static [u8],
    extra_base: usize,
}

impl Tree {
    fn new(
        elems: usize,
        nodes: usize,
        max_length: usize,
        extra: &'static [u8],
        base: usize,
    ) -> Tree {
        Tree {
            freq: vec![0; nodes],
            len: vec![0; nodes],
            dad: vec![0; nodes],
            code: vec![0; nodes],
            elems,
            max_code: 0,
            max_length,
            extra,
            extra_base: base,
        }
    }

    fn reset(&mut self) {
        self.freq[..self.elems].fill(0);
    }
}

/// The heap and counters shared by the three trees of a block.
struct Builder {
    heap: [usize; HEAP_SIZE],
    heap_len: usize,
    heap_max: usize,
    depth: [u8; HEAP_SIZE],
    bl_count: [u16; MAX_BITS + 1],
    /// Bit length of the block with the dynamic trees and with the static ones (wrapping, as a
    /// fake leaf is subtracted before it is counted).
    opt_len: u64,
    static_len: u64,
}

impl Builder {
    fn smaller(&self, tree: &Tree, n: usize, m: usize) -> bool {
        tree.freq[n] < tree.freq[m]
            || (tree.freq[n] == tree.freq[m] && self.depth[n] <= self.depth[m])
    }

    fn pq_down(&mut self, tree: &Tree, mut k: usize) {
        let v = self.heap[k];
        let mut j = k << 1;
        while j <= self.heap_len {
            if j < self.heap_len && self.smaller(tree, self.heap[j + 1], self.heap[j]) {
                j += 1;
            }
            if self.smaller(tree, v, self.heap[j]) {
                break;
            }
            self.heap[k] = self.heap[j];
            k = j;
            j <<= 1;
        }
        self.heap[k] = v;
    }

    /// Build the Huffman tree of `tree`'s frequencies, limit its lengths and assign codes;
    /// adds the block's length with this tree (and with `stree`) to the running totals.
    fn build(&mut self, tree: &mut Tree, stree: Option<&[Code]>) {
        let elems = tree.elems;
        let mut max_code: isize = -1;
        self.heap_len = 0;
        self.heap_max = HEAP_SIZE;
        for n in 0..elems {
            if tree.freq[n] != 0 {
                self.heap_len += 1;
                self.heap[self.heap_len] = n;
                max_code = n as isize;
                self.depth[n] = 0;
            } else {
                tree.len[n] = 0;
            }
        }
        // At least two codes, so that the tree is a tree: add fake leaves of frequency 1.
        while self.heap_len < 2 {
            let new = if max_code < 2 {
                max_code += 1;
                max_code as usize
            } else {
                0
            };
            self.heap_len += 1;
            self.heap[self.heap_len] = new;
            tree.freq[new] = 1;
            self.depth[new] = 0;
            self.opt_len = self.opt_len.wrapping_sub(1);
            if let Some(stree) = stree {
                self.static_len = self.static_len.wrapping_sub(u64::from(stree[new].len));
            }
        }
        tree.max_code = max_code as usize;
        for n in (1..=self.heap_len / 2).rev() {
            self.pq_down(tree, n);
        }
        let mut node = elems;
        loop {
            let n = self.heap[1];
            self.heap[1] = self.heap[self.heap_len];
            self.heap_len -= 1;
            self.pq_down(tree, 1);
            let m = self.heap[1];
            self.heap_max -= 1;
            self.heap[self.heap_max] = n;
            self.heap_max -= 1;
            self.heap[self.heap_max] = m;
            tree.freq[node] = tree.freq[n] + tree.freq[m];
            self.depth[node] = self.depth[n].max(self.depth[m]) + 1;
            tree.dad[n] = node as u16;
            tree.dad[m] = node as u16;
            self.heap[1] = node;
            node += 1;
            self.pq_down(tree, 1);
            if self.heap_len < 2 {
                break;
            }
        }
        self.heap_max -= 1;
        self.heap[self.heap_max] = self.heap[1];
        self.gen_bitlen(tree, stree);
        let lens = &tree.len[..=tree.max_code];
        let codes = gen_codes(lens, &self.bl_count);
        tree.code[..codes.len()].copy_from_slice(&codes);
    }

    /// Code lengths from the tree, at most `max_length` bits: overlong leaves are moved up
    /// the way zlib and gzip do it, so that the lengths (and the stream) are theirs.
    fn gen_bitlen(&mut self, tree: &mut Tree, stree: Option<&[Code]>) {
        self.bl_count = [0; MAX_BITS + 1];
        tree.len[self.heap[self.heap_max]] = 0;
        let mut overflow = 0i32;
        let mut h = self.heap_max + 1;
        while h < HEAP_SIZE {
            let n = self.heap[h];
            let mut bits = usize::from(tree.len[usize::from(tree.dad[n])]) + 1;
            if bits > tree.max_length {
                bits = tree.max_length;
                overflow += 1;
            }
            tree.len[n] = bits as u16;
            h += 1;
            if n > tree.max_code {
                continue;
            }
            self.bl_count[bits] += 1;
            let xbits = if n >= tree.extra_base {
                u64::from(tree.extra[n - tree.extra_base])
            } else {
                0
            };
            let f = u64::from(tree.freq[n]);
            self.opt_len = self.opt_len.wrapping_add(f * (bits as u64 + xbits));
            if let Some(stree) = stree {
                self.static_len = self
                    .static_len
                    .wrapping_add(f * (u64::from(stree[n].len) + xbits));
            }
        }
        if overflow == 0 {
            return;
        }
        let max_length = tree.max_length;
        loop {
            let mut bits = max_length - 1;
            while self.bl_count[bits] == 0 {
                bits -= 1;
            }
            self.bl_count[bits] -= 1;
            self.bl_count[bits + 1] += 2;
            self.bl_count[max_length] -= 1;
            overflow -= 2;
            if overflow <= 0 {
                break;
            }
        }
        let mut h = HEAP_SIZE;
        for bits in (1..=max_length).rev() {
            let mut n = self.bl_count[bits];
            while n != 0 {
                h -= 1;
                let m = self.heap[h];
                if m > tree.max_code {
                    continue;
                }
                if usize::from(tree.len[m]) != bits {
                    let delta = (bits as i64 - i64::from(tree.len[m])) * i64::from(tree.freq[m]);
                    self.opt_len = self.opt_len.wrapping_add(delta as u64);
                    tree.len[m] = bits as u16;
                }
                n -= 1;
            }
        }
    }
}

/// LSB-first bit writer (RFC 1951, 3.1.1).
struct Bits {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl Bits {
    fn send(&mut self, value: u16, len: u16) {
        self.acc |= u64::from(value) << self.n;
        self.n += u32::from(len);
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    fn send_code(&mut self, c: Code) {
        self.send(c.code, c.len);
    }

    /// Pad to a byte boundary with zero bits.
    fn windup(&mut self) {
        if self.n > 0 {
            self.out.push(self.acc as u8);
        }
        self.acc = 0;
        self.n = 0;
    }

    fn finish(mut self) -> Vec<u8> {
        self.windup();
        self.out
    }
}

/// One symbol of a block: a literal byte (`dist == 0`) or a match of `lc + 3` bytes at
/// distance `dist`.
#[derive(Clone, Copy)]
struct Symbol {
    dist: u16,
    lc: u8,
}

struct Deflater<'a> {
    input: &'a [u8],
    read: usize,
    eofile: bool,
    window: Vec<u8>,
    head: Vec<u16>,
    prev: Vec<u16>,
    ins_h: usize,
    strstart: usize,
    lookahead: usize,
    /// Start of the current block in the window; negative once it has slid out.
    block_start: isize,
    match_start: usize,
    prev_length: usize,
    config: &'a Config,
    tables: Tables,
    symbols: Vec<Symbol>,
    matches: usize,
    ltree: Tree,
    dtree: Tree,
    bltree: Tree,
    builder: Builder,
    out: Bits,
    /// How many bytes of the input have slid out of the window.
    slid: u64,
}

impl<'a> Deflater<'a> {
    fn new(input: &'a [u8], config: &'a Config) -> Deflater<'a> {
        let mut d = Deflater {
            input,
            read: 0,
            eofile: false,
            // Room past the end for the comparisons that run over the last match.
            window: vec![0; WINDOW_SIZE + MAX_MATCH + MIN_MATCH],
            head: vec![0; HASH_SIZE],
            prev: vec![0; WSIZE],
            ins_h: 0,
            strstart: 0,
            lookahead: 0,
            block_start: 0,
            match_start: 0,
            prev_length: MIN_MATCH - 1,
            config,
            tables: Tables::new(),
            symbols: Vec::with_capacity(LIT_BUFSIZE),
            matches: 0,
            ltree: Tree::new(L_CODES, HEAP_SIZE, MAX_BITS, &EXTRA_LBITS, LITERALS + 1),
            dtree: Tree::new(D_CODES, 2 * D_CODES + 1, MAX_BITS, &EXTRA_DBITS, 0),
            bltree: Tree::new(BL_CODES, 2 * BL_CODES + 1, MAX_BL_BITS, &EXTRA_BLBITS, 0),
            builder: Builder {
                heap: [0; HEAP_SIZE],
                heap_len: 0,
                heap_max: 0,
                depth: [0; HEAP_SIZE],
                bl_count: [0; MAX_BITS + 1],
                opt_len: 0,
                static_len: 0,
            },
            out: Bits {
                out: Vec::with_capacity(input.len() / 3 + 64),
                acc: 0,
                n: 0,
            },
            slid: 0,
        };
        d.init_block();
        d
    }

    fn init_block(&mut self) {
        self.ltree.reset();
        self.dtree.reset();
        self.bltree.reset();
        self.ltree.freq[END_BLOCK] = 1;
        self.builder.opt_len = 0;
        self.builder.static_len = 0;
        self.symbols.clear();
        self.matches = 0;
    }

    /// Read more input into the window, sliding it down first when the upper half is full.
    fn fill_window(&mut self) {
        let mut more = WINDOW_SIZE - self.lookahead - self.strstart;
        if self.strstart >= WSIZE + MAX_DIST {
            self.window.copy_within(WSIZE..WINDOW_SIZE, 0);
            self.match_start = self.match_start.wrapping_sub(WSIZE);
            self.strstart -= WSIZE;
            self.slid += WSIZE as u64;
            self.block_start -= WSIZE as isize;
            for p in self.head.iter_mut().chain(self.prev.iter_mut()) {
                *p = if usize::from(*p) >= WSIZE {
                    *p - WSIZE as u16
                } else {
                    0
                };
            }
            more += WSIZE;
        }
        if self.eofile {
            return;
        }
        let n = more.min(self.input.len() - self.read);
        let at = self.strstart + self.lookahead;
        if n == 0 {
            self.eofile = true;
            self.window[at..at + MIN_MATCH - 1].fill(0);
        } else {
            self.window[at..at + n].copy_from_slice(&self.input[self.read..self.read + n]);
            self.read += n;
            self.lookahead += n;
        }
    }

    fn update_hash(&mut self, c: u8) {
        self.ins_h = ((self.ins_h << H_SHIFT) ^ usize::from(c)) & HASH_MASK;
    }

    /// Insert the string at `s` into the dictionary; returns the previous head of its chain.
    fn insert_string(&mut self, s: usize) -> usize {
        self.update_hash(self.window[s + MIN_MATCH - 1]);
        let head = self.head[self.ins_h];
        self.prev[s & WMASK] = head;
        self.head[self.ins_h] = s as u16;
        usize::from(head)
    }

    /// GNU gzip's `longest_match`: the longest match among the first `chain` candidates of the
    /// hash chain (the nearest of them on a tie), if longer than `prev_length`. Bytes are
    /// compared two and eight at a time; the window has room past its end for that.
    fn longest_match(&mut self, mut cur_match: usize) -> usize {
        let w = &self.window[..];
        let scan = self.strstart;
        let mut chain = self.config.chain;
        let mut best_len = self.prev_length;
        let limit = self.strstart.saturating_sub(MAX_DIST);
        if self.prev_length >= self.config.good {
            chain >>= 2;
        }
        let pair = |at: usize| u16::from_le_bytes([w[at], w[at + 1]]);
        let word = |at: usize| u64::from_le_bytes(w[at..at + 8].try_into().expect("8 bytes"));
        let scan_start = pair(scan);
        let mut scan_end = pair(scan + best_len - 1);
        loop {
            let m = cur_match;
            // The third byte is not compared: equal hashes and equal first two bytes imply it.
            if pair(m + best_len - 1) == scan_end && pair(m) == scan_start {
                let mut len = MIN_MATCH;
                while len < MAX_MATCH {
                    let differ = word(scan + len) ^ word(m + len);
                    if differ != 0 {
                        len += (differ.trailing_zeros() / 8) as usize;
                        break;
                    }
                    len += 8;
                }
                let len = len.min(MAX_MATCH);
                if len > best_len {
                    self.match_start = cur_match;
                    best_len = len;
                    if len >= self.config.nice {
                        break;
                    }
                    scan_end = pair(scan + best_len - 1);
                }
            }
            cur_match = usize::from(self.prev[cur_match & WMASK]);
            chain -= 1;
            if cur_match <= limit || chain == 0 {
                break;
            }
        }
        best_len
    }

    /// Record a literal (`dist == 0`) or a match; true when the block must end here.
    fn tally(&mut self, dist: usize, lc: usize) -> bool {
        self.symbols.push(Symbol {
            dist: dist as u16,
            lc: lc as u8,
        });
        if dist == 0 {
            self.ltree.freq[lc] += 1;
        } else {
            self.matches += 1;
            self.ltree.freq[usize::from(self.tables.length_code[lc]) + LITERALS + 1] += 1;
            self.dtree.freq[self.tables.d_code(dist - 1)] += 1;
        }
        let last_lit = self.symbols.len();
        if last_lit & 0xfff == 0 {
            // End the block early when it already compresses to less than half.
            let mut out_length = last_lit as u64 * 8;
            for (dcode, extra) in EXTRA_DBITS.iter().enumerate() {
                out_length += u64::from(self.dtree.freq[dcode]) * (5 + u64::from(*extra));
            }
            out_length >>= 3;
            let in_length = (self.strstart as isize - self.block_start) as u64;
            if self.matches < last_lit / 2 && out_length < in_length / 2 {
                return true;
            }
        }
        last_lit == LIT_BUFSIZE - 1 || self.matches == LIT_BUFSIZE
    }

    /// Keep at least [`MIN_LOOKAHEAD`] bytes ahead in the window, as gzip does after each step.
    fn fill(&mut self) {
        while self.lookahead < MIN_LOOKAHEAD && !self.eofile {
            self.fill_window();
        }
    }

    /// The steps gzip takes from a position where it holds no pending match, given the tokens
    /// they end in (see [`deflate_replaying`]): each position is inserted in the hash chains,
    /// each token tallied and the window filled at the same points, without the searches.
    /// `None` when a token does not start where the previous one ended or runs past the input,
    /// when a literal's length is not 1 or a match's not 3 to 258, when a distance is over
    /// 32 KiB, or when the tokens do not end with a match.
    fn replay(&mut self, tokens: &[Token], offset: i64) -> Option<()> {
        let mut fresh = true;
        for t in tokens {
            let at = u64::try_from(i64::from(t.pos).checked_add(offset)?).ok()?;
            let len = usize::from(t.len);
            let pending = usize::from(!fresh);
            if at != self.slid + (self.strstart - pending) as u64
                || len == 0
                || len > MAX_MATCH
                || len > self.lookahead + pending
            {
                return None;
            }
            if fresh {
                // The step that finds a match here and keeps it pending.
                self.insert_string(self.strstart);
                self.strstart += 1;
                self.lookahead -= 1;
                self.fill();
            }
            // The step that writes the token: a literal keeps the next position pending; a
            // match takes its positions and leaves nothing pending.
            self.insert_string(self.strstart);
            if t.dist == 0 {
                if len != 1 {
                    return None;
                }
                let flush = self.tally(0, usize::from(self.window[self.strstart - 1]));
                if flush {
                    self.flush_block(false);
                }
                self.strstart += 1;
                self.lookahead = self.lookahead.checked_sub(1)?;
                fresh = false;
            } else {
                if len < MIN_MATCH || usize::from(t.dist) > WSIZE {
                    return None;
                }
                let flush = self.tally(usize::from(t.dist), len - MIN_MATCH);
                self.lookahead = self.lookahead.checked_sub(len - 1)?;
                for _ in 0..len - 2 {
                    self.strstart += 1;
                    self.insert_string(self.strstart);
                }
                self.strstart += 1;
                if flush {
                    self.flush_block(false);
                }
                fresh = true;
            }
            self.fill();
        }
        // The tokens end with a match (see `Replayer::at`).
        fresh.then_some(())
    }

    fn run(&mut self, mut replay: Option<&mut Replayer<'_>>) -> Option<()> {
        let n = self.input.len().min(WINDOW_SIZE);
        self.window[..n].copy_from_slice(&self.input[..n]);
        self.read = n;
        self.lookahead = n;
        if n == 0 {
            self.eofile = true;
        } else {
            while self.lookahead < MIN_LOOKAHEAD && !self.eofile {
                self.fill_window();
            }
            self.update_hash(self.window[0]);
            self.update_hash(self.window[1]);
        }

        let mut match_available = false;
        let mut match_length = MIN_MATCH - 1;
        while self.lookahead != 0 {
            if !match_available {
                let at = self.slid + self.strstart as u64;
                if let Some((tokens, offset)) = replay.as_mut().and_then(|r| r.at(at)) {
                    self.replay(tokens, offset)?;
                    continue;
                }
            }
            let hash_head = self.insert_string(self.strstart);
            self.prev_length = match_length;
            let prev_match = self.match_start;
            match_length = MIN_MATCH - 1;
            if hash_head != 0
                && self.prev_length < self.config.lazy
                && self.strstart - hash_head <= MAX_DIST
                && self.strstart <= WINDOW_SIZE - MIN_LOOKAHEAD
            {
                match_length = self.longest_match(hash_head).min(self.lookahead);
                if match_length == MIN_MATCH
                    && self.strstart.wrapping_sub(self.match_start) > TOO_FAR
                {
                    match_length -= 1;
                }
            }
            if self.prev_length >= MIN_MATCH && match_length <= self.prev_length {
                let flush =
                    self.tally(self.strstart - 1 - prev_match, self.prev_length - MIN_MATCH);
                self.lookahead -= self.prev_length - 1;
                for _ in 0..self.prev_length - 2 {
                    self.strstart += 1;
                    self.insert_string(self.strstart);
                }
                match_available = false;
                match_length = MIN_MATCH - 1;
                self.strstart += 1;
                if flush {
                    self.flush_block(false);
                }
            } else if match_available {
                let flush = self.tally(0, usize::from(self.window[self.strstart - 1]));
                if flush {
                    self.flush_block(false);
                }
                self.strstart += 1;
                self.lookahead -= 1;
            } else {
                match_available = true;
                self.strstart += 1;
                self.lookahead -= 1;
            }
            while self.lookahead < MIN_LOOKAHEAD && !self.eofile {
                self.fill_window();
            }
        }
        if match_available {
            self.tally(0, usize::from(self.window[self.strstart - 1]));
        }
        self.flush_block(true);
        Some(())
    }

    /// Write the current block with whichever of stored, static or dynamic codes is shortest,
    /// then start a new block at `strstart`.
    fn flush_block(&mut self, eof: bool) {
        let b = &mut self.builder;
        b.build(&mut self.ltree, Some(&self.tables.static_ltree));
        b.build(&mut self.dtree, Some(&self.tables.static_dtree));
        let max_blindex = self.build_bl_tree();
        let b = &self.builder;
        let mut opt_lenb = b.opt_len.wrapping_add(3 + 7) >> 3;
        let static_lenb = b.static_len.wrapping_add(3 + 7) >> 3;
        let stored_len = (self.strstart as isize - self.block_start) as u64;
        if static_lenb <= opt_lenb {
            opt_lenb = static_lenb;
        }
        let eof_bit = u16::from(eof);
        if stored_len + 4 <= opt_lenb && self.block_start >= 0 {
            self.out.send(eof_bit, 3);
            self.out.windup();
            let len = stored_len as u16;
            self.out.out.extend_from_slice(&len.to_le_bytes());
            self.out.out.extend_from_slice(&(!len).to_le_bytes());
            let start = self.block_start as usize;
            self.out
                .out
                .extend_from_slice(&self.window[start..start + stored_len as usize]);
        } else if static_lenb == opt_lenb {
            self.out.send(2 | eof_bit, 3);
            let (l, d) = (self.tables.static_ltree, self.tables.static_dtree);
            self.compress_block(&l, &d);
        } else {
            self.out.send(4 | eof_bit, 3);
            self.send_all_trees(
                self.ltree.max_code + 1,
                self.dtree.max_code + 1,
                max_blindex + 1,
            );
            let l: Vec<Code> = code_table(&self.ltree);
            let d: Vec<Code> = code_table(&self.dtree);
            self.compress_block(&l, &d);
        }
        self.init_block();
        self.block_start = self.strstart as isize;
        if eof {
            self.out.windup();
        }
    }

    fn build_bl_tree(&mut self) -> usize {
        scan_tree(&mut self.bltree, &self.ltree);
        scan_tree(&mut self.bltree, &self.dtree);
        self.builder.build(&mut self.bltree, None);
        let mut max_blindex = BL_CODES - 1;
        while max_blindex >= 3 && self.bltree.len[BL_ORDER[max_blindex]] == 0 {
            max_blindex -= 1;
        }
        self.builder.opt_len = self
            .builder
            .opt_len
            .wrapping_add(3 * (max_blindex as u64 + 1) + 5 + 5 + 4);
        max_blindex
    }

    fn send_all_trees(&mut self, lcodes: usize, dcodes: usize, blcodes: usize) {
        self.out.send((lcodes - 257) as u16, 5);
        self.out.send((dcodes - 1) as u16, 5);
        self.out.send((blcodes - 4) as u16, 4);
        for &i in &BL_ORDER[..blcodes] {
            self.out.send(self.bltree.len[i], 3);
        }
        let bl = code_table(&self.bltree);
        send_tree(&mut self.out, &bl, &self.ltree, lcodes - 1);
        send_tree(&mut self.out, &bl, &self.dtree, dcodes - 1);
    }

    fn compress_block(&mut self, ltree: &[Code], dtree: &[Code]) {
        for s in &self.symbols {
            let lc = usize::from(s.lc);
            if s.dist == 0 {
                self.out.send_code(ltree[lc]);
                continue;
            }
            let code = usize::from(self.tables.length_code[lc]);
            self.out.send_code(ltree[code + LITERALS + 1]);
            let extra = EXTRA_LBITS[code];
            if extra != 0 {
                self.out
                    .send(lc as u16 - self.tables.base_length[code], u16::from(extra));
            }
            let dist = usize::from(s.dist) - 1;
            let code = self.tables.d_code(dist);
            self.out.send_code(dtree[code]);
            let extra = EXTRA_DBITS[code];
            if extra != 0 {
                self.out
                    .send(dist as u16 - self.tables.base_dist[code], u16::from(extra));
            }
        }
        self.out.send_code(ltree[END_BLOCK]);
    }
}

fn code_table(tree: &Tree) -> Vec<Code> {
    tree.code
        .iter()
        .zip(&tree.len)
        .map(|(&code, &len)| Code { code, len })
        .collect()
}

/// The run-length coded sequence of `tree`'s code lengths (RFC 1951, 3.2.7), as
/// (bit-length symbol, extra value, extra bits) in sending order.
fn length_runs(tree: &Tree, max_code: usize) -> Vec<(usize, u16, u16)> {
    let len_at = |n: usize| -> i32 {
        if n <= max_code {
            i32::from(tree.len[n])
        } else {
            // A guard that never equals a real length.
            0xffff
        }
    };
    let mut runs = Vec::new();
    let mut prevlen = -1i32;
    let mut nextlen = len_at(0);
    let mut count = 0usize;
    let (mut max_count, mut min_count) = if nextlen == 0 { (138, 3) } else { (7, 4) };
    for n in 0..=max_code {
        let curlen = nextlen;
        nextlen = len_at(n + 1);
        count += 1;
        if count < max_count && curlen == nextlen {
            continue;
        } else if count < min_count {
            for _ in 0..count {
                runs.push((curlen as usize, 0, 0));
            }
        } else if curlen != 0 {
            if curlen != prevlen {
                runs.push((curlen as usize, 0, 0));
                count -= 1;
            }
            runs.push((REP_3_6, (count - 3) as u16, 2));
        } else if count <= 10 {
            runs.push((REPZ_3_10, (count - 3) as u16, 3));
        } else {
            runs.push((REPZ_11_138, (count - 11) as u16, 7));
        }
        count = 0;
        prevlen = curlen;
        (max_count, min_count) = if nextlen == 0 {
            (138, 3)
        } else if curlen == nextlen {
            (6, 3)
        } else {
            (7, 4)
        };
    }
    runs
}

/// Count the bit-length symbols that sending `tree`'s lengths takes.
fn scan_tree(bltree: &mut Tree, tree: &Tree) {
    for (symbol, _, _) in length_runs(tree, tree.max_code) {
        bltree.freq[symbol] += 1;
    }
}

fn send_tree(out: &mut Bits, bl: &[Code], tree: &Tree, max_code: usize) {
    for (symbol, extra, bits) in length_runs(tree, max_code) {
        out.send_code(bl[symbol]);
        if bits != 0 {
            out.send(extra, bits);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn inflate(stream: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::DeflateDecoder::new(stream)
            .read_to_end(&mut out)
            .expect("a valid deflate stream");
        out
    }

    /// Text like a changelog's: entries of a few lines, each with its own numbers.
    fn entries(seed: u64, count: usize) -> Vec<u8> {
        let words = [
            "fix", "bounds", "check", "parser", "CVE", "the", "in", "of", "buffer",
        ];
        let mut state = seed;
        let mut next = |n: u64| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) % n
        };
        let mut out = Vec::new();
        for _ in 0..count {
            out.extend_from_slice(
                format!("pkg (3.0.{}) stable; urgency=medium\n\n", next(99)).as_bytes(),
            );
            for _ in 0..1 + next(4) {
                out.extend_from_slice(b"  *");
                for _ in 0..3 + next(9) {
                    out.push(b' ');
                    out.extend_from_slice(words[next(words.len() as u64) as usize].as_bytes());
                }
                out.extend_from_slice(format!(" {}\n", next(100_000)).as_bytes());
            }
            out.extend_from_slice(b"\n -- Maintainer <m@example.org>\n\n");
        }
        out
    }

    /// The stream of `new` replaying the tokens of `old`'s stream at `level` over `pieces`.
    fn replayed(old: &[u8], new: &[u8], level: u8, pieces: &[Piece]) -> Option<Vec<u8>> {
        let old_stream = deflate(old, level).expect("level");
        let (raw, tokens, _) =
            super::super::inflate::inflate_tokens(&old_stream, old.len() as u64).expect("inflates");
        assert_eq!(raw, old);
        let replay = Replay {
            pieces,
            tokens: &tokens,
        };
        deflate_replaying(new, level, Some(replay))
    }

    /// Replaying the old stream's tokens over content the two files share gives gzip's stream,
    /// byte for byte, at every level, wherever the new content differs: entries added at the
    /// top, in the middle and at the end, a line changed.
    #[test]
    fn replayed_streams_are_gzips() {
        let old = entries(1, 3000);
        let top = entries(2, 40);
        let piece = |new_from: usize, old_from: usize, len: usize| Piece {
            new_from: new_from as u64,
            old_from: old_from as u64,
            len: len as u64,
        };
        let mut edits: Vec<(Vec<u8>, Vec<Piece>)> = Vec::new();
        edits.push((
            [&top[..], &old].concat(),
            vec![piece(top.len(), 0, old.len())],
        ));
        let mid = old.len() / 2;
        let middle = [&old[..mid], &top[..], &old[mid..]].concat();
        edits.push((
            middle,
            vec![
                piece(0, 0, mid),
                piece(mid + top.len(), mid, old.len() - mid),
            ],
        ));
        edits.push(([&old[..], &top].concat(), vec![piece(0, 0, old.len())]));
        let mut line = old.clone();
        line[mid] ^= 1;
        edits.push((
            line,
            vec![
                piece(0, 0, mid),
                piece(mid + 1, mid + 1, old.len() - mid - 1),
            ],
        ));
        for (new, pieces) in &edits {
            for level in LEVELS {
                let want = deflate(new, level).expect("level");
                let got = replayed(&old, new, level, pieces).expect("pieces fit");
                assert!(
                    got == want,
                    "level {level}: {} B against {} B",
                    got.len(),
                    want.len()
                );
            }
        }
    }

    /// Pieces that do not fit the content are refused; pieces that fit but name the wrong old
    /// bytes give a stream all the same (the encoder checks it, the apply checks the file).
    #[test]
    fn pieces_that_do_not_fit_are_refused() {
        let old = entries(3, 1000);
        let new = [&entries(4, 10)[..], &old].concat();
        let len = new.len() as u64;
        let piece = |new_from: u64, old_from: u64, len: u64| Piece {
            new_from,
            old_from,
            len,
        };
        for pieces in [
            vec![piece(0, 0, len + 1)],
            vec![piece(len, 0, 1)],
            vec![piece(u64::MAX, 0, 2)],
            vec![piece(0, u64::MAX, 2)],
            vec![piece(100, 0, 50_000), piece(120, 0, 50_000)],
        ] {
            assert_eq!(replayed(&old, &new, 9, &pieces), None, "{pieces:?}");
        }
        let shifted = vec![piece(0, 17, old.len() as u64 - 17)];
        let stream = replayed(&old, &new, 9, &shifted).expect("pieces fit");
        assert_ne!(stream, deflate(&new, 9).expect("level"));
    }

    #[test]
    fn streams_inflate_to_their_input() {
        let text: Vec<u8> = (0..200_000u32)
            .map(|i| b"the quick brown fox jumps over the lazy dog\n"[(i * 7 % 44) as usize])
            .collect();
        let mut state = 7u64;
        let noise: Vec<u8> = (0..100_000)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                (state >> 56) as u8
            })
            .collect();
        for data in [&b""[..], b"a", b"ab", b"abcabcabcabc", &text, &noise] {
            for level in LEVELS {
                let stream = deflate(data, level).expect("supported level");
                assert_eq!(
                    inflate(&stream),
                    data,
                    "level {level}, {} bytes",
                    data.len()
                );
            }
        }
        assert!(deflate(b"x", 3).is_none());
        assert!(deflate(b"x", 10).is_none());
    }
}

#[cfg(test)]
mod gnu_gzip {
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};

    /// The raw deflate stream `gzip -<level> -n` writes for `data` (the header is 10 bytes
    /// without a name, the trailer 8).
    fn gnu(data: &[u8], level: u8) -> Vec<u8> {
        let mut child = Command::new("gzip")
            .arg(format!("-{level}"))
            .args(["-n", "-c"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("gzip runs (.ci/run installs it)");
        let mut stdin = child.stdin.take().expect("stdin");
        let input = data.to_vec();
        let writer = std::thread::spawn(move || stdin.write_all(&input));
        let out = child.wait_with_output().expect("gzip output");
        writer.join().expect("writer").expect("write to gzip");
        assert!(out.status.success());
        out.stdout[10..out.stdout.len() - 8].to_vec()
    }

    fn lcg(seed: u64) -> impl FnMut() -> u64 {
        let mut state = seed;
        move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            state >> 33
        }
    }

    /// Inputs that reach every branch: empty and tiny, text with long and short repeats,
    /// incompressible bytes (stored blocks), long runs (258-byte matches), lengths around the
    /// window and buffer sizes, and a few MiB of mixed content (window slides, block splits).
    fn inputs() -> Vec<Vec<u8>> {
        let mut next = lcg(11);
        let words = [
            &b"the "[..],
            b"security ",
            b"fix ",
            b"for ",
            b"CVE-2026-",
            b"buffer ",
            b"overflow ",
            b"in ",
            b"WebKit ",
            b"\n",
            b"  * ",
            b"libxml2 ",
            b"(",
            b") ",
            b"urgency=high\n",
        ];
        let mut text = Vec::new();
        while text.len() < 3 << 20 {
            let w = words[(next() % words.len() as u64) as usize];
            text.extend_from_slice(w);
            if next().is_multiple_of(50) {
                text.extend_from_slice(format!("{}", next() % 100_000).as_bytes());
            }
        }
        let noise: Vec<u8> = (0..300_000).map(|_| next() as u8).collect();
        let mut mixed = Vec::new();
        for i in 0..40 {
            let start = (next() % (text.len() as u64 - 70_000)) as usize;
            mixed.extend_from_slice(&text[start..start + 1000 + (i * 1733) % 60_000]);
            mixed.extend_from_slice(&noise[..(next() % 5000) as usize]);
            mixed.extend(std::iter::repeat_n(b'z', (next() % 3000) as usize));
        }
        let mut out = vec![
            Vec::new(),
            b"a".to_vec(),
            b"ab".to_vec(),
            b"abc".to_vec(),
            b"abcabcabcabcabcabc".to_vec(),
            vec![0; 1_000_000],
            noise,
            mixed,
        ];
        for len in [
            WSIZE - 1,
            WSIZE,
            2 * WSIZE - 262,
            2 * WSIZE,
            2 * WSIZE + 1,
            200_001,
        ] {
            out.push(text[..len].to_vec());
        }
        out.push(text);
        out
    }

    #[test]
    fn every_supported_level_writes_what_gnu_gzip_writes() {
        for (i, data) in inputs().iter().enumerate() {
            for level in LEVELS {
                let ours = deflate(data, level).expect("supported level");
                let theirs = gnu(data, level);
                assert!(
                    ours == theirs,
                    "input {i} ({} bytes), level {level}: {} bytes vs gzip's {}, first difference at {:?}",
                    data.len(),
                    ours.len(),
                    theirs.len(),
                    ours.iter().zip(&theirs).position(|(a, b)| a != b)
                );
            }
        }
    }
}
