//! Reference prediction: the old bytes an add step starts from, with every reference of the old
//! file (see `refs`) rewritten to point where its target went in the new file.
//!
//! Where a target went is read off the add steps themselves (the alignment): a step says that
//! the new bytes at `new..new + len` come from the old bytes at `old..old + len`, so an old
//! offset inside it moved by `new - old`. Steps overlap in the old file (old bytes can be used
//! twice); the longest step covering an offset decides, and an offset no step covers moves like
//! the nearest covered offset before it. The decoder reads the steps before it decodes any
//! byte (the control stream comes first), so it predicts exactly as the encoder did.
//!
//! Addresses are virtual; the alignment moves file offsets. A reference's site, target and base
//! are kept as file offsets with their segment's `vaddr - offset`, which the new file is taken
//! to keep (true of every segment but the ones whose padding changed).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;

use rayon::prelude::*;

use super::refs::{self, Kind};

/// Steps shorter than this do not take part in the alignment: a short step is as often a
/// chance match as a moved piece of the file.
pub(super) const MIN_ALIGN: u64 = 32;
/// At most this many steps take part in the alignment (the first ones of at least
/// [`MIN_ALIGN`] bytes), so that a hostile control stream costs bounded memory (with
/// [`refs::MAX_REFS`], about 40 MB in all).
pub(super) const MAX_ALIGN_STEPS: usize = 1 << 19;

/// A step covering a piece of the old file, ordered so that the one that decides is greatest:
/// (preferred, length, the lowest (old, new) offsets).
type Covering = (bool, u64, Reverse<(u64, u64)>);

/// Where old offsets went in the new file: disjoint old intervals sorted by start, each moved
/// by its delta.
#[derive(Debug, Default)]
pub(super) struct Alignment {
    starts: Vec<u64>,
    deltas: Vec<i64>,
    /// Where [`Alignment::map`] starts looking, see [`Buckets`].
    buckets: Buckets,
}

/// For each bucket of 2^`shift` old offsets, the number of interval starts at or before the
/// bucket's first offset: [`Alignment::map`] then looks only among the starts inside the offset's
/// bucket (a few at most) instead of bisecting them all, a cache miss or a mispredicted branch
/// at each step. Every pass maps each reference of the old file: on libssl3 3.0.17 -> 3.0.20 the
/// predictor's share of the build's CPU went from 9.1% to 6.0%, the same packages. The buckets
/// cover the old offsets up to the last start, each 2^12 bytes or as wide as needed to be no
/// more buckets than starts: bounded by the starts, which a hostile control stream bounds (see
/// [`MAX_ALIGN_STEPS`]).
#[derive(Debug, Default)]
struct Buckets {
    shift: u32,
    before: Vec<u32>,
}

/// Narrowest bucket of [`Buckets`]: 2^12 bytes.
const MIN_BUCKET_SHIFT: u32 = 12;

impl Buckets {
    fn new(starts: &[u64]) -> Buckets {
        let Some(&last) = starts.last() else {
            return Buckets::default();
        };
        let mut shift = MIN_BUCKET_SHIFT;
        while (last >> shift) as usize > starts.len() {
            shift += 1;
        }
        let count = (last >> shift) as usize + 1;
        let mut before = Vec::with_capacity(count);
        let mut i = 0;
        for bucket in 0..count as u64 {
            let first = bucket << shift;
            while starts.get(i).is_some_and(|&s| s <= first) {
                i += 1;
            }
            before.push(i as u32);
        }
        Buckets { shift, before }
    }
}

impl Alignment {
    /// The alignment made by add steps `(old, new, len)` in the order of the new file, each
    /// inside a file (offsets and lengths below 2^62).
    pub fn new(steps: &[(u64, u64, u64)]) -> Self {
        Self::preferring(steps, &[])
    }

    /// [`Alignment::new`], where the pieces `preferred` (old, new, len) win over any step.
    pub fn preferring(steps: &[(u64, u64, u64)], preferred: &[(u64, u64, u64)]) -> Self {
        let mut steps: Vec<(u64, u64, u64, bool)> = steps
            .iter()
            .filter(|&&(_, _, len)| len >= MIN_ALIGN)
            .take(MAX_ALIGN_STEPS)
            .map(|&(old, new, len)| (old, new, len, false))
            .chain(
                preferred
                    .iter()
                    .map(|&(old, new, len)| (old, new, len, true)),
            )
            .collect();
        steps.sort_unstable();
        let mut bounds: Vec<u64> = steps
            .iter()
            .flat_map(|&(old, _, len, _)| [old, old + len])
            .collect();
        bounds.sort_unstable();
        bounds.dedup();
        // Sweep the pieces between bounds with the steps covering each, longest first (ties:
        // the lowest old offset, then the lowest new offset); steps that ended are dropped
        // when they come to the top.
        let mut active: BinaryHeap<Covering> = BinaryHeap::new();
        let mut next = 0;
        let mut alignment = Alignment::default();
        for &start in &bounds {
            while let Some(&(old, new, len, first)) = steps.get(next).filter(|s| s.0 <= start) {
                active.push((first, len, Reverse((old, new))));
                next += 1;
            }
            while active
                .peek()
                .is_some_and(|&(_, len, Reverse((old, _)))| old + len <= start)
            {
                active.pop();
            }
            let Some(&(_, _, Reverse((old, new)))) = active.peek() else {
                continue;
            };
            let delta = new as i64 - old as i64;
            if alignment.deltas.last() != Some(&delta) {
                alignment.starts.push(start);
                alignment.deltas.push(delta);
            }
        }
        alignment.buckets = Buckets::new(&alignment.starts);
        alignment
    }

    /// The alignment that takes each new offset back to the old offset this one takes there:
    /// the same pieces, each moved by its delta and taken back by it (where two pieces land on
    /// the same new offsets, the longer one decides).
    pub fn inverse(&self) -> Alignment {
        /// Where the last piece ends: it runs on to the end of any file.
        const END: i64 = 1 << 61;
        let pieces: Vec<(u64, u64, u64)> = (0..self.starts.len())
            .filter_map(|i| {
                let delta = self.deltas[i];
                // The first piece runs from offset 0 (see `map`), or from where it lands at 0.
                let from = match i {
                    0 => 0i64.max(-delta),
                    _ => i64::try_from(self.starts[i]).ok()?,
                };
                let to = self
                    .starts
                    .get(i + 1)
                    .map_or(Some(END), |&e| i64::try_from(e).ok())?;
                let new = u64::try_from(from.checked_add(delta)?).ok()?;
                (to > from).then(|| (new, from as u64, (to - from) as u64))
            })
            .collect();
        Alignment::new(&pieces)
    }

    /// Where old offset `offset` went.
    pub fn map(&self, offset: u64) -> Option<i64> {
        let i = self.starts_at_or_before(offset);
        let delta = match i {
            0 => self.deltas.first().copied().unwrap_or(0),
            i => self.deltas[i - 1],
        };
        i64::try_from(offset).ok()?.checked_add(delta)
    }

    /// How many interval starts are at or before `offset`.
    fn starts_at_or_before(&self, offset: u64) -> usize {
        let bucket = usize::try_from(offset >> self.buckets.shift).unwrap_or(usize::MAX);
        let (Some(&lo), Some(&hi)) = (
            self.buckets.before.get(bucket),
            self.buckets.before.get(bucket.saturating_add(1)),
        ) else {
            // Past the last start's bucket (or no buckets: every start is at or before it).
            let lo = self.buckets.before.last().map_or(0, |&lo| lo as usize);
            return lo + self.starts[lo..].partition_point(|&s| s <= offset);
        };
        let (lo, hi) = (lo as usize, hi as usize);
        lo + self.starts[lo..hi].partition_point(|&s| s <= offset)
    }
}

/// A virtual address as the file offset that holds it (or would, past the file bytes of its
/// segment) and the index of its segment, in one word: the offset below bit 56, the segment
/// above. An address 2^56 bytes or more into the file (possible only in a segment whose memory
/// size says so, which no real file has) is not predicted; until the references took 24 bytes
/// the bound was 2^62, so a payload made then for such a file no longer decodes (its digest
/// check fails).
#[derive(Debug, Clone, Copy)]
struct Point(u64);

impl Point {
    const SEGMENT_SHIFT: u32 = 56;

    fn new(offset: u64, segment: usize) -> Option<Point> {
        let segment = u64::try_from(segment).ok().filter(|&s| s < 256)?;
        (offset < 1 << Self::SEGMENT_SHIFT)
            .then_some(Point(offset | segment << Self::SEGMENT_SHIFT))
    }

    fn offset(self) -> u64 {
        self.0 & ((1 << Self::SEGMENT_SHIFT) - 1)
    }

    fn segment(self) -> usize {
        (self.0 >> Self::SEGMENT_SHIFT) as usize
    }
}

/// How a prepared reference's value is made (see [`Kind`]); a base is an index into
/// [`Predictor::bases`], as into the image's.
#[derive(Debug, Clone, Copy)]
enum Rule {
    Rel32 { k: u8 },
    Back32,
    Based32 { base: u32 },
    Abs64,
    Shifted64 { slice: u8 },
    Arm64(refs::Arm64),
}

/// A reference ready for prediction (24 bytes, as a [`refs::Ref`], whose memory it takes over
/// in [`Predictor::owning`]).
#[derive(Debug, Clone, Copy)]
struct PreparedRef {
    /// The file offset of its bytes, with the segment holding them.
    site: Point,
    rule: Rule,
    target: Point,
}

impl PreparedRef {
    fn width(&self) -> u64 {
        match self.rule {
            Rule::Abs64 | Rule::Shifted64 { .. } => 8,
            Rule::Rel32 { .. } | Rule::Back32 | Rule::Based32 { .. } => 4,
            Rule::Arm64(form) => form.width(),
        }
    }
}

/// An old file's references ready for prediction, whatever the alignment: the encoder tries
/// many alignments of one file (libcrypto: 9 predictors of two images), and prepares each
/// image's 215,000 references once instead of once per predictor (3 to 4 ms each).
#[derive(Debug)]
pub(super) struct Prepared {
    refs: Vec<PreparedRef>,
    /// `vaddr - offset` of each segment of the old file.
    skews: Vec<i64>,
    /// The image's bases, where they lie (`None`: outside every segment).
    bases: Vec<Option<Point>>,
}

impl Prepared {
    /// The references of the old file whose image is `image` (see [`refs::scan`]), or `None`
    /// when it has none.
    pub fn new(image: &refs::Image) -> Option<Arc<Self>> {
        Self::prepare(image, image.refs.iter().copied())
    }

    /// [`Prepared::new`], turning the image's references into prepared ones in their own
    /// memory: a decoder then holds them once.
    fn owning(mut image: refs::Image) -> Option<Arc<Self>> {
        let refs = std::mem::take(&mut image.refs);
        Self::prepare(&image, refs.into_iter())
    }

    fn prepare(image: &refs::Image, refs: impl Iterator<Item = refs::Ref>) -> Option<Arc<Self>> {
        let segments = &image.segments;
        let point = |vaddr: u64| -> Option<Point> {
            let i = segments
                .iter()
                .position(|s| s.vaddr <= vaddr && vaddr - s.vaddr < s.mem_len)?;
            Point::new(
                segments[i].offset.checked_add(vaddr - segments[i].vaddr)?,
                i,
            )
        };
        let bases: Vec<Option<Point>> = image.bases.iter().map(|&b| point(b)).collect();
        let refs: Vec<PreparedRef> = refs
            .filter_map(|r| {
                let site_segment = segments
                    .iter()
                    .position(|s| s.offset <= r.site && r.site - s.offset < s.file_len)?;
                let rule = match r.kind {
                    Kind::Rel32 { k } => Rule::Rel32 { k },
                    Kind::Back32 => Rule::Back32,
                    Kind::Abs64 => Rule::Abs64,
                    Kind::Shifted64 { slice } => Rule::Shifted64 { slice },
                    Kind::Arm64(form) => Rule::Arm64(form),
                    Kind::Based32 { base } => {
                        bases.get(base as usize).copied().flatten()?;
                        Rule::Based32 { base }
                    }
                };
                Some(PreparedRef {
                    site: Point::new(r.site, site_segment)?,
                    rule,
                    target: point(r.target)?,
                })
            })
            .collect();
        if refs.is_empty() {
            return None;
        }
        Some(Arc::new(Prepared {
            refs,
            skews: segments
                .iter()
                .map(|s| s.vaddr.wrapping_sub(s.offset) as i64)
                .collect(),
            bases,
        }))
    }
}

/// The old file's references and an alignment: predicts the bytes of add steps.
#[derive(Debug)]
pub(super) struct Predictor {
    prepared: Arc<Prepared>,
    alignment: Alignment,
}

impl Predictor {
    /// The predictor of an old file whose image is `image` (see [`refs::scan`]) through
    /// `alignment`, or `None` when it has no references.
    #[cfg(test)]
    pub fn new(image: &refs::Image, alignment: Alignment) -> Option<Self> {
        Some(Self::with(&Prepared::new(image)?, alignment))
    }

    /// The predictor of the old file whose references are `prepared` through `alignment`.
    pub fn with(prepared: &Arc<Prepared>, alignment: Alignment) -> Self {
        Predictor {
            prepared: Arc::clone(prepared),
            alignment,
        }
    }

    /// [`Predictor::new`], turning the image's references into prepared ones in their own
    /// memory: a decoder then holds them once.
    pub fn owning(image: refs::Image, alignment: Alignment) -> Option<Self> {
        Some(Self::with(&Prepared::owning(image)?, alignment))
    }

    /// Where `point` went in the new file, as a virtual address.
    fn moved(&self, point: Point) -> Option<i64> {
        self.alignment
            .map(point.offset())?
            .checked_add(self.prepared.skews[point.segment()])
    }

    /// The bytes of reference `r`, whose old bytes are `old`, at new file offset `new_site`, or
    /// `None` when the predicted value does not fit.
    fn value(&self, r: &PreparedRef, old: &[u8], new_site: i64) -> Option<[u8; 8]> {
        let site = new_site.checked_add(self.prepared.skews[r.site.segment()])?;
        let target = self.moved(r.target)?;
        let rel =
            |v: Option<i64>| -> Option<u64> { Some(i64::from(i32::try_from(v?).ok()?) as u64) };
        let value = match r.rule {
            Rule::Rel32 { k } => rel(target.checked_sub(site.checked_add(i64::from(k))?))?,
            Rule::Back32 => rel(site.checked_sub(target))?,
            Rule::Based32 { base } => {
                rel(target.checked_sub(self.moved(self.prepared.bases[base as usize]?)?))?
            }
            Rule::Abs64 => u64::try_from(target).ok()?,
            Rule::Shifted64 { slice } => u64::try_from(target)
                .ok()?
                .checked_sub(u64::from(slice) << refs::SLICE_SHIFT)?,
            Rule::Arm64(form) => return refs::arm64_encode(form, old, site, target),
        };
        Some(value.to_le_bytes())
    }

    /// The whole old file with every reference rewritten as if its site had moved with the
    /// alignment too: what the new file would be if it were the old one moved piece by piece.
    /// Rewritten in parallel, in pieces that each start at a reference's site (sites are
    /// sorted and do not overlap).
    pub fn transform(&self, old: &[u8]) -> Vec<u8> {
        let mut out = old.to_vec();
        self.transform_over(old, &mut out);
        out
    }

    /// [`transform`](Self::transform) written over `out`, which holds `old` or its transform
    /// by another predictor of the same references (another alignment); returns how many bytes
    /// that changed. Only the references' bytes are written: a reference whose value does not
    /// fit gets its old bytes back.
    pub fn transform_over(&self, old: &[u8], out: &mut [u8]) -> u64 {
        const PIECES: usize = 16;
        let refs = &self.prepared.refs[..];
        let len = old.len().min(out.len());
        let per_piece = refs.len().div_ceil(PIECES).max(1);
        let mut pieces = Vec::with_capacity(PIECES);
        let mut rest = &mut out[..];
        let mut rest_at = 0usize;
        for (k, piece) in refs.chunks(per_piece).enumerate() {
            let end = refs
                .get((k + 1) * per_piece)
                .map_or(len, |next| next.site.offset() as usize)
                .clamp(rest_at, len);
            let (bytes, after) = rest.split_at_mut(end - rest_at);
            pieces.push((piece, rest_at, bytes));
            (rest, rest_at) = (after, end);
        }
        pieces
            .into_par_iter()
            .map(|(piece, at, bytes)| {
                let mut changed = 0u64;
                for r in piece {
                    let (site, width) = (r.site.offset() as usize, r.width() as usize);
                    let Some(was) = old.get(site..site + width) else {
                        continue;
                    };
                    let value = self
                        .alignment
                        .map(r.site.offset())
                        .and_then(|s| self.value(r, was, s));
                    let value = value.as_ref().map_or(was, |v| &v[..width]);
                    if let Some(to) = site
                        .checked_sub(at)
                        .and_then(|local| bytes.get_mut(local..local + width))
                    {
                        changed += to.iter().zip(value).filter(|(a, b)| a != b).count() as u64;
                        to.copy_from_slice(value);
                    }
                }
                changed
            })
            .sum()
    }

    /// Append to `out` the predicted bytes `chunk` (offsets within the step) of the add step
    /// that takes `old[from..from + len]` to new offset `new_at`: the old bytes, with the
    /// references lying wholly inside the step rewritten.
    pub fn predict(
        &self,
        old: &[u8],
        from: usize,
        len: usize,
        new_at: u64,
        chunk: std::ops::Range<usize>,
        out: &mut Vec<u8>,
    ) {
        let base = out.len();
        out.extend_from_slice(&old[from + chunk.start..from + chunk.end]);
        let (step_start, step_end) = (from as u64, (from + len) as u64);
        let (chunk_start, chunk_end) = ((from + chunk.start) as u64, (from + chunk.end) as u64);
        // Sites are sorted and do not overlap, so their ends are sorted too.
        let first = self
            .prepared
            .refs
            .partition_point(|r| r.site.offset() + r.width() <= chunk_start.max(step_start));
        for r in &self.prepared.refs[first..] {
            if r.site.offset() >= chunk_end {
                break;
            }
            let width = r.width();
            if r.site.offset() < step_start || r.site.offset() + width > step_end {
                continue;
            }
            let new_site = new_at as i64 + (r.site.offset() - step_start) as i64;
            let was = &old[r.site.offset() as usize..(r.site.offset() + width) as usize];
            let Some(bytes) = self.value(r, was, new_site) else {
                continue;
            };
            for (k, &byte) in bytes[..width as usize].iter().enumerate() {
                let at = r.site.offset() + k as u64;
                if (chunk_start..chunk_end).contains(&at) {
                    out[base + (at - chunk_start) as usize] = byte;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The buckets only narrow the search: every offset maps as a search of all the starts
        /// finds, whether steps are few and far apart (wide buckets) or many and close.
        #[test]
        fn bucketed_lookups_find_what_a_search_of_every_start_does(
            steps in proptest::collection::vec((0u64..1 << 16, 0u64..1 << 16, 0u64..3000), 0..200),
            far in 0u64..1 << 40,
            offsets in proptest::collection::vec(0u64..1 << 17, 1..100),
        ) {
            let mut steps = steps;
            steps.push((far, 5, MIN_ALIGN));
            for steps in [&steps[..steps.len() - 1], &steps[..]] {
                let alignment = Alignment::new(steps);
                for &offset in offsets.iter().chain(&[0, far, far + 1, far.saturating_sub(1), u64::MAX]) {
                    let i = alignment.starts.partition_point(|&s| s <= offset);
                    prop_assert_eq!(alignment.starts_at_or_before(offset), i, "{}", offset);
                }
            }
        }
    }

    #[test]
    fn the_longest_step_decides_and_gaps_move_like_what_precedes_them() {
        // 0..100 moved by +10; 40..60 also copied to 500 (shorter: loses); 200..300 by -50.
        let alignment = Alignment::new(&[(0, 10, 100), (40, 500, 40), (200, 150, 100)]);
        assert_eq!(alignment.map(0), Some(10));
        assert_eq!(alignment.map(50), Some(60));
        assert_eq!(
            alignment.map(150),
            Some(160),
            "a gap moves like what precedes it"
        );
        assert_eq!(alignment.map(250), Some(200));
        assert_eq!(alignment.map(10_000), Some(9_950));
        // Before every step: like the first piece.
        let later = Alignment::new(&[(100, 0, 64)]);
        assert_eq!(later.map(0), Some(-100));
        // Short steps take no part; no steps at all move nothing.
        assert_eq!(Alignment::new(&[(0, 7, MIN_ALIGN - 1)]).map(5), Some(5));
        assert_eq!(Alignment::new(&[]).map(5), Some(5));
    }

    /// The inverse takes every new offset a piece lands on back to where it came from; where
    /// two pieces land on the same offsets, the longer one decides.
    #[test]
    fn the_inverse_takes_offsets_back() {
        // 0..100 by +10, 100..200 by +300 (it lands on 400..500), 200.. by -50 (on 150..).
        let alignment = Alignment::new(&[(0, 10, 100), (100, 400, 100), (200, 150, 1000)]);
        let inverse = alignment.inverse();
        for old in [0u64, 1, 50, 99, 200, 250, 1199] {
            let new = alignment.map(old).expect("maps");
            assert_eq!(inverse.map(new as u64), Some(old as i64), "{old} -> {new}");
        }
        // 400..500 is landed on by both 100..200 and the longer 200..: the longer decides.
        for old in [100u64, 150, 199] {
            let new = alignment.map(old).expect("maps");
            assert_eq!(inverse.map(new as u64), Some(new + 50), "{old} -> {new}");
        }
        // Before the first piece's landing: like it.
        assert_eq!(inverse.map(0), Some(-10));
        assert_eq!(Alignment::new(&[]).inverse().map(7), Some(7));
    }

    #[test]
    fn a_longer_step_inside_another_wins_its_part() {
        let alignment = Alignment::new(&[(0, 0, 50), (10, 1000, 200)]);
        assert_eq!(alignment.map(5), Some(5));
        assert_eq!(alignment.map(10), Some(1000));
        assert_eq!(alignment.map(209), Some(1199));
        // A preferred piece wins even over a longer step.
        let preferring = Alignment::preferring(&[(10, 1000, 200)], &[(0, 0, 50)]);
        assert_eq!(preferring.map(20), Some(20));
        assert_eq!(preferring.map(60), Some(1050));
    }

    /// An image of one segment (file offset 0 at 0x1000) with a reference of every kind every
    /// 13 bytes, moved by steps.
    fn predictor(len: u64) -> Predictor {
        predictor_moved(
            len,
            &[(0, 40, 300), (300, 200, 500), (600, 1000, len - 600)],
        )
    }

    /// [`predictor`] moved by `steps`.
    fn predictor_moved(len: u64, steps: &[(u64, u64, u64)]) -> Predictor {
        let segments = vec![refs::Segment {
            offset: 0,
            vaddr: 0x1000,
            file_len: len,
            mem_len: len + 100,
        }];
        let kinds = [
            Kind::Rel32 { k: 5 },
            Kind::Back32,
            Kind::Based32 { base: 0 },
            Kind::Abs64,
        ];
        let refs = (0..len / 13 - 1)
            .map(|i| refs::Ref {
                site: i * 13,
                kind: kinds[i as usize % 4],
                target: 0x1000 + (i * 7919) % len,
            })
            .collect();
        let image = refs::Image {
            segments,
            refs,
            bases: vec![0x1010],
            ..refs::Image::default()
        };
        Predictor::new(&image, Alignment::new(steps)).expect("references")
    }

    /// Rewriting the references in pieces, in parallel, gives what rewriting them one after
    /// the other does, with a few references to a piece or thousands.
    #[test]
    fn transform_rewrites_every_reference() {
        for len in [700u64, 2000, 100_000] {
            let predictor = predictor(len);
            let old = crate::test_data::noise(len, len as usize);
            let mut want = old.clone();
            for r in &predictor.prepared.refs {
                let (site, width) = (r.site.offset() as usize, r.width() as usize);
                let moved = predictor.alignment.map(r.site.offset());
                if let Some(bytes) =
                    moved.and_then(|s| predictor.value(r, &old[site..site + width], s))
                {
                    want[site..site + width].copy_from_slice(&bytes[..width]);
                }
            }
            assert_ne!(want, old, "{len} bytes: something rewritten");
            assert_eq!(predictor.transform(&old), want, "{len} bytes");
        }
    }

    /// Written over the file or over its transform by another alignment, the transform is the
    /// same, and the bytes it changed are counted; references whose values no longer fit (moved
    /// by 2^40) get their old bytes back.
    #[test]
    fn a_transform_over_another_counts_what_it_changed() {
        let len = 100_000;
        let old = crate::test_data::noise(4, len as usize);
        let first = predictor(len);
        for steps in [[(0, 0, len)], [(0, 1 << 40, len)]] {
            let other = predictor_moved(len, &steps);
            let want = other.transform(&old);
            let mut over = old.clone();
            let changed = other.transform_over(&old, &mut over);
            assert_eq!(over, want);
            assert_eq!(changed, differing(&old, &want));
            let mut over = first.transform(&old);
            let before = over.clone();
            let changed = other.transform_over(&old, &mut over);
            assert_eq!(over, want);
            assert_eq!(changed, differing(&before, &want));
            assert!(changed > 0, "something changed");
        }
        // Over its own transform, nothing.
        let mut over = first.transform(&old);
        assert_eq!(first.transform_over(&old, &mut over), 0);
    }

    fn differing(a: &[u8], b: &[u8]) -> u64 {
        a.iter().zip(b).filter(|(x, y)| x != y).count() as u64
    }

    #[test]
    fn predicting_in_chunks_gives_the_whole_step() {
        let len = 2000;
        let predictor = predictor(len);
        let old = crate::test_data::noise(3, len as usize);
        for (from, step) in [(0usize, 2000usize), (5, 1000), (600, 1400), (17, 3)] {
            let mut whole = Vec::new();
            predictor.predict(&old, from, step, 77, 0..step, &mut whole);
            if step > 26 {
                assert_ne!(whole, old[from..from + step], "something predicted");
            }
            for chunk in [1, 3, 7, 8, 100, step] {
                let mut pieces = Vec::new();
                for start in (0..step).step_by(chunk) {
                    predictor.predict(
                        &old,
                        from,
                        step,
                        77,
                        start..step.min(start + chunk),
                        &mut pieces,
                    );
                }
                assert_eq!(pieces, whole, "step {from}+{step} in chunks of {chunk}");
            }
        }
        // References cut by the step's ends are left as they are.
        let mut cut = Vec::new();
        predictor.predict(&old, 14, 12, 0, 0..12, &mut cut);
        assert_eq!(cut, old[14..26]);
    }
}
