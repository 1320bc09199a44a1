//! The code signature of a Mach-O file, as far as a decoder can rebuild it: the hash of every
//! page of a slice's code, which the signature's code directories hold.
//!
//! Every arm64 Mach-O file is signed, if only by the linker (`ld -adhoc_codesign`); Apple signs
//! its own. A code directory holds one hash per page (4 KiB or 16 KiB) of the slice up to its
//! code limit, so a change anywhere in a page changes 20 to 48 bytes of noise at the end of the
//! file, which no old byte predicts: on Pillow 10.0.0 -> 10.0.1's arm64 libraries they were
//! over half of what prediction left (libpng 629 of 657 bytes, libwebp 3,287 of 5,810). The
//! decoder writes the new file in order and the signature comes after the code it hashes, so
//! by the time it reaches a slot it has every byte of its page: the slot is predicted as that
//! page's hash, and the diff there is zero.
//!
//! The encoder names, in the payload, each code directory of the new file whose every slot is
//! the hash of its page (see [`directories`]); the decoder checks what it is given (see
//! [`take`]) and hashes the pages it writes (see [`Pages`]). Special slots (the hashes of the
//! signature's other blobs) and the CMS signature are left to the diff. zstd-prefix zeroes the
//! slots before compressing and fills them in as it writes (see [`Filling`]).

use std::io::{self, Write};

use sha1::Sha1;
use sha2::{Digest, Sha256, Sha384};

use super::refs::{macho_slices, u32_at, MH_MAGIC_64};
use crate::{corrupt, varint, DecodeError};

const LC_CODE_SIGNATURE: u32 = 0x1d;
const CSMAGIC_EMBEDDED_SIGNATURE: u32 = 0xfade_0cc0;
const CSMAGIC_CODEDIRECTORY: u32 = 0xfade_0c02;
/// Code directories of version 0x20100 and later say where a scatter vector is (0: none);
/// 0x20300 and later hold a 64-bit code limit (0: the 32-bit one holds).
const CS_SUPPORTSSCATTER: u32 = 0x2_0100;
const CS_SUPPORTSCODELIMIT64: u32 = 0x2_0300;
/// Most code directories a payload may name: a universal file of a few slices, each with a
/// SHA-1 and a SHA-256 directory. Each costs the decoder a pass of hashing over its slice.
pub(crate) const MAX_DIRECTORIES: usize = 8;
/// Most blobs read from one signature, and most load commands from one slice.
const MAX_BLOBS: u32 = 64;
const MAX_COMMANDS: u32 = 4096;
/// Page sizes a code directory may have: 512 B to 64 KiB (Apple's are 4 KiB and 16 KiB).
const PAGE_LOGS: std::ops::RangeInclusive<u8> = 9..=16;

/// The hash of a code directory's slots (`CS_HASHTYPE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HashKind {
    Sha1 = 1,
    Sha256 = 2,
    /// SHA-256 cut to its first 20 bytes.
    Sha256Truncated = 3,
    Sha384 = 4,
}

impl HashKind {
    fn of(byte: u8) -> Option<HashKind> {
        Some(match byte {
            1 => HashKind::Sha1,
            2 => HashKind::Sha256,
            3 => HashKind::Sha256Truncated,
            4 => HashKind::Sha384,
            _ => return None,
        })
    }

    /// Bytes of a slot.
    fn size(self) -> u64 {
        match self {
            HashKind::Sha1 | HashKind::Sha256Truncated => 20,
            HashKind::Sha256 => 32,
            HashKind::Sha384 => 48,
        }
    }
}

/// One code directory of the new file: its slot of page `i` holds the hash of bytes
/// `slice + i * page .. slice + min((i + 1) * page, code_limit)` of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Directory {
    /// File offset of the slice whose code it hashes.
    pub slice: u64,
    /// Bytes of the slice its pages cover, from the slice's start (at least 1).
    pub code_limit: u64,
    pub page_log: u8,
    pub hash: HashKind,
    /// File offset of its first code slot, after the code's end; one slot per page follows.
    pub slots_at: u64,
}

impl Directory {
    fn pages(&self) -> u64 {
        self.code_limit.div_ceil(1 << self.page_log)
    }

    /// File offset where the code it hashes ends.
    pub fn code_end(&self) -> u64 {
        self.slice + self.code_limit
    }

    pub fn slots_end(&self) -> u64 {
        self.slots_at + self.pages() * self.hash.size()
    }
}

/// Append `dirs` to a payload header: a count, then for each its slice, code limit, page size
/// (log 2), hash kind, and the distance from the code's end to its slots.
pub(crate) fn put(out: &mut Vec<u8>, dirs: &[Directory]) {
    varint::put(out, dirs.len() as u64);
    for d in dirs {
        varint::put(out, d.slice);
        varint::put(out, d.code_limit);
        out.push(d.page_log);
        out.push(d.hash as u8);
        varint::put(out, d.slots_at - d.code_end());
    }
}

/// The code directories at the front of `input` (see [`put`]), checked against the new file's
/// length: each slot range inside the file and after its code, in order and apart, at most
/// [`MAX_DIRECTORIES`].
pub(crate) fn take(input: &mut &[u8], new_len: u64) -> Result<Vec<Directory>, DecodeError> {
    let count = varint::take(input)?;
    if count == 0 || count > MAX_DIRECTORIES as u64 {
        return Err(corrupt("code directory count out of range"));
    }
    let mut dirs: Vec<Directory> = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let slice = varint::take(input)?;
        let code_limit = varint::take(input)?;
        let (&page_log, rest) = input
            .split_first()
            .ok_or_else(|| corrupt("truncated code directory"))?;
        let (&hash, rest) = rest
            .split_first()
            .ok_or_else(|| corrupt("truncated code directory"))?;
        *input = rest;
        let gap = varint::take(input)?;
        let hash = HashKind::of(hash).ok_or_else(|| corrupt("unknown code directory hash"))?;
        if !PAGE_LOGS.contains(&page_log) {
            return Err(corrupt("code directory page size out of range"));
        }
        let code_end = slice
            .checked_add(code_limit)
            .filter(|&end| code_limit > 0 && end <= new_len)
            .ok_or_else(|| corrupt("code directory's code outside the new file"))?;
        let slots_at = code_end
            .checked_add(gap)
            .filter(|_| gap > 0)
            .ok_or_else(|| corrupt("code directory's slots not after its code"))?;
        let dir = Directory {
            slice,
            code_limit,
            page_log,
            hash,
            slots_at,
        };
        // pages * size <= code_limit * 48 / 512: no overflow below 2^64 / 48 * 512.
        if slots_at > new_len || dir.pages() * hash.size() > new_len - slots_at {
            return Err(corrupt("code directory's slots outside the new file"));
        }
        if dirs.last().is_some_and(|last| last.slots_end() > slots_at) {
            return Err(corrupt("code directories out of order or overlapping"));
        }
        dirs.push(dir);
    }
    Ok(dirs)
}

/// The code directories of `new` (a thin or universal 64-bit Mach-O file) that a decoder can
/// rebuild: whole page hashes, every slot the hash of its page, slots after the code; in file
/// order, apart, at most [`MAX_DIRECTORIES`]. Empty for any other file.
pub(crate) fn directories(new: &[u8]) -> Vec<Directory> {
    let mut found = Vec::new();
    for (slice, len) in macho_slices(new).unwrap_or_default() {
        slice_directories(new, slice, len, &mut found);
    }
    found.sort_by_key(|d| d.slots_at);
    let mut dirs: Vec<Directory> = Vec::new();
    for d in found {
        if dirs.len() < MAX_DIRECTORIES && dirs.last().is_none_or(|l| l.slots_end() <= d.slots_at) {
            dirs.push(d);
        }
    }
    if dirs.is_empty() {
        return dirs;
    }
    let mut pages = Pages::new(dirs);
    pages.feed(new);
    let Pages { dirs, hashers, .. } = pages;
    dirs.into_iter()
        .zip(hashers)
        .filter(|(d, h)| {
            let slots = &new[d.slots_at as usize..d.slots_end() as usize];
            h.digests == slots
        })
        .map(|(d, _)| d)
        .collect()
}

fn u32_be(data: &[u8], at: u64) -> Option<u32> {
    u32_at(data, at).map(u32::swap_bytes)
}

/// Push the code directories of the slice at `slice` (`len` bytes) onto `found`.
fn slice_directories(data: &[u8], slice: u64, len: u64, found: &mut Vec<Directory>) {
    let Some(sig) = signature(data, slice, len) else {
        return;
    };
    let (at, sig_len) = sig;
    let (Some(magic), Some(count)) = (u32_be(data, at), u32_be(data, at + 8)) else {
        return;
    };
    if magic != CSMAGIC_EMBEDDED_SIGNATURE {
        return;
    }
    for k in 0..u64::from(count.min(MAX_BLOBS)) {
        let Some(offset) = u32_be(data, at + 12 + k * 8 + 4) else {
            return;
        };
        let blob = at + u64::from(offset);
        if u64::from(offset) < sig_len && u32_be(data, blob) == Some(CSMAGIC_CODEDIRECTORY) {
            if let Some(d) = directory(data, slice, len, blob) {
                found.push(d);
            }
        }
    }
}

/// The file offset and length of the slice's embedded signature (`LC_CODE_SIGNATURE`).
fn signature(data: &[u8], slice: u64, len: u64) -> Option<(u64, u64)> {
    if u32_at(data, slice)? != MH_MAGIC_64 {
        return None;
    }
    let commands = u32_at(data, slice + 16)?;
    let end = (slice + 32)
        .checked_add(u64::from(u32_at(data, slice + 20)?))?
        .min(slice + len);
    let mut at = slice + 32;
    for _ in 0..commands.min(MAX_COMMANDS) {
        let (cmd, size) = (u32_at(data, at)?, u64::from(u32_at(data, at + 4)?));
        if size < 8 || at + size > end {
            return None;
        }
        if cmd == LC_CODE_SIGNATURE && size >= 16 {
            let (off, sig_len) = (
                u64::from(u32_at(data, at + 8)?),
                u64::from(u32_at(data, at + 12)?),
            );
            return (off + sig_len <= len).then_some((slice + off, sig_len));
        }
        at += size;
    }
    None
}

/// The code directory at `blob` of the slice at `slice` (`len` bytes), if it is one a decoder
/// can rebuild (before checking its slots).
fn directory(data: &[u8], slice: u64, len: u64, blob: u64) -> Option<Directory> {
    let version = u32_be(data, blob + 8)?;
    let hash_offset = u64::from(u32_be(data, blob + 16)?);
    let code_slots = u64::from(u32_be(data, blob + 28)?);
    let code_limit = u64::from(u32_be(data, blob + 32)?);
    let bytes = data.get(usize::try_from(blob + 36).ok()?..usize::try_from(blob + 40).ok()?)?;
    let (hash_size, hash, page_log) = (u64::from(bytes[0]), bytes[1], bytes[3]);
    if version >= CS_SUPPORTSSCATTER && u32_be(data, blob + 44)? != 0 {
        return None;
    }
    if version >= CS_SUPPORTSCODELIMIT64
        && (u32_be(data, blob + 56)?, u32_be(data, blob + 60)?) != (0, 0)
    {
        return None;
    }
    let hash = HashKind::of(hash).filter(|h| h.size() == hash_size)?;
    let dir = Directory {
        slice,
        code_limit,
        page_log,
        hash,
        slots_at: blob + hash_offset,
    };
    let fits = PAGE_LOGS.contains(&page_log)
        && code_limit > 0
        && code_limit <= len
        && dir.pages() == code_slots
        && dir.slots_at > dir.code_end()
        && dir.slots_end() <= slice + len;
    fits.then_some(dir)
}

/// One hash in progress.
#[derive(Clone)]
enum Hasher {
    Sha1(Sha1),
    Sha256(Sha256),
    Sha384(Sha384),
}

impl Hasher {
    fn new(kind: HashKind) -> Hasher {
        match kind {
            HashKind::Sha1 => Hasher::Sha1(Sha1::new()),
            HashKind::Sha256 | HashKind::Sha256Truncated => Hasher::Sha256(Sha256::new()),
            HashKind::Sha384 => Hasher::Sha384(Sha384::new()),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha1(h) => h.update(bytes),
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Sha384(h) => h.update(bytes),
        }
    }

    /// Append the first `size` bytes of the hash to `out`, and start over.
    fn finish_into(&mut self, size: usize, out: &mut Vec<u8>) {
        match self {
            Hasher::Sha1(h) => out.extend_from_slice(&h.finalize_reset()[..size]),
            Hasher::Sha256(h) => out.extend_from_slice(&h.finalize_reset()[..size]),
            Hasher::Sha384(h) => out.extend_from_slice(&h.finalize_reset()[..size]),
        }
    }
}

/// The page hashes of one directory so far.
struct PageHashes {
    hasher: Hasher,
    /// The slots of the pages hashed, in order.
    digests: Vec<u8>,
}

/// The new file's page hashes, computed from its bytes fed in order: what the slots of its
/// code directories are predicted to be.
pub(crate) struct Pages {
    dirs: Vec<Directory>,
    hashers: Vec<PageHashes>,
    /// Bytes of the new file fed so far.
    fed: u64,
    /// Where the last directory's code ends: bytes after it need no hashing.
    last_code_end: u64,
}

impl Pages {
    pub fn new(dirs: Vec<Directory>) -> Pages {
        let hashers = dirs
            .iter()
            .map(|d| PageHashes {
                hasher: Hasher::new(d.hash),
                digests: Vec::with_capacity((d.pages() * d.hash.size()) as usize),
            })
            .collect();
        let last_code_end = dirs.iter().map(Directory::code_end).max().unwrap_or(0);
        Pages {
            dirs,
            hashers,
            fed: 0,
            last_code_end,
        }
    }

    pub fn directories(&self) -> &[Directory] {
        &self.dirs
    }

    /// Take the next bytes of the new file.
    pub fn feed(&mut self, bytes: &[u8]) {
        let from = self.fed;
        self.fed += bytes.len() as u64;
        if from >= self.last_code_end {
            return;
        }
        for (d, h) in self.dirs.iter().zip(&mut self.hashers) {
            let (start, end) = (from.max(d.slice), self.fed.min(d.code_end()));
            let page = 1u64 << d.page_log;
            let mut at = start;
            while at < end {
                // The end of the page holding `at`, or of the code.
                let page_end = (d.slice + ((at - d.slice) / page + 1) * page).min(d.code_end());
                let stop = page_end.min(end);
                h.hasher
                    .update(&bytes[(at - from) as usize..(stop - from) as usize]);
                if stop == page_end {
                    h.hasher.finish_into(d.hash.size() as usize, &mut h.digests);
                }
                at = stop;
            }
        }
    }

    /// Bytes of the new file fed so far.
    pub fn fed(&self) -> u64 {
        self.fed
    }

    /// Whether bytes `at..at + len` of the new file hold a slot.
    pub fn holds_slots(&self, at: u64, len: u64) -> bool {
        self.dirs
            .iter()
            .any(|d| d.slots_at < at + len && at < d.slots_end())
    }

    /// The first slot range in bytes `at..at + len` of the new file, cut to them.
    pub fn first_slots(&self, at: u64, len: u64) -> Option<(u64, u64)> {
        self.dirs
            .iter()
            .map(|d| (d.slots_at.max(at), d.slots_end().min(at + len)))
            .find(|(from, to)| from < to)
    }

    /// `len`, or less so that bytes `at..at + len` do not run over a directory's code end:
    /// the bytes after it (its slots among them) are predicted only once it is all written.
    pub fn cut(&self, at: u64, len: u64) -> u64 {
        self.dirs
            .iter()
            .map(Directory::code_end)
            .filter(|&end| at < end && end < at + len)
            .fold(len, |len, end| len.min(end - at))
    }

    /// Write the hashes of the slots that bytes `at..at + bytes.len()` of the new file hold
    /// over those bytes, for the directories whose code was all fed.
    pub fn fill(&self, at: u64, bytes: &mut [u8]) {
        let end = at + bytes.len() as u64;
        for (d, h) in self.dirs.iter().zip(&self.hashers) {
            if d.code_end() > self.fed {
                continue;
            }
            let (from, to) = (at.max(d.slots_at), end.min(d.slots_end()));
            if from < to {
                let src = &h.digests[(from - d.slots_at) as usize..(to - d.slots_at) as usize];
                bytes[(from - at) as usize..(to - at) as usize].copy_from_slice(src);
            }
        }
    }
}

/// Writes the new file to `out` with the slots of its code directories filled in as the hashes
/// of its pages, which come before them: what zstd-prefix decodes has them zeroed.
pub(crate) struct Filling<'a> {
    pages: Pages,
    out: &'a mut dyn Write,
    /// A piece holding slots, filled in.
    piece: Vec<u8>,
}

impl<'a> Filling<'a> {
    pub fn new(dirs: Vec<Directory>, out: &'a mut dyn Write) -> Filling<'a> {
        Filling {
            pages: Pages::new(dirs),
            out,
            piece: Vec::new(),
        }
    }
}

impl Write for Filling<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let mut rest = bytes;
        while !rest.is_empty() {
            // A piece never runs over a code end: one that holds slots starts after their code.
            let at = self.pages.fed();
            let len = self.pages.cut(at, rest.len() as u64) as usize;
            let (piece, tail) = rest.split_at(len);
            if self.pages.holds_slots(at, len as u64) {
                self.piece.clear();
                self.piece.extend_from_slice(piece);
                self.pages.fill(at, &mut self.piece);
                self.pages.feed(&self.piece);
                self.out.write_all(&self.piece)?;
            } else {
                self.pages.feed(piece);
                self.out.write_all(piece)?;
            }
            rest = tail;
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A thin arm64 Mach-O file of `code` bytes (from offset 0, header included) signed as
    /// `ld -adhoc_codesign` signs: a superblob with one code directory, `kind` hashes of pages
    /// of `1 << page_log` bytes, its slots after an identifier.
    pub(crate) fn signed(code: &[u8], page_log: u8, kinds: &[HashKind]) -> Vec<u8> {
        let mut file = code.to_vec();
        let header_len = 32 + 16;
        assert!(file.len() >= header_len);
        let sig_at = file.len() as u32;
        let put32 =
            |f: &mut Vec<u8>, at: usize, v: u32| f[at..at + 4].copy_from_slice(&v.to_le_bytes());
        put32(&mut file, 0, MH_MAGIC_64);
        put32(&mut file, 4, 0x0100_000c);
        put32(&mut file, 16, 1);
        put32(&mut file, 20, 16);
        put32(&mut file, 32, LC_CODE_SIGNATURE);
        put32(&mut file, 36, 16);
        put32(&mut file, 40, sig_at);
        let code_limit = file.len() as u64;
        let pages = code_limit.div_ceil(1 << page_log);
        let ident = b"lib.dylib\0";
        // The signature's size is in the header, which the pages hash.
        let total: u64 = 12
            + kinds
                .iter()
                .map(|k| 8 + 88 + ident.len() as u64 + pages * k.size())
                .sum::<u64>();
        put32(&mut file, 44, total as u32);
        let mut blobs: Vec<Vec<u8>> = Vec::new();
        for &kind in kinds {
            let hash_offset = 88 + ident.len() as u32;
            let mut cd = Vec::new();
            for v in [
                CSMAGIC_CODEDIRECTORY,
                0,
                0x2_0400,
                2,
                hash_offset,
                88,
                0,
                pages as u32,
            ] {
                cd.extend_from_slice(&v.to_be_bytes());
            }
            cd.extend_from_slice(&(code_limit as u32).to_be_bytes());
            cd.extend_from_slice(&[kind.size() as u8, kind as u8, 0, page_log]);
            cd.resize(88, 0);
            cd.extend_from_slice(ident);
            let mut pages_of = Pages::new(vec![Directory {
                slice: 0,
                code_limit,
                page_log,
                hash: kind,
                slots_at: u64::MAX / 2,
            }]);
            pages_of.feed(&file[..code_limit as usize]);
            cd.extend_from_slice(&pages_of.hashers[0].digests);
            let len = cd.len() as u32;
            cd[4..8].copy_from_slice(&len.to_be_bytes());
            blobs.push(cd);
        }
        let mut sig = Vec::new();
        let index_len = 12 + 8 * blobs.len();
        let mut offset = index_len;
        for v in [CSMAGIC_EMBEDDED_SIGNATURE, 0, blobs.len() as u32] {
            sig.extend_from_slice(&v.to_be_bytes());
        }
        for (k, blob) in blobs.iter().enumerate() {
            let slot = if k == 0 { 0 } else { 0x1000 + k as u32 - 1 };
            sig.extend_from_slice(&slot.to_be_bytes());
            sig.extend_from_slice(&(offset as u32).to_be_bytes());
            offset += blob.len();
        }
        for blob in &blobs {
            sig.extend_from_slice(blob);
        }
        assert_eq!(sig.len() as u64, total);
        sig[4..8].copy_from_slice(&(total as u32).to_be_bytes());
        file.extend_from_slice(&sig);
        file
    }

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        crate::test_data::noise(seed, len)
    }

    /// A signed arm64 Mach-O pair (see [`signed`]): `len` bytes of code, with one byte changed
    /// in every third page of the new file, which has a SHA-1 and a SHA-256 code directory
    /// where the old one had a SHA-256 one.
    pub(crate) fn signed_pair(len: usize) -> (Vec<u8>, Vec<u8>) {
        let code = noise(len, 31);
        let mut changed = code.clone();
        for page in (1..len / 4096).step_by(3) {
            changed[page * 4096 + 100] ^= 0x5a;
        }
        (
            signed(&code, 12, &[HashKind::Sha256]),
            signed(&changed, 12, &[HashKind::Sha1, HashKind::Sha256]),
        )
    }

    #[test]
    fn finds_every_kind_of_directory_whose_slots_hold() {
        let code = noise(10_000, 1);
        let kinds = [
            HashKind::Sha1,
            HashKind::Sha256,
            HashKind::Sha256Truncated,
            HashKind::Sha384,
        ];
        let file = signed(&code, 12, &kinds);
        let dirs = directories(&file);
        assert_eq!(dirs.len(), 4);
        for (d, kind) in dirs.iter().zip(kinds) {
            assert_eq!(
                (d.hash, d.page_log, d.code_limit, d.slice),
                (kind, 12, 10_000, 0)
            );
            assert_eq!(d.pages(), 3);
        }
        // A slot that is not its page's hash drops its directory, and only that one.
        let mut stale = file.clone();
        let at = dirs[1].slots_at as usize + 40;
        stale[at] ^= 1;
        let left = directories(&stale);
        assert_eq!(left.len(), 3);
        assert!(left.iter().all(|d| d.hash != HashKind::Sha256));
        // Other files have none.
        assert!(directories(&code).is_empty());
        assert!(directories(&file[..file.len() - 1]).is_empty());
    }

    #[test]
    fn pages_fed_in_any_pieces_fill_the_slots() {
        let file = signed(&noise(70_000, 2), 12, &[HashKind::Sha256, HashKind::Sha1]);
        let dirs = directories(&file);
        assert_eq!(dirs.len(), 2);
        for piece in [1, 7, 4096, 5000, file.len()] {
            let mut pages = Pages::new(dirs.clone());
            let mut out = vec![0u8; file.len()];
            let mut at = 0;
            while at < file.len() {
                let mut len = piece.min(file.len() - at) as u64;
                len = pages.cut(at as u64, len);
                let chunk = &mut out[at..at + len as usize];
                if pages.holds_slots(at as u64, len) {
                    assert_eq!(pages.fed(), at as u64);
                    pages.fill(at as u64, chunk);
                }
                // Bytes that are not slots come from the file itself.
                for (k, b) in chunk.iter_mut().enumerate() {
                    let p = (at + k) as u64;
                    if !dirs.iter().any(|d| d.slots_at <= p && p < d.slots_end()) {
                        *b = file[at + k];
                    }
                }
                pages.feed(chunk);
                at += len as usize;
            }
            assert!(out == file, "pieces of {piece}");
        }
    }

    #[test]
    fn the_table_round_trips_and_hostile_tables_are_refused() {
        let dirs = directories(&signed(
            &noise(9_000, 3),
            12,
            &[HashKind::Sha1, HashKind::Sha256],
        ));
        let len = 20_000;
        let mut table = Vec::new();
        put(&mut table, &dirs);
        let mut input = &table[..];
        assert_eq!(take(&mut input, len).expect("the table reads back"), dirs);
        assert!(input.is_empty());
        for cut in 0..table.len() {
            assert!(take(&mut &table[..cut], len).is_err(), "cut at {cut}");
        }
        let one = |slice: u64, code_limit: u64, page_log: u8, hash: u8, gap: u64| {
            let mut t = vec![1];
            for v in [slice, code_limit] {
                varint::put(&mut t, v);
            }
            t.extend_from_slice(&[page_log, hash]);
            varint::put(&mut t, gap);
            t
        };
        assert!(take(&mut &one(0, 4096, 12, 2, 1)[..], 5000).is_ok());
        for bad in [
            one(0, 4096, 12, 2, 0),         // slots inside the code
            one(0, 4096, 12, 5, 1),         // unknown hash
            one(0, 4096, 8, 2, 1),          // page too small
            one(0, 4096, 17, 2, 1),         // page too large
            one(0, 0, 12, 2, 1),            // no code
            one(0, 4096, 12, 2, 900),       // slots past the end
            one(u64::MAX, 2, 12, 2, 1),     // overflow
            one(0, u64::MAX - 1, 12, 2, 1), // code past the end
            vec![0],                        // no directory
            vec![9],                        // too many
        ] {
            assert!(take(&mut &bad[..], 5000).is_err(), "{bad:?}");
        }
        // Overlapping slots.
        let mut two = vec![2];
        for _ in 0..2 {
            two.extend_from_slice(&one(0, 4096, 12, 2, 1)[1..]);
        }
        assert!(take(&mut &two[..], 5000).is_err());
    }
}
