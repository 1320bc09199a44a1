//! x86-64 code references: `call`/`jmp`/`jcc` with a 32-bit displacement and RIP-relative memory
//! operands of common instructions, found by a byte scan (like Courgette's and Zucchini's): an
//! instruction is taken when its target lies inside the image, and the scan resumes after it.

use super::{collect, within, Image, Kind, Ref, MAX_FOUND};

/// One-byte opcodes taking a ModRM operand and no immediate.
const MODRM_OPS: [u8; 30] = [
    0x01, 0x03, 0x09, 0x0b, 0x11, 0x13, 0x19, 0x1b, 0x21, 0x23, 0x29, 0x2b, 0x31, 0x33, 0x39, 0x3b,
    0x63, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8a, 0x8b, 0x8d, 0xff, 0xd1, 0xd3, 0xfe,
];
/// Two-byte opcodes (after 0x0f) taking a ModRM operand and no immediate.
const MODRM_OPS_0F: [u8; 37] = [
    0xb6, 0xb7, 0xbe, 0xbf, 0xaf, 0x10, 0x11, 0x28, 0x29, 0x2e, 0x2f, 0x54, 0x57, 0x58, 0x59, 0x5c,
    0x5e, 0x6f, 0x7f, 0xd6, 0x1f, 0x12, 0x13, 0x16, 0x17, 0x51, 0x5a, 0x2a, 0x2c, 0x2d, 0xef, 0xdb,
    0xeb, 0xfe, 0xd4, 0xfa, 0xfb,
];

/// Bytes of immediate after the ModRM operand of one-byte opcode `op` with ModRM `modrm`, or
/// `None` when `op` is not one the scan knows.
fn immediate_after(op: u8, modrm: u8) -> Option<u8> {
    let reg = (modrm >> 3) & 7;
    match op {
        _ if MODRM_OPS.contains(&op) => Some(0),
        0x80 | 0x83 | 0xc6 | 0x6b | 0xc0 | 0xc1 => Some(1),
        0x81 | 0xc7 | 0x69 => Some(4),
        0xf7 => Some(if reg <= 1 { 4 } else { 0 }),
        0xf6 => Some(if reg <= 1 { 1 } else { 0 }),
        _ => None,
    }
}

/// The code bytes `start..end` of `data`, at virtual address `vstart`, to scan for references.
pub(super) struct Scan<'a> {
    pub data: &'a [u8],
    pub start: u64,
    pub end: u64,
    pub vstart: u64,
    /// Virtual address ranges of all code.
    pub code: &'a [(u64, u64)],
    pub image: &'a Image,
}

impl Scan<'_> {
    /// Push the references found to `refs`, and the addresses that `lea` instructions load
    /// (where switch tables start) to `loaded`.
    pub fn run(&self, refs: &mut Vec<Ref>, loaded: &mut Vec<u64>) {
        let (start, end) = (self.start as usize, self.end as usize);
        let code = &self.data[start..end];
        let vaddr = |i: usize| self.vstart + i as u64;
        let disp = |i: usize| -> Option<i64> {
            Some(i64::from(i32::from_le_bytes(
                code.get(i..i + 4)?.try_into().ok()?,
            )))
        };
        let target = |end_of_insn: usize, d: i64| vaddr(end_of_insn).checked_add_signed(d);
        let mut i = 0usize;
        while i + 5 <= code.len() {
            let b = code[i];
            // call rel32, jmp rel32; jcc rel32
            let branch = match b {
                0xe8 | 0xe9 => Some(i + 1),
                0x0f if code.get(i + 1).is_some_and(|c| (0x80..=0x8f).contains(c)) => Some(i + 2),
                _ => None,
            };
            if let Some(at) = branch {
                if let Some(t) = disp(at).and_then(|d| target(at + 4, d)) {
                    if within(self.code, t) {
                        let site = (start + at) as u64;
                        let kind = Kind::Rel32 { k: 4 };
                        collect(
                            refs,
                            Ref {
                                site,
                                kind,
                                target: t,
                            },
                        );
                        i = at + 4;
                        continue;
                    }
                }
            }
            // [66|f2|f3] [REX] opcode ModRM(mod 00, r/m 101) disp32 [imm]: RIP-relative.
            let mut j = i;
            if matches!(code[j], 0x66 | 0xf2 | 0xf3) {
                j += 1;
            }
            if code.get(j).is_some_and(|b| (0x40..=0x4f).contains(b)) {
                j += 1;
            }
            let operand = match code.get(j) {
                Some(0x0f) => code
                    .get(j + 1)
                    .filter(|op| MODRM_OPS_0F.contains(op) || (0x40..=0x4f).contains(*op))
                    .map(|_| (j + 2, 0u8)),
                Some(&op) => code
                    .get(j + 1)
                    .and_then(|&modrm| immediate_after(op, modrm))
                    .map(|imm| (j + 1, imm)),
                None => None,
            };
            if let Some((m, tail)) = operand {
                if code.get(m).is_some_and(|&modrm| modrm & 0xc7 == 0x05) {
                    let end_of_insn = m + 5 + usize::from(tail);
                    let t = disp(m + 1).and_then(|d| target(end_of_insn, d));
                    if let Some(t) = t.filter(|&t| self.image.segment_at(t).is_some()) {
                        if end_of_insn <= code.len() {
                            let site = (start + m + 1) as u64;
                            let kind = Kind::Rel32 { k: 4 + tail };
                            collect(
                                refs,
                                Ref {
                                    site,
                                    kind,
                                    target: t,
                                },
                            );
                            if code[j] == 0x8d && loaded.len() < MAX_FOUND {
                                loaded.push(t);
                            }
                            i = end_of_insn;
                            continue;
                        }
                    }
                }
            }
            i += 1;
        }
    }
}
