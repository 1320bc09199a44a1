//! References in an x86-64 or AArch64 ELF or Mach-O file: the places whose bytes are an address
//! or a distance to an address, found in the old file alone so that the decoder finds the same
//! ones.
//!
//! When code moves between two builds, every reference that crosses the move changes although
//! nothing it means has: a call's displacement grows by the bytes inserted between the call and
//! its callee. The predictor (see `predict`) rewrites each reference of the old file to point
//! where its target went in the new file, so that the diff of a moved reference is zero. This
//! module only finds them; it never fails: a file it cannot read has no references.
//!
//! Found here:
//! - in executable sections, instructions that refer to an address (`x86`, `arm64`);
//! - relocations (`SHT_RELA`): the address each one patches, its addend when that is an address
//!   (relative and indirect relocations), and the pointer stored at the patched place;
//! - symbol values (`.dynsym`, `.symtab`) and the address entries of `.dynamic`;
//! - unwind tables: `.eh_frame_hdr`'s pointer and search table, and in `.eh_frame` each FDE's
//!   CIE pointer, start address and LSDA pointer, and each CIE's personality pointer, where
//!   they are 32-bit PC-relative (as GCC and Clang write them);
//! - on x86-64, switch tables: 32-bit offsets from a table that code loads with `lea`.
//!
//! In a Mach-O file (thin or universal, see `macho`), the code of each slice and its switch
//! tables, the pointers its rebase opcodes name, and (from [`Version::Symbols`] on) the values
//! of its symbols.

mod arm64;
mod macho;
mod plt;
mod x86;

pub(crate) use x86::rip_relative;

pub(super) use arm64::{encode as arm64_encode, Form as Arm64};
pub(super) use macho::{slices as macho_slices, MH_MAGIC_64, SLICE_SHIFT};
pub(super) use plt::pieces as plt_pieces;

/// How the bytes at a reference's site relate to its target (all addresses are virtual).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// A signed 32-bit distance from a point `k` bytes after the site: `target - (site + k)`
    /// (an instruction's displacement: `k` is 4 plus the bytes of immediate after it).
    Rel32 { k: u8 },
    /// A signed 32-bit distance back from the site: `site - target` (an FDE's CIE pointer).
    Back32,
    /// A signed 32-bit distance from a fixed address: `target - base`, `base` being the
    /// image's [`bases`](Image::bases)`[base]` (an index, so that a reference takes 24 bytes).
    Based32 { base: u32 },
    /// A 64-bit address: `target`.
    Abs64,
    /// A 64-bit address in the address space of slice `slice` of a universal Mach-O file,
    /// whose addresses the image moves up (see `macho`): `target - (slice << 40)`.
    Shifted64 { slice: u8 },
    /// An AArch64 instruction (or ADRP pair) whose immediate is a distance from the site.
    Arm64(Arm64),
}

/// One reference of the old file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Ref {
    /// File offset of the reference's bytes.
    pub site: u64,
    pub kind: Kind,
    /// Virtual address it refers to.
    pub target: u64,
}

impl Ref {
    /// Bytes the reference occupies.
    pub fn width(&self) -> u64 {
        match self.kind {
            Kind::Abs64 | Kind::Shifted64 { .. } => 8,
            Kind::Rel32 { .. } | Kind::Back32 | Kind::Based32 { .. } => 4,
            Kind::Arm64(form) => form.width(),
        }
    }
}

/// A loaded segment: file bytes `offset..offset + file_len` at `vaddr`, `mem_len` in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Segment {
    pub offset: u64,
    pub vaddr: u64,
    pub file_len: u64,
    pub mem_len: u64,
}

/// The layout of an ELF file and the references found in it.
#[derive(Debug, Default)]
pub(super) struct Image {
    pub segments: Vec<Segment>,
    /// Sorted by site; sites do not overlap.
    pub refs: Vec<Ref>,
    /// The addresses [`Kind::Based32`] references count from.
    pub bases: Vec<u64>,
    /// Whether symbol values are among the references (see [`Image::has_symbols`]).
    pub symbols: bool,
    /// Whether a [`Version::Wide`] scan kept what a [`Version::Symbols`] one would not (see
    /// [`Image::is_wide`]).
    pub wide: bool,
}

impl Image {
    /// The virtual address of file offset `offset`, through the segment holding it.
    pub fn vaddr_of(&self, offset: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|s| s.offset <= offset && offset - s.offset < s.file_len)
            .map(|s| s.vaddr + (offset - s.offset))
    }

    /// Whether some of its references are the values of Mach-O symbols, which only
    /// [`Version::Symbols`] finds.
    pub fn has_symbols(&self) -> bool {
        self.symbols
    }

    /// Whether it holds more references than [`MAX_REFS`], or symbol values that only fit beside
    /// the others within [`MAX_FOUND`]: what only [`Version::Wide`] keeps. A `Wide` scan that
    /// is not wide is the `Symbols` scan.
    pub fn is_wide(&self) -> bool {
        self.wide
    }

    /// Whether some of its references are AArch64 ADRPs or the instructions that complete
    /// them further on, which only [`Version::SplitPairs`] finds.
    pub fn has_split_pairs(&self) -> bool {
        self.refs.iter().any(|r| {
            matches!(
                r.kind,
                Kind::Arm64(arm64::Form::Page | arm64::Form::Low12 { .. })
            )
        })
    }

    /// The segment whose memory holds `vaddr`.
    pub fn segment_at(&self, vaddr: u64) -> Option<&Segment> {
        self.segments
            .iter()
            .find(|s| s.vaddr <= vaddr && vaddr - s.vaddr < s.mem_len)
    }
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const EM_X86_64: u16 = 62;
const EM_AARCH64: u16 = 183;
const PT_LOAD: u32 = 1;
const SHT_PROGBITS: u32 = 1;
const SHT_SYMTAB: u32 = 2;
const SHT_RELA: u32 = 4;
const SHT_DYNAMIC: u32 = 6;
const SHT_DYNSYM: u32 = 11;
const SHF_ALLOC: u64 = 2;
const SHF_EXECINSTR: u64 = 4;
/// Bounds on the tables read, so that a hostile header costs nothing.
const MAX_SEGMENTS: usize = 64;
const MAX_SECTIONS: usize = 4096;
/// At most this many references are kept (the first ones by site) up to [`Version::Symbols`]:
/// a decoder holds them beside the old file (24 bytes each once prepared).
pub(super) const MAX_REFS: usize = 1 << 19;
/// At most this many are collected (24 bytes each), the first ones found: code sections in file
/// order, then the tables in section order. A 184 MB library would otherwise collect millions.
/// [`Version::Wide`] keeps them all: the prepared references take over the memory they were
/// collected in, so that keeping more costs a decoder no more memory.
const MAX_FOUND: usize = 2 * MAX_REFS;

/// Collect `r` unless [`MAX_FOUND`] references were collected already.
fn collect(refs: &mut Vec<Ref>, r: Ref) {
    if refs.len() < MAX_FOUND {
        refs.push(r);
    }
}

fn u16_at(data: &[u8], at: u64) -> Option<u16> {
    let at = usize::try_from(at).ok()?;
    Some(u16::from_le_bytes(
        data.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

pub(super) fn u32_at(data: &[u8], at: u64) -> Option<u32> {
    let at = usize::try_from(at).ok()?;
    Some(u32::from_le_bytes(
        data.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn i32_at(data: &[u8], at: u64) -> Option<i64> {
    u32_at(data, at).map(|v| i64::from(v as i32))
}

pub(super) fn u64_at(data: &[u8], at: u64) -> Option<u64> {
    let at = usize::try_from(at).ok()?;
    Some(u64::from_le_bytes(
        data.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// A section header, its file range checked to lie inside the file.
#[derive(Debug, Clone, Copy)]
struct Section<'a> {
    name: &'a [u8],
    kind: u32,
    flags: u64,
    offset: u64,
    len: u64,
    /// The index of a related section (a symbol table's strings, a relocation table's
    /// symbols).
    link: u32,
    /// The size of each entry, for a section of entries.
    entsize: u64,
}

/// The segments and references of `data` when it is a 64-bit little-endian ELF file for x86-64
/// or AArch64, or a Mach-O file of such slices; an empty image otherwise.
/// Whether `data` starts as a file [`scan`] reads does (a 64-bit little-endian ELF file of a
/// machine it knows, or a thin or universal Mach-O file): a cheap look at its first bytes.
pub(super) fn may_hold_refs(data: &[u8]) -> bool {
    machine(data).is_some()
        || data.get(..4).is_some_and(|magic| {
            let le = u32::from_le_bytes(magic.try_into().expect("4 bytes"));
            let be = u32::from_be_bytes(magic.try_into().expect("4 bytes"));
            le == macho::MH_MAGIC_64 || be == macho::FAT_MAGIC || be == macho::FAT_MAGIC_64
        })
}

/// Which references a scan finds: those of the first predictor (`Refs` in `bsdiff`), or also
/// AArch64 ADRP instructions and the instructions that complete their address further on
/// (`SplitPairs`), which the predictor byte 2 names, or also the values of a Mach-O file's
/// symbols (`Symbols`, predictor byte 3), or those with up to [`MAX_FOUND`] references kept
/// instead of [`MAX_REFS`] (`Wide`, predictor byte 4). A payload is decoded with the scan it
/// was made with, so that a change of what is found never changes an old payload's predictions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Version {
    First,
    SplitPairs,
    Symbols,
    Wide,
}

impl Version {
    /// How many references a scan of this version keeps, the first ones by site.
    fn kept(self) -> usize {
        match self {
            Version::Wide => MAX_FOUND,
            _ => MAX_REFS,
        }
    }
}

pub(super) fn scan(data: &[u8], version: Version) -> Image {
    elf(data, version)
        .or_else(|| mach_o(data, version))
        .unwrap_or_default()
}

fn mach_o(data: &[u8], version: Version) -> Option<Image> {
    let layout = macho::layout(data)?;
    let mut image = Image {
        segments: layout.segments,
        ..Image::default()
    };
    let code: Vec<(u64, u64, Machine)> = layout
        .sections
        .iter()
        .filter(|s| s.code && s.len > 0)
        .map(|s| (s.offset, s.offset + s.len, layout.machines[s.slice]))
        .collect();
    let mut bases = Vec::new();
    let mut refs = code_refs(data, &image, &code, &mut bases, version);
    let addresses = |sites: &[(u64, usize)], refs: &mut Vec<Ref>| {
        for &(site, slice) in sites {
            let (Some(value), Ok(slice)) = (u64_at(data, site), u8::try_from(slice)) else {
                continue;
            };
            let Some(target) = value.checked_add(u64::from(slice) << macho::SLICE_SHIFT) else {
                continue;
            };
            if value != 0 && image.segment_at(target).is_some() {
                let kind = match slice {
                    0 => Kind::Abs64,
                    _ => Kind::Shifted64 { slice },
                };
                collect(refs, Ref { site, kind, target });
            }
        }
    };
    addresses(&layout.pointers, &mut refs);
    // Symbol values only where they all fit beside the other references: kept by site, the
    // symbols of a universal file's first slice would take the place of the next slice's
    // code references (the `cryptography` wheel's `_rust.abi3.so`, over the bound without
    // them, lost 12%).
    if version >= Version::Symbols && refs.len() + layout.symbols.len() <= version.kept() {
        let before = refs.len();
        addresses(&layout.symbols, &mut refs);
        image.symbols = refs.len() > before;
        image.wide = image.symbols && before + layout.symbols.len() > MAX_REFS;
    }
    let found;
    (image.refs, found) = finish(refs, version.kept());
    image.wide |= version == Version::Wide && found > MAX_REFS;
    image.bases = bases;
    Some(image)
}

/// The references found in the code `code` (file ranges, each with its machine) of `data`, with
/// the x86-64 switch tables the code loads.
fn code_refs(
    data: &[u8],
    image: &Image,
    code: &[(u64, u64, Machine)],
    bases: &mut Vec<u64>,
    version: Version,
) -> Vec<Ref> {
    let code_v: Vec<(u64, u64)> = code
        .iter()
        .filter_map(|&(start, end, _)| {
            let v = image.vaddr_of(start)?;
            Some((v, v + (end - start)))
        })
        .collect();
    let mut refs = Vec::new();
    let mut loaded = Vec::new();
    for &(start, end, machine) in code {
        let Some(vstart) = image.vaddr_of(start) else {
            continue;
        };
        match machine {
            Machine::X86_64 => {
                let scan = x86::Scan {
                    data,
                    start,
                    end,
                    vstart,
                    code: &code_v,
                    image,
                };
                scan.run(&mut refs, &mut loaded);
            }
            Machine::Aarch64 => {
                let split = version >= Version::SplitPairs;
                let range = (start, end);
                arm64::scan(data, range, vstart, &code_v, image, &mut refs, split);
            }
        }
    }
    let mut tables = Tables {
        data,
        // Switch tables do not depend on the machine (only the x86-64 scan finds any).
        machine: Machine::X86_64,
        image,
        refs: &mut refs,
        bases,
    };
    tables.jump_tables(&mut loaded, &code_v);
    refs
}

/// `refs` sorted by site, without overlaps (the first of two overlapping references stays),
/// the first `kept` of them, and how many there were before they were cut to `kept`.
fn finish(mut refs: Vec<Ref>, kept: usize) -> (Vec<Ref>, usize) {
    sort_runs(&mut refs);
    let mut end = 0;
    refs.retain(|r| {
        let keep = r.site >= end;
        if keep {
            end = r.site + r.width();
        }
        keep
    });
    let found = refs.len();
    refs.truncate(kept);
    (refs, found)
}

/// Most runs [`sort_runs`] merges in place.
const MERGED_RUNS: usize = 16;

/// Sort `refs` by site, stably. The scan pushes them in a few sorted runs (libcrypto 3.0.17's
/// 215,144 come as 4); up to [`MERGED_RUNS`] runs are merged in place, which needs no memory
/// besides (a stable sort takes as much again: 5 MB whose pages are fresh), else sorted.
fn sort_runs(refs: &mut [Ref]) {
    let mut runs = vec![0];
    for (i, pair) in refs.windows(2).enumerate() {
        if pair[1].site < pair[0].site {
            if runs.len() == MERGED_RUNS {
                refs.sort_by_key(|r| r.site);
                return;
            }
            runs.push(i + 1);
        }
    }
    runs.push(refs.len());
    // Merge neighbours, each merged run taking the place of the two; `runs` holds where each
    // run starts, then where the last one ends.
    while runs.len() > 2 {
        let mut merged = vec![0];
        for k in (0..runs.len() - 1).step_by(2) {
            let (start, mid) = (runs[k], runs[k + 1]);
            // A last run without a neighbour stays as it is.
            let Some(&end) = runs.get(k + 2) else {
                merged.push(mid);
                continue;
            };
            let pair = &mut refs[start..end];
            match blocks_at_most(pair, mid - start, MERGED_BLOCKS) {
                true => merge_in_place(pair, mid - start),
                false => pair.sort_by_key(|r| r.site),
            }
            merged.push(end);
        }
        runs = merged;
    }
}

/// Most blocks (stretches taken from one run) two runs may merge into for [`merge_in_place`]:
/// its rotations move each reference about once per halving of the blocks, where runs that
/// interleave closely (a hostile file's) would move it once per halving of the references.
const MERGED_BLOCKS: usize = 64;

/// Whether merging `v[..mid]` and `v[mid..]` (each sorted by site) takes at most `most`
/// blocks, each from one of them.
fn blocks_at_most(v: &[Ref], mid: usize, most: usize) -> bool {
    let (left, right) = v.split_at(mid);
    let (mut i, mut j, mut blocks) = (0, 0, 0);
    while i < left.len() && j < right.len() {
        // A block of the left run (ties go left, as in a stable merge), then one of the right.
        i += left[i..].partition_point(|r| r.site <= right[j].site);
        blocks += 1;
        if i == left.len() {
            break;
        }
        j += right[j..].partition_point(|r| r.site < left[i].site);
        blocks += 1;
        if blocks > most {
            return false;
        }
    }
    true
}

/// Merge the runs `v[..mid]` and `v[mid..]`, each sorted by site, stably and in place, by
/// rotations (SymMerge: Kim and Kutzner, 2004, as Go's `sort.Stable` does).
fn merge_in_place(v: &mut [Ref], mid: usize) {
    let len = v.len();
    if mid == 0 || mid == len || v[mid - 1].site <= v[mid].site {
        return;
    }
    if mid == 1 {
        // The first of the right run wins ties: v[0] goes before the first site not below it.
        let at = mid + v[mid..].partition_point(|r| r.site < v[0].site);
        v[..at].rotate_left(1);
        return;
    }
    if len - mid == 1 {
        let at = v[..mid].partition_point(|r| r.site <= v[mid].site);
        v[at..].rotate_right(1);
        return;
    }
    let half = len / 2;
    let n = half + mid;
    let (mut start, mut end) = match mid > half {
        true => (n - len, half),
        false => (0, mid),
    };
    let last = n - 1;
    while start < end {
        let c = (start + end) / 2;
        if v[last - c].site >= v[c].site {
            start = c + 1;
        } else {
            end = c;
        }
    }
    let end = n - start;
    if start < mid && mid < end {
        v[start..end].rotate_left(mid - start);
    }
    if 0 < start && start < half {
        merge_in_place(&mut v[..half], start);
    }
    if half < end && end < len {
        merge_in_place(&mut v[half..], end - half);
    }
}

/// The machines whose code is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Machine {
    X86_64,
    Aarch64,
}

impl Machine {
    /// The relocation types whose addend is an address (relative and indirect relocations).
    fn address_addend(self, kind: u64) -> bool {
        match self {
            Machine::X86_64 => matches!(kind, 8 | 37),
            Machine::Aarch64 => matches!(kind, 1027 | 1032),
        }
    }
}

fn machine(data: &[u8]) -> Option<Machine> {
    if data.get(..4)? != ELF_MAGIC || data.get(4..6)? != [2, 1] {
        return None;
    }
    match u16_at(data, 0x12)? {
        EM_X86_64 => Some(Machine::X86_64),
        EM_AARCH64 => Some(Machine::Aarch64),
        _ => None,
    }
}

/// The code of `data` when it is a 64-bit little-endian ELF file, or a thin or universal Mach-O
/// file, for x86-64 or AArch64: the file ranges of its code sections, each with its machine, in
/// file order and apart (none for a file without section headers, or another file).
pub(crate) fn code_ranges(data: &[u8]) -> Vec<(u64, u64, Machine)> {
    let mut ranges: Vec<(u64, u64, Machine)> = match machine(data) {
        Some(machine) => sections(data)
            .unwrap_or_default()
            .iter()
            .filter(|s| {
                s.kind == SHT_PROGBITS
                    && s.flags & (SHF_ALLOC | SHF_EXECINSTR) == SHF_ALLOC | SHF_EXECINSTR
                    && s.len > 0
            })
            .map(|s| (s.offset, s.offset + s.len, machine))
            .collect(),
        None => macho::layout(data).map_or_else(Vec::new, |layout| {
            layout
                .sections
                .iter()
                .filter(|s| s.code && s.len > 0)
                .filter_map(|s| Some((s.offset, s.offset + s.len, *layout.machines.get(s.slice)?)))
                .collect()
        }),
    };
    ranges.sort_unstable_by_key(|r| (r.0, r.1));
    // Overlapping headers (a hostile or odd file) are merged, into the first one's machine.
    let mut apart: Vec<(u64, u64, Machine)> = Vec::with_capacity(ranges.len());
    for (start, end, machine) in ranges {
        match apart.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => apart.push((start, end, machine)),
        }
    }
    apart
}

fn elf(data: &[u8], version: Version) -> Option<Image> {
    let machine = machine(data)?;
    let mut image = Image {
        segments: segments(data)?,
        ..Image::default()
    };
    let sections = sections(data).unwrap_or_default();
    let code: Vec<(u64, u64, Machine)> = sections
        .iter()
        .filter(|s| {
            s.kind == SHT_PROGBITS
                && s.flags & (SHF_ALLOC | SHF_EXECINSTR) == SHF_ALLOC | SHF_EXECINSTR
        })
        .map(|s| (s.offset, s.offset + s.len, machine))
        .collect();
    let mut bases = Vec::new();
    let mut refs = code_refs(data, &image, &code, &mut bases, version);
    let mut tables = Tables {
        data,
        machine,
        image: &image,
        refs: &mut refs,
        bases: &mut bases,
    };
    for section in &sections {
        match (section.kind, section.name) {
            (SHT_RELA, _) => tables.relocations(section),
            (SHT_DYNSYM | SHT_SYMTAB, _) => tables.symbols(section),
            (SHT_DYNAMIC, _) => tables.dynamic(section),
            (SHT_PROGBITS, b".eh_frame_hdr") => tables.eh_frame_hdr(section),
            (SHT_PROGBITS, b".eh_frame") => tables.eh_frame(section),
            _ => {}
        }
    }
    let found;
    (image.refs, found) = finish(refs, version.kept());
    image.wide = version == Version::Wide && found > MAX_REFS;
    image.bases = bases;
    Some(image)
}

fn segments(data: &[u8]) -> Option<Vec<Segment>> {
    let phoff = u64_at(data, 0x20)?;
    let (phentsize, phnum) = (u16_at(data, 0x36)?, u16_at(data, 0x38)?);
    let mut segments = Vec::new();
    if phentsize < 56 || usize::from(phnum) > MAX_SEGMENTS {
        return Some(segments);
    }
    for i in 0..u64::from(phnum) {
        // Inside the file, so that the fields' offsets below cannot overflow.
        let at = phoff
            .checked_add(i * u64::from(phentsize))
            .filter(|&at| at <= data.len() as u64)?;
        if u32_at(data, at)? != PT_LOAD {
            continue;
        }
        let segment = Segment {
            offset: u64_at(data, at + 8)?,
            vaddr: u64_at(data, at + 16)?,
            file_len: u64_at(data, at + 32)?,
            mem_len: u64_at(data, at + 40)?,
        };
        // Only what the file holds, and addresses that do not wrap.
        let in_file = segment
            .offset
            .checked_add(segment.file_len)
            .is_some_and(|end| end <= data.len() as u64);
        let no_wrap = segment.vaddr.checked_add(segment.mem_len).is_some();
        if in_file && no_wrap && segment.file_len <= segment.mem_len {
            segments.push(segment);
        }
    }
    Some(segments)
}

/// The sections of two ELF files (see [`scan`]) that have the same name and size, as (offset in
/// `old`, offset in `new`, size), or with `starts`, data sections that have the same name, over
/// the smaller size; none unless both are such files. Likewise for two Mach-O files, whose
/// sections are named by slice, segment and section.
pub(super) fn same_sections(old: &[u8], new: &[u8], starts: bool) -> Vec<(u64, u64, u64)> {
    if let (Some(old), Some(new)) = (macho::layout(old), macho::layout(new)) {
        return macho::same_sections(&old, &new, starts);
    }
    let of = |data| -> Vec<Section<'_>> {
        if machine(data).is_none() {
            return Vec::new();
        }
        sections(data)
            .unwrap_or_default()
            .into_iter()
            .filter(|s| s.len > 0 && !s.name.is_empty())
            .collect()
    };
    let (old, new) = (of(old), of(new));
    old.iter()
        .filter_map(|o| {
            let n = new.iter().find(|n| n.name == o.name)?;
            let data = o.flags & SHF_EXECINSTR == 0;
            (n.len == o.len || (starts && data)).then_some((o.offset, n.offset, o.len.min(n.len)))
        })
        .collect()
}

fn sections(data: &[u8]) -> Option<Vec<Section<'_>>> {
    let shoff = u64_at(data, 0x28)?;
    let (shentsize, shnum) = (u16_at(data, 0x3a)?, u16_at(data, 0x3c)?);
    let shstrndx = u16_at(data, 0x3e)?;
    if shentsize < 64 || usize::from(shnum) > MAX_SECTIONS {
        return None;
    }
    let header = |i: u64| -> Option<(u32, Section<'_>)> {
        // Inside the file, so that the fields' offsets below cannot overflow.
        let at = shoff
            .checked_add(i * u64::from(shentsize))
            .filter(|&at| at <= data.len() as u64)?;
        let (offset, len) = (u64_at(data, at + 24)?, u64_at(data, at + 32)?);
        let kind = u32_at(data, at + 4)?;
        // NOBITS sections (.bss) hold no file bytes.
        let len = if kind == 8 { 0 } else { len };
        if offset.checked_add(len)? > data.len() as u64 {
            return None;
        }
        let section = Section {
            name: &[],
            kind,
            flags: u64_at(data, at + 8)?,
            offset,
            len,
            link: u32_at(data, at + 40)?,
            entsize: u64_at(data, at + 56)?,
        };
        Some((u32_at(data, at)?, section))
    };
    let names = header(u64::from(shstrndx))
        .map(|(_, s)| &data[s.offset as usize..(s.offset + s.len) as usize]);
    let mut sections = Vec::new();
    for i in 0..u64::from(shnum) {
        let Some((name_at, mut section)) = header(i) else {
            continue;
        };
        if let Some(name) = names.and_then(|names| names.get(name_at as usize..)) {
            section.name = name.split(|&b| b == 0).next().unwrap_or(&[]);
        }
        sections.push(section);
    }
    Some(sections)
}

/// The reference tables of an ELF file, read into `refs`.
struct Tables<'a, 'r> {
    data: &'a [u8],
    machine: Machine,
    image: &'a Image,
    refs: &'r mut Vec<Ref>,
    bases: &'r mut Vec<u64>,
}

impl Tables<'_, '_> {
    /// The index of `base` in the image's bases, added if new (tables come one after the
    /// other, so it is nearly always the last one).
    fn base(&mut self, base: u64) -> Option<u32> {
        let index = match self.bases.iter().rposition(|&b| b == base) {
            Some(index) => index,
            None => {
                self.bases.push(base);
                self.bases.len() - 1
            }
        };
        u32::try_from(index).ok()
    }

    /// Whether `vaddr` is an address inside the image worth predicting (not 0, which
    /// relocations leave in the file for the loader to fill).
    fn address(&self, vaddr: u64) -> bool {
        vaddr != 0 && self.image.segment_at(vaddr).is_some()
    }

    fn push(&mut self, site: u64, kind: Kind, target: u64) {
        if self.address(target) {
            collect(self.refs, Ref { site, kind, target });
        }
    }

    /// Entries of `section` of `size` bytes each (at most what the section holds).
    fn entries(section: &Section<'_>, size: u64) -> impl Iterator<Item = u64> {
        let (start, count) = (section.offset, section.len / size);
        (0..count).map(move |i| start + i * size)
    }

    /// The references of a relocation table: each entry's place and address addend, and the
    /// pointer the file holds at the place.
    ///
    /// The pointers are pushed after all the entries' fields: each kind is then one sorted run,
    /// where the three of each entry pushed together interleave two runs, and [`finish`]'s
    /// stable sort took 5.7 ms over libcrypto's 20,000 runs of three instead of 4.0 ms over its
    /// 4 runs. What it keeps is the same: only references with one same site keep their order,
    /// and a pointer that shares its site with an entry's field is that field, read as the same
    /// address. Where [`MAX_FOUND`] could be reached within the table, the order decides what
    /// is dropped, and the three of each entry go together as they always did.
    fn relocations(&mut self, section: &Section<'_>) {
        self.relocations_with(section, true);
    }

    /// [`Tables::relocations`], with the pointers pushed after the entries' fields only when
    /// `apart` allows it (tests compare both ways).
    fn relocations_with(&mut self, section: &Section<'_>, apart: bool) {
        let most = (section.len / 24).saturating_mul(3);
        let apart = apart && (self.refs.len() as u64).saturating_add(most) <= MAX_FOUND as u64;
        let mut pointers = Vec::new();
        for at in Self::entries(section, 24) {
            match self.relocation(at) {
                Some(pointer) if apart => pointers.push(pointer),
                Some((site, pointer)) => self.push(site, Kind::Abs64, pointer),
                None => {}
            }
        }
        for (site, pointer) in pointers {
            self.push(site, Kind::Abs64, pointer);
        }
    }

    /// Push the place and address addend of the relocation entry at `at`, and return the site
    /// and value of the pointer the file holds at the place (the addend, or a PLT stub), if any.
    fn relocation(&mut self, at: u64) -> Option<(u64, u64)> {
        let (place, info, addend) = (
            u64_at(self.data, at)?,
            u64_at(self.data, at + 8)?,
            u64_at(self.data, at + 16)?,
        );
        self.push(at, Kind::Abs64, place);
        if self.machine.address_addend(info & 0xffff_ffff) {
            self.push(at + 16, Kind::Abs64, addend);
        }
        let seg = self.image.segment_at(place)?;
        if place - seg.vaddr + 8 > seg.file_len {
            return None;
        }
        let site = seg.offset + (place - seg.vaddr);
        Some((site, u64_at(self.data, site)?))
    }

    /// Switch tables: 32-bit entries `case - table` after an address the code loads (`lea`)
    /// outside the code, as long as they lead into the code, up to the next such address.
    fn jump_tables(&mut self, loaded: &mut Vec<u64>, code: &[(u64, u64)]) {
        const MAX_ENTRIES: u64 = 1 << 16;
        loaded.sort_unstable();
        loaded.dedup();
        loaded.retain(|&v| !within(code, v));
        for (i, &table) in loaded.iter().enumerate() {
            let next = loaded.get(i + 1).copied().unwrap_or(u64::MAX);
            let Some(segment) = self.image.segment_at(table) else {
                continue;
            };
            let file_end = segment.vaddr + segment.file_len;
            for entry in (0..MAX_ENTRIES).map(|k| table + 4 * k) {
                if entry + 4 > next.min(file_end) {
                    break;
                }
                let site = segment.offset + (entry - segment.vaddr);
                let Some(case) = i32_at(self.data, site).and_then(|v| table.checked_add_signed(v))
                else {
                    break;
                };
                if !within(code, case) {
                    break;
                }
                let Some(base) = self.base(table) else {
                    break;
                };
                collect(
                    self.refs,
                    Ref {
                        site,
                        kind: Kind::Based32 { base },
                        target: case,
                    },
                );
            }
        }
    }

    fn symbols(&mut self, section: &Section<'_>) {
        const SHN_LORESERVE: u16 = 0xff00;
        for at in Self::entries(section, 24) {
            let (Some(index), Some(value)) = (u16_at(self.data, at + 6), u64_at(self.data, at + 8))
            else {
                continue;
            };
            if index != 0 && index < SHN_LORESERVE {
                self.push(at + 8, Kind::Abs64, value);
            }
        }
    }

    fn dynamic(&mut self, section: &Section<'_>) {
        // Tags whose value is an address.
        const POINTERS: [u64; 17] = [
            3,
            4,
            5,
            6,
            7,
            12,
            13,
            17,
            23,
            25,
            26,
            32,
            0x6fff_fef5,
            0x6fff_fff0,
            0x6fff_fffc,
            0x6fff_fffe,
            0x6fff_fef6,
        ];
        for at in Self::entries(section, 16) {
            let (Some(tag), Some(value)) = (u64_at(self.data, at), u64_at(self.data, at + 8))
            else {
                continue;
            };
            if POINTERS.contains(&tag) {
                self.push(at + 8, Kind::Abs64, value);
            }
        }
    }

    /// A 32-bit PC-relative pointer at `site` (DW_EH_PE_pcrel | DW_EH_PE_sdata4).
    fn pcrel(&mut self, site: u64) {
        let (Some(value), Some(vsite)) = (i32_at(self.data, site), self.image.vaddr_of(site))
        else {
            return;
        };
        if let Some(target) = vsite.checked_add_signed(value) {
            self.push(site, Kind::Rel32 { k: 0 }, target);
        }
    }

    fn eh_frame_hdr(&mut self, section: &Section<'_>) {
        const PCREL_SDATA4: u8 = 0x1b;
        const UDATA4: u8 = 0x03;
        const DATAREL_SDATA4: u8 = 0x3b;
        let at = section.offset;
        let Some(head) = self.data.get(at as usize..at as usize + 4) else {
            return;
        };
        let Some(base) = self.image.vaddr_of(at) else {
            return;
        };
        if head[0] != 1 || head[1] != PCREL_SDATA4 || head[2] != UDATA4 {
            return;
        }
        self.pcrel(at + 4);
        if head[3] != DATAREL_SDATA4 {
            return;
        }
        let Some(count) = u32_at(self.data, at + 8) else {
            return;
        };
        let room = section.len.saturating_sub(12) / 4;
        let Some(index) = self.base(base) else {
            return;
        };
        for i in 0..u64::from(count).saturating_mul(2).min(room) {
            let site = at + 12 + 4 * i;
            if let Some(target) = i32_at(self.data, site).and_then(|v| base.checked_add_signed(v)) {
                self.push(site, Kind::Based32 { base: index }, target);
            }
        }
    }

    fn eh_frame(&mut self, section: &Section<'_>) {
        let (start, end) = (section.offset, section.offset + section.len);
        // CIE offset -> (FDE pointer encoding, LSDA encoding, augmentation has 'z').
        let mut cies: Vec<(u64, Cie)> = Vec::new();
        let mut at = start;
        while let Some(len) = u32_at(self.data, at) {
            if len == 0 || len == u32::MAX {
                break;
            }
            let record_end = at + 4 + u64::from(len);
            if record_end > end {
                break;
            }
            let Some(id) = u32_at(self.data, at + 4) else {
                break;
            };
            if id == 0 {
                if let Some(cie) = self.cie(at + 8, record_end) {
                    cies.push((at, cie));
                }
            } else if let Some(cie_at) = (at + 4).checked_sub(u64::from(id)) {
                if let Some(vcie) = self.image.vaddr_of(cie_at) {
                    self.push(at + 4, Kind::Back32, vcie);
                }
                if let Ok(i) = cies.binary_search_by_key(&cie_at, |c| c.0) {
                    let cie = cies[i].1;
                    self.fde(at + 8, record_end, cie);
                }
            }
            at = record_end;
        }
    }

    fn cie(&mut self, mut at: u64, end: u64) -> Option<Cie> {
        let version = *self.data.get(at as usize)?;
        at += 1;
        let augmentation_at = at as usize;
        let len = self
            .data
            .get(augmentation_at..end as usize)?
            .iter()
            .position(|&b| b == 0)?;
        let augmentation = &self.data[augmentation_at..augmentation_at + len];
        at += len as u64 + 1;
        let mut cie = Cie {
            fde: None,
            lsda: None,
            z: augmentation.first() == Some(&b'z'),
        };
        if !cie.z {
            return Some(cie);
        }
        at = uleb_end(self.data, at)?; // code alignment
        at = uleb_end(self.data, at)?; // data alignment (sleb: same length rule)
        at = if version == 1 {
            at + 1
        } else {
            uleb_end(self.data, at)?
        }; // return register
        at = uleb_end(self.data, at)?; // augmentation data length
        for &c in &augmentation[1..] {
            let encoding = *self.data.get(at as usize)?;
            at += 1;
            match c {
                b'R' => cie.fde = Some(encoding),
                b'L' => cie.lsda = Some(encoding),
                b'P' => {
                    if encoding == 0x1b || encoding == 0x9b {
                        self.pcrel(at);
                    }
                    at += pointer_len(encoding)?;
                }
                _ => return Some(cie),
            }
        }
        Some(cie)
    }

    fn fde(&mut self, at: u64, end: u64, cie: Cie) {
        if cie.fde != Some(0x1b) || at + 8 > end {
            return;
        }
        self.pcrel(at);
        // pc_range (not a reference), then the augmentation data with the LSDA pointer.
        if !cie.z || cie.lsda != Some(0x1b) {
            return;
        }
        if let Some(lsda) = uleb_end(self.data, at + 8) {
            if lsda + 4 <= end && self.data.get(at as usize + 8) != Some(&0) {
                self.pcrel(lsda);
            }
        }
    }
}

/// What an FDE needs of its CIE.
#[derive(Debug, Clone, Copy)]
struct Cie {
    fde: Option<u8>,
    lsda: Option<u8>,
    z: bool,
}

/// The offset after the LEB128 number at `at`.
fn uleb_end(data: &[u8], at: u64) -> Option<u64> {
    let rest = data.get(at as usize..)?;
    let len = rest.iter().take(10).position(|&b| b & 0x80 == 0)?;
    Some(at + len as u64 + 1)
}

/// Bytes of a pointer with DWARF encoding `encoding`.
fn pointer_len(encoding: u8) -> Option<u64> {
    match encoding & 0x0f {
        0x00 | 0x04 | 0x0c => Some(8),
        0x03 | 0x0b => Some(4),
        0x02 | 0x0a => Some(2),
        _ => None,
    }
}

/// Whether `v` lies in one of `ranges`.
fn within(ranges: &[(u64, u64)], v: u64) -> bool {
    ranges.iter().any(|&(start, end)| start <= v && v < end)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    proptest::proptest! {
        /// Runs merged in place come out as a stable sort leaves them (references of the same
        /// site in the order they were pushed), whether the runs are few and apart, interleave
        /// closely (past [`MERGED_BLOCKS`]) or are too many to merge (past [`MERGED_RUNS`]).
        #[test]
        fn runs_merge_as_a_stable_sort_orders(
            runs in proptest::collection::vec(
                (proptest::collection::vec(0u64..400, 0..300), 0u64..4, 1u64..40),
                0..20,
            ),
        ) {
            let mut refs = Vec::new();
            for (sites, base, spread) in &runs {
                let mut sites: Vec<u64> = sites.iter().map(|s| base * 1000 + s * spread).collect();
                sites.sort_unstable();
                for site in sites {
                    let target = refs.len() as u64;
                    refs.push(Ref { site, kind: Kind::Abs64, target });
                }
            }
            let mut sorted = refs.clone();
            sorted.sort_by_key(|r| r.site);
            sort_runs(&mut refs);
            proptest::prop_assert_eq!(refs, sorted);
        }
    }

    pub(crate) fn fixture(name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    }

    fn section<'a>(data: &'a [u8], name: &[u8]) -> Section<'a> {
        sections(data)
            .expect("section headers")
            .into_iter()
            .find(|s| s.name == name)
            .expect("the section")
    }

    /// Check that each reference's bytes in `data` are what its rule makes of its site and
    /// target.
    pub(crate) fn check_values(data: &[u8], image: &Image) {
        for r in &image.refs {
            let site = image.vaddr_of(r.site).expect("sites lie in segments");
            let (s, t) = (site as i64, r.target as i64);
            let rel = |v: i64| i64::from(i32::try_from(v).expect("32 bits")) as u64;
            let (held, expected) = match r.kind {
                Kind::Rel32 { k } => (i32_at(data, r.site), rel(t - (s + i64::from(k)))),
                Kind::Back32 => (i32_at(data, r.site), rel(s - t)),
                Kind::Based32 { base } => (
                    i32_at(data, r.site),
                    rel(t - image.bases[base as usize] as i64),
                ),
                Kind::Abs64 => (u64_at(data, r.site).map(|v| v as i64), r.target),
                Kind::Shifted64 { slice } => (
                    u64_at(data, r.site).map(|v| v as i64),
                    r.target - (u64::from(slice) << macho::SLICE_SHIFT),
                ),
                // An ADRP or the instruction completing it further on is checked by encoding its
                // own address, which must give its bytes back.
                Kind::Arm64(form @ (arm64::Form::Page | arm64::Form::Low12 { .. })) => {
                    let bytes = &data[r.site as usize..r.site as usize + 4];
                    let same = arm64::encode(form, bytes, s, t).expect("its own address fits");
                    assert_eq!(&same[..4], bytes, "{r:?}");
                    continue;
                }
                Kind::Arm64(form) => {
                    let bytes = &data[r.site as usize..];
                    assert_eq!(arm64::decode(bytes, site), Some((form, r.target)));
                    continue;
                }
            };
            assert_eq!(held.map(|v| v as u64), Some(expected), "{r:?}");
        }
    }

    #[test]
    fn finds_the_references_of_a_library() {
        let data = fixture("elf-1.old.so");
        let image = scan(&data, Version::SplitPairs);
        assert!(
            image
                .refs
                .windows(2)
                .all(|w| w[0].site + w[0].width() <= w[1].site),
            "sorted, not overlapping"
        );
        check_values(&data, &image);
        let count = |f: &dyn Fn(&Kind) -> bool| image.refs.iter().filter(|r| f(&r.kind)).count();
        // Every FDE's CIE pointer, and the search table's two entries per FDE.
        let hdr = section(&data, b".eh_frame_hdr");
        let fdes = u32_at(&data, hdr.offset + 8).expect("fde count") as usize;
        assert!(fdes >= 40, "{fdes} FDEs");
        assert_eq!(count(&|k| *k == Kind::Back32), fdes);
        let hdr_v = image.vaddr_of(hdr.offset).expect("in a segment");
        let table =
            count(&|k| matches!(k, Kind::Based32 { base } if image.bases[*base as usize] == hdr_v));
        assert_eq!(table, 2 * fdes);
        // Switch tables: the other based entries (the 40 functions switch over 7 cases).
        let cases = count(&|k| matches!(k, Kind::Based32 { .. })) - table;
        assert!(cases >= 40 * 7, "{cases} switch table entries");
        // Relocations: the place of each, and the pointer the file holds there.
        let relocations = section(&data, b".rela.dyn").len as usize / 24;
        assert!(count(&|k| *k == Kind::Abs64) >= relocations + 40);
        // Calls, jumps and RIP-relative operands: each function calls two others and reads its
        // state and its message.
        let code = count(&|k| matches!(k, Kind::Rel32 { .. })) - fdes;
        assert!(code >= 40 * 4, "{code} code references");
    }

    /// The references of `data`'s relocation tables, sorted and kept as [`finish`] does, with
    /// the pointers at the patched places pushed after the entries' fields where allowed, or
    /// with each entry's.
    fn relocation_refs(data: &[u8], apart: bool) -> Vec<Ref> {
        let image = Image {
            segments: segments(data).expect("program headers"),
            ..Image::default()
        };
        let (mut refs, mut bases) = (Vec::new(), Vec::new());
        let mut tables = Tables {
            data,
            machine: machine(data).expect("a machine"),
            image: &image,
            refs: &mut refs,
            bases: &mut bases,
        };
        for section in sections(data).expect("section headers") {
            if section.kind == SHT_RELA {
                tables.relocations_with(&section, apart);
            }
        }
        finish(refs, MAX_REFS).0
    }

    /// Pushing the pointers at the patched places after the entries' fields keeps what
    /// `finish` keeps: on a library, on this test's own executable (when it is an ELF file),
    /// and on a library one of whose relocations patches its own table (a pointer there shares
    /// its site with an entry's field).
    #[test]
    fn relocation_pointers_apart_keep_what_finish_keeps() {
        let mut cases = vec![("elf-1", fixture("elf-1.old.so"))];
        let own = std::fs::read(std::env::current_exe().expect("test executable"))
            .expect("reading the test executable");
        if machine(&own).is_some() {
            cases.push(("own executable", own));
        }
        // Relocation 3 of elf-1 patches relocation 5's place field.
        let mut inside = fixture("elf-1.old.so");
        let rela = section(&inside, b".rela.dyn");
        let image = Image {
            segments: segments(&inside).expect("program headers"),
            ..Image::default()
        };
        let field = image.vaddr_of(rela.offset + 5 * 24).expect("in a segment");
        let at = (rela.offset + 3 * 24) as usize;
        inside[at..at + 8].copy_from_slice(&field.to_le_bytes());
        cases.push(("relocation patching its own table", inside));
        for (name, data) in cases {
            let apart = relocation_refs(&data, true);
            assert!(apart.len() > 40, "{name}: {} references", apart.len());
            assert_eq!(apart, relocation_refs(&data, false), "{name}");
        }
    }

    pub(crate) use super::macho::tests::{macho, universal_x86, universal_x86_arm64, with_symbols};

    /// A minimal x86-64 ELF file: one loaded segment (file offset = address) with `code` as its
    /// `.text` at 0x1000.
    pub(crate) fn elf_with_code(code: &[u8]) -> Vec<u8> {
        let names = b"\0.text\0.shstrtab\0";
        let names_at = 0x1000 + code.len();
        let headers_at = (names_at + names.len()).next_multiple_of(8);
        let mut data = vec![0u8; headers_at + 3 * 64];
        let put = |data: &mut Vec<u8>, at: usize, bytes: &[u8]| {
            data[at..at + bytes.len()].copy_from_slice(bytes);
        };
        put(&mut data, 0, b"\x7fELF\x02\x01\x01");
        put(&mut data, 0x10, &3u16.to_le_bytes()); // shared object
        put(&mut data, 0x12, &EM_X86_64.to_le_bytes());
        put(&mut data, 0x20, &64u64.to_le_bytes()); // program headers
        put(&mut data, 0x28, &(headers_at as u64).to_le_bytes()); // section headers
        for (at, v) in [
            (0x34, 64u16),
            (0x36, 56),
            (0x38, 1),
            (0x3a, 64),
            (0x3c, 3),
            (0x3e, 2),
        ] {
            put(&mut data, at, &v.to_le_bytes());
        }
        let len = data.len() as u64;
        put(&mut data, 64, &PT_LOAD.to_le_bytes());
        put(&mut data, 68, &5u32.to_le_bytes()); // r-x
        for (at, v) in [
            (72, 0u64),
            (80, 0),
            (88, 0),
            (96, len),
            (104, len),
            (112, 0x1000),
        ] {
            put(&mut data, at, &v.to_le_bytes());
        }
        put(&mut data, 0x1000, code);
        put(&mut data, names_at, names);
        let text = headers_at + 64;
        put(&mut data, text, &1u32.to_le_bytes());
        put(&mut data, text + 4, &SHT_PROGBITS.to_le_bytes());
        put(
            &mut data,
            text + 8,
            &(SHF_ALLOC | SHF_EXECINSTR).to_le_bytes(),
        );
        for (at, v) in [(16, 0x1000u64), (24, 0x1000), (32, code.len() as u64)] {
            put(&mut data, text + at, &v.to_le_bytes());
        }
        let strtab = headers_at + 128;
        put(&mut data, strtab, &7u32.to_le_bytes());
        put(&mut data, strtab + 4, &3u32.to_le_bytes());
        for (at, v) in [(24, names_at as u64), (32, names.len() as u64)] {
            put(&mut data, strtab + at, &v.to_le_bytes());
        }
        data
    }

    #[test]
    fn a_huge_library_keeps_the_first_references() {
        // `call` to the next instruction, more times than references are kept or collected.
        let calls = MAX_FOUND + 1000;
        let code: Vec<u8> = (0..calls).flat_map(|_| [0xe8, 0, 0, 0, 0]).collect();
        let data = elf_with_code(&code);
        for (version, kept) in [(Version::SplitPairs, MAX_REFS), (Version::Wide, MAX_FOUND)] {
            let image = scan(&data, version);
            assert_eq!(image.refs.len(), kept, "{version:?}");
            assert_eq!(image.is_wide(), version == Version::Wide);
            for (i, r) in image.refs.iter().enumerate() {
                let site = 0x1000 + 5 * i as u64 + 1;
                assert_eq!((r.site, r.target), (site, site + 4));
            }
        }
    }

    /// A wide scan keeps every reference of a library with more than `MAX_REFS` of them, and
    /// is the `Symbols` scan of one with fewer.
    #[test]
    fn a_wide_scan_differs_only_beyond_the_narrow_bound() {
        // `n` references: calls to the next instruction, and a last call, to the code's end,
        // which is none.
        let calls = |n: usize| -> Vec<u8> {
            let code: Vec<u8> = (0..n + 1).flat_map(|_| [0xe8, 0, 0, 0, 0]).collect();
            elf_with_code(&code)
        };
        let sites = |image: &Image| image.refs.iter().map(|r| r.site).collect::<Vec<_>>();
        let over = calls(MAX_REFS + 10);
        let (narrow, wide) = (scan(&over, Version::Symbols), scan(&over, Version::Wide));
        assert_eq!((narrow.refs.len(), narrow.is_wide()), (MAX_REFS, false));
        assert_eq!((wide.refs.len(), wide.is_wide()), (MAX_REFS + 10, true));
        assert_eq!(sites(&wide)[..MAX_REFS], sites(&narrow)[..]);
        let under = calls(MAX_REFS);
        let (narrow, wide) = (scan(&under, Version::Symbols), scan(&under, Version::Wide));
        assert!(!wide.is_wide());
        assert_eq!(sites(&wide), sites(&narrow));
        assert_eq!(wide.refs.len(), MAX_REFS);
        // A Mach-O library whose symbols fit beside its calls within MAX_FOUND, not MAX_REFS:
        // only a wide scan has them. With fewer symbols, both scans have them.
        const X86_64: u32 = 0x0100_0007;
        let code: Vec<u8> = (0..MAX_REFS - 999)
            .flat_map(|_| [0xe8, 0, 0, 0, 0])
            .collect();
        let library = macho::tests::macho(X86_64, &code, &[]);
        for (symbols, wide_only) in [(2000u64, true), (500, false)] {
            let table: Vec<(u8, u64)> = (0..symbols).map(|k| (0x0f, 0x1000 + 5 * k)).collect();
            let file = macho::tests::with_symbols(&library, &table);
            let (narrow, wide) = (scan(&file, Version::Symbols), scan(&file, Version::Wide));
            let expected = MAX_REFS - 1000 + symbols as usize;
            assert_eq!(wide.refs.len(), expected, "{symbols} symbols");
            assert_eq!((wide.has_symbols(), wide.is_wide()), (true, wide_only));
            assert_eq!(narrow.has_symbols(), !wide_only);
            if !wide_only {
                assert_eq!(sites(&wide), sites(&narrow));
            }
        }
    }

    #[test]
    fn finds_the_references_of_an_arm64_library() {
        let data = fixture("elf-1.arm64.old.so");
        let image = scan(&data, Version::SplitPairs);
        check_values(&data, &image);
        let count = |form: Arm64| {
            image
                .refs
                .iter()
                .filter(|r| r.kind == Kind::Arm64(form))
                .count()
        };
        // Each function calls two others (BL), branches (B.cond, CBZ) and reaches its state and
        // its message through ADRP pairs.
        assert!(
            count(Arm64::Branch26) >= 80,
            "{} B/BL",
            count(Arm64::Branch26)
        );
        assert!(
            count(Arm64::Imm19) >= 40,
            "{} B.cond/CBZ",
            count(Arm64::Imm19)
        );
        let pairs: usize = (0..=4).map(|scale| count(Arm64::Adrp { scale })).sum();
        assert!(pairs >= 40, "{pairs} ADRP pairs");
        let fdes = image.refs.iter().filter(|r| r.kind == Kind::Back32).count();
        assert!(fdes >= 40, "{fdes} FDEs");
    }

    #[test]
    fn other_files_have_none() {
        assert!(scan(&[], Version::SplitPairs).refs.is_empty());
        assert!(scan(b"\x7fELF", Version::SplitPairs).refs.is_empty());
        assert!(
            scan(&crate::test_data::noise(1, 10_000), Version::SplitPairs)
                .refs
                .is_empty()
        );
        // A 32-bit ELF file, or one for another machine.
        let mut data = fixture("elf-1.old.so");
        data[4] = 1;
        assert!(scan(&data, Version::SplitPairs).refs.is_empty());
        let mut data = fixture("elf-1.old.so");
        data[0x12] = 40; // 32-bit Arm
        assert!(scan(&data, Version::SplitPairs).refs.is_empty());
        assert!(same_sections(&data, &fixture("elf-1.new.so"), true).is_empty());
    }

    #[test]
    fn damaged_files_are_read_without_panics() {
        let data = fixture("elf-1.old.so");
        let shoff = u64_at(&data, 0x28).expect("shoff") as usize;
        let phoff = u64_at(&data, 0x20).expect("phoff") as usize;
        let hdr = section(&data, b".eh_frame_hdr");
        let frames = section(&data, b".eh_frame");
        // Every byte of the headers and tables, and a sample of the unwind tables, flipped.
        let places = (0..64)
            .chain(phoff..phoff + 10 * 56)
            .chain(shoff..data.len())
            .chain((hdr.offset as usize..(frames.offset + frames.len) as usize).step_by(7));
        for at in places {
            for flip in [0xff, 0x80, 0x01] {
                let mut bad = data.clone();
                bad[at] ^= flip;
                let image = scan(&bad, Version::SplitPairs);
                assert!(image.refs.windows(2).all(|w| w[0].site < w[1].site));
                assert!(image.refs.is_empty() || may_hold_refs(&bad), "flip at {at}");
            }
        }
        for len in (0..data.len()).step_by(61) {
            scan(&data[..len], Version::SplitPairs);
        }
        // Header tables said to start near the end of the address space (found by fuzzing:
        // the offsets of their fields overflowed).
        for field in [0x20, 0x28] {
            for far in [
                u64::MAX,
                u64::MAX - 10,
                u64::MAX - 64,
                data.len() as u64 + 1,
            ] {
                let mut bad = data.clone();
                bad[field..field + 8].copy_from_slice(&far.to_le_bytes());
                scan(&bad, Version::SplitPairs);
            }
        }
    }
}
