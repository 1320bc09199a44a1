//! Packages already published must stay applicable: for each delta format, a payload written by
//! an earlier build (in `tests/data/`) still decodes to its file. Neither a stream layout nor a
//! model (bsdiff's diff coder) can drift without a new format number.
//!
//! `BSI_BLESS=1 cargo test -p bsi-delta --test formats NAME` writes a test's payload again: only
//! for a new format, along with a new magic, and keeping a payload of the old one (each test of
//! an old format checks that its stored payload still has the old magic).

use std::path::{Path, PathBuf};

use bsi_delta::{converted_code, delta_encoder};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// Pseudo-random bytes (xorshift), the same on every machine and in every version.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

/// Decode `name`'s stored payload against `old` and require `new`; write it first when blessing.
fn check(encoder: &str, name: &str, old: &[u8], new: &[u8]) {
    let encoder = delta_encoder(encoder).expect("a known encoder");
    let path = data(name);
    if std::env::var_os("BSI_BLESS").is_some() {
        let payload = encoder
            .encode(old, new)
            .expect("encode")
            .expect("the encoder applies");
        std::fs::write(&path, payload).expect("write the payload");
    }
    let payload = std::fs::read(&path).expect("read the payload");
    let decoded = encoder
        .decode(old, &payload, new.len() as u64)
        .unwrap_or_else(|e| panic!("{name} no longer decodes: {e}"));
    assert!(decoded == new, "{name} no longer gives its file");
}

/// A program whose pointers moved in its first third, with 2 KB inserted in the middle and a few
/// bytes edited in a long unchanged tail: the diff coder's value bits, its zero flags, its
/// long-run counts (format 1 and 2) and its gaps (format 3) all take part.
fn moved_program() -> (Vec<u8>, Vec<u8>) {
    let mut old = bytes(0x2545_f491_4f6c_dd1d, 122_000);
    let inserted = old.split_off(120_000);
    for (i, chunk) in old.chunks_exact_mut(64).enumerate() {
        chunk[..8].copy_from_slice(&(0x40_0000u64 + i as u64 * 64).to_le_bytes());
    }
    let mut new = old.clone();
    for chunk in new[..40_000].chunks_exact_mut(64) {
        let pointer = u64::from_le_bytes(chunk[..8].try_into().expect("8 bytes"));
        chunk[..8].copy_from_slice(&(pointer + 0x1040).to_le_bytes());
    }
    new.splice(60_000..60_000, inserted);
    for at in [90_001, 100_003, 110_007] {
        new[at] = new[at].wrapping_add(0x21);
    }
    (old, new)
}

/// Check that the stored payload `name` starts with `magic`.
fn stored_format(name: &str, magic: &[u8], what: &str) {
    let stored = std::fs::read(data(name)).expect("read the payload");
    assert_eq!(&stored[..magic.len()], magic, "{name}: {what}");
}

#[test]
fn bsdiff_1() {
    let (old, new) = moved_program();
    check("bsdiff", "bsdiff-1.bin", &old, &new);
    stored_format("bsdiff-1.bin", b"BSD\x01\x00", "format 1");
}

/// Format 3: format 2 whose diff stream codes the zero flags near changes only, and gaps.
#[test]
fn bsdiff_3() {
    let (old, new) = moved_program();
    check("bsdiff", "bsdiff-3.bin", &old, &new);
    stored_format("bsdiff-3.bin", b"BSD\x03\x00", "format 3, no predictor");
    check_libraries(3, b"BSD\x03\x01", "format 3, reference predictor");
}

/// Format 5: format 3 whose diff stream codes the zero flags of 16 bytes after a change before
/// it codes a gap, not 32; the libraries of the test above, whose payloads keep format 3.
#[test]
fn bsdiff_5() {
    check_libraries(5, b"BSD\x05", "format 5");
}

/// The stored payloads `bsdiff-{format}-elf.bin`, `-arm64.bin` and `-macho.bin` of gcc's
/// x86-64 and AArch64 builds of `elf-1.gen.py`'s library and of a universal Mach-O file, each
/// checked to decode and to start with `magic`.
fn check_libraries(format: u8, magic: &[u8], what: &str) {
    let read = |name: &str| std::fs::read(data(name)).expect("read a stored library");
    for (old, new, kind) in [
        ("elf-1.old.so", "elf-1.new.so", "elf"),
        ("elf-1.arm64.old.so", "elf-1.arm64.new.so", "arm64"),
        ("macho-1.old", "macho-1.new", "macho"),
    ] {
        let payload = format!("bsdiff-{format}-{kind}.bin");
        let (old, new) = (read(old), read(new));
        check("bsdiff", &payload, &old, &new);
        stored_format(&payload, magic, what);
    }
}

/// Format 3 with predictor 2: the AArch64 library's references include ADRPs that an ADD or a
/// load or store completes further on.
#[test]
fn bsdiff_3_split_pairs() {
    let read = |name: &str| std::fs::read(data(name)).expect("read a stored library");
    let (old, new) = (read("elf-1.arm64.old.so"), read("elf-1.arm64.new.so"));
    check("bsdiff", "bsdiff-3-arm64-split.bin", &old, &new);
    stored_format(
        "bsdiff-3-arm64-split.bin",
        b"BSD\x03\x02",
        "format 3, ADRPs completed further on",
    );
}

/// Format 3 with predictor 3: a Mach-O library (`macho-4.*`, written by bsi-delta's tests)
/// whose symbol values are references.
#[test]
fn bsdiff_3_symbols() {
    let read = |name: &str| std::fs::read(data(name)).expect("read a stored library");
    let (old, new) = (read("macho-4.old"), read("macho-4.new"));
    check("bsdiff", "bsdiff-3-symbols.bin", &old, &new);
    stored_format(
        "bsdiff-3-symbols.bin",
        b"BSD\x03\x03",
        "format 3, Mach-O symbol values",
    );
}

/// A signed arm64 Mach-O program (`macho-3.*`, written by bsi-delta's tests) with a byte changed
/// in every third page: the new file's code directories (SHA-1 and SHA-256) are named after the
/// predictor byte, and their slots are the hashes of the pages the decoder wrote.
#[test]
fn bsdiff_signed() {
    let read = |name: &str| std::fs::read(data(name)).expect("read a stored program");
    let (old, new) = (read("macho-3.old"), read("macho-3.new"));
    check("bsdiff", "bsdiff-signed.bin", &old, &new);
    let stored = read("bsdiff-signed.bin");
    assert_eq!(&stored[..3], b"BSD");
    assert_eq!(stored[4] & 0x80, 0x80, "code directories follow");
}

/// A library relinked with a function inserted in the middle (two builds by gcc of the program
/// `elf-1.gen.py` writes): format 2, whose decoder finds the old file's references and predicts
/// where they point now.
#[test]
fn bsdiff_2() {
    let read = |name: &str| std::fs::read(data(name)).expect("read a stored library");
    let (old, new) = (read("elf-1.old.so"), read("elf-1.new.so"));
    check("bsdiff", "bsdiff-2.bin", &old, &new);
    stored_format("bsdiff-2.bin", b"BSD\x02\x01", "format 2, x86-64 predictor");
}

/// The same library built for AArch64: format 2, whose decoder reads AArch64 instructions.
#[test]
fn bsdiff_2_arm64() {
    let read = |name: &str| std::fs::read(data(name)).expect("read a stored library");
    let (old, new) = (read("elf-1.arm64.old.so"), read("elf-1.arm64.new.so"));
    check("bsdiff", "bsdiff-2-arm64.bin", &old, &new);
    stored_format(
        "bsdiff-2-arm64.bin",
        b"BSD\x02\x01",
        "format 2, ELF predictor",
    );
}

/// Near-identical files: a few bytes edited, a run inserted and one moved.
#[test]
fn blocks_1() {
    let old = bytes(5, 100_000);
    let mut new = old.clone();
    new[10] ^= 0x40;
    new[70_000] ^= 0x01;
    new.splice(30_000..30_000, bytes(6, 300));
    let moved: Vec<u8> = new.drain(50_000..52_000).collect();
    new.extend(moved);
    check("blocks", "blocks-1.bin", &old, &new);
}

/// Text with lines edited, removed and added.
#[test]
fn zstd_prefix_1() {
    let line = |i: u32| format!("entry {i}: value {}\n", i * 7919 % 10007);
    let old: Vec<u8> = (0..2_000).flat_map(|i| line(i).into_bytes()).collect();
    let new: Vec<u8> = (0..2_100)
        .filter(|i| i % 97 != 0)
        .flat_map(|i| match i % 31 {
            0 => format!("changed {i}\n").into_bytes(),
            _ => line(i).into_bytes(),
        })
        .collect();
    check("zstd-prefix", "zstd-prefix-1.bin", &old, &new);
}

/// A file over 32 MiB, which zstd-prefix cuts into frames of 32 MiB, each with the whole old file
/// as prefix: 33 copies of the old file with a byte changed in each.
#[test]
fn zstd_prefix_framed_1() {
    let old = bytes(7, 1 << 20);
    let mut new = Vec::with_capacity(33 << 20);
    for k in 0..33usize {
        new.extend_from_slice(&old);
        let at = new.len() - old.len() + k * 4099;
        new[at] ^= 0x5a;
    }
    check("zstd-prefix", "zstd-prefix-framed-1.bin", &old, &new);
    let stored = std::fs::read(data("zstd-prefix-framed-1.bin")).expect("read the payload");
    assert_eq!(&stored[..4], b"ZPF\x01", "the stored payload is framed");
}

/// A changelog that gained an entry at the top, both compressed by GNU gzip 1.12 (`gzip -9n`,
/// as Debian does), stored as they are: the decoder compresses the rebuilt content again and
/// must give back the new file's exact bytes.
#[test]
fn gzip_1() {
    let read = |name: &str| std::fs::read(data(name)).expect("read a stored gzip file");
    let (old, new) = (read("gzip-1.old.gz"), read("gzip-1.new.gz"));
    check("gzip", "gzip-1.bin", &old, &new);
    stored_format("gzip-1.bin", b"GZD\x01", "gzip format 1");
}

/// A changelog of 900 entries (300 KB) that gained six at the top, both compressed by GNU gzip
/// 1.12 (`gzip -9n`): format 2 names the old entries as a piece of both contents, over which
/// the decoder replays the old stream's matches.
#[test]
fn gzip_2() {
    let read = |name: &str| std::fs::read(data(name)).expect("read a stored gzip file");
    let (old, new) = (read("gzip-2.old.gz"), read("gzip-2.new.gz"));
    check("gzip", "gzip-2.bin", &old, &new);
    stored_format("gzip-2.bin", b"GZD\x02", "gzip format 2");
}

/// A program against another one (two small x86-64 libraries of `tests/data`), where the
/// payload with the new file's code converted (format `ZPC\x01`) is the smaller.
#[test]
fn zstd_prefix_code_1() {
    let read = |name: &str| std::fs::read(data(name)).expect("read a stored library");
    let (old, new) = (read("elf-2.old.so"), read("elf-1.new.so"));
    check("zstd-prefix", "zstd-prefix-code-1.bin", &old, &new);
    let stored = std::fs::read(data("zstd-prefix-code-1.bin")).expect("read the payload");
    assert_eq!(&stored[..4], b"ZPC\x01", "the stored payload is converted");
    assert_eq!(converted_code(&stored), Some("x86-64"));
    let plain = std::fs::read(data("zstd-prefix-1.bin")).expect("read the payload");
    assert_eq!(converted_code(&plain), None);
}

/// A universal Mach-O program of an x86-64 slice and an arm64 one (`macho-2.new`, built by
/// bsi-delta's tests) against other bytes: each range of code tagged with its machine (format
/// `ZPM\x01`).
#[test]
fn zstd_prefix_tagged_code_1() {
    let new = std::fs::read(data("macho-2.new")).expect("read the stored program");
    let old = bytes(0x9e37_79b9_7f4a_7c15, 20_000);
    check("zstd-prefix", "zstd-prefix-tagged-code-1.bin", &old, &new);
    let stored = std::fs::read(data("zstd-prefix-tagged-code-1.bin")).expect("read the payload");
    assert_eq!(&stored[..4], b"ZPM\x01", "the stored payload is converted");
    assert_eq!(converted_code(&stored), Some("x86-64 and arm64"));
}

/// A signed arm64 Mach-O program (`macho-3.*`): its code directories' slots zeroed before
/// compressing and filled in from the pages decoded (format `ZPS\x01`).
#[test]
fn zstd_prefix_signed_1() {
    let read = |name: &str| std::fs::read(data(name)).expect("read a stored program");
    let (old, new) = (read("macho-3.old"), read("macho-3.new"));
    check("zstd-prefix", "zstd-prefix-signed-1.bin", &old, &new);
    let stored = read("zstd-prefix-signed-1.bin");
    assert_eq!(
        &stored[..4],
        b"ZPS\x01",
        "the stored payload has its slots zeroed"
    );
}

/// As [`zstd_prefix_code_1`], with two small AArch64 libraries: their code converted as AArch64
/// code (format `ZPA\x01`).
#[test]
fn zstd_prefix_arm64_code_1() {
    let read = |name: &str| std::fs::read(data(name)).expect("read a stored library");
    let (old, new) = (read("elf-2.arm64.old.so"), read("elf-1.arm64.new.so"));
    check("zstd-prefix", "zstd-prefix-arm64-code-1.bin", &old, &new);
    let stored = std::fs::read(data("zstd-prefix-arm64-code-1.bin")).expect("read the payload");
    assert_eq!(&stored[..4], b"ZPA\x01", "the stored payload is converted");
    assert_eq!(converted_code(&stored), Some("arm64"));
}
