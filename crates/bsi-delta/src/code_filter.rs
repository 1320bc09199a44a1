//! The code filter of zstd-prefix payloads: x86-64 and AArch64 code made more alike to itself
//! before zstd sees it, and restored after decoding.
//!
//! ## x86-64
//!
//! The 32-bit displacement of each `call rel32` and of each RIP-relative memory operand becomes
//! the position its target lies at in the file (modulo [`SPAN`]), so that every call of one
//! function and every use of one global carries the same four bytes wherever it is, as the BCJ
//! filters of xz and 7-Zip do for calls. Firefox ESR 140 -> 153's libxul.so (184 MB, 117 MiB of
//! code) costs 9.7% less with it (see ARCHITECTURE.md). Only the new file is converted: the
//! matches that zstd finds in the old one are not in its code (converting both gave the same
//! size to 0.0001%), and so decoding holds no converted copy of the old file.
//!
//! The encoder walks each code range from its start: where an instruction the filter knows
//! starts and its displacement `d` lies in `[-SPAN/2, SPAN/2)`, `d` becomes `d + end` (`end`
//! the file offset of the instruction's end) brought back into that interval, and the walk goes
//! on after the instruction; else it goes on at the next byte. Which instructions it knows
//! depends only on the bytes before the displacement, and the conversion keeps a displacement in
//! the interval, so a decoder walking the converted bytes the same way finds every converted
//! instruction. It may also find one more where a displacement converted further on changed the
//! bytes it reads at a position the encoder passed: those positions are listed in the payload
//! (libxul.so: 367 beside 2,866,982 converted instructions in 123 MB of code; crashreporter 6
//! beside 55,458), and the decoder passes them too.
//!
//! ## AArch64
//!
//! Every instruction is a 4-byte word, and the filter reads each word of the code ranges that
//! starts at a file offset `p` divisible by 4: a `bl` (bits 31..26 `100101`) gets `p / 4` added
//! to its 26-bit immediate, an `adrp` (bit 31 set, bits 28..24 `10000`) `p / 4096` to its 21-bit
//! one, each modulo the immediate's width. The immediate then names the target (its word, or its
//! 4 KiB page) wherever the instruction is, as xz's ARM64 filter does. The bits that tell the
//! instruction apart never change, so a decoder finds exactly the words the encoder converted,
//! and nothing is listed. An ELF file's addresses and file offsets agree modulo its segments'
//! alignment, a Mach-O file's segments are page-aligned, and real universal files put their
//! slices at multiples of 4 KiB or 16 KiB, so file offsets name pages as addresses do. On one 16 MiB piece of the code of
//! Firefox ESR 153's arm64 libxul.so (against 140's, level 19 with 2^20 tables) the payload
//! is 5,531,022 B as it is, 4,743,078 B with the calls converted and 4,475,348 B with the
//! `adrp`s too (-19.1%); also converting `b` gave 4,625,757 B, and `adr` 4,478,582 B.
//!
//! ## Layout
//!
//! The code ranges are an ELF file's executable sections, or a Mach-O file's sections of
//! instructions, each with the machine of its file or slice. After the magic number of a
//! filtered payload (which names the one machine of every range, or says that each range is
//! tagged): the number of code ranges, each as its distance from the previous range's end and
//! its length, then when tagged a byte for its machine (0 x86-64, 1 AArch64); the number of
//! listed positions (at most one per KiB of x86-64 code plus 1,024, none without x86-64 code),
//! each as its distance from the previous one (the first from 0); all LEB128 varints but the
//! tags. The zstd-prefix payload of the converted file follows.

use std::io::{self, Read, Write};

use crate::bsdiff::{rip_relative, Machine};
use crate::{corrupt, varint, DecodeError};

/// Displacements are converted modulo 256 MiB: every call and RIP-relative operand of a file
/// whose code and data span less than 128 MiB, and most of a larger one's (libxul.so: 117 MiB of
/// code, 184 MB in all).
const SPAN: i64 = 1 << 28;
/// Bytes from an instruction's start to its end, at most: prefix, REX, opcode, ModRM, disp32
/// and a 4-byte immediate.
const LONGEST: u64 = 12;
/// At most this many code ranges (an ELF file's executable sections, a Mach-O file's sections of
/// instructions).
pub(crate) const MAX_RANGES: usize = 256;
/// At most one listed position per this many bytes of x86-64 code, and [`MIN_LISTED`] whatever
/// the code's length (none without x86-64 code): a decoder holds the list, and real code needs
/// about one per 300 KB.
const CODE_PER_LISTED: u64 = 1024;
const MIN_LISTED: u64 = 1024;

/// The converted instruction at the start of `code` (which ends where its range does), if its
/// displacement lies in the interval: (offset of the displacement, offset of the end).
#[inline(always)]
fn operand(code: &[u8]) -> Option<(usize, usize)> {
    let (disp, end) = match code.first()? {
        0xe8 => (1, 5),
        _ => rip_relative(code, 0).map(|r| (r.disp, r.end))?,
    };
    debug_assert!(end as u64 <= LONGEST);
    let d = i64::from(i32::from_le_bytes(
        code.get(disp..disp + 4)?.try_into().ok()?,
    ));
    (end <= code.len() && (-SPAN / 2..SPAN / 2).contains(&d)).then_some((disp, end))
}

/// The first position from `from` on at which [`operand`] may find an instruction, or
/// `code.len()`: a `call` byte there, or a ModRM byte of a RIP-relative operand (mod 00, r/m
/// 101) 1 to 4 bytes after it. About one byte in eight of real code is such a position.
#[inline(always)]
fn next_candidate(code: &[u8], from: usize) -> usize {
    for (p, &b) in code.iter().enumerate().skip(from) {
        if b == 0xe8 {
            return p;
        }
        if b & 0xc7 == 0x05 && p > from {
            return p.saturating_sub(4).max(from);
        }
    }
    code.len()
}

/// `d` (in the interval) converted for an instruction ending at file offset `end`, or restored
/// with `back`.
fn convert(d: i32, end: u64, back: bool) -> i32 {
    let end = (end % SPAN as u64) as i64;
    let moved = if back {
        i64::from(d) - end
    } else {
        i64::from(d) + end
    };
    ((moved + SPAN / 2).rem_euclid(SPAN) - SPAN / 2) as i32
}

fn rewrite(code: &mut [u8], disp: usize, end: u64, back: bool) {
    let field: &mut [u8; 4] = (&mut code[disp..disp + 4]).try_into().expect("4 bytes");
    *field = convert(i32::from_le_bytes(*field), end, back).to_le_bytes();
}

/// A code range: file offsets `start..end`, and the machine whose code it holds.
pub(crate) type CodeRange = (u64, u64, Machine);

/// Where a filtered payload's header gives each range's machine: the magic number names one
/// for all, or each range is tagged with its own (a universal Mach-O file's slices).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Machines {
    All(Machine),
    Tagged,
}

/// A range's machine as the header tags it.
fn tag(machine: Machine) -> u8 {
    match machine {
        Machine::X86_64 => 0,
        Machine::Aarch64 => 1,
    }
}

/// A new file with its code converted, and what a decoder needs to restore it.
pub(crate) struct Filtered {
    pub bytes: Vec<u8>,
    /// The ranges and listed positions, as the payload holds them.
    pub header: Vec<u8>,
    /// How the header gives the ranges' machines.
    pub machines: Machines,
}

/// `new` with the code in `ranges` (ascending and apart) converted; `None` when there is no
/// code to convert or it would need too long a list.
pub(crate) fn filter(new: &[u8], ranges: &[CodeRange]) -> Option<Filtered> {
    let fits = |&(start, end, _): &CodeRange| start < end && end <= new.len() as u64;
    let apart = ranges.windows(2).all(|w| w[0].1 < w[1].0);
    if ranges.is_empty() || ranges.len() > MAX_RANGES || !ranges.iter().all(fits) || !apart {
        return None;
    }
    let mut bytes = new.to_vec();
    let x86: Vec<CodeRange> = ranges
        .iter()
        .copied()
        .filter(|r| r.2 == Machine::X86_64)
        .collect();
    let listed = match x86.is_empty() {
        true => Vec::new(),
        false => filter_x86(&mut bytes, new, &x86)?,
    };
    for &(start, end, machine) in ranges {
        if machine == Machine::Aarch64 {
            let (start, end) = words(start, end);
            convert_words(&mut bytes[start as usize..end as usize], start, false);
        }
    }
    let machines = match ranges.iter().all(|r| r.2 == ranges[0].2) {
        true => Machines::All(ranges[0].2),
        false => Machines::Tagged,
    };
    let mut header = Vec::new();
    varint::put(&mut header, ranges.len() as u64);
    let mut last = 0;
    for &(start, end, machine) in ranges {
        varint::put(&mut header, start - last);
        varint::put(&mut header, end - start);
        if machines == Machines::Tagged {
            header.push(tag(machine));
        }
        last = end;
    }
    varint::put(&mut header, listed.len() as u64);
    let mut last = 0;
    for &at in &listed {
        varint::put(&mut header, at - last);
        last = at;
    }
    Some(Filtered {
        bytes,
        header,
        machines,
    })
}

/// The part of the code range `start..end` that its whole aligned words take.
fn words(start: u64, end: u64) -> (u64, u64) {
    let first = start.next_multiple_of(4).min(end);
    (first, first + (end - first) / 4 * 4)
}

/// Convert (or restore, with `back`) every `bl` and `adrp` of the AArch64 words of `code`,
/// whose first lies at file offset `at` (divisible by 4).
fn convert_words(code: &mut [u8], at: u64, back: bool) {
    for (k, word) in code.chunks_exact_mut(4).enumerate() {
        let p = at + 4 * k as u64;
        let w = u32::from_le_bytes((&*word).try_into().expect("4 bytes"));
        // `imm` moved by `by` modulo 2^`bits`.
        let moved = |imm: u32, by: u64, bits: u32| {
            let by = by as u32; // the low bits are all that count
            let v = match back {
                true => imm.wrapping_sub(by),
                false => imm.wrapping_add(by),
            };
            v & ((1 << bits) - 1)
        };
        let converted = if w >> 26 == 0b10_0101 {
            // bl: imm26 in bits 25..0, in words.
            (w & !0x03ff_ffff) | moved(w & 0x03ff_ffff, p >> 2, 26)
        } else if w & 0x9f00_0000 == 0x9000_0000 {
            // adrp: immlo in bits 30..29, immhi in bits 23..5, in pages.
            let imm = ((w >> 29) & 3) | (((w >> 5) & 0x7_ffff) << 2);
            let v = moved(imm, p >> 12, 21);
            (w & 0x9f00_001f) | ((v & 3) << 29) | ((v >> 2) << 5)
        } else {
            continue;
        };
        word.copy_from_slice(&converted.to_le_bytes());
    }
}

/// Convert the x86-64 code of `ranges` in `bytes` (a copy of `new`); the positions a decoder
/// must pass, or `None` when there are too many.
fn filter_x86(bytes: &mut [u8], new: &[u8], ranges: &[CodeRange]) -> Option<Vec<u64>> {
    // Converting in place: every byte the walk reads lies at or after its position, and only
    // displacements behind it have been converted.
    let mut converted = Vec::new();
    for &(start, end, _) in ranges {
        let code = &mut bytes[start as usize..end as usize];
        let mut i = next_candidate(code, 0);
        while i < code.len() {
            match operand(&code[i..]) {
                Some((disp, len)) => {
                    let at = start + (i + len) as u64;
                    rewrite(code, i + disp, at, false);
                    converted.push(start + i as u64);
                    i = next_candidate(code, i + len);
                }
                None => i = next_candidate(code, i + 1),
            }
        }
    }
    // Walk the converted bytes as a decoder does, listing where it would find an instruction
    // the encoder did not convert, and check that it gives `new` back.
    let mut listed = Vec::new();
    let mut restored = bytes.to_vec();
    let mut walk = Walk::new(ranges.to_vec());
    let mut next = converted.iter().peekable();
    walk.run(&mut restored, 0, true, |at| {
        while next.next_if(|&&c| c < at).is_some() {}
        match next.next_if(|&&c| c == at) {
            Some(_) => false,
            None => {
                listed.push(at);
                true
            }
        }
    })
    .ok()?;
    let code: u64 = ranges.iter().map(|(start, end, _)| end - start).sum();
    (restored == new && listed.len() as u64 <= max_listed(code)).then_some(listed)
}

/// At most this many listed positions for `code` bytes of x86-64 code.
fn max_listed(code: u64) -> u64 {
    match code {
        0 => 0,
        _ => code / CODE_PER_LISTED + MIN_LISTED,
    }
}

/// The walk over the code ranges that restores the converted displacements.
struct Walk {
    ranges: Vec<CodeRange>,
    /// The range walked, and the position reached (in it, or before it).
    range: usize,
    at: u64,
}

impl Walk {
    fn new(ranges: Vec<CodeRange>) -> Walk {
        Walk {
            ranges,
            range: 0,
            at: 0,
        }
    }

    /// Restore the displacements in `buf` (the file's bytes from offset `base`) as far as its
    /// bytes allow (to the end when `complete`), passing each x86-64 instruction found at a
    /// position `pass` names. Returns the offset before which the bytes are final.
    fn run(
        &mut self,
        buf: &mut [u8],
        base: u64,
        complete: bool,
        mut pass: impl FnMut(u64) -> bool,
    ) -> Result<u64, DecodeError> {
        let avail = base + buf.len() as u64;
        let past = |start: u64, end: u64| {
            corrupt(&format!(
                "code range {start}..{end} runs past the file's {avail} bytes"
            ))
        };
        while let Some(&(start, end, machine)) = self.ranges.get(self.range) {
            let at = self.at.max(start);
            if machine == Machine::Aarch64 {
                // Every whole word the bytes hold.
                let (first, last) = words(at, end);
                if first >= last {
                    self.range += 1;
                    continue;
                }
                if first + 4 > avail {
                    return match complete {
                        true => Err(past(start, end)),
                        false => Ok(first.min(avail)),
                    };
                }
                let stop = last.min(avail - (avail - first) % 4);
                let code = &mut buf[(first - base) as usize..(stop - base) as usize];
                convert_words(code, first, true);
                self.at = stop;
                continue;
            }
            if at >= end {
                self.range += 1;
                continue;
            }
            let needed = (at + LONGEST).min(end);
            if needed > avail {
                return match complete {
                    true => Err(past(start, end)),
                    false => Ok(at.min(avail)),
                };
            }
            let from = (at - base) as usize;
            let code = &mut buf[from..(end.min(avail) - base) as usize];
            let least = match operand(code) {
                Some((disp, len)) if !pass(at) => {
                    rewrite(code, disp, at + len as u64, true);
                    len
                }
                _ => 1,
            };
            let step = next_candidate(code, least);
            // A position whose ModRM bytes may lie past the bytes written so far is looked at
            // again once they are.
            self.at = at
                + match end > avail {
                    true => step.min(code.len().saturating_sub(4)).max(least),
                    false => step,
                } as u64;
        }
        Ok(u64::MAX)
    }
}

/// A writer that restores the converted code of the bytes written through it (see
/// [`Unfilter::read_header`]) and hands them on to `out`; [`Unfilter::finish`] ends the file.
pub(crate) struct Unfilter<'w> {
    out: &'w mut dyn Write,
    walk: Walk,
    listed: Vec<u64>,
    next: usize,
    /// The bytes written and not yet final, from file offset `base`.
    held: Vec<u8>,
    base: u64,
}

impl<'w> Unfilter<'w> {
    /// Read a filtered payload's header from `payload` (which has `*left` bytes left, counted
    /// down) for a file of `new_len` bytes, the ranges' machines given as `machines` says.
    pub fn read_header(
        machines: Machines,
        payload: &mut dyn Read,
        left: &mut u64,
        new_len: u64,
        out: &'w mut dyn Write,
    ) -> Result<Unfilter<'w>, DecodeError> {
        let mut counted = (&mut *payload).take(*left);
        let count = varint::read(&mut counted)?;
        if count == 0 || count > MAX_RANGES as u64 {
            return Err(corrupt(&format!(
                "{count} code ranges (1 to {MAX_RANGES} allowed)"
            )));
        }
        let mut ranges = Vec::with_capacity(count as usize);
        let mut last = 0u64;
        for _ in 0..count {
            let start = last.checked_add(varint::read(&mut counted)?);
            let end = start.and_then(|s| s.checked_add(varint::read(&mut counted).ok()?));
            let (Some(start), Some(end)) = (start, end) else {
                return Err(corrupt("a code range's offset overflows"));
            };
            if start >= end || end > new_len || (!ranges.is_empty() && start == last) {
                return Err(corrupt(&format!(
                    "code range {start}..{end} is empty, out of order or past the file's \
                     {new_len} bytes"
                )));
            }
            let machine = match machines {
                Machines::All(machine) => machine,
                Machines::Tagged => {
                    let mut tagged = [0u8];
                    counted
                        .read_exact(&mut tagged)
                        .map_err(DecodeError::Corrupt)?;
                    [Machine::X86_64, Machine::Aarch64]
                        .into_iter()
                        .find(|&m| tag(m) == tagged[0])
                        .ok_or_else(|| {
                            corrupt(&format!(
                                "code range {start}..{end}: no machine {}",
                                tagged[0]
                            ))
                        })?
                }
            };
            ranges.push((start, end, machine));
            last = end;
        }
        let code: u64 = ranges
            .iter()
            .filter(|r| r.2 == Machine::X86_64)
            .map(|(start, end, _)| end - start)
            .sum();
        let count = varint::read(&mut counted)?;
        if count > max_listed(code) {
            return Err(corrupt(&format!(
                "{count} listed positions for {code} bytes of x86-64 code"
            )));
        }
        // Grown as positions are read, each from at least a byte of the payload.
        let mut listed = Vec::with_capacity(count.min(4096) as usize);
        let mut last = 0u64;
        for k in 0..count {
            let step = varint::read(&mut counted)?;
            let at = last
                .checked_add(step)
                .filter(|&at| (k == 0 || step > 0) && at < new_len)
                .ok_or_else(|| corrupt("listed positions out of order or past the file"))?;
            listed.push(at);
            last = at;
        }
        *left = counted.limit();
        Ok(Unfilter {
            out,
            walk: Walk::new(ranges),
            listed,
            next: 0,
            held: Vec::new(),
            base: 0,
        })
    }

    fn restore(&mut self, complete: bool) -> io::Result<()> {
        let (listed, next) = (&self.listed, &mut self.next);
        let done = self
            .walk
            .run(&mut self.held, self.base, complete, |at| {
                let passed = listed.get(*next) == Some(&at);
                *next += usize::from(passed);
                passed
            })
            .map_err(io::Error::other)?;
        let final_len = (done.saturating_sub(self.base) as usize).min(self.held.len());
        self.out.write_all(&self.held[..final_len])?;
        self.held.drain(..final_len);
        self.base += final_len as u64;
        Ok(())
    }

    /// Restore and hand on the last bytes; every listed position must have been passed.
    pub fn finish(mut self) -> Result<(), DecodeError> {
        self.restore(true).map_err(DecodeError::Corrupt)?;
        match self.listed.len() - self.next {
            0 => Ok(()),
            n => Err(corrupt(&format!(
                "{n} listed positions are not at instructions the code filter converts"
            ))),
        }
    }
}

impl Write for Unfilter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.held.extend_from_slice(buf);
        self.restore(false)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_data::noise;

    /// Restore `filtered` (x86-64 code) through an [`Unfilter`] fed `chunk` bytes at a time.
    fn unfilter(filtered: &Filtered, chunk: usize) -> Result<Vec<u8>, DecodeError> {
        unfilter_as(Machines::All(Machine::X86_64), filtered, chunk)
    }

    fn unfilter_as(
        machines: Machines,
        filtered: &Filtered,
        chunk: usize,
    ) -> Result<Vec<u8>, DecodeError> {
        let mut out = Vec::new();
        let mut header = &filtered.header[..];
        let mut left = header.len() as u64;
        let len = filtered.bytes.len() as u64;
        let mut writer = Unfilter::read_header(machines, &mut header, &mut left, len, &mut out)?;
        assert_eq!(left, 0, "the whole header is read");
        for piece in filtered.bytes.chunks(chunk) {
            writer.write_all(piece).map_err(DecodeError::Corrupt)?;
        }
        writer.finish()?;
        Ok(out)
    }

    /// `call rel32` and `lea rax, [rip + d]` at `at` of `code`, to file offset `target`.
    fn call(code: &mut [u8], at: usize, target: usize) {
        let d = target as i64 - (at + 5) as i64;
        code[at] = 0xe8;
        code[at + 1..at + 5].copy_from_slice(&(d as i32).to_le_bytes());
    }
    fn lea(code: &mut [u8], at: usize, target: usize) {
        let d = target as i64 - (at + 7) as i64;
        code[at..at + 3].copy_from_slice(&[0x48, 0x8d, 0x05]);
        code[at + 3..at + 7].copy_from_slice(&(d as i32).to_le_bytes());
    }

    #[test]
    fn every_call_of_a_function_reads_the_same_once_converted() {
        let mut new = vec![0x90u8; 50_000];
        let sites = [1_000, 7_003, 20_111, 45_000];
        for at in sites {
            call(&mut new, at, 30_000);
            lea(&mut new, at + 5, 200);
        }
        let filtered = filter(&new, &[(16, 49_000, Machine::X86_64)]).expect("filtered");
        let field = |at: usize| filtered.bytes[at..at + 4].to_vec();
        for at in sites {
            assert_eq!(field(at + 1), field(sites[0] + 1), "call at {at}");
            assert_eq!(field(at + 8), field(sites[0] + 8), "lea at {at}");
            assert_ne!(
                new[at + 1..at + 5],
                filtered.bytes[at + 1..at + 5],
                "converted"
            );
        }
        // Outside the code range nothing changes.
        call(&mut new, 49_500, 30_000);
        let filtered = filter(&new, &[(16, 49_000, Machine::X86_64)]).expect("filtered");
        assert_eq!(filtered.bytes[49_000..], new[49_000..]);
        for chunk in [1, 3, 12, 13, 1000, new.len()] {
            assert!(
                unfilter(&filtered, chunk).expect("restore") == new,
                "chunk {chunk}"
            );
        }
    }

    /// A call whose displacement is out of the interval, followed within it by one that is
    /// converted: the conversion brings the first displacement into the interval, so that a
    /// decoder would take it; its position is listed, and without the list the bytes come out
    /// wrong.
    #[test]
    fn a_conversion_that_would_mislead_the_decoder_is_listed() {
        let mut new = vec![0x90u8; 300];
        let r = 100;
        // The first call's displacement ends in the second call's opcode and first byte.
        new[r..r + 3].copy_from_slice(&[0xe8, 0x11, 0x22]);
        // The second ends at r + 8; converted, its displacement is 0x100, whose low byte (0)
        // becomes the first displacement's high byte.
        new[r + 3..r + 8].copy_from_slice(&[0xe8, 0x94, 0x00, 0x00, 0x00]);
        assert_eq!(
            operand(&new[r..]),
            None,
            "0x94e82211 is out of the interval"
        );
        let filtered = filter(&new, &[(0, 300, Machine::X86_64)]).expect("filtered");
        assert_eq!(filtered.bytes[r + 4..r + 8], [0x00, 0x01, 0x00, 0x00]);
        assert!(
            operand(&filtered.bytes[r..]).is_some(),
            "a decoder would take it"
        );
        assert!(unfilter(&filtered, 7).expect("restore") == new);
        // The header: 1 range (0, 300), then 1 listed position, at r.
        assert_eq!(filtered.header, [1, 0, 172, 2, 1, r as u8]);
        let unlisted = Filtered {
            header: vec![1, 0, 172, 2, 0],
            ..filtered
        };
        assert!(unfilter(&unlisted, 7).is_ok_and(|out| out != new));
    }

    #[test]
    fn hostile_headers_are_refused() {
        let new = noise(2, 4_000);
        let filtered = filter(&new, &[(0, 4_000, Machine::X86_64)]).expect("filtered");
        let with = |header: Vec<u8>| Filtered {
            bytes: filtered.bytes.clone(),
            header,
            machines: filtered.machines,
        };
        for (header, why) in [
            (vec![0, 0], "code ranges"),
            (vec![1, 0, 0xa1, 0x1f, 0], "past the file"),
            (vec![2, 0, 10, 0, 10, 0], "out of order"),
            (
                vec![
                    1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 1, 0,
                ],
                "overflows",
            ),
            (vec![1, 0, 100, 0x80, 0x10], "listed positions for"),
            (vec![1, 0, 100, 2, 5, 0], "out of order or past"),
            (vec![1, 0, 100, 1, 0xa0, 0x1f], "out of order or past"),
            (vec![1, 0, 100], "corrupt"),
        ] {
            let e = unfilter(&with(header.clone()), 100).expect_err(why);
            assert!(e.to_string().contains(why), "{header:?}: {e}");
        }
        // A listed position where no instruction is converted: noise has none at its start
        // once it is made a run of nops.
        let nops = vec![0x90u8; 100];
        let filtered = Filtered {
            bytes: nops,
            header: vec![1, 0, 100, 1, 3],
            machines: Machines::All(Machine::X86_64),
        };
        let e = unfilter(&filtered, 10).expect_err("not at an instruction");
        assert!(e.to_string().contains("not at instructions"), "{e}");
    }

    /// AArch64 `bl` at file offset `at` to file offset `target`, and `adrp` to `target`'s page.
    fn bl(code: &mut [u8], at: usize, target: usize) {
        let imm = ((target as i64 - at as i64) >> 2) as u32 & 0x03ff_ffff;
        code[at..at + 4].copy_from_slice(&(0x9400_0000 | imm).to_le_bytes());
    }
    fn adrp(code: &mut [u8], at: usize, target: usize, rd: u32) {
        let imm = ((target >> 12) as i64 - (at >> 12) as i64) as u32 & 0x1f_ffff;
        let w = 0x9000_0000 | ((imm & 3) << 29) | ((imm >> 2) << 5) | rd;
        code[at..at + 4].copy_from_slice(&w.to_le_bytes());
    }

    #[test]
    fn every_arm64_call_and_page_reads_the_same_once_converted() {
        let mut new = noise(3, 200_000);
        let sites = [4_096, 20_000, 77_776, 150_000, 199_000];
        for at in sites {
            bl(&mut new, at, 100_000);
            adrp(&mut new, at + 4, 180_000, 3);
        }
        let range = (1_002, 199_999);
        let filtered = filter(&new, &[(range.0, range.1, Machine::Aarch64)]).expect("filtered");
        let word = |at: usize| filtered.bytes[at..at + 4].to_vec();
        for at in sites {
            assert_eq!(word(at), word(sites[0]), "bl at {at}");
            assert_eq!(word(at + 4), word(sites[0] + 4), "adrp at {at}");
        }
        assert_eq!(word(sites[0] + 4)[0] & 0x1f, 3, "the register is kept");
        // A call whose word is not whole in the range, and one outside it, are left as they are.
        for at in [199_996, 500] {
            bl(&mut new, at, 100_000);
        }
        let filtered = filter(&new, &[(range.0, range.1, Machine::Aarch64)]).expect("filtered");
        assert_eq!(filtered.bytes[..range.0 as usize], new[..range.0 as usize]);
        assert_eq!(filtered.bytes[199_996..], new[199_996..]);
        assert!(filtered.bytes != new, "converted");
        for chunk in [1, 2, 3, 5, 4096, new.len()] {
            assert!(
                unfilter_as(Machines::All(Machine::Aarch64), &filtered, chunk).expect("restore")
                    == new,
                "chunk {chunk}"
            );
        }
        // An AArch64 header lists nothing: its last byte (no listed position) made one.
        let mut header = filtered.header.clone();
        assert_eq!(header.pop(), Some(0));
        header.extend_from_slice(&[1, 4]);
        let listed = Filtered { header, ..filtered };
        let e = unfilter_as(Machines::All(Machine::Aarch64), &listed, 100).expect_err("listed");
        assert!(e.to_string().contains("for 0 bytes of x86-64 code"), "{e}");
    }

    /// A universal file's ranges: x86-64 and AArch64 code, each range tagged with its machine.
    #[test]
    fn tagged_ranges_convert_each_as_its_machine() {
        let mut new = vec![0x90u8; 100_000];
        let (x86, arm) = ((1_000, 40_000), (60_000, 99_000));
        for at in [2_000, 30_000] {
            call(&mut new, at, 35_000);
        }
        for at in [61_000, 90_000] {
            bl(&mut new, at, 70_000);
        }
        let ranges = [
            (x86.0, x86.1, Machine::X86_64),
            (arm.0, arm.1, Machine::Aarch64),
        ];
        let filtered = filter(&new, &ranges).expect("filtered");
        assert_eq!(filtered.machines, Machines::Tagged);
        let word = |at: usize| filtered.bytes[at..at + 4].to_vec();
        assert_eq!(word(2_001), word(30_001), "calls");
        assert_eq!(word(61_000), word(90_000), "bl");
        for chunk in [1, 7, 100_000] {
            let out = unfilter_as(Machines::Tagged, &filtered, chunk).expect("restore");
            assert!(out == new, "chunk {chunk}");
        }
        // Untagged, the x86-64 range's first tag would be read as the next range's offset.
        let e = unfilter_as(Machines::All(Machine::X86_64), &filtered, 100);
        assert!(e.is_err() || e.is_ok_and(|out| out != new));
        // A tag that names no machine.
        let mut header = filtered.header.clone();
        let at = 1 + 2 + 3; // count, x86's offset (2 bytes) and length (3 bytes)
        assert_eq!(header[at], 0, "x86-64's tag");
        header[at] = 7;
        let bad = Filtered { header, ..filtered };
        let e = unfilter_as(Machines::Tagged, &bad, 100).expect_err("tag 7");
        assert!(e.to_string().contains("no machine 7"), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn any_code_round_trips(
            seed in 0u64..1_000_000,
            len in 4usize..20_000,
            chunk in 1usize..5_000,
            cut in 0u64..7,
            machines in 0usize..4,
        ) {
            // Noise where about half the words are calls or `adrp`s, with call bytes and
            // RIP-relative ModRM bytes between them.
            let mut new = noise(seed, len);
            for (k, word) in new.chunks_exact_mut(4).enumerate() {
                match (seed as usize + k) % 4 {
                    0 => word[3] = 0x94 | (word[3] & 3),
                    1 => word[3] = 0x90 | (word[3] & 0x60),
                    2 => word[1] = 0xe8,
                    _ => word[0] = 0x05,
                }
            }
            // Two ranges, unaligned, each of either machine.
            let len = len as u64;
            let machine = |bit: usize| match machines >> bit & 1 {
                0 => Machine::X86_64,
                _ => Machine::Aarch64,
            };
            // (A file shorter than `cut` has neither.)
            let ranges = [
                (cut, len / 2, machine(0)),
                (len / 2 + 1 + cut, len.saturating_sub(cut), machine(1)),
            ];
            let ranges: Vec<CodeRange> = ranges.into_iter().filter(|r| r.0 < r.1).collect();
            proptest::prop_assume!(!ranges.is_empty());
            let filtered = filter(&new, &ranges).expect("filtered");
            proptest::prop_assert!(
                unfilter_as(filtered.machines, &filtered, chunk).expect("restore") == new
            );
        }

        #[test]
        fn any_bytes_round_trip(
            seed in 0u64..1_000_000,
            len in 20usize..20_000,
            chunk in 1usize..5_000,
        ) {
            // Noise with many call bytes and RIP-relative ModRM bytes, and displacements
            // near the interval, so that conversions overlap and positions are listed.
            let mut new = noise(seed, len);
            for (i, b) in new.iter_mut().enumerate() {
                match (seed as usize + i * 7) % 11 {
                    0 => *b = 0xe8,
                    1 => *b = 0x05,
                    2 => *b &= 0x07,
                    _ => {}
                }
            }
            let ranges = [(len as u64 / 10, len as u64 - len as u64 / 7)];
            let filtered = filter(&new, &[(ranges[0].0, ranges[0].1, Machine::X86_64)]).expect("filtered");
            proptest::prop_assert!(unfilter(&filtered, chunk).expect("restore") == new);
        }
    }

    #[test]
    fn noise_round_trips() {
        let new = noise(1, 10_000);
        let filtered = filter(&new, &[(100, 9_000, Machine::X86_64)]).expect("filtered");
        for chunk in [1, 5, 13, 4096, 10_000] {
            assert!(
                unfilter(&filtered, chunk).expect("restore") == new,
                "chunk {chunk}"
            );
        }
    }
}
