//! The procedure linkage table of an x86-64 or AArch64 ELF file, matched by symbol between two
//! versions of a library.
//!
//! Every call to an imported function goes through its stub, so a call's target is predicted
//! right only if the alignment moves the old stub to the new stub of the same function. The
//! stubs all look alike and a new import shifts all those after it, so the matcher lines up each
//! new stub with the old stub at the same place, which holds another function: libcrypto 3.0.17
//! -> 3.0.20 gained one import, and 32,000 of the 58,000 bytes the predictor missed were calls
//! to the 2,388 stubs after it. Likewise the stubs' relocations (`.rela.plt`), whose entries
//! give the slot each stub reads. The encoder knows both files, so it reads which function
//! each stub and each of those relocations is for, and makes the steps over them move each old
//! one to its function's new one (see `pinned` in `bsdiff`); the decoder only follows the steps.

use super::{
    arm64, machine, sections, segments, u32_at, u64_at, Image, Machine, Section, Tables,
    SHT_DYNSYM, SHT_RELA,
};

/// A stub or a relocation: its file bytes and the name of the symbol it is for.
#[derive(Debug, Clone, Copy)]
struct Named<'a> {
    offset: u64,
    len: u64,
    name: &'a [u8],
}

/// Longest symbol name read; a longer one is not matched.
const MAX_NAME: usize = 4096;
const SHT_STRTAB: u32 = 3;
const SYMBOL_SIZE: u64 = 24;
const RELA_SIZE: u64 = 24;

/// A relocation that names a symbol of a dynamic symbol table.
struct Relocation<'a> {
    /// The address it patches.
    place: u64,
    entry: Named<'a>,
    /// Whether it lies in `.rela.plt`.
    plt: bool,
}

/// Pieces (offset in `old`, offset in `new`, length) that take each stub of `old`'s procedure
/// linkage table (`.plt`, `.plt.sec`, `.plt.got`), and each entry of its `.rela.plt`, to the
/// stub or entry of `new` for the same symbol, joined where consecutive ones stay consecutive;
/// none unless both are x86-64 or AArch64 ELF files with such stubs.
pub(in crate::bsdiff) fn pieces(old: &[u8], new: &[u8]) -> Vec<(u64, u64, u64)> {
    let Some((old_stubs, old_relocations)) = named(old) else {
        return Vec::new();
    };
    let Some((new_stubs, new_relocations)) = named(new) else {
        return Vec::new();
    };
    let mut pieces = matched(old_stubs, new_stubs);
    pieces.extend(matched(old_relocations, new_relocations));
    pieces
}

/// The stubs of `data` (an x86-64 or AArch64 ELF file) that jump through a slot that one
/// relocation names a symbol for, with the first stub of `.plt` (which jumps to the dynamic
/// linker) under an empty name, and the entries of `.rela.plt`; `None` when it has no such stub.
fn named(data: &[u8]) -> Option<(Vec<Named<'_>>, Vec<Named<'_>>)> {
    let machine = machine(data)?;
    let image = Image {
        segments: segments(data)?,
        ..Image::default()
    };
    let sections = sections(data)?;
    let relocations = relocations(data, &sections);
    let mut slots: Vec<(u64, &[u8])> = relocations
        .iter()
        .map(|r| (r.place, r.entry.name))
        .collect();
    slots.sort_unstable();
    // A slot two relocations name is no one's.
    let mut unique: Vec<(u64, &[u8])> = Vec::with_capacity(slots.len());
    for run in slots.chunk_by(|a, b| a.0 == b.0) {
        if let [slot] = run {
            unique.push(*slot);
        }
    }
    let name_of = |slot: u64| -> Option<&[u8]> {
        let at = unique.binary_search_by_key(&slot, |s| s.0).ok()?;
        Some(unique[at].1)
    };
    let mut stubs = Vec::new();
    for section in &sections {
        let Some((header, len)) = stub_layout(machine, section) else {
            continue;
        };
        let end = section.offset + section.len;
        let mut start = section.offset;
        if section.name == b".plt" && header <= section.len {
            stubs.push(Named {
                offset: start,
                len: header,
                name: b"",
            });
            start += header;
        }
        for offset in (start..end).step_by(len as usize) {
            if offset + len > end {
                break;
            }
            if let Some(name) = slot_of(machine, data, &image, offset, len).and_then(name_of) {
                stubs.push(Named { offset, len, name });
            }
        }
    }
    if stubs.iter().all(|s| s.name.is_empty()) {
        return None;
    }
    stubs.sort_unstable_by_key(|s| s.offset);
    let plt = relocations
        .iter()
        .filter(|r| r.plt)
        .map(|r| r.entry)
        .collect();
    Some((stubs, plt))
}

/// Where a machine's linker puts stubs: in `section` (when it holds them), the length of the
/// first stub of `.plt`, which jumps to the dynamic linker, and of the others.
fn stub_layout(machine: Machine, section: &Section<'_>) -> Option<(u64, u64)> {
    match machine {
        // Stubs of the sections' entry size: 16 bytes (`.plt`, `.plt.sec`) or 8 (`.plt.got`).
        Machine::X86_64 if matches!(section.name, b".plt" | b".plt.sec" | b".plt.got") => {
            matches!(section.entsize, 8 | 16).then_some((section.entsize, section.entsize))
        }
        // A header of 32 bytes, then stubs of 16 (GNU ld leaves the entry size 0).
        Machine::Aarch64 if section.name == b".plt" => Some((32, 16)),
        _ => None,
    }
}

/// The slot the stub at file offset `offset` (`len` bytes) jumps through: on x86-64 the
/// address its first `jmp *disp(%rip)` (`ff 25` disp32) reads; on AArch64 the address its
/// first ADRP and the 64-bit LDR after it read.
fn slot_of(machine: Machine, data: &[u8], image: &Image, offset: u64, len: u64) -> Option<u64> {
    let bytes = data.get(offset as usize..(offset + len) as usize)?;
    let vaddr = image.vaddr_of(offset)?;
    match machine {
        Machine::X86_64 => {
            let at = bytes.windows(2).position(|w| w == [0xff, 0x25])? as u64;
            if at + 6 > len {
                return None;
            }
            let disp = i64::from(u32_at(data, offset + at + 2)? as i32);
            vaddr.checked_add(at + 6)?.checked_add_signed(disp)
        }
        Machine::Aarch64 => (0..bytes.len()).step_by(4).find_map(|at| {
            match arm64::decode(&bytes[at..], vaddr + at as u64)? {
                (arm64::Form::Adrp { scale: 3 }, slot) => Some(slot),
                _ => None,
            }
        }),
    }
}

/// Every relocation, of every relocation table, that names a symbol of a dynamic symbol table.
fn relocations<'a>(data: &'a [u8], sections: &[Section<'a>]) -> Vec<Relocation<'a>> {
    let mut relocations = Vec::new();
    for rela in sections.iter().filter(|s| s.kind == SHT_RELA) {
        let Some(symbols) = sections
            .get(rela.link as usize)
            .filter(|s| s.kind == SHT_DYNSYM)
        else {
            continue;
        };
        let Some(strings) = sections
            .get(symbols.link as usize)
            .filter(|s| s.kind == SHT_STRTAB)
        else {
            continue;
        };
        // Sections lie inside the file (see `sections`).
        let names = &data[strings.offset as usize..(strings.offset + strings.len) as usize];
        for at in Tables::entries(rela, RELA_SIZE) {
            let (Some(place), Some(info)) = (u64_at(data, at), u64_at(data, at + 8)) else {
                continue;
            };
            let symbol = info >> 32;
            if symbol == 0 || symbol >= symbols.len / SYMBOL_SIZE {
                continue;
            }
            let Some(name_at) = u32_at(data, symbols.offset + symbol * SYMBOL_SIZE) else {
                continue;
            };
            let Some(rest) = names.get(name_at as usize..) else {
                continue;
            };
            let Some(len) = rest.iter().take(MAX_NAME).position(|&b| b == 0) else {
                continue;
            };
            if len > 0 {
                relocations.push(Relocation {
                    place,
                    entry: Named {
                        offset: at,
                        len: RELA_SIZE,
                        name: &rest[..len],
                    },
                    plt: rela.name == b".rela.plt",
                });
            }
        }
    }
    relocations
}

/// Pieces that take each item of `old` to the item of `new` of the same name and length, in
/// the order of `old`, joined where consecutive items stay consecutive; a name more than one
/// item of a side has is left out.
fn matched(old: Vec<Named<'_>>, mut new: Vec<Named<'_>>) -> Vec<(u64, u64, u64)> {
    new.sort_unstable_by(|a, b| a.name.cmp(b.name));
    let mut old_names: Vec<&[u8]> = old.iter().map(|s| s.name).collect();
    old_names.sort_unstable();
    let mut pieces: Vec<(u64, u64, u64)> = Vec::new();
    for item in &old {
        let first = old_names.partition_point(|n| *n < item.name);
        if old_names[first..]
            .iter()
            .take_while(|n| **n == item.name)
            .count()
            != 1
        {
            continue;
        }
        let first = new.partition_point(|s| s.name < item.name);
        if new[first..]
            .iter()
            .take_while(|s| s.name == item.name)
            .count()
            != 1
        {
            continue;
        }
        let n = &new[first];
        if n.len != item.len {
            continue;
        }
        match pieces.last_mut() {
            Some(last) if last.0 + last.2 == item.offset && last.1 + last.2 == n.offset => {
                last.2 += item.len;
            }
            _ => pieces.push((item.offset, n.offset, item.len)),
        }
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::super::tests::fixture;
    use super::*;

    /// The library of `elf-2.gen.py` calls one more import in its new version: every old stub
    /// and `.rela.plt` entry is matched, those before the new import's move with their section
    /// and those after by one more stub (entry); for x86-64 and AArch64.
    #[test]
    fn stubs_and_their_relocations_are_matched_by_symbol() {
        for machine in ["", ".arm64"] {
            let old = fixture(&format!("elf-2{machine}.old.so"));
            let new = fixture(&format!("elf-2{machine}.new.so"));
            let pieces = pieces(&old, &new);
            for (name, size) in [(&b".plt"[..], 16), (b".rela.plt", 24)] {
                let (old_at, old_len) = section(&old, name);
                let (new_at, new_len) = section(&new, name);
                assert_eq!(new_len, old_len + size, "one more stub (entry)");
                let inside: Vec<(u64, u64, u64)> = pieces
                    .iter()
                    .copied()
                    .filter(|p| (old_at..old_at + old_len).contains(&p.0))
                    .collect();
                // A run may go on into the next section (`.plt.got` after `.plt`).
                let covered = |p: &(u64, u64, u64)| (p.0 + p.2).min(old_at + old_len) - p.0;
                assert_eq!(
                    inside.iter().map(covered).sum::<u64>(),
                    old_len,
                    "{inside:?}"
                );
                let [before, after] = inside[..] else {
                    panic!("{machine}: two runs expected: {inside:?}");
                };
                let delta = |p: (u64, u64, u64)| p.1 as i64 - p.0 as i64;
                assert_eq!(delta(before), new_at as i64 - old_at as i64);
                assert_eq!(delta(after), delta(before) + size as i64);
                assert!(after.1 + after.2 >= new_at + new_len);
            }
        }
    }

    /// The file range of the section `name` of the ELF file `data`.
    fn section(data: &[u8], name: &[u8]) -> (u64, u64) {
        let sections = sections(data).expect("an ELF file");
        let found = sections
            .iter()
            .find(|s| s.name == name)
            .expect("the section");
        (found.offset, found.len)
    }

    #[test]
    fn garbage_and_damaged_files_have_no_stubs_or_do_not_panic() {
        assert!(pieces(b"", b"").is_empty());
        assert!(pieces(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0], &[0; 64]).is_empty());
        let mut header = vec![0u8; 64];
        header[..6].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1]);
        header[0x12] = 62;
        // Section headers far past the end of the file.
        header[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        header[0x3a] = 64;
        header[0x3c] = 3;
        assert!(pieces(&header, &header).is_empty());
        // Every byte of the section headers, and of the tables and stubs read, damaged in turn.
        for machine in ["", ".arm64"] {
            let old = fixture(&format!("elf-2{machine}.old.so"));
            let new = fixture(&format!("elf-2{machine}.new.so"));
            let shoff = u64::from_le_bytes(old[0x28..0x30].try_into().expect("8 bytes")) as usize;
            let (symbols, _) = section(&old, b".dynsym");
            let (relocations, len) = section(&old, b".rela.plt");
            let (plt, plt_len) = section(&old, b".plt");
            let tables = (symbols..relocations + len).step_by(5);
            let stubs = (plt..plt + plt_len + 8).step_by(3);
            let damaged = (shoff..old.len()).chain(tables.chain(stubs).map(|at| at as usize));
            for (i, at) in damaged.enumerate() {
                let mut bad = old.clone();
                bad[at] ^= [0xff, 0x80, 0x01, 0x10][i % 4];
                pieces(&bad, &new);
                pieces(&new, &bad);
            }
        }
    }
}
