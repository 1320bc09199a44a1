//! AArch64 code references: every instruction word of the code whose immediate is a distance to
//! an address. Instructions are 4 bytes and aligned, so the scan reads every word: B and BL,
//! B.cond, CBZ/CBNZ, TBZ/TBNZ, LDR (literal), ADR, and ADRP with the ADD or load/store right
//! after it on ADRP's register, which completes the address (the pair is one reference).

use super::{collect, within, Image, Kind, Ref};

/// The instruction forms whose immediates are predicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::bsdiff) enum Form {
    /// B, BL: a 26-bit distance in words.
    Branch26,
    /// B.cond, CBZ, CBNZ, LDR (literal): a 19-bit distance in words at bit 5.
    Imm19,
    /// TBZ, TBNZ: a 14-bit distance in words at bit 5.
    Imm14,
    /// ADR: a 21-bit distance in bytes (2 low bits at bit 29, the rest at bit 5).
    Adr,
    /// ADRP (a 21-bit distance in 4 KiB pages) and the next word, whose 12-bit immediate at bit
    /// 10, scaled by 2^`scale`, is the address's offset in its page.
    Adrp { scale: u8 },
    /// ADRP alone, whose address an instruction further on completes (see [`Form::Low12`]).
    Page,
    /// The ADD or load/store that completes an ADRP's address further on: its 12-bit immediate
    /// at bit 10, scaled by 2^`scale`, is the address's offset in its page.
    Low12 { scale: u8 },
}

impl Form {
    /// Bytes the reference occupies.
    pub fn width(self) -> u64 {
        match self {
            Form::Adrp { .. } => 8,
            _ => 4,
        }
    }
}

fn word(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// `bits` low bits of `v`, sign-extended.
fn signed(v: u32, bits: u32) -> i64 {
    let shift = 64 - bits;
    (i64::from(v) << shift) >> shift
}

/// The 21-bit immediate of ADR and ADRP.
fn adr_immediate(w: u32) -> i64 {
    signed(((w >> 5) & 0x7_ffff) << 2 | (w >> 29) & 3, 21)
}

/// The scale of the 12-bit immediate of `w` when it is an ADD (immediate, 64-bit, unshifted)
/// or a load or store with an unsigned offset, which completes the address of an ADRP on its
/// base register.
fn low12_scale(w: u32) -> Option<u8> {
    if w & 0xffc0_0000 == 0x9100_0000 {
        Some(0)
    } else if w & 0x3b00_0000 == 0x3900_0000 {
        // The offset is scaled by the access size.
        let v = (w >> 26) & 1;
        let size = w >> 30;
        Some(if v == 1 && (w >> 23) & 1 == 1 {
            4
        } else {
            size as u8
        })
    } else {
        None
    }
}

/// Whether `w` is an ADRP.
fn is_adrp(w: u32) -> bool {
    w & 0x9f00_0000 == 0x9000_0000
}

/// Whether `w` may leave the straight line: a branch of any kind.
fn branches(w: u32) -> bool {
    w & 0x7c00_0000 == 0x1400_0000 // B, BL
        || w & 0xff00_0010 == 0x5400_0000 // B.cond
        || w & 0x7e00_0000 == 0x3400_0000 // CBZ, CBNZ
        || w & 0x7e00_0000 == 0x3600_0000 // TBZ, TBNZ
        || w & 0xfe00_0000 == 0xd600_0000 // BR, BLR, RET and the like
}

/// Instructions an ADRP's address may be completed in after it (see [`scan`]).
const SPLIT_WINDOW: usize = 16;

/// The form of the instruction word(s) at the start of `bytes`, at address `vaddr`, and the
/// address it refers to.
pub(super) fn decode(bytes: &[u8], vaddr: u64) -> Option<(Form, u64)> {
    let w = word(bytes, 0)?;
    let (form, distance) = if w & 0x7c00_0000 == 0x1400_0000 {
        (Form::Branch26, signed(w & 0x3ff_ffff, 26) * 4)
    } else if w & 0xff00_0010 == 0x5400_0000
        || w & 0x7e00_0000 == 0x3400_0000
        || w & 0x3b00_0000 == 0x1800_0000
    {
        (Form::Imm19, signed((w >> 5) & 0x7_ffff, 19) * 4)
    } else if w & 0x7e00_0000 == 0x3600_0000 {
        (Form::Imm14, signed((w >> 5) & 0x3fff, 14) * 4)
    } else if w & 0x9f00_0000 == 0x1000_0000 {
        (Form::Adr, adr_immediate(w))
    } else if is_adrp(w) {
        let next = word(bytes, 4)?;
        let (rd, rn) = (w & 31, (next >> 5) & 31);
        let scale = low12_scale(next)?;
        if rd != rn {
            return None;
        }
        let page = (vaddr & !0xfff).checked_add_signed(adr_immediate(w) << 12)?;
        let offset = u64::from((next >> 10) & 0xfff) << scale;
        return Some((Form::Adrp { scale }, page.checked_add(offset)?));
    } else {
        return None;
    };
    Some((form, vaddr.checked_add_signed(distance)?))
}

/// The bytes of a reference of form `form` at address `site` whose old bytes are `old`, pointed
/// at `target`; `None` when the distance does not fit (or is not aligned as the form needs).
pub(in crate::bsdiff) fn encode(form: Form, old: &[u8], site: i64, target: i64) -> Option<[u8; 8]> {
    let w = word(old, 0)?;
    let d = target.checked_sub(site)?;
    let fits = |v: i64, bits: u32| -(1i64 << (bits - 1)) <= v && v < 1i64 << (bits - 1);
    let in_words = |bits: u32| (d % 4 == 0 && fits(d / 4, bits)).then_some((d / 4) as u32);
    let with_adr = |w: u32, imm: i64| -> u32 {
        let imm = imm as u32;
        (w & !(0x6000_0000 | 0x00ff_ffe0)) | (imm & 3) << 29 | ((imm >> 2) & 0x7_ffff) << 5
    };
    let mut out = [0u8; 8];
    let single = match form {
        Form::Branch26 => (w & 0xfc00_0000) | (in_words(26)? & 0x3ff_ffff),
        Form::Imm19 => (w & !0x00ff_ffe0) | (in_words(19)? & 0x7_ffff) << 5,
        Form::Imm14 => (w & !0x0007_ffe0) | (in_words(14)? & 0x3fff) << 5,
        Form::Adr => fits(d, 21).then(|| with_adr(w, d))?,
        Form::Page => {
            let pages = (target & !0xfff).checked_sub(site & !0xfff)? >> 12;
            fits(pages, 21).then(|| with_adr(w, pages))?
        }
        Form::Low12 { scale } => {
            let offset = target & 0xfff;
            if offset % (1 << scale) != 0 {
                return None;
            }
            (w & !(0xfff << 10)) | ((offset >> scale) as u32) << 10
        }
        Form::Adrp { scale } => {
            let next = word(old, 4)?;
            let pages = (target & !0xfff).checked_sub(site & !0xfff)? >> 12;
            let offset = target & 0xfff;
            if !fits(pages, 21) || offset % (1 << scale) != 0 {
                return None;
            }
            let low = ((offset >> scale) as u32) << 10;
            out[..4].copy_from_slice(&with_adr(w, pages).to_le_bytes());
            out[4..].copy_from_slice(&((next & !(0xfff << 10)) | low).to_le_bytes());
            return Some(out);
        }
    };
    out[..4].copy_from_slice(&single.to_le_bytes());
    Some(out)
}

/// Push the references of the code bytes `start..end` of `data` (at address `vstart`, a
/// multiple of 4 from its section's start) to `refs`: branches to code, the others to anywhere
/// in the image. With `split`, an ADRP not completed by the next word is paired with the ADDs
/// and loads or stores on its register within [`SPLIT_WINDOW`] words, up to a branch or an
/// instruction that writes that register (any whose bits 0..5 name it): the ADRP is one
/// reference ([`Form::Page`]) to the first one's address, each of them another
/// ([`Form::Low12`]). gcc schedules many ADRPs away from the instruction that completes them:
/// Debian's arm64 libcrypto 3.0.20 has 6,238 such ADRPs (6,245 instructions completing them)
/// beside 17,058 adjacent pairs.
pub(super) fn scan(
    data: &[u8],
    (start, end): (u64, u64),
    vstart: u64,
    code: &[(u64, u64)],
    image: &Image,
    refs: &mut Vec<Ref>,
    split: bool,
) {
    let code_bytes = &data[start as usize..end as usize];
    let mut i = 0usize;
    while i + 4 <= code_bytes.len() {
        let vaddr = vstart + i as u64;
        let Some((form, target)) = decode(&code_bytes[i..], vaddr) else {
            if split {
                split_pair(code_bytes, i, vaddr, (start, image), refs);
            }
            i += 4;
            continue;
        };
        let valid = match form {
            Form::Branch26 | Form::Imm14 => within(code, target),
            // B.cond and CBZ lead into code, LDR (literal) anywhere: both are Imm19.
            Form::Imm19 | Form::Adr | Form::Adrp { .. } | Form::Page | Form::Low12 { .. } => {
                image.segment_at(target).is_some()
            }
        };
        if valid {
            push(refs, start + i as u64, form, target);
            i += form.width() as usize;
        } else {
            i += 4;
        }
    }
}

/// Collect the reference of form `form` at file offset `site` to `target`.
fn push(refs: &mut Vec<Ref>, site: u64, form: Form, target: u64) {
    let kind = Kind::Arm64(form);
    collect(refs, Ref { site, kind, target });
}

/// The references of an ADRP at `i` in `code` (at address `vaddr`, the code starting at file
/// offset `start` of `image`'s file) that the next word does not complete: see [`scan`].
fn split_pair(
    code: &[u8],
    i: usize,
    vaddr: u64,
    (start, image): (u64, &Image),
    refs: &mut Vec<Ref>,
) {
    let Some(w) = word(code, i).filter(|&w| is_adrp(w)) else {
        return;
    };
    let register = w & 31;
    let Some(page) = (vaddr & !0xfff).checked_add_signed(adr_immediate(w) << 12) else {
        return;
    };
    let mut first = true;
    for k in 1..=SPLIT_WINDOW {
        let Some(next) = word(code, i + 4 * k) else {
            return;
        };
        if let Some(scale) = low12_scale(next).filter(|_| (next >> 5) & 31 == register) {
            let target = page.checked_add(u64::from((next >> 10) & 0xfff) << scale);
            if let Some(target) = target.filter(|&t| image.segment_at(t).is_some()) {
                if first {
                    push(refs, start + i as u64, Form::Page, target);
                    first = false;
                }
                push(
                    refs,
                    start + (i + 4 * k) as u64,
                    Form::Low12 { scale },
                    target,
                );
            }
        }
        if branches(next) || next & 31 == register {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every form decodes, and encoding its own target gives its own bytes back; a target moved
    /// by 0x1234 bytes is encoded as the instruction that refers to it.
    #[test]
    fn forms_round_trip() {
        let site = 0x40_1000u64;
        let cases: [(&[u32], Form); 9] = [
            (&[0x9400_0010], Form::Branch26),                       // bl +0x40
            (&[0x17ff_fff0], Form::Branch26),                       // b -0x40
            (&[0x5400_0201], Form::Imm19),                          // b.ne +0x40
            (&[0xb400_0200], Form::Imm19),                          // cbz x0, +0x40
            (&[0x5800_0200], Form::Imm19),                          // ldr x0, +0x40
            (&[0x3600_0200], Form::Imm14),                          // tbz w0, #0, +0x40
            (&[0x3000_0200], Form::Adr),                            // adr x0, +0x41
            (&[0x9000_0100, 0x9100_4000], Form::Adrp { scale: 0 }), // adrp x0; add x0, x0, #0x10
            (&[0x9000_0101, 0xf940_0821], Form::Adrp { scale: 3 }), // adrp x1; ldr x1, [x1, #0x10]
        ];
        for (words, form) in cases {
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            let (found, target) = decode(&bytes, site).expect("decodes");
            assert_eq!(found, form, "{words:x?}");
            let width = form.width() as usize;
            let same = encode(form, &bytes, site as i64, target as i64).expect("fits");
            assert_eq!(
                same[..width],
                bytes[..],
                "{words:x?} encodes its own target"
            );
            let moved = target as i64 + 0x1234 * 4;
            let bytes2 = encode(form, &bytes, site as i64, moved).expect("fits");
            let (form2, target2) = decode(&bytes2[..width], site).expect("decodes");
            assert_eq!((form2, target2 as i64), (form, moved), "{words:x?} moved");
        }
        // An ADRP whose next word works on another register is no reference.
        let other: Vec<u8> = [0x9000_0100u32, 0x9100_4021]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        assert_eq!(decode(&other, site), None);
        // Too far, or misaligned for a form counted in words.
        let bl = 0x9400_0010u32.to_le_bytes();
        assert_eq!(encode(Form::Branch26, &bl, 0, 1 << 28), None);
        assert_eq!(encode(Form::Branch26, &bl, 0, 6), None);
    }

    /// Code at 0x1000 of an image of one segment (file offset = address, 1 MiB).
    fn split_scan(words: &[u32], split: bool) -> Vec<Ref> {
        let mut data = vec![0u8; 0x1000];
        data.extend(words.iter().flat_map(|w| w.to_le_bytes()));
        data.resize(1 << 20, 0);
        let image = Image {
            segments: vec![super::super::Segment {
                offset: 0,
                vaddr: 0,
                file_len: 1 << 20,
                mem_len: 1 << 20,
            }],
            ..Image::default()
        };
        let code = [(0x1000, 0x1000 + 4 * words.len() as u64)];
        let mut refs = Vec::new();
        scan(&data, code[0], 0x1000, &code, &image, &mut refs, split);
        refs.sort_by_key(|r| r.site);
        refs
    }

    /// An ADRP completed further on is two references to the same address, each of which
    /// encodes its own bytes back and a moved address as the instructions that reach it; the
    /// first scan does not find them, nor does a scan past a branch or a write of the register.
    #[test]
    fn adrps_completed_further_on_are_paired() {
        const ADRP_X1: u32 = 0xb000_0001; // adrp x1, +0x1000 (page 0x2000 from 0x1000)
        const MOV_X2: u32 = 0xd280_0022; // mov x2, #1
        const ADD_X3_X1: u32 = 0x9100_4023; // add x3, x1, #0x10
        const LDR_X4_X1: u32 = 0xf940_0c24; // ldr x4, [x1, #0x18]
        let words = [ADRP_X1, MOV_X2, ADD_X3_X1, LDR_X4_X1];
        assert!(split_scan(&words, false).is_empty());
        let refs = split_scan(&words, true);
        let found: Vec<(u64, Kind, u64)> =
            refs.iter().map(|r| (r.site, r.kind, r.target)).collect();
        assert_eq!(
            found,
            [
                (0x1000, Kind::Arm64(Form::Page), 0x2010),
                (0x1008, Kind::Arm64(Form::Low12 { scale: 0 }), 0x2010),
                (0x100c, Kind::Arm64(Form::Low12 { scale: 3 }), 0x2018),
            ]
        );
        let bytes = |at: u64| words[((at - 0x1000) / 4) as usize].to_le_bytes();
        for r in &refs {
            let Kind::Arm64(form) = r.kind else {
                unreachable!("arm64 references");
            };
            let same = encode(form, &bytes(r.site), r.site as i64, r.target as i64);
            assert_eq!(same.map(|b| b[..4].to_vec()), Some(bytes(r.site).to_vec()));
        }
        // Moved to 0x5_3018: the ADRP reaches page 0x5_3000, the load its offset 0x18.
        let page = encode(Form::Page, &bytes(0x1000), 0x1000, 0x5_3018).expect("fits");
        let low = encode(Form::Low12 { scale: 3 }, &bytes(0x100c), 0x100c, 0x5_3018);
        let mut moved = page[..4].to_vec();
        moved.extend_from_slice(&low.expect("aligned")[..4]);
        assert_eq!(
            decode(&moved, 0x1000),
            Some((Form::Adrp { scale: 3 }, 0x5_3018))
        );
        // Misaligned for a load of 8 bytes.
        assert_eq!(
            encode(Form::Low12 { scale: 3 }, &bytes(0x100c), 0x100c, 0x5_3014),
            None
        );
        // A write of x1 or a branch before the completion ends the search.
        const MOV_X1: u32 = 0xd280_0021; // mov x1, #1
        const B: u32 = 0x1400_0002; // b +8
        assert!(split_scan(&[ADRP_X1, MOV_X1, ADD_X3_X1], true).is_empty());
        assert!(split_scan(&[ADRP_X1, B, ADD_X3_X1], true).is_empty());
        // An ADRP completed by the next word is one reference of 8 bytes, as before.
        let adjacent = split_scan(&[ADRP_X1, ADD_X3_X1], true);
        assert_eq!(adjacent.len(), 1);
        assert_eq!(adjacent[0].kind, Kind::Arm64(Form::Adrp { scale: 0 }));
    }
}
