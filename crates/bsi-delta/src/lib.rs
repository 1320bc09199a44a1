//! Per-file encoders of bsi, behind one interface.
//!
//! A payload is produced either by [`compress`] (a whole new file, plain zstd) or by one of the
//! [`DeltaEncoder`]s, which rebuild the new file from the old one. [`encode_best`] tries every
//! delta encoder and plain compression and keeps the smallest result. Decoders never trust the
//! payload: the expected output length comes from the signed manifest and bounds every
//! allocation and the zstd window.
#![forbid(unsafe_code)]

mod blocks;
mod bsdiff;
mod code_filter;
mod gzip;
mod varint;
mod zstd_prefix;

use std::io::{self, Read, Write};

pub use blocks::{reverse as reverse_blocks, reverse_file as reverse_blocks_file, Blocks};
pub use bsdiff::Bsdiff;
pub use gzip::Gzip;
pub use zstd_prefix::{converted_code, ZstdPrefix};

/// Name of plain compression (used for added and replaced files).
pub const PLAIN: &str = "zstd";

/// zstd level for payloads: packages are built once and downloaded by every device.
pub const LEVEL: i32 = 19;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown encoder {0:?}")]
    UnknownEncoder(String),
    #[error("payload is corrupt: {0}")]
    Corrupt(#[source] io::Error),
    #[error("payload decodes to more than the {expected} bytes the manifest names")]
    TooLong { expected: u64 },
    #[error("payload decodes to {actual} bytes but the manifest names {expected}")]
    WrongLength { expected: u64, actual: u64 },
    #[error("cannot write the decoded file: {0}")]
    Output(#[source] io::Error),
    #[error("cannot read the old file: {0}")]
    Input(#[source] io::Error),
}

/// A delta encoder: turns (old, new) into a payload and back.
pub trait DeltaEncoder: Send + Sync {
    /// Stable name written into manifests.
    fn name(&self) -> &'static str;
    /// The payload that rebuilds `new` from `old`, or `None` when this encoder does not apply
    /// to the pair (a gzip encoder given files that are not gzip, say).
    fn encode(&self, old: &[u8], new: &[u8]) -> io::Result<Option<Vec<u8>>>;
    /// [`encode`](Self::encode) for a caller that has a use for the payload only if it is
    /// near (a few places changed): the encoder may give up (`None`) as soon as it is clear that
    /// the files differ in more than that. [`encode_best`] asks this whenever no encoder after
    /// this one needs to know how far the payload is (see [`max_far_len`](Self::max_far_len)).
    fn encode_if_near(&self, old: &[u8], new: &[u8]) -> io::Result<Option<Vec<u8>>> {
        self.encode(old, new)
    }

    /// [`encode_if_near`](Self::encode_if_near) for a caller that has a use for the payload
    /// only if it is smaller than `bound` bytes, the best payload so far: the encoder may give
    /// up (`None`) where a cheap estimate shows that it would not be. [`encode_best`] asks this
    /// instead of `encode_if_near` once it has a payload.
    fn encode_below(&self, old: &[u8], new: &[u8], bound: usize) -> io::Result<Option<Vec<u8>>> {
        let _ = bound;
        self.encode_if_near(old, new)
    }

    /// Rebuild the new file, which the manifest says is `new_len` bytes long, writing it to `out`
    /// as it is produced where the encoder can. On success `out` received exactly `new_len`
    /// bytes; on error it must be discarded.
    fn decode_into(
        &self,
        old: &[u8],
        payload: &[u8],
        new_len: u64,
        out: &mut dyn Write,
    ) -> Result<(), DecodeError>;

    /// Like [`decode_into`](Self::decode_into), reading the `payload_len` bytes of the payload
    /// from `payload`. Encoders that can decode as the payload comes in (zstd-prefix) hold no
    /// more of it than a buffer; the others read it whole first.
    fn decode_stream_into(
        &self,
        old: &[u8],
        payload: &mut dyn Read,
        payload_len: u64,
        new_len: u64,
        out: &mut dyn Write,
    ) -> Result<(), DecodeError> {
        let mut bytes = Vec::with_capacity(usize::try_from(payload_len).unwrap_or(0));
        payload
            .take(payload_len)
            .read_to_end(&mut bytes)
            .map_err(DecodeError::Corrupt)?;
        self.decode_into(old, &bytes, new_len, out)
    }

    /// Largest new file this encoder is always tried on; beyond it the encoder costs more than
    /// it usually wins over the others, and is tried only when every delta so far is weak
    /// (larger than 1/20 of the file).
    fn max_new_len(&self) -> usize {
        usize::MAX
    }

    /// [`max_new_len`](Self::max_new_len) for a new file that is text (see [`is_text_like`]).
    fn max_text_len(&self) -> usize {
        self.max_new_len()
    }

    /// Largest text file (see [`is_text_like`]) this encoder is tried on at
    /// all: beyond [`max_text_len`](Self::max_text_len) it is tried only after weak deltas,
    /// beyond this not even then.
    fn max_weak_text_len(&self) -> usize {
        usize::MAX
    }

    /// Largest new file this encoder is tried on once the best delta so far is far (larger than
    /// 1/4 of the file: the two files have little in common).
    fn max_far_len(&self) -> usize {
        usize::MAX
    }

    /// True when this encoder's payload is plain compression of the new file with more to draw
    /// on (zstd-prefix: the same zstd level, with the old file as history), so that plain
    /// compression need not be tried after it.
    fn covers_plain(&self) -> bool {
        false
    }

    /// True when a payload of this encoder that is not weak ends the search: the encoders after
    /// it would diff the bytes it sees through (gzip: the two compressed streams, which differ
    /// from the first changed block on, so that their deltas are about the file's size).
    fn settles(&self) -> bool {
        false
    }

    /// Like [`decode_into`](Self::decode_into), into memory.
    fn decode(&self, old: &[u8], payload: &[u8], new_len: u64) -> Result<Vec<u8>, DecodeError> {
        let mut out = Vec::with_capacity(initial_capacity(new_len));
        self.decode_into(old, payload, new_len, &mut out)?;
        Ok(out)
    }
}

static GZIP: Gzip = Gzip;
static BLOCKS: Blocks = Blocks;
static ZSTD_PREFIX: ZstdPrefix = ZstdPrefix;
static BSDIFF: Bsdiff = Bsdiff::PLAIN;
/// Cheapest first. gzip costs nothing on other files (it looks at three bytes) and on a
/// changelog that gzip reproduces it wins by two orders of magnitude. Measured per file on
/// libssl3 3.0.17 -> 3.0.20 and the testdata: bsdiff is the smallest on every binary and 5 to
/// 12 times faster than zstd-prefix at level 19, which wins only by a few bytes on small binaries
/// and on text (hence its `max_new_len` and `max_text_len`).
static DELTA_ENCODERS: [&dyn DeltaEncoder; 4] = [&GZIP, &BLOCKS, &BSDIFF, &ZSTD_PREFIX];

/// Every delta encoder, in the order they are tried.
pub fn delta_encoders() -> &'static [&'static dyn DeltaEncoder] {
    &DELTA_ENCODERS
}

/// The delta encoder with this manifest name.
pub fn delta_encoder(name: &str) -> Result<&'static dyn DeltaEncoder, DecodeError> {
    DELTA_ENCODERS
        .iter()
        .copied()
        .find(|e| e.name() == name)
        .ok_or_else(|| DecodeError::UnknownEncoder(name.to_owned()))
}

/// Plain zstd of a whole file, at the package level.
pub fn compress(new: &[u8]) -> io::Result<Vec<u8>> {
    compress_at(new, LEVEL)
}

/// Plain zstd of a whole file at `level`, with a window no larger than the file, so that
/// [`decompress`] accepts it.
pub fn compress_at(new: &[u8], level: i32) -> io::Result<Vec<u8>> {
    let mut encoder = zstd::stream::Encoder::new(Vec::new(), level)?;
    encoder.set_pledged_src_size(Some(new.len() as u64))?;
    encoder.include_checksum(false)?;
    encoder.include_contentsize(true)?;
    encoder.window_log(window_log(new.len() as u64))?;
    io::Write::write_all(&mut encoder, new)?;
    encoder.finish()
}

/// Largest window of [`compress_into`]: 16 MiB, whatever the file size.
pub const STREAM_WINDOW_LOG: u32 = 24;

/// Plain zstd of `data` at `level`, written to `out` as it is produced, with a window of at most
/// 16 MiB: compressing and decompressing it never holds more than that in zstd's buffers.
pub fn compress_into(data: &[u8], level: i32, out: impl Write) -> io::Result<()> {
    compress_stream_into(data, data.len() as u64, level, out)
}

/// [`compress_into`] of the first `len` bytes of `input` (fewer: an error).
pub fn compress_stream_into(
    input: impl Read,
    len: u64,
    level: i32,
    out: impl Write,
) -> io::Result<()> {
    let mut encoder = zstd::stream::Encoder::new(out, level)?;
    encoder.set_pledged_src_size(Some(len))?;
    encoder.include_checksum(false)?;
    encoder.include_contentsize(true)?;
    encoder.window_log(window_log(len).min(STREAM_WINDOW_LOG))?;
    io::copy(&mut input.take(len), &mut encoder)?;
    encoder.finish()?.flush()
}

/// Like [`decompress`], writing the file to `out` as it is produced.
pub fn decompress_into(
    payload: &[u8],
    new_len: u64,
    out: &mut dyn Write,
) -> Result<(), DecodeError> {
    let mut decoder =
        zstd::stream::read::Decoder::with_buffer(payload).map_err(DecodeError::Corrupt)?;
    decoder
        .window_log_max(window_log(new_len))
        .map_err(DecodeError::Corrupt)?;
    copy_exact_len(decoder, new_len, out)
}

/// Like [`decompress_into`], reading the compressed bytes from `input` (a file, say).
pub fn decompress_stream_into(
    input: impl Read,
    new_len: u64,
    out: &mut dyn Write,
) -> Result<(), DecodeError> {
    let mut decoder = zstd::stream::read::Decoder::new(input).map_err(DecodeError::Corrupt)?;
    decoder
        .window_log_max(window_log(new_len))
        .map_err(DecodeError::Corrupt)?;
    copy_exact_len(decoder, new_len, out)
}

/// Copy exactly `expected` bytes from `reader` to `out` and make sure nothing follows; read
/// failures are corruption, write failures are output errors.
pub(crate) fn copy_exact_len(
    mut reader: impl Read,
    expected: u64,
    out: &mut dyn Write,
) -> Result<(), DecodeError> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut copied = 0u64;
    loop {
        let n = reader.read(&mut buf).map_err(DecodeError::Corrupt)?;
        if n == 0 {
            break;
        }
        copied += n as u64;
        if copied > expected {
            return Err(DecodeError::TooLong { expected });
        }
        out.write_all(&buf[..n]).map_err(DecodeError::Output)?;
    }
    if copied != expected {
        return Err(DecodeError::WrongLength {
            expected,
            actual: copied,
        });
    }
    Ok(())
}

/// Inverse of [`compress`], for a file the manifest says is `new_len` bytes long.
pub fn decompress(payload: &[u8], new_len: u64) -> Result<Vec<u8>, DecodeError> {
    let mut decoder =
        zstd::stream::read::Decoder::with_buffer(payload).map_err(DecodeError::Corrupt)?;
    decoder
        .window_log_max(window_log(new_len))
        .map_err(DecodeError::Corrupt)?;
    read_exact_len(decoder, new_len)
}

/// What [`encode_best`] chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// `None` for plain compression, else the delta encoder's name. For a file with no old one,
    /// its payload is that encoder's against the empty file: zstd-prefix's, whose code filter
    /// makes a new executable smaller than plain compression does.
    pub encoder: Option<&'static str>,
    pub payload: Vec<u8>,
}

/// A payload this small is good enough: at most 1/1024 of the new file, or 512 bytes. Once an
/// encoder reaches it, the slower ones (and plain compression) are not tried: they could save at
/// most that much, and on a 90 MB library they cost most of the build.
pub fn good_enough(new_len: usize) -> usize {
    (new_len / 1024).max(512)
}

/// A delta larger than this share of the new file (1/8) is poor: plain zstd shrinks binaries
/// about threefold and text about fivefold, so plain compression is tried only after poor
/// deltas; at level 19 it costs seconds on large files.
const POOR_DELTA_RATIO: usize = 8;

fn is_poor(payload_len: usize, new_len: usize) -> bool {
    payload_len > new_len / POOR_DELTA_RATIO
}

/// A delta larger than this share of the new file (1/20) is weak: encoders beyond their
/// `max_new_len` are tried only after weak deltas. (On Firefox ESR 140 -> 153, blocks gives
/// 9.7% on `browser/omni.ja` and bsdiff 6.2% on `omni.ja`, archives of mostly new scripts
/// where zstd-prefix does better; on the security updates every large file's delta is under
/// 4%.)
const WEAK_DELTA_RATIO: usize = 20;

fn is_weak(payload_len: usize, new_len: usize) -> bool {
    payload_len > new_len / WEAK_DELTA_RATIO
}

/// A delta larger than this share of the new file (1/4) is far: see
/// [`DeltaEncoder::max_far_len`].
const FAR_DELTA_RATIO: usize = 4;

fn is_far(payload_len: usize, new_len: usize) -> bool {
    payload_len > new_len / FAR_DELTA_RATIO
}

/// Whether `data` looks like text: no NUL byte in its first 8000 bytes (git's test).
pub fn is_text(data: &[u8]) -> bool {
    !data[..data.len().min(8000)].contains(&0)
}

/// Whether `data` is mostly text: at least 3/4 of its bytes printable ASCII, tab, CR or LF
/// (counted in [`TEXT_SAMPLES`] windows of [`TEXT_WINDOW`] bytes spread over a larger file).
/// Archives of stored text are, though their headers hold NUL bytes: Firefox's `omni.ja`
/// files, 85% and 95%. Executables are not (at most 56% on the 60 libraries and programs of
/// the bench's pairs, 18% to 40% on most), nor compressed data (about 37%).
pub fn is_mostly_text(data: &[u8]) -> bool {
    let printable = |window: &[u8]| {
        window
            .iter()
            .filter(|&&b| matches!(b, b'\t' | b'\n' | b'\r' | b' '..=b'~'))
            .count()
    };
    let (sampled, printable) = if data.len() <= TEXT_SAMPLES * TEXT_WINDOW {
        (data.len(), printable(data))
    } else {
        let step = (data.len() - TEXT_WINDOW) / (TEXT_SAMPLES - 1);
        let count = (0..TEXT_SAMPLES)
            .map(|k| printable(&data[k * step..k * step + TEXT_WINDOW]))
            .sum();
        (TEXT_SAMPLES * TEXT_WINDOW, count)
    };
    printable * 4 >= sampled * 3
}

/// Whether `data` is text as [`encode_best`] sees it (for the encoders' `max_text_len` and
/// `max_weak_text_len`): text by git's test ([`is_text`]) or [mostly text](is_mostly_text).
pub fn is_text_like(data: &[u8]) -> bool {
    is_text(data) || is_mostly_text(data)
}

/// Windows [`is_mostly_text`] counts in a file larger than all of them together.
const TEXT_SAMPLES: usize = 256;
const TEXT_WINDOW: usize = 4096;

/// Encode `new` against `old` (when there is one) with each delta encoder, cheapest first, and
/// with plain compression; keep the smallest payload (ties go to the earlier encoder, and to
/// plain compression, which needs no old file). Stops as soon as a payload is
/// [`good_enough`], or is not weak and from an encoder that [settles](DeltaEncoder::settles);
/// skips encoders beyond their `max_new_len` (`max_text_len` for text) unless every delta so far
/// is weak, beyond their `max_weak_text_len` on text in any case, encoders beyond their
/// `max_far_len` once a delta is far, and plain compression when
/// a delta is not poor or an encoder that covers it ran. Once there is a payload, each encoder
/// after it may give up where an estimate shows it would not be smaller (see
/// [`DeltaEncoder::encode_below`]).
///
/// On Firefox ESR 140 -> 153 this is what makes libxul (184 MB, little left in common after
/// 13 major versions) cost 47.5 MB with zstd-prefix instead of 57.6 MB with bsdiff or 53.8 MB
/// plainly compressed, without running bsdiff (blocks' delta is 34% of the file).
///
/// A file with no old one whose code the code filter converts (an ELF or Mach-O file) is also
/// encoded by zstd-prefix against the empty file, and that payload kept where it is smaller than
/// plain compression: Firefox ESR 153's new libmozinference.so (1.75 MB) 582,089 -> 520,331 B,
/// libxml2.so.2.9.14 as a new file 657,415 -> 599,154 B, Pillow's arm64 libjpeg 154,181 ->
/// 148,497 B.
pub fn encode_best(old: Option<&[u8]>, new: &[u8]) -> io::Result<Encoded> {
    encode_best_with(delta_encoders().iter().copied(), old, new, HOLD_IN_MEMORY)
}

/// [`encode_best`] with the given delta encoders, in the order given; a best payload larger than
/// `hold_in_memory` waits in a temporary file (see [`HOLD_IN_MEMORY`]).
pub(crate) fn encode_best_with<'e>(
    encoders: impl Iterator<Item = &'e dyn DeltaEncoder>,
    old: Option<&[u8]>,
    new: &[u8],
    hold_in_memory: usize,
) -> io::Result<Encoded> {
    let enough = good_enough(new.len());
    let text = is_text_like(new);
    let max_len = |encoder: &dyn DeltaEncoder| match text {
        true => encoder.max_text_len(),
        false => encoder.max_new_len(),
    };
    let weak = |best: &Option<Best>| best.as_ref().is_none_or(|b| is_weak(b.len, new.len()));
    let mut best: Option<Best> = None;
    let mut plain_covered = false;
    let encoders: Vec<&dyn DeltaEncoder> = encoders.collect();
    if let Some(old) = old {
        for (k, &encoder) in encoders.iter().enumerate() {
            if best.as_ref().is_some_and(|b| b.len <= enough) {
                break;
            }
            if new.len() > max_len(encoder) && !weak(&best) {
                continue;
            }
            if text && new.len() > encoder.max_weak_text_len() {
                continue;
            }
            if new.len() > encoder.max_far_len()
                && best.as_ref().is_some_and(|b| is_far(b.len, new.len()))
            {
                continue;
            }
            let far_decides = encoders[k + 1..]
                .iter()
                .any(|later| new.len() > later.max_far_len());
            let payload = match (far_decides, &best) {
                (true, _) => encoder.encode(old, new)?,
                (false, Some(best)) => encoder.encode_below(old, new, best.len)?,
                (false, None) => encoder.encode_if_near(old, new)?,
            };
            // Also when the encoder gave up below the best payload: plain compression, which it
            // covers, would not be smaller either.
            plain_covered |= encoder.covers_plain();
            let Some(payload) = payload else {
                continue;
            };
            let settled = encoder.settles() && !is_weak(payload.len(), new.len());
            if best.as_ref().is_none_or(|b| payload.len() < b.len) {
                drop(best.take()); // freed before the new one is held
                best = Some(Best::hold(encoder.name(), payload, hold_in_memory)?);
            }
            if settled {
                break;
            }
        }
    }
    match best {
        Some(delta) if plain_covered || !is_poor(delta.len, new.len()) => delta.into_encoded(),
        best => {
            let plain = compress(new)?;
            if old.is_none() {
                if let Some(code) = zstd_prefix::encode_code(new)? {
                    if code.len() < plain.len() {
                        return Ok(Encoded {
                            encoder: Some(ZSTD_PREFIX.name()),
                            payload: code,
                        });
                    }
                }
            }
            match best {
                Some(delta) if delta.len < plain.len() => delta.into_encoded(),
                _ => Ok(Encoded {
                    encoder: None,
                    payload: plain,
                }),
            }
        }
    }
}

/// A payload larger than this (16 MiB) waits in a temporary file while other encoders run:
/// Firefox's libxul.so (184 MB) has a 61.6 MB blocks payload while bsdiff builds its suffix
/// array (708 MB) and a 57.6 MB bsdiff payload while zstd-prefix runs.
const HOLD_IN_MEMORY: usize = 16 << 20;

/// The smallest payload so far in [`encode_best`].
struct Best {
    encoder: &'static str,
    len: usize,
    held: Held,
}

enum Held {
    Memory(Vec<u8>),
    /// In an unnamed temporary file, from its start.
    File(std::fs::File),
}

impl Best {
    fn hold(encoder: &'static str, payload: Vec<u8>, hold_in_memory: usize) -> io::Result<Best> {
        let len = payload.len();
        let held = if len > hold_in_memory {
            let mut file = tempfile::tempfile()?;
            file.write_all(&payload)?;
            Held::File(file)
        } else {
            Held::Memory(payload)
        };
        Ok(Best { encoder, len, held })
    }

    fn into_encoded(self) -> io::Result<Encoded> {
        let payload = match self.held {
            Held::Memory(payload) => payload,
            Held::File(mut file) => {
                use std::io::Seek;
                file.rewind()?;
                let mut payload = Vec::with_capacity(self.len);
                file.read_to_end(&mut payload)?;
                if payload.len() != self.len {
                    return Err(io::Error::other(format!(
                        "a temporary file held {} bytes of a {}-byte payload",
                        payload.len(),
                        self.len
                    )));
                }
                payload
            }
        };
        Ok(Encoded {
            encoder: Some(self.encoder),
            payload,
        })
    }
}

/// Payload corruption with this message.
pub(crate) fn corrupt(message: &str) -> DecodeError {
    DecodeError::Corrupt(io::Error::new(
        io::ErrorKind::InvalidData,
        message.to_owned(),
    ))
}

/// Smallest zstd window log (10..=31) that covers `len` bytes.
pub(crate) fn window_log(len: u64) -> u32 {
    let bits = 64 - len.saturating_sub(1).leading_zeros();
    bits.clamp(10, 31)
}

/// Room reserved up front for an output of `expected` bytes: never more than 16 MiB, so that a
/// large length costs memory only as real data arrives.
pub(crate) fn initial_capacity(expected: u64) -> usize {
    usize::try_from(expected.min(16 << 20)).unwrap_or(0)
}

/// Read exactly `expected` bytes from `reader` and make sure nothing follows; never allocates
/// more than `expected` up front.
pub(crate) fn read_exact_len(reader: impl Read, expected: u64) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::with_capacity(initial_capacity(expected));
    let read = reader
        .take(expected.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(DecodeError::Corrupt)? as u64;
    if read > expected {
        return Err(DecodeError::TooLong { expected });
    }
    if read != expected {
        return Err(DecodeError::WrongLength {
            expected,
            actual: read,
        });
    }
    Ok(out)
}

/// Generated inputs for the tests of every encoder.
#[cfg(test)]
pub(crate) mod test_data {
    /// `len` pseudo-random bytes.
    pub fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 56) as u8
            })
            .collect()
    }

    /// `len` pseudo-random letters, spaces and newlines (14 symbols): text that zstd's higher
    /// levels pack smaller than its lower ones.
    pub fn text(seed: u64, len: usize) -> Vec<u8> {
        noise(seed, len)
            .iter()
            .map(|b| b"etaoin shrdlu\n"[usize::from(*b) % 14])
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::test_data::noise;
    use super::*;
    use proptest::prelude::*;

    /// A file with no old one that is an executable (ELF, Mach-O, signed or universal) is
    /// encoded by zstd-prefix against the empty file, smaller than plainly compressed, and
    /// decodes against the empty file; a file that is no executable is compressed plainly.
    #[test]
    fn new_executables_are_smaller_than_plainly_compressed() {
        let data = |name: &str| {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/data")
                .join(name);
            std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        };
        for (name, code) in [
            ("elf-1.new.so", Some("x86-64")),
            ("elf-1.arm64.new.so", Some("arm64")),
            ("macho-2.new", Some("x86-64 and arm64")),
            ("macho-3.new", None),
        ] {
            let new = data(name);
            let best = encode_best(None, &new).expect("encode");
            let plain = compress(&new).expect("compress");
            assert_eq!(best.encoder, Some("zstd-prefix"), "{name}");
            assert!(best.payload.len() < plain.len(), "{name}");
            assert_eq!(converted_code(&best.payload), code, "{name}");
            let decoded = ZstdPrefix
                .decode(&[], &best.payload, new.len() as u64)
                .expect("decode");
            assert!(decoded == new, "{name}");
        }
        let text = test_data::text(7, 50_000);
        let best = encode_best(None, &text).expect("encode");
        assert_eq!(best.encoder, None);
        assert_eq!(best.payload, compress(&text).expect("compress"));
    }

    #[test]
    fn window_log_covers_length() {
        assert_eq!(window_log(0), 10);
        assert_eq!(window_log(1024), 10);
        assert_eq!(window_log(1025), 11);
        assert_eq!(window_log(90 << 20), 27);
        assert_eq!(window_log(u64::MAX), 31);
    }

    #[test]
    fn plain_round_trip_and_length_checks() {
        let data = b"hello hello hello hello".repeat(100);
        let payload = compress(&data).expect("compress");
        assert_eq!(
            decompress(&payload, data.len() as u64).expect("decode"),
            data
        );
        assert!(matches!(
            decompress(&payload, data.len() as u64 - 1),
            Err(DecodeError::TooLong { .. })
        ));
        assert!(matches!(
            decompress(&payload, data.len() as u64 + 1),
            Err(DecodeError::WrongLength { .. })
        ));
        assert!(decompress(b"not zstd at all", 10).is_err());
    }

    #[test]
    fn best_prefers_delta_for_a_small_edit() {
        let old = noise(1, 200_000);
        let mut new = old.clone();
        new.splice(1000..1000, b"inserted".iter().copied());
        new[150_000] ^= 0xff;
        let best = encode_best(Some(&old), &new).expect("encode");
        let name = best
            .encoder
            .expect("a delta beats plain compression of random bytes");
        assert!(
            best.payload.len() < 200,
            "payload {} bytes",
            best.payload.len()
        );
        let decoded = delta_encoder(name)
            .expect("known")
            .decode(&old, &best.payload, new.len() as u64)
            .expect("decode");
        assert_eq!(decoded, new);
        assert!(matches!(
            delta_encoder("bsdiff9"),
            Err(DecodeError::UnknownEncoder(_))
        ));
    }

    /// Lines of words: text whose lines a new version reorders, rewords and extends.
    fn lines(seed: u64, count: usize) -> Vec<Vec<u8>> {
        let words = [
            "fix", "use", "after", "free", "in", "layout", "JIT", "parser", "bounds",
        ];
        let mut state = seed;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as usize
        };
        (0..count)
            .map(|i| {
                let mut line = format!("{i:06} ").into_bytes();
                for _ in 0..6 + next() % 6 {
                    line.extend_from_slice(words[next() % words.len()].as_bytes());
                    line.push(b' ');
                }
                line.push(b'\n');
                line
            })
            .collect()
    }

    #[test]
    fn large_files_with_weak_deltas_also_try_zstd_prefix() {
        // Beyond zstd-prefix's 1 MiB for text, its payload is considered only when every delta
        // before it is weak: here the new file keeps a third of the old lines, shuffled.
        let old_lines = lines(1, 40_000);
        let old: Vec<u8> = old_lines.concat();
        let mut new_lines = lines(2, 30_000);
        for (i, line) in old_lines.iter().enumerate().step_by(3) {
            new_lines.insert((i * 7919) % new_lines.len(), line.clone());
        }
        let new: Vec<u8> = new_lines.concat();
        assert!(is_text(&new) && new.len() > ZSTD_PREFIX.max_text_len());
        let size = |e: &dyn DeltaEncoder| e.encode(&old, &new).expect("encode").map(|p| p.len());
        let bsdiff = size(&BSDIFF).expect("applies");
        let prefix = size(&ZSTD_PREFIX).expect("applies");
        assert!(
            is_weak(bsdiff, new.len()),
            "bsdiff {bsdiff} of {}",
            new.len()
        );
        let best = encode_best(Some(&old), &new).expect("encode");
        assert_eq!(
            best.encoder,
            Some("zstd-prefix"),
            "bsdiff {bsdiff}, zstd-prefix {prefix}"
        );
        assert_eq!(best.payload.len(), prefix);
        assert!(prefix < compress(&new).expect("compress").len());

        // When a cheaper delta is good, zstd-prefix is not tried on a file that large.
        let mut edited = old.clone();
        edited[500_000] ^= 1;
        let best = encode_best(Some(&old), &edited).expect("encode");
        assert_ne!(best.encoder, Some("zstd-prefix"));
    }

    /// An encoder that counts its `encode` calls, with its own `max_far_len` if given.
    struct Spy<'e> {
        inner: &'e dyn DeltaEncoder,
        /// Calls of `encode`, `encode_if_near` and `encode_below`; of `encode_if_near`; and
        /// of `encode_below` that gave up.
        calls: std::sync::atomic::AtomicUsize,
        near_calls: std::sync::atomic::AtomicUsize,
        gave_up: std::sync::atomic::AtomicUsize,
        far_len: Option<usize>,
    }

    impl<'e> Spy<'e> {
        fn new(inner: &'e dyn DeltaEncoder, far_len: Option<usize>) -> Spy<'e> {
            Spy {
                inner,
                calls: 0.into(),
                near_calls: 0.into(),
                gave_up: 0.into(),
                far_len,
            }
        }

        fn calls(&self) -> usize {
            self.calls.load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    impl DeltaEncoder for Spy<'_> {
        fn name(&self) -> &'static str {
            self.inner.name()
        }
        fn encode(&self, old: &[u8], new: &[u8]) -> io::Result<Option<Vec<u8>>> {
            self.calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.inner.encode(old, new)
        }
        fn encode_if_near(&self, old: &[u8], new: &[u8]) -> io::Result<Option<Vec<u8>>> {
            self.calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.near_calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.inner.encode_if_near(old, new)
        }
        fn encode_below(
            &self,
            old: &[u8],
            new: &[u8],
            bound: usize,
        ) -> io::Result<Option<Vec<u8>>> {
            self.calls
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let payload = self.inner.encode_below(old, new, bound)?;
            if payload.is_none() {
                self.gave_up
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(payload)
        }
        fn decode_into(
            &self,
            old: &[u8],
            payload: &[u8],
            new_len: u64,
            out: &mut dyn Write,
        ) -> Result<(), DecodeError> {
            self.inner.decode_into(old, payload, new_len, out)
        }
        fn max_new_len(&self) -> usize {
            self.inner.max_new_len()
        }
        fn max_text_len(&self) -> usize {
            self.inner.max_text_len()
        }
        fn max_weak_text_len(&self) -> usize {
            self.inner.max_weak_text_len()
        }
        fn max_far_len(&self) -> usize {
            self.far_len.unwrap_or_else(|| self.inner.max_far_len())
        }
        fn covers_plain(&self) -> bool {
            self.inner.covers_plain()
        }
        fn settles(&self) -> bool {
            self.inner.settles()
        }
    }

    /// Where bsdiff's delta is weak but a fraction of zstd-prefix's (a large binary changed by
    /// one every few bytes), zstd-prefix gives up after its estimate: bsdiff's payload is kept,
    /// and was smaller than zstd-prefix's at level 19.
    #[test]
    fn zstd_prefix_gives_up_where_its_estimate_is_far_above_bsdiff() {
        let old = noise(21, 512 << 10);
        let mut new = old.clone();
        let mut at = 0;
        for step in noise(22, new.len() / 4) {
            at += 3 + usize::from(step % 6);
            if at >= new.len() {
                break;
            }
            new[at] = new[at].wrapping_add(1);
        }
        assert!(!is_text(&new));
        let size = |e: &dyn DeltaEncoder| e.encode(&old, &new).expect("encode").map(|p| p.len());
        let bsdiff = size(&BSDIFF).expect("applies");
        let prefix = size(&ZSTD_PREFIX).expect("applies");
        assert!(
            is_weak(bsdiff, new.len()) && !is_far(bsdiff, new.len()),
            "bsdiff {bsdiff}"
        );
        assert!(prefix > bsdiff, "zstd-prefix {prefix}, bsdiff {bsdiff}");
        let zstd = Spy::new(&ZSTD_PREFIX, None);
        let encoders: [&dyn DeltaEncoder; 2] = [&BSDIFF, &zstd];
        let best = encode_best_with(encoders.into_iter(), Some(&old), &new, HOLD_IN_MEMORY)
            .expect("encode");
        assert_eq!((best.encoder, best.payload.len()), (Some("bsdiff"), bsdiff));
        let count =
            |n: &std::sync::atomic::AtomicUsize| n.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            (zstd.calls(), count(&zstd.gave_up)),
            (1, 1),
            "zstd-prefix {prefix}"
        );
    }

    /// How many times each of bsdiff and zstd-prefix is tried on (old, new).
    fn tries(old: &[u8], new: &[u8]) -> (usize, usize) {
        let encoders: [&dyn DeltaEncoder; 2] = [&BSDIFF, &ZSTD_PREFIX];
        let counted = encoders.map(|e| Spy::new(e, None));
        encode_best_with(
            counted.iter().map(|c| c as &dyn DeltaEncoder),
            Some(old),
            new,
            HOLD_IN_MEMORY,
        )
        .expect("encode");
        let [b, z] = counted.map(|c| c.calls());
        (b, z)
    }

    #[test]
    fn zstd_prefix_is_tried_on_small_binaries_and_on_text() {
        // Binary (NUL bytes) of 200 KB edited every 1000 bytes: a good delta, no zstd-prefix.
        let mut old = noise(7, 200_000);
        for i in (0..old.len()).step_by(5) {
            old[i] = 0;
        }
        let mut new = old.clone();
        for i in (0..new.len()).step_by(1000) {
            new[i] ^= 0x5a;
        }
        assert!(!is_text(&new) && new.len() > ZSTD_PREFIX.max_new_len());
        assert_eq!(tries(&old, &new), (1, 0));
        // 60 KB of it, edited about every 50 bytes (at irregular places, by irregular values) so
        // that bsdiff's payload is not good enough to stop at: under 64 KiB, zstd-prefix is tried
        // however good bsdiff's delta is.
        let mut small = old[..60_000].to_vec();
        let edits = noise(8, 2_000);
        let mut at = 0;
        for pair in edits.chunks_exact(2) {
            at += 1 + usize::from(pair[0] % 100);
            if at >= small.len() {
                break;
            }
            small[at] ^= pair[1] | 1;
        }
        assert_eq!(tries(&old[..60_000], &small), (1, 1));
        // Text of about the same size, edited about every 300 bytes: zstd-prefix is tried.
        let old_text: Vec<u8> = lines(3, 4_000).concat();
        let mut new_text = old_text.clone();
        let mut at = 0;
        for step in noise(9, 1_000) {
            at += 50 + 2 * usize::from(step);
            if at >= new_text.len() {
                break;
            }
            new_text[at] = b'#';
        }
        assert!(is_text(&new_text) && new_text.len() > ZSTD_PREFIX.max_new_len());
        assert!(new_text.len() > BSDIFF.max_weak_text_len());
        assert_eq!(tries(&old_text, &new_text), (0, 1));
        // Its first 60 KB, edited about every 30 bytes: both are tried.
        let old_head = &old_text[..60_000];
        let mut new_head = old_head.to_vec();
        for (i, step) in noise(10, 2_000).into_iter().enumerate() {
            new_head[i * 30 + usize::from(step % 16)] = b'#';
        }
        assert_eq!(tries(old_head, &new_head), (1, 1));
    }

    /// An archive of stored text: file headers of binary fields (NUL bytes among them) before
    /// each member of lines.
    fn archive(seed: u64, members: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for (k, member) in (0..members)
            .map(|k| lines(seed + k as u64, 20).concat())
            .enumerate()
        {
            out.extend_from_slice(b"PK\x03\x04\x0a\0\0\0\0\0");
            out.extend_from_slice(&(member.len() as u32).to_le_bytes());
            out.extend_from_slice(&(k as u32).to_le_bytes());
            out.extend_from_slice(&member);
        }
        out
    }

    #[test]
    fn mostly_text_is_text_in_binary_wrapping_but_not_code_or_compressed_data() {
        let text: Vec<u8> = lines(11, 2_000).concat();
        assert!(is_text(&text) && is_mostly_text(&text));
        let stored = archive(12, 400);
        assert!(!is_text(&stored) && is_mostly_text(&stored));
        // Large enough to be sampled, with the same verdicts.
        let large = archive(13, 8_000);
        assert!(large.len() > TEXT_SAMPLES * TEXT_WINDOW && is_mostly_text(&large));
        let compressed = compress(&large).expect("compress");
        assert!(!is_mostly_text(&compressed));
        let noisy = noise(14, 2 << 20);
        assert!(!is_mostly_text(&noisy));
        // A NUL byte at one place in 3 is more than a quarter of the bytes: not text; one in 5
        // is less.
        let every = |n: usize| -> Vec<u8> {
            let mut v = text.clone();
            v.iter_mut().step_by(n).for_each(|b| *b = 0);
            v
        };
        assert!(!is_mostly_text(&every(3)) && is_mostly_text(&every(5)));
        assert!(is_mostly_text(&[]));
    }

    #[test]
    fn bsdiff_is_not_tried_on_large_archives_of_text_even_after_weak_deltas() {
        // A new version of an archive of stored text: half its members new, the rest edited.
        let old = archive(20, 600);
        let mut new = archive(21, 300);
        new.extend_from_slice(&old[..old.len() / 2]);
        for i in (0..new.len()).step_by(997) {
            new[i] = b'#';
        }
        assert!(!is_text(&new) && is_mostly_text(&new) && new.len() > 64 << 10);
        assert_eq!(tries(&old, &new), (0, 1));
        // The same edits on a binary of that size, where bsdiff is tried.
        let (mut old_bin, mut new_bin) = (noise(22, old.len()), noise(23, new.len() / 2));
        old_bin.iter_mut().step_by(3).for_each(|b| *b = 0);
        new_bin.extend_from_slice(&old_bin[..old_bin.len() / 2]);
        assert!(!is_mostly_text(&new_bin));
        assert_eq!(tries(&old_bin, &new_bin).0, 1);
    }

    #[test]
    fn an_encoder_is_skipped_on_large_files_once_deltas_are_far() {
        // bsdiff limited to 10 KB once far, after blocks: 100 KB of noise, edited or replaced.
        let old = noise(11, 100_000);
        let unrelated = noise(12, 100_000);
        let mut touched = old.clone();
        for i in (0..touched.len()).step_by(200) {
            touched[i] ^= 0xff;
        }
        let bsdiff = Spy::new(&BSDIFF, Some(10_000));
        let run = |new: &[u8]| {
            let before = bsdiff.calls();
            let encoders: [&dyn DeltaEncoder; 2] = [&BLOCKS, &bsdiff];
            encode_best_with(encoders.into_iter(), Some(&old), new, HOLD_IN_MEMORY)
                .expect("encode");
            bsdiff.calls() - before
        };
        let blocks = |new: &[u8]| BLOCKS.encode(&old, new).expect("encode").expect("applies");
        assert!(is_far(blocks(&unrelated).len(), unrelated.len()));
        assert!(!is_far(blocks(&touched).len(), touched.len()));
        assert!(unrelated.len() > 10_000 && touched.len() > 10_000);
        assert!(blocks(&touched).len() > good_enough(touched.len()));
        assert_eq!(run(&unrelated), 0);
        assert_eq!(run(&touched), 1);
        assert_eq!(run(&unrelated[..9_000]), 1, "under the limit it is tried");
    }

    /// Blocks gives up on files changed every few bytes where its payload is of use only if
    /// near, and runs to the end where a later encoder's turn depends on how far it is.
    #[test]
    fn blocks_gives_up_where_only_a_near_payload_is_of_use() {
        let old = noise(11, 300_000);
        let changed_every = |step: usize| {
            let mut new = old.clone();
            for i in (0..new.len()).step_by(step) {
                new[i] ^= 0xff;
            }
            new
        };
        let (touched, scattered) = (changed_every(200), changed_every(20));
        let near = |new: &[u8]| BLOCKS.encode_if_near(&old, new).expect("encode");
        assert!(near(&touched).is_some_and(|p| !is_poor(p.len(), touched.len())));
        assert!(near(&scattered).is_none());
        let small = &scattered[..blocks::GIVES_UP_MIN - 1];
        assert!(
            BLOCKS
                .encode_if_near(&old, small)
                .expect("encode")
                .is_some(),
            "a small file is encoded whole"
        );
        let whole = BLOCKS.encode(&old, &scattered).expect("encode");
        assert!(whole.is_some_and(|p| is_poor(p.len(), scattered.len())));
        // Once blocks' payload is far, bsdiff limited to 10 KB is not tried: plain compression
        // is all that is left.
        let bsdiff_alone = BSDIFF.encode(&old, &scattered).expect("encode");
        let bsdiff_alone = (Some("bsdiff"), bsdiff_alone.map(|p| p.len()));
        let plain = (None, Some(compress(&scattered).expect("compress").len()));
        for (far_len, near_calls, chosen) in [(None, 1, bsdiff_alone), (Some(10_000), 0, plain)] {
            let blocks = Spy::new(&BLOCKS, None);
            let bsdiff = Spy::new(&BSDIFF, far_len);
            let encoders: [&dyn DeltaEncoder; 2] = [&blocks, &bsdiff];
            let best =
                encode_best_with(encoders.into_iter(), Some(&old), &scattered, HOLD_IN_MEMORY)
                    .expect("encode");
            let count =
                |n: &std::sync::atomic::AtomicUsize| n.load(std::sync::atomic::Ordering::Relaxed);
            assert_eq!(
                count(&blocks.near_calls),
                near_calls,
                "bsdiff far at {far_len:?}"
            );
            assert_eq!(blocks.calls(), 1, "bsdiff far at {far_len:?}");
            assert_eq!((best.encoder, Some(best.payload.len())), chosen);
        }
    }

    #[test]
    fn a_gzip_delta_that_is_not_weak_settles_the_search() {
        use crate::gzip::tests::gzip9;
        let old_raw = test_data::text(6, 200_000);
        let old = gzip9(&old_raw);
        // 3 KB of new text ahead of the old: a delta neither good enough nor weak.
        let grown = gzip9(&[test_data::text(9, 3_000), old_raw].concat());
        // Reproducible gzip too, but of unrelated content: the gzip delta is weak.
        let unrelated = gzip9(&test_data::text(5, 200_000));
        let gzip = Spy::new(&GZIP, None);
        let blocks = Spy::new(&BLOCKS, None);
        let run = |new: &[u8]| {
            let before = (gzip.calls(), blocks.calls());
            let encoders: [&dyn DeltaEncoder; 2] = [&gzip, &blocks];
            let best = encode_best_with(encoders.into_iter(), Some(&old), new, HOLD_IN_MEMORY)
                .expect("encode");
            let calls = (gzip.calls() - before.0, blocks.calls() - before.1);
            (best.encoder, calls)
        };
        let payload = GZIP.encode(&old, &grown).expect("encode").expect("applies");
        assert!(payload.len() > good_enough(grown.len()));
        assert!(!is_weak(payload.len(), grown.len()));
        assert_eq!(run(&grown), (Some("gzip"), (1, 0)));
        let (_, calls) = run(&unrelated);
        assert_eq!(calls, (1, 1), "after a weak gzip delta, blocks is tried");
    }

    #[test]
    fn payloads_held_in_a_file_come_back_the_same() {
        let old_text: Vec<u8> = lines(4, 3_000).concat();
        let mut edited = old_text.clone();
        edited[10_000] = b'#';
        let unrelated: Vec<u8> = lines(5, 3_000).concat();
        for (old, new) in [
            (&old_text, &edited),
            (&old_text, &unrelated),
            (&edited, &old_text),
        ] {
            let encoders = || delta_encoders().iter().copied();
            let in_memory =
                encode_best_with(encoders(), Some(old), new, usize::MAX).expect("encode");
            let in_file = encode_best_with(encoders(), Some(old), new, 0).expect("encode");
            assert_eq!(in_file, in_memory);
        }
    }

    proptest! {
        #[test]
        fn every_encoder_round_trips(old in proptest::collection::vec(any::<u8>(), 0..4000),
                                     new in proptest::collection::vec(any::<u8>(), 0..4000)) {
            for encoder in delta_encoders() {
                let Some(payload) = encoder.encode(&old, &new).expect("encode") else {
                    continue;
                };
                let decoded = encoder.decode(&old, &payload, new.len() as u64).expect("decode");
                prop_assert_eq!(&decoded, &new);
            }
        }

        #[test]
        fn decoders_refuse_garbage_without_panicking(old in proptest::collection::vec(any::<u8>(), 0..2000),
                                                     junk in proptest::collection::vec(any::<u8>(), 0..2000),
                                                     len in 0u64..100_000) {
            for encoder in delta_encoders() {
                let _ = encoder.decode(&old, &junk, len);
            }
            let _ = decompress(&junk, len);
        }
    }
}
