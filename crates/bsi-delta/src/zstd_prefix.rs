use std::io::{self, Write};

use zstd::stream::raw::{CParameter, DParameter};

use crate::{copy_exact_len, window_log, DecodeError, DeltaEncoder, LEVEL};

/// Largest new file encoded through zstd's multithreaded path (see `encode`).
const MULTITHREADED_MAX: usize = 64 << 20;
/// Smallest old file encoded through zstd's multithreaded path, exclusive (see `encode`).
const MULTITHREADED_MIN_OLD: usize = 8 << 20;

/// zstd with the old file as reference prefix (what `zstd --patch-from` does), in long mode with
/// a window that covers old and new file together.
#[derive(Debug, Clone, Copy)]
pub struct ZstdPrefix;

impl DeltaEncoder for ZstdPrefix {
    fn name(&self) -> &'static str {
        "zstd-prefix"
    }

    /// Level 19 with a long window runs at 0.5 to 3 MB/s. Beyond 64 KiB it was smaller than
    /// bsdiff only where every delta was weak (13 Firefox files of 74 KB to 1 MB, 13 major
    /// versions apart); on libssl3's libssl.so (688 KB) it cost 0.26 s for 39,921 B against
    /// bsdiff's 12,296 B. Below, it wins by a few bytes (5 to 25 on the plists and engines of
    /// the testdata and libssl3) in milliseconds.
    fn max_new_len(&self) -> usize {
        64 << 10
    }

    /// On text it wins: libssl3's changelog (1 MB, 3.0.17 -> 3.0.20) costs 3,770 B inside its
    /// gzip payload against 5,140 B with bsdiff.
    fn max_text_len(&self) -> usize {
        1 << 20
    }

    fn covers_plain(&self) -> bool {
        true
    }

    fn encode(&self, old: &[u8], new: &[u8]) -> io::Result<Option<Vec<u8>>> {
        let window = window_log(old.len() as u64 + new.len() as u64);
        let mut encoder = zstd::stream::write::Encoder::with_ref_prefix(Vec::new(), LEVEL, old)?;
        encoder.set_parameter(CParameter::WindowLog(window))?;
        encoder.set_parameter(CParameter::EnableLongDistanceMatching(true))?;
        // One worker thread: zstd's multithreaded path (as the zstd program uses) lets long
        // distance matching see the prefix, which the single-threaded path does not. Firefox's
        // omni.ja (43 MB, ESR 140 -> 153): 1,848,351 B instead of 3,384,901 B. One worker, so
        // the output does not depend on the machine. Only where it paid: old files over 8 MiB
        // (on the security updates' smaller files it saved 26 bytes in all and cost 25% more
        // build time) and new files up to 64 MiB (on libxul, 184 MB, it saved 0.07% for 30% more
        // build time).
        if old.len() > MULTITHREADED_MIN_OLD && new.len() <= MULTITHREADED_MAX {
            encoder.set_parameter(CParameter::NbWorkers(1))?;
        }
        encoder.set_parameter(CParameter::ChecksumFlag(false))?;
        encoder.set_pledged_src_size(Some(new.len() as u64))?;
        encoder.write_all(new)?;
        encoder.finish().map(Some)
    }

    fn decode_into(
        &self,
        old: &[u8],
        payload: &[u8],
        new_len: u64,
        out: &mut dyn Write,
    ) -> Result<(), DecodeError> {
        let window = window_log(old.len() as u64 + new_len);
        let mut raw =
            zstd::stream::raw::Decoder::with_ref_prefix(old).map_err(DecodeError::Corrupt)?;
        raw.set_parameter(DParameter::WindowLogMax(window))
            .map_err(DecodeError::Corrupt)?;
        let decoder = zstd::stream::zio::Reader::new(io::BufReader::new(payload), raw);
        copy_exact_len(decoder, new_len, out)
    }
}
