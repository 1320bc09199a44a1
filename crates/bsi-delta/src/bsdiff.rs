//! bsdiff-class delta: approximate matches found through a suffix array of the old file (see
//! `matcher`), stored as three separately compressed streams. The control and extra streams are
//! zstd frames; the diff stream, which dominates, is coded by a context-mixing model that also
//! sees the old bytes (see `cm`), about 20% smaller than zstd or xz on real libraries.
//!
//! Payload, format 3:
//!
//! ```text
//! "BSD" 0x03                       magic and version
//! u8                               predictor (0: none, 1: references of an ELF or Mach-O
//!                                  file, see `predict`; 2: the same with AArch64 ADRPs
//!                                  completed further on, see `refs::Version`; 3: the same
//!                                  with a Mach-O file's symbol values), plus 0x80
//!                                  when code directories follow
//! [code directories]               where the new file is a signed Mach-O file: the slots
//!                                  the decoder predicts as its pages' hashes (see `codesign`)
//! 3 x { varint raw_len,            control, diff and extra stream, in this order: decompressed
//!       varint packed_len }        and compressed length (both 0 for an empty stream)
//! control, extra                   each one zstd frame, packed_len bytes
//! diff                             `cm` range-coder bytes, packed_len bytes (between the two)
//! ```
//!
//! The control stream is a sequence of steps `{ varint add, varint copy, varint varint::zigzag(seek) }`:
//! the next `add` bytes of the new file are the predicted bytes of the old file at the old
//! position plus (mod 256) the next `add` bytes of the diff stream, the old position advances by
//! `add`; the next `copy` bytes are taken from the extra stream; then the old position moves by
//! `seek`. The old position starts at 0 and never leaves `0..=old_len`; diff and extra raw
//! lengths add up to the new file's length, and every stream is consumed exactly. Without a
//! predictor the predicted bytes are the old bytes; with one, the old bytes with every reference
//! of the old file inside the step pointed where its target went (see `predict`).
//!
//! Format 4 (`"BSD" 0x04`) is format 3 with a predicted file's diff stream in segments, each
//! coded from a fresh model, so that a decoder can decode the later ones on other cores while
//! it writes the first (see [`SEGMENT_CODED`]); it is written only where the diff stream takes
//! more than that many coded bytes. Its segment table follows the three streams' lengths:
//!
//! ```text
//! varint count                     2 to 2^18 segments
//! count x { varint raw_len,        diff bytes of each segment and its coded bytes, none 0;
//!           varint packed_len }    they add up to the diff stream's two lengths
//! ```
//!
//! The segments' coded bytes follow each other as the diff stream. A segment may start within
//! a step; the model of its first bytes sees the step's predicted bytes as it would have.
//!
//! Slices (`"BSU" 0x01`): where both files are universal Mach-O files with slices of the same
//! machines in the same order (see [`slice_cuts`]), each slice is coded as a file of its own,
//! the first with the header and padding before it, each part of the old file against the part
//! of the new file it becomes:
//!
//! ```text
//! "BSU" 0x01                       magic
//! varint count                     2 to 8 parts
//! count x { varint old_start,      where the part starts in the old file (0 for the first,
//!           varint new_len,        rising; it runs to the next one's start or the end), how
//!           varint payload_len }   long it is in the new file, and its payload's length
//! count x payload                  each of format 5, 6 or 2, as above
//! ```
//!
//! The parts' new lengths add up to the new file's. The parts are encoded at once and decoded
//! at once (see [`decode_slices`]): a universal file's slices are two libraries in one, whose
//! code differs in kind, so each finds its matches in the old slice of its own machine.
//!
//! The diff stream codes its zero flags near changes only and the gaps between them as numbers
//! (see `cm`). Formats 5 and 6 (`"BSD" 0x05` and `0x06`), which the encoder writes, are formats
//! 3 and 4 whose diff stream codes the zero flags of 16 bytes after a change before it codes a
//! gap, not 32 (see `cm::WINDOW`). Format 2 (`"BSD" 0x02`) is format 3 with every zero flag
//! coded, which the encoder still writes where it predicts nothing (see [`flags_for`]), and
//! format 1 (`"BSD" 0x01`, then a filter byte that must be 0) is format 2 without a predictor;
//! they, formats 3 and 4 are still decoded.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Duration;

use rayon::prelude::*;
use zstd::stream::raw::CParameter;

use crate::{corrupt, varint, window_log, DecodeError, DeltaEncoder};

mod cm;
pub(crate) mod codesign;
mod matcher;
mod predict;
mod refs;

#[cfg(test)]
pub(crate) use refs::tests::{elf_with_code, universal_x86_arm64};
pub(crate) use refs::{code_ranges, rip_relative, Machine};

const MAGIC: &[u8; 4] = b"BSD\x03";
/// Format 3 with the diff stream in segments, each coded on its own.
const MAGIC_4: &[u8; 4] = b"BSD\x04";
/// Format 3 whose diff stream codes fewer zero flags before a gap (see `cm::WINDOW`): what the
/// encoder writes where it predicts references.
const MAGIC_5: &[u8; 4] = b"BSD\x05";
/// Format 4 whose diff stream codes fewer zero flags before a gap, as format 5's.
const MAGIC_6: &[u8; 4] = b"BSD\x06";
/// Format 2: format 3 whose diff stream codes every zero flag (see `cm`).
const MAGIC_2: &[u8; 4] = b"BSD\x02";
/// A universal Mach-O file coded slice by slice: a payload of format 5 (or 6, or 2) for each
/// part of the new file, see the module documentation.
const MAGIC_SLICES: &[u8; 4] = b"BSU\x01";
/// Parts of a [`MAGIC_SLICES`] payload at most, as many as a universal file has slices.
const MAX_PARTS: u64 = 8;
/// The parts of a [`MAGIC_SLICES`] payload after the first are decoded into memory beside the
/// first, which is written out as it is decoded, while they take up to this many bytes
/// together; beyond, each part is written out as it is decoded, one after the other, so that
/// an apply holds no more than the largest file plus 64 MiB.
const BUFFERED_MAX: u64 = 32 << 20;
/// Format 1: format 2 with no predictor, whose header byte was a filter that had to be 0.
const MAGIC_1: &[u8; 4] = b"BSD\x01";
/// Set in the predictor byte when code directories follow it (see `codesign`).
const SIGNED: u8 = 0x80;
/// zstd level of the control and extra streams. Level 22, zstd's maximum, gave the same bytes
/// within a few (Pillow 10.0.0 -> 10.0.1's package 369,716 B against 369,712 at 19, the
/// `cryptography` wheel's 145,985 against 145,989, libssl3 and libxml2 the same) for up to three
/// times the time: Pillow's streams took 169 to 193 ms of its build's CPU instead of 105 to 112
/// (libjpeg's extra stream, 150 KB, 96 to 109 ms instead of 31). Level 17 took 62 to 64 ms for
/// 36 B more.
const STREAM_LEVEL: i32 = 19;
/// Bytes of the new file searched as one region, on their own (see [`streams`]). Fixed, so that
/// the payload does not depend on the number of threads; each region boundary costs a few bytes.
const REGION: usize = 1 << 20;
/// A control step is at most three 10-byte varints.
const MAX_STEP_BYTES: u64 = 30;

/// The bsdiff encoder, see the module documentation.
#[derive(Debug, Clone, Copy)]
pub struct Bsdiff {
    predict: bool,
    /// Coded bytes per segment of a predicted file's diff stream (see [`SEGMENT_CODED`]).
    segment_limit: usize,
}

/// The predictor byte of a payload of format 2 or later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Predictor {
    None = 0,
    /// The references [`refs::Version::First`] finds.
    Refs = 1,
    /// The references [`refs::Version::SplitPairs`] finds (format 3 or later), written where they
    /// differ from the first ones: where the old file has AArch64 code.
    SplitPairs = 2,
    /// The references [`refs::Version::Symbols`] finds (format 3 or later), written where they
    /// differ from the ones before: where the old file is a Mach-O file with symbols.
    Symbols = 3,
    /// The references [`refs::Version::Wide`] finds (format 3 or later), written where they differ
    /// from the ones before: where the old file has more than 2^19 references (the
    /// `cryptography` wheel's universal `_rust.abi3.so` has 632,510, symbols included).
    Wide = 4,
}

impl Predictor {
    /// The scan of the old file this predictor predicts with.
    fn version(self) -> refs::Version {
        match self {
            Predictor::SplitPairs => refs::Version::SplitPairs,
            Predictor::Symbols => refs::Version::Symbols,
            Predictor::Wide => refs::Version::Wide,
            _ => refs::Version::First,
        }
    }
}

impl Bsdiff {
    /// bsdiff, named "bsdiff", predicting references where the old file is an x86-64 or AArch64
    /// ELF or Mach-O file.
    pub const PLAIN: Bsdiff = Bsdiff {
        predict: true,
        segment_limit: SEGMENT_CODED,
    };
    /// bsdiff that never predicts: what `cargo xtask encoders` sets beside [`Bsdiff::PLAIN`]
    /// to show what prediction wins. Its payloads decode with either.
    pub const UNPREDICTED: Bsdiff = Bsdiff {
        predict: false,
        segment_limit: SEGMENT_CODED,
    };
}

impl DeltaEncoder for Bsdiff {
    fn name(&self) -> &'static str {
        "bsdiff"
    }

    /// Beyond 32 MiB, not tried once blocks' delta is over 1/4 of the file: the suffix array
    /// costs 4 bytes per old byte and most of the build, and where blocks' delta was that far,
    /// zstd-prefix won (Firefox ESR 140 -> 153: libxul.so, 184 MB, 47.5 MB against bsdiff's
    /// 57.6 MB after 263 s of bsdiff; likewise on five smaller files, blocks at 32% to 52%).
    /// Where blocks' delta was 24% or less, bsdiff won (libmozavcodec.so; libssl3's libcrypto,
    /// blocks at 18%: bsdiff 169,508 B, zstd-prefix 399,745 B).
    fn max_far_len(&self) -> usize {
        32 << 20
    }

    /// On text beyond 64 KiB zstd-prefix won wherever both ran: libssl3's changelog (774 KB,
    /// 3.0.17 -> 3.0.20: 5,140 B against 4,128 B at zstd-prefix's probe level, in 0.05 s of the
    /// gzip encoder's 0.17 s), Firefox's firefox.js (97 KB: 5,516 B against 4,362 B). bsdiff
    /// runs there only after weak deltas.
    fn max_text_len(&self) -> usize {
        64 << 10
    }

    /// Nor after weak deltas, where zstd-prefix runs after it and won as well: Firefox ESR 140
    /// -> 153's two `omni.ja` archives of stored scripts (43 and 54 MB, blocks' deltas 6.3% and
    /// 10.4%), 2,688,958 B and 5,381,733 B against zstd-prefix's 2,017,349 B and 4,760,767 B;
    /// bsdiff's attempts there took 7.5 s of CPU, zstd-prefix's 20 s.
    fn max_weak_text_len(&self) -> usize {
        self.max_text_len()
    }

    /// Where both files are universal Mach-O files with slices of the same machines (see
    /// [`slice_cuts`]), the payload codes each slice (the first with the header before it) on
    /// its own, all at once, as [`MAGIC_SLICES`] says.
    fn encode(&self, old: &[u8], new: &[u8]) -> io::Result<Option<Vec<u8>>> {
        let cuts = slice_cuts(old, new);
        if cuts.is_empty() {
            return self.encode_file(old, new).map(Some);
        }
        let parts = split_at_cuts(old, new, &cuts);
        let payloads = parts
            .par_iter()
            .map(|&(_, old, new)| self.encode_file(old, new))
            .collect::<io::Result<Vec<Vec<u8>>>>()?;
        let mut out = Vec::with_capacity(16 + payloads.iter().map(Vec::len).sum::<usize>());
        out.extend_from_slice(MAGIC_SLICES);
        varint::put(&mut out, parts.len() as u64);
        for (&(old_start, _, new), payload) in parts.iter().zip(&payloads) {
            varint::put(&mut out, old_start as u64);
            varint::put(&mut out, new.len() as u64);
            varint::put(&mut out, payload.len() as u64);
        }
        for payload in &payloads {
            out.extend_from_slice(payload);
        }
        Ok(Some(out))
    }

    fn decode_into(
        &self,
        old: &[u8],
        payload: &[u8],
        new_len: u64,
        out: &mut dyn Write,
    ) -> Result<(), DecodeError> {
        match payload.strip_prefix(MAGIC_SLICES) {
            Some(rest) => decode_slices(old, rest, new_len, out),
            None => apply(old, &Header::parse(payload, new_len)?, new_len, out),
        }
    }
}

impl Bsdiff {
    /// The payload of format 5 (or 6, or 2) that rebuilds `new` from `old`.
    fn encode_file(&self, old: &[u8], new: &[u8]) -> io::Result<Vec<u8>> {
        // The suffix array is the longest step of the chain that ends with the payload, and
        // starts at once on this core; what prediction needs of both files besides (their
        // references, prepared, and the pieces the steps are to follow) is found on another
        // core as soon as one is free, else after it. Where the old file is an executable,
        // prediction's first alignment (see `predicted_search`) is searched for as soon as the
        // index is there. On libssl3 3.0.20 -> 3.0.22, whose other files keep the other core
        // busy while libcrypto's suffix array is built, the references (35 ms) came first and
        // delayed it.
        let predicting = self.predict && refs::may_hold_refs(old);
        let (indexed, (known, pages)) = rayon::join(
            || -> io::Result<_> {
                let index = matcher::Index::new(old)?;
                let quick = predicting.then(|| search(&index, new, REGION, matcher::Search::Quick));
                Ok((index, quick))
            },
            || {
                let known = predicting.then(|| Known::of(old, new)).flatten();
                (known, self.predict.then(|| signed_pages(new)).flatten())
            },
        );
        let pages = pages.as_ref();
        let (index, quick) = indexed?;
        let (streams, kind) = match (quick, known) {
            (Some(ops), Some(known)) => {
                // A first alignment for the prediction; where prediction does not pay, the
                // steps of a full search are coded instead. Whether it pays is judged against
                // what the quick steps leave to code, which can be more than the full search's
                // (on the library pairs and the testdata, no file changed sides). A file whose
                // quick steps leave over 1/4 of it is searched twice, quickly and then in full,
                // which costs no time: Firefox's libgkcodecs.so encodes in 4.7 to 5.0 s, against
                // 5.2 to 5.4 s with one full search (the full search's steps are coded as its
                // regions come in).
                match predicted_search(&index, old, new, ops, &known) {
                    (ops, Some(predictor)) => {
                        let kind = match (known.wide, known.symbols, known.split_pairs) {
                            (true, ..) => Predictor::Wide,
                            (false, true, _) => Predictor::Symbols,
                            (false, false, true) => Predictor::SplitPairs,
                            (false, false, false) => Predictor::Refs,
                        };
                        let streams = streams(
                            old,
                            new,
                            &ops,
                            Some((&predictor, self.segment_limit)),
                            pages,
                        );
                        (streams, kind)
                    }
                    (_, None) => (
                        streams_as_found(&index, old, new, REGION, pages),
                        Predictor::None,
                    ),
                }
            }
            _ => (
                streams_as_found(&index, old, new, REGION, pages),
                Predictor::None,
            ),
        };
        let cap = new.len() as u64;
        let raw = [
            streams.control.len() as u64,
            streams.diff_len,
            streams.extra.len() as u64,
        ];
        let (control, extra) =
            rayon::join(|| pack(&streams.control, cap), || pack(&streams.extra, cap));
        let packed = [control?, streams.diff, extra?];
        let mut out = Vec::with_capacity(64 + packed.iter().map(Vec::len).sum::<usize>());
        out.extend_from_slice(match (streams.segments.is_empty(), streams.flags) {
            (false, _) => MAGIC_6,
            (true, cm::Flags::Near(_)) => MAGIC_5,
            (true, cm::Flags::Every) => MAGIC_2,
        });
        match pages {
            Some(pages) => {
                out.push(kind as u8 | SIGNED);
                codesign::put(&mut out, pages.directories());
            }
            None => out.push(kind as u8),
        }
        for (raw, packed) in raw.iter().zip(&packed) {
            varint::put(&mut out, *raw);
            varint::put(&mut out, packed.len() as u64);
        }
        if !streams.segments.is_empty() {
            varint::put(&mut out, streams.segments.len() as u64);
            for &(raw, coded) in &streams.segments {
                varint::put(&mut out, raw);
                varint::put(&mut out, coded);
            }
        }
        for packed in &packed {
            out.extend_from_slice(packed);
        }
        Ok(out)
    }
}

/// Old files from this size on are coded slice by slice (see [`slice_cuts`]); a smaller one
/// gains little time that way, and each part's streams and model start afresh.
const CUT_MIN: usize = 1 << 20;

/// Where the files are cut into parts coded on their own (see [`MAGIC_SLICES`]): (old, new)
/// offsets of each slice after the first, where both files are universal Mach-O files whose
/// slices are of the same machines in the same order (their first 8 bytes, magic and CPU type,
/// alike) and in the order of their offsets; else none. A slice's code is of its own machine
/// and its data its own copy, so each new slice finds its matches in the old slice of its
/// machine, and the slices are encoded and decoded on cores of their own. The `cryptography`
/// wheel's universal library 42.0.7 -> 42.0.8 (17.7 MB, slices of 9.5 and 8.2 MB), whose
/// suffix array took 0.69 s on one core: payload 134,600 -> 133,104 B (lookups no longer find
/// matches in the other machine's slice that break the alignment), the wheel's build 1.195 ->
/// 0.891 s and its apply 165 -> 132 ms (medians of 7 and 11, interleaved). One index cut
/// between the slices, each new slice looked up in its own machine's part, gave 131,956 B, a
/// build of 1.018 s and no faster apply: the diff stream was still one model's, decoded on one
/// core.
fn slice_cuts(old: &[u8], new: &[u8]) -> Vec<(usize, usize)> {
    if old.len() < CUT_MIN {
        return Vec::new();
    }
    let (Some(old_slices), Some(new_slices)) = (refs::macho_slices(old), refs::macho_slices(new))
    else {
        return Vec::new();
    };
    fn head(data: &[u8], at: u64) -> Option<&[u8]> {
        let at = usize::try_from(at).ok()?;
        data.get(at..at.checked_add(8)?)
    }
    let alike = old_slices.len() > 1
        && old_slices.len() == new_slices.len()
        && old_slices
            .iter()
            .zip(&new_slices)
            .all(|(&(o, _), &(n, _))| head(old, o).is_some() && head(old, o) == head(new, n));
    if !alike {
        return Vec::new();
    }
    let cuts: Vec<(usize, usize)> = old_slices
        .iter()
        .zip(&new_slices)
        .skip(1)
        .map(|(&(o, _), &(n, _))| (o as usize, n as usize))
        .collect();
    // Every part holds a byte of each file: the slices in the order of their offsets.
    let rising = cuts
        .iter()
        .try_fold((0, 0), |(old_at, new_at), &(o, n)| {
            (o > old_at && n > new_at && o < old.len() && n < new.len()).then_some((o, n))
        })
        .is_some();
    match rising {
        true => cuts,
        false => Vec::new(),
    }
}

/// The parts of `old` and `new` between `cuts` (see [`slice_cuts`]): where each part starts in
/// the old file, its old bytes and its new bytes.
fn split_at_cuts<'a>(
    old: &'a [u8],
    new: &'a [u8],
    cuts: &[(usize, usize)],
) -> Vec<(usize, &'a [u8], &'a [u8])> {
    let starts: Vec<(usize, usize)> = [(0, 0)].into_iter().chain(cuts.iter().copied()).collect();
    let ends = cuts.iter().copied().chain([(old.len(), new.len())]);
    starts
        .iter()
        .zip(ends)
        .map(|(&(old_at, new_at), (old_end, new_end))| {
            (old_at, &old[old_at..old_end], &new[new_at..new_end])
        })
        .collect()
}

/// Decode the parts of a [`MAGIC_SLICES`] payload (`rest`, after its magic) into `sink`: the
/// first as it is decoded, the others meanwhile on another thread into memory, handed over to
/// be written after it as they are decoded (one after the other, each as it is decoded, beyond
/// [`BUFFERED_MAX`]). Every part's header is checked before anything is written.
fn decode_slices(
    old: &[u8],
    mut rest: &[u8],
    new_len: u64,
    sink: &mut dyn Write,
) -> Result<(), DecodeError> {
    let count = varint::take(&mut rest)?;
    if !(2..=MAX_PARTS).contains(&count) {
        return Err(corrupt("number of slices out of range"));
    }
    let mut lens = Vec::new();
    for _ in 0..count {
        lens.push([
            varint::take(&mut rest)?,
            varint::take(&mut rest)?,
            varint::take(&mut rest)?,
        ]);
    }
    let mut parts = Vec::with_capacity(lens.len());
    let mut total = 0u64;
    for (k, &[old_start, part_len, payload_len]) in lens.iter().enumerate() {
        let old_end = lens.get(k + 1).map_or(old.len() as u64, |next| next[0]);
        if (k == 0) != (old_start == 0) || old_start >= old_end || old_end > old.len() as u64 {
            return Err(corrupt("slices out of order or outside the old file"));
        }
        total = total
            .checked_add(part_len)
            .filter(|&total| total <= new_len)
            .ok_or(DecodeError::TooLong { expected: new_len })?;
        let payload_len = usize::try_from(payload_len)
            .ok()
            .filter(|&len| len <= rest.len())
            .ok_or_else(|| corrupt("slice extends past the payload"))?;
        let (payload, tail) = rest.split_at(payload_len);
        rest = tail;
        let header = Header::parse(payload, part_len)?;
        // Both ends are within the old file, checked above.
        parts.push((&old[old_start as usize..old_end as usize], header, part_len));
    }
    if !rest.is_empty() {
        return Err(corrupt("trailing bytes after the slices"));
    }
    if total != new_len {
        return Err(DecodeError::WrongLength {
            expected: new_len,
            actual: total,
        });
    }
    let Some(((old, header, len), others)) = parts.split_first() else {
        return Err(corrupt("number of slices out of range"));
    };
    if others.iter().map(|part| part.2).sum::<u64>() > BUFFERED_MAX {
        for (old, header, len) in &parts {
            apply(old, header, *len, sink)?;
        }
        return Ok(());
    }
    let (pieces, decoded) = mpsc::channel();
    let (spares, spare) = mpsc::channel();
    let (first, written, others) = std::thread::scope(|scope| {
        let decoding = scope.spawn(move || {
            let mut out = Handover {
                piece: Vec::new(),
                pieces,
                spare,
            };
            for (old, header, len) in others {
                apply(old, header, *len, &mut out)?;
            }
            out.hand_over().map_err(DecodeError::Output)
        });
        let first = apply(old, header, *len, sink);
        // The other parts' bytes decoded so far, then the rest as it comes; if anything failed,
        // the receiver goes and the decoding thread stops at its next piece.
        let written = first.is_ok().then(|| {
            decoded.iter().try_for_each(|piece| {
                sink.write_all(&piece).map_err(DecodeError::Output)?;
                let _ = spares.send(piece);
                Ok(())
            })
        });
        drop(decoded);
        let others = decoding
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (first, written, others)
    });
    first?;
    // The writer's failure is on bytes before any the later parts have left to give, so it comes
    // before their own error, if they have one.
    written.unwrap_or(Ok(()))?;
    others
}

/// The sink of the parts of a universal file decoded beside the first: their bytes go to the
/// thread that writes the file in pieces of [`OUT_CHUNK`], which it writes out once the first
/// part is written, as they come, instead of all of them once the last is decoded. The
/// `cryptography` wheel 42.0.7 -> 42.0.8 (a universal library of 9.5 and 8.2 MB, decoded in
/// about the same time) applied in 130.5 ms instead of 139.0 (medians of 31 interleaved runs;
/// 142.1 against 146.3 in 21 before): the writer takes the arm64 part's pieces as soon as its
/// own part is done, rather than waiting for the last one.
struct Handover {
    piece: Vec<u8>,
    pieces: mpsc::Sender<Vec<u8>>,
    /// Pieces written out, to be filled again.
    spare: mpsc::Receiver<Vec<u8>>,
}

impl Handover {
    fn hand_over(&mut self) -> io::Result<()> {
        if self.piece.is_empty() {
            return Ok(());
        }
        let mut next = self.spare.try_recv().unwrap_or_default();
        next.clear();
        let piece = std::mem::replace(&mut self.piece, next);
        self.pieces
            .send(piece)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the writer stopped"))
    }
}

impl Write for Handover {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        if self.piece.capacity() == 0 {
            self.piece.reserve_exact(OUT_CHUNK);
        }
        let n = bytes.len().min(OUT_CHUNK - self.piece.len());
        self.piece.extend_from_slice(&bytes[..n]);
        if self.piece.len() == OUT_CHUNK {
            self.hand_over()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The page hashes of `new`'s code directories that a decoder can rebuild, where it has any
/// (see `codesign`).
fn signed_pages(new: &[u8]) -> Option<codesign::Pages> {
    let dirs = codesign::directories(new);
    if dirs.is_empty() {
        return None;
    }
    let mut pages = codesign::Pages::new(dirs);
    pages.feed(new);
    Some(pages)
}

/// Bytes of the new file gathered before they are written out: decoding holds no more than
/// this of the new file, whatever its size.
const OUT_CHUNK: usize = 1 << 20;

/// Coded bytes after which a predicted file's diff stream starts a new segment, coded with a
/// model of its own, which a decoder can decode on another core ahead of the bytes before it
/// (format 6); a signed file's segment also ends where its first code directory's slots start
/// once it has 1/8 of this, since the slots are predicted from the pages written before them.
/// About 20 ms of decoding on one core. Pillow 10.0.0 -> 10.0.1's arm64 libharfbuzz (4.3 MB,
/// 248 KB of diff stream) is coded in 3 segments (64, 64 and 2 KB, the last with the slots)
/// for 18 bytes more; the `cryptography` wheel's universal library 42.0.7 -> 42.0.8 in 2 per
/// slice for 328 bytes more (0.2%); libcrypto's 31 KB and every smaller stream in one, byte
/// for byte as in format 5. Segments of 32 KB and 48 KB cost 1.3% and 1.2% of libharfbuzz's
/// payload, and their applies were no faster (medians of 15 runs, within this VM's noise).
const SEGMENT_CODED: usize = 64 << 10;
/// Diff bytes coded at a time, between which a segment can end.
const SEGMENT_PIECE: usize = 64 << 10;

struct Streams {
    control: Vec<u8>,
    /// Raw length and coded bytes of the diff stream (see `cm`), and how its zero flags are
    /// coded: near changes only (format 5) or every one (format 2).
    diff_len: u64,
    diff: Vec<u8>,
    /// The raw and coded lengths of the diff stream's segments, one after the other, where it
    /// has more than one (format 6); else none.
    segments: Vec<(u64, u64)>,
    flags: cm::Flags,
    extra: Vec<u8>,
}

/// The steps that rebuild `new` from the old file of `index`, in order.
///
/// The new file is cut into regions of `region` bytes, searched in parallel; the steps depend
/// only on the inputs, never on the number of threads or the order in which regions finish.
fn search(
    index: &matcher::Index<'_>,
    new: &[u8],
    region: usize,
    search: matcher::Search,
) -> Vec<matcher::Op> {
    let starts: Vec<usize> = (0..new.len()).step_by(region).collect();
    let regions: Vec<Vec<matcher::Op>> = starts
        .par_iter()
        .map(|&start| {
            let end = new.len().min(start + region);
            matcher::region_ops(index, &new[..end], start, search)
        })
        .collect();
    regions.concat()
}

/// The add steps of `ops` as (old offset, new offset, length).
fn add_steps(ops: &[matcher::Op]) -> Vec<(u64, u64, u64)> {
    let mut new_pos = 0u64;
    let mut steps = Vec::with_capacity(ops.len());
    for op in ops {
        if op.add > 0 {
            steps.push((op.from as u64, new_pos, op.add));
        }
        new_pos += op.add + op.copy;
    }
    steps
}

/// What [`predicted_search`] needs of the old and new files besides the old file's index: their
/// references, prepared (see [`predict::Prepared`]), and the pieces its alignments prefer.
struct Known {
    /// Whether the old file's scan found AArch64 split pairs (see [`Predictor::SplitPairs`]).
    split_pairs: bool,
    /// Whether it found Mach-O symbol values (see [`Predictor::Symbols`]).
    symbols: bool,
    /// Whether it kept more references than a narrower scan would (see [`Predictor::Wide`]).
    wide: bool,
    prepared: Arc<predict::Prepared>,
    new_prepared: Arc<predict::Prepared>,
    /// The linkage stubs and their relocations, matched by symbol (see [`refs::plt_pieces`]).
    stubs: Vec<(u64, u64, u64)>,
    /// Sections that kept their name and size, with the stubs (see [`refs::same_sections`]).
    same: Vec<(u64, u64, u64)>,
    /// As `same`, with the start of every data section that kept its name.
    starts: Vec<(u64, u64, u64)>,
}

impl Known {
    /// What is known of `old` and `new`, or `None` where the old file or the new one has no
    /// references to predict with.
    fn of(old: &[u8], new: &[u8]) -> Option<Known> {
        let image = refs::scan(old, refs::Version::Wide);
        if image.refs.is_empty() {
            return None;
        }
        let new_image = refs::scan(new, refs::Version::Wide);
        let (prepared, new_prepared) = rayon::join(
            || predict::Prepared::new(&image),
            || predict::Prepared::new(&new_image),
        );
        let stubs = refs::plt_pieces(old, new);
        let mut same = refs::same_sections(old, new, false);
        let mut starts = refs::same_sections(old, new, true);
        same.extend_from_slice(&stubs);
        starts.extend_from_slice(&stubs);
        Some(Known {
            split_pairs: image.has_split_pairs(),
            symbols: image.has_symbols(),
            wide: image.is_wide(),
            prepared: prepared?,
            new_prepared: new_prepared?,
            stubs,
            same,
            starts,
        })
    }
}

/// Matcher passes after the first (see [`predicted_search`]): one, and a second for new files
/// of [`SECOND_PASS_LEN`] or more. Measured on libcrypto 3.0.17 -> 3.0.20 (4.7 MB): one pass
/// 64,585 B, two 60,591 B, three 60,563 B (format 2); a second pass wins 0.09% on libxml2
/// (1.7 MB, 14,380 -> 14,367 B for 0.03 s more) and nothing on libssl (0.7 MB).
const PREDICTED_PASSES: usize = 2;
const SECOND_PASS_LEN: usize = 4 << 20;
/// No pass follows one that leaves at most 1/`SETTLED` of the new file to code: there is too
/// little left to win. libcrypto's first pass leaves 1.70% (the second: 1.54%, 6.6% smaller
/// payload), the testdata's relinked Mach-O executables 0.008% to 0.013%, where a second pass
/// found nothing better and took a sixth of the build.
const SETTLED: u64 = 1024;
/// A pass after the first is not searched when the new file, moved back through the last
/// pass's alignment, differs from the one that pass searched in at most 1/`MOVED_ALIKE` of the
/// bytes that pass left to code: a search wins less than that where its input changed so
/// little (fewer bytes than the moved files differ in, on every pair measured). The second
/// pass on the `cryptography` wheel's slices: 1,112 and 1,668 bytes moved differently, against
/// 121,173 and 174,644 left to code, and it won 5 and 44 bytes of them in 90 to 140 ms on
/// each core; on libcrypto 3.0.17 -> 3.0.20, 10,950 against 40,836 (it won 3,607), on
/// Pillow's libharfbuzz 37,515 against 424,961 (it won 4,637, 2.7 KB of payload).
const MOVED_ALIKE: u64 = 64;
/// Prediction is not tried when the first steps leave more than 1/`FAR` of the new file to code.
const FAR: u64 = 4;

/// The steps and the predictor for `new` where the old file has references (see `refs`), given
/// the old file's `index`, the steps `ops` found with it against the new file as it is, and
/// what is `known` of both files (their references, and the pieces alignments prefer).
///
/// Those steps give a first alignment, through which every reference of the new file (found
/// as in the old one) is pointed back where its target was in the old file, and that moved-back
/// new file is searched again against the old file's own index: its tables of addresses
/// (relocations, unwind tables, switch tables) now match the old file's where before every
/// entry differed, so that the new steps line up entries the first ones could not; and, for
/// large files, again from the new steps' alignment. The steps apply to the new file as it is
/// (moving back keeps every length); the last steps' own alignment is what the decoder predicts
/// with, moving the old file's references forward. A pass is kept only when it leaves fewer
/// bytes to code (add bytes that differ from their prediction, plus extra bytes) than the best
/// so far, which starts as the first steps without prediction.
///
/// The way back is the inverse of the alignment the old file's references would move forward
/// with, or, on the first pass, the steps read from the new file's side, whichever search
/// leaves less to code: the inverse lines up look-alike pieces (an AArch64 procedure linkage
/// table's stubs) as moving forward does, the steps keep their sense where the old file holds
/// two copies of one piece (a universal file of two slices of one architecture).
///
/// Moving the new file back instead of the old file forward spares a suffix array of the moved
/// old file per pass (libsais: about 175 ms for libcrypto's 4.7 MB, 650 ms for a 17 MB
/// library). Measured against moving the old file forward (format 3): libcrypto 64,720 ->
/// 64,583 B, libssl 4,583 -> 4,595 B, libxml2 14,434 -> 14,435 B, a universal Mach-O library
/// 219,585 -> 219,170 B; on AArch64 libssl 8,091 B either way, libxml2 23,462 -> 23,521 B,
/// but libcrypto 62,592 -> 66,855 B (+6.8%: both moved files match their counterpart equally,
/// reference for reference, but the matcher, which scans one side and looks up the other,
/// lines up pieces differently, and more calls are mispredicted).
///
/// The alignments that move the new file also know the new file's layout, since only the
/// encoder uses them: sections with the same name and size moved whole. The first one is tried
/// also with the start of every data section that kept its name anchored where that section
/// now starts (a small library's page-aligned `.rodata` stays put while the code before it
/// grows, and steps that ran over the padding before it or over its tables of offsets, all of
/// which changed, would move it), and the one whose prediction fits the first steps better is
/// taken.
///
/// On ELF files, every pass's steps are cut to take each linkage stub and `.rela.plt` entry to
/// the new one for the same function (see `refs/plt.rs`), which the look-alike stubs keep the
/// matcher from doing, and those pieces are preferred in the alignments that move the new file
/// back.
fn predicted_search(
    index: &matcher::Index<'_>,
    old: &[u8],
    new: &[u8],
    ops: Vec<matcher::Op>,
    known: &Known,
) -> (Vec<matcher::Op>, Option<predict::Predictor>) {
    // Files that differ in substance gain nothing: Firefox ESR 140 -> 153's libgkcodecs.so left
    // 4,820,874 of its 7,361,688 bytes to code, 4,805,424 after two passes (libcrypto 3.0.17 ->
    // 3.0.20 left 7.7% of its bytes, 1.5% after).
    let mut left = left_to_code(old, new, &ops, None);
    if left > new.len() as u64 / FAR {
        return (ops, None);
    }
    let Known {
        prepared,
        new_prepared,
        stubs,
        same,
        starts,
        ..
    } = known;
    let steps = add_steps(&ops);
    let fit = |preferred: &[(u64, u64, u64)]| {
        let alignment = predict::Alignment::preferring(&steps, preferred);
        let predictor = predict::Predictor::with(prepared, alignment);
        left_to_code(old, new, &ops, Some(&predictor))
    };
    // Both fits at once, on two cores (libxml2: 14 ms one after the other).
    let starts_fit_better = starts != same && {
        let (with_starts, with_same) = rayon::join(|| fit(starts), || fit(same));
        with_starts < with_same
    };
    let preferred = if starts_fit_better { starts } else { same };
    let (mut steps, mut preferred) = (steps, &preferred[..]);
    let mut best = (ops, None);
    let passes = match new.len() >= SECOND_PASS_LEN {
        true => PREDICTED_PASSES,
        false => 1,
    };
    // The moved-back new file the last pass searched in full, while another pass may follow.
    let mut searched: Option<Vec<u8>> = None;
    for pass in 0..passes {
        // Two ways back for the first pass, the better one kept (see the function's
        // documentation): the steps themselves, read from the new file's side, and the
        // inverse of the alignment the old file's references would move forward with.
        let forward = predict::Alignment::preferring(&steps, preferred);
        let mut ways = vec![forward.inverse()];
        if pass == 0 {
            let back = |v: &[(u64, u64, u64)]| -> Vec<(u64, u64, u64)> {
                v.iter().map(|&(old, new, len)| (new, old, len)).collect()
            };
            ways.push(predict::Alignment::preferring(
                &back(&steps),
                &back(preferred),
            ));
        }
        // Where there are two ways, each is searched quickly, at once, each on its own core as
        // far as there are cores (each search also runs its regions in parallel), and the first
        // of the better ones is kept, whatever the order in which they finish; it is searched
        // in full unless its quick steps already leave too little to win (see [`SETTLED`]).
        // On every pair measured the quick searches ranked the two ways as full searches do
        // (libcrypto 3.0.17 -> 3.0.20: 134,355 and 134,931 bytes left, 80,063 and 80,829 after
        // full searches; likewise libssl, libxml2 and libssl3 3.0.22's), and on the testdata's
        // relinked executables the full search left what the quick one did.
        // The new file moved back through a way, each of its references pointed where its
        // target was in the old file, to be searched against the old file's own index.
        let move_back = |way: predict::Alignment| {
            let mover = predict::Predictor::with(new_prepared, way);
            mover.transform(new)
        };
        let search_moved = |moved: &[u8], search_kind: matcher::Search| {
            let ops = search(index, moved, REGION, search_kind);
            Pass::of(old, new, prepared, ops, stubs)
        };
        let search_way = |way: predict::Alignment, search_kind: matcher::Search| {
            let moved = move_back(way);
            (search_moved(&moved, search_kind), moved)
        };
        let found = match ways.len() {
            1 => ways.pop().and_then(|way| {
                // Moved back over the file the last pass searched, counting what changed.
                let mover = predict::Predictor::with(new_prepared, way);
                let (moved, changed) = match searched.take() {
                    Some(mut moved) => {
                        let changed = mover.transform_over(new, &mut moved);
                        (moved, Some(changed))
                    }
                    None => (mover.transform(new), None),
                };
                drop(mover);
                match changed {
                    Some(changed) if changed <= left / MOVED_ALIKE => None,
                    _ => Some(search_moved(&moved, matcher::Search::Full)),
                }
            }),
            _ => {
                let quick: Vec<(Pass, Vec<u8>)> = ways
                    .into_par_iter()
                    .map(|way| search_way(way, matcher::Search::Quick))
                    .collect();
                let better =
                    quick.into_iter().reduce(
                        |best, way| {
                            if way.0.left < best.0.left {
                                way
                            } else {
                                best
                            }
                        },
                    );
                match better {
                    Some((pass, _)) if pass.left <= new.len() as u64 / SETTLED => Some(pass),
                    Some((_, moved)) => {
                        let pass = search_moved(&moved, matcher::Search::Full);
                        searched = Some(moved);
                        Some(pass)
                    }
                    None => None,
                }
            }
        };
        let Some(pass) = found.filter(|pass| pass.left < left) else {
            break;
        };
        left = pass.left;
        best = (pass.ops, Some(pass.predictor));
        if left <= new.len() as u64 / SETTLED {
            break;
        }
        (steps, preferred) = (pass.steps, same);
    }
    best
}

/// `ops` with the new bytes of each piece `(old, new, len)` of `pieces` made by one add step
/// from the piece's old bytes, the steps around it cut where it starts and ends. Pieces that
/// overlap one before them in the new file, or run past its end (`new_len`), are left out.
fn pinned(ops: &[matcher::Op], pieces: &[(u64, u64, u64)], new_len: u64) -> Vec<matcher::Op> {
    let mut pieces: Vec<(u64, u64, u64)> = pieces
        .iter()
        .copied()
        .filter(|&(_, new, len)| len > 0 && new.checked_add(len).is_some_and(|e| e <= new_len))
        .collect();
    pieces.sort_unstable_by_key(|&(_, new, _)| new);
    let mut end = 0;
    pieces.retain(|&(_, new, len)| {
        let keep = new >= end;
        if keep {
            end = new + len;
        }
        keep
    });
    // Spans of the new file: (start, length, old offset of an add or `None` for extra bytes),
    // first those of the steps outside every piece, then the pieces.
    let mut spans: Vec<(u64, u64, Option<u64>)> = Vec::with_capacity(ops.len() * 2 + pieces.len());
    let mut at = 0u64;
    let mut next = 0;
    let mut cut =
        |spans: &mut Vec<(u64, u64, Option<u64>)>, start: u64, len: u64, old: Option<u64>| {
            let end = start + len;
            let mut pos = start;
            while pos < end {
                while pieces.get(next).is_some_and(|p| p.1 + p.2 <= pos) {
                    next += 1;
                }
                let stop = match pieces.get(next) {
                    Some(p) if p.1 <= pos => {
                        pos = end.min(p.1 + p.2);
                        continue;
                    }
                    Some(p) => end.min(p.1),
                    None => end,
                };
                spans.push((pos, stop - pos, old.map(|o| o + (pos - start))));
                pos = stop;
            }
        };
    for op in ops {
        cut(&mut spans, at, op.add, Some(op.from as u64));
        cut(&mut spans, at + op.add, op.copy, None);
        at += op.add + op.copy;
    }
    spans.extend(pieces.iter().map(|&(old, new, len)| (new, len, Some(old))));
    spans.sort_unstable_by_key(|s| s.0);
    let mut pinned: Vec<matcher::Op> = Vec::with_capacity(spans.len());
    for (_, len, old) in spans {
        match (old, pinned.last_mut()) {
            (Some(old), _) => pinned.push(matcher::Op {
                add: len,
                copy: 0,
                from: old as usize,
            }),
            (None, Some(last)) => last.copy += len,
            (None, None) => pinned.push(matcher::Op {
                add: 0,
                copy: len,
                from: 0,
            }),
        }
    }
    pinned
}

/// A search of [`predicted_search`]: the bytes it leaves to code, its steps (and their add
/// steps), and the predictor of their alignment.
struct Pass {
    left: u64,
    ops: Vec<matcher::Op>,
    steps: Vec<(u64, u64, u64)>,
    predictor: predict::Predictor,
}

impl Pass {
    /// The pass of the steps `ops` found for `new` (moved back), cut to take the pieces
    /// `stubs` (see [`refs::plt_pieces`]) where they go, predicting with the old file's
    /// references `prepared`.
    fn of(
        old: &[u8],
        new: &[u8],
        prepared: &Arc<predict::Prepared>,
        ops: Vec<matcher::Op>,
        stubs: &[(u64, u64, u64)],
    ) -> Pass {
        let ops = match stubs {
            [] => ops,
            _ => pinned(&ops, stubs, new.len() as u64),
        };
        let steps = add_steps(&ops);
        let predictor = predict::Predictor::with(prepared, predict::Alignment::new(&steps));
        let left = left_to_code(old, new, &ops, Some(&predictor));
        Pass {
            left,
            ops,
            steps,
            predictor,
        }
    }
}

/// Bytes the steps `ops` leave to code: add bytes that differ from their prediction, and extra
/// bytes. Counted in parallel, in [`LEFT_PIECES`] pieces of at least [`LEFT_MIN_STEPS`] steps:
/// the last pass of a large file counts alone, after its search (libcrypto: 8 ms on one core).
fn left_to_code(
    old: &[u8],
    new: &[u8],
    ops: &[matcher::Op],
    predictor: Option<&predict::Predictor>,
) -> u64 {
    let piece = ops.len().div_ceil(LEFT_PIECES).max(LEFT_MIN_STEPS);
    let mut starts = Vec::with_capacity(LEFT_PIECES);
    let mut new_pos = 0usize;
    for chunk in ops.chunks(piece) {
        starts.push(new_pos);
        new_pos += chunk
            .iter()
            .map(|op| (op.add + op.copy) as usize)
            .sum::<usize>();
    }
    ops.par_chunks(piece)
        .zip(starts)
        .map(|(ops, new_pos)| left_from(old, new, ops, new_pos, predictor))
        .sum()
}

/// See [`left_to_code`].
const LEFT_PIECES: usize = 32;
const LEFT_MIN_STEPS: usize = 256;

/// [`left_to_code`] of steps that start at `new_pos` in the new file.
fn left_from(
    old: &[u8],
    new: &[u8],
    ops: &[matcher::Op],
    mut new_pos: usize,
    predictor: Option<&predict::Predictor>,
) -> u64 {
    let mut left = 0u64;
    let mut predicted = Vec::new();
    for op in ops {
        let add = op.add as usize;
        let base = match predictor {
            Some(predictor) => {
                predicted.clear();
                predictor.predict(old, op.from, add, new_pos as u64, 0..add, &mut predicted);
                &predicted[..]
            }
            None => &old[op.from..op.from + add],
        };
        let new_bytes = &new[new_pos..new_pos + add];
        left += new_bytes.iter().zip(base).filter(|(n, o)| n != o).count() as u64 + op.copy;
        new_pos += add + op.copy as usize;
    }
    left
}

/// The control, diff and extra streams that rebuild `new` from the old file of `index`, without
/// prediction.
///
/// The new file is cut into regions of `region` bytes, searched in parallel; their steps are
/// coded in order as they come in, by the thread that started the encoding, which helps with the
/// search while it waits. The steps and so the streams depend only on the inputs, never on the
/// number of threads or the order in which regions finish.
fn streams_as_found(
    index: &matcher::Index<'_>,
    old: &[u8],
    new: &[u8],
    region: usize,
    pages: Option<&codesign::Pages>,
) -> Streams {
    let starts: Vec<usize> = (0..new.len()).step_by(region).collect();
    // Each region's steps, from when a thread has found them until they are written out; taken
    // out then, so that memory holds only the regions searched ahead of the writing.
    let slots: Vec<Mutex<Option<Vec<matcher::Op>>>> =
        starts.iter().map(|_| Mutex::new(None)).collect();
    let mut builder = StreamBuilder::new(old, new, None, pages);
    rayon::scope_fifo(|scope| {
        for (&start, slot) in starts.iter().zip(&slots) {
            let end = new.len().min(start + region);
            scope.spawn_fifo(move |_| {
                let ops = matcher::region_ops(index, &new[..end], start, matcher::Search::Full);
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(ops);
            });
        }
        for slot in &slots {
            let ops = loop {
                if let Some(ops) = slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    break ops;
                }
                // Search a pending region meanwhile, or wait for one that another thread has.
                if rayon::yield_now() != Some(rayon::Yield::Executed) {
                    std::thread::sleep(Duration::from_micros(100));
                }
            };
            for op in &ops {
                builder.push(op);
            }
        }
    });
    builder.finish()
}

/// The control, diff and extra streams of the steps `ops`, which rebuild `new` from `old`; with
/// a predictor, the diff stream in segments of about the coded bytes given with it.
fn streams(
    old: &[u8],
    new: &[u8],
    ops: &[matcher::Op],
    predictor: Option<(&predict::Predictor, usize)>,
    pages: Option<&codesign::Pages>,
) -> Streams {
    let mut builder = StreamBuilder::new(old, new, predictor.map(|(p, _)| p), pages);
    builder.segment_limit = predictor.map(|(_, limit)| limit);
    for op in ops {
        builder.push(op);
    }
    builder.finish()
}

/// Writes the streams step by step.
struct StreamBuilder<'a> {
    old: &'a [u8],
    new: &'a [u8],
    predictor: Option<&'a predict::Predictor>,
    /// The new file's page hashes, which its code directories' slots are predicted to be.
    pages: Option<&'a codesign::Pages>,
    /// The predicted bytes of the current step.
    predicted: Vec<u8>,
    control: Vec<u8>,
    flags: cm::Flags,
    /// The coder of the diff stream's current segment (see [`SEGMENT_CODED`]).
    diff: cm::DiffEncoder,
    diff_len: u64,
    /// Coded bytes after which the diff stream starts a new segment, where it may have more
    /// than one (format 6).
    segment_limit: Option<usize>,
    /// The segments done: their raw lengths and coded bytes.
    segments: Vec<(u64, Vec<u8>)>,
    /// Where the current segment starts in the diff stream.
    segment_start: u64,
    extra: Vec<u8>,
    new_pos: usize,
    /// The old position after the last step's add, whose seek is not written yet; `None`
    /// before the first step.
    old_pos: Option<usize>,
}

/// How the diff stream codes its zero flags: with predicted references, near changes only
/// (format 3, and 5 since `cm::WINDOW`); without, every one (format 2). Predicted references
/// leave sparse changes, which gaps code well: libcrypto 3.0.17 -> 3.0.20 64,583 B against
/// about 60,500 B coding every flag, decoded in 61 ms against 107, libxml2 14,435 against
/// 14,000 B, AArch64 and Mach-O libraries 3% to 7% more. Without prediction, where the old bytes tell where changes fall better than
/// the gaps between them do, gaps cost more for less: libcrypto 177,344 against 169,508 B, the
/// synthetic testdata's binaries 22% to 42% more (WebKit 150,191 against 110,909 B) for
/// decoding 20% faster.
fn flags_for(predictor: Option<&predict::Predictor>) -> cm::Flags {
    match predictor {
        Some(_) => cm::Flags::Near(cm::WINDOW),
        None => cm::Flags::Every,
    }
}

impl<'a> StreamBuilder<'a> {
    fn new(
        old: &'a [u8],
        new: &'a [u8],
        predictor: Option<&'a predict::Predictor>,
        pages: Option<&'a codesign::Pages>,
    ) -> Self {
        let flags = flags_for(predictor);
        StreamBuilder {
            old,
            new,
            predictor,
            pages,
            predicted: Vec::new(),
            control: Vec::new(),
            flags,
            diff: cm::DiffEncoder::new(flags),
            diff_len: 0,
            segment_limit: None,
            segments: Vec::new(),
            segment_start: 0,
            extra: Vec::new(),
            new_pos: 0,
            old_pos: None,
        }
    }

    /// Append a step of the matcher, which produces the next bytes of the new file. Slots of
    /// the new file's code directories that the step would copy from the extra stream are
    /// added instead (from the old bytes after the step's, which the pages' hashes replace):
    /// where most pages changed, the matcher finds no match for them (Pillow 10.0.0 -> 10.0.1's
    /// arm64 libharfbuzz, 4.3 MB: 33 KB of slots).
    fn push(&mut self, op: &matcher::Op) {
        let copy_at = self.new_pos as u64 + op.add;
        let slots = self.pages.and_then(|p| p.first_slots(copy_at, op.copy));
        if let Some((start, end)) = slots.filter(|&(s, e)| e - s <= self.old.len() as u64) {
            let (before, len) = (start - copy_at, end - start);
            if op.add + before > 0 {
                self.push_step(&matcher::Op {
                    copy: before,
                    ..*op
                });
            }
            let from = (op.from as u64 + op.add).min(self.old.len() as u64 - len);
            return self.push(&matcher::Op {
                add: len,
                copy: op.copy - before - len,
                from: from as usize,
            });
        }
        self.push_step(op);
    }

    fn push_step(&mut self, op: &matcher::Op) {
        match self.old_pos {
            Some(old_pos) => varint::put(&mut self.control, varint::zigzag(seek(old_pos, op.from))),
            // The old position starts at 0: reach the first step's with a pure seek.
            None if op.from != 0 => {
                varint::put(&mut self.control, 0);
                varint::put(&mut self.control, 0);
                varint::put(&mut self.control, varint::zigzag(seek(0, op.from)));
            }
            None => {}
        }
        varint::put(&mut self.control, op.add);
        varint::put(&mut self.control, op.copy);
        // The matcher only produces steps inside both files.
        let add = op.add as usize;
        let at = self.new_pos as u64;
        let signed = self.pages.filter(|p| p.holds_slots(at, op.add));
        let base = match (self.predictor, signed) {
            (None, None) => &self.old[op.from..op.from + add],
            (predictor, signed) => {
                self.predicted.clear();
                match predictor {
                    Some(p) => p.predict(self.old, op.from, add, at, 0..add, &mut self.predicted),
                    None => self
                        .predicted
                        .extend_from_slice(&self.old[op.from..op.from + add]),
                }
                if let Some(pages) = signed {
                    pages.fill(at, &mut self.predicted);
                }
                &self.predicted[..]
            }
        };
        // In pieces, so that a segment can end within a long step: when its coded bytes reach
        // the limit, or where the first code directory's slots start once the stream is in
        // segments (see [`SEGMENT_CODED`]). Each piece is coded with the step's predicted bytes
        // from its start on, which the model looks one byte into.
        let mut from = 0;
        while from < add {
            let mut to = add.min(from + SEGMENT_PIECE);
            let slots = signed
                .and_then(|p| p.first_slots(at + from as u64, (add - from) as u64))
                .map(|(start, _)| (start - at) as usize);
            match slots {
                Some(start) if start > from => to = to.min(start),
                _ => {}
            }
            let pos = self.diff_len + from as u64;
            let coded = self.diff.coded_len();
            let due = self
                .segment_limit
                .is_some_and(|limit| coded >= limit || (slots == Some(from) && coded >= limit / 8));
            if due && pos > self.segment_start {
                let done = std::mem::replace(&mut self.diff, cm::DiffEncoder::new(self.flags));
                self.segments
                    .push((pos - self.segment_start, done.finish()));
                self.segment_start = pos;
            }
            self.diff.push_step(
                at + from as u64,
                &self.new[self.new_pos + from..self.new_pos + to],
                &base[from..],
            );
            from = to;
        }
        self.diff_len += op.add;
        self.new_pos += add;
        let copy = op.copy as usize;
        self.extra
            .extend_from_slice(&self.new[self.new_pos..self.new_pos + copy]);
        self.new_pos += copy;
        self.old_pos = Some(op.from + add);
    }

    fn finish(mut self) -> Streams {
        // The seek after the last step leads nowhere.
        if self.old_pos.is_some() {
            varint::put(&mut self.control, 0);
        }
        debug_assert_eq!(self.new_pos, self.new.len());
        let last = match self.diff_len {
            0 => Vec::new(),
            _ => self.diff.finish(),
        };
        let (diff, segments) = match self.segments.is_empty() {
            true => (last, Vec::new()),
            false => {
                self.segments
                    .push((self.diff_len - self.segment_start, last));
                let lens = self
                    .segments
                    .iter()
                    .map(|(raw, coded)| (*raw, coded.len() as u64))
                    .collect();
                let coded = self.segments.into_iter().flat_map(|(_, coded)| coded);
                (coded.collect(), lens)
            }
        };
        Streams {
            control: self.control,
            diff_len: self.diff_len,
            diff,
            segments,
            flags: self.flags,
            extra: self.extra,
        }
    }
}

/// The seek from old position `from` to `to`, both inside the old file (so below `i64::MAX`).
fn seek(from: usize, to: usize) -> i64 {
    to as i64 - from as i64
}

/// The zstd window of a stream of `raw_len` bytes in a payload for a file of `new_len` bytes.
/// The control stream may be longer than the new file, but its window need not be.
/// At most 16 MiB ([`crate::STREAM_WINDOW_LOG`]): a decoder never holds more of a stream than
/// that, and the encoder's tables stay near 200 MB instead of growing with the file
/// (2.5 GB on a 184 MB library).
fn stream_window(raw_len: u64, new_len: u64) -> u32 {
    window_log(raw_len.min(new_len)).min(crate::STREAM_WINDOW_LOG)
}

/// One zstd frame of `data` (nothing for no data).
fn pack(data: &[u8], new_len: u64) -> io::Result<Vec<u8>> {
    if data.is_empty() {
        return Ok(Vec::new());
    }
    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), STREAM_LEVEL)?;
    encoder.set_pledged_src_size(Some(data.len() as u64))?;
    encoder.include_checksum(false)?;
    encoder.include_contentsize(true)?;
    let window = stream_window(data.len() as u64, new_len);
    encoder.set_parameter(CParameter::WindowLog(window))?;
    // The level's match tables would otherwise be sized for its own window whatever the data.
    encoder.set_parameter(CParameter::ChainLog(window))?;
    encoder.set_parameter(CParameter::HashLog(
        window.min(crate::STREAM_WINDOW_LOG - 1),
    ))?;
    encoder.set_parameter(CParameter::EnableLongDistanceMatching(true))?;
    encoder.write_all(data)?;
    encoder.finish()
}

/// A stream of the payload: its declared raw length and compressed bytes.
#[derive(Debug, Clone, Copy)]
struct StreamSpec<'a> {
    raw: u64,
    packed: &'a [u8],
}

#[derive(Debug)]
struct Header<'a> {
    flags: cm::Flags,
    predictor: Predictor,
    /// The new file's code directories whose slots are predicted (see `codesign`).
    directories: Vec<codesign::Directory>,
    control: StreamSpec<'a>,
    diff: StreamSpec<'a>,
    extra: StreamSpec<'a>,
    /// The diff stream's segments, in order: one in formats 1 to 3 and 5, none when it is empty.
    segments: Vec<Segment<'a>>,
}

/// A segment of the diff stream (see [`SEGMENT_CODED`]): where its diff bytes start, how many
/// there are, and its coded bytes.
#[derive(Debug, Clone, Copy)]
struct Segment<'a> {
    start: u64,
    raw: u64,
    packed: &'a [u8],
}

impl Segment<'_> {
    fn end(&self) -> u64 {
        self.start + self.raw
    }
}

/// Most segments a format 4 or 6 payload may have: about 16 GiB of coded diff stream.
const MAX_SEGMENTS: u64 = 1 << 18;

impl<'a> Header<'a> {
    /// Parse and check the header against the new file's length.
    fn parse(payload: &'a [u8], new_len: u64) -> Result<Self, DecodeError> {
        let (rest, format) = [
            (MAGIC_6, 6),
            (MAGIC_5, 5),
            (MAGIC_4, 4),
            (MAGIC, 3),
            (MAGIC_2, 2),
            (MAGIC_1, 1),
        ]
        .into_iter()
        .find_map(|(magic, format)| Some((payload.strip_prefix(magic)?, format)))
        .ok_or_else(|| corrupt("not a bsdiff payload of format 1 to 6"))?;
        let (&predictor, mut rest) = rest
            .split_first()
            .ok_or_else(|| corrupt("truncated header"))?;
        let directories = match predictor & SIGNED {
            0 => Vec::new(),
            _ if format > 1 => codesign::take(&mut rest, new_len)?,
            _ => return Err(corrupt("unknown predictor")),
        };
        let predictor = match predictor & !SIGNED {
            0 => Predictor::None,
            1 if format > 1 => Predictor::Refs,
            2 if format > 2 => Predictor::SplitPairs,
            3 if format > 2 => Predictor::Symbols,
            4 if format > 2 => Predictor::Wide,
            _ => return Err(corrupt("unknown predictor")),
        };
        let mut lens = [(0u64, 0u64); 3];
        for len in &mut lens {
            *len = (varint::take(&mut rest)?, varint::take(&mut rest)?);
        }
        let segment_lens = match format {
            4 | 6 => segment_lens(&mut rest, lens[1])?,
            _ => vec![lens[1]],
        };
        let mut specs = [StreamSpec {
            raw: 0,
            packed: &[],
        }; 3];
        for (spec, &(raw, packed)) in specs.iter_mut().zip(&lens) {
            if (raw == 0) != (packed == 0) {
                return Err(corrupt("stream lengths disagree about emptiness"));
            }
            let packed = usize::try_from(packed)
                .ok()
                .filter(|&p| p <= rest.len())
                .ok_or_else(|| corrupt("stream extends past the payload"))?;
            (spec.packed, rest) = rest.split_at(packed);
            spec.raw = raw;
        }
        if !rest.is_empty() {
            return Err(corrupt("trailing bytes after the streams"));
        }
        let [control, diff, extra] = specs;
        let (mut start, mut packed) = (0, diff.packed);
        let mut segments = Vec::with_capacity(segment_lens.len());
        for &(raw, len) in segment_lens.iter().filter(|&&(raw, _)| raw > 0) {
            // The lengths add up to the diff stream's (see `segment_lens`).
            let (this, rest) = packed.split_at(len as usize);
            packed = rest;
            segments.push(Segment {
                start,
                raw,
                packed: this,
            });
            start += raw;
        }
        if diff.raw.checked_add(extra.raw) != Some(new_len) {
            return Err(DecodeError::WrongLength {
                expected: new_len,
                actual: diff.raw.saturating_add(extra.raw),
            });
        }
        // Every step but a leading pure seek produces at least one byte.
        if control.raw > MAX_STEP_BYTES.saturating_mul(new_len.saturating_add(1)) {
            return Err(corrupt("control stream longer than the new file justifies"));
        }
        Ok(Header {
            flags: match format {
                3 | 4 => cm::Flags::Near(cm::WINDOW_3),
                5 | 6 => cm::Flags::Near(cm::WINDOW),
                _ => cm::Flags::Every,
            },
            predictor,
            directories,
            control,
            diff,
            extra,
            segments,
        })
    }
}

/// The segment table of a format 4 or 6 payload whose diff stream has raw and coded lengths `diff`:
/// 2 to [`MAX_SEGMENTS`] segments, none empty, whose lengths add up to the diff stream's.
fn segment_lens(rest: &mut &[u8], diff: (u64, u64)) -> Result<Vec<(u64, u64)>, DecodeError> {
    let count = varint::take(rest)?;
    if !(2..=MAX_SEGMENTS).contains(&count) {
        return Err(corrupt("number of diff segments out of range"));
    }
    let mut lens = Vec::new();
    let mut sums = (0u64, 0u64);
    for _ in 0..count {
        let (raw, packed) = (varint::take(rest)?, varint::take(rest)?);
        if raw == 0 || packed == 0 {
            return Err(corrupt("empty diff segment"));
        }
        sums = match (sums.0.checked_add(raw), sums.1.checked_add(packed)) {
            (Some(raws), Some(packeds)) => (raws, packeds),
            _ => return Err(corrupt("diff segments longer than the diff stream")),
        };
        lens.push((raw, packed));
    }
    if sums != diff {
        return Err(corrupt("diff segments do not add up to the diff stream"));
    }
    Ok(lens)
}

/// A decompressing reader of one stream that refuses to deliver more than its declared length.
struct Stream<'a> {
    inner: Option<BufReader<zstd::stream::read::Decoder<'static, &'a [u8]>>>,
    left: u64,
}

impl<'a> Stream<'a> {
    fn open(spec: StreamSpec<'a>, new_len: u64) -> Result<Self, DecodeError> {
        let inner = if spec.packed.is_empty() {
            None
        } else {
            let mut decoder = zstd::stream::read::Decoder::with_buffer(spec.packed)
                .map_err(DecodeError::Corrupt)?;
            decoder
                .window_log_max(stream_window(spec.raw, new_len))
                .map_err(DecodeError::Corrupt)?;
            Some(BufReader::with_capacity(1 << 16, decoder))
        };
        Ok(Stream {
            inner,
            left: spec.raw,
        })
    }

    /// Append exactly `n` bytes of the stream to `out`.
    fn take_into(&mut self, n: u64, out: &mut Vec<u8>) -> Result<(), DecodeError> {
        if n == 0 {
            return Ok(());
        }
        if n > self.left {
            return Err(corrupt("stream shorter than its steps need"));
        }
        let inner = self
            .inner
            .as_mut()
            .ok_or_else(|| corrupt("stream is empty"))?;
        let read = inner
            .take(n)
            .read_to_end(out)
            .map_err(DecodeError::Corrupt)? as u64;
        if read != n {
            return Err(corrupt("stream shorter than its declared length"));
        }
        self.left -= n;
        Ok(())
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        let mut byte = [0u8];
        match (self.left, self.inner.as_mut()) {
            (1.., Some(inner)) => {
                inner.read_exact(&mut byte).map_err(DecodeError::Corrupt)?;
                self.left -= 1;
                Ok(byte[0])
            }
            _ => Err(corrupt("control stream ends inside a step")),
        }
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(corrupt("varint overflows 64 bits"));
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(corrupt("varint longer than 10 bytes"))
    }

    /// Check that the stream was consumed exactly: all declared bytes, and nothing after them.
    fn finish(mut self) -> Result<(), DecodeError> {
        if self.left != 0 {
            return Err(corrupt("stream longer than its steps need"));
        }
        if let Some(inner) = self.inner.as_mut() {
            let more = inner.fill_buf().map_err(DecodeError::Corrupt)?;
            if !more.is_empty() {
                return Err(corrupt("stream longer than its declared length"));
            }
        }
        Ok(())
    }
}

/// The add steps of the control stream as (old offset, new offset, length), for the predictor;
/// checked as far as the predictor relies on them (the decoding checks the rest).
fn read_add_steps(
    header: &Header<'_>,
    old: &[u8],
    new_len: u64,
) -> Result<Vec<(u64, u64, u64)>, DecodeError> {
    let mut steps = Steps::open(header, old.len(), new_len)?;
    let mut found = Vec::new();
    while let Some(step) = steps.next()? {
        if step.add >= predict::MIN_ALIGN && found.len() < predict::MAX_ALIGN_STEPS {
            found.push((step.old_pos as u64, step.new_pos, step.add));
        }
    }
    Ok(found)
}

/// A step of the control stream (see the module documentation), within both files.
struct Step {
    /// Where its add reads the old file, and where it starts in the new file.
    old_pos: usize,
    old_end: usize,
    new_pos: u64,
    add: u64,
    copy: u64,
}

/// The steps of a payload's control stream in order, each checked to stay within the old file
/// (its add, then its seek) and the new file (its add and copy).
struct Steps<'a> {
    control: Stream<'a>,
    old_len: usize,
    new_len: u64,
    old_pos: usize,
    new_pos: u64,
}

impl<'a> Steps<'a> {
    fn open(header: &Header<'a>, old_len: usize, new_len: u64) -> Result<Self, DecodeError> {
        Ok(Steps {
            control: Stream::open(header.control, new_len)?,
            old_len,
            new_len,
            old_pos: 0,
            new_pos: 0,
        })
    }

    /// The next step; `None` once the control stream is all read.
    fn next(&mut self) -> Result<Option<Step>, DecodeError> {
        if self.control.left == 0 {
            return Ok(None);
        }
        let add = self.control.varint()?;
        let copy = self.control.varint()?;
        let seek = varint::unzigzag(self.control.varint()?);
        let new_end = self
            .new_pos
            .checked_add(add)
            .and_then(|end| end.checked_add(copy))
            .filter(|&end| end <= self.new_len)
            .ok_or(DecodeError::TooLong {
                expected: self.new_len,
            })?;
        let old_end = usize::try_from(add)
            .ok()
            .and_then(|add| self.old_pos.checked_add(add))
            .filter(|&end| end <= self.old_len)
            .ok_or_else(|| corrupt("step reads past the end of the old file"))?;
        let step = Step {
            old_pos: self.old_pos,
            old_end,
            new_pos: self.new_pos,
            add,
            copy,
        };
        self.new_pos = new_end;
        self.old_pos = isize::try_from(seek)
            .ok()
            .and_then(|seek| old_end.checked_add_signed(seek))
            .filter(|&pos| pos <= self.old_len)
            .ok_or_else(|| corrupt("step seeks outside the old file"))?;
        Ok(Some(step))
    }
}

/// Rebuild the new file from `old` and the streams, writing it to `sink` in chunks of at most
/// [`OUT_CHUNK`] bytes.
///
/// This thread writes the new file out, decoding the diff stream's segments as it comes to
/// them; where there are several, those after the first are also offered to other threads,
/// which decode them into memory when they are free (see [`decode_ahead`]).
fn apply(
    old: &[u8],
    header: &Header<'_>,
    new_len: u64,
    sink: &mut dyn Write,
) -> Result<(), DecodeError> {
    let predictor = match header.predictor {
        Predictor::None => None,
        kind @ (Predictor::Refs | Predictor::SplitPairs | Predictor::Symbols | Predictor::Wide) => {
            let alignment = predict::Alignment::new(&read_add_steps(header, old, new_len)?);
            predict::Predictor::owning(refs::scan(old, kind.version()), alignment)
        }
    };
    let predictor = predictor.as_ref();
    if header.segments.len() < 2 {
        let open = |k: usize| Ok(Source::Decoding(header.decoder(k)));
        return write_out(old, header, new_len, sink, predictor, open);
    }
    let ahead = Ahead::new(header.segments.len(), AHEAD);
    // On this thread, which need not be one of rayon's.
    rayon::in_place_scope(|scope| {
        for _ in 1..header.segments.len() {
            let ahead = &ahead;
            scope.spawn(move |_| decode_ahead(old, header, new_len, predictor, ahead));
        }
        write_out(old, header, new_len, sink, predictor, |k| {
            ahead.take(header, k)
        })
    })
}

/// Diff bytes that other threads decode ahead of the segment being written out, at most: what
/// a decoding holds besides its file, whatever the segments' lengths. Apply decodes files
/// under 32 MiB two at a time, and a universal file's slices at once beside [`BUFFERED_MAX`]
/// bytes of them, so that 8 MiB each keeps it within the largest file plus 64 MiB (two files
/// of 32 MiB: 2 x (32 + 8) MiB; a large universal file: its size + 32 + 2 x 8 MiB).
/// libharfbuzz's and the `cryptography` library's segments decoded ahead are 0.3 to 1.4 MB.
const AHEAD: u64 = 8 << 20;

/// Where each segment of a diff stream stands, between the thread writing the new file out and
/// the threads decoding segments ahead of it.
struct Ahead {
    slots: Mutex<Vec<Slot>>,
    /// Signalled when a segment decoded ahead is done.
    changed: Condvar,
    /// Where the segment being written starts, in diff bytes.
    reached: AtomicU64,
    /// How far beyond that a segment decoded ahead may end ([`AHEAD`]).
    limit: u64,
}

enum Slot {
    /// Not started: for whichever thread comes first.
    Open,
    /// Being decoded ahead, by another thread.
    Taken,
    /// Decoded ahead: its add steps' bytes of the new file (`None` where they hold a code
    /// directory's slots, which only the writing thread can predict), or why they could not
    /// be decoded.
    Done(Result<Option<Vec<u8>>, DecodeError>),
    /// Decoding, or decoded, by the writing thread.
    Used,
}

/// Where the writing thread takes a segment's bytes from.
enum Source<'a> {
    /// Its own decoding, as the new file is written.
    Decoding(Box<cm::DiffDecoder<'a>>),
    /// Another thread's, and how much of it is written.
    Decoded(Vec<u8>, usize),
}

impl<'a> Header<'a> {
    /// A decoder of segment `k` of the diff stream.
    fn decoder(&self, k: usize) -> Box<cm::DiffDecoder<'a>> {
        let segment = &self.segments[k];
        Box::new(cm::DiffDecoder::new(
            segment.packed,
            segment.raw,
            self.flags,
        ))
    }
}

impl Ahead {
    fn new(segments: usize, limit: u64) -> Self {
        Ahead {
            slots: Mutex::new((0..segments).map(|_| Slot::Open).collect()),
            changed: Condvar::new(),
            reached: AtomicU64::new(0),
            limit,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Segment `k`'s bytes for the writing thread: decoded by another thread, or to be decoded by
    /// this one where no other started it.
    fn take<'a>(&self, header: &Header<'a>, k: usize) -> Result<Source<'a>, DecodeError> {
        self.reached
            .store(header.segments[k].start, Ordering::Release);
        let mut slots = self.lock();
        loop {
            match std::mem::replace(&mut slots[k], Slot::Used) {
                Slot::Open | Slot::Done(Ok(None)) => {
                    return Ok(Source::Decoding(header.decoder(k)))
                }
                Slot::Done(Ok(Some(bytes))) => return Ok(Source::Decoded(bytes, 0)),
                Slot::Done(Err(e)) => return Err(e),
                Slot::Taken => {
                    slots[k] = Slot::Taken;
                    slots = self.changed.wait(slots).unwrap_or_else(|e| e.into_inner());
                }
                Slot::Used => return Err(corrupt("diff segment used twice")),
            }
        }
    }
}

/// Decode a segment into memory, on a thread that is free: the last that no thread has started
/// and that ends within [`AHEAD`] bytes of the one being written, so that the writing thread,
/// which goes forward, meets the threads decoding ahead as late as can be.
fn decode_ahead(
    old: &[u8],
    header: &Header<'_>,
    new_len: u64,
    predictor: Option<&predict::Predictor>,
    ahead: &Ahead,
) {
    let reached = ahead.reached.load(Ordering::Acquire);
    // A signed file's code directories end it, and the encoder starts a segment at their
    // slots: the last segment is the writing thread's.
    let writers = usize::from(!header.directories.is_empty());
    let k = {
        let mut slots = ahead.lock();
        let last = (1..slots.len() - writers).rev().find(|&k| {
            let end = header.segments[k].end();
            matches!(slots[k], Slot::Open) && end.saturating_sub(reached) <= ahead.limit
        });
        let Some(k) = last else { return };
        slots[k] = Slot::Taken;
        k
    };
    let mut done = Done {
        ahead,
        k,
        decoded: None,
    };
    done.decoded = Some(decode_segment(
        old,
        header,
        new_len,
        predictor,
        &header.segments[k],
    ));
}

/// Marks segment `k` decoded when dropped, as an error unless `decoded` was set: a decoding
/// that panicked must not leave the writing thread waiting for it (the panic then reaches the
/// caller at the end of [`apply`]'s scope).
struct Done<'a> {
    ahead: &'a Ahead,
    k: usize,
    decoded: Option<Result<Option<Vec<u8>>, DecodeError>>,
}

impl Drop for Done<'_> {
    fn drop(&mut self) {
        let decoded = self
            .decoded
            .take()
            .unwrap_or_else(|| Err(corrupt("diff segment's decoding failed")));
        self.ahead.lock()[self.k] = Slot::Done(decoded);
        self.ahead.changed.notify_all();
    }
}

/// The new file's bytes of the add steps that `segment` of the diff stream covers, decoded on
/// their own: the control stream followed from its start to the segment's steps. `None` where
/// they, or the byte after one of the steps' pieces (which the model looks at), hold slots of a
/// code directory: those are predicted from the pages written before them.
fn decode_segment(
    old: &[u8],
    header: &Header<'_>,
    new_len: u64,
    predictor: Option<&predict::Predictor>,
    segment: &Segment<'_>,
) -> Result<Option<Vec<u8>>, DecodeError> {
    let mut steps = Steps::open(header, old.len(), new_len)?;
    let mut diff = cm::DiffDecoder::new(segment.packed, segment.raw, header.flags);
    let holds_slots = |at: u64, len: u64| {
        header
            .directories
            .iter()
            .any(|d| d.slots_at < at + len && at < d.slots_end())
    };
    // Within AHEAD, checked before.
    let mut out = Vec::with_capacity(segment.raw as usize);
    let mut diff_pos = 0u64;
    while diff_pos < segment.end() {
        let Some(Step {
            old_pos,
            old_end,
            new_pos,
            add,
            ..
        }) = steps.next()?
        else {
            return Err(corrupt("diff stream longer than its steps need"));
        };
        if diff_pos + add > segment.start {
            let step = &old[old_pos..old_end];
            // The part of the step in the segment.
            let mut done = segment.start.saturating_sub(diff_pos) as usize;
            let to = (segment.end().min(diff_pos + add) - diff_pos) as usize;
            while done < to {
                let end = to.min(done + OUT_CHUNK);
                let at = new_pos + done as u64;
                let ahead = step.len().min(end + 1);
                if holds_slots(at, (ahead - done) as u64) {
                    return Ok(None);
                }
                let base = out.len();
                match predictor {
                    Some(predictor) => {
                        predictor.predict(old, old_pos, step.len(), new_pos, done..ahead, &mut out)
                    }
                    None => out.extend_from_slice(&step[done..ahead]),
                }
                diff.step_in_place(&mut out[base..], end - done, at)?;
                out.truncate(base + end - done);
                done = end;
            }
        }
        diff_pos += add;
    }
    if out.len() as u64 != segment.raw || !diff.consumed_exactly() {
        return Err(corrupt("diff segment does not decode to its length"));
    }
    Ok(Some(out))
}

/// The writing side of [`apply`]: follows the control stream, takes the add steps' bytes from
/// the segments that `take` gives, in order, and the copies' from the extra stream.
fn write_out<'a>(
    old: &[u8],
    header: &Header<'a>,
    new_len: u64,
    sink: &mut dyn Write,
    predictor: Option<&predict::Predictor>,
    take: impl Fn(usize) -> Result<Source<'a>, DecodeError>,
) -> Result<(), DecodeError> {
    let segments = &header.segments;
    let mut steps = Steps::open(header, old.len(), new_len)?;
    let mut segment = 0;
    let mut source = match segments.is_empty() {
        true => None,
        false => Some(take(0)?),
    };
    // Diff bytes left in the current segment.
    let mut segment_left = segments.first().map_or(0, |s| s.raw);
    let mut diff_left = header.diff.raw;
    let mut extra = Stream::open(header.extra, new_len)?;
    let mut out = Vec::with_capacity(usize::try_from(new_len).unwrap_or(0).min(OUT_CHUNK * 2));
    // The pages hashed so far of the code the new file's signature covers.
    let mut pages =
        (!header.directories.is_empty()).then(|| codesign::Pages::new(header.directories.clone()));
    // Bytes of the new file already written to `sink`.
    let mut flushed = 0u64;
    let mut flush = |out: &mut Vec<u8>,
                     flushed: &mut u64,
                     pages: &mut Option<codesign::Pages>|
     -> Result<(), DecodeError> {
        if let Some(pages) = pages {
            pages.feed(&out[(pages.fed() - *flushed) as usize..]);
        }
        sink.write_all(out).map_err(DecodeError::Output)?;
        *flushed += out.len() as u64;
        out.clear();
        Ok(())
    };
    while let Some(Step {
        old_pos,
        old_end,
        add,
        copy,
        ..
    }) = steps.next()?
    {
        if add > diff_left {
            return Err(corrupt("diff stream shorter than its steps need"));
        }
        diff_left -= add;
        let step = &old[old_pos..old_end];
        let step_at = flushed + out.len() as u64;
        let mut done = 0;
        while done < step.len() {
            // Within the chunk and the segment; the segments' lengths add up to the diff
            // stream's, which holds the step (checked above).
            let mut end = step.len().min(done + OUT_CHUNK);
            end = end.min(done.saturating_add(usize::try_from(segment_left).unwrap_or(usize::MAX)));
            let at = flushed + out.len() as u64;
            if let Some(pages) = &pages {
                end = done + pages.cut(at, (end - done) as u64) as usize;
            }
            match source.as_mut() {
                Some(Source::Decoding(diff)) => {
                    // The chunk and the byte after it, which the diff model looks at, predicted
                    // where the new file's bytes go, and the diff added there.
                    let base = out.len();
                    let ahead = step.len().min(end + 1);
                    match predictor {
                        Some(predictor) => predictor.predict(
                            old,
                            old_pos,
                            step.len(),
                            step_at,
                            done..ahead,
                            &mut out,
                        ),
                        None => out.extend_from_slice(&step[done..ahead]),
                    }
                    if let Some(pages) = pages.as_mut() {
                        if pages.holds_slots(at, (ahead - done) as u64) {
                            pages.feed(&out[(pages.fed() - flushed) as usize..base]);
                            pages.fill(at, &mut out[base..]);
                        }
                    }
                    diff.step_in_place(&mut out[base..], end - done, at)?;
                    out.truncate(base + end - done);
                }
                Some(Source::Decoded(bytes, used)) => {
                    // A segment decoded ahead holds exactly its length.
                    out.extend_from_slice(&bytes[*used..*used + (end - done)]);
                    *used += end - done;
                }
                None => return Err(corrupt("diff stream shorter than its steps need")),
            }
            segment_left -= (end - done) as u64;
            done = end;
            if segment_left == 0 {
                if let Some(Source::Decoding(diff)) = &source {
                    if !diff.consumed_exactly() {
                        return Err(corrupt("diff segment longer than its bytes need"));
                    }
                }
                segment += 1;
                (source, segment_left) = match segments.get(segment) {
                    Some(next) => (Some(take(segment)?), next.raw),
                    None => (None, 0),
                };
            }
            if out.len() >= OUT_CHUNK {
                flush(&mut out, &mut flushed, &mut pages)?;
            }
        }
        let mut left = copy;
        while left > 0 {
            let n = left.min(OUT_CHUNK as u64);
            extra.take_into(n, &mut out)?;
            left -= n;
            if out.len() >= OUT_CHUNK {
                flush(&mut out, &mut flushed, &mut pages)?;
            }
        }
    }
    steps.control.finish()?;
    if diff_left != 0 || segment != segments.len() {
        return Err(corrupt("diff stream longer than its steps need"));
    }
    extra.finish()?;
    let total = flushed + out.len() as u64;
    if total != new_len {
        return Err(DecodeError::WrongLength {
            expected: new_len,
            actual: total,
        });
    }
    flush(&mut out, &mut flushed, &mut pages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::noise;

    /// The payload without prediction.
    fn unpredicted(old: &[u8], new: &[u8]) -> Vec<u8> {
        Bsdiff::UNPREDICTED
            .encode(old, new)
            .expect("encode")
            .expect("applies")
    }

    pub(super) fn round_trip(old: &[u8], new: &[u8]) -> Vec<u8> {
        let payload = Bsdiff::PLAIN
            .encode(old, new)
            .expect("encode")
            .expect("applies");
        let decoded = Bsdiff::PLAIN
            .decode(old, &payload, new.len() as u64)
            .expect("decode");
        assert_eq!(decoded, new);
        assert_eq!(
            Bsdiff::PLAIN
                .encode(old, new)
                .expect("encode")
                .expect("applies"),
            payload,
            "deterministic"
        );
        payload
    }

    /// An executable-like file: code with 8-byte pointers sprinkled in.
    fn program(len: usize, seed: u64) -> Vec<u8> {
        let mut data = noise(seed, len);
        for (i, chunk) in data.chunks_exact_mut(64).enumerate() {
            chunk[..8].copy_from_slice(&(0x40_0000u64 + i as u64 * 64).to_le_bytes());
        }
        data
    }

    /// Two universal files whose slices are of the same machines in the same order: code
    /// copied into the x86-64 slice moves the arm64 slice on, and a byte changed in each.
    fn universal_pair() -> (Vec<u8>, Vec<u8>) {
        let (x86, arm64) = (program(700_000, 1), program(600_000, 2));
        let old = refs::tests::universal_x86_arm64(&x86, &arm64);
        let mut x86_new = x86.clone();
        x86_new.splice(1000..1000, x86[200_000..220_000].iter().copied());
        x86_new[300_000] ^= 1;
        let mut arm64_new = arm64.clone();
        arm64_new[5000] ^= 1;
        (old, refs::tests::universal_x86_arm64(&x86_new, &arm64_new))
    }

    /// Such files are coded slice by slice (see [`slice_cuts`]), each slice as a file of its
    /// own; other layouts and small files are coded whole.
    #[test]
    fn universal_files_are_coded_slice_by_slice() {
        let (old, new) = universal_pair();
        let second = |data: &[u8]| refs::macho_slices(data).expect("universal")[1].0 as usize;
        assert_ne!(second(&old), second(&new));
        let cuts = slice_cuts(&old, &new);
        assert_eq!(cuts, [(second(&old), second(&new))]);
        let payload = round_trip(&old, &new);
        assert!(payload.starts_with(MAGIC_SLICES));
        let parts: Vec<Vec<u8>> = split_at_cuts(&old, &new, &cuts)
            .iter()
            .map(|&(_, old, new)| Bsdiff::PLAIN.encode_file(old, new).expect("encode"))
            .collect();
        assert!(
            parts[1].len() < 200,
            "one changed byte: {} bytes",
            parts[1].len()
        );
        assert!(payload.ends_with(&parts.concat()));
        assert!(payload.len() < parts[0].len() + parts[1].len() + 24);

        let thin = &old[0x4000..0x4000 + 200_000];
        let (x86, arm64) = (program(1000, 1), program(1000, 2));
        let two_x86 = refs::tests::universal_x86(&x86);
        let small = refs::tests::universal_x86_arm64(&x86, &arm64);
        let mut small_new = small.clone();
        small_new[0x4000 + 500] ^= 1;
        for (old, new) in [
            (&old[..], thin),
            (thin, &new[..]),
            (&old[..], &two_x86[..]),
            (&two_x86[..], &new[..]),
            (&small[..], &small_new[..]),
        ] {
            assert!(slice_cuts(old, new).is_empty());
            let payload = round_trip(old, new);
            assert!(!payload.starts_with(MAGIC_SLICES));
        }
    }

    /// Every single-byte corruption of `payload` is caught or decodes to `len` bytes.
    fn every_flip_is_caught_or_keeps_the_length(old: &[u8], payload: &[u8], len: u64) {
        for i in 0..payload.len() {
            let mut bad = payload.to_vec();
            bad[i] ^= 0x41;
            if let Ok(decoded) = Bsdiff::PLAIN.decode(old, &bad, len) {
                assert_eq!(decoded.len() as u64, len, "byte {i} flipped");
            }
        }
    }

    /// A slice-by-slice payload from its table's numbers and its parts' payloads.
    fn slices_payload(table: &[[u64; 3]], count: u64, parts: &[&[u8]]) -> Vec<u8> {
        let mut out = MAGIC_SLICES.to_vec();
        varint::put(&mut out, count);
        for row in table {
            for &value in row {
                varint::put(&mut out, value);
            }
        }
        for part in parts {
            out.extend_from_slice(part);
        }
        out
    }

    #[test]
    fn refuses_bad_slice_payloads() {
        let old = noise(7, 20_000);
        let mut new = old.clone();
        new.splice(15_000..15_000, noise(8, 300));
        new[100] ^= 1;
        let (len, cut) = (new.len() as u64, 10_000usize);
        let first = Bsdiff::PLAIN
            .encode_file(&old[..cut], &new[..cut])
            .expect("encode");
        let second = Bsdiff::PLAIN
            .encode_file(&old[cut..], &new[cut..])
            .expect("encode");
        let (p1, p2) = (first.len() as u64, second.len() as u64);
        let rest = len - cut as u64;
        // A table of two parts, `first` and `second` in that order.
        let two = |table: [[u64; 3]; 2]| slices_payload(&table, 2, &[&first, &second]);
        let table = [[0, 10_000, p1], [10_000, rest, p2]];
        let good = two(table);
        assert_eq!(Bsdiff::PLAIN.decode(&old, &good, len).expect("decode"), new);
        for cut in [4, 5, 8, good.len() / 2, good.len() - 1] {
            assert!(
                Bsdiff::PLAIN.decode(&old, &good[..cut], len).is_err(),
                "cut at {cut}"
            );
        }
        let mut longer = good.clone();
        longer.push(0);
        let bad = [
            longer,
            // Counts out of range, and one that the table does not hold.
            slices_payload(&[[0, len, p1]], 1, &[&first]),
            slices_payload(&table, 9, &[&first, &second]),
            slices_payload(&table, 3, &[&first, &second]),
            // The first part not at the old file's start; parts out of order or empty; a part
            // past the old file's end.
            two([[1, 10_000, p1], [10_000, rest, p2]]),
            two([[0, 10_000, p1], [0, rest, p2]]),
            two([[0, 10_000, p1], [20_000, rest, p2]]),
            two([[0, 10_000, p1], [30_000, rest, p2]]),
            // New lengths that do not add up, or overflow.
            two([[0, 10_000, p1], [10_000, rest + 1, p2]]),
            two([[0, 10_000, p1], [10_000, u64::MAX, p2]]),
            two([[0, 9_999, p1], [10_000, rest + 1, p2]]),
            // A part's payload past the end, or swapped with the other's.
            two([[0, 10_000, p1], [10_000, rest, p2 + 1]]),
            slices_payload(
                &[[0, 10_000, p2], [10_000, rest, p1]],
                2,
                &[&second, &first],
            ),
            // A part that is itself coded slice by slice.
            slices_payload(
                &[[0, 10_000, p1], [10_000, rest, good.len() as u64]],
                2,
                &[&first, &good],
            ),
        ];
        for (k, bad) in bad.iter().enumerate() {
            assert!(
                Bsdiff::PLAIN.decode(&old, bad, len).is_err(),
                "bad payload {k}"
            );
        }
        assert!(Bsdiff::PLAIN.decode(&old[..15_000], &good, len).is_err());
        assert!(Bsdiff::PLAIN.decode(&old, &good, len - 1).is_err());
        every_flip_is_caught_or_keeps_the_length(&old, &good, len);
    }

    /// Noise of `len` bytes, a byte changed near each end, coded slice by slice in two parts
    /// cut at `cut` (the same place in both files): the old file, the new one and the payload.
    fn two_parts(len: usize, cut: usize) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let old = noise(9, len);
        let mut new = old.clone();
        new[10] ^= 1;
        new[len - 10] ^= 1;
        let parts: Vec<Vec<u8>> = [0..cut, cut..len]
            .into_iter()
            .map(|r| {
                Bsdiff::PLAIN
                    .encode_file(&old[r.clone()], &new[r])
                    .expect("encode")
            })
            .collect();
        let table = [
            [0, cut as u64, parts[0].len() as u64],
            [cut as u64, (len - cut) as u64, parts[1].len() as u64],
        ];
        let payload = slices_payload(&table, 2, &[&parts[0], &parts[1]]);
        (old, new, payload)
    }

    /// Parts beyond [`BUFFERED_MAX`] together are decoded one after the other, as they are
    /// written: the same bytes.
    #[test]
    fn large_parts_are_decoded_in_turn() {
        let (old, new, payload) = two_parts((BUFFERED_MAX + 5000) as usize, 4000);
        let decoded = Bsdiff::PLAIN.decode(&old, &payload, new.len() as u64);
        assert!(decoded.expect("decode") == new);
    }

    /// A sink that takes `room` bytes, then fails; it records the size of every write.
    struct Filling {
        room: usize,
        writes: Vec<usize>,
        bytes: Vec<u8>,
    }

    impl Write for Filling {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.bytes.len() + buf.len() > self.room {
                return Err(io::Error::other("no room left"));
            }
            self.writes.push(buf.len());
            self.bytes.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The second part, decoded beside the first, reaches the sink in pieces of at most
    /// [`OUT_CHUNK`] (the spare pieces filled again); a sink that fails, in the first part or
    /// in the second, has its own error returned.
    #[test]
    fn parts_decoded_beside_the_first_are_handed_over_in_pieces() {
        let (len, cut) = (4 * OUT_CHUNK + 123, 70_000);
        let (old, new, payload) = two_parts(len, cut);
        let mut sink = Filling {
            room: usize::MAX,
            writes: Vec::new(),
            bytes: Vec::new(),
        };
        Bsdiff::PLAIN
            .decode_into(&old, &payload, len as u64, &mut sink)
            .expect("decode");
        assert!(sink.bytes == new);
        assert!(
            sink.writes.iter().all(|&n| n <= OUT_CHUNK),
            "{:?}",
            sink.writes
        );
        assert!(sink.writes.len() >= 5, "{:?}", sink.writes);
        for room in [cut / 2, cut + OUT_CHUNK + 10, len - 1] {
            let mut sink = Filling {
                room,
                writes: Vec::new(),
                bytes: Vec::new(),
            };
            let err = Bsdiff::PLAIN
                .decode_into(&old, &payload, len as u64, &mut sink)
                .expect_err("the sink is full");
            match err {
                DecodeError::Output(e) => assert_eq!(e.to_string(), "no room left", "room {room}"),
                other => panic!("room {room}: {other}"),
            }
            assert!(new.starts_with(&sink.bytes));
        }

        // A part whose steps read old bytes past its slice fails as it is decoded: the first
        // (its bytes are the old file's after the cut), then the second's decoding stops at
        // its next piece; or the second, in its last 50 KB (new bytes that only an old file
        // longer than its slice holds), after the pieces before. Either way the payload's error
        // comes back, not the stopped handover's.
        let encode = |old: &[u8], new: &[u8]| Bsdiff::PLAIN.encode_file(old, new).expect("encode");
        let tail = noise(12, 50_000);
        let late = [&new[cut..len - tail.len()], &tail[..]].concat();
        let cases = [
            (
                encode(&old[..2 * cut], &old[cut..2 * cut]),
                encode(&old[cut..], &new[cut..]),
            ),
            (
                encode(&old[..cut], &new[..cut]),
                encode(&[&old[cut..], &tail[..]].concat(), &late),
            ),
        ];
        for (k, (first, second)) in cases.iter().enumerate() {
            let table = [
                [0, cut as u64, first.len() as u64],
                [cut as u64, (len - cut) as u64, second.len() as u64],
            ];
            let payload = slices_payload(&table, 2, &[first, second]);
            let mut sink = Filling {
                room: usize::MAX,
                writes: Vec::new(),
                bytes: Vec::new(),
            };
            let err = Bsdiff::PLAIN
                .decode_into(&old, &payload, len as u64, &mut sink)
                .expect_err("a part reads past its slice");
            assert!(matches!(err, DecodeError::Corrupt(_)), "case {k}: {err}");
            let written = match k {
                0 => 0,
                _ => cut + OUT_CHUNK,
            };
            assert!(
                sink.bytes.len() >= written,
                "case {k}: {}",
                sink.bytes.len()
            );
        }
    }

    /// `tests/data/bsdiff-slices.bin`, the payload of [`universal_pair`], still decodes to its
    /// file; `BSI_BLESS=1` writes it again.
    #[test]
    fn the_stored_slices_payload_still_decodes() {
        let (old, new) = universal_pair();
        let stored = stored_payload("bsdiff-slices.bin", &old, &new);
        assert!(stored.starts_with(MAGIC_SLICES));
    }

    /// `tests/data/{name}`, the payload of `old -> new` (files too large to store, and so built
    /// here rather than in the format tests), checked to decode to `new`; `BSI_BLESS=1` writes
    /// it again.
    fn stored_payload(name: &str, old: &[u8], new: &[u8]) -> Vec<u8> {
        stored_payload_of(Bsdiff::PLAIN, name, old, new)
    }

    /// [`stored_payload`] of a payload that `encoder` wrote.
    fn stored_payload_of(encoder: Bsdiff, name: &str, old: &[u8], new: &[u8]) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(name);
        if std::env::var_os("BSI_BLESS").is_some() {
            let payload = encoder.encode(old, new).expect("encode");
            std::fs::write(&path, payload.expect("applies")).expect("write the payload");
        }
        let stored = std::fs::read(&path).expect("read the payload");
        let decoded = Bsdiff::PLAIN
            .decode(old, &stored, new.len() as u64)
            .expect("decode");
        assert!(decoded == new, "{name} no longer gives its file");
        stored
    }

    /// bsdiff with segments of a few coded bytes, so that small files have several.
    const SEGMENTED: Bsdiff = Bsdiff {
        predict: true,
        segment_limit: 4,
    };

    /// Predicted libraries whose diff streams have changes all along them.
    fn segmented_pairs() -> [(Vec<u8>, Vec<u8>); 2] {
        ["elf-1", "elf-1.arm64"].map(|name| {
            (
                refs::tests::fixture(&format!("{name}.old.so")),
                refs::tests::fixture(&format!("{name}.new.so")),
            )
        })
    }

    /// The first of [`segmented_pairs`] and its payload in segments.
    fn segmented_library() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let [(old, new), _] = segmented_pairs();
        let payload = SEGMENTED
            .encode(&old, &new)
            .expect("encode")
            .expect("applies");
        (old, new, payload)
    }

    /// The predictor that decoding the payload of `header` uses.
    fn predictor_for(header: &Header<'_>, old: &[u8], len: u64) -> Option<predict::Predictor> {
        let alignment = predict::Alignment::new(&read_add_steps(header, old, len).expect("steps"));
        predict::Predictor::owning(refs::scan(old, header.predictor.version()), alignment)
    }

    /// The new file from `old` and `payload`, each segment of the diff stream for which
    /// `ahead` is true decoded on its own as another thread would (where it can be), the others
    /// by the writing thread; and how many were decoded on their own.
    fn decoded_with(
        old: &[u8],
        payload: &[u8],
        len: u64,
        ahead: impl Fn(usize) -> bool,
    ) -> Result<(Vec<u8>, usize), DecodeError> {
        let header = Header::parse(payload, len)?;
        let predictor = predictor_for(&header, old, len);
        let on_their_own = std::cell::Cell::new(0);
        let take = |k: usize| -> Result<Source<'_>, DecodeError> {
            if ahead(k) {
                let segment = &header.segments[k];
                if let Some(bytes) = decode_segment(old, &header, len, predictor.as_ref(), segment)?
                {
                    on_their_own.set(on_their_own.get() + 1);
                    return Ok(Source::Decoded(bytes, 0));
                }
            }
            Ok(Source::Decoding(header.decoder(k)))
        };
        let mut out = Vec::new();
        write_out(old, &header, len, &mut out, predictor.as_ref(), take)?;
        Ok((out, on_their_own.get()))
    }

    #[test]
    fn diff_segments_decode_alike_on_any_thread() {
        for (old, new) in segmented_pairs() {
            let len = new.len() as u64;
            let payload = SEGMENTED
                .encode(&old, &new)
                .expect("encode")
                .expect("applies");
            assert_eq!(&payload[..4], MAGIC_6);
            let segments = Header::parse(&payload, len).expect("parse").segments.len();
            assert!(segments >= 3, "{segments} segments");
            // With the default limit, the same files keep one diff stream.
            let plain = Bsdiff::PLAIN
                .encode(&old, &new)
                .expect("encode")
                .expect("applies");
            assert_eq!(&plain[..4], MAGIC_5);
            assert_eq!(
                Bsdiff::PLAIN.decode(&old, &payload, len).expect("decode"),
                new
            );
            for k in 0..segments {
                let (decoded, n) = decoded_with(&old, &payload, len, |j| j == k).expect("decode");
                assert!(
                    decoded == new,
                    "segment {k} of {segments} decoded on its own"
                );
                assert_eq!(n, 1);
            }
            let (decoded, n) = decoded_with(&old, &payload, len, |_| true).expect("decode");
            assert!(decoded == new);
            assert_eq!(n, segments);
        }
    }

    /// Threads decode ahead only segments that end within the limit of where the writing
    /// thread is, the last such first, and each once; the writer then finds them decoded.
    #[test]
    fn segments_are_decoded_ahead_within_the_limit_last_first() {
        let (old, new, payload) = segmented_library();
        let len = new.len() as u64;
        let header = Header::parse(&payload, len).expect("parse");
        let predictor = predictor_for(&header, &old, len);
        let segments = &header.segments;
        let n = segments.len();
        // The writer at segment 1; a limit that reaches just to the end of segment n / 2.
        let limit = segments[n / 2].end() - segments[1].start;
        let ahead = Ahead::new(n, limit);
        ahead.reached.store(segments[1].start, Ordering::Release);
        ahead.lock()[1] = Slot::Used;
        let taken = |ahead: &Ahead| -> Vec<usize> {
            let slots = ahead.lock();
            (0..n)
                .filter(|&k| matches!(slots[k], Slot::Done(_)))
                .collect()
        };
        decode_ahead(&old, &header, len, predictor.as_ref(), &ahead);
        assert_eq!(
            taken(&ahead),
            [n / 2],
            "the last segment within the limit first"
        );
        for _ in 0..n {
            decode_ahead(&old, &header, len, predictor.as_ref(), &ahead);
        }
        assert_eq!(taken(&ahead), (2..=n / 2).collect::<Vec<_>>());
        let mut out = Vec::new();
        for k in 2..n {
            let source = ahead.take(&header, k).expect("take");
            assert_eq!(
                matches!(source, Source::Decoded(..)),
                k <= n / 2,
                "segment {k}"
            );
            if let Source::Decoded(bytes, _) = source {
                out.push(bytes.len() as u64);
            }
        }
        let raws: Vec<u64> = segments[2..=n / 2].iter().map(|s| s.raw).collect();
        assert_eq!(out, raws);
    }

    /// Segments holding a code directory's slots, which are predicted from the pages before
    /// them, are left to the writing thread; the others are not.
    #[test]
    fn segments_holding_slots_are_not_decoded_ahead() {
        let (old, new, payload) = segmented_library();
        let len = new.len() as u64;
        let mut header = Header::parse(&payload, len).expect("parse");
        let predictor = predictor_for(&header, &old, len);
        // 64 pages' slots of SHA-256 in the middle of the file.
        let slots_at = len / 2;
        header.directories = vec![codesign::Directory {
            slice: 0,
            code_limit: 64 << 12,
            page_log: 12,
            hash: codesign::HashKind::Sha256,
            slots_at,
        }];
        let mut declined = Vec::new();
        for (k, segment) in header.segments.iter().enumerate() {
            let decoded =
                decode_segment(&old, &header, len, predictor.as_ref(), segment).expect("decode");
            if decoded.is_none() {
                declined.push(k);
            }
        }
        assert!(
            !declined.is_empty() && declined.len() < header.segments.len() / 2,
            "declined {declined:?} of {}",
            header.segments.len()
        );
    }

    /// A format 4 or 6 payload with its segment table replaced by `table` (count, then raw and
    /// coded lengths).
    fn with_segment_table(payload: &[u8], len: u64, table: &[u64]) -> Vec<u8> {
        let header = Header::parse(payload, len).expect("parse");
        let mut out = payload[..4].to_vec();
        out.push(header.predictor as u8);
        assert!(header.directories.is_empty(), "an unsigned file");
        for spec in [header.control, header.diff, header.extra] {
            varint::put(&mut out, spec.raw);
            varint::put(&mut out, spec.packed.len() as u64);
        }
        for &n in table {
            varint::put(&mut out, n);
        }
        for spec in [header.control, header.diff, header.extra] {
            out.extend_from_slice(spec.packed);
        }
        out
    }

    /// Format 6, which the encoder writes, and format 4 (the stored payload of the test below).
    #[test]
    fn refuses_bad_segment_tables() {
        let (old, new, payload) = segmented_library();
        assert_eq!(&payload[..4], MAGIC_6);
        refuses_bad_segment_tables_of(&old, &new, &payload);
        let stored = refs::tests::fixture("bsdiff-segments.bin");
        assert_eq!(&stored[..4], MAGIC_4);
        refuses_bad_segment_tables_of(&old, &new, &stored);
    }

    fn refuses_bad_segment_tables_of(old: &[u8], new: &[u8], payload: &[u8]) {
        let len = new.len() as u64;
        let header = Header::parse(payload, len).expect("parse");
        let mut good = vec![header.segments.len() as u64];
        good.extend(
            header
                .segments
                .iter()
                .flat_map(|s| [s.raw, s.packed.len() as u64]),
        );
        let rebuilt = with_segment_table(payload, len, &good);
        assert_eq!(rebuilt, payload, "the table as the encoder wrote it");
        let (raw, coded) = (header.diff.raw, header.diff.packed.len() as u64);
        let (r0, c0) = (good[1], good[2]);
        let tables: Vec<Vec<u64>> = vec![
            vec![0],
            vec![1, raw, coded],
            vec![MAX_SEGMENTS + 1, raw, coded],
            vec![2, raw, coded, 0, 0],
            vec![2, 0, c0, raw, coded - c0],
            vec![2, r0, 0, raw - r0, coded],
            vec![2, r0, c0, raw - r0 + 1, coded - c0],
            vec![2, r0, c0, raw - r0, coded - c0 - 1],
            vec![2, r0 + 1, c0, raw - r0 - 1, coded - c0],
            vec![2, r0, c0 + 1, raw - r0, coded - c0 - 1],
            vec![2, u64::MAX, c0, raw - r0, coded - c0],
            good[..good.len() - 1].to_vec(),
        ];
        for table in &tables {
            let bad = with_segment_table(payload, len, table);
            assert!(
                Bsdiff::PLAIN.decode(old, &bad, len).is_err(),
                "table {table:?} accepted"
            );
        }
        for cut in 0..payload.len() {
            assert!(Bsdiff::PLAIN.decode(old, &payload[..cut], len).is_err());
        }
        every_flip_is_caught_or_keeps_the_length(old, payload, len);
    }

    #[test]
    fn the_stored_segmented_payload_still_decodes() {
        let [(old, new), _] = segmented_pairs();
        let stored = stored_payload_of(SEGMENTED, "bsdiff-segments.bin", &old, &new);
        assert_eq!(&stored[..4], MAGIC_4);
    }

    #[test]
    fn the_stored_format_6_payload_still_decodes() {
        let [(old, new), _] = segmented_pairs();
        let stored = stored_payload_of(SEGMENTED, "bsdiff-segments-6.bin", &old, &new);
        assert_eq!(&stored[..4], MAGIC_6);
    }

    #[test]
    fn round_trips() {
        let old = noise(1, 50_000);
        round_trip(&[], &[]);
        round_trip(&[], &old);
        round_trip(&old, &[]);
        round_trip(&old, &old);
        round_trip(b"a", b"b");

        let mut edited = old.clone();
        edited[20_000] ^= 0x55;
        let payload = round_trip(&old, &edited);
        assert!(
            payload.len() < 200,
            "small edit costs {} bytes",
            payload.len()
        );

        let mut shifted = old.clone();
        shifted.splice(100..100, noise(2, 777));
        shifted.drain(30_000..30_500);
        let payload = round_trip(&old, &shifted);
        assert!(
            payload.len() < 1200,
            "insertion costs {} bytes",
            payload.len()
        );

        round_trip(&old, &noise(3, 30_000));
    }

    #[test]
    fn shifted_pointers_cost_little() {
        let old = program(200_000, 4);
        let mut new = old.clone();
        for chunk in new.chunks_exact_mut(64) {
            let pointer = u64::from_le_bytes(chunk[..8].try_into().expect("8 bytes"));
            chunk[..8].copy_from_slice(&(pointer + 0x1040).to_le_bytes());
        }
        let payload = round_trip(&old, &new);
        assert!(
            payload.len() < 2000,
            "shifted pointers cost {} bytes",
            payload.len()
        );
    }

    /// The payload of `new` against `old`, which round-trips, has `predictor`, and takes at
    /// most `share` (a fraction) of the payload without prediction.
    fn predicted_within(
        old: &[u8],
        new: &[u8],
        predictor: Predictor,
        share: (usize, usize),
    ) -> Vec<u8> {
        let predicted = round_trip(old, new);
        assert_eq!(predicted[4], predictor as u8);
        let plain = unpredicted(old, new);
        assert!(
            predicted.len() * share.1 <= plain.len() * share.0,
            "{predictor:?}: predicted {} bytes against {} without",
            predicted.len(),
            plain.len()
        );
        predicted
    }

    /// A library relinked with a function inserted in the middle: the references that only
    /// moved cost nothing once predicted.
    #[test]
    fn prediction_pays_on_a_relinked_library() {
        let old = refs::tests::fixture("elf-1.old.so");
        let new = refs::tests::fixture("elf-1.new.so");
        let predicted = predicted_within(&old, &new, Predictor::Refs, (7, 10));
        assert_eq!(&predicted[..4], MAGIC_5, "format 5");
        assert_eq!(unpredicted(&old, &new)[4], Predictor::None as u8);
        // The same library built for AArch64, whose ADRPs gcc often completes further on.
        let old = refs::tests::fixture("elf-1.arm64.old.so");
        let new = refs::tests::fixture("elf-1.arm64.new.so");
        predicted_within(&old, &new, Predictor::SplitPairs, (8, 10));
        // Files that are not ELF files of a known machine are not predicted.
        let noise = noise(12, 30_000);
        let mut edited = noise.clone();
        edited[100] ^= 1;
        assert_eq!(round_trip(&noise, &edited)[4], Predictor::None as u8);
    }

    /// Code of calls between pseudo-instructions, laid out with an insertion at `insert_at`:
    /// every call that crosses the insertion changes its displacement, nothing else changes.
    fn relinked_code(insert_at: usize, inserted: usize) -> Vec<u8> {
        let filler = noise(13, 60_000);
        let targets = noise(14, 20_000);
        // Instruction k: a call to instruction targets[k] * 20 (one in 20), else 3 filler bytes.
        let is_call = |k: usize| targets[k].is_multiple_of(20);
        let mut offsets = Vec::with_capacity(20_001);
        let mut at = 0usize;
        for k in 0..20_000 {
            if k == insert_at {
                at += inserted;
            }
            offsets.push(at);
            at += if is_call(k) { 5 } else { 3 };
        }
        let mut code = Vec::with_capacity(at);
        for k in 0..20_000 {
            if k == insert_at {
                code.extend((0..inserted).map(|i| 0x90 + (i % 16) as u8));
            }
            if is_call(k) {
                let target = offsets[(usize::from(targets[k]) * 78) % 20_000];
                let disp = target as i64 - (offsets[k] + 5) as i64;
                code.push(0xe8);
                code.extend_from_slice(&(disp as i32).to_le_bytes());
            } else {
                // nop-like bytes: never an opcode the reference scan looks at
                code.extend((0..3).map(|i| 0x90 + filler[3 * k + i] % 16));
            }
        }
        code
    }

    /// The quick search lines a relinked program up as the full one does: one alignment on
    /// each side of the insertion, the changed calls differences within it.
    #[test]
    fn a_quick_search_lines_up_a_relinked_program_as_the_full_one() {
        let old = refs::tests::elf_with_code(&relinked_code(usize::MAX, 0));
        let new = refs::tests::elf_with_code(&relinked_code(10_000, 64));
        let index = matcher::Index::new(&old).expect("index");
        let full = search(&index, &new, REGION, matcher::Search::Full);
        let quick = search(&index, &new, REGION, matcher::Search::Quick);
        assert_eq!(add_steps(&quick), add_steps(&full));
    }

    /// In an ELF file, and in a universal Mach-O file whose two slices moved alike.
    #[test]
    fn calls_that_only_moved_cost_nothing() {
        type File = fn(&[u8]) -> Vec<u8>;
        let files: [File; 2] = [refs::tests::elf_with_code, refs::tests::universal_x86];
        for file in files {
            let old = file(&relinked_code(usize::MAX, 0));
            let new = file(&relinked_code(10_000, 64));
            predicted_within(&old, &new, Predictor::Refs, (1, 4));
        }
    }

    /// The slots of a code directory are predicted as the hashes of the pages the decoder wrote,
    /// whether the matcher added them or left them to the extra stream, and in a file larger
    /// than the decoder's chunks.
    #[test]
    fn code_signature_slots_cost_nothing() {
        for len in [60_000, (OUT_CHUNK * 2) + 5_000] {
            let (old, new) = codesign::tests::signed_pair(len);
            let changed_pages = (1..len / 4096).step_by(3).count();
            let payload = round_trip(&old, &new);
            assert_ne!(payload[4] & SIGNED, 0, "code directories named");
            // The same file with a stale slot in each directory: none is named, and every
            // changed slot costs.
            let mut stale = new.clone();
            for d in codesign::directories(&new) {
                stale[d.slots_at as usize] ^= 1;
            }
            let unsigned = round_trip(&old, &stale);
            assert_eq!(unsigned[4] & SIGNED, 0);
            assert!(
                payload.len() + changed_pages * 52 * 3 / 4 < unsigned.len(),
                "{len} bytes: {} against {} with stale slots",
                payload.len(),
                unsigned.len()
            );
        }
        // Slots the matcher finds nothing for: a new file whose pages all changed.
        let (old, _) = codesign::tests::signed_pair(60_000);
        let new = codesign::tests::signed(&noise(32, 60_000), 12, &[codesign::HashKind::Sha256]);
        let mut steps = Vec::new();
        let payload = round_trip(&old, &new);
        let header = Header::parse(&payload, new.len() as u64).expect("header");
        assert_eq!(header.directories.len(), 1);
        steps.extend(read_add_steps(&header, &old, new.len() as u64).expect("steps"));
        let d = header.directories[0];
        let added: u64 = steps
            .iter()
            .map(|&(_, at, len)| {
                let (from, to) = (at.max(d.slots_at), (at + len).min(d.slots_at + 15 * 32));
                to.saturating_sub(from)
            })
            .sum();
        assert_eq!(added, 15 * 32, "every slot added");
    }

    /// `tests/data/macho-3.{old,new}`, the signed pair of the test above, used by the format
    /// tests; `BSI_BLESS=1` writes them again.
    #[test]
    fn the_stored_signed_pair_is_the_signed_program() {
        let (old, new) = codesign::tests::signed_pair(60_000);
        stored_pair("macho-3", old, new);
    }

    /// A thin x86-64 Mach-O library relinked with 64 bytes inserted in its code (see
    /// [`relinked_code`]), without symbols, and with a symbol every 97 bytes of code whose value
    /// moved with it.
    fn moved_symbols_pair() -> [(Vec<u8>, Vec<u8>); 2] {
        const X86_64: u32 = 0x0100_0007;
        let (old_code, new_code) = (relinked_code(usize::MAX, 0), relinked_code(10_000, 64));
        let targets = noise(14, 20_000);
        let inserted_at: u64 = (0..10_000)
            .map(|k| if targets[k].is_multiple_of(20) { 5 } else { 3 })
            .sum();
        let symbols = |moved: bool| -> Vec<(u8, u64)> {
            (0..old_code.len() as u64)
                .step_by(97)
                .map(|v| match moved && v >= inserted_at {
                    true => (0x0f, 0x1000 + v + 64),
                    false => (0x0f, 0x1000 + v),
                })
                .collect()
        };
        let (old, new) = (
            refs::tests::macho(X86_64, &old_code, &[]),
            refs::tests::macho(X86_64, &new_code, &[]),
        );
        let with_symbols = (
            refs::tests::with_symbols(&old, &symbols(false)),
            refs::tests::with_symbols(&new, &symbols(true)),
        );
        [(old, new), with_symbols]
    }

    /// A Mach-O library's symbols whose functions only moved cost nothing: their values are
    /// references from predictor 3 on (640 symbols: 85 B against 84 B without a symbol table,
    /// 167 B where their values are not references).
    #[test]
    fn symbols_that_only_moved_cost_nothing() {
        let [(old, new), (old_symbols, new_symbols)] = moved_symbols_pair();
        let count = (old_symbols.len() - old.len()) / 17;
        let plain = round_trip(&old, &new);
        let predicted = round_trip(&old_symbols, &new_symbols);
        assert_eq!(predicted[4], Predictor::Symbols as u8);
        assert!(
            predicted.len() < plain.len() + count / 8,
            "{count} symbols cost {} bytes",
            predicted.len() as i64 - plain.len() as i64
        );
    }

    /// A library of `refs::MAX_REFS + 60_000` calls, each to one of 64 functions at the start of
    /// its code, and the same with 64 bytes inserted after call `MAX_REFS + 10_000`: only the
    /// calls after it changed, all beyond the first 2^19 references.
    fn wide_pair() -> (Vec<u8>, Vec<u8>) {
        let calls = refs::MAX_REFS + 60_000;
        let insert_at = refs::MAX_REFS + 10_000;
        let code = |inserted: usize| -> Vec<u8> {
            let mut code = Vec::with_capacity(5 * calls + inserted);
            for k in 0..calls {
                if k == insert_at {
                    code.extend((0..inserted).map(|i| 0x90 + (i % 16) as u8));
                }
                let target = (k * 7919 % 64) as i64 * 64;
                let disp = target - (code.len() + 5) as i64;
                code.push(0xe8);
                code.extend_from_slice(&(disp as i32).to_le_bytes());
            }
            code
        };
        (
            refs::tests::elf_with_code(&code(0)),
            refs::tests::elf_with_code(&code(64)),
        )
    }

    /// Where the old file has more than 2^19 references, they are all predicted (predictor 4):
    /// 50,000 moved calls beyond the first 2^19 cost next to nothing.
    #[test]
    fn references_beyond_the_narrow_bound_are_predicted() {
        let (old, new) = wide_pair();
        predicted_within(&old, &new, Predictor::Wide, (1, 10));
    }

    /// `tests/data/bsdiff-4-wide.bin`, the payload of the pair above, still decodes to its
    /// file; `BSI_BLESS=1` writes it again.
    #[test]
    fn the_stored_wide_payload_still_decodes() {
        let (old, new) = wide_pair();
        let stored = stored_payload("bsdiff-4-wide.bin", &old, &new);
        assert_eq!(&stored[..5], b"BSD\x03\x04", "format 3, predictor 4");
    }

    /// `tests/data/macho-4.{old,new}`, the pair with symbols of the test above, used by the
    /// format tests; `BSI_BLESS=1` writes them again.
    #[test]
    fn the_stored_symbols_pair_is_the_moved_library() {
        let [_, (old, new)] = moved_symbols_pair();
        stored_pair("macho-4", old, new);
    }

    /// `tests/data/macho-1.{old,new}`, the universal pair of the test above, used by the format
    /// tests and the `elf` fuzz target; `BSI_BLESS=1` writes them again.
    #[test]
    fn the_stored_mach_o_pair_is_the_relinked_universal_file() {
        stored_pair(
            "macho-1",
            refs::tests::universal_x86(&relinked_code(usize::MAX, 0)),
            refs::tests::universal_x86(&relinked_code(10_000, 64)),
        );
    }

    /// Require `tests/data/NAME.{old,new}` to be `old` and `new`, their builders' files;
    /// `BSI_BLESS=1` writes them first.
    fn stored_pair(name: &str, old: Vec<u8>, new: Vec<u8>) {
        for (name, file) in [(format!("{name}.old"), old), (format!("{name}.new"), new)] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/data")
                .join(&name);
            if std::env::var_os("BSI_BLESS").is_some() {
                std::fs::write(&path, &file).expect("write the fixture");
            }
            assert!(
                refs::tests::fixture(&name) == file,
                "{name} differs from its builder"
            );
        }
    }

    /// Counting what steps leave to code in pieces, in parallel, gives the count of all the
    /// steps one after the other, with prediction or without.
    #[test]
    fn left_to_code_in_pieces_counts_every_step() {
        let old = refs::tests::elf_with_code(&relinked_code(usize::MAX, 0));
        let new = refs::tests::elf_with_code(&relinked_code(10_000, 64));
        let noise = crate::test_data::noise(9, 3 * 20_000);
        let mut ops = Vec::new();
        let mut new_pos = 0usize;
        for n in noise.chunks(3) {
            let add = usize::from(n[0] % 40).min(new.len() - new_pos);
            let copy = usize::from(n[1] % 4).min(new.len() - new_pos - add);
            let from = usize::from(n[2]) * 97 % (old.len() - add);
            ops.push(matcher::Op {
                add: add as u64,
                copy: copy as u64,
                from,
            });
            new_pos += add + copy;
        }
        assert!(ops.len() > 2 * LEFT_MIN_STEPS, "{} steps", ops.len());
        let image = refs::scan(&old, refs::Version::First);
        let prepared = predict::Prepared::new(&image).expect("references");
        let predictor =
            predict::Predictor::with(&prepared, predict::Alignment::new(&add_steps(&ops)));
        for predictor in [None, Some(&predictor)] {
            let whole = left_from(&old, &new[..new_pos], &ops, 0, predictor);
            assert!(whole > 0);
            assert_eq!(left_to_code(&old, &new[..new_pos], &ops, predictor), whole);
        }
    }

    /// Without predicted references every zero flag is coded (format 2), with them only those
    /// near changes (format 5); both decode.
    #[test]
    fn gaps_only_after_prediction() {
        let (old, mut new) = (program(50_000, 3), program(50_000, 3));
        for at in (100..new.len()).step_by(700) {
            new[at] ^= 0x21;
        }
        assert_eq!(&round_trip(&old, &new)[..4], MAGIC_2);
        let old = refs::tests::elf_with_code(&relinked_code(usize::MAX, 0));
        let new = refs::tests::elf_with_code(&relinked_code(10_000, 64));
        assert_eq!(&round_trip(&old, &new)[..4], MAGIC_5);
    }

    /// The steps the encoder ends with take every stub of the procedure linkage table and every
    /// `.rela.plt` entry of `elf-2.gen.py`'s library (x86-64 and AArch64) to the new one for the
    /// same function, in the alignment the decoder predicts with, although the new import
    /// shifts those after it.
    #[test]
    fn stubs_are_pinned_to_their_function() {
        for machine in ["", ".arm64"] {
            let old = refs::tests::fixture(&format!("elf-2{machine}.old.so"));
            let new = refs::tests::fixture(&format!("elf-2{machine}.new.so"));
            let index = matcher::Index::new(&old).expect("an index");
            let known = Known::of(&old, &new).expect("references");
            let ops = search(&index, &new, REGION, matcher::Search::Quick);
            let (ops, predictor) = predicted_search(&index, &old, &new, ops, &known);
            assert!(predictor.is_some());
            let alignment = predict::Alignment::new(&add_steps(&ops));
            let pieces = refs::plt_pieces(&old, &new);
            assert!(pieces.len() >= 4, "{machine}: {pieces:?}");
            for (o, n, len) in pieces {
                for k in 0..len {
                    let at = alignment.map(o + k);
                    assert_eq!(at, Some((n + k) as i64), "{machine}: {o:#x}+{k}");
                }
            }
            round_trip(&old, &new);
        }
    }

    proptest::proptest! {
        /// [`pinned`] keeps the new file's length and makes each byte from where a kept piece
        /// says, or else from where the steps did (the same old offset, or the extra bytes).
        #[test]
        fn pinned_steps_follow_the_pieces(
            ops in proptest::collection::vec((0u64..40, 0u64..20, 0usize..500), 0..30),
            pieces in proptest::collection::vec((0u64..500, 0u64..800, 0u64..60), 0..8),
        ) {
            let ops: Vec<matcher::Op> = ops
                .into_iter()
                .map(|(add, copy, from)| matcher::Op { add, copy, from })
                .collect();
            let new_len: u64 = ops.iter().map(|op| op.add + op.copy).sum();
            // Where each new byte comes from: Some(old offset) or None (extra).
            let sources = |ops: &[matcher::Op]| -> Vec<Option<u64>> {
                ops.iter()
                    .flat_map(|op| {
                        (0..op.add)
                            .map(move |k| Some(op.from as u64 + k))
                            .chain((0..op.copy).map(|_| None))
                    })
                    .collect()
            };
            let before = sources(&ops);
            let after = sources(&pinned(&ops, &pieces, new_len));
            proptest::prop_assert_eq!(after.len() as u64, new_len);
            // The pieces kept: those inside the file that overlap no earlier one (by new offset).
            let mut sorted: Vec<(u64, u64, u64)> = pieces
                .iter()
                .copied()
                .filter(|&(_, n, len)| len > 0 && n + len <= new_len)
                .collect();
            sorted.sort_by_key(|p| p.1);
            let mut end = 0;
            sorted.retain(|&(_, n, len)| {
                let keep = n >= end;
                if keep {
                    end = n + len;
                }
                keep
            });
            for (pos, source) in after.iter().enumerate() {
                let pos = pos as u64;
                let expected = match sorted.iter().find(|p| (p.1..p.1 + p.2).contains(&pos)) {
                    Some(&(o, n, _)) => Some(o + (pos - n)),
                    None => before[pos as usize],
                };
                proptest::prop_assert_eq!(*source, expected, "at {}", pos);
            }
        }
    }

    /// The encoder and decoder agree on damaged ELF files (their references found, or not, the
    /// same way on both sides).
    #[test]
    fn damaged_libraries_round_trip() {
        let old = refs::tests::fixture("elf-1.old.so");
        let new = refs::tests::fixture("elf-1.new.so");
        let shoff = u64::from_le_bytes(old[0x28..0x30].try_into().expect("8 bytes")) as usize;
        for (i, at) in (0..64).chain((shoff..old.len()).step_by(13)).enumerate() {
            let mut bad = old.clone();
            bad[at] ^= [0xff, 0x80, 0x01][i % 3];
            round_trip(&bad, &new);
        }
        // A universal Mach-O file damaged in its fat header and each slice's load commands.
        let old = refs::tests::universal_x86(&relinked_code(usize::MAX, 0));
        let new = refs::tests::universal_x86(&relinked_code(10_000, 64));
        let offset = |k: usize| {
            let at = 8 + 20 * k + 8;
            u32::from_be_bytes(old[at..at + 4].try_into().expect("4 bytes")) as usize
        };
        let slices = [offset(0), offset(1)];
        let headers = (0..48).chain(slices.iter().flat_map(|&s| (s..s + 400).step_by(7)));
        for (i, at) in headers.enumerate() {
            let mut bad = old.clone();
            bad[at] ^= [0xff, 0x80, 0x01][i % 3];
            round_trip(&bad, &new);
        }
    }

    #[test]
    fn refuses_bad_payloads() {
        let old = noise(5, 10_000);
        let mut new = old.clone();
        new.splice(5000..5000, noise(6, 300));
        new[100] = new[100].wrapping_add(3);
        let len = new.len() as u64;
        let payload = Bsdiff::PLAIN
            .encode(&old, &new)
            .expect("encode")
            .expect("applies");
        for cut in [0, 3, 4, 5, 8, payload.len() / 2, payload.len() - 1] {
            assert!(
                Bsdiff::PLAIN.decode(&old, &payload[..cut], len).is_err(),
                "truncated at {cut}"
            );
        }
        let mut longer = payload.clone();
        longer.push(0);
        assert!(Bsdiff::PLAIN.decode(&old, &longer, len).is_err());
        assert!(matches!(
            Bsdiff::PLAIN.decode(&old, &payload, len + 1),
            Err(DecodeError::WrongLength { .. })
        ));
        assert!(Bsdiff::PLAIN.decode(&old, &payload, len - 1).is_err());
        assert!(Bsdiff::PLAIN.decode(&old[..9000], &payload, len).is_err());
        assert!(Bsdiff::PLAIN.decode(&old, b"garbage garbage", len).is_err());
        assert!(Bsdiff::PLAIN.decode(&old, &[], 0).is_err());
        every_flip_is_caught_or_keeps_the_length(&old, &payload, len);
    }

    #[test]
    fn refuses_hostile_headers() {
        let old = noise(7, 1000);
        let mut header = MAGIC.to_vec();
        header.push(0);
        // A control stream claiming far more than the new file justifies.
        for v in [u64::MAX, 1] {
            varint::put(&mut header, v);
        }
        assert!(Bsdiff::PLAIN.decode(&old, &header, 10).is_err());
        // A varint of 11 bytes.
        let mut long = MAGIC.to_vec();
        long.push(0);
        long.extend_from_slice(&[0xff; 11]);
        assert!(Bsdiff::PLAIN.decode(&old, &long, 10).is_err());
        // Lengths that do not add up to the new file.
        let mut lens = MAGIC.to_vec();
        lens.push(0);
        for v in [0, 0, 5, 1, 0, 0] {
            varint::put(&mut lens, v);
        }
        lens.push(0);
        assert!(matches!(
            Bsdiff::PLAIN.decode(&old, &lens, 10),
            Err(DecodeError::WrongLength { .. })
        ));
        // An unknown predictor, and a predictor in format 1 (whose byte was a filter).
        let payload = Bsdiff::PLAIN
            .encode(&old, &old)
            .expect("encode")
            .expect("applies");
        let mut unknown = payload.clone();
        unknown[4] = 2;
        assert!(Bsdiff::PLAIN.decode(&old, &unknown, 1000).is_err());
        // Format 1: one step that adds the old file, every zero flag coded.
        let mut control = Vec::new();
        for v in [1000, 0, 0] {
            varint::put(&mut control, v);
        }
        let packed = pack(&control, 1000).expect("pack");
        let mut diff = cm::DiffEncoder::new(cm::Flags::Every);
        diff.push_step(0, &old, &old);
        let diff = diff.finish();
        let mut format_1 = MAGIC_1.to_vec();
        format_1.push(0);
        for v in [control.len(), packed.len(), 1000, diff.len(), 0, 0] {
            varint::put(&mut format_1, v as u64);
        }
        format_1.extend_from_slice(&packed);
        format_1.extend_from_slice(&diff);
        assert_eq!(
            Bsdiff::PLAIN
                .decode(&old, &format_1, 1000)
                .expect("format 1"),
            old
        );
        format_1[4] = 1;
        assert!(Bsdiff::PLAIN.decode(&old, &format_1, 1000).is_err());
    }

    /// Encoded streams of `new`: (control, diff, extra) sizes after packing, searched in regions.
    fn packed_size(old: &[u8], new: &[u8], region: usize) -> usize {
        let index = matcher::Index::new(old).expect("index");
        let ops = search(&index, new, region, matcher::Search::Full);
        let streams = streams(old, new, &ops, None, None);
        let cap = new.len() as u64;
        pack(&streams.control, cap).expect("pack").len()
            + streams.diff.len()
            + pack(&streams.extra, cap).expect("pack").len()
    }

    #[test]
    fn regions_cost_little_and_do_not_depend_on_threads() {
        // Three regions and a bit; blocks moved across region boundaries, pointers shifted.
        let old = program(REGION * 3 + 12_345, 8);
        let mut new = old.clone();
        let moved: Vec<u8> = new.drain(100_000..400_000).collect();
        let at = REGION * 2 - 150_000;
        new.splice(at..at, moved);
        for chunk in new.chunks_exact_mut(4096) {
            chunk[..8].copy_from_slice(&0x1234_5678u64.to_le_bytes());
        }
        new.splice(REGION - 10..REGION - 10, noise(9, 5_000));

        let payloads: Vec<Vec<u8>> = [1, 2, 3]
            .into_iter()
            .map(|threads| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("pool");
                pool.install(|| round_trip(&old, &new))
            })
            .collect();
        assert!(
            payloads.windows(2).all(|w| w[0] == w[1]),
            "same bytes on 1, 2 and 3 threads"
        );

        let whole = packed_size(&old, &new, new.len());
        let split = packed_size(&old, &new, REGION);
        assert!(
            split * 100 <= whole * 101,
            "regions cost {split} bytes against {whole} in one piece"
        );
    }

    #[test]
    fn decoding_writes_the_new_file_in_bounded_chunks() {
        struct Chunks(Vec<usize>, Vec<u8>);
        impl Write for Chunks {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.push(buf.len());
                self.1.extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        // One long step (a few changed bytes) and a long extra run (appended noise).
        let old = program(3 * OUT_CHUNK, 10);
        let mut new = old.clone();
        new[OUT_CHUNK + 5] ^= 1;
        new.extend_from_slice(&noise(11, 2 * OUT_CHUNK + 7));
        let payload = Bsdiff::PLAIN
            .encode(&old, &new)
            .expect("encode")
            .expect("applies");
        let mut sink = Chunks(Vec::new(), Vec::new());
        Bsdiff::PLAIN
            .decode_into(&old, &payload, new.len() as u64, &mut sink)
            .expect("decode");
        assert!(sink.1 == new, "decoded bytes differ");
        let largest = sink.0.iter().max().copied().unwrap_or(0);
        assert!(largest <= 2 * OUT_CHUNK, "a write of {largest} bytes");
        assert!(sink.0.len() >= 5, "only {} writes", sink.0.len());
    }

    #[test]
    fn varints_and_zigzag() {
        for v in [0, 1, 127, 128, 300, u64::MAX] {
            let mut out = Vec::new();
            varint::put(&mut out, v);
            let mut input = out.as_slice();
            assert_eq!(varint::take(&mut input).expect("varint"), v);
            assert!(input.is_empty());
        }
        for v in [0, 1, -1, i64::MIN, i64::MAX] {
            assert_eq!(varint::unzigzag(varint::zigzag(v)), v);
        }
    }
}
