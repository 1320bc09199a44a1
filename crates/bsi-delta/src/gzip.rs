//! gzip-aware delta. A small change to a compressed file (a changelog gains an entry) changes
//! its compressed bytes from that point to the end, so every byte-level delta of two gzip files
//! is about as large as the new file. When the new file's deflate stream is exactly what GNU
//! gzip writes for its content (see `deflate`; `gzip -9n` is how Debian compresses changelogs
//! and manual pages), the payload is instead a delta of the two decompressed contents, and the
//! decoder compresses the rebuilt content again.
//!
//! Compressing the new content again is what decoding costs most: GNU gzip -9 runs at about
//! 12 MB/s. Where pieces of the new content are the old one's (a changelog's older entries),
//! format 2 names them, and the decoder takes the old stream's matches over them instead of
//! searching (see [`deflate::deflate_replaying`]); the encoder keeps the pieces only when that
//! gives the new file's exact stream.
//!
//! Payload, formats 1 and 2:
//!
//! ```text
//! "GZD" 0x01 or 0x02        magic and version
//! u8 level                  gzip level that reproduces the new file's stream (4 to 9)
//! varint header_len, bytes  the new file's gzip header, verbatim
//! varint old_raw_len        decompressed length of the old file (its first member)
//! varint new_raw_len        decompressed length of the new file
//! format 2 only:
//!   varint count            pieces of the new content that are the old one's, then for each
//!   varint gap              new offset less the previous piece's end
//!   varint zigzag(shift)    old offset less the new one
//!   varint len
//! u8 name_len, name         inner encoder: a delta encoder's name other than "gzip", or "zstd"
//! ...                       the inner payload, old content -> new content
//! ```
//!
//! The new file is the header, the stream, the CRC-32 and the length of the content. Both
//! decompressed lengths are at most [`MAX_RAW`]; the old file is inflated no further than its
//! declared length, and the rebuilt file must have exactly the length the manifest names.
//! Format 2 decoding holds the old stream's tokens too, at most [`MAX_TOKENS`].

use std::io::{self, Read, Write};

use crate::{corrupt, varint, DecodeError, DeltaEncoder, Encoded, PLAIN};

mod deflate;
mod inflate;

const MAGIC: &[u8; 4] = b"GZD\x01";
const MAGIC_2: &[u8; 4] = b"GZD\x02";
/// Most tokens a format 2 payload's old stream may have (8 bytes each: 16 MiB).
const MAX_TOKENS: usize = 2 << 20;
/// Most pieces a format 2 payload may name.
const MAX_PIECES: u64 = 1 << 16;
/// Shortest piece worth naming: a token is replayed from 32 KiB into its piece on (see
/// `deflate`).
const MIN_PIECE: usize = 48 << 10;
/// Largest decompressed content either file may have: the decoder holds both in memory.
pub const MAX_RAW: u64 = 16 << 20;
/// A gzip header: magic, method 8 (deflate), flags, time, extra flags, system.
const HEADER_MIN: usize = 10;
const TRAILER: usize = 8;
/// gzip header flags (RFC 1952, 2.3.1).
const FHCRC: u8 = 2;
const FEXTRA: u8 = 4;
const FNAME: u8 = 8;
const FCOMMENT: u8 = 16;

/// The gzip-aware encoder, see the module documentation.
#[derive(Debug, Clone, Copy)]
pub struct Gzip;

impl DeltaEncoder for Gzip {
    fn name(&self) -> &'static str {
        "gzip"
    }

    fn max_new_len(&self) -> usize {
        MAX_RAW as usize
    }

    /// Debian's changelogs gain entries at the top: libssl3's changelog.gz (251 KB) costs
    /// 3,770 B here, 244,765 B with blocks and 246,162 B with bsdiff, which took 36 ms more.
    fn settles(&self) -> bool {
        true
    }

    fn encode(&self, old: &[u8], new: &[u8]) -> io::Result<Option<Vec<u8>>> {
        let (Some(old_member), Some(new_member)) = (Member::parse(old), Member::parse(new)) else {
            return Ok(None);
        };
        let pieces = same_pieces(&old_member.raw, &new_member.raw);
        let tokens = match pieces.is_empty() {
            true => None,
            false => old_tokens(old, &old_member.raw),
        };
        let replay = tokens.as_deref().map(|tokens| deflate::Replay {
            pieces: &pieces,
            tokens,
        });
        let (level, pieces) = match replay.and_then(|r| new_member.reproducing_level(Some(r))) {
            Some(level) => (level, &pieces[..]),
            None => match new_member.reproducing_level(None) {
                Some(level) => (level, &[][..]),
                None => return Ok(None),
            },
        };
        let inner = crate::encode_best_with(
            crate::delta_encoders()
                .iter()
                .copied()
                .filter(|e| e.name() != self.name()),
            Some(&old_member.raw),
            &new_member.raw,
            crate::HOLD_IN_MEMORY,
        )?;
        let header = &new[..new_member.header_len];
        let mut out = Vec::with_capacity(inner.payload.len() + header.len() + 32);
        out.extend_from_slice(match pieces.is_empty() {
            true => MAGIC,
            false => MAGIC_2,
        });
        out.push(level);
        varint::put(&mut out, header.len() as u64);
        out.extend_from_slice(header);
        varint::put(&mut out, old_member.raw.len() as u64);
        varint::put(&mut out, new_member.raw.len() as u64);
        if !pieces.is_empty() {
            put_pieces(&mut out, pieces);
        }
        let name = inner_name(&inner);
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&inner.payload);
        Ok(Some(out))
    }

    fn decode_into(
        &self,
        old: &[u8],
        payload: &[u8],
        new_len: u64,
        out: &mut dyn Write,
    ) -> Result<(), DecodeError> {
        let (mut input, replaying) =
            match (payload.strip_prefix(MAGIC), payload.strip_prefix(MAGIC_2)) {
                (Some(input), _) => (input, false),
                (_, Some(input)) => (input, true),
                _ => return Err(corrupt("not a gzip payload")),
            };
        let level = take(&mut input, 1)?[0];
        let header_len = varint::take(&mut input)?;
        if header_len > new_len || header_len < HEADER_MIN as u64 {
            return Err(corrupt("gzip header length out of range"));
        }
        let header = take(&mut input, header_len as usize)?;
        let old_raw_len = varint::take(&mut input)?;
        let new_raw_len = varint::take(&mut input)?;
        if old_raw_len > MAX_RAW || new_raw_len > MAX_RAW {
            return Err(corrupt("decompressed length beyond the limit"));
        }
        let pieces = match replaying {
            true => take_pieces(&mut input, old_raw_len, new_raw_len)?,
            false => Vec::new(),
        };
        let name_len = take(&mut input, 1)?[0];
        let name = std::str::from_utf8(take(&mut input, usize::from(name_len))?)
            .map_err(|_| corrupt("inner encoder name is not UTF-8"))?;

        let not_declared = || corrupt("old file is not gzip of the declared length");
        let (old_raw, tokens) = match replaying {
            true => {
                let start = self::header_len(old).ok_or_else(not_declared)?;
                let (raw, tokens, _) =
                    inflate::inflate_tokens_at_most(&old[start..], old_raw_len, MAX_TOKENS)
                        .ok_or_else(|| {
                            corrupt(
                                "old file is not gzip of the declared length with tokens to replay",
                            )
                        })?;
                if raw.len() as u64 != old_raw_len {
                    return Err(not_declared());
                }
                (raw, Some(tokens))
            }
            false => (
                Member::content(old, old_raw_len).ok_or_else(not_declared)?,
                None,
            ),
        };
        let new_raw = if name == PLAIN {
            crate::decompress(input, new_raw_len)?
        } else if name == self.name() {
            return Err(corrupt("gzip payload nested in a gzip payload"));
        } else {
            crate::delta_encoder(name)?.decode(&old_raw, input, new_raw_len)?
        };
        let replay = tokens.as_deref().map(|tokens| deflate::Replay {
            pieces: &pieces,
            tokens,
        });
        let stream = deflate::deflate_replaying(&new_raw, level, replay)
            .ok_or_else(|| corrupt("unsupported gzip level, or pieces that do not fit"))?;
        let total = (header.len() + stream.len() + TRAILER) as u64;
        if total != new_len {
            return Err(DecodeError::WrongLength {
                expected: new_len,
                actual: total,
            });
        }
        let mut crc = flate2::Crc::new();
        crc.update(&new_raw);
        for part in [
            header,
            &stream,
            &crc.sum().to_le_bytes(),
            &(new_raw.len() as u32).to_le_bytes(),
        ] {
            out.write_all(part).map_err(DecodeError::Output)?;
        }
        Ok(())
    }
}

fn inner_name(inner: &Encoded) -> &'static str {
    inner.encoder.unwrap_or(PLAIN)
}

/// Split `len` bytes off the front of `input`.
fn take<'a>(input: &mut &'a [u8], len: usize) -> Result<&'a [u8], DecodeError> {
    let (head, rest) = input
        .split_at_checked(len)
        .ok_or_else(|| corrupt("truncated gzip payload"))?;
    *input = rest;
    Ok(head)
}

/// A single-member gzip file: its header, its decompressed content, and whether the rest of
/// the file is exactly its stream and trailer.
struct Member<'a> {
    file: &'a [u8],
    header_len: usize,
    raw: Vec<u8>,
    /// Length of the deflate stream, when a trailer that matches the content ends the file.
    stream_len: Option<usize>,
}

impl<'a> Member<'a> {
    /// Parse and inflate `file` (content of at most [`MAX_RAW`] bytes); `None` when it is not
    /// gzip or its content is larger.
    fn parse(file: &'a [u8]) -> Option<Member<'a>> {
        let header_len = header_len(file)?;
        let (raw, rest) = inflate(&file[header_len..], MAX_RAW)?;
        let stream_len = file.len() - header_len - rest.len();
        let trailer_ok = rest.len() == TRAILER && {
            let mut crc = flate2::Crc::new();
            crc.update(&raw);
            rest[..4] == crc.sum().to_le_bytes() && rest[4..] == (raw.len() as u32).to_le_bytes()
        };
        Some(Member {
            file,
            header_len,
            raw,
            stream_len: trailer_ok.then_some(stream_len),
        })
    }

    /// The decompressed content of `file`'s first member, which must be exactly `len` bytes.
    fn content(file: &[u8], len: u64) -> Option<Vec<u8>> {
        let (raw, _) = inflate(&file[header_len(file)?..], len)?;
        (raw.len() as u64 == len).then_some(raw)
    }

    /// The gzip level whose stream is exactly this file's, trying the one its extra-flags byte
    /// names first (2: level 9; 0: levels 2 to 8, 6 being gzip's default), replaying the old
    /// stream's matches over `replay`'s pieces where given.
    fn reproducing_level(&self, replay: Option<deflate::Replay<'_>>) -> Option<u8> {
        let stream_len = self.stream_len?;
        let stream = &self.file[self.header_len..self.header_len + stream_len];
        let candidates: &[u8] = match self.file[8] {
            2 => &[9],
            0 => &[6, 8, 7, 5, 4],
            _ => &[],
        };
        candidates.iter().copied().find(|&level| {
            deflate::deflate_replaying(&self.raw, level, replay).as_deref() == Some(stream)
        })
    }
}

/// The tokens of `file`'s deflate stream, whose content is `raw`, where they are few enough to
/// replay (see [`MAX_TOKENS`]). The content the tokens give must be `raw` itself: the inner
/// delta is made from `raw`, and format 2 decoding rebuilds the old content from the tokens.
fn old_tokens(file: &[u8], raw: &[u8]) -> Option<Vec<inflate::Token>> {
    let stream = file.get(header_len(file)?..)?;
    let (rebuilt, tokens, _) =
        inflate::inflate_tokens_at_most(stream, raw.len() as u64, MAX_TOKENS)?;
    (rebuilt == raw).then_some(tokens)
}

/// The pieces of `new` that are pieces of `old`, at least [`MIN_PIECE`] long, in order and
/// apart. Found from anchors every 16 KiB of `new`: the 64 bytes at each of the 64 offsets
/// after an anchor are looked up among `old`'s 64-byte blocks at multiples of 64, and a hit is
/// extended both ways as far as the bytes agree.
fn same_pieces(old: &[u8], new: &[u8]) -> Vec<deflate::Piece> {
    const BLOCK: usize = 64;
    const ANCHORS: usize = 16 << 10;
    let mut pieces = Vec::new();
    if old.len() < MIN_PIECE || new.len() < MIN_PIECE {
        return pieces;
    }
    let mut blocks: std::collections::HashMap<&[u8], usize> = std::collections::HashMap::new();
    for (k, block) in old.chunks_exact(BLOCK).enumerate() {
        blocks.entry(block).or_insert(k * BLOCK);
    }
    let mut end = 0usize;
    let mut anchor = 0usize;
    while anchor + 2 * BLOCK <= new.len() {
        let found = (anchor..anchor + BLOCK).find_map(|at| {
            let &from = blocks.get(&new[at..at + BLOCK])?;
            Some((at, from))
        });
        if let Some((mut at, mut from)) = found {
            while at > end && from > 0 && new[at - 1] == old[from - 1] {
                at -= 1;
                from -= 1;
            }
            let len = crate::blocks::common_prefix(&new[at..], &old[from..]);
            if len >= MIN_PIECE {
                pieces.push(deflate::Piece {
                    new_from: at as u64,
                    old_from: from as u64,
                    len: len as u64,
                });
                end = at + len;
            }
            anchor = (anchor + ANCHORS).max(end);
        } else {
            anchor += ANCHORS;
        }
    }
    pieces
}

fn put_pieces(out: &mut Vec<u8>, pieces: &[deflate::Piece]) {
    varint::put(out, pieces.len() as u64);
    let mut end = 0u64;
    for piece in pieces {
        varint::put(out, piece.new_from - end);
        varint::put(
            out,
            varint::zigzag(piece.old_from as i64 - piece.new_from as i64),
        );
        varint::put(out, piece.len);
        end = piece.new_from + piece.len;
    }
}

/// The pieces of a format 2 payload, checked to lie in order inside both contents.
fn take_pieces(
    input: &mut &[u8],
    old_len: u64,
    new_len: u64,
) -> Result<Vec<deflate::Piece>, DecodeError> {
    let count = varint::take(input)?;
    if count > MAX_PIECES {
        return Err(corrupt("too many pieces"));
    }
    let outside = || corrupt("a piece lies outside the contents");
    let mut pieces = Vec::with_capacity(count as usize);
    let mut end = 0u64;
    for _ in 0..count {
        let new_from = end.checked_add(varint::take(input)?).ok_or_else(outside)?;
        let shift = varint::unzigzag(varint::take(input)?);
        let len = varint::take(input)?;
        let old_from = i64::try_from(new_from)
            .ok()
            .and_then(|n| n.checked_add(shift))
            .and_then(|o| u64::try_from(o).ok())
            .ok_or_else(outside)?;
        end = new_from.checked_add(len).ok_or_else(outside)?;
        if end > new_len || old_from.checked_add(len).is_none_or(|e| e > old_len) {
            return Err(outside());
        }
        pieces.push(deflate::Piece {
            new_from,
            old_from,
            len,
        });
    }
    Ok(pieces)
}

/// Length of the gzip header at the start of `file` (RFC 1952), if it is a deflate member.
fn header_len(file: &[u8]) -> Option<usize> {
    if file.len() < HEADER_MIN + TRAILER || file[..3] != [0x1f, 0x8b, 8] {
        return None;
    }
    let flags = file[3];
    let mut at = HEADER_MIN;
    if flags & FEXTRA != 0 {
        let xlen = u16::from_le_bytes([*file.get(at)?, *file.get(at + 1)?]);
        at += 2 + usize::from(xlen);
    }
    for flag in [FNAME, FCOMMENT] {
        if flags & flag != 0 {
            at += file.get(at..)?.iter().position(|&b| b == 0)? + 1;
        }
    }
    if flags & FHCRC != 0 {
        at += 2;
    }
    (at <= file.len()).then_some(at)
}

/// Inflate the deflate stream at the start of `input`, producing at most `limit` bytes; returns
/// the content and what follows the stream. `None` when the stream is invalid or longer.
fn inflate(input: &[u8], limit: u64) -> Option<(Vec<u8>, &[u8])> {
    // A byte slice is a `BufRead` that the decoder advances past exactly the stream's bytes.
    let mut rest = input;
    let mut raw = Vec::new();
    flate2::bufread::DeflateDecoder::new(&mut rest)
        .take(limit.saturating_add(1))
        .read_to_end(&mut raw)
        .ok()?;
    (raw.len() as u64 <= limit).then_some((raw, rest))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// What `gzip -9n` writes: header without name or time, level-9 stream, trailer.
    pub(crate) fn gzip9(raw: &[u8]) -> Vec<u8> {
        let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 2, 3];
        out.extend(deflate::deflate(raw, 9).expect("level 9"));
        let mut crc = flate2::Crc::new();
        crc.update(raw);
        out.extend(crc.sum().to_le_bytes());
        out.extend((raw.len() as u32).to_le_bytes());
        out
    }

    fn changelog(entries: u32) -> Vec<u8> {
        (0..entries)
            .rev()
            .flat_map(|i| {
                format!(
                    "pkg (1.{i}) stable; urgency=medium\n\n  * Fix CVE-2026-{:04}: bounds check in parser {i}.\n\n -- Maintainer <m@example.org>  Mon, {i} Nov 2026\n\n",
                    i * 37 % 9999
                )
                .into_bytes()
            })
            .collect()
    }

    #[test]
    fn a_grown_changelog_costs_its_new_entries() {
        let (old_raw, new_raw) = (changelog(3000), changelog(3004));
        let (old, new) = (gzip9(&old_raw), gzip9(&new_raw));
        let payload = Gzip.encode(&old, &new).expect("encode").expect("applies");
        assert!(
            payload.len() < 400,
            "payload {} bytes for a {}-byte file",
            payload.len(),
            new.len()
        );
        let decoded = Gzip
            .decode(&old, &payload, new.len() as u64)
            .expect("decode");
        assert_eq!(decoded, new);
        assert!(matches!(
            Gzip.decode(&old, &payload, new.len() as u64 + 1),
            Err(DecodeError::WrongLength { .. })
        ));
    }

    /// A changelog long enough to have pieces worth replaying: the payload names them, and
    /// decoding replays the old stream's matches to the new file's exact bytes. An old file
    /// compressed by another deflate (zlib's, through flate2) has other matches: the payload
    /// then names no pieces, and still decodes.
    #[test]
    fn a_long_changelog_replays_the_old_streams_matches() {
        let (old_raw, new_raw) = (changelog(3000), changelog(3010));
        assert!(old_raw.len() > 4 * MIN_PIECE);
        let new = gzip9(&new_raw);
        let mut zlib_old = gzip9(&old_raw)[..HEADER_MIN].to_vec();
        let mut encoder =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        encoder.write_all(&old_raw).expect("write");
        zlib_old.extend(encoder.finish().expect("finish"));
        zlib_old.extend(&gzip9(&old_raw)[gzip9(&old_raw).len() - TRAILER..]);
        for (old, magic) in [(gzip9(&old_raw), MAGIC_2), (zlib_old, MAGIC)] {
            let payload = Gzip.encode(&old, &new).expect("encode").expect("applies");
            assert_eq!(&payload[..4], magic);
            let decoded = Gzip
                .decode(&old, &payload, new.len() as u64)
                .expect("decode");
            assert!(decoded == new);
        }
        let pieces = same_pieces(&old_raw, &new_raw);
        assert_eq!(pieces.len(), 1, "{pieces:?}");
        let shift = new_raw.len() - old_raw.len();
        assert_eq!(
            (pieces[0].new_from, pieces[0].old_from),
            (shift as u64, 0),
            "the old entries follow the new ones"
        );
    }

    /// Format 2 payloads cut anywhere, or naming pieces outside either content, are refused.
    #[test]
    fn pieces_outside_the_contents_are_refused() {
        let (old_raw, new_raw) = (changelog(3000), changelog(3010));
        let (old, new) = (gzip9(&old_raw), gzip9(&new_raw));
        let payload = Gzip.encode(&old, &new).expect("encode").expect("applies");
        assert_eq!(&payload[..4], MAGIC_2);
        for cut in 0..payload.len() {
            assert!(Gzip
                .decode(&old, &payload[..cut], new.len() as u64)
                .is_err());
        }
        let mut head = payload[..4 + 1].to_vec();
        let mut rest = &payload[5..];
        let header = varint::take(&mut rest).expect("header length");
        varint::put(&mut head, header);
        head.extend_from_slice(&rest[..header as usize]);
        rest = &rest[header as usize..];
        for _ in 0..2 {
            varint::put(&mut head, varint::take(&mut rest).expect("length"));
        }
        let pieces =
            take_pieces(&mut rest, old_raw.len() as u64, new_raw.len() as u64).expect("pieces");
        let piece = pieces[0];
        let at = |new_from: u64, old_from: u64, len: u64| deflate::Piece {
            new_from,
            old_from,
            len,
        };
        for bad in [
            vec![at(piece.new_from, piece.old_from, piece.len + 1)],
            vec![at(piece.new_from, piece.old_from + 1, piece.len)],
            vec![at(0, 0, 1), at(1, 0, new_raw.len() as u64)],
            vec![at(u64::MAX / 2, 0, u64::MAX / 2)],
        ] {
            let mut payload = head.clone();
            put_pieces(&mut payload, &bad);
            payload.extend_from_slice(rest);
            assert!(
                Gzip.decode(&old, &payload, new.len() as u64).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn applies_only_to_reproducible_gzip() {
        let raw = changelog(50);
        let good = gzip9(&raw);
        assert!(Gzip.encode(&good, &good).expect("encode").is_some());
        // Not gzip at all.
        assert!(Gzip.encode(&raw, &good).expect("encode").is_none());
        assert!(Gzip.encode(&good, &raw).expect("encode").is_none());
        // A stream no supported gzip level writes (stored blocks only, as gzip -1 never does).
        let mut stored = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 2, 3];
        let mut encoder =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::none());
        encoder.write_all(&raw).expect("write");
        stored.extend(encoder.finish().expect("finish"));
        stored.extend(&good[good.len() - TRAILER..]);
        assert!(Gzip.encode(&good, &stored).expect("encode").is_none());
        // Bytes after the trailer.
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(Gzip.encode(&good, &trailing).expect("encode").is_none());
    }

    #[test]
    fn the_old_file_must_have_the_declared_content() {
        let (old, new) = (gzip9(&changelog(100)), gzip9(&changelog(101)));
        let payload = Gzip.encode(&old, &new).expect("encode").expect("applies");
        let other = gzip9(&changelog(99));
        assert!(Gzip.decode(&other, &payload, new.len() as u64).is_err());
        assert!(Gzip.decode(&new, &payload, new.len() as u64).is_err());
    }
}
