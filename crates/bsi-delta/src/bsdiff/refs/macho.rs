//! The layout of a 64-bit Mach-O file for x86-64 or arm64, thin or universal (one slice per
//! architecture, as macOS ships its libraries): its segments and its code sections, so that the
//! code is scanned for references as in an ELF file.
//!
//! Each slice has its own address space, from 0 for a library; slice `i`'s addresses are
//! moved up by `i << 40` here so that the image's segments do not overlap. Only references
//! relative to their site are found in Mach-O code (branches, PC-relative operands, ADRP), and
//! for those the shift cancels out. Data pointers are read where the slice's rebase opcodes
//! (`LC_DYLD_INFO`) say they are: there the file holds plain addresses (a slice whose pointers
//! are chained fixups, as macOS 12 and later write them, has no rebase opcodes, and its pointers
//! are not read). The entries of its symbol table for symbols defined in a section hold their
//! addresses too.

use super::{u32_at, u64_at, Machine, Segment};

pub(in crate::bsdiff) const MH_MAGIC_64: u32 = 0xfeed_facf;
pub(super) const FAT_MAGIC: u32 = 0xcafe_babe;
pub(super) const FAT_MAGIC_64: u32 = 0xcafe_babf;
const CPU_TYPE_X86_64: u32 = 0x0100_0007;
const CPU_TYPE_ARM64: u32 = 0x0100_000c;
const LC_SEGMENT_64: u32 = 0x19;
const LC_SYMTAB: u32 = 0x2;
/// An `nlist_64` entry: its type byte, and its value, an address where the type says so.
const NLIST_LEN: u64 = 16;
const N_TYPE_AT: u64 = 4;
const N_VALUE_AT: u64 = 8;
/// Type bits: a debugging entry (any of `N_STAB`), or a symbol defined in a section (`N_SECT`
/// under `N_TYPE`), whose value is its address.
const N_STAB: u8 = 0xe0;
const N_TYPE: u8 = 0x0e;
const N_SECT: u8 = 0x0e;
/// Most symbol values read, over all slices.
const MAX_SYMBOLS: usize = 1 << 20;
const LC_DYLD_INFO: u32 = 0x22;
const LC_DYLD_INFO_ONLY: u32 = 0x8000_0022;
const SEGMENT_LEN: u64 = 72;
const SECTION_LEN: u64 = 80;
/// Section attributes of code.
const S_ATTR_PURE_INSTRUCTIONS: u32 = 0x8000_0000;
const S_ATTR_SOME_INSTRUCTIONS: u32 = 0x400;
/// Section types that hold no file bytes (`S_ZEROFILL`, `S_GB_ZEROFILL`,
/// `S_THREAD_LOCAL_ZEROFILL`).
const ZEROFILL: [u32; 3] = [0x1, 0xc, 0x12];
/// Bounds on what is read, so that a hostile header costs nothing.
const MAX_SLICES: u64 = 8;
const MAX_COMMANDS: u32 = 4096;
const MAX_SECTIONS: u32 = 1024;
/// Bits by which slice `i`'s addresses are moved: `i << SLICE_SHIFT` (a multiple of ADRP's
/// 4 KiB pages).
pub(crate) const SLICE_SHIFT: u32 = 40;

/// A section of one slice, its file range (offsets in the whole file) inside the file.
#[derive(Debug, Clone, Copy)]
pub(super) struct Section<'a> {
    /// The slice (architecture) it belongs to, counted in file order.
    pub slice: usize,
    pub segment: &'a [u8],
    pub name: &'a [u8],
    pub offset: u64,
    pub len: u64,
    pub code: bool,
}

/// What a Mach-O file is made of: its slices' machines, segments and sections.
#[derive(Debug, Default)]
pub(super) struct Layout<'a> {
    /// The machine of each slice that is read, in file order.
    pub machines: Vec<Machine>,
    pub segments: Vec<Segment>,
    pub sections: Vec<Section<'a>>,
    /// File offsets of the 64-bit pointers the rebase opcodes name, with their slice.
    pub pointers: Vec<(u64, usize)>,
    /// File offsets of the values of the symbols defined in a section (`LC_SYMTAB`), which are
    /// addresses, with their slice.
    pub symbols: Vec<(u64, usize)>,
}

fn u32_be(data: &[u8], at: u64) -> Option<u32> {
    u32_at(data, at).map(u32::swap_bytes)
}

fn u64_be(data: &[u8], at: u64) -> Option<u64> {
    u64_at(data, at).map(u64::swap_bytes)
}

/// The layout of `data` when it is a Mach-O file this module reads; `None` otherwise.
pub(super) fn layout(data: &[u8]) -> Option<Layout<'_>> {
    let mut layout = Layout::default();
    for (offset, len) in slices(data)? {
        let index = layout.machines.len();
        if let Some(machine) = read_slice(data, offset, len, index, &mut layout) {
            layout.machines.push(machine);
        }
    }
    (!layout.machines.is_empty()).then_some(layout)
}

/// The (offset, length) of each slice: the whole file when it is thin.
pub(in crate::bsdiff) fn slices(data: &[u8]) -> Option<Vec<(u64, u64)>> {
    if u32_at(data, 0)? == MH_MAGIC_64 {
        return Some(vec![(0, data.len() as u64)]);
    }
    let (wide, entry_len) = match u32_be(data, 0)? {
        FAT_MAGIC => (false, 20),
        FAT_MAGIC_64 => (true, 32),
        _ => return None,
    };
    // Java class files share the magic; their version makes a count over the bound.
    let count = u64::from(u32_be(data, 4)?);
    if count == 0 || count > MAX_SLICES {
        return None;
    }
    let mut slices = Vec::new();
    for i in 0..count {
        let at = 8 + i * entry_len;
        let (offset, len) = match wide {
            false => (
                u64::from(u32_be(data, at + 8)?),
                u64::from(u32_be(data, at + 12)?),
            ),
            true => (u64_be(data, at + 8)?, u64_be(data, at + 16)?),
        };
        if offset
            .checked_add(len)
            .is_some_and(|end| end <= data.len() as u64)
        {
            slices.push((offset, len));
        }
    }
    Some(slices)
}

/// Read the slice at `base` (`len` bytes), the `index`th one read, into `layout`; its machine,
/// or `None` (and nothing added) when it is not a 64-bit x86-64 or arm64 Mach-O.
fn read_slice<'a>(
    data: &'a [u8],
    base: u64,
    len: u64,
    index: usize,
    layout: &mut Layout<'a>,
) -> Option<Machine> {
    if u32_at(data, base)? != MH_MAGIC_64 {
        return None;
    }
    let machine = match u32_at(data, base + 4)? {
        CPU_TYPE_X86_64 => Machine::X86_64,
        CPU_TYPE_ARM64 => Machine::Aarch64,
        _ => return None,
    };
    let (commands, commands_len) = (
        u32_at(data, base + 16)?,
        u64::from(u32_at(data, base + 20)?),
    );
    let end = (base + 32).checked_add(commands_len)?.min(base + len);
    let shift = (index as u64) << SLICE_SHIFT;
    let (mut segments, mut sections) = (Vec::new(), Vec::new());
    // Every segment command's (file offset, file size), for the rebase opcodes' indexes.
    let mut commands_seen = Vec::new();
    let mut rebase_info = None;
    let mut at = base + 32;
    for _ in 0..commands.min(MAX_COMMANDS) {
        let (Some(cmd), Some(size)) = (u32_at(data, at), u32_at(data, at + 4)) else {
            break;
        };
        let size = u64::from(size);
        if size < 8 || at + size > end {
            break;
        }
        if cmd == LC_SYMTAB && size >= 24 {
            let (symoff, nsyms) = (
                u64::from(u32_at(data, at + 8)?),
                u64::from(u32_at(data, at + 12)?),
            );
            symbols(
                data,
                (base, len),
                (symoff, nsyms),
                index,
                &mut layout.symbols,
            );
        }
        if matches!(cmd, LC_DYLD_INFO | LC_DYLD_INFO_ONLY) && size >= 16 {
            rebase_info = Some((
                u64::from(u32_at(data, at + 8)?),
                u64::from(u32_at(data, at + 12)?),
            ));
        }
        if cmd == LC_SEGMENT_64 && size >= SEGMENT_LEN {
            // A segment whose bytes leave the slice has none the opcodes may name.
            let (fileoff, filesize) = (u64_at(data, at + 40)?, u64_at(data, at + 48)?);
            let inside = fileoff.checked_add(filesize).is_some_and(|e| e <= len);
            commands_seen.push(if inside { (fileoff, filesize) } else { (0, 0) });
            segment(data, (base, len), at, shift, &mut segments);
            let count = u32_at(data, at + 64)?.min(MAX_SECTIONS);
            for k in 0..u64::from(count) {
                let header = at + SEGMENT_LEN + k * SECTION_LEN;
                if header + SECTION_LEN > at + size {
                    break;
                }
                if let Some(section) = section(data, (base, len), header, index) {
                    sections.push(section);
                }
            }
        }
        at += size;
    }
    if let Some(info) = rebase_info {
        rebases(
            data,
            (base, len),
            &commands_seen,
            info,
            index,
            &mut layout.pointers,
        );
    }
    layout.segments.extend(segments);
    layout.sections.extend(sections);
    Some(machine)
}

/// Push the file offset of the value of every symbol defined in a section among the `nsyms`
/// entries at `symoff` of the slice (`base`, `len`), with the slice `slice`; entries that leave
/// the slice end the table.
fn symbols(
    data: &[u8],
    (base, len): (u64, u64),
    (symoff, nsyms): (u64, u64),
    slice: usize,
    symbols: &mut Vec<(u64, usize)>,
) {
    let room = len.saturating_sub(symoff) / NLIST_LEN;
    for i in 0..nsyms.min(room) {
        if symbols.len() >= MAX_SYMBOLS {
            return;
        }
        let entry = base + symoff + i * NLIST_LEN;
        let Some(&kind) = data.get((entry + N_TYPE_AT) as usize) else {
            return;
        };
        if kind & N_STAB == 0 && kind & N_TYPE == N_SECT {
            symbols.push((entry + N_VALUE_AT, slice));
        }
    }
}

/// Most pointers read from rebase opcodes, over all slices.
const MAX_POINTERS: usize = 1 << 20;

/// Run the rebase opcodes at `off..off + size` of the slice (`base`, `len`), whose segment
/// commands are `segments` (file offset and size, in order), and push the file offset of every
/// 64-bit pointer they rebase, with the slice `slice`. Opcodes that make no sense end the run.
fn rebases(
    data: &[u8],
    (base, len): (u64, u64),
    segments: &[(u64, u64)],
    (off, size): (u64, u64),
    slice: usize,
    out: &mut Vec<(u64, usize)>,
) -> Option<()> {
    const POINTER: u8 = 1;
    if off.checked_add(size)? > len {
        return None;
    }
    let start = usize::try_from(base + off).ok()?;
    let opcodes = data.get(start..start.checked_add(usize::try_from(size).ok()?)?)?;
    let mut i = 0usize;
    let uleb = |i: &mut usize| -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *opcodes.get(*i)?;
            *i += 1;
            value |= u64::from(byte & 0x7f).checked_shl(shift)?;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    };
    let (mut kind, mut segment, mut offset) = (0u8, None::<(u64, u64)>, 0u64);
    // Rebase the pointer at the current place and move past it and `skip` more bytes; `None`
    // once the place leaves its segment or enough pointers were read.
    let rebase = |offset: &mut u64,
                  skip: u64,
                  kind: u8,
                  segment: Option<(u64, u64)>,
                  out: &mut Vec<(u64, usize)>|
     -> Option<()> {
        let (file_offset, file_size) = segment?;
        if out.len() >= MAX_POINTERS || offset.checked_add(8)? > file_size {
            return None;
        }
        if kind == POINTER {
            out.push((base + file_offset + *offset, slice));
        }
        *offset = offset.checked_add(8)?.checked_add(skip)?;
        Some(())
    };
    while let Some(&byte) = opcodes.get(i) {
        i += 1;
        let imm = byte & 0x0f;
        match byte & 0xf0 {
            0x00 => break,
            0x10 => kind = imm,
            0x20 => {
                segment = segments.get(usize::from(imm)).copied();
                offset = uleb(&mut i)?;
            }
            0x30 => offset = offset.wrapping_add(uleb(&mut i)?),
            0x40 => offset = offset.checked_add(u64::from(imm) * 8)?,
            0x50 => {
                for _ in 0..imm {
                    rebase(&mut offset, 0, kind, segment, out)?;
                }
            }
            0x60 => {
                for _ in 0..uleb(&mut i)? {
                    rebase(&mut offset, 0, kind, segment, out)?;
                }
            }
            0x70 => {
                let skip = uleb(&mut i)?;
                rebase(&mut offset, skip, kind, segment, out)?;
            }
            0x80 => {
                let (count, skip) = (uleb(&mut i)?, uleb(&mut i)?);
                for _ in 0..count {
                    rebase(&mut offset, skip, kind, segment, out)?;
                }
            }
            _ => break,
        }
    }
    Some(())
}

/// The segment whose `LC_SEGMENT_64` command is at `at`, when it holds file bytes inside its
/// slice (`base`, `len`) and its addresses, moved by `shift`, do not wrap.
fn segment(
    data: &[u8],
    (base, len): (u64, u64),
    at: u64,
    shift: u64,
    segments: &mut Vec<Segment>,
) -> Option<()> {
    let (vmaddr, vmsize) = (u64_at(data, at + 24)?, u64_at(data, at + 32)?);
    let (fileoff, filesize) = (u64_at(data, at + 40)?, u64_at(data, at + 48)?);
    let in_slice = fileoff.checked_add(filesize).is_some_and(|e| e <= len);
    let vaddr = vmaddr.checked_add(shift)?;
    if filesize == 0 || !in_slice || filesize > vmsize || vaddr.checked_add(vmsize).is_none() {
        return None;
    }
    segments.push(Segment {
        offset: base + fileoff,
        vaddr,
        file_len: filesize,
        mem_len: vmsize,
    });
    Some(())
}

/// The section whose header is at `header`, when its bytes lie inside its slice.
fn section(data: &[u8], (base, len): (u64, u64), header: u64, slice: usize) -> Option<Section<'_>> {
    let name = |at: u64| -> Option<&[u8]> {
        let bytes = data.get(at as usize..at as usize + 16)?;
        Some(bytes.split(|&b| b == 0).next().unwrap_or(&[]))
    };
    let size = u64_at(data, header + 40)?;
    let offset = u64::from(u32_at(data, header + 48)?);
    let flags = u32_at(data, header + 64)?;
    let size = if ZEROFILL.contains(&(flags & 0xff)) {
        0
    } else {
        size
    };
    if offset.checked_add(size)? > len {
        return None;
    }
    Some(Section {
        slice,
        segment: name(header + 16)?,
        name: name(header)?,
        offset: base + offset,
        len: size,
        code: flags & (S_ATTR_PURE_INSTRUCTIONS | S_ATTR_SOME_INSTRUCTIONS) != 0,
    })
}

/// [`super::same_sections`] of two Mach-O files: sections of the same slice, segment and name.
pub(super) fn same_sections(
    old: &Layout<'_>,
    new: &Layout<'_>,
    starts: bool,
) -> Vec<(u64, u64, u64)> {
    old.sections
        .iter()
        .filter(|o| o.len > 0)
        .filter_map(|o| {
            let n = new
                .sections
                .iter()
                .find(|n| (n.slice, n.segment, n.name) == (o.slice, o.segment, o.name))?;
            let data = !o.code;
            (n.len == o.len || (starts && data && n.len > 0)).then_some((
                o.offset,
                n.offset,
                o.len.min(n.len),
            ))
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::{scan, tests::check_values, Kind, Version};
    use super::*;

    fn put(data: &mut Vec<u8>, at: usize, bytes: &[u8]) {
        if data.len() < at + bytes.len() {
            data.resize(at + bytes.len(), 0);
        }
        data[at..at + bytes.len()].copy_from_slice(bytes);
    }

    /// A minimal 64-bit Mach-O library for `cpu` (`CPU_TYPE_X86_64` or `CPU_TYPE_ARM64`):
    /// `code` as its `__TEXT,__text` at 0x1000, then a `__DATA,__const` holding `pointers`,
    /// which its rebase opcodes name. File offsets equal addresses.
    pub(crate) fn macho(cpu: u32, code: &[u8], pointers: &[u64]) -> Vec<u8> {
        let text_len = (0x1000 + code.len()).next_multiple_of(0x1000);
        let data_len = (8 * pointers.len()).next_multiple_of(0x1000).max(0x1000);
        let rebase_at = text_len + data_len;
        let mut rebase = vec![0x11, 0x21, 0x00, 0x60];
        let mut n = pointers.len() as u64;
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            rebase.push(if n == 0 { byte } else { byte | 0x80 });
            if n == 0 {
                break;
            }
        }
        rebase.push(0x00);
        let mut data = Vec::new();
        let commands = [72 + 80, 72 + 80, 48];
        let u32s = |data: &mut Vec<u8>, at: usize, values: &[u32]| {
            for (i, v) in values.iter().enumerate() {
                put(data, at + 4 * i, &v.to_le_bytes());
            }
        };
        let u64s = |data: &mut Vec<u8>, at: usize, values: &[u64]| {
            for (i, v) in values.iter().enumerate() {
                put(data, at + 8 * i, &v.to_le_bytes());
            }
        };
        let sizeofcmds: u32 = commands.iter().sum();
        u32s(&mut data, 0, &[MH_MAGIC_64, cpu, 3, 6, 3, sizeofcmds, 0, 0]);
        let mut at = 32;
        for (segment, section, start, len, flags) in [
            (&b"__TEXT"[..], &b"__text"[..], 0, text_len, 0x8000_0400u32),
            (b"__DATA", b"__const", text_len, data_len, 0),
        ] {
            u32s(&mut data, at, &[LC_SEGMENT_64, 72 + 80]);
            put(&mut data, at + 8, segment);
            u64s(
                &mut data,
                at + 24,
                &[start as u64, len as u64, start as u64, len as u64],
            );
            u32s(&mut data, at + 56, &[5, 5, 1, 0]);
            let header = at + 72;
            put(&mut data, header, section);
            put(&mut data, header + 16, segment);
            let (addr, size) = match flags {
                0 => (start, 8 * pointers.len()),
                _ => (0x1000, code.len()),
            };
            u64s(&mut data, header + 32, &[addr as u64, size as u64]);
            u32s(&mut data, header + 48, &[addr as u32, 4, 0, 0, flags]);
            at += 72 + 80;
        }
        u32s(&mut data, at, &[LC_DYLD_INFO_ONLY, 48, 0, 0]);
        u32s(&mut data, at + 8, &[rebase_at as u32, rebase.len() as u32]);
        put(&mut data, 0x1000, code);
        for (i, p) in pointers.iter().enumerate() {
            put(&mut data, text_len + 8 * i, &p.to_le_bytes());
        }
        put(&mut data, rebase_at, &rebase);
        data
    }

    /// `file` (from [`macho`]) with a symbol table at its end, in a `__LINKEDIT` segment: an
    /// entry of type `kind` and value `value` for each of `symbols`.
    pub(crate) fn with_symbols(file: &[u8], symbols: &[(u8, u64)]) -> Vec<u8> {
        let mut data = file.to_vec();
        let u32_le = |data: &[u8], at: usize| {
            u32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes"))
        };
        let (ncmds, sizeofcmds) = (u32_le(&data, 16), u32_le(&data, 20));
        let command = 32 + sizeofcmds as usize;
        assert!(
            command + 72 + 24 <= 0x1000,
            "room for __LINKEDIT and LC_SYMTAB"
        );
        let symoff = data.len().next_multiple_of(8);
        let mut table = Vec::new();
        for (k, &(kind, value)) in symbols.iter().enumerate() {
            table.extend_from_slice(&(k as u32 + 1).to_le_bytes());
            table.extend_from_slice(&[kind, 1, 0, 0]);
            table.extend_from_slice(&value.to_le_bytes());
        }
        put(&mut data, symoff, &table);
        let strings = vec![b'_'; symbols.len() + 1];
        let stroff = data.len();
        put(&mut data, stroff, &strings);
        for (k, v) in [
            LC_SYMTAB,
            24,
            symoff as u32,
            symbols.len() as u32,
            stroff as u32,
            strings.len() as u32,
        ]
        .iter()
        .enumerate()
        {
            put(&mut data, command + 72 + 4 * k, &v.to_le_bytes());
        }
        // __LINKEDIT, whose file offsets are its addresses, as the other segments' are.
        let linkedit = [symoff as u64, (data.len() - symoff) as u64];
        put(&mut data, command, &LC_SEGMENT_64.to_le_bytes());
        put(&mut data, command + 4, &72u32.to_le_bytes());
        put(&mut data, command + 8, b"__LINKEDIT");
        for (k, v) in [linkedit[0], linkedit[1], linkedit[0], linkedit[1]]
            .iter()
            .enumerate()
        {
            put(&mut data, command + 24 + 8 * k, &v.to_le_bytes());
        }
        put(&mut data, command + 56, &[1, 0, 0, 0, 1, 0, 0, 0]);
        put(&mut data, 16, &(ncmds + 2).to_le_bytes());
        put(&mut data, 20, &(sizeofcmds + 72 + 24).to_le_bytes());
        data
    }

    /// A universal file of `slices` (cpu type, thin file), each at a multiple of 16 KiB.
    pub(crate) fn universal(slices: &[(u32, Vec<u8>)]) -> Vec<u8> {
        let mut data = Vec::new();
        put(&mut data, 0, &FAT_MAGIC.to_be_bytes());
        put(&mut data, 4, &(slices.len() as u32).to_be_bytes());
        let mut offset = 0x4000;
        for (i, (cpu, slice)) in slices.iter().enumerate() {
            let entry = 8 + 20 * i;
            for (k, v) in [*cpu, 0, offset as u32, slice.len() as u32, 14]
                .iter()
                .enumerate()
            {
                put(&mut data, entry + 4 * k, &v.to_be_bytes());
            }
            put(&mut data, offset, slice);
            offset = (offset + slice.len()).next_multiple_of(0x4000);
        }
        data
    }

    /// A universal file of two x86-64 slices (as `x86_64` and `x86_64h`), each with `code`.
    pub(crate) fn universal_x86(code: &[u8]) -> Vec<u8> {
        let slice = macho(CPU_TYPE_X86_64, code, &[]);
        universal(&[(CPU_TYPE_X86_64, slice.clone()), (CPU_TYPE_X86_64, slice)])
    }

    /// A universal file of an x86-64 slice with `x86_code` and an arm64 one with `arm64_code`.
    pub(crate) fn universal_x86_arm64(x86_code: &[u8], arm64_code: &[u8]) -> Vec<u8> {
        universal(&[
            (CPU_TYPE_X86_64, macho(CPU_TYPE_X86_64, x86_code, &[])),
            (CPU_TYPE_ARM64, macho(CPU_TYPE_ARM64, arm64_code, &[])),
        ])
    }

    /// x86-64 code: a `call` to the start of the code every 16 bytes, nops in between.
    fn x86_calls(count: usize) -> Vec<u8> {
        let mut code = Vec::new();
        for k in 0..count {
            let disp = -((16 * k + 5) as i32);
            code.push(0xe8);
            code.extend_from_slice(&disp.to_le_bytes());
            code.extend_from_slice(&[0x90; 11]);
        }
        code
    }

    /// AArch64 code: a `bl` to the start of the code every other instruction, nops between.
    fn arm64_calls(count: usize) -> Vec<u8> {
        let mut code = Vec::new();
        for k in 0..count {
            let words = -(2 * k as i32);
            let bl = 0x9400_0000u32 | (words as u32 & 0x03ff_ffff);
            code.extend_from_slice(&bl.to_le_bytes());
            code.extend_from_slice(&0xd503_201fu32.to_le_bytes());
        }
        code
    }

    /// Symbols defined in a section have addresses for values: found from predictor 3 on.
    /// Debugging entries, undefined symbols and values outside the segments are not.
    #[test]
    fn finds_the_values_of_defined_symbols() {
        let file = macho(CPU_TYPE_ARM64, &arm64_calls(100), &[]);
        let defined: Vec<(u8, u64)> = (0..50).map(|k| (0x0f, 0x1000 + 8 * k)).collect();
        let mut symbols = defined.clone();
        symbols.extend([(0x24, 0x1010), (0x01, 0x1020), (0x0f, 0x50_0000), (0x0e, 0)]);
        let data = with_symbols(&file, &symbols);
        let image = scan(&data, Version::Symbols);
        let found = layout(&data).expect("a Mach-O file");
        assert_eq!(
            found.symbols.len(),
            52,
            "defined in a section, stabs and undefined left"
        );
        let values: Vec<u64> = image
            .refs
            .iter()
            .filter(|r| r.kind == Kind::Abs64)
            .map(|r| r.target)
            .collect();
        assert_eq!(values, defined.iter().map(|d| d.1).collect::<Vec<_>>());
        for r in image.refs.iter().filter(|r| r.kind == Kind::Abs64) {
            let at = r.site as usize;
            assert_eq!(
                data[at..at + 8],
                r.target.to_le_bytes(),
                "the value is the address"
            );
        }
        assert!(image.has_symbols());
        let before = scan(&data, Version::SplitPairs);
        assert!(!before.has_symbols());
        assert_eq!(before.refs.len() + 50, image.refs.len());
        assert!(before.refs.iter().all(|r| r.kind != Kind::Abs64));
        // A table that says it runs past the file ends there.
        let mut cut = data.clone();
        let n = cut.len();
        cut.truncate(n - 100);
        assert!(layout(&cut).expect("a Mach-O file").symbols.len() < 52);
    }

    #[test]
    fn finds_the_code_and_pointers_of_a_thin_file() {
        let pointers: Vec<u64> = (0..100).map(|k| 0x1000 + 16 * k).collect();
        let data = macho(CPU_TYPE_X86_64, &x86_calls(200), &pointers);
        let image = scan(&data, Version::SplitPairs);
        check_values(&data, &image);
        assert!(super::super::may_hold_refs(&data));
        let count = |f: &dyn Fn(&Kind) -> bool| image.refs.iter().filter(|r| f(&r.kind)).count();
        assert_eq!(count(&|k| matches!(k, Kind::Rel32 { .. })), 200);
        assert_eq!(count(&|k| *k == Kind::Abs64), 100);
    }

    #[test]
    fn each_slice_of_a_universal_file_has_its_own_addresses() {
        let pointers: Vec<u64> = (0..50).map(|k| 0x1000 + 8 * k).collect();
        let data = universal(&[
            (
                CPU_TYPE_X86_64,
                macho(CPU_TYPE_X86_64, &x86_calls(100), &pointers),
            ),
            (
                CPU_TYPE_ARM64,
                macho(CPU_TYPE_ARM64, &arm64_calls(300), &pointers),
            ),
        ]);
        let image = scan(&data, Version::SplitPairs);
        check_values(&data, &image);
        assert!(super::super::may_hold_refs(&data));
        let count = |f: &dyn Fn(&Kind) -> bool| image.refs.iter().filter(|r| f(&r.kind)).count();
        assert_eq!(count(&|k| matches!(k, Kind::Rel32 { .. })), 100);
        assert_eq!(count(&|k| matches!(k, Kind::Arm64(_))), 300);
        assert_eq!(count(&|k| *k == Kind::Abs64), 50);
        assert_eq!(count(&|k| *k == Kind::Shifted64 { slice: 1 }), 50);
        // Every target lies in its own slice's addresses.
        for r in &image.refs {
            let slice = usize::from(r.site >= 0x4000 + 0x3000);
            assert_eq!(r.target >> SLICE_SHIFT, slice as u64, "{r:?}");
        }
    }

    #[test]
    fn other_files_and_hostile_headers_have_no_layout() {
        // A Java class file starts with the universal magic.
        let mut class = vec![0xca, 0xfe, 0xba, 0xbe, 0, 0, 0, 0x34];
        class.resize(4096, 0);
        assert!(layout(&class).is_none());
        assert!(layout(b"\xcf\xfa\xed\xfe").is_none());
        let good = macho(CPU_TYPE_X86_64, &x86_calls(50), &[0x1000; 20]);
        // Damage anywhere in the headers and the rebase opcodes: never a panic, never a
        // reference outside the file.
        for at in (0..400).chain(good.len() - 8..good.len()) {
            for byte in [0x00, 0x7f, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[at] = byte;
                let image = scan(&bad, Version::SplitPairs);
                assert!(image
                    .refs
                    .iter()
                    .all(|r| r.site + r.width() <= bad.len() as u64));
                assert!(image.refs.is_empty() || super::super::may_hold_refs(&bad));
            }
        }
    }

    /// Rebase opcodes that repeat without end stop at the end of their segment, or at once
    /// where the segment claims more than the file holds.
    #[test]
    fn endless_rebase_opcodes_stop() {
        let mut data = macho(CPU_TYPE_X86_64, &x86_calls(10), &[0x1000; 4]);
        let info = 32 + 2 * (72 + 80);
        let rebase_at = u32::from_le_bytes(data[info + 8..info + 12].try_into().expect("4 bytes"));
        for (kind, pointers) in [(0x11, 0x1000 / 8), (0x12, 0)] {
            // SET_TYPE_IMM, segment 1 from 0, DO_REBASE_ULEB_TIMES 2^62.
            let mut opcodes = vec![kind, 0x21, 0x00, 0x60];
            opcodes.extend_from_slice(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x40]);
            put(&mut data, rebase_at as usize, &opcodes);
            put(&mut data, info + 12, &(opcodes.len() as u32).to_le_bytes());
            let layout = layout(&data).expect("a Mach-O file");
            assert_eq!(layout.pointers.len(), pointers);
        }
        // The data segment claiming far more than the file.
        put(&mut data, 32 + 72 + 80 + 48, &(1u64 << 60).to_le_bytes());
        assert!(layout(&data).expect("a Mach-O file").pointers.is_empty());
    }
}
