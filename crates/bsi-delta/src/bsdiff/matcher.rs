//! Colin Percival's bsdiff matching: a suffix array over the old file finds the longest exact
//! match for each position of the new file; matches are then extended forwards and backwards
//! while at least half of the bytes agree, so that the byte-wise difference of an approximate
//! match (mostly zeros, a few changed addresses) goes to the diff stream.
//!
//! The search can run over any region of the new file on its own against the whole old file,
//! so that regions fixed in advance are searched in parallel and give the same steps whatever
//! the number of threads.

use std::io;

use rayon::prelude::*;

/// One step of the reconstruction: `add` bytes of old (from old position `from`) + diff, then
/// `copy` bytes from the extra stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Op {
    pub add: u64,
    pub copy: u64,
    pub from: usize,
}

/// A new position must beat the match that continues the previous one by more than this many
/// bytes before a new control triple is started (bsdiff uses 8).
const MIN_GAIN: i64 = 8;

/// Suffix array of `old`, built single-threaded (libsais), as `u32`-ranged `i32` positions.
fn suffix_array(old: &[u8]) -> io::Result<Vec<i32>> {
    if old.is_empty() {
        return Ok(Vec::new());
    }
    if i32::try_from(old.len()).is_err() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("old file of {} bytes is too large for bsdiff", old.len()),
        ));
    }
    let sa = libsais::SuffixArrayConstruction::for_text(old)
        .in_owned_buffer()
        .single_threaded()
        .run()
        .map_err(|e| io::Error::other(format!("suffix array construction failed: {e:?}")))?
        .into_vec();
    Ok(sa)
}

/// Length of the common prefix of `a` and `b`.
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut done = 0;
    for (ca, cb) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        let wa = u64::from_le_bytes(ca.try_into().expect("chunks of 8"));
        let wb = u64::from_le_bytes(cb.try_into().expect("chunks of 8"));
        if wa != wb {
            return done + ((wa ^ wb).trailing_zeros() / 8) as usize;
        }
        done += 8;
    }
    done + a[done..]
        .iter()
        .zip(&b[done..])
        .take_while(|(x, y)| x == y)
        .count()
}

/// Length of the common suffix of `a` and `b`.
fn common_suffix(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let (a, b) = (&a[a.len() - n..], &b[b.len() - n..]);
    let mut done = 0;
    for (ca, cb) in a.rchunks_exact(8).zip(b.rchunks_exact(8)) {
        let wa = u64::from_le_bytes(ca.try_into().expect("chunks of 8"));
        let wb = u64::from_le_bytes(cb.try_into().expect("chunks of 8"));
        if wa != wb {
            return done + ((wa ^ wb).leading_zeros() / 8) as usize;
        }
        done += 8;
    }
    done + a[..n - done]
        .iter()
        .rev()
        .zip(b[..n - done].iter().rev())
        .take_while(|(x, y)| x == y)
        .count()
}

/// How many positions `a` and `b` hold the same byte at, up to the shorter one's length.
fn agreeing(a: &[u8], b: &[u8]) -> usize {
    const LOW: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut count = 0;
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .filter(|(x, y)| x == y)
        .count();
    for (ca, cb) in ca.zip(cb) {
        let x = u64::from_le_bytes(ca.try_into().expect("chunks of 8"))
            ^ u64::from_le_bytes(cb.try_into().expect("chunks of 8"));
        // The top bit of each byte of `x` that is zero, and no other bit.
        count += (!(((x & LOW) + LOW) | x | LOW)).count_ones() as usize;
    }
    count + tail
}

/// Bytes of `new[from..to]` equal to the old byte `offset` further on, where there is one.
fn agreeing_at(old: &[u8], new: &[u8], from: usize, to: usize, offset: i64) -> i64 {
    // The new positions whose old byte is inside the old file.
    let lo = (from as i64).max(-offset);
    let hi = (to as i64).min(old.len() as i64 - offset);
    if lo >= hi {
        return 0;
    }
    let (lo, hi) = (lo as usize, hi as usize);
    let old_lo = (lo as i64 + offset) as usize;
    agreeing(&old[old_lo..old_lo + (hi - lo)], &new[lo..hi]) as i64
}

/// The old file, its suffix array, and where each two-byte prefix's suffixes start in it.
pub(super) struct Index<'a> {
    old: &'a [u8],
    sa: Vec<i32>,
    /// The inverse of `sa` (the rank of each old position), for files of up to [`RANKS_MAX`]
    /// bytes: see [`Index::longest_match_near`].
    ranks: Option<Vec<u32>>,
    /// `buckets[k]` is the first rank of the suffixes whose first two bytes, big-endian, are
    /// at least `k` (a one-byte suffix `x` counts as `x 0`: it sorts first among those starting
    /// with `x`); `buckets[65536]` is the number of suffixes.
    buckets: Vec<u32>,
    /// Which [`GRAM`]-byte strings the old file holds, see [`Grams`].
    grams: Grams,
}

/// Length of the strings [`Grams`] records: a match shorter than this never starts a step
/// unless the current alignment explains it as well (see [`MIN_GAIN`]).
const GRAM: usize = 8;

/// A one-hash Bloom filter of the [`GRAM`]-byte strings of the old file, [`BITS`] bits per
/// old byte rounded up to a power of two: where the new file's next [`GRAM`] bytes are nowhere
/// in the old file, a lookup in the suffix array can only find a match too short to start a
/// step, and is skipped. Most lookups are such: new code, where bsdiff looks up every position.
/// The filter takes at most [`FITTED`] bits (4 MiB, which the address translation's caches
/// cover) for old files of 8 to 32 MiB, and one bit per byte beyond, a check in a larger table
/// being a miss more often: the `cryptography` wheel's 17.7 MB universal library (indexed
/// whole) built its filter in 28 ms instead of 140 ms, and its payload in the same CPU time
/// as with 16 MiB of filter (about 2% less wall time, within this VM's noise), with 12 MiB
/// less memory; Firefox's 37.7 MB `omni.ja` took 8 MiB instead of 32 and the same time.
const BITS: usize = 4;
const FITTED: usize = 1 << 25;
struct Grams {
    bits: Vec<u64>,
    shift: u32,
}

impl Grams {
    fn new(old: &[u8]) -> Self {
        let len = (old.len() * BITS)
            .min(old.len().max(FITTED))
            .next_power_of_two()
            .clamp(64, 1 << 29);
        let mut grams = Grams {
            bits: vec![0; len / 64],
            shift: 64 - len.trailing_zeros(),
        };
        for window in old.windows(GRAM) {
            let bit = grams.bit(window);
            grams.bits[bit / 64] |= 1 << (bit % 64);
        }
        grams
    }

    /// The bit of the first [`GRAM`] bytes of `window`.
    fn bit(&self, window: &[u8]) -> usize {
        let word = u64::from_le_bytes(window[..GRAM].try_into().expect("a gram"));
        (word.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize
    }

    /// False when the first [`GRAM`] bytes of `target` are certainly not in the old file (true
    /// for a shorter `target`).
    fn may_hold(&self, target: &[u8]) -> bool {
        if target.len() < GRAM {
            return true;
        }
        let bit = self.bit(target);
        self.bits[bit / 64] >> (bit % 64) & 1 == 1
    }
}

/// Old files up to this size also keep the rank of each position, 4 more bytes per old byte
/// (the suffix array takes 4 too): larger ones are diffed by bsdiff only when blocks found
/// them near, where matches are long and searches few.
const RANKS_MAX: usize = 32 << 20;

/// The search for the next position starts from the rank of the previous match's next
/// position when that match was at least this long; shorter ones share too little to narrow
/// the search down (libssl3: most previous matches are 2 to 7 bytes long).
const NEAR_MIN: usize = 5;

/// The rank of each position of the suffix array `sa`, its inverse. Each thread fills the
/// ranks of its own range of positions, reading the whole suffix array in order; the ranks of
/// other positions go to a spare slot, which costs no branch. libcrypto (4.7 MB): 19 ms on two
/// cores instead of 28 ms on one.
fn inverse(sa: &[i32]) -> Vec<u32> {
    let part = sa
        .len()
        .div_ceil(rayon::current_num_threads().max(1))
        .max(1 << 20);
    let mut ranks = vec![0u32; sa.len()];
    ranks
        .par_chunks_mut(part)
        .enumerate()
        .for_each(|(k, ranks)| {
            let base = k * part;
            let mut spare = 0u32;
            for (rank, &pos) in sa.iter().enumerate() {
                // Positions are below sa.len(), which fits in an i32, and so do ranks.
                let slot = match ranks.get_mut((pos as usize).wrapping_sub(base)) {
                    Some(slot) => slot,
                    None => &mut spare,
                };
                *slot = rank as u32;
            }
        });
    ranks
}

/// The two-byte key of a suffix, see [`Index::buckets`].
fn key(first: u8, second: Option<u8>) -> usize {
    usize::from(first) << 8 | usize::from(second.unwrap_or(0))
}

/// See [`Index::buckets`]: a counting sort by key, in one pass over `old`. Suffixes sort by
/// their first two bytes first, so each key's suffixes are one run of ranks.
fn buckets(old: &[u8]) -> Vec<u32> {
    let mut buckets = vec![0u32; (1 << 16) + 1];
    for (i, &b) in old.iter().enumerate() {
        buckets[key(b, old.get(i + 1).copied()) + 1] += 1;
    }
    for k in 1..buckets.len() {
        buckets[k] += buckets[k - 1];
    }
    buckets
}

impl<'a> Index<'a> {
    pub fn new(old: &'a [u8]) -> io::Result<Self> {
        // The filter and the buckets are built while the suffix array is, on another core
        // where there is one.
        let (sa, (grams, buckets)) =
            rayon::join(|| suffix_array(old), || (Grams::new(old), buckets(old)));
        let sa = sa?;
        let ranks = (old.len() <= RANKS_MAX).then(|| inverse(&sa));
        Ok(Index {
            old,
            sa,
            ranks,
            buckets,
            grams,
        })
    }

    /// The same index with a filter that holds every gram: every lookup goes to the suffix
    /// array, as bsdiff's.
    #[cfg(test)]
    fn unfiltered(mut self) -> Self {
        self.grams.bits.fill(u64::MAX);
        self
    }

    /// The ranks (inclusive) of the suffixes that share the longest possible prefix of up to
    /// two bytes with `target`: its two-byte bucket, else its first byte's, else all.
    fn search_range(&self, target: &[u8]) -> (usize, usize) {
        let bucket = |from: usize, to: usize| {
            let (lo, hi) = (self.buckets[from] as usize, self.buckets[to] as usize);
            (lo < hi).then(|| (lo, hi - 1))
        };
        let first = key(target[0], None);
        target
            .get(1)
            .and_then(|&second| {
                let k = key(target[0], Some(second));
                bucket(k, k + 1)
            })
            .or_else(|| bucket(first, first + 256))
            .unwrap_or((0, self.sa.len() - 1))
    }

    fn suffix(&self, rank: usize) -> usize {
        // Entries of a suffix array of `old` are in 0..old.len().
        self.sa[rank] as usize
    }

    /// Longest prefix of `target` that occurs in the old file: (old position, length). Binary
    /// search over the suffix array that skips the prefix both bounds already share, started
    /// from the ranks of `target`'s first two bytes (the probes it saves are the first ones,
    /// cache misses across the whole array: libssl3's build took 17% less time).
    fn longest_match(&self, target: &[u8]) -> (usize, usize) {
        if self.sa.is_empty() || target.is_empty() {
            return (0, 0);
        }
        let lcp_at = |rank: usize, skip: usize| {
            let pos = self.suffix(rank);
            skip + common_prefix(&self.old[pos + skip..], &target[skip..])
        };
        let (mut lo, mut hi) = self.search_range(target);
        let (mut lcp_lo, mut lcp_hi) = (lcp_at(lo, 0), lcp_at(hi, 0));
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            // Load both possible next probes while this one is compared: the search is bound by
            // cache misses, which the CPU overlaps when the loads are independent (7% faster on
            // an 8 MB file; `_mm_prefetch` would need unsafe code).
            if hi - lo > 4 {
                std::hint::black_box((self.sa[lo + (mid - lo) / 2], self.sa[mid + (hi - mid) / 2]));
            }
            let l = lcp_at(mid, lcp_lo.min(lcp_hi));
            if l == target.len() {
                return (self.suffix(mid), l);
            }
            let pos = self.suffix(mid);
            // A suffix that ends first sorts first (libsais' sentinel convention).
            if pos + l == self.old.len() || self.old[pos + l] < target[l] {
                (lo, lcp_lo) = (mid, l);
            } else {
                (hi, lcp_hi) = (mid, l);
            }
        }
        if lcp_lo >= lcp_hi {
            (self.suffix(lo), lcp_lo)
        } else {
            (self.suffix(hi), lcp_hi)
        }
    }

    /// [`Index::longest_match`] of `target`, knowing that the old file's suffix at `near`
    /// shares its first `shared` bytes (at most all) with `target`. The search gallops out
    /// from the rank of `near` instead of bisecting the whole bucket: the match is one of the
    /// two suffixes around `target`'s place in the order, and that place is close by when
    /// `shared` is long. Each probe reads the old file at a random place, a cache miss; the
    /// ranks next to `near`'s share its cache line.
    fn longest_match_near(&self, target: &[u8], near: usize, shared: usize) -> (usize, usize) {
        let Some(ranks) = &self.ranks else {
            return self.longest_match(target);
        };
        let lcp_at = |rank: usize, skip: usize| {
            let pos = self.suffix(rank);
            skip + common_prefix(&self.old[pos + skip..], &target[skip..])
        };
        // Whether the suffix at `rank`, sharing `l` bytes with `target`, sorts before it.
        let before = |rank: usize, l: usize| {
            let pos = self.suffix(rank);
            pos + l == self.old.len() || self.old[pos + l] < target[l]
        };
        let start = ranks[near] as usize;
        let l = lcp_at(start, shared.min(target.len()));
        if l == target.len() {
            return (near, l);
        }
        // The nearest ranks known on either side of `target`'s place, with their common
        // prefixes: `lo` sorts before it, `hi` after; `None` past either end of the order.
        let mut lo = None;
        let mut hi = None;
        let mut step = 1;
        if before(start, l) {
            lo = Some((start, l));
            let last = self.sa.len() - 1;
            let mut rank = start;
            while rank < last {
                rank = (start + step).min(last);
                let l = lcp_at(rank, 0);
                if l == target.len() {
                    return (self.suffix(rank), l);
                }
                if !before(rank, l) {
                    hi = Some((rank, l));
                    break;
                }
                lo = Some((rank, l));
                step *= 2;
            }
        } else {
            hi = Some((start, l));
            let mut rank = start;
            while rank > 0 {
                rank = start.saturating_sub(step);
                let l = lcp_at(rank, 0);
                if l == target.len() {
                    return (self.suffix(rank), l);
                }
                if before(rank, l) {
                    lo = Some((rank, l));
                    break;
                }
                hi = Some((rank, l));
                step *= 2;
            }
        }
        // Bisect what lies between, past the galloping's last probes, when both are known.
        if let (Some((mut lo_rank, mut lcp_lo)), Some((mut hi_rank, mut lcp_hi))) = (lo, hi) {
            while hi_rank - lo_rank > 1 {
                let mid = lo_rank + (hi_rank - lo_rank) / 2;
                let l = lcp_at(mid, lcp_lo.min(lcp_hi));
                if l == target.len() {
                    return (self.suffix(mid), l);
                }
                if before(mid, l) {
                    (lo_rank, lcp_lo) = (mid, l);
                } else {
                    (hi_rank, lcp_hi) = (mid, l);
                }
            }
            (lo, hi) = (Some((lo_rank, lcp_lo)), Some((hi_rank, lcp_hi)));
        }
        // Of the two, the longer common prefix; the lower rank on a tie, as `longest_match`.
        let (rank, l) = match (lo, hi) {
            (Some((_, lcp_lo)), Some(hi)) if lcp_lo < hi.1 => hi,
            (Some(lo), _) => lo,
            (None, Some(hi)) => hi,
            // The start rank is on one side or the other.
            (None, None) => (start, l),
        };
        (self.suffix(rank), l)
    }
}

/// How [`region_ops`] looks for the next match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Search {
    /// bsdiff's: the longest match at every position the current alignment does not explain.
    Full,
    /// As `Full`, except where the current alignment picks up again within [`QUICK_GAP`] bytes
    /// for at least [`QUICK_RUN`]: the bytes up to there are taken as differences within it,
    /// without looking elsewhere. A relinked executable differs from its old version in an
    /// address every few bytes (the testdata's WebKit), after each of which the full search
    /// looks up several positions in the suffix array for matches elsewhere that seldom beat
    /// the alignment. It gives the first alignment of a predicted search, whose steps are
    /// coded only if prediction does not pay, and then come from a full search.
    ///
    /// The testdata's WebKit (8.5 MB): 1,753 lookups and 200 near ones instead of 238,038 and
    /// 145,783, 0.029 s instead of 0.315 s on one core, the same 73 steps and payload. Real
    /// libraries, whose first alignment the predicted passes refine: libcrypto 3.0.17 -> 3.0.20
    /// 64,583 -> 64,676 B (+0.14%), 3.0.20 -> 3.0.22 49,784 -> 49,768 B, libxml2 14,435 ->
    /// 14,423 B, libssl the same within 4 B. The predicted passes keep the full search: it
    /// costs libcrypto 3.0.17 -> 3.0.20 102,682 B there.
    Quick,
}

/// See [`Search::Quick`]: 8 bytes cover a changed 4-byte address with an opcode and a ModRM
/// byte around it. Runs of 4 bytes: with 16, the testdata's WebKit still took 0.42 s of the
/// 0.57 s (2 cores), its addresses being closer together than that.
const QUICK_GAP: usize = 8;
const QUICK_RUN: usize = 4;

/// Where the alignment that reads old byte `i + offset` for new byte `i` picks up again from
/// `scan` (see [`Search::Quick`]): how many bytes ahead, and for how many bytes.
fn resumes(old: &[u8], new: &[u8], scan: usize, offset: i64) -> Option<(usize, usize)> {
    for skip in 0..=QUICK_GAP {
        let at = scan + skip;
        let from = usize::try_from(at as i64 + offset).ok()?;
        if at >= new.len() || from >= old.len() {
            return None;
        }
        let run = common_prefix(&old[from..], &new[at..]);
        if run >= QUICK_RUN {
            return Some((skip, run));
        }
    }
    None
}

/// The steps that rebuild `new[start..]` from the old file (bsdiff 4 matching), searched as if
/// the new file began at `start`, lined up with the same position of the old file. Steps that
/// produce nothing are left out.
pub(super) fn region_ops(index: &Index<'_>, new: &[u8], start: usize, search: Search) -> Vec<Op> {
    let old = index.old;
    let (old_len, new_len) = (old.len() as i64, new.len());
    let old_at = |i: i64| usize::try_from(i).ok().and_then(|i| old.get(i));

    let mut ops = Vec::new();
    let (mut scan, mut len, mut pos) = (start, 0usize, 0usize);
    let (mut last_scan, mut last_pos, mut last_offset) = (start, 0usize, -(start as i64));
    while scan < new_len {
        let mut old_score = 0i64;
        scan += len;
        let mut scsc = scan;
        // The old position known to share some bytes with `new[scan..]`, and how many.
        let mut near: Option<(usize, usize)> = None;
        while scan < new_len {
            let resumed = match search {
                Search::Quick => resumes(old, new, scan, last_offset),
                _ => None,
            };
            (pos, len) = match resumed {
                Some((skip, run)) => {
                    // The bytes skipped count as the full search counts them when each
                    // position's match falls short (the count below adds those `scsc` has not
                    // passed yet).
                    let to = scan + skip;
                    while scan < to {
                        if old_at(scan as i64 + last_offset) == Some(&new[scan]) {
                            old_score -= 1;
                        }
                        scan += 1;
                    }
                    // `resumes` found old bytes at `scan + last_offset`.
                    ((scan as i64 + last_offset) as usize, run)
                }
                None => {
                    let target = &new[scan..];
                    // Of the old position the alignment reads here and the one after the last
                    // match, the one that shares more with the target.
                    let aligned = usize::try_from(scan as i64 + last_offset)
                        .ok()
                        .filter(|&from| from < old.len())
                        .map(|from| (from, common_prefix(&old[from..], target)));
                    let known = match (aligned, near) {
                        (Some(a), Some(n)) if n.1 > a.1 => Some(n),
                        (Some(a), _) => Some(a),
                        (None, n) => n,
                    };
                    // Where a known position shares a whole gram, the filter would hold it.
                    if known.is_none_or(|(_, shared)| shared < GRAM)
                        && !index.grams.may_hold(target)
                    {
                        known.unwrap_or((0, 0))
                    } else {
                        match known.filter(|&(_, shared)| shared >= NEAR_MIN) {
                            Some((near, shared)) => index.longest_match_near(target, near, shared),
                            None => index.longest_match(target),
                        }
                    }
                }
            };
            if scsc < scan + len {
                old_score += agreeing_at(old, new, scsc, scan + len, last_offset);
                scsc = scan + len;
            }
            let len_i = len as i64;
            if (len_i == old_score && len != 0) || len_i > old_score + MIN_GAIN {
                break;
            }
            if old_at(scan as i64 + last_offset) == Some(&new[scan]) {
                old_score -= 1;
            }
            scan += 1;
            // What matched here, less its first byte, matches at the next position.
            near = (len >= NEAR_MIN).then(|| (pos + 1, len - 1));
        }
        if len as i64 == old_score && scan != new_len {
            continue;
        }

        // Extend the previous match forwards while at least half of the bytes agree: to the
        // length where agreeing bytes less the others are the most, the first such. That score
        // grows along a run of agreeing bytes and drops at each other byte, so only the ends of
        // runs are looked at, each run found a word at a time.
        let (mut s, mut best, mut len_f) = (0i64, 0i64, 0usize);
        let reach = (scan - last_scan).min(old.len().saturating_sub(last_pos));
        let mut i = 0;
        while i < reach {
            let run = common_prefix(&old[last_pos + i..last_pos + reach], &new[last_scan + i..]);
            if run > 0 {
                (s, i) = (s + run as i64, i + run);
                if s * 2 - i as i64 > best * 2 - len_f as i64 {
                    best = s;
                    len_f = i;
                }
            }
            // A byte that differs (or the end).
            i += 1;
        }

        // Extend the new match backwards likewise.
        let mut len_b = 0usize;
        if scan < new_len {
            let (mut s, mut best) = (0i64, 0i64);
            let reach = (scan - last_scan).min(pos);
            let mut i = 0;
            while i < reach {
                let run = common_suffix(&old[pos - reach..pos - i], &new[scan - reach..scan - i]);
                if run > 0 {
                    (s, i) = (s + run as i64, i + run);
                    if s * 2 - i as i64 > best * 2 - len_b as i64 {
                        best = s;
                        len_b = i;
                    }
                }
                i += 1;
            }
        }

        // Where both extensions overlap, split at the best point.
        if last_scan + len_f > scan - len_b {
            let overlap = (last_scan + len_f) - (scan - len_b);
            let (mut s, mut best, mut len_s) = (0i64, 0i64, 0usize);
            for i in 0..overlap {
                if new[last_scan + len_f - overlap + i] == old[last_pos + len_f - overlap + i] {
                    s += 1;
                }
                if new[scan - len_b + i] == old[pos - len_b + i] {
                    s -= 1;
                }
                if s > best {
                    best = s;
                    len_s = i + 1;
                }
            }
            len_f = len_f + len_s - overlap;
            len_b -= len_s;
        }

        let copy = (scan - len_b) - (last_scan + len_f);
        if len_f > 0 || copy > 0 {
            ops.push(Op {
                add: len_f as u64,
                copy: copy as u64,
                from: last_pos,
            });
        }
        debug_assert!((pos - len_b) as i64 <= old_len);
        last_scan = scan - len_b;
        last_pos = pos - len_b;
        last_offset = pos as i64 - scan as i64;
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Text over a few letters, so that suffixes share long prefixes and buckets are large.
    fn letters(seed: u64, len: usize, alphabet: u8) -> Vec<u8> {
        let noise = crate::test_data::noise(seed, len);
        noise.iter().map(|b| b'a' + b % alphabet).collect()
    }

    fn lcp(index: &Index<'_>, pos: usize, target: &[u8]) -> usize {
        common_prefix(&index.old[pos..], target)
    }

    /// The near search finds a match as long as the full search's, from any old position
    /// whose common prefix with the target is known (up to all of it), and the match is real.
    fn check_near(old: &[u8], new: &[u8]) {
        let index = Index::new(old).expect("index");
        assert!(index.ranks.is_some());
        for at in 0..new.len() {
            let target = &new[at..];
            let (_, want) = index.longest_match(target);
            // Every old position as the start, and the previous match's next position.
            let previous = at
                .checked_sub(1)
                .map(|p| index.longest_match(&new[p..]))
                .filter(|&(pos, len)| len >= 1 && pos + 1 < old.len())
                .map(|(pos, _)| pos + 1);
            for near in (0..old.len()).step_by(7).chain(previous) {
                let shared = lcp(&index, near, target);
                for shared in [0, shared / 2, shared] {
                    let (pos, len) = index.longest_match_near(target, near, shared);
                    assert_eq!(len, want, "at {at} from {near} ({shared} shared)");
                    assert_eq!(lcp(&index, pos, target), len, "at {at} from {near}");
                }
            }
        }
    }

    /// The ranks are the suffix array's inverse, for arrays cut into parts by thread (over
    /// 2^20 positions) or not.
    #[test]
    fn ranks_invert_the_suffix_array() {
        for len in [1usize, 5, 1000, (1 << 20) + 3, 3 << 20] {
            let old = letters(len as u64, len, 4);
            let sa = suffix_array(&old).expect("suffix array");
            let ranks = inverse(&sa);
            assert_eq!(ranks.len(), len);
            for (rank, &pos) in sa.iter().enumerate() {
                assert_eq!(
                    ranks[pos as usize] as usize, rank,
                    "{len} bytes, position {pos}"
                );
            }
        }
    }

    #[test]
    fn near_search_matches_the_full_search() {
        for (alphabet, seed) in [(1, 1), (2, 2), (3, 3), (26, 4)] {
            let old = letters(seed, 700, alphabet);
            let mut new = old[100..400].to_vec();
            new.extend(letters(seed + 10, 50, alphabet));
            new.extend_from_slice(&old[650..]);
            new.extend_from_slice(&old[..30]);
            check_near(&old, &new);
        }
    }

    /// The steps of `search` over all of `new`, checked to cover it exactly and to read only
    /// inside the old file.
    fn checked_ops(index: &Index<'_>, new: &[u8], search: Search) -> Vec<Op> {
        let ops = region_ops(index, new, 0, search);
        let mut covered = 0u64;
        for op in &ops {
            assert!(
                op.from + op.add as usize <= index.old.len(),
                "{op:?} reads past the end"
            );
            covered += op.add + op.copy;
        }
        assert_eq!(
            covered,
            new.len() as u64,
            "{search:?} steps cover the new file"
        );
        ops
    }

    /// Where the new file moved a piece of the old one, the quick search leaves the alignment
    /// for the piece's, as the full search does; where a few bytes changed, it stays.
    #[test]
    fn the_quick_search_follows_moved_pieces_and_keeps_small_changes_in_line() {
        let old = letters(5, 4000, 4);
        let mut new = old[2000..3000].to_vec();
        new.extend_from_slice(&old[..2000]);
        new[1500] ^= 1;
        new[1503] ^= 1;
        let index = Index::new(&old).expect("index");
        let quick = checked_ops(&index, &new, Search::Quick);
        let full = checked_ops(&index, &new, Search::Full);
        assert_eq!(quick, full);
        // Two steps: the moved piece, then the old file's start with its two changed bytes.
        let starts: Vec<usize> = quick
            .iter()
            .filter(|op| op.add > 0)
            .map(|op| op.from)
            .collect();
        assert_eq!(starts, [2000, 0]);
    }

    /// A program-like old file (random bytes) and a new one with a piece moved, random bytes
    /// inserted and bytes changed here and there.
    fn moved_and_changed(seed: u64) -> (Vec<u8>, Vec<u8>) {
        let old = crate::test_data::noise(seed, 60_000);
        let mut new = old[30_000..45_000].to_vec();
        new.extend_from_slice(&old[..30_000]);
        new.extend(crate::test_data::noise(seed + 1, 5_000));
        new.extend_from_slice(&old[45_000..]);
        for at in (100..new.len()).step_by(997) {
            new[at] ^= 0x40;
        }
        (old, new)
    }

    /// Lookups the filter skips could only find matches too short to start a step: the full
    /// search gives bsdiff's steps with it and without it.
    #[test]
    fn the_filter_leaves_the_steps_as_they_were() {
        for seed in [1, 2, 3] {
            let (old, new) = moved_and_changed(seed);
            let filtered = Index::new(&old).expect("index");
            let unfiltered = Index::new(&old).expect("index").unfiltered();
            let with = checked_ops(&filtered, &new, Search::Full);
            assert_eq!(
                with,
                checked_ops(&unfiltered, &new, Search::Full),
                "seed {seed}"
            );
            // The inserted random bytes and each changed byte start a step of their own.
            assert!(with.len() >= 3, "{} steps", with.len());
        }
    }

    /// The filter holds every gram of the old file, and few others (4 bits per old byte).
    #[test]
    fn the_filter_holds_every_gram_of_the_old_file_and_few_others() {
        let old = crate::test_data::noise(7, 100_000);
        let grams = Grams::new(&old);
        assert!((0..old.len()).all(|at| grams.may_hold(&old[at..])));
        let other = crate::test_data::noise(8, 100_000);
        let held = (0..other.len() - GRAM)
            .filter(|&at| grams.may_hold(&other[at..]))
            .count();
        assert!(
            held < other.len() / 3,
            "{held} of {} absent grams held",
            other.len()
        );
    }

    proptest! {
        #[test]
        fn word_at_a_time_comparisons_count_as_byte_at_a_time_ones(
            a in proptest::collection::vec(0u8..4, 0..80),
            b in proptest::collection::vec(0u8..4, 0..80),
        ) {
            let n = a.len().min(b.len());
            let agree = a.iter().zip(&b).filter(|(x, y)| x == y).count();
            prop_assert_eq!(agreeing(&a, &b), agree);
            let suffix = a.iter().rev().zip(b.iter().rev()).take_while(|(x, y)| x == y).count();
            prop_assert_eq!(common_suffix(&a, &b), suffix);
            let prefix = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
            prop_assert_eq!(common_prefix(&a, &b), prefix.min(n));
        }

        /// Full and quick steps are valid on any bytes, where the filter skips lookups.
        #[test]
        fn steps_are_valid_on_any_bytes(
            old in proptest::collection::vec(any::<u8>(), 1..600),
            new in proptest::collection::vec(any::<u8>(), 1..600),
            keep in 0usize..600,
        ) {
            // Part of the old file in the new one, so that there are matches to find.
            let mut new = new;
            let keep = keep.min(old.len());
            new.splice(new.len() / 2..new.len() / 2, old[..keep].iter().copied());
            let index = Index::new(&old).expect("index");
            checked_ops(&index, &new, Search::Quick);
            checked_ops(&index, &new, Search::Full);
        }

        /// The quick search's bookkeeping (skipped bytes, matches taken from the alignment)
        /// never panics and gives valid steps, on inputs of three letters, where the alignment
        /// picks up again by chance all the time.
        #[test]
        fn quick_steps_are_valid_on_any_input(
            old in proptest::collection::vec(0u8..3, 1..400),
            new in proptest::collection::vec(0u8..3, 1..400),
        ) {
            let index = Index::new(&old).expect("index");
            checked_ops(&index, &new, Search::Quick);
        }

        #[test]
        fn near_search_matches_the_full_search_on_any_input(
            old in proptest::collection::vec(0u8..3, 1..300),
            new in proptest::collection::vec(0u8..3, 1..60),
        ) {
            check_near(&old, &new);
        }
    }
}
