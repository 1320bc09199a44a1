//! Synthetic "executable-like" files: a code region of pseudo-instructions with relative branch
//! displacements, a string table and a data region of absolute pointers, laid out as a minimal
//! x86-64 Mach-O executable (as macOS ships them): `__TEXT` with its `__text` and `__cstring`
//! sections, `__DATA_CONST,__const`, and `__LINKEDIT` holding the rebase opcodes
//! (`LC_DYLD_INFO_ONLY`) that name the data region's pointers.
//!
//! The file is kept as a model (instructions refer to their targets by index, not by offset) and
//! serialized on demand, so an edit behaves like a relink: inserting bytes shifts every later
//! offset and rewrites the displacements and pointers that cross the edit point.

use crate::rng::SplitMix64;

/// Virtual address of file offset 0, used for the absolute pointers of the data region.
const IMAGE_BASE: u64 = 0x1_0000_0000;
/// Length of the header (Mach-O header, load commands, zero padding): where the code starts.
const HEADER_LEN: usize = 1024;
const LC_SEGMENT_64: u32 = 0x19;
const LC_DYLD_INFO_ONLY: u32 = 0x8000_0022;
/// `S_ATTR_PURE_INSTRUCTIONS | S_ATTR_SOME_INSTRUCTIONS`, and `S_CSTRING_LITERALS`.
const CODE_SECTION: u32 = 0x8000_0400;
const CSTRING_SECTION: u32 = 0x2;

/// A small x86-64-like opcode alphabet; early entries are drawn more often, like real code.
const OPS: &[&[u8]] = &[
    &[0x48, 0x8B, 0x45, 0xF8],
    &[0x48, 0x89, 0x7D, 0xF8],
    &[0x48, 0x85, 0xC0],
    &[0x31, 0xC0],
    &[0x48, 0x8B, 0x07],
    &[0x48, 0x8B, 0x47, 0x08],
    &[0x48, 0x89, 0xDF],
    &[0x4C, 0x89, 0xF7],
    &[0x89, 0xC7],
    &[0x74, 0x08],
    &[0x75, 0x10],
    &[0x48, 0x8B, 0x47, 0x10],
    &[0x48, 0x8D, 0x4D, 0xE0],
    &[0x83, 0xF8, 0x00],
    &[0x41, 0x57],
    &[0x41, 0x56],
    &[0x53],
    &[0x5B],
    &[0x41, 0x5E],
    &[0x41, 0x5F],
    &[0xB8, 0x01, 0x00, 0x00, 0x00],
    &[0x0F, 0x1F, 0x44, 0x00, 0x00],
    &[0x48, 0x83, 0xEC, 0x20],
    &[0x48, 0x83, 0xC4, 0x20],
    &[0x66, 0x90],
    &[0x90],
];

#[derive(Clone, Copy, Debug)]
enum Insn {
    /// Plain bytes (up to 8).
    Raw { len: u8, bytes: [u8; 8] },
    /// `E8 rel32` to the instruction with this index.
    Call(u32),
    /// `0F 84 rel32` to the instruction with this index.
    Jcc(u32),
    /// `48 8D 05 rel32`: RIP-relative address of the string with this index.
    Lea(u32),
}

impl Insn {
    fn len(self) -> usize {
        match self {
            Insn::Raw { len, .. } => usize::from(len),
            Insn::Call(_) => 5,
            Insn::Jcc(_) => 6,
            Insn::Lea(_) => 7,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Data {
    /// Absolute pointer to an instruction (function pointer, vtable entry).
    Code(u32),
    /// Absolute pointer to a string.
    Str(u32),
    /// A constant.
    Word(u64),
}

/// One synthetic executable, editable like a relinked binary.
#[derive(Clone, Debug)]
pub struct Exe {
    insns: Vec<Insn>,
    /// Indices of the first instruction of every function.
    funcs: Vec<u32>,
    strings: Vec<String>,
    data: Vec<Data>,
    version_idx: usize,
}

const WORDS: &[&str] = &[
    "Page",
    "Frame",
    "Load",
    "Request",
    "Policy",
    "Script",
    "Node",
    "Layout",
    "Render",
    "Style",
    "Cache",
    "Network",
    "Process",
    "Proxy",
    "Client",
    "Context",
    "Buffer",
    "Image",
    "Font",
    "Text",
    "Event",
    "Handler",
    "Manager",
    "Controller",
    "Session",
    "Storage",
    "Security",
    "Origin",
    "Key",
    "Cipher",
    "Digest",
    "Table",
    "Index",
    "Cursor",
    "Stream",
    "Object",
    "Value",
    "Heap",
    "Alloc",
];

fn raw(rng: &mut SplitMix64) -> Insn {
    // min of two draws: a skewed, Zipf-like choice, so the code compresses like real code
    let n = OPS.len() as u64;
    let pick = rng.below(n).min(rng.below(n));
    let op = OPS[usize::try_from(pick).expect("index below OPS.len()")];
    let mut bytes = [0u8; 8];
    bytes[..op.len()].copy_from_slice(op);
    if op.len() >= 3 && rng.below(5) == 0 {
        // vary the immediate / stack slot among a few values
        bytes[op.len() - 1] = 0xC0u8.wrapping_add(8 * (rng.below(8) as u8));
    }
    Insn::Raw {
        len: op.len() as u8,
        bytes,
    }
}

fn index(i: usize) -> u32 {
    u32::try_from(i).expect("synthetic executables have fewer than 2^32 instructions")
}

impl Exe {
    /// Generates an executable of about `size` bytes whose symbols start with `prefix` and whose
    /// embedded version string is `version`.
    pub fn generate(seed: u64, size: usize, prefix: &str, version: &str) -> Exe {
        let mut rng = SplitMix64::new(seed);
        let code_budget = size * 3 / 4;
        let str_budget = size / 10;
        let data_entries = size * 3 / 20 / 8;

        let mut strings = Vec::new();
        let mut str_bytes = 0;
        while str_bytes < str_budget {
            let mut s = format!("_{prefix}");
            for _ in 0..2 + rng.below(3) {
                s.push_str(WORDS[rng.below(WORDS.len() as u64) as usize]);
            }
            if rng.below(4) == 0 {
                s.push_str("::");
                s.push_str(WORDS[rng.below(WORDS.len() as u64) as usize]);
            }
            str_bytes += s.len() + 1;
            strings.push(s);
        }
        let version_idx = strings.len() / 2;
        strings.insert(version_idx, version.to_string());
        let nstrings = strings.len() as u64;

        let mut insns = Vec::with_capacity(code_budget / 3);
        let mut funcs = Vec::new();
        // calls name a function number; resolved to an instruction index once all exist
        let mut pending_calls = Vec::new();
        let mut code_bytes = 0;
        while code_bytes < code_budget {
            let start = insns.len();
            let fnum = funcs.len() as u64;
            funcs.push(index(start));
            for op in [&[0x55u8][..], &[0x48, 0x89, 0xE5]] {
                let mut bytes = [0u8; 8];
                bytes[..op.len()].copy_from_slice(op);
                insns.push(Insn::Raw {
                    len: op.len() as u8,
                    bytes,
                });
            }
            let body = 6 + rng.below(60) as usize;
            for _ in 0..body {
                let roll = rng.below(100);
                let insn = if roll < 7 {
                    // mostly near calls, sometimes anywhere
                    let target = if rng.below(10) < 7 {
                        fnum.saturating_sub(40) + rng.below(80)
                    } else {
                        rng.below(1 << 20)
                    };
                    pending_calls.push(insns.len());
                    Insn::Call(target as u32)
                } else if roll < 12 {
                    Insn::Jcc(index(start + 2 + rng.below(body as u64) as usize))
                } else if roll < 16 {
                    Insn::Lea(rng.below(nstrings) as u32)
                } else {
                    raw(&mut rng)
                };
                insns.push(insn);
            }
            for op in [0x5Du8, 0xC3] {
                let mut bytes = [0u8; 8];
                bytes[0] = op;
                insns.push(Insn::Raw { len: 1, bytes });
            }
            code_bytes += insns[start..].iter().map(|i| i.len()).sum::<usize>();
        }
        for at in pending_calls {
            if let Insn::Call(f) = insns[at] {
                insns[at] = Insn::Call(funcs[f as usize % funcs.len()]);
            }
        }

        let mut data = Vec::with_capacity(data_entries);
        for _ in 0..data_entries {
            let roll = rng.below(100);
            data.push(if roll < 60 {
                Data::Code(funcs[rng.below(funcs.len() as u64) as usize])
            } else if roll < 85 {
                Data::Str(rng.below(nstrings) as u32)
            } else {
                Data::Word(rng.below(64) * 8)
            });
        }
        Exe {
            insns,
            funcs,
            strings,
            data,
            version_idx,
        }
    }

    /// Replaces the embedded version string.
    pub fn set_version(&mut self, version: &str) {
        self.strings[self.version_idx] = version.to_string();
    }

    /// Adds a string at a random place of the string table (shifting the later strings, like a
    /// linker would) and returns its index.
    pub fn add_string(&mut self, rng: &mut SplitMix64, s: &str) -> u32 {
        let pos = rng.below(self.strings.len() as u64) as usize;
        let pos32 = index(pos);
        self.strings.insert(pos, s.to_string());
        if self.version_idx >= pos {
            self.version_idx += 1;
        }
        for insn in &mut self.insns {
            if let Insn::Lea(t) = insn {
                if *t >= pos32 {
                    *t += 1;
                }
            }
        }
        for d in &mut self.data {
            if let Data::Str(t) = d {
                if *t >= pos32 {
                    *t += 1;
                }
            }
        }
        pos32
    }

    /// Inserts `count` instructions plus a call (and a reference to string `lea`, if given) in
    /// the middle of a function; every displacement and pointer to a later instruction is
    /// relinked.
    pub fn insert_run(&mut self, rng: &mut SplitMix64, count: usize, lea: Option<u32>) {
        let f = rng.below(self.funcs.len() as u64 - 1) as usize;
        let (start, end) = (self.funcs[f] as usize, self.funcs[f + 1] as usize);
        let at = start + 2 + rng.below((end - start - 4) as u64) as usize;
        let callee = self.funcs[rng.below(self.funcs.len() as u64) as usize];
        let mut run: Vec<Insn> = (0..count).map(|_| raw(rng)).collect();
        run.insert(count / 2, Insn::Call(callee));
        if let Some(s) = lea {
            run.insert(0, Insn::Lea(s));
        }
        let k = index(run.len());
        let at32 = index(at);
        let shift = |t: &mut u32| {
            if *t >= at32 {
                *t += k;
            }
        };
        for insn in &mut self.insns {
            match insn {
                Insn::Call(t) | Insn::Jcc(t) => shift(t),
                Insn::Raw { .. } | Insn::Lea(_) => {}
            }
        }
        for insn in &mut run {
            if let Insn::Call(t) = insn {
                shift(t);
            }
        }
        for d in &mut self.data {
            if let Data::Code(t) = d {
                shift(t);
            }
        }
        self.funcs.iter_mut().for_each(shift);
        self.insns.splice(at..at, run);
    }

    /// Rewrites `count` plain instructions in place (their lengths may change).
    pub fn replace_run(&mut self, rng: &mut SplitMix64, count: usize) {
        let mut at = rng.below(self.insns.len() as u64) as usize;
        let mut done = 0;
        while done < count && at < self.insns.len() {
            if let Insn::Raw { .. } = self.insns[at] {
                self.insns[at] = raw(rng);
                done += 1;
            }
            at += 1;
        }
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut offs = Vec::with_capacity(self.insns.len());
        let mut off = HEADER_LEN;
        for insn in &self.insns {
            offs.push(off as u64);
            off += insn.len();
        }
        let code_end = off;
        let mut str_offs = Vec::with_capacity(self.strings.len());
        for s in &self.strings {
            str_offs.push(off as u64);
            off += s.len() + 1;
        }
        let str_end = off;
        let data_start = (off + 7) & !7;
        let total = data_start + self.data.len() * 8;

        let rebase = rebase_opcodes(&self.data);
        let linkedit = (total + 7) & !7;
        let mut out = Vec::with_capacity(linkedit + rebase.len());
        macho_header(
            &mut out,
            [code_end, str_end, data_start, total, linkedit],
            &rebase,
        );
        out.resize(HEADER_LEN, 0);

        let rel = |from_end: u64, to: u64| -> [u8; 4] {
            let d = i32::try_from(to as i64 - from_end as i64).expect("displacement fits i32");
            d.to_le_bytes()
        };
        for (i, insn) in self.insns.iter().enumerate() {
            let end = offs[i] + insn.len() as u64;
            match *insn {
                Insn::Raw { len, bytes } => out.extend_from_slice(&bytes[..usize::from(len)]),
                Insn::Call(t) => {
                    out.push(0xE8);
                    out.extend_from_slice(&rel(end, offs[t as usize]));
                }
                Insn::Jcc(t) => {
                    out.extend_from_slice(&[0x0F, 0x84]);
                    out.extend_from_slice(&rel(end, offs[t as usize]));
                }
                Insn::Lea(s) => {
                    out.extend_from_slice(&[0x48, 0x8D, 0x05]);
                    out.extend_from_slice(&rel(end, str_offs[s as usize]));
                }
            }
        }
        for s in &self.strings {
            out.extend_from_slice(s.as_bytes());
            out.push(0);
        }
        out.resize(data_start, 0);
        for d in &self.data {
            let v = match *d {
                Data::Code(t) => IMAGE_BASE + offs[t as usize],
                Data::Str(s) => IMAGE_BASE + str_offs[s as usize],
                Data::Word(w) => w,
            };
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.resize(linkedit, 0);
        out.extend_from_slice(&rebase);
        out
    }
}

/// The Mach-O header and load commands, for a file whose code ends at `code_end`, strings
/// at `str_end`, whose data region spans `data_start..data_end`, followed at `linkedit` by
/// the rebase opcodes `rebase`.
fn macho_header(out: &mut Vec<u8>, offsets: [usize; 5], rebase: &[u8]) {
    let [code_end, str_end, data_start, data_end, linkedit] = offsets.map(|o| o as u64);
    let u32s = |out: &mut Vec<u8>, values: &[u32]| {
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    };
    let u64s = |out: &mut Vec<u8>, values: &[u64]| {
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    };
    let name = |out: &mut Vec<u8>, name: &str| {
        let mut field = [0u8; 16];
        field[..name.len()].copy_from_slice(name.as_bytes());
        out.extend_from_slice(&field);
    };
    // Sections: (name, file offset, size, alignment, flags); segments after `__PAGEZERO`: (name,
    // file offset, size, protection, sections), each at `IMAGE_BASE` plus its file offset.
    type SectionSpec = (&'static str, u64, u64, u32, u32);
    let text: [SectionSpec; 2] = [
        (
            "__text",
            HEADER_LEN as u64,
            code_end - HEADER_LEN as u64,
            4,
            CODE_SECTION,
        ),
        (
            "__cstring",
            code_end,
            str_end - code_end,
            0,
            CSTRING_SECTION,
        ),
    ];
    let data: [SectionSpec; 1] = [("__const", data_start, data_end - data_start, 3, 0)];
    let rebase_len = rebase.len() as u64;
    let segments: [(&str, u64, u64, u32, &[SectionSpec]); 3] = [
        ("__TEXT", 0, str_end, 5, &text),
        ("__DATA_CONST", data_start, data_end - data_start, 3, &data),
        ("__LINKEDIT", linkedit, rebase_len, 1, &[]),
    ];
    let command_len = |sections: usize| 72 + 80 * sections as u32;
    let commands: u32 = segments.iter().map(|s| command_len(s.4.len())).sum::<u32>() + 72 + 48;
    // magic, x86-64, all subtypes, MH_EXECUTE, command count and bytes, MH_PIE, reserved
    u32s(
        out,
        &[0xfeed_facf, 0x0100_0007, 3, 2, 5, commands, 0x0020_0000, 0],
    );
    // __PAGEZERO: the first 4 GiB, no file bytes, no access.
    u32s(out, &[LC_SEGMENT_64, command_len(0)]);
    name(out, "__PAGEZERO");
    u64s(out, &[0, IMAGE_BASE, 0, 0]);
    u32s(out, &[0; 4]);
    for (segment, fileoff, filesize, prot, sections) in segments {
        u32s(out, &[LC_SEGMENT_64, command_len(sections.len())]);
        name(out, segment);
        u64s(out, &[IMAGE_BASE + fileoff, filesize, fileoff, filesize]);
        u32s(out, &[prot, prot, sections.len() as u32, 0]);
        for &(section, offset, size, align, flags) in sections {
            name(out, section);
            name(out, segment);
            u64s(out, &[IMAGE_BASE + offset, size]);
            u32s(out, &[offset as u32, align, 0, 0, flags, 0, 0, 0]);
        }
    }
    u32s(
        out,
        &[LC_DYLD_INFO_ONLY, 48, linkedit as u32, rebase.len() as u32],
    );
    u32s(out, &[0; 8]);
}

/// The rebase opcodes naming every pointer of the data region `data` (segment 2, from its start):
/// runs of pointers, with the constants between them skipped.
fn rebase_opcodes(data: &[Data]) -> Vec<u8> {
    fn uleb(out: &mut Vec<u8>, mut n: u64) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            out.push(if n == 0 { byte } else { byte | 0x80 });
            if n == 0 {
                break;
            }
        }
    }
    // REBASE_OPCODE_SET_TYPE_IMM (pointer), SET_SEGMENT_AND_OFFSET_ULEB (segment 2, offset 0)
    let mut out = vec![0x11, 0x22, 0x00];
    let is_pointer = |d: &Data| !matches!(d, Data::Word(_));
    let mut k = 0;
    while k < data.len() {
        let run = data[k..]
            .iter()
            .take_while(|d| is_pointer(d) == is_pointer(&data[k]))
            .count();
        if is_pointer(&data[k]) {
            // DO_REBASE_ULEB_TIMES
            out.push(0x60);
        } else {
            // ADD_ADDR_ULEB, in bytes
            out.push(0x30);
        }
        uleb(
            &mut out,
            if is_pointer(&data[k]) {
                run as u64
            } else {
                8 * run as u64
            },
        );
        k += run;
    }
    // REBASE_OPCODE_DONE
    out.push(0x00);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads the call at `off` and returns the offset it targets.
    fn call_target(bytes: &[u8], off: usize) -> usize {
        assert_eq!(bytes[off], 0xE8);
        let d = i32::from_le_bytes(bytes[off + 1..off + 5].try_into().expect("4 bytes"));
        (off as i64 + 5 + i64::from(d)) as usize
    }

    #[test]
    fn insertion_relinks_calls_to_the_same_code() {
        let base = Exe::generate(7, 64 * 1024, "T", "T-1.0");
        let mut edited = base.clone();
        let mut rng = SplitMix64::new(1);
        let s = edited.add_string(&mut rng, "_TNewCheck");
        edited.insert_run(&mut rng, 5, Some(s));
        edited.set_version("T-1.1");
        let (a, b) = (base.to_bytes(), edited.to_bytes());
        assert_ne!(a, b);
        assert!(b.len() > a.len());
        // every call, old or inserted, still lands on a function prologue
        let mut off = HEADER_LEN;
        let starts: std::collections::BTreeSet<u32> = edited.funcs.iter().copied().collect();
        let mut calls = 0;
        for (i, insn) in edited.insns.iter().enumerate() {
            if let Insn::Call(t) = insn {
                assert!(starts.contains(t), "call {i} targets {t}, not a function");
                let target = call_target(&b, off);
                assert_eq!(b[target..target + 4], [0x55, 0x48, 0x89, 0xE5]);
                calls += 1;
            }
            off += insn.len();
        }
        assert!(calls > 100);
        // the generation itself is deterministic
        assert_eq!(a, Exe::generate(7, 64 * 1024, "T", "T-1.0").to_bytes());
    }

    /// The files are Mach-O as bsi reads it: its bsdiff encoder predicts their references (the
    /// relinked calls, jumps, string operands and rebased pointers), so that an edit costs about
    /// what it inserts, not every displacement it moves; and the payload decodes exactly.
    #[test]
    fn relinks_are_predicted_as_in_a_mach_o_file() {
        use bsi_delta::{Bsdiff, DeltaEncoder};
        let base = Exe::generate(11, 256 * 1024, "M", "M-1.0");
        let mut edited = base.clone();
        let mut rng = SplitMix64::new(2);
        let s = edited.add_string(&mut rng, "_MNewCheck");
        edited.insert_run(&mut rng, 40, Some(s));
        let (old, new) = (base.to_bytes(), edited.to_bytes());
        let encode = |encoder: &Bsdiff| {
            encoder
                .encode(&old, &new)
                .expect("encode")
                .expect("a payload")
        };
        let (predicted, unpredicted) = (encode(&Bsdiff::PLAIN), encode(&Bsdiff::UNPREDICTED));
        assert!(
            predicted.len() * 4 < unpredicted.len(),
            "predicted {} B, unpredicted {} B",
            predicted.len(),
            unpredicted.len()
        );
        let mut decoded = Vec::new();
        Bsdiff::PLAIN
            .decode_into(&old, &predicted, new.len() as u64, &mut decoded)
            .expect("decodes");
        assert_eq!(decoded, new);
    }
}
