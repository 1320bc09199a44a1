//! Context-modelled coding of the diff stream: a binary range coder (LZMA's) whose models see
//! the old byte each diff byte is added to, which the decoder knows too. A diff stream is mostly
//! zeros with changed addresses in between; general-purpose compressors see neither the old
//! bytes nor that structure.
//!
//! Each diff byte is a zero flag and, when nonzero, eight value bits. Format 2 codes the flag
//! of every byte. Format 3 codes it only near changes: once a window of zeros ([`Flags::Near`])
//! follows a nonzero byte, the number of zeros up to the next nonzero byte is coded as one
//! number (a gap), and the decoder copies that many predicted bytes as they are. Coding and
//! decoding then cost about the changed bytes rather than the file: libcrypto 3.0.17 -> 3.0.20
//! codes 4.7 million flags in format 2 and 1.07 million in format 3, for 58 thousand changed
//! bytes. Format 5 halves the window ([`WINDOW`]).

use crate::{corrupt, DecodeError};

const PROB_BITS: u32 = 16;
const TOP: u32 = 1 << 24;

struct Encoder {
    low: u64,
    range: u32,
    cache: u8,
    cache_size: u64,
    out: Vec<u8>,
}

impl Encoder {
    fn new() -> Self {
        Encoder {
            low: 0,
            range: u32::MAX,
            cache: 0,
            cache_size: 1,
            out: Vec::new(),
        }
    }

    /// Code `bit`, whose probability of being 0 is `prob0` / 65536 (1..=65535).
    fn bit(&mut self, prob0: u16, bit: bool) {
        let bound = (self.range >> PROB_BITS) * u32::from(prob0);
        if bit {
            self.low += u64::from(bound);
            self.range -= bound;
        } else {
            self.range = bound;
        }
        while self.range < TOP {
            self.range <<= 8;
            self.shift_low();
        }
    }

    fn shift_low(&mut self) {
        if self.low < 0xff00_0000 || self.low > 0xffff_ffff {
            let carry = (self.low >> 32) as u8;
            let mut byte = self.cache;
            loop {
                self.out.push(byte.wrapping_add(carry));
                byte = 0xff;
                self.cache_size -= 1;
                if self.cache_size == 0 {
                    break;
                }
            }
            self.cache = (self.low >> 24) as u8;
        }
        self.cache_size += 1;
        self.low = (self.low & 0x00ff_ffff) << 8;
    }

    fn finish(mut self) -> Vec<u8> {
        for _ in 0..5 {
            self.shift_low();
        }
        self.out
    }
}

struct Decoder<'a> {
    input: &'a [u8],
    pos: usize,
    range: u32,
    code: u32,
    /// Bytes wanted past the end of the input (read as zeros).
    overrun: usize,
}

impl<'a> Decoder<'a> {
    fn new(input: &'a [u8]) -> Self {
        let mut decoder = Decoder {
            input,
            pos: 0,
            range: u32::MAX,
            code: 0,
            overrun: 0,
        };
        for _ in 0..5 {
            decoder.code = (decoder.code << 8) | u32::from(decoder.next_byte());
        }
        decoder
    }

    fn next_byte(&mut self) -> u8 {
        match self.input.get(self.pos) {
            Some(&byte) => {
                self.pos += 1;
                byte
            }
            None => {
                self.overrun += 1;
                0
            }
        }
    }

    #[inline(always)]
    fn bit(&mut self, prob0: u16) -> bool {
        let bound = (self.range >> PROB_BITS) * u32::from(prob0);
        let bit = if self.code < bound {
            self.range = bound;
            false
        } else {
            self.code -= bound;
            self.range -= bound;
            true
        };
        while self.range < TOP {
            self.range <<= 8;
            self.code = (self.code << 8) | u32::from(self.next_byte());
        }
        bit
    }
}

/// Logistic mixing (as in lpaq), in integers only so that every machine decodes alike.
const SQUASH_POINTS: [i32; 33] = [
    1, 2, 3, 6, 10, 16, 27, 45, 73, 120, 194, 310, 488, 747, 1101, 1546, 2047, 2549, 2994, 3348,
    3607, 3785, 3901, 3975, 4022, 4050, 4068, 4079, 4085, 4089, 4092, 4093, 4094,
];

/// 1 / (1 + e^-x), x in 1/256 units, result in 1/4096 units (through `Model::squashed`).
fn squash(x: i32) -> i32 {
    if x > 2047 {
        return 4095;
    }
    if x < -2047 {
        return 1;
    }
    let w = x & 127;
    let i = ((x >> 7) + 16) as usize;
    (SQUASH_POINTS[i] * (128 - w) + SQUASH_POINTS[i + 1] * w + 64) >> 7
}

fn stretch_table() -> Box<[i16; 4096]> {
    let mut table = Box::new([2047i16; 4096]);
    let mut next = 0usize;
    for x in -2047..=2047i32 {
        let v = squash(x) as usize;
        for slot in table.iter_mut().take(v + 1).skip(next) {
            *slot = x as i16;
        }
        next = next.max(v + 1);
    }
    table
}

/// Mixer inputs: three or four models' stretched probabilities and a bias. The zero flag's
/// fourth model comes after the bias, so that the value bits, which have three models, mix
/// the first [`VALUE_INPUTS`].
const INPUTS: usize = 5;
const VALUE_INPUTS: usize = 4;
const BIAS: usize = 3;
const ZERO_SETS: usize = 2;
const VALUE_SETS: usize = 256;
const HASH_BITS: u32 = 18;
const TABLE_HASHED: usize = 1 << HASH_BITS;
/// Weights are 16.16 fixed point; the bound keeps a hostile payload from overflowing them.
const MAX_WEIGHT: i32 = 1 << 22;

/// Adaptive probabilities (of a 1 bit, 16-bit precision) and mixer weights shared by encoder
/// and decoder.
struct Model {
    stretch: Box<[i16; 4096]>,
    /// `squash(x).clamp(1, 4095)` at `x + 2047`, for x in -2047..=2047.
    squashed: Box<[i16; 4096]>,
    /// Zero flag (1 = nonzero) by: run bucket, previous nonzero and old byte; hashed diff
    /// history; new position mod 8 and the last 8 flags; the old byte and the next one.
    zero_a: Table<8192>,
    zero_b: Table<{ TABLE_HASHED }>,
    zero_c: Table<2048>,
    zero_d: Table<65536>,
    /// Value bits by: previous diff byte; old byte; hashed diff history.
    value_a: Table<65536>,
    value_b: Table<65536>,
    value_c: Table<{ TABLE_HASHED }>,
    weights: Vec<i32>,
    history: u64,
    /// [`hash_state`] of the last two diff bytes, from which the hashed model of a byte's
    /// value bits starts; set at its first bit.
    value_hash: u64,
    flags: u8,
    zero_run: u64,
    long_ones: u64,
    long_total: u64,
    inputs: [i32; INPUTS],
    slots: [usize; INPUTS - 1],
    set: usize,
}

/// `N` probabilities (a power of two), each starting at one half; indexes wrap around (every
/// index the model makes is in range, and the wrap spares the bounds checks).
struct Table<const N: usize>(Box<[u16; N]>);

impl<const N: usize> Table<N> {
    fn new() -> Self {
        const { assert!(N.is_power_of_two()) };
        // Built on the heap: the largest tables would take 512 KiB of stack.
        let table = vec![1 << 15; N].into_boxed_slice();
        Table(table.try_into().expect("a slice of N"))
    }
}

impl<const N: usize> std::ops::Index<usize> for Table<N> {
    type Output = u16;

    #[inline(always)]
    fn index(&self, i: usize) -> &u16 {
        &self.0[i & (N - 1)]
    }
}

impl<const N: usize> std::ops::IndexMut<usize> for Table<N> {
    #[inline(always)]
    fn index_mut(&mut self, i: usize) -> &mut u16 {
        &mut self.0[i & (N - 1)]
    }
}

#[inline(always)]
fn hash(values: &[u64]) -> usize {
    hash_from(HASH_SEED, values)
}

const HASH_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// [`hash`] of values that follow those whose [`hash_state`] is `h`.
#[inline(always)]
fn hash_from(h: u64, values: &[u64]) -> usize {
    (hash_state(h, values) >> (64 - HASH_BITS)) as usize
}

#[inline(always)]
fn hash_state(mut h: u64, values: &[u64]) -> u64 {
    for &v in values {
        h = (h ^ v).wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 29;
    }
    h
}

impl Model {
    fn new() -> Self {
        Model {
            stretch: stretch_table(),
            squashed: Box::new(std::array::from_fn(|i| {
                squash(i as i32 - 2047).clamp(1, 4095) as i16
            })),
            zero_a: Table::new(),
            zero_b: Table::new(),
            zero_c: Table::new(),
            zero_d: Table::new(),
            value_a: Table::new(),
            value_b: Table::new(),
            value_c: Table::new(),
            weights: vec![1 << 14; (ZERO_SETS + VALUE_SETS) * INPUTS],
            history: 0,
            value_hash: 0,
            flags: 0,
            zero_run: 0,
            long_ones: 0,
            long_total: 0,
            inputs: [0; INPUTS],
            slots: [0; INPUTS - 1],
            set: 0,
        }
    }

    /// Mix the first `N` inputs; probability of a 1 bit in 1/4096.
    #[inline(always)]
    fn mix<const N: usize>(&self) -> i32 {
        let w = &self.weights[self.set * INPUTS..][..N];
        let dot: i64 = self.inputs[..N]
            .iter()
            .zip(w)
            .map(|(&x, &w)| i64::from(x) * i64::from(w))
            .sum();
        i32::from(self.squashed[((dot >> 16).clamp(-2047, 2047) + 2047) as usize])
    }

    #[inline(always)]
    fn learn<const N: usize>(&mut self, p: i32, bit: bool) {
        let err = (i32::from(bit) << 12) - p;
        let w = &mut self.weights[self.set * INPUTS..][..N];
        for (w, &x) in w.iter_mut().zip(&self.inputs[..N]) {
            *w = (*w + ((x * err) >> 9)).clamp(-MAX_WEIGHT, MAX_WEIGHT);
        }
    }

    /// Probability (1/65536) that the next diff byte is nonzero.
    #[inline(always)]
    fn zero_prob(&mut self, new_pos: u64, old: &[u8], k: usize) -> i32 {
        if self.zero_run >= LONG_RUN {
            let p = ((2 * self.long_ones + 1) << 16) / (2 * self.long_total + 2);
            return p.clamp(1, 65535) as i32;
        }
        let o = u64::from(old[k]);
        let next = old.get(k + 1).map_or(0, |&b| u64::from(b));
        let prev_nonzero = usize::from(self.history & 0xff != 0);
        let bucket = (64 - self.zero_run.leading_zeros() as usize).min(15);
        self.slots = [
            (bucket * 2 + prev_nonzero) * 256 + o as usize,
            hash(&[self.history & 0xff_ffff, 1]),
            ((new_pos & 7) as usize) * 256 + usize::from(self.flags),
            (o as usize) << 8 | next as usize,
        ];
        self.set = prev_nonzero;
        let ps = [
            self.zero_a[self.slots[0]],
            self.zero_b[self.slots[1]],
            self.zero_c[self.slots[2]],
            0,
            self.zero_d[self.slots[3]],
        ];
        for (input, p) in self.inputs.iter_mut().zip(ps) {
            *input = i32::from(self.stretch[usize::from(p >> 4)]);
        }
        self.inputs[BIAS] = 256;
        self.mix::<INPUTS>() << 4
    }

    #[inline(always)]
    fn zero_update(&mut self, p: i32, bit: bool) {
        if self.zero_run >= LONG_RUN {
            self.long_total += 1;
            self.long_ones += u64::from(bit);
            if self.long_total >= 1 << 40 {
                self.long_total >>= 1;
                self.long_ones >>= 1;
            }
            return;
        }
        self.learn::<INPUTS>(p >> 4, bit);
        let [a, b, c, d] = self.slots;
        adapt(&mut self.zero_a[a], bit);
        adapt(&mut self.zero_b[b], bit);
        adapt(&mut self.zero_c[c], bit);
        adapt(&mut self.zero_d[d], bit);
    }

    #[inline(always)]
    fn value_prob(&mut self, old: u8, node: usize) -> i32 {
        if node == 1 {
            self.value_hash = hash_state(HASH_SEED, &[self.history & 0xffff]);
        }
        let prev = (self.history & 0xff) as usize;
        self.slots = [
            prev << 8 | node,
            usize::from(old) << 8 | node,
            hash_from(self.value_hash, &[node as u64, 2]),
            0,
        ];
        self.set = ZERO_SETS + node;
        let ps = [
            self.value_a[self.slots[0]],
            self.value_b[self.slots[1]],
            self.value_c[self.slots[2]],
        ];
        for (input, p) in self.inputs.iter_mut().zip(ps) {
            *input = i32::from(self.stretch[usize::from(p >> 4)]);
        }
        self.inputs[BIAS] = 256;
        self.mix::<VALUE_INPUTS>() << 4
    }

    #[inline(always)]
    fn value_update(&mut self, p: i32, bit: bool) {
        self.learn::<VALUE_INPUTS>(p >> 4, bit);
        let [a, b, c, _] = self.slots;
        adapt(&mut self.value_a[a], bit);
        adapt(&mut self.value_b[b], bit);
        adapt(&mut self.value_c[c], bit);
    }

    /// [`update`](Self::update) for `zeros` zero bytes.
    fn skip(&mut self, zeros: u64) {
        if zeros == 0 {
            return;
        }
        self.zero_run = self.zero_run.saturating_add(zeros);
        self.history = self
            .history
            .checked_shl(8 * zeros.min(8) as u32)
            .unwrap_or(0);
        self.flags = self.flags.checked_shl(zeros.min(8) as u32).unwrap_or(0);
    }

    #[inline(always)]
    fn update(&mut self, diff: u8) {
        self.zero_run = if diff == 0 { self.zero_run + 1 } else { 0 };
        self.history = self.history << 8 | u64::from(diff);
        self.flags = self.flags << 1 | u8::from(diff != 0);
    }

    /// Load, while a zero flag is being coded, the hashed probability the next flag asks if
    /// this one is 0 (as most are), so that it is in cache by then. Loads change nothing; the
    /// two hashed tables (512 KiB each) are what coding waits for most: libcrypto 3.0.17 ->
    /// 3.0.20's diff decodes with its prediction in 17.2 ms instead of 17.9 with both loads.
    #[inline(always)]
    fn load_next_zero(&self) {
        std::hint::black_box(self.zero_b[hash(&[(self.history << 8) & 0xff_ffff, 1])]);
    }

    /// Load, while value bit `node` is being coded, the hashed probabilities of both bits that
    /// may follow it (see [`load_next_zero`](Self::load_next_zero)).
    #[inline(always)]
    fn load_next_values(&self, node: usize) {
        if node < 128 {
            for next in [node * 2, node * 2 + 1] {
                std::hint::black_box(self.value_c[hash_from(self.value_hash, &[next as u64, 2])]);
            }
        }
    }
}

/// [`adapt`] for a probability of a 0 bit, which stays in 1..=65535 as the range coder needs.
fn adapt_prob0(p: &mut u16, bit: bool) {
    if bit {
        *p -= *p >> 4;
    } else {
        *p += (u16::MAX - *p) >> 4;
    }
}

#[inline(always)]
fn adapt(p: &mut u16, bit: bool) {
    if bit {
        *p += (u16::MAX - *p) >> 4;
    } else {
        *p -= *p >> 4;
    }
}

/// The range coder's probability of a 0 bit (1/65536) for a probability `p1` of a 1 bit
/// (1/65536).
fn prob0(p1: i32) -> u16 {
    (65536 - p1).clamp(1, 65535) as u16
}

/// After this many zeros in a row, the zero flag is coded from plain counts, which (unlike the
/// mixer's 12-bit output) can get close enough to certainty that a long unchanged stretch of a
/// large file costs almost nothing.
const LONG_RUN: u64 = 1024;

/// Zeros after a nonzero byte whose flags formats 5 and 6 code one by one before they code a
/// gap. Formats 3 and 4 coded 32 ([`WINDOW_3`]), for packages 0.2% to 0.4% smaller and
/// decoded more slowly where changes are sparse: libssl3 3.0.17 -> 3.0.20 codes 367,109 flags
/// instead of 552,499 (values: 25,607 bytes either way) and applies in 51.4 ms instead of
/// 57.6, libxml2 77,481 instead of 136,347 and 25.8 ms instead of 30.7; Pillow 10.0.0 ->
/// 10.0.1, whose changes are denser, 16% fewer flags and 89.4 ms instead of 94.1 (medians of
/// 21 interleaved applies). See ARCHITECTURE.md for the windows measured.
pub(super) const WINDOW: u32 = 16;
/// [`WINDOW`] of formats 3 and 4.
pub(super) const WINDOW_3: u32 = 32;

/// How a diff stream codes its zero flags: every one (format 2), or near changes only, with
/// gaps in between (`Near(WINDOW_3)` in formats 3 and 4, `Near(WINDOW)` in 5 and 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flags {
    Every,
    /// Flags coded one by one for this many zeros after a nonzero byte.
    Near(u32),
}

impl Flags {
    /// Zero flags coded after a nonzero byte before a gap (none where every one is).
    fn window(self) -> u32 {
        match self {
            Flags::Every => 0,
            Flags::Near(window) => window,
        }
    }
}

/// Previous gap sizes that contexts tell apart.
const GAP_CONTEXTS: usize = 24;

/// Adaptive probabilities of the bits of a gap: its bit length (unary, by the previous gap's),
/// then the bits below its top one.
struct GapModel {
    more: Box<[[u16; 64]; GAP_CONTEXTS]>,
    mantissa: Box<[[u16; 68]; 65]>,
    previous: usize,
}

impl GapModel {
    fn new() -> Self {
        GapModel {
            more: Box::new([[1 << 15; 64]; GAP_CONTEXTS]),
            mantissa: Box::new([[1 << 15; 68]; 65]),
            previous: 0,
        }
    }
}

/// A gap `g` is coded as `g + 1`: its bit length `len` (1..=64) in unary, then its bits below the
/// top one, highest first; the first two by the bits above them, the rest by position.
fn mantissa_slot(len: usize, node: usize, shift: usize) -> usize {
    match len - 1 - shift {
        1 | 2 => node,
        _ => 4 + shift,
    }
}

/// Code the diff bytes of each step, with the old bytes they apply to.
pub(super) struct DiffEncoder {
    rc: Encoder,
    model: Model,
    gaps: GapModel,
    flags: Flags,
    /// Flags left to code one by one before a gap (formats 3 to 6); 0 while counting a gap.
    near: u32,
    /// Zeros counted since the gap started.
    zeros: u64,
}

impl DiffEncoder {
    pub fn new(flags: Flags) -> Self {
        DiffEncoder {
            rc: Encoder::new(),
            model: Model::new(),
            gaps: GapModel::new(),
            flags,
            near: 0,
            zeros: 0,
        }
    }

    /// Code `new - old` byte-wise, `new_pos` being where `new` starts in the new file.
    pub fn push_step(&mut self, new_pos: u64, new: &[u8], old: &[u8]) {
        let mut k = 0;
        while k < new.len() {
            if self.flags != Flags::Every && self.near == 0 {
                // Counting a gap: skip to the next differing byte.
                let same = new[k..]
                    .iter()
                    .zip(&old[k..])
                    .position(|(n, o)| n != o)
                    .unwrap_or(new.len() - k);
                self.zeros += same as u64;
                k += same;
                if k == new.len() {
                    break;
                }
                self.gap(self.zeros);
                self.model.skip(self.zeros);
                self.zeros = 0;
                self.value(old[k], new[k].wrapping_sub(old[k]));
                self.near = self.flags.window();
                k += 1;
                continue;
            }
            let diff = new[k].wrapping_sub(old[k]);
            let p = self.model.zero_prob(new_pos + k as u64, old, k);
            self.model.load_next_zero();
            self.rc.bit(prob0(p), diff != 0);
            self.model.zero_update(p, diff != 0);
            if diff != 0 {
                self.value(old[k], diff);
                self.near = self.flags.window();
            } else {
                self.model.update(0);
                self.near = self.near.saturating_sub(1);
            }
            k += 1;
        }
    }

    /// Code the nonzero diff byte `diff` over the old byte `old`.
    fn value(&mut self, old: u8, diff: u8) {
        let mut node = 1usize;
        for shift in (0..8).rev() {
            let bit = (diff >> shift) & 1 != 0;
            let p = self.model.value_prob(old, node);
            self.model.load_next_values(node);
            self.rc.bit(prob0(p), bit);
            self.model.value_update(p, bit);
            node = node * 2 + usize::from(bit);
        }
        self.model.update(diff);
    }

    fn gap(&mut self, gap: u64) {
        let v = gap + 1;
        let len = 64 - v.leading_zeros() as usize;
        let ctx = self.gaps.previous.min(GAP_CONTEXTS - 1);
        for i in 1..=len.min(63) {
            let p = &mut self.gaps.more[ctx][i - 1];
            self.rc.bit(*p, i < len);
            adapt_prob0(p, i < len);
        }
        let mut node = 1usize;
        for shift in (0..len - 1).rev() {
            let bit = (v >> shift) & 1 != 0;
            let p = &mut self.gaps.mantissa[len][mantissa_slot(len, node, shift)];
            self.rc.bit(*p, bit);
            adapt_prob0(p, bit);
            node = (node * 2 + usize::from(bit)).min(3);
        }
        self.gaps.previous = len;
    }

    /// Coded bytes written so far (a few bytes short of what [`finish`](Self::finish) gives).
    pub fn coded_len(&self) -> usize {
        self.rc.out.len()
    }

    pub fn finish(mut self) -> Vec<u8> {
        // The zeros up to the end, which the decoder knows from the stream's length.
        if self.zeros > 0 {
            self.gap(self.zeros);
        }
        self.rc.finish()
    }
}

/// Inverse of [`DiffEncoder`].
pub(super) struct DiffDecoder<'a> {
    rc: Decoder<'a>,
    model: Model,
    gaps: GapModel,
    flags: Flags,
    /// Diff bytes not decoded yet, of the stream's length.
    left: u64,
    near: u32,
    /// While in a gap: its zeros not yet produced, and whether a nonzero byte ends it (it does
    /// unless it runs to the end of the stream).
    gap: Option<(u64, bool)>,
}

impl<'a> DiffDecoder<'a> {
    /// A decoder of the coded diff stream `input`, which decodes to `len` bytes.
    pub fn new(input: &'a [u8], len: u64, flags: Flags) -> Self {
        DiffDecoder {
            rc: Decoder::new(input),
            model: Model::new(),
            gaps: GapModel::new(),
            flags,
            left: len,
            near: 0,
            gap: None,
        }
    }

    /// Append the new bytes (old + diff) of positions `range` of a step whose old bytes are
    /// `old` to `out`; the first of them lies at `at` in the new file. A step may be decoded in
    /// several ranges, in order; the ranges together must not exceed the stream's length.
    /// (The tests' way in: decoding copies or predicts the old bytes itself.)
    #[cfg(test)]
    pub fn step(
        &mut self,
        old: &[u8],
        range: std::ops::Range<usize>,
        at: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), DecodeError> {
        let base = out.len();
        // The range and the old byte after it, which the model looks at.
        out.extend_from_slice(&old[range.start..old.len().min(range.end + 1)]);
        let decoded = self.step_in_place(&mut out[base..], range.len(), at);
        out.truncate(base + range.len());
        decoded
    }

    /// Add the diff bytes to the first `len` old bytes of a step held in `bytes` (which may
    /// hold the old byte after them: the model looks at it), the first of them at `at` in the
    /// new file. The old bytes, or the predicted ones, are in the new file's buffer already.
    pub fn step_in_place(
        &mut self,
        bytes: &mut [u8],
        len: usize,
        at: u64,
    ) -> Result<(), DecodeError> {
        let mut k = 0;
        if len as u64 > self.left {
            return Err(corrupt("diff stream shorter than its steps need"));
        }
        while k < len {
            if self.flags != Flags::Every && self.near == 0 {
                let (zeros, ends) = match self.gap {
                    Some(gap) => gap,
                    None => {
                        let zeros = self.gap_len();
                        if zeros > self.left {
                            return Err(corrupt("diff gap runs past the end of the stream"));
                        }
                        self.model.skip(zeros);
                        (zeros, zeros < self.left)
                    }
                };
                // The gap's zeros leave the old bytes as they are.
                let n = zeros.min((len - k) as u64) as usize;
                k += n;
                self.left -= n as u64;
                if zeros > n as u64 || !ends {
                    self.gap = Some((zeros - n as u64, ends));
                    continue;
                }
                self.gap = None;
                // The gap ends here, with a nonzero byte.
                if k == len {
                    // It is in the next range.
                    self.gap = Some((0, true));
                    break;
                }
                let diff = self.value(bytes[k]);
                bytes[k] = bytes[k].wrapping_add(diff);
                self.near = self.flags.window();
                self.left -= 1;
                k += 1;
                continue;
            }
            let o = bytes[k];
            let p = self.model.zero_prob(at + k as u64, bytes, k);
            self.model.load_next_zero();
            let nonzero = self.rc.bit(prob0(p));
            self.model.zero_update(p, nonzero);
            if nonzero {
                self.near = self.flags.window();
                let diff = self.value(o);
                bytes[k] = o.wrapping_add(diff);
            } else {
                self.model.update(0);
                self.near = self.near.saturating_sub(1);
            }
            self.left -= 1;
            k += 1;
        }
        Ok(())
    }

    /// A nonzero diff byte over the old byte `old`.
    fn value(&mut self, old: u8) -> u8 {
        let mut node = 1usize;
        for _ in 0..8 {
            let p = self.model.value_prob(old, node);
            self.model.load_next_values(node);
            let bit = self.rc.bit(prob0(p));
            self.model.value_update(p, bit);
            node = node * 2 + usize::from(bit);
        }
        let diff = node as u8;
        self.model.update(diff);
        diff
    }

    fn gap_len(&mut self) -> u64 {
        let ctx = self.gaps.previous.min(GAP_CONTEXTS - 1);
        let mut len = 1usize;
        while len < 64 {
            let p = &mut self.gaps.more[ctx][len - 1];
            let more = self.rc.bit(*p);
            adapt_prob0(p, more);
            if !more {
                break;
            }
            len += 1;
        }
        let mut v = 1u64;
        let mut node = 1usize;
        for shift in (0..len - 1).rev() {
            let p = &mut self.gaps.mantissa[len][mantissa_slot(len, node, shift)];
            let bit = self.rc.bit(*p);
            adapt_prob0(p, bit);
            v = v << 1 | u64::from(bit);
            node = (node * 2 + usize::from(bit)).min(3);
        }
        self.gaps.previous = len;
        v - 1
    }

    /// Whether exactly the whole input was consumed, neither more nor less.
    pub fn consumed_exactly(&self) -> bool {
        self.rc.overrun == 0 && self.rc.pos == self.rc.input.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::noise;

    /// Old bytes and new bytes in steps: unchanged stretches of every length (some longer than
    /// the long-run threshold), lone changes, runs of changes, changes at step edges.
    fn steps(seed: u64) -> Vec<(Vec<u8>, Vec<u8>)> {
        let lens = [1usize, 7, 33, 5000, 64, 3, 1500, 200];
        let mut picks = noise(seed, 4096).into_iter().cycle();
        let mut pick = move || usize::from(picks.next().expect("a cycle never ends"));
        lens.iter()
            .enumerate()
            .map(|(i, &len)| {
                let old = noise(seed + i as u64, len);
                let mut new = old.clone();
                let mut at = 0;
                loop {
                    at += [0, 1, 2, 31, 32, 33, 40, 700, 2000][pick() % 9];
                    if at >= len {
                        break;
                    }
                    let run = 1 + pick() % 4;
                    for b in new.iter_mut().skip(at).take(run) {
                        *b = b.wrapping_add(1 + (pick() % 3) as u8);
                    }
                    at += run;
                }
                if len > 1 {
                    new[len - 1] ^= 0x80;
                }
                (old, new)
            })
            .collect()
    }

    fn encode(steps: &[(Vec<u8>, Vec<u8>)], flags: Flags) -> (Vec<u8>, u64) {
        let mut encoder = DiffEncoder::new(flags);
        let mut at = 0u64;
        for (old, new) in steps {
            encoder.push_step(at, new, old);
            at += new.len() as u64;
        }
        (encoder.finish(), at)
    }

    /// Decode `coded` step by step, each step in ranges cut at the positions `cuts` picks.
    fn decode(
        coded: &[u8],
        len: u64,
        steps: &[(Vec<u8>, Vec<u8>)],
        flags: Flags,
        cut: usize,
    ) -> Result<Vec<u8>, DecodeError> {
        let mut decoder = DiffDecoder::new(coded, len, flags);
        let mut out = Vec::new();
        for (old, _) in steps {
            let mut done = 0;
            while done < old.len() {
                let end = old.len().min(done + cut);
                let at = out.len() as u64;
                decoder.step(old, done..end, at, &mut out)?;
                done = end;
            }
        }
        if !decoder.consumed_exactly() {
            return Err(corrupt("not consumed exactly"));
        }
        Ok(out)
    }

    #[test]
    fn round_trips_in_ranges_of_any_size() {
        for seed in 0..4 {
            let steps = steps(seed);
            let expected: Vec<u8> = steps.iter().flat_map(|(_, new)| new.clone()).collect();
            for flags in [Flags::Every, Flags::Near(WINDOW_3), Flags::Near(WINDOW)] {
                let (coded, len) = encode(&steps, flags);
                for cut in [1, 2, 15, 16, 17, 31, 32, 33, 1000, usize::MAX] {
                    let decoded = decode(&coded, len, &steps, flags, cut)
                        .unwrap_or_else(|e| panic!("{flags:?}, ranges of {cut}: {e}"));
                    assert!(decoded == expected, "{flags:?}, ranges of {cut}");
                }
            }
        }
    }

    #[test]
    fn unchanged_streams_and_streams_that_end_in_a_gap_round_trip() {
        for (old, new) in [
            (vec![7u8; 10_000], vec![7u8; 10_000]),
            (vec![1u8; 50], {
                let mut new = vec![1u8; 50];
                new[0] = 9;
                new
            }),
        ] {
            let steps = [(old, new.clone())];
            for flags in [Flags::Near(WINDOW_3), Flags::Near(WINDOW)] {
                let (coded, len) = encode(&steps, flags);
                assert_eq!(decode(&coded, len, &steps, flags, 7).expect("decodes"), new);
            }
        }
    }

    /// Formats 3 and 5 must cost little more than format 2, which codes every flag: the gaps
    /// carry what the flags between changes said.
    #[test]
    fn gaps_cost_little_more_than_every_flag() {
        let steps = steps(9);
        let every = encode(&steps, Flags::Every).0.len();
        for window in [WINDOW_3, WINDOW] {
            let near = encode(&steps, Flags::Near(window)).0.len();
            assert!(
                near * 100 <= every * 110,
                "a window of {window}: {near} B against format 2's {every} B"
            );
        }
    }

    /// The window is part of the format: a stream read with another window than the one it
    /// was coded with does not give the new bytes (changes 20 bytes apart, between the two).
    #[test]
    fn a_stream_decodes_only_with_its_own_window() {
        let old = noise(11, 4000);
        let mut new = old.clone();
        for at in (5..new.len()).step_by(20) {
            new[at] = new[at].wrapping_add(3);
        }
        let steps = [(old, new.clone())];
        for (coded_with, read_with) in [(WINDOW_3, WINDOW), (WINDOW, WINDOW_3)] {
            let (coded, len) = encode(&steps, Flags::Near(coded_with));
            let right = decode(&coded, len, &steps, Flags::Near(coded_with), 100);
            assert_eq!(right.expect("decodes"), new);
            let wrong = decode(&coded, len, &steps, Flags::Near(read_with), 100);
            assert!(
                wrong.map_or(true, |bytes| bytes != new),
                "coded in a window of {coded_with}, read in one of {read_with}"
            );
        }
    }

    /// A stream decoded as shorter than it was coded fails; a damaged one decodes to whatever
    /// it decodes to (the steps' post-image digest catches it), without a panic.
    #[test]
    fn wrong_lengths_and_damage_are_refused() {
        let steps = steps(3);
        let flags = Flags::Near(WINDOW);
        let (coded, len) = encode(&steps, flags);
        for wrong in [0, 1, len / 2, len - 1] {
            assert!(decode(&coded, wrong, &steps, flags, 100).is_err());
        }
        for at in 0..coded.len() {
            let mut damaged = coded.clone();
            damaged[at] ^= 0x5a;
            let _ = decode(&damaged, len, &steps, flags, 100);
            let _ = decode(&damaged[..at], len, &steps, flags, 100);
        }
    }
}
