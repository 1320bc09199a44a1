//! The fast path for near-identical files (a rebuild where a few bytes differ): find the long
//! equal runs with a rolling hash over the old file's blocks, and encode only the rest.
//!
//! Payload, format 1:
//!
//! ```text
//! "BLK1"                      magic and version
//! u64 LE                      body length (bounded by the new file's length, see BODY_SLACK)
//! zstd frame                  the body:
//!   repeated { varint literal_len, literal bytes,
//!              varint zigzag(copy_start - previous_copy_end), varint copy_len }
//!   ending right after the literal (or copy) that completes the new file
//! ```

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;

use crate::{corrupt, varint, window_log, DecodeError, DeltaEncoder};

const MAGIC: &[u8; 4] = b"BLK1";
/// A body never exceeds the new file plus this much per 32 bytes, plus a constant: each copy
/// op (at most 30 bytes of varints) covers at least `MIN_MATCH` bytes.
const BODY_SLACK_CONSTANT: u64 = 1024;
const MIN_MATCH: usize = 32;
/// Bytes of an old file on disk read at a time by [`Blocks::decode_file_into`].
const COPY_BUFFER: u64 = 1 << 20;
/// Polynomial rolling hash base (odd).
const BASE: u64 = 0x100_0000_01b3;

/// See the module documentation.
#[derive(Debug, Clone, Copy)]
pub struct Blocks;

fn body_bound(new_len: u64) -> u64 {
    new_len
        .saturating_mul(2)
        .saturating_add(BODY_SLACK_CONSTANT)
}

fn block_size(old_len: usize) -> usize {
    if old_len < 8 << 20 {
        32
    } else {
        64
    }
}

/// The rolling hash of a window is already a 64-bit value; mix it once and use it as is.
#[derive(Default)]
struct MixHasher(u64);

impl Hasher for MixHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        let mut x = v ^ (v >> 31);
        x = x.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = x ^ (x >> 29);
    }
}

/// The polynomial hash of `window` (first byte the highest power of [`BASE`]), the value the
/// rolling hash keeps. Computed in four interleaved Horner chains over every fourth byte, which
/// the CPU runs side by side (a single chain waits on each multiply): wrapping arithmetic is a
/// ring, so the sum is the same.
fn hash(window: &[u8]) -> u64 {
    const BASE_2: u64 = BASE.wrapping_mul(BASE);
    const BASE_3: u64 = BASE_2.wrapping_mul(BASE);
    const BASE_4: u64 = BASE_2.wrapping_mul(BASE_2);
    let chunks = window.chunks_exact(4);
    let rest = chunks.remainder();
    let mut lanes = [0u64; 4];
    for chunk in chunks {
        for (lane, &b) in lanes.iter_mut().zip(chunk) {
            *lane = lane.wrapping_mul(BASE_4).wrapping_add(u64::from(b));
        }
    }
    let whole = lanes[0]
        .wrapping_mul(BASE_3)
        .wrapping_add(lanes[1].wrapping_mul(BASE_2))
        .wrapping_add(lanes[2].wrapping_mul(BASE))
        .wrapping_add(lanes[3]);
    rest.iter().fold(whole, |h, &b| {
        h.wrapping_mul(BASE).wrapping_add(u64::from(b))
    })
}

pub(crate) fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + 8 <= n && a[i..i + 8] == b[i..i + 8] {
        i += 8;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

struct Body {
    bytes: Vec<u8>,
    previous_copy_end: usize,
}

impl Body {
    fn op(&mut self, literal: &[u8], copy: Option<(usize, usize)>) {
        varint::put(&mut self.bytes, literal.len() as u64);
        self.bytes.extend_from_slice(literal);
        if let Some((start, len)) = copy {
            varint::put(
                &mut self.bytes,
                varint::zigzag(start as i64 - self.previous_copy_end as i64),
            );
            varint::put(&mut self.bytes, len as u64);
            self.previous_copy_end = start + len;
        }
    }
}

/// One bit per slot, set for each hash of the index: a clear bit spares the index lookup (a
/// cache miss) at most positions of a literal run. About 8 slots per block keep the bits
/// within the L2 cache (150 KB for libcrypto's 4.7 MB) and let through 1 miss in 8.
struct Filter {
    bits: Vec<u64>,
    shift: u32,
}

impl Filter {
    fn new(blocks: usize) -> Filter {
        let slots = (blocks * 8).next_power_of_two().max(64);
        Filter {
            bits: vec![0; slots / 64],
            shift: 64 - slots.trailing_zeros(),
        }
    }

    fn slot(&self, h: u64) -> usize {
        (h.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> self.shift) as usize
    }

    fn insert(&mut self, h: u64) {
        let slot = self.slot(h);
        self.bits[slot / 64] |= 1 << (slot % 64);
    }

    fn may_hold(&self, h: u64) -> bool {
        let slot = self.slot(h);
        self.bits[slot / 64] & (1 << (slot % 64)) != 0
    }
}

/// The body for `new` against `old`: copies of every run of at least `MIN_MATCH` equal bytes
/// found, literals for the rest; `None` as soon as the literals come to more than `give_up_at`
/// bytes.
fn body(old: &[u8], new: &[u8], give_up_at: usize) -> Option<Vec<u8>> {
    let b = block_size(old.len());
    let mut index: HashMap<u64, u32, BuildHasherDefault<MixHasher>> = HashMap::default();
    let mut filter = Filter::new(0);
    if old.len() >= b && new.len() >= b {
        index.reserve(old.len() / b);
        filter = Filter::new(old.len() / b);
        for (i, block) in old.chunks_exact(b).enumerate() {
            let h = hash(block);
            index.entry(h).or_insert(i as u32);
            filter.insert(h);
        }
    }
    let top = (0..b - 1).fold(1u64, |p, _| p.wrapping_mul(BASE)); // BASE^(b-1)
    let mut out = Body {
        bytes: Vec::new(),
        previous_copy_end: 0,
    };
    let (mut n, mut literal_start) = (0usize, 0usize);
    let mut literals = 0usize;
    // `diagonal`: old offset minus new offset of the last copy; a substitution keeps it.
    let mut diagonal: i64 = 0;
    let mut rolling: Option<u64> = None;
    while n + b <= new.len() {
        let mut found = None;
        let expected = n as i64 + diagonal;
        if expected >= 0 && (expected as usize) + MIN_MATCH <= old.len() {
            let e = expected as usize;
            if new[n] == old[e]
                && new[n..n + MIN_MATCH.min(new.len() - n)]
                    == old[e..e + MIN_MATCH.min(new.len() - n)]
            {
                found = Some(e);
            }
        }
        if found.is_none() && !index.is_empty() {
            let h = match rolling {
                Some(h) => h,
                None => hash(&new[n..n + b]),
            };
            rolling = Some(h);
            if let Some(&block) = filter.may_hold(h).then(|| index.get(&h)).flatten() {
                let start = block as usize * b;
                if old[start..start + b] == new[n..n + b] {
                    found = Some(start);
                }
            }
        }
        match found {
            Some(mut start) => {
                let mut from = n;
                while from > literal_start && start > 0 && new[from - 1] == old[start - 1] {
                    from -= 1;
                    start -= 1;
                }
                let len = common_prefix(&old[start..], &new[from..]);
                literals += from - literal_start;
                if literals > give_up_at {
                    return None;
                }
                out.op(&new[literal_start..from], Some((start, len)));
                n = from + len;
                literal_start = n;
                diagonal = start as i64 - from as i64;
                rolling = None;
            }
            None => {
                if let (Some(h), true) = (rolling, n + b < new.len()) {
                    let h = h.wrapping_sub(u64::from(new[n]).wrapping_mul(top));
                    rolling = Some(h.wrapping_mul(BASE).wrapping_add(u64::from(new[n + b])));
                } else {
                    rolling = None;
                }
                n += 1;
            }
        }
    }
    if new.len() - literal_start > give_up_at.saturating_sub(literals) {
        return None;
    }
    if literal_start < new.len() || new.is_empty() {
        out.op(&new[literal_start..], None);
    }
    Some(out.bytes)
}

impl Blocks {
    /// A blocks payload rebuilding `new` from `old`, its body compressed at zstd `level`: for
    /// payloads made where time matters more than bytes (revert data made on a device).
    pub fn encode_at(old: &[u8], new: &[u8], level: i32) -> io::Result<Vec<u8>> {
        pack(&checked_body(old, new), level)
    }

    /// [`decode_into`](DeltaEncoder::decode_into) against the old file `old` (`old_len` bytes)
    /// read where the payload copies from it, a megabyte at a time: the old file is not held in
    /// memory, nor read where the new file does not use it.
    pub fn decode_file_into(
        &self,
        old: &File,
        old_len: u64,
        payload: &[u8],
        new_len: u64,
        out: &mut dyn Write,
    ) -> Result<(), DecodeError> {
        let mut buf = vec![0u8; COPY_BUFFER.min(new_len).max(1) as usize];
        walk(payload, old_len, new_len, |op| match op {
            Op::Literal(bytes) => out.write_all(bytes).map_err(DecodeError::Output),
            Op::Copy { start, len, .. } => {
                let mut done = 0u64;
                while done < len {
                    let chunk = &mut buf[..(len - done).min(COPY_BUFFER) as usize];
                    old.read_exact_at(chunk, start + done)
                        .map_err(DecodeError::Input)?;
                    out.write_all(chunk).map_err(DecodeError::Output)?;
                    done += chunk.len() as u64;
                }
                Ok(())
            }
        })
    }
}

/// The body rebuilding `new` from `old`, all literal should it exceed the bound the decoder
/// enforces (it cannot: each copy covers at least `MIN_MATCH` bytes; this keeps it decodable).
fn checked_body(old: &[u8], new: &[u8]) -> Vec<u8> {
    let body = body(old, new, usize::MAX).unwrap_or_default();
    if body.len() as u64 <= body_bound(new.len() as u64) {
        return body;
    }
    let mut literal_only = Body {
        bytes: Vec::new(),
        previous_copy_end: 0,
    };
    literal_only.op(new, None);
    literal_only.bytes
}

/// The payload carrying `body`: magic, body length, the body compressed at zstd `level`.
fn pack(body: &[u8], level: i32) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(body.len() / 2 + 16);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crate::compress_at(body, level)?);
    Ok(out)
}

/// The zstd level of a package payload's body: 19 where blocks may win (a body under 64 KiB, or
/// under 1 MiB and at most 1/16 of the file), 3 where the body is large in itself or against
/// the file. A large body means the files differ a lot and bsdiff wins
/// (libxml2's library: a 190,905 B blocks payload against bsdiff's 38,578 B; at level 19 it took
/// as long as bsdiff), so it is made quickly.
fn body_level(body_len: usize, new_len: usize) -> i32 {
    let small = body_len < SMALL_BODY || (body_len < 1 << 20 && body_len <= new_len / 16);
    if small {
        19
    } else {
        3
    }
}

/// Blocks gives up on a file whose literals pass 1/`GIVE_UP` of it: the files differ in more
/// than a few places, where bsdiff, which finds every run blocks finds and codes the bytes
/// between them as differences, wins by far (libcrypto 3.0.17 -> 3.0.20: literals 44% of the
/// file, 832,426 B against bsdiff's 64,686 B; libssl's 109,269 B against 4,595 B; libxml2's
/// 190,905 B against 16,340 B). Giving up spares the rest of the scan and the body's
/// compression: libcrypto's blocks took 16 to 18 ms instead of 46 to 53 ms, on the path that
/// ends with its bsdiff payload.
const GIVE_UP: usize = 8;
/// Smaller files are encoded whole: blocks takes no time there, and where a few lines of a
/// small file changed, a tenth of it or more, its payload can be the smallest.
pub(crate) const GIVES_UP_MIN: usize = 256 << 10;

/// A body this small (64 KiB) is compressed at level 19 whatever its share of the file.
const SMALL_BODY: usize = 64 << 10;

impl DeltaEncoder for Blocks {
    fn name(&self) -> &'static str {
        "blocks"
    }

    fn encode(&self, old: &[u8], new: &[u8]) -> io::Result<Option<Vec<u8>>> {
        let body = checked_body(old, new);
        pack(&body, body_level(body.len(), new.len())).map(Some)
    }

    /// Gives up on a new file of `GIVES_UP_MIN` or more once its literals pass 1/`GIVE_UP`
    /// of it.
    fn encode_if_near(&self, old: &[u8], new: &[u8]) -> io::Result<Option<Vec<u8>>> {
        if new.len() < GIVES_UP_MIN {
            return self.encode(old, new);
        }
        match body(old, new, new.len() / GIVE_UP) {
            Some(body) if body.len() as u64 <= body_bound(new.len() as u64) => {
                pack(&body, body_level(body.len(), new.len())).map(Some)
            }
            _ => Ok(None),
        }
    }

    fn decode_into(
        &self,
        old: &[u8],
        payload: &[u8],
        new_len: u64,
        out: &mut dyn Write,
    ) -> Result<(), DecodeError> {
        walk(payload, old.len() as u64, new_len, |op| match op {
            Op::Literal(bytes) => out.write_all(bytes).map_err(DecodeError::Output),
            Op::Copy { start, len, .. } => out
                .write_all(&old[start as usize..(start + len) as usize])
                .map_err(DecodeError::Output),
        })
    }
}

/// One step of a blocks body, as [`walk`] sees it.
enum Op<'a> {
    Literal(&'a [u8]),
    /// `len` bytes of the old file from `start`, landing at `at` in the new file.
    Copy {
        start: u64,
        len: u64,
        at: u64,
    },
}

/// Check a blocks payload for an old file of `old_len` and a new file of `new_len` bytes, and
/// hand its steps to `visit` in order: literal bytes (in chunks) and copies, every length and
/// offset checked first.
fn walk(
    payload: &[u8],
    old_len: u64,
    new_len: u64,
    mut visit: impl FnMut(Op<'_>) -> Result<(), DecodeError>,
) -> Result<(), DecodeError> {
    let rest = payload
        .strip_prefix(MAGIC)
        .ok_or_else(|| corrupt("not a blocks payload"))?;
    let (len_bytes, frame) = rest
        .split_at_checked(8)
        .ok_or_else(|| corrupt("truncated header"))?;
    let body_len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
    if body_len > body_bound(new_len) {
        return Err(corrupt("body longer than the new file allows"));
    }
    let mut decoder =
        zstd::stream::read::Decoder::with_buffer(frame).map_err(DecodeError::Corrupt)?;
    decoder
        .window_log_max(window_log(body_len))
        .map_err(DecodeError::Corrupt)?;
    let mut body = io::BufReader::new(decoder.take(body_len));
    let mut written = 0u64;
    let mut previous_copy_end = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let literal = varint::read(&mut body)?;
        if literal > new_len - written {
            return Err(DecodeError::TooLong { expected: new_len });
        }
        let mut left = literal;
        while left > 0 {
            let chunk = &mut buf[..left.min(64 * 1024) as usize];
            body.read_exact(chunk).map_err(DecodeError::Corrupt)?;
            visit(Op::Literal(chunk))?;
            left -= chunk.len() as u64;
        }
        written += literal;
        if written == new_len {
            break;
        }
        let delta = varint::unzigzag(varint::read(&mut body)?);
        let len = varint::read(&mut body)?;
        let copy_start = (previous_copy_end as i64)
            .checked_add(delta)
            .filter(|s| *s >= 0)
            .ok_or_else(|| corrupt("copy before the start of the old file"))?
            as u64;
        let copy_end = copy_start
            .checked_add(len)
            .filter(|e| *e <= old_len)
            .ok_or_else(|| corrupt("copy beyond the end of the old file"))?;
        if len == 0 {
            return Err(corrupt("empty copy"));
        }
        if len > new_len - written {
            return Err(DecodeError::TooLong { expected: new_len });
        }
        visit(Op::Copy {
            start: copy_start,
            len,
            at: written,
        })?;
        written += len;
        previous_copy_end = copy_end;
        if written == new_len {
            break;
        }
    }
    let mut extra = [0u8; 1];
    match body.read(&mut extra).map_err(DecodeError::Corrupt)? {
        0 => Ok(()),
        _ => Err(corrupt("data after the end of the new file")),
    }
}

/// A blocks payload that rebuilds `old` from the new file, derived from a blocks `payload` that
/// rebuilds the new file (`new_len` bytes) from `old`, without needing the new file: each copy
/// of the forward payload says where a range of `old` reappears. This is how a device keeps
/// revert data for a large near-identical file without holding both versions in memory. The
/// body is compressed at zstd `level`.
pub fn reverse(
    old: &[u8],
    payload: &[u8],
    new_len: u64,
    level: i32,
) -> Result<Vec<u8>, DecodeError> {
    reverse_reading(old.len() as u64, payload, new_len, level, |range| {
        Ok(Cow::Borrowed(
            &old[range.start as usize..range.end as usize],
        ))
    })
}

/// [`reverse`] with the old file `old` (`old_len` bytes) on disk: only the ranges of it that
/// the new file does not copy are read.
pub fn reverse_file(
    old: &File,
    old_len: u64,
    payload: &[u8],
    new_len: u64,
    level: i32,
) -> Result<Vec<u8>, DecodeError> {
    reverse_reading(old_len, payload, new_len, level, |range| {
        let mut bytes = vec![0u8; (range.end - range.start) as usize];
        old.read_exact_at(&mut bytes, range.start)
            .map_err(DecodeError::Input)?;
        Ok(Cow::Owned(bytes))
    })
}

/// [`reverse`] for an old file of `old_len` bytes whose ranges `read` gives.
fn reverse_reading<'o>(
    old_len: u64,
    payload: &[u8],
    new_len: u64,
    level: i32,
    mut read: impl FnMut(Range<u64>) -> Result<Cow<'o, [u8]>, DecodeError>,
) -> Result<Vec<u8>, DecodeError> {
    // (old start, new position, length) of every forward copy.
    let mut copies: Vec<(u64, u64, u64)> = Vec::new();
    walk(payload, old_len, new_len, |op| {
        if let Op::Copy { start, len, at } = op {
            copies.push((start, at, len));
        }
        Ok(())
    })?;
    copies.sort_unstable();
    let mut body = Body {
        bytes: Vec::new(),
        previous_copy_end: 0,
    };
    let mut pos = 0u64; // how much of `old` the reverse body produces so far
    let mut literal_start = 0u64;
    for (start, at, len) in copies {
        let end = start + len;
        if end <= pos {
            continue;
        }
        // Clip what an earlier copy already produced; short leftovers stay literal.
        let skip = pos.saturating_sub(start);
        let (start, at, len) = (start + skip, at + skip, len - skip);
        if (len as usize) < MIN_MATCH {
            continue;
        }
        body.op(
            &read(literal_start..start)?,
            Some((at as usize, len as usize)),
        );
        pos = start + len;
        literal_start = pos;
    }
    if literal_start < old_len || old_len == 0 {
        body.op(&read(literal_start..old_len)?, None);
    }
    pack(&body.bytes, level).map_err(DecodeError::Output)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::{noise, text};

    #[test]
    fn interleaved_hash_is_the_polynomial() {
        let data = noise(3, 200);
        for len in 0..100 {
            for start in [0, 1, 7] {
                let window = &data[start..start + len];
                let horner = window.iter().fold(0u64, |h, &b| {
                    h.wrapping_mul(BASE).wrapping_add(u64::from(b))
                });
                assert_eq!(hash(window), horner, "{len} bytes");
            }
        }
    }

    /// `bytes` in a file on disk.
    fn on_disk(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().expect("tempfile");
        file.write_all(bytes).expect("write");
        file
    }

    /// The payload of `old -> new`, checked to decode from memory and from disk; its size.
    fn round_trip(old: &[u8], new: &[u8]) -> usize {
        let payload = Blocks.encode(old, new).expect("encode").expect("applies");
        assert_eq!(
            Blocks
                .decode(old, &payload, new.len() as u64)
                .expect("decode"),
            new
        );
        let mut from_disk = Vec::new();
        let file = on_disk(old);
        Blocks
            .decode_file_into(
                file.as_file(),
                old.len() as u64,
                &payload,
                new.len() as u64,
                &mut from_disk,
            )
            .expect("decode from disk");
        assert!(from_disk == new, "decoded from disk, {} B", from_disk.len());
        payload.len()
    }

    /// The reverse of `old -> new`, checked to rebuild `old` from `new` and to be the same
    /// derived from `old` on disk; its size.
    fn reverse_round_trip(old: &[u8], new: &[u8]) -> usize {
        let forward = Blocks.encode(old, new).expect("encode").expect("applies");
        let back = reverse(old, &forward, new.len() as u64, 3).expect("reverse");
        let file = on_disk(old);
        let from_disk = reverse_file(
            file.as_file(),
            old.len() as u64,
            &forward,
            new.len() as u64,
            3,
        );
        assert_eq!(from_disk.expect("reverse from disk"), back);
        assert_eq!(
            Blocks
                .decode(new, &back, old.len() as u64)
                .expect("decode the reverse"),
            old
        );
        back.len()
    }

    #[test]
    fn reverse_payloads_rebuild_the_old_file_from_the_new() {
        let old = noise(21, 300_000);
        let mut new = old.clone();
        for at in [1000, 150_000, 299_000] {
            new[at] ^= 0xff;
        }
        assert!(reverse_round_trip(&old, &new) < 400);
        // Moved and duplicated blocks, inserted and deleted bytes.
        let mut moved = old[100_000..200_000].to_vec();
        moved.extend_from_slice(&old[..100_000]);
        moved.extend_from_slice(&old[50_000..60_000]);
        moved.extend_from_slice(&noise(22, 5000));
        moved.extend_from_slice(&old[250_000..]);
        let size = reverse_round_trip(&old, &moved);
        // The 50,000 bytes of `old` missing from `moved` must come back as literals.
        assert!(
            size > 40_000 && size < 60_000,
            "reverse of a move costs {size}"
        );
        for (a, b) in [
            (&[][..], &old[..1000]),
            (&old[..1000], &[][..]),
            (&[][..], &[][..]),
        ] {
            reverse_round_trip(a, b);
        }
        reverse_round_trip(&noise(23, 5000), &noise(24, 7000));
        // A payload for other files is refused.
        let forward = Blocks.encode(&old, &new).expect("encode").expect("applies");
        assert!(reverse(&old[..1000], &forward, new.len() as u64, 3).is_err());
        assert!(reverse(&old, &forward, new.len() as u64 + 1, 3).is_err());
    }

    #[test]
    fn an_old_file_cut_short_on_disk_is_a_read_error() {
        let old = noise(25, 300_000);
        let mut new = old.clone();
        new[250_000] ^= 1; // past the cut: the reverse reads the byte it changes
        let forward = Blocks.encode(&old, &new).expect("encode").expect("applies");
        // The manifest says 300,000 bytes; the disk holds fewer.
        let file = on_disk(&old[..200_000]);
        let (len, new_len) = (old.len() as u64, new.len() as u64);
        let decoded =
            Blocks.decode_file_into(file.as_file(), len, &forward, new_len, &mut Vec::new());
        assert!(matches!(decoded, Err(DecodeError::Input(_))), "{decoded:?}");
        let reversed = reverse_file(file.as_file(), len, &forward, new_len, 3);
        assert!(
            matches!(reversed, Err(DecodeError::Input(_))),
            "{reversed:?}"
        );
    }

    #[test]
    fn a_few_scattered_changes_cost_a_few_bytes_each() {
        let old = noise(7, 4 << 20);
        let mut new = old.clone();
        for i in 0..60 {
            new[(i * 65_537 + 1000) % old.len()] ^= 0x5a;
        }
        new.splice(2_000_000..2_000_000, *b"inserted run");
        let size = round_trip(&old, &new);
        assert!(
            size < 1_000,
            "60 substitutions and an insertion cost {size} bytes"
        );
    }

    #[test]
    fn bodies_large_against_their_file_are_packed_quickly() {
        let old = text(31, 4 << 20);
        // 100 KB rewritten: a body over 64 KiB but under 1/16 of the file.
        let mut near = old.clone();
        near.splice(1_000_000..1_100_000, text(32, 100_000));
        // Nothing in common: the body is the whole file, under 1 MiB but over 1/16 of it.
        let far = text(33, 300_000);
        let far_small = text(33, 60_000);
        for (new, level) in [(&near, 19), (&far, 3), (&far_small, 19)] {
            let payload = Blocks.encode(&old, new).expect("encode").expect("applies");
            let body = checked_body(&old, new);
            let other = pack(&body, 22 - level).expect("pack");
            assert_eq!(
                payload,
                pack(&body, level).expect("pack"),
                "body of {} B",
                body.len()
            );
            assert_ne!(payload, other, "levels 19 and 3 differ on {} B", body.len());
            let decoded = Blocks.decode(&old, &payload, new.len() as u64);
            assert_eq!(decoded.expect("decode"), *new);
        }
    }

    #[test]
    fn body_levels_at_their_limits() {
        let mib = 1 << 20;
        for (body, new, level) in [
            (SMALL_BODY - 1, 100 * mib, 19),
            (SMALL_BODY - 1, SMALL_BODY, 19),
            (SMALL_BODY, 16 * SMALL_BODY, 19),
            (SMALL_BODY, 16 * SMALL_BODY - 1, 3),
            (mib - 1, 16 * (mib - 1), 19),
            (mib, 100 * mib, 3),
            (2 * mib, 2 * mib, 3),
        ] {
            assert_eq!(body_level(body, new), level, "body {body}, file {new}");
        }
    }

    #[test]
    fn edge_cases_round_trip() {
        for (old, new) in [
            (vec![], vec![]),
            (vec![], b"new".to_vec()),
            (b"old".to_vec(), vec![]),
            (noise(1, 100), noise(1, 100)),
            (noise(1, 10_000), noise(2, 10_000)),
            (noise(3, 31), noise(3, 33)),
        ] {
            round_trip(&old, &new);
        }
    }

    #[test]
    fn hostile_payloads_are_refused() {
        let old = noise(5, 1000);
        let new = noise(5, 1000);
        let good = Blocks.encode(&old, &new).expect("encode").expect("applies");
        for cut in 0..good.len() {
            assert!(
                Blocks.decode(&old, &good[..cut], 1000).is_err(),
                "truncated at {cut}"
            );
        }
        assert!(Blocks.decode(&old, &good, 999).is_err());
        assert!(Blocks.decode(&old, &good, 1001).is_err());
        assert!(
            Blocks.decode(&old[..500], &good, 1000).is_err(),
            "copy beyond a shorter old file"
        );
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(Blocks.decode(&old, &huge, 1000).is_err());
    }
}
