use std::io::{self, Read, Write};

use rayon::prelude::*;
use zstd::stream::raw::{CParameter, DParameter};

use crate::bsdiff::codesign::{self, Directory};
use crate::bsdiff::Machine;
use crate::code_filter::Machines;
use crate::{
    code_filter, copy_exact_len, corrupt, varint, window_log, DecodeError, DeltaEncoder, LEVEL,
};

/// Smallest old file encoded through zstd's multithreaded path, exclusive (see [`encode_in`]).
const MULTITHREADED_MIN_OLD: usize = 8 << 20;
/// Room one frame's decoding may take beside the larger of the two files (see [`frame_len`]):
/// an apply stays within its largest file + 64 MiB, with 16 MiB to spare.
const FRAME_ROOM: usize = 48 << 20;
/// Longest new file encoded as one frame when it is not cut for memory: one job of zstd's
/// multithreaded path (64 MiB at level 19 with long distance matching), on one core.
const ONE_FRAME_MAX: usize = 64 << 20;
/// At most this many frames are encoded at once, whatever the number of cores: each added about
/// 260 MB with level 19's tables against a 177 MB old file (libxul.so: 881 MB with 2 frames of
/// 32 MiB; the Firefox build peaked at 1,029 MiB with frames of 48 MiB; with the code filter's
/// copies and [`WIDE_TABLES_LOG`], 1,061 MB), and the build stays within 6 times the largest
/// file + 256 MB with 2.
const FRAMES_AT_ONCE: usize = 2;
/// Shortest frame a framed payload may declare: it bounds the frames (and zstd contexts) per
/// byte of output.
const MIN_FRAME_LEN: u32 = 64 << 10;
/// First bytes of a framed payload; a single-frame payload is a bare zstd frame, which starts
/// with zstd's magic number (28 b5 2f fd).
const FRAMED_MAGIC: &[u8; 4] = b"ZPF\x01";
/// First bytes of a payload whose new file's code was converted (see [`crate::code_filter`]),
/// x86-64 code or AArch64 code: the filter's header and a payload without the filter follow.
const FILTERED_MAGIC: &[u8; 4] = b"ZPC\x01";
const FILTERED_ARM64_MAGIC: &[u8; 4] = b"ZPA\x01";
/// As [`FILTERED_MAGIC`], each code range tagged with its machine (a universal Mach-O file of
/// x86-64 and arm64 slices).
const FILTERED_TAGGED_MAGIC: &[u8; 4] = b"ZPM\x01";
/// First bytes of a payload whose new file is a signed Mach-O file: the code directories whose
/// slots were zeroed before encoding (a varint length, then the table `codesign::put` writes),
/// then a payload of any other kind of the new file so zeroed. The decoder fills the slots in
/// with the hashes of the pages it wrote before them (see `codesign::Filling`).
const SIGNED_MAGIC: &[u8; 4] = b"ZPS\x01";
/// Longest code directory table a payload may have (8 directories take at most 280 bytes).
const MAX_TABLE: u64 = 1 << 10;
/// Each filtered payload's magic number, how its header gives the ranges' machines, and whose
/// code it converted (see [`converted_code`]).
const FILTERED: [(&[u8; 4], Machines, &str); 3] = [
    (FILTERED_MAGIC, Machines::All(Machine::X86_64), "x86-64"),
    (
        FILTERED_ARM64_MAGIC,
        Machines::All(Machine::Aarch64),
        "arm64",
    ),
    (FILTERED_TAGGED_MAGIC, Machines::Tagged, "x86-64 and arm64"),
];

/// The entry of [`FILTERED`] whose magic number `head` is.
fn filtered_kind(head: &[u8]) -> Option<(Machines, &'static str)> {
    FILTERED
        .iter()
        .find(|(magic, ..)| &magic[..] == head)
        .map(|&(_, machines, code)| (machines, code))
}
/// New files up to this long are also encoded without the code filter, and the smaller payload
/// kept: the filter converts only the new file, so a file nearly its old one loses the matches
/// of its code (a small library's whole payload is often such matches). Above, the filter's
/// payload alone: level 19 costs about a second per MiB there.
const BOTH_MAX: usize = 4 << 20;
/// From a window of 2^[`WIDE_WINDOW_LOG`] bytes (old file and frame over 32 MiB), the binary
/// tree has 2^[`WIDE_TABLES_LOG`] nodes and the hash table as many entries, instead of level
/// 19's 2^24 and 2^22. zstd then indexes the last 8 MiB of the old file instead of 32 MiB, and
/// searches less deeply (see ARCHITECTURE.md): libxul.so's 4 frames took 62 s of CPU instead
/// of 168 s, its converted payload 43,181,208 B against 47,797,595 B unconverted at level 19's
/// tables (49,844,512 B unconverted with these); browser/omni.ja 11.8 s instead of 35.2 s for
/// 6.5% more.
const WIDE_WINDOW_LOG: u32 = 26;
const WIDE_TABLES_LOG: u32 = 20;
/// How much of a payload decoding reads at a time from a stream (a package file).
const PAYLOAD_BUFFER: usize = 128 << 10;

/// New files from [`PROBE_MIN`] to [`PROBE_MAX`] bytes are encoded at [`PROBE_LEVEL`] first,
/// and that payload is kept when it is at most 1/[`TINY`] of the file. On such a pair level 19
/// spends most of its time indexing the old file, whatever the changes, to save a tenth of an
/// already tiny payload: libssl3's changelog (774 KB of text, 3.0.17 -> 3.0.20) costs 4,128 B
/// in 0.03 s at level 12 against 3,736 B in 0.19 s at level 19 (the whole gzip encoder: 0.12 s
/// instead of 0.33 s: 0.5% more package for a sixth less build CPU). Where the probe
/// is not tiny (text with many changes, Firefox's weak deltas), its time comes on top of level
/// 19's, about a sixth more.
const PROBE_MIN: usize = 128 << 10;
const PROBE_MAX: usize = 1 << 20;
const PROBE_LEVEL: i32 = 12;
const TINY: usize = 128;

/// A binary new file from [`ESTIMATE_MIN`] bytes, encoded only if its payload can be smaller
/// than a bound under 1/4 of the file (see [`DeltaEncoder::encode_below`]), is encoded at
/// [`ESTIMATE_LEVEL`] first, and not at level 19 where the bound is less than
/// [`ESTIMATE_SHARE`] (2/3) of that estimate.
///
/// Level 19 gave 0.697 to 0.893 of level 6's payload on the 17 binaries of 359 KB to 17.7 MB
/// measured where it ran after weak deltas: 12 files of Firefox ESR 140 -> 153, Pillow's
/// libjpeg and libharfbuzz (10.0.0 -> 10.0.1, macOS arm64), and cryptography's universal
/// `_rust.abi3.so` (40.0.2 and 38.0.4 -> 42.0.8). Below 2/3 of the estimate, level 19 would
/// not have won on any of them. On libharfbuzz (4.3 MB, arm64) bsdiff gives 248,199 B, 0.63 of
/// the estimate's 393,544 B, which took 0.05 s; level 19 took 2.1 s for 277,475 B, most of
/// Pillow's build. Where level 19 runs, the estimate adds 2% to 9% to its time. Where the
/// bound is far, level 19 won on every file measured (by at least 5% of the estimate), so no
/// estimate is made.
const ESTIMATE_MIN: usize = 256 << 10;
const ESTIMATE_LEVEL: i32 = 6;
const ESTIMATE_SHARE: (usize, usize) = (2, 3);

/// zstd with the old file as reference prefix (what `zstd --patch-from` does), in long mode with
/// a window that covers the old file and the new one, or for a large new file, each 48 MiB
/// frame of it (see [`frame_len`] and [`encode_framed`]).
#[derive(Debug, Clone, Copy)]
pub struct ZstdPrefix;

impl DeltaEncoder for ZstdPrefix {
    fn name(&self) -> &'static str {
        "zstd-prefix"
    }

    /// Level 19 with a long window runs at 0.5 to 3 MB/s. Beyond 64 KiB it was smaller than
    /// bsdiff only where every delta was weak (13 Firefox files of 74 KB to 1 MB, 13 major
    /// versions apart); on libssl3's libssl.so (688 KB) it cost 0.26 s for 39,921 B against
    /// bsdiff's 12,296 B. Below, it wins by a few bytes (5 to 25 on the plists and engines of
    /// the testdata and libssl3) in milliseconds.
    fn max_new_len(&self) -> usize {
        64 << 10
    }

    /// On text it wins: libssl3's changelog (1 MB, 3.0.17 -> 3.0.20) costs 3,770 B inside its
    /// gzip payload against 5,140 B with bsdiff.
    fn max_text_len(&self) -> usize {
        1 << 20
    }

    fn covers_plain(&self) -> bool {
        true
    }

    /// The x86-64 or AArch64 code of an ELF or Mach-O file is converted first (see
    /// [`crate::code_filter`]); up to [`BOTH_MAX`] bytes, the file as it is is also a candidate
    /// (see [`CHOOSE_MIN`] for which of the two forms are encoded at level 19), and the smaller
    /// payload kept. A signed Mach-O file's code signature slots are zeroed first (see
    /// [`SIGNED_MAGIC`]).
    fn encode(&self, old: &[u8], new: &[u8]) -> io::Result<Option<Vec<u8>>> {
        encode_at(old, new, LEVEL, None).map(|coded| Some(coded.payload))
    }

    /// Estimated first for large binaries (see [`ESTIMATE_MIN`]); the estimate also chooses the
    /// form encoded at level 19.
    fn encode_below(&self, old: &[u8], new: &[u8], bound: usize) -> io::Result<Option<Vec<u8>>> {
        let mut estimate = None;
        if new.len() >= ESTIMATE_MIN && !crate::is_text(new) && !crate::is_far(bound, new.len()) {
            let coded = encode_at(old, new, ESTIMATE_LEVEL, None)?;
            let (part, whole) = ESTIMATE_SHARE;
            if bound.saturating_mul(whole) < coded.payload.len().saturating_mul(part) {
                return Ok(None);
            }
            estimate = Some(coded.estimate());
        }
        encode_at(old, new, LEVEL, estimate).map(|coded| Some(coded.payload))
    }

    fn decode_into(
        &self,
        old: &[u8],
        payload: &[u8],
        new_len: u64,
        out: &mut dyn Write,
    ) -> Result<(), DecodeError> {
        let payload_len = payload.len() as u64;
        self.decode_stream_into(old, &mut { payload }, payload_len, new_len, out)
    }

    /// Streams: Firefox's libxul.so has a 45 MiB payload, read [`PAYLOAD_BUFFER`] at a time, and
    /// decodes into a window of one 48 MiB frame beside the old file.
    fn decode_stream_into(
        &self,
        old: &[u8],
        payload: &mut dyn Read,
        payload_len: u64,
        new_len: u64,
        out: &mut dyn Write,
    ) -> Result<(), DecodeError> {
        let mut rest = payload_len;
        let head = read_head(payload, &mut rest)?;
        if head == SIGNED_MAGIC {
            let dirs = read_directories(payload, &mut rest, new_len)?;
            let mut filling = codesign::Filling::new(dirs, out);
            let head = read_head(payload, &mut rest)?;
            return decode_filtered(old, &head, payload, rest, new_len, &mut filling);
        }
        decode_filtered(old, &head, payload, rest, new_len, out)
    }
}

/// A payload of zstd-prefix, and whether it holds the new file with its code converted (else
/// the file as it is, a signed file's slots zeroed).
struct Coded {
    payload: Vec<u8>,
    converted: bool,
}

/// What a payload at [`ESTIMATE_LEVEL`] showed of a new file: its length, and which form gave
/// it.
#[derive(Debug, Clone, Copy)]
struct Estimate {
    len: usize,
    converted: bool,
}

impl Coded {
    fn estimate(&self) -> Estimate {
        Estimate {
            len: self.payload.len(),
            converted: self.converted,
        }
    }
}

/// The payload of `new` against `old` at zstd `level` (see [`ZstdPrefix::encode`]), with the
/// `estimate` made of it at [`ESTIMATE_LEVEL`], if any.
fn encode_at(old: &[u8], new: &[u8], level: i32, estimate: Option<Estimate>) -> io::Result<Coded> {
    encode_with(old, new, level, true, estimate)?.ok_or_else(|| {
        io::Error::other("zstd-prefix made no payload where it makes one without the code filter")
    })
}

/// The payload of a new file, `new`, against the empty file with the code filter, or only its
/// code signature's slots zeroed where the filter finds no code: what [`crate::encode_best`]
/// compares with plain compression for a file with no old one. `None` where there is neither.
pub(crate) fn encode_code(new: &[u8]) -> io::Result<Option<Vec<u8>>> {
    Ok(encode_with(&[], new, LEVEL, false, None)?.map(|coded| coded.payload))
}

/// New files from this length (exclusive) up to [`BOTH_MAX`] whose code the filter converts are
/// encoded in both forms at [`ESTIMATE_LEVEL`] (or the estimate's payload is taken, which did
/// that), and at level 19 only in the form that was smaller there, instead of in both. Level
/// 6's choice was level 19's on all 17 such files of the bench's pairs (15 of Firefox ESR 140
/// -> 153, 75 KB to 4.1 MB, and Pillow's libjpeg and libbrotlidec), where the second form's
/// level 19 had cost 8.6 s of CPU on Firefox (3.2 s for a 4.1 MB library) and 0.16 s on
/// Pillow. Below, level 19 takes milliseconds and both are encoded: on one of Firefox's files
/// (13,512 bytes) the forms were 1 byte apart at level 6 and the other won at level 19.
const CHOOSE_MIN: usize = 64 << 10;

/// [`encode_at`], where `unfiltered` says whether the file as it is is a candidate too (where
/// the filter finds no code, or up to [`BOTH_MAX`]); `None` where it is not, the filter finds no
/// code and there is no code signature.
fn encode_with(
    old: &[u8],
    new: &[u8],
    level: i32,
    unfiltered: bool,
    estimate: Option<Estimate>,
) -> io::Result<Option<Coded>> {
    let dirs = codesign::directories(new);
    let mut payload = Vec::new();
    if !dirs.is_empty() {
        let mut table = Vec::new();
        codesign::put(&mut table, &dirs);
        payload.extend_from_slice(SIGNED_MAGIC);
        varint::put(&mut payload, table.len() as u64);
        payload.extend_from_slice(&table);
    }
    let head = payload.len();
    let Some(mut filtered) = code_filter::filter(new, &crate::bsdiff::code_ranges(new)) else {
        if !unfiltered && dirs.is_empty() {
            return Ok(None);
        }
        payload.extend_from_slice(&encode_plain(old, &zeroed(new, &dirs), level, true)?);
        return Ok(Some(Coded {
            payload,
            converted: false,
        }));
    };
    zero_slots(&mut filtered.bytes, &dirs);
    let (magic, ..) = FILTERED
        .iter()
        .find(|(_, machines, _)| *machines == filtered.machines)
        .expect("every way of giving the ranges' machines has a magic number");
    payload.extend_from_slice(*magic);
    payload.extend_from_slice(&filtered.header);
    let as_is = (unfiltered && new.len() <= BOTH_MAX).then(|| zeroed(new, &dirs));
    // Which forms are encoded at `level`, and whether level 12's probe is made first (not where
    // level 6's payload is already over what the probe keeps).
    let (convert, keep_as_is, probe) = match &as_is {
        Some(as_is) if level == LEVEL && new.len() > CHOOSE_MIN => {
            // What `encode_with` at that level would give: the converted payload counts its
            // magic number and the filter's header.
            let estimate = match estimate {
                Some(estimate) => estimate,
                None => {
                    let converted = payload.len() - head
                        + encode_plain(old, &filtered.bytes, ESTIMATE_LEVEL, false)?.len();
                    let plain = encode_plain(old, as_is, ESTIMATE_LEVEL, false)?.len();
                    Estimate {
                        len: head + converted.min(plain),
                        converted: converted < plain,
                    }
                }
            };
            let probe = estimate.len <= new.len() / TINY;
            (estimate.converted, !estimate.converted, probe)
        }
        Some(_) => (true, true, true),
        None => (true, false, true),
    };
    let as_is = as_is.filter(|_| keep_as_is);
    if convert {
        payload.extend_from_slice(&encode_plain(old, &filtered.bytes, level, probe)?);
    }
    drop(filtered);
    let mut converted = convert;
    if let Some(as_is) = as_is {
        let plain = encode_plain(old, &as_is, level, probe)?;
        if !convert || plain.len() <= payload.len() - head {
            payload.truncate(head);
            payload.extend_from_slice(&plain);
            converted = false;
        }
    }
    Ok(Some(Coded { payload, converted }))
}

/// `new` with the slots of `dirs` zeroed (itself where there are none).
fn zeroed<'a>(new: &'a [u8], dirs: &[Directory]) -> std::borrow::Cow<'a, [u8]> {
    if dirs.is_empty() {
        return new.into();
    }
    let mut copy = new.to_vec();
    zero_slots(&mut copy, dirs);
    copy.into()
}

/// Zero the slots of `dirs` in `bytes`, a new file of their code directories.
fn zero_slots(bytes: &mut [u8], dirs: &[Directory]) {
    for d in dirs {
        bytes[d.slots_at as usize..d.slots_end() as usize].fill(0);
    }
}

/// Read a payload's code directory table (see [`SIGNED_MAGIC`]) from `payload`, of which `rest`
/// bytes are left.
fn read_directories(
    payload: &mut dyn Read,
    rest: &mut u64,
    new_len: u64,
) -> Result<Vec<Directory>, DecodeError> {
    let mut len_bytes = Vec::new();
    let table_len = loop {
        let byte = read_bytes::<1>(payload, rest, "its code directory table")?[0];
        len_bytes.push(byte);
        if byte & 0x80 == 0 {
            break varint::take(&mut &len_bytes[..])?;
        }
        if len_bytes.len() >= 10 {
            return Err(corrupt("code directory table length too long"));
        }
    };
    if table_len > MAX_TABLE || table_len > *rest {
        return Err(corrupt(
            "code directory table longer than the payload allows",
        ));
    }
    let mut table = vec![0u8; table_len as usize];
    payload
        .read_exact(&mut table)
        .map_err(DecodeError::Corrupt)?;
    *rest -= table_len;
    let mut input = &table[..];
    let dirs = codesign::take(&mut input, new_len)?;
    if !input.is_empty() {
        return Err(corrupt("trailing bytes after the code directory table"));
    }
    Ok(dirs)
}

/// The first bytes of what is left of `payload` (`rest` bytes), which say its kind: 4, or all
/// that is left when that is less.
fn read_head(payload: &mut dyn Read, rest: &mut u64) -> Result<Vec<u8>, DecodeError> {
    let mut head = vec![0u8; (*rest).min(FRAMED_MAGIC.len() as u64) as usize];
    payload
        .read_exact(&mut head)
        .map_err(DecodeError::Corrupt)?;
    *rest -= head.len() as u64;
    Ok(head)
}

/// Decode a payload with or without the code filter whose first bytes, `head`, were read:
/// `rest` more bytes in `payload`.
fn decode_filtered(
    old: &[u8],
    head: &[u8],
    payload: &mut dyn Read,
    mut rest: u64,
    new_len: u64,
    out: &mut dyn Write,
) -> Result<(), DecodeError> {
    let Some((machines, _)) = filtered_kind(head) else {
        return decode_plain(old, head, payload, rest, new_len, out);
    };
    let mut unfilter =
        code_filter::Unfilter::read_header(machines, payload, &mut rest, new_len, out)?;
    let head = read_head(payload, &mut rest)?;
    decode_plain(old, &head, payload, rest, new_len, &mut unfilter)?;
    unfilter.finish()
}

/// Whose code the code filter converted in a zstd-prefix `payload` (its first bytes are enough:
/// 4, and a signed file's code directory table before them): "x86-64", "arm64", or "x86-64 and
/// arm64" (a universal file); `None` for a payload without the filter.
pub fn converted_code(payload: &[u8]) -> Option<&'static str> {
    let mut rest = payload.strip_prefix(SIGNED_MAGIC).unwrap_or(payload);
    if rest.len() < payload.len() {
        let table_len = varint::take(&mut rest).ok()?;
        rest = rest.get(usize::try_from(table_len).ok()?..)?;
    }
    filtered_kind(rest.get(..4)?).map(|(_, code)| code)
}

/// The payload of `new` against `old` at zstd `level`, without the code filter: one frame or
/// frames (see [`frame_len`]); at level 19, a probe at a low level first for a file that may be
/// nearly the old one.
fn encode_plain(old: &[u8], new: &[u8], level: i32, probe: bool) -> io::Result<Vec<u8>> {
    Ok(match frame_len(old.len(), new.len()) {
        Some(len) => encode_framed(old, new, level, len, FRAMES_AT_ONCE)?,
        None if probe && level == LEVEL && (PROBE_MIN..=PROBE_MAX).contains(&new.len()) => {
            let probe = encode_in(old, new, PROBE_LEVEL)?;
            match probe.len() <= new.len() / TINY {
                true => probe,
                false => encode_in(old, new, level)?,
            }
        }
        None => encode_in(old, new, level)?,
    })
}

/// Decode a payload without the code filter whose first bytes, `head`, were read: `rest` more
/// bytes in `payload`.
fn decode_plain(
    old: &[u8],
    head: &[u8],
    payload: &mut dyn Read,
    rest: u64,
    new_len: u64,
    out: &mut dyn Write,
) -> Result<(), DecodeError> {
    match head == FRAMED_MAGIC {
        true => decode_frames(old, payload, rest, new_len, out),
        false => decode_frame(old, head.chain(payload.take(rest)), new_len, out),
    }
}

/// The length of the frames a new file of `new_len` bytes is cut into against an old one of
/// `old_len`, or `None` for one frame.
///
/// Decoding holds the old file and one frame (the whole new file when it is one frame). The old
/// file and the whole new one fit in [`FRAME_ROOM`] beside the larger of the two when the
/// smaller is at most that long, and such a file is one frame up to [`ONE_FRAME_MAX`]; else
/// frames of [`FRAME_ROOM`] do, two of them encoded at once. Each frame's encoding indexes the
/// whole old file first, so fewer frames cost less: Firefox ESR 140 -> 153's libxul.so
/// (184 MB) is 4 frames instead of 6 of 32 MiB, its omni.ja (43 MB) and browser/omni.ja
/// (54 MB) one frame instead of two.
fn frame_len(old_len: usize, new_len: usize) -> Option<usize> {
    let fits = old_len.min(new_len) <= FRAME_ROOM;
    let one = new_len <= FRAME_ROOM || (fits && new_len <= ONE_FRAME_MAX);
    (!one).then_some(FRAME_ROOM)
}

/// The payload of `new` against `old` at zstd `level`: one zstd frame.
///
/// For old files over 8 MiB it comes from zstd's multithreaded path, with one worker: that path
/// (as the zstd program uses) lets long distance matching see the prefix, which the
/// single-threaded path does not. Firefox's omni.ja (43 MB) costs 1,848,351 B instead of
/// 3,384,901 B. On the security updates' smaller files it saved 26 bytes in all and cost 25%
/// more build time. With one worker the payload does not depend on the machine; a frame of up
/// to 64 MiB is one job on that path.
fn encode_in(old: &[u8], new: &[u8], level: i32) -> io::Result<Vec<u8>> {
    let window = window_log(old.len() as u64 + new.len() as u64);
    let mut encoder = zstd::stream::write::Encoder::with_ref_prefix(Vec::new(), level, old)?;
    encoder.set_parameter(CParameter::WindowLog(window))?;
    encoder.set_parameter(CParameter::EnableLongDistanceMatching(true))?;
    if window >= WIDE_WINDOW_LOG {
        encoder.set_parameter(CParameter::ChainLog(WIDE_TABLES_LOG))?;
        encoder.set_parameter(CParameter::HashLog(WIDE_TABLES_LOG))?;
    }
    if old.len() > MULTITHREADED_MIN_OLD {
        encoder.set_parameter(CParameter::NbWorkers(1))?;
    }
    encoder.set_parameter(CParameter::ChecksumFlag(false))?;
    encoder.set_pledged_src_size(Some(new.len() as u64))?;
    encoder.write_all(new)?;
    encoder.finish()
}

/// The framed payload of `new` against `old`: each `frame_len` bytes of `new` a zstd frame
/// (see [`encode_in`]) with the whole old file as prefix, so that decoding holds the old file
/// and one frame, not the old file and the new one. `threads` frames are encoded at once.
///
/// Layout: [`FRAMED_MAGIC`], the frame length (u32, little-endian), then for each frame the
/// length of its zstd frame (u32) and the frame. The last frame is what remains of the file.
///
/// Firefox ESR 140 -> 153, measured before the code filter and [`WIDE_TABLES_LOG`]: libxul.so
/// (184 MB) cost 47,797,619 B in 4 frames of 48 MiB
/// (47,942,073 B in 6 of 32 MiB, 47,529,799 B as one frame, which took 73 s against 84 s for
/// the 6 on 2 cores), and decodes in 48 MiB beside the old file instead of 175 MiB. The whole
/// Firefox build took 184 s and 330 s of CPU with frames of 48 MiB and both omni.ja files one
/// frame each, against 232 s and 431 s with frames of 32 MiB: each frame indexes the whole
/// old file before it encodes anything.
fn encode_framed(
    old: &[u8],
    new: &[u8],
    level: i32,
    frame_len: usize,
    threads: usize,
) -> io::Result<Vec<u8>> {
    let declared = u32::try_from(frame_len)
        .ok()
        .filter(|&len| len >= MIN_FRAME_LEN)
        .ok_or_else(|| io::Error::other(format!("frame length {frame_len} out of range")))?;
    let frames = || -> io::Result<Vec<Vec<u8>>> {
        new.par_chunks(frame_len)
            .map(|frame| encode_in(old, frame, level))
            .collect()
    };
    // Each frame is encoded alike on any thread: the payload does not depend on the machine.
    let threads = threads.clamp(1, rayon::current_num_threads().max(1));
    let frames = match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
        Ok(pool) => pool.install(frames)?,
        Err(_) => new
            .chunks(frame_len)
            .map(|frame| encode_in(old, frame, level))
            .collect::<io::Result<_>>()?,
    };
    let total: usize = frames.iter().map(|frame| frame.len() + 4).sum();
    let mut out = Vec::with_capacity(FRAMED_MAGIC.len() + 4 + total);
    out.extend_from_slice(FRAMED_MAGIC);
    out.extend_from_slice(&declared.to_le_bytes());
    for frame in frames {
        let len =
            u32::try_from(frame.len()).map_err(|_| io::Error::other("a zstd frame over 4 GiB"))?;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&frame);
    }
    Ok(out)
}

/// Decode one zstd frame read from `input` against `old` into exactly `new_len` bytes.
fn decode_frame(
    old: &[u8],
    input: impl Read,
    new_len: u64,
    out: &mut dyn Write,
) -> Result<(), DecodeError> {
    let window = window_log(old.len() as u64 + new_len);
    let mut raw = zstd::stream::raw::Decoder::with_ref_prefix(old).map_err(DecodeError::Corrupt)?;
    raw.set_parameter(DParameter::WindowLogMax(window))
        .map_err(DecodeError::Corrupt)?;
    let input = io::BufReader::with_capacity(PAYLOAD_BUFFER, input);
    let decoder = zstd::stream::zio::Reader::new(input, raw);
    copy_exact_len(decoder, new_len, out)
}

/// Decode the frames of a framed payload (see [`encode_framed`]), its magic number already
/// read: `payload_len` more bytes, which must hold exactly the frames of `new_len` bytes.
fn decode_frames(
    old: &[u8],
    payload: &mut dyn Read,
    payload_len: u64,
    new_len: u64,
    out: &mut dyn Write,
) -> Result<(), DecodeError> {
    let mut left = payload_len;
    let frame_len = read_u32(payload, &mut left, "its frame length")?;
    if frame_len < MIN_FRAME_LEN {
        return Err(corrupt(&format!(
            "frame length {frame_len} is below {MIN_FRAME_LEN}"
        )));
    }
    let frames = new_len.div_ceil(u64::from(frame_len));
    for k in 0..frames {
        let len = u64::from(read_u32(payload, &mut left, "a frame")?);
        let this = (new_len - k * u64::from(frame_len)).min(u64::from(frame_len));
        left = left
            .checked_sub(len)
            .ok_or_else(|| corrupt(&format!("frame {k} runs past the payload's end")))?;
        decode_frame(old, payload.take(len), this, out).map_err(|e| match e {
            DecodeError::TooLong { .. } | DecodeError::WrongLength { .. } => {
                corrupt(&format!("frame {k} does not decode to its {this} bytes"))
            }
            e => e,
        })?;
    }
    match left {
        0 => Ok(()),
        _ => Err(corrupt(&format!("{left} bytes follow the last frame"))),
    }
}

/// The next little-endian u32 of a framed payload with `left` bytes left in it.
fn read_u32(payload: &mut dyn Read, left: &mut u64, what: &str) -> Result<u32, DecodeError> {
    read_bytes(payload, left, what).map(u32::from_le_bytes)
}

/// Read `N` bytes of `payload`, of which `left` are left.
fn read_bytes<const N: usize>(
    payload: &mut dyn Read,
    left: &mut u64,
    what: &str,
) -> Result<[u8; N], DecodeError> {
    *left = left
        .checked_sub(N as u64)
        .ok_or_else(|| corrupt(&format!("the payload ends before {what}")))?;
    let mut bytes = [0u8; N];
    payload
        .read_exact(&mut bytes)
        .map_err(DecodeError::Corrupt)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::text;

    /// Text: the old file's, moved, then 2 MiB of new text, which only the frames' own matching
    /// (not the old file) compresses.
    fn moved_and_new_text() -> (Vec<u8>, Vec<u8>) {
        let old = text(1, 3 << 20);
        let mut new = old[1 << 20..].to_vec();
        new.extend_from_slice(&old[..1 << 20]);
        new.extend_from_slice(&text(2, (2 << 20) + 12_345));
        (old, new)
    }

    /// A file a few lines apart from its old version keeps the probe's payload; one with much
    /// new text is encoded at level 19, which packs the new text smaller.
    #[test]
    fn tiny_deltas_keep_the_probe_and_others_take_level_19() {
        let old = text(3, 400 << 10);
        let mut near = old.clone();
        near.splice(1000..1000, text(4, 500));
        near.splice(200_000..200_010, text(5, 300));
        let mut far = old[..200 << 10].to_vec();
        far.extend(text(6, 200 << 10));
        for (new, tiny) in [(&near, true), (&far, false)] {
            let payload = ZstdPrefix
                .encode(&old, new)
                .expect("encode")
                .expect("a payload");
            let probe = encode_in(&old, new, PROBE_LEVEL).expect("probe");
            assert_eq!(probe.len() <= new.len() / TINY, tiny);
            let want = match tiny {
                true => probe,
                false => encode_in(&old, new, LEVEL).expect("level 19"),
            };
            assert_eq!(payload, want);
            assert_eq!(
                ZstdPrefix
                    .decode(&old, &payload, new.len() as u64)
                    .expect("decode"),
                *new
            );
        }
    }

    /// A large binary is encoded at level 19 where the bound is at least 2/3 of the estimate,
    /// or far; text and files under [`ESTIMATE_MIN`] bytes are not estimated.
    #[test]
    fn level_19_is_skipped_only_below_two_thirds_of_the_estimate() {
        let old = crate::test_data::noise(31, 600 << 10);
        let mut new = old.clone();
        for i in (0..new.len()).step_by(97) {
            new[i] ^= 0x11;
        }
        let below = |old: &[u8], new: &[u8], bound: usize| {
            ZstdPrefix.encode_below(old, new, bound).expect("encode")
        };
        let full = |old: &[u8], new: &[u8]| ZstdPrefix.encode(old, new).expect("encode");
        let estimate = encode_at(&old, &new, ESTIMATE_LEVEL, None)
            .expect("encode")
            .payload
            .len();
        let line = (estimate * 2).div_ceil(3);
        assert!(line > 1 && line <= new.len() / 4, "estimate {estimate}");
        assert_eq!(below(&old, &new, line - 1), None);
        assert_eq!(below(&old, &new, line), full(&old, &new));
        // An unrelated file: a far bound under 2/3 of the estimate is not given up on.
        let unrelated = crate::test_data::noise(32, new.len());
        let far = unrelated.len() / 4 + 1;
        let estimate = encode_at(&old, &unrelated, ESTIMATE_LEVEL, None)
            .expect("encode")
            .payload
            .len();
        assert!(far * 3 < estimate * 2, "estimate {estimate}");
        assert_eq!(below(&old, &unrelated, far), full(&old, &unrelated));
        // Text, and a binary under ESTIMATE_MIN, are encoded whatever the bound.
        let old_text = text(33, new.len());
        let new_text = text(34, new.len());
        assert_eq!(below(&old_text, &new_text, 1), full(&old_text, &new_text));
        let small = &new[..ESTIMATE_MIN - 1];
        assert!(!crate::is_text(small));
        assert_eq!(below(&old, small, 1), full(&old, small));
    }

    /// x86-64 code at file offset 0x1000: calls to 64 functions and loads of 64 globals spread
    /// over noise.
    fn x86_program(len: usize) -> Vec<u8> {
        let mut code = crate::test_data::noise(7, len);
        let mut x = 12345u64;
        for at in (0..code.len() - 64).step_by(16) {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let target = |k: u64| 0x1000 + (k % 64) as usize * 4096;
            let d = target(x >> 33) as i64 - (0x1000 + at + 5) as i64;
            code[at] = 0xe8;
            code[at + 1..at + 5].copy_from_slice(&(d as i32).to_le_bytes());
            let d = (0x100_0000 + (x >> 40) % 64 * 8) as i64 - (0x1000 + at + 12) as i64;
            code[at + 5..at + 8].copy_from_slice(&[0x48, 0x8b, 0x05]);
            code[at + 8..at + 12].copy_from_slice(&(d as i32).to_le_bytes());
        }
        code
    }

    /// AArch64 code at file offset 0x1000: calls (`bl`) to 64 functions and `adrp`s of 64
    /// pages, three words in four, the fourth noise.
    fn arm64_program(len: usize) -> Vec<u8> {
        let mut code = crate::test_data::noise(9, len);
        let mut x = 54321u64;
        for at in (0..code.len()).step_by(16) {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let site = 0x1000 + at as i64;
            let target = 0x1000 + (x >> 33) as i64 % 64 * 4096;
            let bl = 0x9400_0000 | ((target - site) >> 2) as u32 & 0x03ff_ffff;
            let page = ((0x80_0000 + (x >> 40) as i64 % 64 * 4096) >> 12) - (site >> 12);
            let imm = page as u32 & 0x1f_ffff;
            let adrp = 0x9000_0000 | ((imm & 3) << 29) | ((imm >> 2) << 5) | (x as u32 & 0x1f);
            let next = 0x1000 + (x >> 50) as i64 % 64 * 4096;
            let bl_next = 0x9400_0000 | ((next - site - 8) >> 2) as u32 & 0x03ff_ffff;
            code[at..at + 4].copy_from_slice(&bl.to_le_bytes());
            code[at + 4..at + 8].copy_from_slice(&adrp.to_le_bytes());
            code[at + 8..at + 12].copy_from_slice(&bl_next.to_le_bytes());
        }
        code
    }

    /// A program against an old file of other bytes: its payload is the converted one, and
    /// smaller. Against itself, the payload without conversion is kept.
    #[test]
    fn code_is_converted_where_that_is_smaller() {
        check_converted(
            &crate::bsdiff::elf_with_code(&x86_program(256 << 10)),
            FILTERED_MAGIC,
        );
    }

    #[test]
    fn arm64_code_is_converted_where_that_is_smaller() {
        let mut new = crate::bsdiff::elf_with_code(&arm64_program(256 << 10));
        new[0x12..0x14].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
        check_converted(&new, FILTERED_ARM64_MAGIC);
    }

    /// A universal Mach-O file: each slice's code converted as its machine's.
    #[test]
    fn universal_code_is_converted_where_that_is_smaller() {
        let new = universal_program(256 << 10);
        check_converted(&new, FILTERED_TAGGED_MAGIC);
    }

    /// From [`CHOOSE_MIN`], level 19 encodes only the form that was smaller at level 6: the one
    /// an estimate names, even where the other would be smaller, and without an estimate the
    /// one level 6 picks. Below, both forms are encoded and the smaller kept.
    #[test]
    fn level_19_encodes_the_form_level_6_chose() {
        let old = text(8, 64 << 10);
        let estimate = |converted| {
            Some(Estimate {
                len: usize::MAX,
                converted,
            })
        };
        let large = crate::bsdiff::elf_with_code(&x86_program(256 << 10));
        let small = crate::bsdiff::elf_with_code(&x86_program(32 << 10));
        assert!(small.len() <= CHOOSE_MIN && large.len() > CHOOSE_MIN);
        for new in [&large, &small] {
            let ranges = crate::bsdiff::code_ranges(new);
            let filtered = code_filter::filter(new, &ranges).expect("code to convert");
            let at = |bytes: &[u8], level| encode_plain(&old, bytes, level, true).expect("encode");
            let as_is = at(new, LEVEL);
            let mut converted = FILTERED_MAGIC.to_vec();
            converted.extend_from_slice(&filtered.header);
            converted.extend_from_slice(&at(&filtered.bytes, LEVEL));
            assert!(converted.len() < as_is.len());
            let named = |converted| {
                encode_at(&old, new, LEVEL, estimate(converted))
                    .expect("encode")
                    .payload
            };
            if new.len() > CHOOSE_MIN {
                assert_eq!(named(false), as_is);
                assert_eq!(named(true), converted);
                let header = FILTERED_MAGIC.len() + filtered.header.len();
                let level_6 = header + at(&filtered.bytes, ESTIMATE_LEVEL).len()
                    < at(new, ESTIMATE_LEVEL).len();
                let chosen = if level_6 { &converted } else { &as_is };
                assert_eq!(
                    encode_at(&old, new, ESTIMATE_LEVEL, None)
                        .expect("encode")
                        .converted,
                    level_6
                );
                assert_eq!(
                    &ZstdPrefix.encode(&old, new).expect("encode"),
                    &Some(chosen.clone())
                );
            } else {
                assert_eq!(named(false), converted);
                assert_eq!(named(true), converted);
            }
        }
    }

    /// A universal Mach-O file of an x86-64 slice and an arm64 one, each with `len` bytes of code.
    fn universal_program(len: usize) -> Vec<u8> {
        crate::bsdiff::universal_x86_arm64(&x86_program(len), &arm64_program(len))
    }

    /// `tests/data/macho-2.new`, a small universal program, used by the format tests;
    /// `BSI_BLESS=1` writes it again.
    #[test]
    fn the_stored_universal_program_is_its_builder() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/macho-2.new");
        let file = universal_program(16 << 10);
        if std::env::var_os("BSI_BLESS").is_some() {
            std::fs::write(&path, &file).expect("write the fixture");
        }
        let stored = std::fs::read(&path).expect("read the fixture");
        assert!(stored == file, "macho-2.new differs from its builder");
    }

    /// `new`'s payload against other bytes is filtered (`magic`), smaller than without the
    /// filter, and decodes whole and streamed; against itself the payload is not filtered; cut
    /// anywhere, it is refused.
    /// A signed Mach-O file's code signature slots are zeroed before compressing and filled in
    /// as it is decoded, whole or streamed a few bytes at a time: the hashes of its changed
    /// pages cost nothing. Its table cut anywhere is an error.
    #[test]
    fn signed_files_cost_no_slots() {
        let (old, new) = codesign::tests::signed_pair(60_000);
        let changed_pages = (1..60_000 / 4096).step_by(3).count();
        let payload = ZstdPrefix
            .encode(&old, &new)
            .expect("encode")
            .expect("applies");
        assert_eq!(&payload[..4], SIGNED_MAGIC);
        round_trips(&old, &new, &payload);
        // With a stale slot in each directory, none is named and the changed slots cost.
        let mut stale = new.clone();
        for d in codesign::directories(&new) {
            stale[d.slots_at as usize] ^= 1;
        }
        let unsigned = ZstdPrefix
            .encode(&old, &stale)
            .expect("encode")
            .expect("applies");
        assert_ne!(&unsigned[..4], SIGNED_MAGIC);
        assert!(
            payload.len() + changed_pages * 52 * 3 / 4 < unsigned.len(),
            "{} B against {} B with stale slots",
            payload.len(),
            unsigned.len()
        );
        for cut in 0..40 {
            assert!(ZstdPrefix
                .decode(&old, &payload[..cut], new.len() as u64)
                .is_err());
        }
        // A table that names slots past the file, or runs past the payload.
        let mut bad = payload.clone();
        bad[5] = 0;
        assert!(ZstdPrefix.decode(&old, &bad, new.len() as u64).is_err());
        let mut long = payload[..4].to_vec();
        long.extend_from_slice(&[0xff, 0x7f]);
        long.extend_from_slice(&payload[4..]);
        assert!(ZstdPrefix.decode(&old, &long, new.len() as u64).is_err());
    }

    /// `payload` decodes to `new`, whole, and streamed: read 7 bytes and written a line at a
    /// time.
    fn round_trips(old: &[u8], new: &[u8], payload: &[u8]) {
        let decoded = ZstdPrefix
            .decode(old, payload, new.len() as u64)
            .expect("decode");
        assert!(decoded == new, "round trip");
        let mut out = Vec::new();
        let mut input = io::BufReader::with_capacity(7, payload);
        ZstdPrefix
            .decode_stream_into(
                old,
                &mut input,
                payload.len() as u64,
                new.len() as u64,
                &mut io::LineWriter::new(&mut out),
            )
            .expect("decode");
        assert!(out == new, "round trip, streamed");
    }

    fn check_converted(new: &[u8], magic: &[u8; 4]) {
        let old = text(8, 64 << 10);
        let payload = ZstdPrefix
            .encode(&old, new)
            .expect("encode")
            .expect("applies");
        assert_eq!(&payload[..4], magic);
        let plain = encode_plain(&old, new, LEVEL, true).expect("encode");
        assert!(
            payload.len() < plain.len() * 9 / 10,
            "{} B converted, {} B not",
            payload.len(),
            plain.len()
        );
        round_trips(&old, new, &payload);

        let same = ZstdPrefix
            .encode(new, new)
            .expect("encode")
            .expect("applies");
        assert_ne!(&same[..4], magic);
        assert!(same.len() < 100, "{} B for an unchanged file", same.len());
        // A filtered payload cut anywhere: an error, never a panic.
        for cut in (0..payload.len())
            .step_by(61)
            .chain([4, 5, 6, payload.len() - 1])
        {
            assert!(ZstdPrefix
                .decode(&old, &payload[..cut], new.len() as u64)
                .is_err());
        }
    }

    #[test]
    fn frames_give_the_same_payload_on_any_number_of_threads() {
        let (old, new) = moved_and_new_text();
        let frame_len = 1 << 20;
        // Level 3: the frames are what is tested, not the level.
        let payloads: Vec<Vec<u8>> = [1, 2, 3]
            .into_iter()
            .map(|threads| encode_framed(&old, &new, 3, frame_len, threads).expect("encode"))
            .collect();
        assert!(
            payloads.windows(2).all(|w| w[0] == w[1]),
            "same bytes on 1, 2, 3 threads"
        );
        let payload = &payloads[0];
        assert_eq!(&payload[..4], FRAMED_MAGIC);
        let decoded = ZstdPrefix
            .decode(&old, payload, new.len() as u64)
            .expect("decode");
        assert!(decoded == new, "round trip");
        // Each frame has the whole old file as prefix: the moved 3 MiB cost almost nothing,
        // 2 MiB of 14 letters about 1 MB (3.8 bits each).
        let len = payload.len();
        assert!(
            len < 1_100_000,
            "{len} B for 3 MiB moved and 2 MiB of new text"
        );
        let whole = encode_in(&old, &new, 3).expect("encode");
        assert_ne!(&whole[..4], FRAMED_MAGIC, "one frame is a bare zstd frame");
        let decoded = ZstdPrefix
            .decode(&old, &whole, new.len() as u64)
            .expect("decode");
        assert!(decoded == new, "round trip of one frame");
    }

    /// Decoding one frame beside the old file stays within [`FRAME_ROOM`] of the larger of the
    /// two files, and a file is cut only when it must be or is longer than one job.
    #[test]
    fn frames_keep_decoding_within_room_of_the_larger_file() {
        const MIB: usize = 1 << 20;
        let sizes = [
            0,
            1,
            MIB,
            32 * MIB,
            48 * MIB,
            48 * MIB + 1,
            64 * MIB,
            64 * MIB + 1,
            400 * MIB,
        ];
        for old in sizes {
            for new in sizes {
                let held = old + frame_len(old, new).unwrap_or(new).min(new);
                assert!(held <= old.max(new) + FRAME_ROOM, "{old} and {new}: {held}");
                match frame_len(old, new) {
                    Some(_) => assert!(
                        old.min(new) > FRAME_ROOM || new > ONE_FRAME_MAX,
                        "{old} and {new}: cut when one frame fits and is one job"
                    ),
                    None => assert!(new <= ONE_FRAME_MAX, "{old} and {new}: one long frame"),
                }
            }
        }
        // Firefox ESR 140 -> 153: libxul.so in 4 frames, both omni.ja files in one.
        assert_eq!(frame_len(177_080_976, 183_747_312), Some(FRAME_ROOM));
        assert_eq!(frame_len(37_689_560, 43_277_929), None);
        assert_eq!(frame_len(45_703_959, 54_251_429), None);
    }

    #[test]
    fn framed_payloads_are_checked() {
        let old = text(3, 200_000);
        let mut new = text(4, 150_000);
        new.extend_from_slice(&old[..100_000]);
        let frame_len = MIN_FRAME_LEN as usize;
        let good = encode_framed(&old, &new, 3, frame_len, 1).expect("encode");
        let decode = |payload: &[u8], len: usize| ZstdPrefix.decode(&old, payload, len as u64);
        assert!(decode(&good, new.len()).is_ok_and(|out| out == new));

        // Cut anywhere: an error, never a panic or a file.
        for cut in (0..good.len())
            .step_by(97)
            .chain([4, 8, 11, good.len() - 1])
        {
            assert!(decode(&good[..cut], new.len()).is_err(), "cut at {cut}");
        }
        // Bytes after the last frame.
        let mut longer = good.clone();
        longer.push(0);
        let e = decode(&longer, new.len()).expect_err("trailing byte");
        assert!(e.to_string().contains("follow the last frame"), "{e}");
        // A length the frames do not make: one byte more or less.
        for len in [new.len() - 1, new.len() + 1] {
            assert!(decode(&good, len).is_err(), "new length {len}");
        }
        // A frame length below the minimum.
        let mut tiny = good.clone();
        tiny[4..8].copy_from_slice(&(MIN_FRAME_LEN - 1).to_le_bytes());
        let e = decode(&tiny, new.len()).expect_err("tiny frames");
        assert!(e.to_string().contains("below"), "{e}");
        // Frames of 64 KiB read as frames of 128 KiB: each must give its own length.
        let mut doubled = good.clone();
        doubled[4..8].copy_from_slice(&(2 * MIN_FRAME_LEN).to_le_bytes());
        let e = decode(&doubled, new.len()).expect_err("frames read as twice as long");
        assert!(e.to_string().contains("frame 0 does not decode"), "{e}");
        let whole = encode_in(&old, &new, 3).expect("encode");
        let mut one_frame = FRAMED_MAGIC.to_vec();
        one_frame.extend_from_slice(&MIN_FRAME_LEN.to_le_bytes());
        one_frame.extend_from_slice(&(whole.len() as u32).to_le_bytes());
        one_frame.extend_from_slice(&whole);
        let e = decode(&one_frame, new.len()).expect_err("a frame longer than declared");
        assert!(e.to_string().contains("frame 0 does not decode"), "{e}");
    }

    #[test]
    fn decodes_the_payload_as_it_comes_in() {
        use std::cell::Cell;
        use std::rc::Rc;

        /// Counts the payload bytes read so far.
        struct Counting<'a>(&'a [u8], Rc<Cell<usize>>);
        impl Read for Counting<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = self.0.read(buf)?;
                self.1.set(self.1.get() + n);
                Ok(n)
            }
        }
        /// Notes how much of the payload had been read when the first byte came out.
        struct FirstOut(Vec<u8>, Rc<Cell<usize>>, Option<usize>);
        impl Write for FirstOut {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.2.get_or_insert(self.1.get());
                self.0.write(buf)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }

        // Noise does not compress: the payload is about as long as the new file.
        let old = text(3, 64 << 10);
        let new = crate::test_data::noise(4, 1 << 20);
        let payload = ZstdPrefix
            .encode(&old, &new)
            .expect("encode")
            .expect("applies");
        assert!(payload.len() > 4 * PAYLOAD_BUFFER, "{} B", payload.len());
        let read = Rc::new(Cell::new(0));
        let mut out = FirstOut(Vec::new(), read.clone(), None);
        let mut input = Counting(&payload, read.clone());
        ZstdPrefix
            .decode_stream_into(
                &old,
                &mut input,
                payload.len() as u64,
                new.len() as u64,
                &mut out,
            )
            .expect("decode");
        assert!(out.0 == new, "round trip");
        assert_eq!(read.get(), payload.len(), "the whole payload was read");
        let first = out.2.expect("bytes came out");
        assert!(
            first <= 2 * PAYLOAD_BUFFER,
            "first bytes out after {first} of {} payload bytes",
            payload.len()
        );
    }
}
