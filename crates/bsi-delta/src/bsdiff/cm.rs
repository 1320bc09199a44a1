//! Context-modelled coding of the diff stream: a binary range coder (LZMA's) whose models see
//! the old byte each diff byte is added to, which the decoder knows too. A diff stream is mostly
//! zeros with changed addresses in between; general-purpose compressors see neither the old
//! bytes nor that structure.

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

    #[inline(always)]
    fn update(&mut self, diff: u8) {
        self.zero_run = if diff == 0 { self.zero_run + 1 } else { 0 };
        self.history = self.history << 8 | u64::from(diff);
        self.flags = self.flags << 1 | u8::from(diff != 0);
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

/// Code the diff bytes of each step, with the old bytes they apply to.
pub(super) struct DiffEncoder {
    rc: Encoder,
    model: Model,
    pos: u64,
}

impl DiffEncoder {
    pub fn new() -> Self {
        DiffEncoder {
            rc: Encoder::new(),
            model: Model::new(),
            pos: 0,
        }
    }

    /// Code `new - old` byte-wise, `new_pos` being where `new` starts in the new file.
    pub fn push_step(&mut self, new_pos: u64, new: &[u8], old: &[u8]) {
        for (k, (&n, &o)) in new.iter().zip(old).enumerate() {
            let diff = n.wrapping_sub(o);
            let p = self.model.zero_prob(new_pos + k as u64, old, k);
            self.rc.bit(prob0(p), diff != 0);
            self.model.zero_update(p, diff != 0);
            if diff != 0 {
                let mut node = 1usize;
                for shift in (0..8).rev() {
                    let bit = (diff >> shift) & 1 != 0;
                    let p = self.model.value_prob(o, node);
                    self.rc.bit(prob0(p), bit);
                    self.model.value_update(p, bit);
                    node = node * 2 + usize::from(bit);
                }
            }
            self.model.update(diff);
        }
        self.pos += new.len() as u64;
    }

    pub fn finish(self) -> Vec<u8> {
        self.rc.finish()
    }
}

/// Inverse of [`DiffEncoder`].
pub(super) struct DiffDecoder<'a> {
    rc: Decoder<'a>,
    model: Model,
}

impl<'a> DiffDecoder<'a> {
    pub fn new(input: &'a [u8]) -> Self {
        DiffDecoder {
            rc: Decoder::new(input),
            model: Model::new(),
        }
    }

    /// Append the new bytes (old + diff) of positions `range` of a step whose old bytes are
    /// `old` to `out`; the first of them lies at `at` in the new file. A step may be decoded in
    /// several ranges, in order.
    pub fn step(&mut self, old: &[u8], range: std::ops::Range<usize>, at: u64, out: &mut Vec<u8>) {
        for (n, k) in range.enumerate() {
            let o = old[k];
            let p = self.model.zero_prob(at + n as u64, old, k);
            let nonzero = self.rc.bit(prob0(p));
            self.model.zero_update(p, nonzero);
            let mut diff = 0u8;
            if nonzero {
                let mut node = 1usize;
                for _ in 0..8 {
                    let p = self.model.value_prob(o, node);
                    let bit = self.rc.bit(prob0(p));
                    self.model.value_update(p, bit);
                    node = node * 2 + usize::from(bit);
                }
                diff = node as u8;
            }
            self.model.update(diff);
            out.push(o.wrapping_add(diff));
        }
    }

    /// Whether exactly the whole input was consumed, neither more nor less.
    pub fn consumed_exactly(&self) -> bool {
        self.rc.overrun == 0 && self.rc.pos == self.rc.input.len()
    }
}
